"""Backups in Qubes OS' own format (issue 17 item 3): recognised through the agent, strictly bounded.

Qubes' qvm-backup writes every file as its own ``tar -cO --posix`` archive, so a real Qubes backup starts with
a pax ``x`` header (``./PaxHeaders/backup-header``) before ``backup-header``.  The samples: a real one made by
Qubes' own tool (tests/data/qubes-os-backup/README.md) and ones written here the way qubes/backup.py writes
them, with GNU tar and the scrypt tool (tests/qubes_format.py).  The agent runs as its own process through its
real service entry point (a backup VM's directory) and through LocalFileTransport (a dom0 file).
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import qubes_format
from helpers_agent import RESTORE_REPLY, make_sim, open_channel, outer_members, vm_home, write_tar
from hypothesis import given, settings
from hypothesis import strategies as st
from qubes_backup_agent import outer_tar
from qubes_backup_agent.outer_tar import BLOCK, OuterReader, TarError, member_header
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.qubes.transport import Channel, LocalFileTransport
from qubes_backup_protocol import names
from qubes_backup_protocol.frames import Frame, FrameType

DATA = Path(__file__).parent / "data" / "qubes-os-backup"
REAL_SAMPLE = DATA / "qubes-2026-12-06T022756"  # made by Qubes' own qvm-backup (R4.3), see its README
REAL_PASSPHRASE = "qubes-backup sample passphrase"
REAL_HEADER = (b"version=4\nencrypted=True\ncompressed=True\ncompression-filter=gzip\nhmac-algorithm=scrypt\n"
               b"backup-id=20261206T022756-135\n")  # fmt: skip
PASSPHRASE = "correct horse battery staple"

needs_tools = pytest.mark.skipif(
    not qubes_format.have_tools() and not os.environ.get("CI"),
    reason="the scrypt tool or GNU tar is missing (.ci/run installs scrypt; in CI these tests must run)",
)


@pytest.fixture
def system(tmp_path: Path) -> System:
    return make_sim(tmp_path)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A Qubes v4 backup of two VMs written as qubes/backup.py writes it, and its backup-header."""
    if not qubes_format.have_tools():
        pytest.fail("the scrypt tool or GNU tar is missing (.ci/run installs scrypt)")
    path = tmp_path_factory.mktemp("qubes") / "qubes-2025-03-04T050607"
    files = {"vm1/private.img": os.urandom(5000) + bytes(1 << 20) + b"end", "vm2/root.img": os.urandom(70000)}
    backup_id = qubes_format.write_qubes_backup(path, PASSPHRASE, files, chunk_size=64 << 10)
    return path, qubes_format.qubes_header(backup_id)


# -- the samples are what they claim to be -------------------------------------------------------------


def shape(layout: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A tar layout with archive numbers and chunk numbers blanked (vm7/PaxHeaders/private.img.000.enc)."""
    return [(t, n.replace("vm7/", "vmN/").replace("vm1/", "vmN/")) for t, n in layout]


@needs_tools
def test_samples_are_qubes_v4_backups(built: tuple[Path, bytes], tmp_path: Path) -> None:
    real = REAL_SAMPLE.read_bytes()
    # Qubes' restore authenticates the header as "scrypt dec of backup-header.hmac == backup-header".
    members = {n: i for i, (t, n) in enumerate(qubes_format.tar_layout(real)) if t == "0"}
    assert list(members) == ["backup-header", "backup-header.hmac", "qubes.xml.000.enc", "vm7/private.img.000.enc"]
    for path, pw, hdr in ((REAL_SAMPLE, REAL_PASSPHRASE, REAL_HEADER), (built[0], PASSPHRASE, built[1])):
        tmp = tmp_path / path.name
        tmp.mkdir()
        subprocess.run(["tar", "-xif", str(path), "-C", str(tmp)], check=True)
        assert (tmp / "backup-header").read_bytes() == hdr
        assert qubes_format.scrypt_dec(tmp / "backup-header.hmac", b"backup-header!" + pw.encode()) == hdr
    # The written sample has the real one's layout: per member a pax header, then the member.
    layout = shape(qubes_format.tar_layout(built[0].read_bytes()))
    assert layout[:8] == shape(qubes_format.tar_layout(real))
    assert [t for t, _ in layout] == ["x", "0"] * (len(layout) // 2)
    assert ("0", "vm2/root.img.001.enc") in layout  # 70000 bytes in 64 KiB chunks: two chunks
    assert len(real) == 4 * 10240  # each member its own archive, padded to GNU tar's record size


# -- the agent passes the header on, and nothing else --------------------------------------------------


def _vm_channel(system: System, path: Path) -> Channel:
    dest = vm_home(system) / "backups" / path.name
    shutil.copyfile(path, dest)
    ch = open_channel(system, "qubes.Restore")
    ch.send(FrameType.LOCATION, "", f"/home/user/backups/{path.name}".encode())
    return ch


def _dom0_channel(system: System, path: Path) -> Channel:
    # What dom0 does for a backup file in dom0 (receive.Receiver.connect): the agent reads it, confined.
    shutil.copyfile(path, system.dom0_root / path.name)
    ch = Channel(LocalFileTransport(system.dom0_root).start("qubes.Restore", "dom0"), timeout=30, vm="dom0")
    ch.send(FrameType.LOCATION, "", shlex.quote("/" + path.name).encode())
    return ch


def _frames(ch: Channel) -> list[Frame]:
    seen: list[Frame] = []
    while True:
        frame = ch.recv(RESTORE_REPLY, names.is_member_name)
        if frame is None:
            return seen
        seen.append(frame)
        if frame.type != FrameType.MEMBER:
            return seen


@pytest.mark.parametrize("where", ["backup VM", "dom0 file"])
@pytest.mark.parametrize("sample", ["real", "written"])
def test_agent_passes_on_qubes_header_only(system: System, built: tuple[Path, bytes], where: str,
                                          sample: str) -> None:  # fmt: skip
    if sample == "written" and not qubes_format.have_tools() and not os.environ.get("CI"):
        pytest.skip("the scrypt tool is missing")
    path, hdr = (REAL_SAMPLE, REAL_HEADER) if sample == "real" else built
    with (_vm_channel if where == "backup VM" else _dom0_channel)(system, path) as ch:
        seen = _frames(ch)
        assert ch.wait(10) != 0
        assert "Traceback" not in ch.stderr_tail()
    # The header member, byte for byte, is what dom0's header parser gets; nothing of the rest is read.
    assert [(f.type, f.name) for f in seen] == [(FrameType.MEMBER, "backup-header"), (FrameType.ERROR, "")]
    assert bytes(seen[0].data) == hdr
    error = bytes(seen[1].data).decode()
    assert "not a qubes-backup tar" in error and "Qubes OS' own qvm-backup" in error and "\n" not in error


# -- the reader's exception, exactly (in-process) ------------------------------------------------------


def block(name: bytes, typeflag: bytes, size: int, *, mode: bytes = b"0000644", prefix: bytes = b"",
          magic: bytes = b"ustar\x0000", uname: bytes = b"root") -> bytes:  # fmt: skip
    """One tar header block as GNU tar writes it (mtime now, uname root), checksum computed."""
    h = bytearray(BLOCK)
    h[0 : len(name)] = name
    h[100:108] = mode + b"\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"15305143536\0"
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[257:265] = magic
    h[265 : 265 + len(uname)] = uname
    h[297 : 297 + len(uname)] = uname
    h[345 : 345 + len(prefix)] = prefix
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def record(key: bytes, value: bytes) -> bytes:
    """One pax record: "LEN key=value\\n", LEN counting itself."""
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(b"%d" % n) + len(body) != n:
        n += 1
    return b"%d" % n + body


TIMES = record(b"mtime", b"1796524076.034623367") + record(b"atime", b"1796524078.7") + record(b"ctime", b"17965")
HEADER = REAL_HEADER
END = bytes(2 * BLOCK)


def qubes_tar(pax_data: bytes = TIMES, pax_name: bytes = b"./PaxHeaders/backup-header",
              name: bytes = b"backup-header", data: bytes = HEADER, pax_size: int | None = None,
              prefix: bytes = b"", rest: bytes = END) -> bytes:  # fmt: skip
    size = len(pax_data) if pax_size is None else pax_size
    return (block(pax_name, b"x", size, prefix=b"") + padded(pax_data) + block(name, b"0", len(data), prefix=prefix)
            + padded(data) + rest)  # fmt: skip


def read_first(raw: bytes) -> tuple[str, bytes]:
    tar = OuterReader(io.BytesIO(raw), seekable=True)
    member = tar.next()
    assert member is not None
    data = b""
    while piece := tar.read(1 << 16):
        data += piece
    return member.name, data


def test_record_helper() -> None:
    for key, value in ((b"mtime", b"1"), (b"atime", b"1796524078.715537272"), (b"ctime", b"9" * 90)):
        r = record(key, value)
        assert int(r.split(b" ", 1)[0]) == len(r)


@pytest.mark.parametrize("pax_name", [b"./PaxHeaders/backup-header", b"./PaxHeaders.4711/backup-header"])
def test_reader_accepts_gnu_tar_posix_header(pax_name: bytes) -> None:
    assert read_first(qubes_tar(pax_name=pax_name)) == ("backup-header", HEADER)
    assert read_first(REAL_SAMPLE.read_bytes()) == ("backup-header", REAL_HEADER)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pax_data": TIMES + record(b"path", b"manifest")}, "malformed pax header"),  # would rename the member
        ({"pax_data": record(b"size", b"99999")}, "malformed pax header"),  # would resize it
        ({"pax_data": TIMES + record(b"mtime", b"1")}, "malformed pax header"),  # a key twice
        ({"pax_data": record(b"mtime", b"1;rm")}, "malformed pax header"),
        ({"pax_data": b"99 mtime=1\n"}, "malformed pax header"),  # length does not match
        ({"pax_data": b"011 mtime=1\n"}, "malformed pax header"),
        ({"pax_data": TIMES + b"\n"}, "malformed pax header"),  # trailing bytes
        ({"pax_data": TIMES, "pax_size": len(TIMES) - 1}, "malformed pax header"),
        ({"pax_data": record(b"comment", b"x" * 600)}, "non-regular member"),  # > 512 bytes: not even read
        ({"pax_name": b"./PaxHeaders/manifest"}, "non-regular member"),
        ({"pax_name": b"PaxHeader/backup-header"}, "non-regular member"),
        ({"name": b"manifest"}, "followed by another member"),
        ({"data": b"version=4\n" * 500}, "after its pax header"),  # header member above 4096 bytes
        ({"prefix": b"evil"}, "after its pax header"),  # the name would be evil/backup-header
    ],
)
def test_reader_refuses_anything_else(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(TarError, match=message):
        read_first(qubes_tar(**kwargs))  # type: ignore[arg-type]


def test_reader_refuses_pax_padding_and_huge_pax() -> None:
    raw = bytearray(qubes_tar())
    raw[BLOCK + len(TIMES) + 3] = 1  # in the pax data block's padding
    with pytest.raises(TarError, match="malformed pax header"):
        read_first(bytes(raw))
    # A pax header claiming 1 GiB is refused from its 512-byte header: nothing is read or allocated.
    huge = block(b"./PaxHeaders/backup-header", b"x", 1 << 30)
    with pytest.raises(TarError, match="non-regular member"):
        read_first(huge + bytes(4 * BLOCK))


def test_pax_header_only_first() -> None:
    ours = member_header(names.HEADER, 5) + padded(b"abcde")
    with pytest.raises(TarError, match="non-regular member"):
        tar = OuterReader(io.BytesIO(ours + qubes_tar()), seekable=True)
        assert tar.next() is not None
        tar.next()


def test_nothing_after_a_foreign_first_member() -> None:
    """Our own members behind a foreign first header (a pax one, or a plain tar's) are never passed on."""
    ours = io.BytesIO()
    for name, data in outer_members({"vm1": 1}):
        ours.write(member_header(name, len(data)) + padded(data))
    ours.write(END)
    canonical = ours.getvalue()
    pax_first = block(b"./PaxHeaders/backup-header", b"x", len(TIMES)) + padded(TIMES) + canonical
    plain_first = bytearray(canonical)
    plain_first[0:BLOCK] = block(b"backup-header", b"0", len(outer_members({})[0][1]), mode=b"0000644")
    for raw in (pax_first, bytes(plain_first)):
        tar = OuterReader(io.BytesIO(raw), seekable=True)
        first = tar.next()
        assert first is not None and first.name == names.HEADER
        with pytest.raises(TarError, match="another tool"):
            tar.next()
    # Our own format is read through as before.
    tar = OuterReader(io.BytesIO(canonical), seekable=True)
    seen = []
    while (m := tar.next()) is not None:
        seen.append(m.name)
    assert seen == [n for n, _ in outer_members({"vm1": 1})]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 4 * BLOCK - 1), st.integers(0, 255))
def test_any_byte_changed_passes_at_most_a_bounded_header(offset: int, value: int) -> None:
    """Whatever byte of the first 2 KiB of the real sample is changed: either the reader refuses, or what it
    passes on is one member named backup-header of at most 4096 bytes, and nothing after it."""
    raw = bytearray(REAL_SAMPLE.read_bytes())
    raw[offset] = value
    tar = OuterReader(io.BytesIO(bytes(raw)), seekable=True)
    try:
        member = tar.next()
        if member is None:
            return
        assert member.name == names.HEADER and member.size <= outer_tar.FOREIGN_HEADER_MAX
        while tar.read(1 << 16):
            pass
        tar.next()
    except TarError:
        return
    pytest.fail("the reader went on after a foreign first member")


def test_write_tar_helper_is_canonical(tmp_path: Path) -> None:
    """The agent suites' own-format tars (helpers_agent.write_tar) are canonical: they never take the
    foreign path, so the strictness tests above are not weakened by it."""
    write_tar(tmp_path / "b.tar", outer_members({"vm1": 1}))
    raw = (tmp_path / "b.tar").read_bytes()
    assert raw[:BLOCK] == member_header(names.HEADER, len(outer_members({})[0][1]))
