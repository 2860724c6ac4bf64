"""Every read from a storage server, a profile and a passphrase VM is bounded in size and in total time
(issue 18 item 7): the ssh server's first line, an S3 server that ignores Range, a YAML alias bomb, a
passphrase VM or a listing that drips its answer, a profile whose passphrase_vm is the backup VM."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import Sim
from qubes_backup_agent.storage import s3
from qubes_backup_dom0.cli import listing, profile
from qubes_backup_dom0.errors import BackupError, UsageError
from qubes_backup_protocol import frames
from qubes_backup_protocol.frames import FrameType

MiB = 1 << 20


# ------------------------------------------------------------------------------------------------ ssh (agent)

def test_ssh_servers_first_line_is_bounded(tmp_path: Path) -> None:
    """A server (here an ssh client stand-in) that answers the upload's start with endless bytes and no
    newline: the agent reads a few bytes, stops it and fails in one line (it used to read the whole line:
    2.9 GiB in 5 s)."""
    fake = tmp_path / "ssh"
    fake.write_text("#!/bin/sh\nexec cat /dev/zero\n")
    fake.chmod(0o755)
    code = textwrap.dedent(f"""
        import os, resource, sys
        os.environ["QUBES_AGENT_SSH"] = {str(fake)!r}
        from pathlib import Path
        from qubes_backup_agent.storage import StorageError, ssh
        try:
            ssh.SshSink("ssh://host/srv/backups", "qubes-backup-2026-01-01T000000", Path("/"))
        except StorageError as e:
            print("refused:", e)
        print("maxrss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "refused: unexpected answer from ssh://host/srv/backups" in r.stdout, (r.stdout, r.stderr)
    rss = int(r.stdout.split("maxrss_kib")[1])
    assert rss < 200 * 1024, rss


# ------------------------------------------------------------------------------------------------- S3 (agent)

class _Body:
    def __init__(self, data: bytes, reads: list[int | None]) -> None:
        self.data, self.reads, self.pos = data, reads, 0

    def read(self, amt: int | None = None) -> bytes:
        self.reads.append(amt)
        end = len(self.data) if amt is None else min(len(self.data), self.pos + amt)
        out, self.pos = self.data[self.pos : end], end
        return out

    def close(self) -> None:
        pass


class _Client:
    """An S3 server that ignores Range (returns the whole object) or announces a range and sends more."""

    def __init__(self, size: int, mode: str) -> None:
        self.size, self.mode = size, mode
        self.reads: list[int | None] = []

    def head_object(self, **kw: Any) -> dict[str, Any]:
        return {"ContentLength": self.size, "ETag": '"x"'}

    def get_object(self, **kw: Any) -> dict[str, Any]:
        start, end = (int(x) for x in kw["Range"].removeprefix("bytes=").split("-"))
        body = _Body(bytes(self.size), self.reads)
        if self.mode == "ignore-range":
            return {"Body": body}
        return {"Body": body, "ContentRange": f"bytes {start}-{end}/{self.size}"}


@pytest.mark.parametrize("mode", ["ignore-range", "more-than-announced"])
def test_s3_server_cannot_make_the_agent_buffer_the_object(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    fake = _Client(64 * MiB, mode)
    monkeypatch.setattr(s3, "client", lambda: fake)
    reader = s3.RangeReader("s3://bucket/qubes-backup-2026-01-01T000000")
    with pytest.raises(OSError, match=r"ignored the Range header|more than the range"):
        reader.readinto(bytearray(512))
    assert all(amt is not None and amt <= 513 for amt in fake.reads), fake.reads


# ------------------------------------------------------------------------------------------------- profiles

def _profile(sim: Sim, text: str) -> Path:
    path = sim.dom0 / "etc/qubes/backup/p.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_yaml_aliases_are_refused_before_anything_is_built(sim: Sim) -> None:
    """A 600-byte alias bomb would expand to ~10^9 list items: refused at the first anchor, in bounded
    memory (measured in a child process)."""
    bomb = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
        f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n" for i in range(9)
    ) + "include: *j\ndestination_vm: backupvm\ndestination_path: /x\npassphrase_text: pw\n"
    assert len(bomb) < 1000
    _profile(sim, bomb)
    code = textwrap.dedent(f"""
                from qubes_backup_dom0.cli import profile
        from qubes_backup_dom0.errors import UsageError
        from qubes_backup_dom0.qubes.system import System
        from pathlib import Path
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        try:
            profile.load_profile(System(Path({str(sim.dir)!r}), Path({str(sim.dom0)!r}), "user"), "p")
        except UsageError as e:
            print("refused:", e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "refused: backup profile p: YAML anchors and aliases" in r.stdout, (r.stdout, r.stderr[-2000:])


def test_passphrase_vm_may_not_be_the_backup_vm(sim: Sim) -> None:
    _profile(sim, "include: [work]\ndestination_vm: backupvm\ndestination_path: /x\npassphrase_vm: backupvm\n")
    with pytest.raises(UsageError, match="passphrase_vm is the backup VM"):
        profile.load_profile(sim.system, "p")
    r = sim.run("qvm-backup", "--profile", "p")
    assert r.returncode == 2 and "passphrase_vm is the backup VM (backupvm)" in r.stderr


# ------------------------------------------------------------------------------ answers dripped slowly (dom0)

class _Drip:
    """A VM service that writes ``chunks`` one every ``every`` seconds, then exits 0."""

    confined = False

    def __init__(self, chunks: list[bytes], every: float) -> None:
        self.chunks, self.every = chunks, every

    def start(self, service: str, vm: str) -> subprocess.Popen[bytes]:
        code = ("import sys, time\n"
                f"for c in {self.chunks!r}:\n"
                "    sys.stdout.buffer.write(c); sys.stdout.buffer.flush(); time.sleep(" + repr(self.every) + ")\n")
        return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip


def test_passphrase_vm_answer_has_an_overall_deadline(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    """One byte every 0.3 s (each read makes progress within the stall timeout of 1 s) for 12 s: the answer
    as a whole is due after 2 timeouts."""
    monkeypatch.setenv("QUBES_BACKUP_TIMEOUT", "1")
    with pytest.raises(BackupError, match="did not finish answering within 2 s"):
        profile.passphrase_from_vm(sim.system, "work", "p", transport=_Drip([b"x"] * 40, 0.3))


def test_listing_has_an_overall_deadline(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries one every 0.3 s, each within its frame budget: the listing as a whole is due after
    ``list_deadline`` (here the byte allowance is set to 0, leaving 2 timeouts of 1 s)."""
    monkeypatch.setenv("QUBES_BACKUP_TIMEOUT", "1")
    monkeypatch.setattr(listing, "LIST_MAX_BYTES", 0)
    entries = [frames.encode(FrameType.ENTRY, f"qubes-backup-2026-01-01T0000{i:02d}") for i in range(30)]
    entries.append(frames.encode(FrameType.END))
    with pytest.raises(BackupError, match="did not finish answering within 2 s"):
        listing.list_backups(sim.system, "/home/user/backups", "backupvm", transport=_Drip(entries, 0.3))
