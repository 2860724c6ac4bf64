"""Issue 10, round 2 (backup side, CLI and API): the backup names itself (id, created), the file name and
the authenticated creation time agree, no internal error from the environment or the user, the KDF
acknowledgement, and a per-frame deadline that starts when dom0 starts waiting."""

from __future__ import annotations

import fcntl
import os
import re
import select
import subprocess
import sys
import tarfile
import termios
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import BIN, KDF, PASSPHRASE, VM_BACKUPS, Sim, one_error_line
from qubes_backup_dom0 import api
from qubes_backup_dom0.cli import restore as cli_restore
from qubes_backup_dom0.errors import BackupError, UsageError
from qubes_backup_dom0.format import crypto, header, naming
from qubes_backup_dom0.qubes.transport import Channel, stall_timeout
from qubes_backup_protocol import frames

RESULT_RE = re.compile(
    r"Backup written to: (?P<where>.+) \(backup id (?P<id>[0-9a-f]{32}), "
    r"created (?P<created>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ), (?P<size>\d+) bytes\)"
)


def header_of(path: Path) -> header.Header:
    with tarfile.open(path) as tar:
        f = tar.extractfile("backup-header")
        assert f is not None
        return header.parse(f.read())


# ------------------------------------------------------------------------------------- item 1: naming

@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "normal"])
def test_result_line_names_the_backup_in_every_mode(sim: Sim, quiet: bool) -> None:
    r = sim.backup(*(["-q"] if quiet else []), "-d", "backupvm", VM_BACKUPS, "work")
    assert r.returncode == 0, r.stderr
    m = RESULT_RE.fullmatch(r.stdout.strip())
    assert m, r.stdout
    (path,) = sim.vm_backups.glob("qubes-backup-*")
    hdr = header_of(path)
    assert m["id"] == hdr.backup_id.hex() and m["created"] == hdr.created
    assert m["where"] == f"backupvm:{VM_BACKUPS}/{path.name}"
    assert int(m["size"]) == path.stat().st_size
    # The file is named after the very instant its authenticated header records.
    assert path.name == naming.file_name(hdr.created_datetime)
    assert naming.name_time_mismatch(f"{VM_BACKUPS}/{path.name}", hdr.created) is None


def test_api_result_carries_id_created_and_size(sim: Sim) -> None:
    (sim.dom0 / "backups").mkdir()
    from qubes_backup_dom0.backup.plan import BackupOptions

    result = api.run_backup(sim.system, "/backups", PASSPHRASE.encode(), vms=["work"],
                            options=BackupOptions(kdf_n=1024))  # fmt: skip
    (path,) = (sim.dom0 / "backups").glob("qubes-backup-*")
    hdr = header_of(path)
    assert result.backup_id == hdr.backup_id.hex()
    assert result.created == hdr.created
    assert result.size == path.stat().st_size
    assert result.location == f"/backups/{path.name}"
    assert path.name == naming.file_name(hdr.created_datetime)


@pytest.mark.parametrize(
    ("location", "created", "warns"),
    [
        ("/home/user/backups/qubes-backup-2026-11-27T090102", "2026-11-27T09:01:02Z", False),
        ("/home/user/backups/qubes-backup-2026-11-27T090102", "2026-11-27T09:01:03Z", False),  # within slack
        ("/home/user/backups/qubes-backup-2026-11-27T090102", "2026-11-20T09:01:02Z", True),  # rollback
        ("/home/user/backups/qubes-backup-2026-11-27T090102", "2026-11-27T10:01:02Z", True),
        ("s3://bucket/prefix/qubes-backup-2026-11-27T090102", "2025-01-01T00:00:00Z", True),
        ("/x/old-qubes-backup-2026-11-27T090102.tar", "2025-01-01T00:00:00Z", True),
        ("/home/user/backups/qubes-backup-2026-11-27T090102/", "2025-01-01T00:00:00Z", True),
        ("/home/user/backups/backup of today", "2025-01-01T00:00:00Z", False),  # no time in the name
        ("ssh host cat /b/qubes-backup-x", "2025-01-01T00:00:00Z", False),
        ("/b/qubes-backup-2026-13-45T256199", "2025-01-01T00:00:00Z", False),  # not a time
        ("/b/qubes-backup-2026-11-27T0901021", "2025-01-01T00:00:00Z", False),  # 7 digits: not our name
        ("/qubes-backup-2026-11-27T090102/other", "2025-01-01T00:00:00Z", False),  # only the last component
    ],
)
def test_name_time_mismatch(location: str, created: str, warns: bool) -> None:
    text = naming.name_time_mismatch(location, created)
    if not warns:
        assert text is None
        return
    assert text is not None and "\n" not in text and len(text) < 200
    assert "2026-11-27 09:01:02 UTC" in text


def test_backup_file_name_is_utc() -> None:
    when = datetime(2026, 11, 27, 9, 1, 2, tzinfo=UTC)
    assert naming.file_name(when) == "qubes-backup-2026-11-27T090102"
    assert header.format_created(when) == "2026-11-27T09:01:02Z"


def test_restore_accepts_a_backup_id_pin() -> None:
    """Option and field only (the restore enforces the pin)."""
    args = cli_restore.parser().parse_args(["--backup-id", "AB" * 16, "/loc"])
    assert args.backup_id == "ab" * 16
    assert cli_restore.RestoreOptions(backup_id="ab" * 16).backup_id == "ab" * 16
    assert cli_restore.RestoreOptions().backup_id is None


@pytest.mark.parametrize("bad", ["xyz", "ab" * 15, "ab" * 17, "g" * 32])
def test_restore_refuses_a_malformed_backup_id(sim: Sim, bad: str) -> None:
    r = sim.restore("--backup-id", bad, "-d", "backupvm", f"{VM_BACKUPS}/x")
    assert r.returncode == 2 and "backup id" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------------------------- item 6: no internal error

def run_bytes(sim: Sim, *args: bytes | str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [os.fsencode(a) if isinstance(a, str) else a for a in args]
    return subprocess.run(
        [os.fsencode(BIN / argv[0].decode()), *argv[1:]], env=env or sim.env(), capture_output=True, text=True,
        timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [
        ("qvm-backup", "-y", "-p", "/pw", *KDF, "-d", "backupvm", b"/home/user/\xff"),
        ("qvm-backup", "-y", "-p", "/pw", *KDF, b"/\xffdir"),
        ("qvm-backup", "-y", "-p", "/pw", *KDF, "-d", b"vm\xff", "/home/user"),
        ("qvm-backup-restore", "-y", "-p", "/pw", "-d", "backupvm", b"/home/user/backups/\xff"),
        ("qvm-backup-restore", "-y", "-p", "/pw", b"/\xffbackup"),
    ],
    ids=["backup-vm", "backup-dom0", "backup-vm-name", "restore-vm", "restore-dom0"],
)
def test_non_utf8_argument_is_a_usage_error(sim: Sim, args: tuple[bytes | str, ...]) -> None:
    (sim.dom0 / os.fsdecode(b"\xffdir")).mkdir()
    r = run_bytes(sim, *args)
    assert r.returncode == 2, r.stderr
    assert "UTF-8" in one_error_line(r.stderr)
    assert "internal error" not in r.stderr
    assert list(sim.vm_backups.iterdir()) == []


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "-1", "0", "abc", "1e400", "100000"])
@pytest.mark.parametrize("tool", ["qvm-backup", "qvm-backup-restore"])
def test_bad_timeout_is_a_usage_error(sim: Sim, tool: str, value: str) -> None:
    env = {**sim.env(), "QUBES_BACKUP_TIMEOUT": value}
    args = (*KDF, VM_BACKUPS) if tool == "qvm-backup" else (f"{VM_BACKUPS}/x",)
    r = run_bytes(sim, tool, "-y", "-p", "/pw", "-d", "backupvm", *args, env=env)
    assert r.returncode == 2, r.stderr
    assert "QUBES_BACKUP_TIMEOUT" in one_error_line(r.stderr)
    assert "internal error" not in r.stderr


def test_timeout_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for good, value in (("2.5", 2.5), ("86400", 86400.0), ("", 300.0)):
        monkeypatch.setenv("QUBES_BACKUP_TIMEOUT", good)
        assert stall_timeout() == value
    monkeypatch.setenv("QUBES_BACKUP_TIMEOUT", "inf")
    with pytest.raises(UsageError):
        stall_timeout()


def _on_a_terminal(sim: Sim, *args: str, keys: bytes) -> subprocess.CompletedProcess[str]:
    """Run with a pseudo-terminal as controlling terminal and stdin (prompts, getpass), typing ``keys``."""
    master, slave = os.openpty()

    def child() -> None:
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=sim.env(), stdin=slave, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=child)  # fmt: skip
    os.close(slave)
    try:
        # Type only once a prompt is shown: getpass flushes what was typed before it (TCSAFLUSH).  The
        # passphrase prompt goes to the terminal, the confirmation question to stderr.
        assert proc.stderr is not None
        seen, err_head = b"", b""
        deadline = time.monotonic() + 60
        while b"passphrase" not in seen and b"[y/N]" not in err_head and time.monotonic() < deadline:
            for fd in select.select([master, proc.stderr], [], [], 0.1)[0]:
                if fd == master:
                    seen += os.read(master, 65536)
                else:
                    err_head += os.read(proc.stderr.fileno(), 65536)
        time.sleep(0.2)
        os.write(master, keys)
        out, err = proc.communicate(timeout=60)
        err = err_head.decode() + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("quiet", [(), ("-q",)], ids=["normal", "quiet"])
def test_ctrl_d_at_the_confirmation_prompt(sim: Sim, quiet: tuple[str, ...]) -> None:
    r = _on_a_terminal(sim, "qvm-backup", *quiet, "-p", "/pw", *KDF, "-d", "backupvm", VM_BACKUPS, keys=b"\x04")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    assert "cancelled" in r.stderr.splitlines()[-1], r.stderr
    assert list(sim.vm_backups.iterdir()) == []


def test_ctrl_d_at_the_passphrase_prompt(sim: Sim) -> None:
    r = _on_a_terminal(sim, "qvm-backup", "-q", "-y", *KDF, "-d", "backupvm", VM_BACKUPS, keys=b"\x04")
    assert r.returncode == 1, r.stderr
    assert "aborted" in one_error_line(r.stderr)
    assert "internal error" not in r.stderr


def test_scrypt_memory_error_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(*_: object) -> bytes:
        raise MemoryError("Not enough memory to derive key")

    monkeypatch.setattr(crypto.Scrypt, "derive", no_memory)
    with pytest.raises(BackupError, match=r"not enough memory.*256 MiB"):
        crypto.derive_master(b"pw", crypto.KdfParams(bytes(16), 1 << 18, 8, 1))


_SHORT_OF_MEMORY = """\
import re, resource, sys
from qubes_backup_dom0.cli import {module} as cli
size = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) << 10
limit = size + (160 << 20)  # room for the program, not for 256 MiB of scrypt
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.argv[0] = "{tool}"
sys.exit(cli.main(sys.argv[1:]))
"""


def test_maximum_kdf_on_a_dom0_short_of_memory(sim: Sim) -> None:
    """The largest cost the ceilings allow (N=2^18, r=8: 256 MiB), in a dom0 with less free: one line."""
    (sim.dom0 / "backups").mkdir()
    r = sim.run("qvm-backup", "-q", "-y", "-p", "/pw", "--kdf-n", str(1 << 18), "/backups", "work")
    assert r.returncode == 0, r.stderr
    (path,) = (sim.dom0 / "backups").glob("qubes-backup-*")
    for module, tool, args in (
        ("backup", "qvm-backup", ["-q", "-y", "-p", "/pw", "--kdf-n", str(1 << 18), "/backups", "work"]),
        ("restore", "qvm-backup-restore", ["-q", "-y", "-p", "/pw", "--verify-only", f"/backups/{path.name}"]),
    ):
        code = _SHORT_OF_MEMORY.format(module=module, tool=tool)
        r = subprocess.run([sys.executable, "-c", code, *args], env=sim.env(), capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
        assert r.returncode == 1, r.stderr
        assert "not enough memory" in one_error_line(r.stderr), r.stderr
    assert len(list((sim.dom0 / "backups").glob("qubes-backup-*"))) == 1


# --------------------------------------------------------------------------- item 7: the KDF acknowledgement

@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--kdf-n", "1024"), ("--weak-kdf-ok",)),
        (("--kdf-n", "65536"), ("--weak-kdf-ok",)),
        (("--kdf-n", "3000", "--weak-kdf-ok"), ("power of two",)),
        (("--kdf-n", "512", "--weak-kdf-ok"), ("power of two",)),
        (("--kdf-n", str(1 << 19)), ("262144",)),  # above the 256 MiB ceiling
        (("--kdf-n", str(1 << 21)), ("262144",)),
    ],
    ids=["1024", "65536", "not-power", "below-min", "above-memory-ceiling", "above-n-max"],
)
def test_kdf_n_checked_and_weak_needs_acknowledgement(sim: Sim, args: tuple[str, ...], words: tuple[str, ...]) -> None:
    r = sim.run("qvm-backup", "-y", "-p", "/pw", *args, "-d", "backupvm", VM_BACKUPS)
    assert r.returncode == 2, r.stderr
    line = one_error_line(r.stderr)
    for word in words:
        assert word in line, line
    assert list(sim.vm_backups.iterdir()) == []


def test_header_ceilings() -> None:
    assert header.KDF_MEMORY_MAX == 256 << 20 and header.KDF_WORK_MAX == 1 << 22
    header.check_kdf(1 << 18, 8, 2)  # the largest memory, twice over: allowed
    header.check_kdf(header.DEFAULT_KDF_N, header.DEFAULT_KDF_R, header.DEFAULT_KDF_P)
    for n, r, p in ((1 << 19, 8, 1), (1 << 18, 8, 3), (1 << 18, 16, 1), (1 << 17, 8, 5)):
        with pytest.raises(BackupError):
            header.check_kdf(n, r, p)


# ------------------------------------------------------------------- item 7: the per-frame deadline as stated

def test_frame_deadline_starts_when_dom0_starts_waiting() -> None:
    """An agent that waits just under the timeout before a frame's first byte, then sends a byte every
    0.5 s: the whole frame is due one timeout (plus its size at MIN_RATE) after recv() began, not after its
    first byte (which allowed two timeouts per frame, four per chunk: docs/SECURITY.md section 5)."""
    drip = (
        "import sys, time\n"
        "from qubes_backup_protocol import frames\n"
        "data = frames.encode(frames.FrameType.MEMBER, 'backup-header', b'x' * 100)\n"
        "time.sleep(2.0)\n"
        "for b in data:\n"
        "    sys.stdout.buffer.write(bytes([b])); sys.stdout.buffer.flush(); time.sleep(0.5)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", drip], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    channel = Channel(proc, timeout=3.0)
    start = time.monotonic()
    try:
        with pytest.raises(BackupError, match="too slowly"):
            channel.recv({frames.FrameType.MEMBER: (64, 4096)})
    finally:
        channel.close()
    assert time.monotonic() - start < 4.5  # 3 s + 4170 bytes at 256 KiB/s; it was 2 s + 3 s + ...


# --------------------------------------------------------------- item 4: the API's cancel against a slow VM

def test_api_cancel_stops_a_backup_to_a_slow_reader(sim: Sim, tmp_path: Path) -> None:
    """``cancel`` set while the writer thread is blocked on a backup VM that reads 4 KiB every 1.8 s (the
    tamper suite's slow agent): run_backup raises Cancelled within seconds, nothing named like a backup."""
    import threading

    from qubes_backup_dom0.backup.plan import BackupOptions
    from qubes_backup_dom0.errors import Cancelled
    from qubes_backup_dom0.qubes.transport import SimTransport
    from tamper.test_round2 import SLOW_AGENT

    rpc = tmp_path / "rpc"
    rpc.mkdir()
    (rpc / "qubes.Backup").write_text(SLOW_AGENT)
    cancel = threading.Event()
    outcome: list[BaseException | api.BackupResult] = []

    def run() -> None:
        try:
            outcome.append(api.run_backup(sim.system, VM_BACKUPS, PASSPHRASE.encode(), dest_vm="backupvm",
                                          options=BackupOptions(kdf_n=1024), cancel=cancel,
                                          transport=SimTransport(sim.system, rpc=rpc)))  # fmt: skip
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not any(p.name.startswith(".qubes-backup-") for p in sim.vm_backups.iterdir()):
        assert time.monotonic() < deadline and thread.is_alive(), outcome
        time.sleep(0.05)
    time.sleep(1.0)
    cancel.set()
    start = time.monotonic()
    thread.join(30)
    assert not thread.is_alive()
    assert time.monotonic() - start < 8
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled), outcome
    assert [p.name for p in sim.vm_backups.iterdir() if p.name.startswith("qubes-backup-")] == []
