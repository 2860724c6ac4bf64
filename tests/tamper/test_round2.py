"""Issue 10, round 2 (backup side): a hostile backup VM against qvm-backup, and the lower KDF ceiling.

A fake qubes.Backup (QUBES_BACKUP_RPC_DIR) answers COMMIT with garbage, oversized or wrong frames, or with a
DONE text that names another backup; a slow one reads 4 KiB every 1.8 s.  Required of dom0 every time: one
clear error line and exit 1 (never an "internal error"), dom0's own account of the result (never the VM's
text), a bounded time, and nothing named like a backup left behind.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from qubes_backup_dom0.format import crypto

from .harness import BIN, VM, OrderGuard, World, assert_one_line, encode_stream, refuse_stream
from .test_hostile import with_header_values

REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------- the KDF ceiling (item 7)

# Accepted by the old ceilings (1 GiB, work 2^24), refused by the new ones (256 MiB, work 2^22).
ABOVE_NEW_CEILING = [
    {"kdf_n": str(1 << 19), "kdf_r": "8"},  # 512 MiB
    {"kdf_n": str(1 << 20), "kdf_r": "8"},  # 1 GiB, the old maximum
    {"kdf_n": str(1 << 18), "kdf_r": "16"},  # 512 MiB
    {"kdf_n": str(1 << 20), "kdf_r": "4"},  # 512 MiB
    {"kdf_n": str(1 << 18), "kdf_r": "8", "kdf_p": "4"},  # 256 MiB but work 2^23
    {"kdf_n": str(1 << 17), "kdf_r": "8", "kdf_p": "16"},  # 128 MiB but work 2^24
]  # fmt: skip


@pytest.mark.parametrize("values", ABOVE_NEW_CEILING, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
def test_kdf_above_256mib_or_work_ceiling_refused_before_kdf(
    world: World, guard: OrderGuard, monkeypatch: pytest.MonkeyPatch, values: dict[str, str]
) -> None:
    def no_kdf(*_: object) -> bytes:
        raise AssertionError("the KDF ran for a header above the ceilings")

    monkeypatch.setattr(crypto, "derive_master", no_kdf)
    message = refuse_stream(world, encode_stream(with_header_values(world.a, **values)))
    assert "ceiling" in message, message


# ------------------------------------------------------------------------- a fake qubes.Backup (items 1, 6)

PRELUDE = """\
import sys, time
from qubes_backup_protocol import frames
from qubes_backup_protocol.frames import FrameType
inp, out = sys.stdin.buffer, sys.stdout.buffer
first = frames.read_frame(inp, {FrameType.LOCATION: (64, 4096)})
NAME = first.name
def until_commit():
    while True:
        f = frames.read_frame(inp, {FrameType.DATA: (0, frames.MAX_DATA_FRAME), FrameType.COMMIT: (0, 0)})
        if f is None:
            sys.exit(1)
        if f.type == FrameType.COMMIT:
            return
def reply(raw):
    out.write(raw)
    out.flush()
until_commit()
"""

COMMIT_REPLIES = {
    "garbage": "reply(b'this is not a frame at all, just bytes\\n')",
    "oversized-done": "reply(frames.encode_header(FrameType.DONE, 0, 1 << 30))",
    "done-too-long": "reply(frames.encode(FrameType.DONE, '', b'/' * 5000 + NAME.encode()))",
    "done-with-name": "reply(frames.encode(FrameType.DONE, 'backup-header', ('/x/' + NAME).encode()))",
    "member-frame": "reply(frames.encode(FrameType.MEMBER, 'backup-header', b'x' * 100))",
    "end-frame": "reply(frames.encode(FrameType.END))",
    "unknown-type": "reply(b'QB\\x01\\x63' + bytes(6))",
    "bad-magic": "reply(b'XX\\x01\\x13' + bytes(6))",
    "truncated-done": "reply(frames.encode_header(FrameType.DONE, 0, 100) + b'/home')",
    "other-backup": "reply(frames.encode(FrameType.DONE, '', b'/home/user/backups/qubes-backup-2020-01-01T000000'))",
    "not-utf8": "reply(frames.encode(FrameType.DONE, '', b'/home/\\xff\\xfe/' + NAME.encode() + b'\\xff'))",
    "terminal-escapes": "reply(frames.encode(FrameType.DONE, '', b'\\x1b[2J\\x1b]0;pwned\\x07 ok'))",
    "empty-done": "reply(frames.encode(FrameType.DONE))",
    "no-answer": "sys.exit(0)",
    "status-after-done": "reply(frames.encode(FrameType.DONE, '', ('/home/user/' + NAME).encode())); sys.exit(3)",
    "stall": "time.sleep(60)",
    "drip-done": (
        "data = frames.encode(FrameType.DONE, '', ('/home/user/' + NAME).encode())\n"
        "for b in data:\n    reply(bytes([b])); time.sleep(0.5)"
    ),
}  # fmt: skip


def fake_agent(tmp_path: Path, body: str) -> Path:
    """A hostile qubes.Backup; qubes.Restore is the real one (qvm-backup lists the location with it first)."""
    rpc = tmp_path / "rpc"
    rpc.mkdir(exist_ok=True)
    (rpc / "qubes.Backup").write_text(body)
    shutil.copy(REPO / "rpc-policy" / "qubes.Restore", rpc / "qubes.Restore")
    return rpc


def backup_dir(world: World, name: str) -> tuple[str, Path]:
    """A fresh directory in the source system's backup VM: (its path in the VM, on the host)."""
    host = world.src.vm_root(VM) / "home/user" / name
    host.mkdir()
    return f"/home/user/{name}", host


def run_backup_cli(world: World, rpc: Path, location: str, *extra: str, timeout: str = "2",
                   seconds: float = 60) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = world.env(world.src, QUBES_BACKUP_RPC_DIR=str(rpc), QUBES_BACKUP_TIMEOUT=timeout)
    return subprocess.run(
        [str(BIN / "qvm-backup"), "-q", "-y", "-d", VM, "-p", "/pw", "--kdf-n", "1024", "--weak-kdf-ok",
         *extra, location], env=env, capture_output=True, text=True, timeout=seconds, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def error_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert ": error: " in lines[0], r.stderr
    assert_one_line(lines[0])
    return lines[0]


@pytest.mark.parametrize("case", sorted(COMMIT_REPLIES))
def test_hostile_answer_to_commit(world: World, tmp_path: Path, case: str) -> None:
    rpc = fake_agent(tmp_path, PRELUDE + COMMIT_REPLIES[case] + "\n")
    location, _host = backup_dir(world, f"commit-{case}")
    start = time.monotonic()
    r = run_backup_cli(world, rpc, location)
    assert time.monotonic() - start < 30
    assert r.returncode == 1, (r.returncode, r.stderr)
    line = error_line(r)
    assert VM in line, line
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr, line  # the VM's text only ever neutralised
    assert "Backup written to" not in r.stdout, r.stdout


def test_done_text_is_checked_not_shown(world: World, tmp_path: Path) -> None:
    """An agent that says it stored the backup somewhere else: dom0 states its own location and name."""
    rpc = fake_agent(tmp_path, PRELUDE + "reply(frames.encode(FrameType.DONE, '', ('/evil/place/' + NAME).encode()))\n")
    location, _host = backup_dir(world, "done-elsewhere")
    r = run_backup_cli(world, rpc, location)
    assert r.returncode == 0, r.stderr
    assert "/evil" not in r.stdout, r.stdout
    assert r.stdout.startswith(f"Backup written to: {VM}:{location}/qubes-backup-"), r.stdout


# ------------------------------------------------------------------------------ a slow backup VM (item 4)

# The real qubes.Backup agent, fed through a reader that lets 4 KiB through every 1.8 s: it never stalls
# for the 2 s timeout, so only a minimum rate can end the backup.
SLOW_AGENT = """\
import sys, time
from qubes_backup_agent import backup_service

class Slow:
    def __init__(self, f):
        self.f, self.budget = f, 0
    def read(self, n=-1):
        if self.budget <= 0:
            time.sleep(1.8)
            self.budget = 4096
        n = self.budget if n is None or n < 0 else min(n, self.budget)
        data = self.f.read(n)
        self.budget -= len(data)
        return data

sys.exit(backup_service.main(Slow(sys.stdin.buffer), sys.stdout.buffer))
"""


def no_backup_named_file(host: Path) -> None:
    """Whatever the killed agent left is hidden (``.qubes-backup-…partial``), never named like a backup."""
    assert [p.name for p in host.iterdir() if p.name.startswith("qubes-backup-")] == []


def test_slow_reader_is_cut_off(world: World, tmp_path: Path) -> None:
    rpc = fake_agent(tmp_path, SLOW_AGENT)
    location, host = backup_dir(world, "slow-reader")
    start = time.monotonic()
    r = run_backup_cli(world, rpc, location, "--chunk-size", "65536", timeout="2")
    elapsed = time.monotonic() - start
    assert r.returncode == 1, r.stderr
    line = error_line(r)
    assert "too slowly" in line and VM in line, line
    # The pipe takes 1 MiB at once; then one 64 KiB chunk must go within 2 s + 64 KiB / 256 KiB/s.
    assert elapsed < 20, elapsed
    no_backup_named_file(host)


def _wait_for_partial(host: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(p.name.startswith(".qubes-backup-") for p in host.iterdir()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the slow agent never started")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_signal_stops_a_backup_to_a_slow_reader_at_once(world: World, tmp_path: Path, sig: signal.Signals) -> None:
    """Default timeout (300 s) and chunk size: the writer is blocked on the slow pipe with chunks queued;
    the signal must end qvm-backup within seconds, without draining them."""
    rpc = fake_agent(tmp_path, SLOW_AGENT)
    location, host = backup_dir(world, f"slow-{sig.name}")
    env = world.env(world.src, QUBES_BACKUP_RPC_DIR=str(rpc))
    env.pop("QUBES_BACKUP_TIMEOUT", None)
    proc = subprocess.Popen(
        [str(BIN / "qvm-backup"), "-q", "-y", "-d", VM, "-p", "/pw", "--kdf-n", "1024", "--weak-kdf-ok", location],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for_partial(host, proc)
        time.sleep(1.0)  # the pipe is full by now and chunks wait in the queue
        proc.send_signal(sig)
        start = time.monotonic()
        _out, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].endswith("interrupted"), err
    assert elapsed < 8, elapsed
    no_backup_named_file(host)

