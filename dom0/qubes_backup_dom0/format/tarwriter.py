"""Inner archives: one VM's files as a POSIX (pax) tar stream, sparse files in GNU sparse format 1.0.

Why our own tar code: Python's ``tarfile`` cannot write GNU sparse 1.0 entries (holes would be stored as
zeros, turning a 2 GiB mostly-empty ``private.img`` into 2 GiB of data), and on restore we want a reader
that accepts exactly what we write and nothing else (FORMAT.md sections 7-8), bounded in memory.

What the writer emits (deterministic: the same files give the same bytes):

- Every entry is a pax ``x`` header followed by one ustar header.  The pax header always carries ``path``;
  also ``size`` when the stored size is >= 8 GiB (ustar field then 0), ``mtime`` when the mtime does not
  fit the ustar field (negative or >= 8**11; ustar field then 0), ``linkpath`` when a symlink target is
  longer than 100 bytes.  The pax header's own ustar name is ``DIR/PaxHeaders.0/BASENAME`` (truncated to
  100 bytes; informational only).
- ustar fields: mode = st_mode & 0o7777, uid = gid = 0, uname = gname = "", mtime = int(st_mtime),
  name = the path (first 100 bytes; the pax ``path`` is authoritative), magic "ustar\\0" version "00".
- Regular file without holes (including empty files): type ``0``, data = the file's bytes.
- Regular file with at least one hole (``data < size``): pax keys ``GNU.sparse.major=1``,
  ``GNU.sparse.minor=0``, ``GNU.sparse.name=PATH``, ``GNU.sparse.realsize=SIZE``; ``path`` is
  ``DIR/GNUSparseFile.0/BASENAME`` (what GNU tar writes, with a fixed 0 instead of its PID).  Entry data: the
  sparse map (count, then offset/length pairs, decimal, one per line, NUL-padded to 512), then the regions'
  bytes.  If the file ends in a hole a zero-length region at offset SIZE is appended (GNU tar needs it to
  extend the file).
- Directory: type ``5``, size 0.  Symlink: type ``2``, size 0, target in linkname/linkpath.
- The stream ends with two zero blocks (no padding to a 10 KiB record).

``InnerFile.size``/``data`` for dirs and symlinks are 0.
"""


from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.format.sparse import allocated_or_scanned, scan, scan_fd, scan_zeros
from qubes_backup_dom0.format.tarspec import (
    BLOCK,
    DEFAULT_READ_SIZE,
    MAX_LINK,
    OCTAL11_LIMIT,
    PAX_DIR,
    TYPEFLAGS,
    ZEROS,
    is_sparse,
    pad,
    path_problem,
    sparse_name,
    split,
)

# --------------------------------------------------------------------------------------------- entries


@dataclass
class InnerFile:
    """One entry of an inner archive.  Build it with :meth:`from_path`; the defaults exist so that restore
    code can describe *expected* entries (path, type, size, data) without a source."""

    path: str
    source: Path | None = None
    type: str = "file"
    size: int = 0
    data: int = 0
    regions: list[tuple[int, int]] = field(default_factory=list)
    mode: int = 0o644
    mtime: int = 0
    link: str | None = None
    content: bytes | None = None  # in-memory source (a generated firewall.xml, notes.txt)
    fd: int | None = None  # an open source (a volume's committed state), attached right before it is read
    label: str = ""  # what to name in errors when there is no source path

    @classmethod
    def from_bytes(cls, path_in_archive: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> InnerFile:
        """A regular file with the given content (no holes)."""
        err = path_problem(path_in_archive)
        if err:
            raise BackupError(f"cannot archive {path_in_archive!r}: {err}")
        regions = [(0, len(data))] if data else []
        return cls(path_in_archive, None, "file", len(data), len(data), regions, mode, mtime, content=bytes(data))

    @classmethod
    def from_fd(cls, path_in_archive: str, fd: int, size: int, label: str, mtime: int = 0,
                provisioned: list[tuple[int, int]] | None = None, zeros: bool = True) -> InnerFile:  # fmt: skip
        """A volume read through ``fd`` (apparent ``size``; only its ``provisioned`` ranges when known), scanned
        for holes and all-zero runs.  The returned entry has no source: the backup attaches an fd of the same
        immutable state (``fd``) before writing.

        ``zeros=False`` (a repository backup, which drops all-zero blocks as it reads them): no zero scan, the
        regions are the allocation map (provisioned ranges, SEEK_DATA: ``sparse.allocated_or_scanned``), read
        by nobody before the backup reads them; only a block device without a map is still scanned.  ``data``
        is then the allocated bytes, not the non-zero ones: a tar header (today's format) needs exact regions."""
        err = path_problem(path_in_archive)
        if err:
            raise BackupError(f"cannot back up {label}: archive path {path_in_archive!r}: {err}")
        if zeros:
            regions = scan_zeros(fd, size, label, provisioned)
        else:
            regions = allocated_or_scanned(fd, size, label, provisioned)
        data = sum(n for _, n in regions)
        return cls(path_in_archive, None, "file", size, data, regions, 0o600, mtime, label=label)

    @classmethod
    def from_path(cls, path_in_archive: str, source: Path) -> InnerFile:
        """lstat ``source`` (symlinks are stored, not followed) and, for regular files, scan its holes."""
        err = path_problem(path_in_archive)
        if err:
            raise BackupError(f"cannot back up {source}: archive path {path_in_archive!r}: {err}")
        st = os.lstat(source)
        mode = stat.S_IMODE(st.st_mode)
        mtime = int(st.st_mtime)
        if stat.S_ISREG(st.st_mode):
            size, regions = scan(source)
            data = sum(n for _, n in regions)
            return cls(path_in_archive, Path(source), "file", size, data, regions, mode, mtime)
        if stat.S_ISDIR(st.st_mode):
            return cls(path_in_archive, Path(source), "dir", 0, 0, [], mode, mtime)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(source)
            return cls(path_in_archive, Path(source), "symlink", 0, 0, [], mode, mtime, target)
        raise BackupError(f"cannot back up {source}: not a regular file, directory or symlink")



# --------------------------------------------------------------------------------------------- writer


def _pax_record(key: str, value: bytes) -> bytes:
    """One pax record "LEN KEY=VALUE\\n", where LEN counts the whole record including its own digits."""
    body = b" " + key.encode("ascii") + b"=" + value + b"\n"
    n = len(body)
    while True:
        total = len(str(n)) + len(body)
        if total == n:
            return str(n).encode("ascii") + body
        n = total


def _ustar(name: bytes, mode: int, size: int, mtime: int, typeflag: bytes, linkname: bytes = b"") -> bytes:
    h = bytearray(BLOCK)
    name = name[:100]
    h[0 : len(name)] = name
    h[100:108] = b"%07o\0" % (mode & 0o7777)
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % mtime
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[157 : 157 + len(linkname)] = linkname
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _sparse_map(size: int, regions: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, int]], bytes]:
    """The region list as stored (with the trailing-hole marker) and the NUL-padded map text."""
    stored = list(regions)
    if not stored or stored[-1][0] + stored[-1][1] < size:
        stored.append((size, 0))
    text = b"%d\n" % len(stored) + b"".join(b"%d\n%d\n" % r for r in stored)
    return stored, text + bytes(pad(len(text)))


def _plan(f: InnerFile) -> tuple[bytes, int]:
    """Everything before the entry's region data (pax header, ustar header, sparse map) and the number of
    region bytes that follow.  Used by both ``write_archive`` and ``archive_size`` so they cannot disagree."""
    err = path_problem(f.path)
    if err:
        raise BackupError(f"cannot archive {f.source or f.path}: {err}")
    if f.type not in TYPEFLAGS:
        raise BackupError(f"cannot archive {f.path}: unknown entry type {f.type!r}")
    records: list[bytes] = []
    sparse = is_sparse(f)
    mapbytes = b""
    if f.type == "file":
        if sum(n for _, n in f.regions) != f.data:
            raise BackupError(f"internal error: regions of {f.path} do not add up to its data size")
        name = sparse_name(f.path) if sparse else f.path
        if sparse:
            _, mapbytes = _sparse_map(f.size, f.regions)
        stored = len(mapbytes) + f.data
    else:
        name = f.path
        stored = 0
    records.append(_pax_record("path", name.encode("utf-8")))
    ustar_size = stored
    if stored >= OCTAL11_LIMIT:
        records.append(_pax_record("size", b"%d" % stored))
        ustar_size = 0
    ustar_mtime = f.mtime
    if not 0 <= f.mtime < OCTAL11_LIMIT:
        records.append(_pax_record("mtime", b"%d" % f.mtime))
        ustar_mtime = 0
    linkname = b""
    if f.type == "symlink":
        target = (f.link or "").encode("utf-8")
        if not target or b"\0" in target or len(target) > MAX_LINK:
            raise BackupError(f"cannot archive symlink {f.path}: unsupported target")
        if len(target) <= 100:
            linkname = target
        else:
            records.append(_pax_record("linkpath", target))
    if sparse:
        records += [
            _pax_record("GNU.sparse.major", b"1"),
            _pax_record("GNU.sparse.minor", b"0"),
            _pax_record("GNU.sparse.name", f.path.encode("utf-8")),
            _pax_record("GNU.sparse.realsize", b"%d" % f.size),
        ]
    pax = b"".join(records)
    d, b = split(f.path)
    paxname = f"{d}{PAX_DIR}/{b}".encode()
    head = (
        _ustar(paxname, 0o644, len(pax), ustar_mtime, b"x")
        + pax
        + bytes(pad(len(pax)))
        + _ustar(name.encode("utf-8"), f.mode, ustar_size, ustar_mtime, TYPEFLAGS[f.type], linkname)
        + mapbytes
    )
    return head, f.data if f.type == "file" else 0


def archive_size(files: Iterable[InnerFile]) -> int:
    """Exact length of ``write_archive(files)`` (for progress bars and uncompressed chunk counts)."""
    total = 2 * BLOCK
    for f in files:
        head, data = _plan(f)
        total += len(head) + data + pad(data)
    return total


def _read_content(f: InnerFile, read_size: int) -> Iterator[bytes]:
    assert f.content is not None
    if len(f.content) != f.size:
        raise BackupError(f"internal error: content of {f.path} does not match its size")
    for off, length in f.regions:
        for pos in range(off, off + length, read_size):
            yield f.content[pos : min(pos + read_size, off + length)]


class ReadTarget(Protocol):
    """Where volume data may be read straight into (the backup's chunker): ``space()`` lends a writable,
    non-empty view; the piece read into it is yielded and must be consumed before ``space()`` is asked again."""

    def space(self) -> memoryview: ...


def _read_fd(
    f: InnerFile, read_size: int, reuse: bool = False, into: ReadTarget | None = None
) -> Iterator[bytes | memoryview]:
    """Regions of an attached fd (an immutable snapshot: no re-scan, but every read must be complete).

    With ``reuse`` the pieces are views of one buffer that the next piece overwrites (no allocation and no
    page faults per read): only for a consumer that is done with a piece when it asks for the next.  With
    ``into`` each piece is read into ``into.space()`` (at most ``read_size`` at a time) and yielded as that view."""
    assert f.fd is not None
    what = f.label or f.path
    buf = memoryview(bytearray(read_size)) if reuse and into is None else None
    try:
        for off, length in f.regions:
            end = off + length
            while off < end:
                if into is not None:
                    room = into.space()
                    want = min(read_size, len(room), end - off)
                    got = os.preadv(f.fd, [room[:want]], off)
                    piece: bytes | memoryview = room[:got]
                elif buf is not None:
                    want = min(read_size, end - off)
                    got = os.preadv(f.fd, [buf[:want]], off)
                    piece = buf[:got]
                else:
                    piece = os.pread(f.fd, min(read_size, end - off), off)
                if not piece:
                    raise BackupError(f"cannot read {what}: short read at offset {off} (did its size change?)")
                off += len(piece)
                yield piece
    except OSError as e:
        raise BackupError(f"cannot read {what}: {e.strerror or e}") from None


def _read_regions(
    f: InnerFile, read_size: int, reuse: bool = False, into: ReadTarget | None = None
) -> Iterator[bytes | memoryview]:
    """The bytes of ``f``'s regions, in big pieces; raises BackupError if the file changed since scanning."""
    if f.content is not None:
        yield from _read_content(f, read_size)
        return
    if f.fd is not None:
        yield from _read_fd(f, read_size, reuse, into)
        return
    if f.source is None:
        raise BackupError(f"internal error: {f.label or f.path} has no source attached")
    try:
        fd = os.open(f.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise BackupError(f"cannot read {f.source}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != f.size:
            raise BackupError(f"{f.source} changed during the backup (size {f.size} -> {st.st_size})")
        if scan_fd(fd, f.size) != list(f.regions):
            raise BackupError(f"{f.source} changed during the backup (its holes moved)")
        for off, length in f.regions:
            end = off + length
            while off < end:
                piece = os.pread(fd, min(read_size, end - off), off)
                if not piece:
                    raise BackupError(f"{f.source} changed during the backup (short read at {off})")
                off += len(piece)
                yield piece
        if os.fstat(fd).st_size != f.size:
            raise BackupError(f"{f.source} changed during the backup (size changed while reading)")
    except OSError as e:
        raise BackupError(f"cannot read {f.source}: {e.strerror}") from e
    finally:
        os.close(fd)


def write_archive(
    files: Iterable[InnerFile], read_size: int = DEFAULT_READ_SIZE, reuse: bool = False,
    counted: Callable[[int], None] | None = None, into: ReadTarget | None = None,
) -> Iterator[bytes | memoryview]:
    """Yield the whole inner archive.  Data comes as fresh ``bytes`` of up to ``read_size`` (consumers may
    keep them), headers as small ``bytes``; hole bytes are never read.  With ``reuse``, volume data (attached
    fds) comes as views of one reused buffer, valid only until the next piece is asked for (the backup's
    chunker copies or compresses each piece at once); with ``into`` they are read straight into the views
    ``into.space()`` lends (see ReadTarget).  ``counted`` gets the length of each data piece (not
    headers or padding: the unit of the manifest's data sizes, for progress)."""
    if read_size < BLOCK:
        raise ValueError("read_size too small")
    for f in files:
        head, data = _plan(f)
        yield head
        if data:
            if counted is None:
                yield from _read_regions(f, read_size, reuse, into)
            else:
                for piece in _read_regions(f, read_size, reuse, into):
                    counted(len(piece))
                    yield piece
            if pad(data):
                yield ZEROS[: pad(data)]
    yield ZEROS + ZEROS

