"""Tar-level attacks through the real, sandboxed qubes.Restore agent, and a sample through the CLI.

These are slower (an agent process per case), so they are a sample; the byte-level breadth is in
test_frames.py / test_hostile.py.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from qubes_backup_dom0.qubes.transport import SimTransport

from .harness import BIN, VM, World, assert_one_line, assert_unchanged, expect_refused, refuse_tar, snapshot


def _tar_bytes(world: World) -> bytes:
    return world.a_tar.read_bytes()


@pytest.mark.parametrize("k", range(12))
def test_truncated_tar(world: World, k: int) -> None:
    raw = _tar_bytes(world)
    refuse_tar(world, raw=raw[: len(raw) * k // 12 + (k % 3) * 7])


def _offsets(world: World) -> dict[str, int]:
    """Offsets of member headers in the stored tar (the attacker's view)."""
    out = {}
    with tarfile.open(world.a_tar) as tar:
        for m in tar:
            out[m.name] = m.offset
    return out


@pytest.mark.parametrize("member", ["backup-header", "manifest", "vm1/000001", "vm5/trailer.hmac"])
@pytest.mark.parametrize("field", ["name", "size", "checksum", "data-first", "data-last"])
def test_flipped_tar_bytes(world: World, member: str, field: str) -> None:
    raw = bytearray(_tar_bytes(world))
    at = _offsets(world)[member]
    size = dict(world.a)[member].__len__()
    where = {"name": at, "size": at + 124 + 5, "checksum": at + 148 + 2, "data-first": at + 512,
             "data-last": at + 512 + size - 1}[field]  # fmt: skip
    raw[where] ^= 0x04
    refuse_tar(world, raw=bytes(raw))


def _add(tar: tarfile.TarFile, info: tarfile.TarInfo, data: bytes = b"") -> None:
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data else None)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "directory", "fifo", "longname",
                                  "pax-path", "nul-name", "huge-size"])  # fmt: skip
def test_odd_tar_members(world: World, kind: str) -> None:
    """Members a tar can describe but a backup never has, placed right after the manifest."""
    buf = io.BytesIO()
    fmt = tarfile.PAX_FORMAT if kind == "pax-path" else tarfile.GNU_FORMAT
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in world.a[:4]:
            info = tarfile.TarInfo(name)
            _add(tar, info, data)
        odd_names = {"dotdot": "../../../dom0/x", "absolute": "/etc/passwd", "longname": "vm1/" + "0" * 200}
        info = tarfile.TarInfo(odd_names.get(kind, "vm1/000000"))
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "backup-header"
        elif kind == "directory":
            info.type = tarfile.DIRTYPE
        elif kind == "fifo":
            info.type = tarfile.FIFOTYPE
        elif kind == "pax-path":
            info.pax_headers = {"path": "../vm1/000000"}
        _add(tar, info, b"x" * 32 if info.type == tarfile.REGTYPE else b"")
    raw = bytearray(buf.getvalue())
    if kind == "nul-name" or kind == "huge-size":
        at = _find_header(raw, b"vm1/000000")
        if kind == "nul-name":
            raw[at + 3] = 0
        else:
            raw[at + 124 : at + 136] = b"77777777777\0"
            _fix_checksum(raw, at)
    refuse_tar(world, raw=bytes(raw))


def _find_header(raw: bytearray, name: bytes) -> int:
    at = raw.find(name + b"\0")
    assert at % 512 == 0
    return at


def _fix_checksum(raw: bytearray, at: int) -> None:
    raw[at + 148 : at + 156] = b" " * 8
    raw[at + 148 : at + 156] = b"%06o\0 " % sum(raw[at : at + 512])


def test_two_backups_concatenated(world: World) -> None:
    refuse_tar(world, raw=_tar_bytes(world)[:-1024] + world.b_tar.read_bytes())


def test_garbage_appended(world: World) -> None:
    refuse_tar(world, members=[*world.a, ("vm9/000000", b"junk"), ("vm9/000000.hmac", b"0" * 64 + b"\n")])


def test_member_dropped_in_tar(world: World) -> None:
    refuse_tar(world, members=[m for m in world.a if m[0] != "vm5/000003"])


# ------------------------------------------------------------------------------------- sandbox (item 6)

def test_agent_cannot_reach_dom0_files(world: World) -> None:
    """Locations that point at dom0's qubes.xml (via .., an absolute host path, a hook) all fail."""
    host = str(world.target.qubes_xml)
    for location in ["../../../../dom0/var/lib/qubes/qubes.xml", host, f"cat {host}",
                     "/../../../dom0/var/lib/qubes/qubes.xml"]:  # fmt: skip
        message = expect_refused(world.target, location)
        assert "qubes-backup" not in message or "header" not in message


def test_sandbox_is_active_when_bubblewrap_exists(world: World) -> None:
    t = SimTransport(world.target)
    if t.bwrap is None:
        pytest.skip("bubblewrap not installed: the simulation runs the agent unconfined")
    assert t.confined


# --------------------------------------------------------------------------------- CLI end to end sample

def _cli(world: World, location: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / "qvm-backup-restore"), "-q", "-y", "-d", VM, "-p", "/pw", location]
    return subprocess.run(cmd, env=world.env(None, **(env_extra or {})), capture_output=True, text=True, timeout=60)


def _cli_refused(world: World, location: str, env_extra: dict[str, str] | None = None) -> str:
    before = snapshot(world.target)
    start = time.monotonic()
    res = _cli(world, location, env_extra)
    assert time.monotonic() - start < 30
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qvm-backup-restore: error:"), res.stderr
    assert_one_line(lines[0])
    assert_unchanged(world.target, before)
    return lines[0]


CLI_CASES = ["flip-chunk", "truncate", "transplant", "absurd-kdf", "missing-file", "drop-archive", "swap-archives"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_refuses(world: World, case: str) -> None:
    members = list(world.a)
    other = dict(world.b)
    path = world.target.vm_root(VM) / "home/user/backups/cli.tar"
    if case == "flip-chunk":
        n, d = members[20]
        members[20] = (n, d[:-1] + bytes([d[-1] ^ 1]))
    elif case == "transplant":
        # A data chunk of the same name from backup B (same passphrase) whose bytes differ from A's.
        i = next(i for i, (n, d) in enumerate(members)
                 if re.fullmatch(r"vm[0-9]+/[0-9]{6}", n) and other.get(n, d) != d)  # fmt: skip
        members[i] = (members[i][0], other[members[i][0]])
    elif case == "absurd-kdf":
        members[0] = (members[0][0], members[0][1].replace(b"kdf-n=1024", b"kdf-n=1073741824"))
    elif case == "drop-archive":
        members = [m for m in members if not m[0].startswith("vm6/")]
    elif case == "swap-archives":
        members = [(n.replace("vm1/", "vmX/").replace("vm6/", "vm1/").replace("vmX/", "vm6/"), d) for n, d in members]
    from .harness import write_tar

    write_tar(members, path)
    if case == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    location = "/home/user/backups/nothing-here" if case == "missing-file" else "/home/user/backups/cli.tar"
    try:
        _cli_refused(world, location)
    finally:
        path.unlink()


def test_cli_stalled_agent(world: World, tmp_path: Path) -> None:
    """A qubes.Restore that never answers: the CLI ends with the timeout error (QUBES_BACKUP_TIMEOUT=2)."""
    (tmp_path / "qubes.Restore").write_text("import time\ntime.sleep(60)\n")
    line = _cli_refused(world, world.a_location, {"QUBES_BACKUP_RPC_DIR": str(tmp_path), "QUBES_BACKUP_TIMEOUT": "2"})
    assert "did not answer for 2 s" in line


def test_cli_fake_agent_unknown_frame(world: World, tmp_path: Path) -> None:
    """A fake agent speaking the frame protocol directly: an unknown frame type right away."""
    (tmp_path / "qubes.Restore").write_text(
        "import sys\nsys.stdin.buffer.read(10)\n"
        "sys.stdout.buffer.write(b'QB\\x01\\x63\\x00\\x00\\x00\\x00\\x00\\x00')\n"
    )
    line = _cli_refused(world, world.a_location, {"QUBES_BACKUP_RPC_DIR": str(tmp_path)})
    assert "unknown frame type" in line


def test_location_with_newline_is_refused(world: World) -> None:
    assert "location" in expect_refused(world.target, "x\n")


# ---------------------------------------------- a backup file in dom0: the tar reader's memory (issue 10/5)

GIB = 1 << 30


def _huge_header_file(path: Path, typeflag: bytes) -> None:
    """A 4 KiB (allocated) sparse file whose first header claims a 1 GiB pax/GNU extended header: a reader
    that takes such a header whole (Python's tarfile) allocates 1 GiB."""
    h = bytearray(512)
    h[0:13] = b"backup-header"
    h[100:108] = b"0000600\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % GIB
    h[136:148] = b"00000000000\0"
    h[156:157] = typeflag
    h[257:265] = b"ustar\x0000" if typeflag != b"L" else b"ustar  \0"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    with path.open("wb") as f:
        f.write(h)
        f.truncate(512 + GIB + 4096)  # the header's "data": a hole, no disk used


_MEASURE = """
import json, os, sys, time
from qubes_backup_dom0.qubes.transport import Channel, LocalFileTransport
from qubes_backup_protocol import frames
from qubes_backup_protocol.frames import FrameType
folder, sandbox = sys.argv[1], sys.argv[2] == "1"
start = time.monotonic()
proc = LocalFileTransport(folder, sandbox=sandbox).start("qubes.Restore", "dom0")
ch = Channel(proc, timeout=20)
ch.send(FrameType.LOCATION, "", b"/b.tar")
frame = ch.recv({FrameType.ERROR: (0, frames.MAX_ERROR_LEN), FrameType.MEMBER: (64, 1 << 20)})
ch.close_input()
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"peak_kib": usage.ru_maxrss, "rc": os.waitstatus_to_exitcode(status),
                  "seconds": time.monotonic() - start, "type": frame.type.name if frame else None,
                  "text": bytes(frame.data).decode() if frame else ""}))
"""


@pytest.mark.parametrize("sandbox", [True, False], ids=["sandbox-if-installed", "unconfined"])
@pytest.mark.parametrize("typeflag", [b"x", b"g", b"L"], ids=["pax", "pax-global", "gnu-longname"])
def test_dom0_file_huge_extended_header_bounded_memory(tmp_path: Path, sandbox: bool, typeflag: bytes) -> None:
    """The agent that reads a dom0 backup file refuses it quickly, with its peak RSS far below the 1 GiB the
    header claims.  Measured by a small fresh process that starts the agent and takes its rusage with wait4
    (which counts the agent's waited-for descendants, and the starter's few MiB before exec: not pytest's)."""
    import json
    import sys

    folder = tmp_path / "dom0dir"
    folder.mkdir()
    _huge_header_file(folder / "b.tar", typeflag)
    res = subprocess.run([sys.executable, "-c", _MEASURE, str(folder), "1" if sandbox else "0"],
                         capture_output=True, text=True, timeout=120, env=os.environ.copy())  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    peak_mib = got["peak_kib"] / 1024  # KiB on Linux
    assert peak_mib < 100, f"agent peak RSS {peak_mib:.0f} MiB"
    assert got["seconds"] < 10
    assert got["rc"] != 0
    assert got["type"] == "ERROR" and "non-regular member" in got["text"], got


def test_dom0_file_valid_backup_still_verifies(world: World) -> None:
    """The same reader still reads a real backup held in dom0 (verify-only through the API, no -d)."""
    from qubes_backup_dom0.restore.machine import Restore, RestoreOptions

    from .harness import PASSPHRASE

    path = world.target.dom0_root / "home/user/dom0-copy.tar"
    shutil.copyfile(world.a_tar, path)
    before = snapshot(world.target)
    try:
        job = Restore(world.target, "/home/user/dom0-copy.tar", PASSPHRASE, options=RestoreOptions(verify_only=True))
        try:
            job.open()
            job.plan()
            job.run()
        finally:
            job.close()
        assert_unchanged(world.target, before)
    finally:
        path.unlink()


OUTER_DEVIATIONS = ["mode-0644", "uid-1000", "mtime-1", "uname-root", "typeflag-nul", "gnu-magic", "prefix",
                    "base256-size", "nonzero-padding", "lone-zero-block", "no-end-marker",
                    "half-end-marker"]  # fmt: skip


@pytest.mark.parametrize("case", OUTER_DEVIATIONS)
def test_outer_header_deviations_refused(world: World, case: str) -> None:
    """FORMAT.md section 1: a member header differing from the canonical one in any byte, non-zero member
    padding and a missing or broken end marker are refused by the agent (checksums fixed up)."""
    raw = bytearray(_tar_bytes(world))
    at = _offsets(world)["manifest"]
    size = len(dict(world.a)["manifest"])
    field = {"mode-0644": (100, b"0000644\0"), "uid-1000": (108, b"0001750\0"), "mtime-1": (136, b"00000000001\0"),
             "uname-root": (265, b"root"), "typeflag-nul": (156, b"\0"), "gnu-magic": (257, b"ustar  \0"),
             "prefix": (345, b"x"), "base256-size": (124, b"\x80" + bytes(7) + size.to_bytes(4, "big"))}  # fmt: skip
    if case in field:
        off, value = field[case]
        raw[at + off : at + off + len(value)] = value
        _fix_checksum(raw, at)
    elif case == "nonzero-padding":
        assert size % 512
        raw[at + 512 + size + (512 - size % 512) - 1] = 1
    else:
        end = len(raw.rstrip(b"\0"))
        end += -end % 512  # the end of the last member's padding: the end marker starts here
        if case == "lone-zero-block":
            raw[end + 512 : end + 1024] = b"\1" * 512
        elif case == "no-end-marker":
            del raw[end:]
        else:
            del raw[end + 512 :]
    message = refuse_tar(world, raw=bytes(raw))
    assert "tar" in message or "member" in message or "truncated" in message, message


def test_outer_padding_after_end_marker_ignored(world: World) -> None:
    """What follows the end marker (record padding, the rest of a block device) is not read: a backup
    with 1 MiB of junk after its end marker still verifies."""
    from qubes_backup_dom0.restore.machine import RestoreOptions

    from .harness import run_restore

    path = world.target.vm_root(VM) / "home/user/backups/padded.tar"
    path.write_bytes(_tar_bytes(world) + b"\0" * 9216 + os.urandom(1 << 20))
    try:
        run_restore(world.target, "/home/user/backups/padded.tar", options=RestoreOptions(verify_only=True))
    finally:
        path.unlink()
