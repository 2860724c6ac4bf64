"""Tar-level attacks through the real, sandboxed qubes.Restore agent, and a sample through the CLI.

These are slower (an agent process per case), so they are a sample; the byte-level breadth is in
test_frames.py / test_hostile.py.
"""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from qubes_backup_dom0.transport import SimTransport

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
