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

The extractor (:class:`Extractor`) is a push parser that accepts only that shape, only the expected
entries in the expected order, and writes only under its destination directory (directory fds, O_NOFOLLOW,
O_EXCL).  Extracted modes are ``mode & 0o777`` (set-id and sticky bits are dropped: defence in depth);
mtimes are restored; ownership is never changed.  Directory modes/mtimes are applied in ``finish()`` so
that read-only directories can still be filled.  Parents that are not entries are created 0o755.

Validate-only mode (``Extractor(None, expected)``, used by ``qvm-backup-restore --verify-only``): the same
parser with the same checks and the same errors, but the filesystem is never touched (nothing opened,
created, written, chmod-ed or utime-d); entry data is consumed and dropped.  Checks that depend on what
already exists in a destination do not apply; the lexical ones do, including the archive-internal
conflicts (an entry below an earlier file or symlink entry, a file or symlink where an earlier entry made a
directory), which both modes detect from the entry list before touching the disk.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from qubes_backup_dom0.errors import BackupError, VerificationError
from qubes_backup_dom0.text import has_unsafe_chars

BLOCK = 512
_ZEROS = bytes(BLOCK)
_OCTAL11_LIMIT = 8**11  # 12-byte ustar numeric fields hold 11 octal digits
SPARSE_DIR = "GNUSparseFile.0"
PAX_DIR = "PaxHeaders.0"
MAX_PATH = 4096
MAX_COMPONENT = 255
MAX_LINK = 4095
MAX_SPARSE_REGIONS = 1_000_000
MAX_SPARSE_MAP = 16 * 1024 * 1024
DEFAULT_READ_SIZE = 4 * 1024 * 1024
_PAX_KEYS = frozenset(
    {
        "path",
        "size",
        "mtime",
        "linkpath",
        "GNU.sparse.major",
        "GNU.sparse.minor",
        "GNU.sparse.name",
        "GNU.sparse.realsize",
    }
)
_DECIMAL = re.compile(rb"0|[1-9][0-9]{0,19}")
_SIGNED_DECIMAL = re.compile(rb"0|-?[1-9][0-9]{0,19}")
_TYPEFLAGS = {"file": b"0", "dir": b"5", "symlink": b"2"}


# --------------------------------------------------------------------------------------------- scanning


def _scan_fd(fd: int, size: int) -> list[tuple[int, int]]:
    """Data regions of an open file of apparent ``size``, via SEEK_DATA/SEEK_HOLE; holes are never read."""
    regions: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                break
            if e.errno == errno.EINVAL:  # filesystem without SEEK_DATA: treat as all data
                return [(0, size)] if size else []
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end <= start:
            break
        if regions and regions[-1][0] + regions[-1][1] == start:
            regions[-1] = (regions[-1][0], end - regions[-1][0])
        else:
            regions.append((start, end - start))
        pos = end
    return regions


def scan(path: Path) -> tuple[int, list[tuple[int, int]]]:
    """Apparent size and merged data regions ``(offset, length)`` of a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        return size, _scan_fd(fd, size)
    finally:
        os.close(fd)


ZERO_GRANULE = 64 * 1024  # all-zero runs this long (aligned) become holes
SCAN_READ = 4 * 1024 * 1024  # a multiple of ZERO_GRANULE
_ZERO_GRANULE = memoryview(bytes(ZERO_GRANULE))
_ZERO_READ_BYTES = bytes(SCAN_READ)
_ZERO_READ = memoryview(_ZERO_READ_BYTES)


def _add_run(out: list[tuple[int, int]], start: int, length: int) -> None:
    if out and out[-1][0] + out[-1][1] == start:
        out[-1] = (out[-1][0], out[-1][1] + length)
    else:
        out.append((start, length))


def _nonzero_runs(buf: bytearray, n: int, base: int, out: list[tuple[int, int]], at: int = 0) -> None:
    """Append the non-zero granules of ``buf[at:at + n]`` (file offset ``base``) to ``out``: whole blocks
    compared against a zero buffer (memcmp speed), never a loop over bytes."""
    if n == SCAN_READ and at == 0 and len(buf) == SCAN_READ:
        if buf == _ZERO_READ_BYTES:  # the common case of a thin volume: one memcmp, no slicing
            return
    elif buf.startswith(_ZERO_READ[:n], at):
        return
    pos, end = base, base + n
    while pos < end:
        gend = min((pos // ZERO_GRANULE + 1) * ZERO_GRANULE, end)
        if not buf.startswith(_ZERO_GRANULE[: gend - pos], at + pos - base):
            _add_run(out, pos, gend - pos)
        pos = gend


BLOCKDEV_ENV = "QUBES_SIM_BLOCKDEV"


def _model_block_device() -> bool:
    """Simulation only: ``QUBES_SIM_BLOCKDEV=1`` (with ``QUBES_SIM`` set) makes volumes read like a real block
    device, which reports its whole apparent size as data: no SEEK_DATA/SEEK_HOLE shortcut, every byte is
    read and zero-scanned (docs/PERFORMANCE.md, the 64 GiB thin-volume case)."""
    return bool(os.environ.get("QUBES_SIM")) and os.environ.get(BLOCKDEV_ENV) == "1"


def reads_as_block_device(fd: int) -> bool:
    """A block device (a real LV: no SEEK_DATA), or a simulated LV read like one (``QUBES_SIM_BLOCKDEV=1``)."""
    return _model_block_device() or stat.S_ISBLK(os.fstat(fd).st_mode)


SCANNED = [0]  # bytes read by scan_zeros in this process (observable by tests and the bench)
SCAN_PARALLEL_MIN = 256 * 1024 * 1024  # regions at least this large are scanned by several threads


DIRECT_ALIGN = 4096


def _direct_fd(fd: int) -> int | None:
    """``fd`` opened again with O_DIRECT, or None.  A block device's scan reads its whole size, mostly the
    zeros of unallocated thin blocks: through the page cache that costs a page allocation per 4 KiB
    (measured 0.4 GB/s on a cold sparse file, docs/PERFORMANCE.md) and evicts everything else; O_DIRECT
    reads them at memory speed and caches nothing."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except (OSError, AttributeError):
        return None


def _aligned(size: int) -> tuple[bytearray, int]:
    """A buffer with ``size`` bytes starting at a DIRECT_ALIGN boundary: (buffer, offset of that start)."""
    import ctypes

    buf = bytearray(size + DIRECT_ALIGN)
    return buf, -ctypes.addressof(ctypes.c_char.from_buffer(buf)) % DIRECT_ALIGN


def _scan_part(fd: int, ranges: list[tuple[int, int]], what: str, direct: int | None = None) -> list[tuple[int, int]]:
    """The non-zero granules of ``ranges`` (offset, length), read with preadv into one reused buffer (through
    ``direct``, an O_DIRECT descriptor of the same file, where the kernel accepts it)."""
    out: list[tuple[int, int]] = []
    buf, at = _aligned(SCAN_READ) if direct is not None else (bytearray(SCAN_READ), 0)
    view = memoryview(buf)[at : at + SCAN_READ]
    for off, length in ranges:
        pos, end = off, off + length
        while pos < end:
            n = min(end, (pos // SCAN_READ + 1) * SCAN_READ) - pos
            got = -1
            if direct is not None and not (pos | n) % DIRECT_ALIGN:
                try:
                    got = os.preadv(direct, [view[:n]], pos)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    direct = None  # not possible here after all: the page cache it is
            if got < 0:
                got = os.preadv(fd, [view[:n]], pos)
            if got != n:
                raise BackupError(f"cannot read {what}: short read at offset {pos + max(got, 0)}")
            _nonzero_runs(buf, n, pos, out, at)
            pos += n
    return out


def _split_even(regions: list[tuple[int, int]], parts: int) -> list[list[tuple[int, int]]]:
    """``regions`` cut into ``parts`` consecutive pieces of about equal bytes, at SCAN_READ boundaries."""
    total = sum(n for _, n in regions)
    share = -(-total // parts // SCAN_READ) * SCAN_READ
    out: list[list[tuple[int, int]]] = [[]]
    room = share
    for off, length in regions:
        while length:
            take = min(length, room)
            out[-1].append((off, take))
            off, length, room = off + take, length - take, room - take
            if room == 0 and len(out) < parts:
                out.append([])
                room = share
    return [p for p in out if p]


def scan_zeros(
    fd: int, size: int, what: str = "volume", provisioned: list[tuple[int, int]] | None = None
) -> list[tuple[int, int]]:
    """Data regions of an open file or block device of apparent ``size``: the SEEK_DATA/SEEK_HOLE map (a block
    device reports all data) or, when given, ``provisioned`` (a thin LV's map: the rest reads as zeros), then
    all-zero runs inside it (``ZERO_GRANULE`` granularity) become holes.  ``SCANNED`` counts the bytes read.

    The zero test is a memcmp per 4 MiB block (tens of GB/s); reading is what costs (preadv copies every
    byte, also the zeros of a thin volume's unallocated blocks), so large volumes are read by one thread
    per core (preadv and the compare run outside the GIL or briefly inside it), and a block device is read
    with O_DIRECT (see ``_direct_fd``)."""
    blockdev = reads_as_block_device(fd)
    # O_DIRECT for the zeros of a block device read whole; a thin LV's provisioned ranges go through the page
    # cache, where the archive's read of the same bytes right after finds them.
    direct = _direct_fd(fd) if blockdev and provisioned is None else None
    try:
        if provisioned is not None:
            regions = provisioned
        else:
            regions = [(0, size)] if size and _model_block_device() else _scan_fd(fd, size)
        SCANNED[0] += sum(n for _, n in regions)
        parts = min(os.cpu_count() or 1, 4)
        if parts < 2 or sum(n for _, n in regions) < SCAN_PARALLEL_MIN:
            return _scan_part(fd, regions, what, direct)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=parts, thread_name_prefix="scan") as pool:
            results = list(pool.map(lambda r: _scan_part(fd, r, what, direct), _split_even(regions, parts)))
    except OSError as e:
        raise BackupError(f"cannot read {what}: {e.strerror or e}") from None
    finally:
        if direct is not None:
            os.close(direct)
    out: list[tuple[int, int]] = []
    for runs in results:
        for start, length in runs:
            _add_run(out, start, length)
    return out


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
        err = _path_problem(path_in_archive)
        if err:
            raise BackupError(f"cannot archive {path_in_archive!r}: {err}")
        regions = [(0, len(data))] if data else []
        return cls(path_in_archive, None, "file", len(data), len(data), regions, mode, mtime, content=bytes(data))

    @classmethod
    def from_fd(cls, path_in_archive: str, fd: int, size: int, label: str, mtime: int = 0,
                provisioned: list[tuple[int, int]] | None = None) -> InnerFile:  # fmt: skip
        """A volume read through ``fd`` (apparent ``size``; only its ``provisioned`` ranges when known), scanned
        for holes and all-zero runs.  The returned entry has no source: the backup attaches an fd of the same
        immutable state (``fd``) before writing."""
        err = _path_problem(path_in_archive)
        if err:
            raise BackupError(f"cannot back up {label}: archive path {path_in_archive!r}: {err}")
        regions = scan_zeros(fd, size, label, provisioned)
        data = sum(n for _, n in regions)
        return cls(path_in_archive, None, "file", size, data, regions, 0o600, mtime, label=label)

    @classmethod
    def from_path(cls, path_in_archive: str, source: Path) -> InnerFile:
        """lstat ``source`` (symlinks are stored, not followed) and, for regular files, scan its holes."""
        err = _path_problem(path_in_archive)
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


def _path_problem(path: str) -> str | None:
    """Why ``path`` is not an acceptable relative archive path, or None.  Shared by writer and reader."""
    if not path:
        return "empty path"
    if "\0" in path:
        return "NUL in path"
    if has_unsafe_chars(path):
        return "control character in path"
    if path.startswith("/"):
        return "absolute path"
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        return "path is not valid UTF-8"
    if len(raw) > MAX_PATH:
        return "path too long"
    for part in path.split("/"):
        if part in ("", ".", ".."):
            return f"bad path component {part!r}"
        if len(part.encode("utf-8")) > MAX_COMPONENT:
            return "path component too long"
    return None


def _split(path: str) -> tuple[str, str]:
    """(dirname with trailing slash or "", basename)."""
    d, _, b = path.rpartition("/")
    return (d + "/" if d else ""), b


def _sparse_name(path: str) -> str:
    d, b = _split(path)
    return f"{d}{SPARSE_DIR}/{b}"


def _is_sparse(f: Any) -> bool:
    return f.type == "file" and f.data < f.size


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


def _pad(n: int) -> int:
    return -n % BLOCK


def _sparse_map(size: int, regions: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, int]], bytes]:
    """The region list as stored (with the trailing-hole marker) and the NUL-padded map text."""
    stored = list(regions)
    if not stored or stored[-1][0] + stored[-1][1] < size:
        stored.append((size, 0))
    text = b"%d\n" % len(stored) + b"".join(b"%d\n%d\n" % r for r in stored)
    return stored, text + bytes(_pad(len(text)))


def _plan(f: InnerFile) -> tuple[bytes, int]:
    """Everything before the entry's region data (pax header, ustar header, sparse map) and the number of
    region bytes that follow.  Used by both ``write_archive`` and ``archive_size`` so they cannot disagree."""
    err = _path_problem(f.path)
    if err:
        raise BackupError(f"cannot archive {f.source or f.path}: {err}")
    if f.type not in _TYPEFLAGS:
        raise BackupError(f"cannot archive {f.path}: unknown entry type {f.type!r}")
    records: list[bytes] = []
    sparse = _is_sparse(f)
    mapbytes = b""
    if f.type == "file":
        if sum(n for _, n in f.regions) != f.data:
            raise BackupError(f"internal error: regions of {f.path} do not add up to its data size")
        name = _sparse_name(f.path) if sparse else f.path
        if sparse:
            _, mapbytes = _sparse_map(f.size, f.regions)
        stored = len(mapbytes) + f.data
    else:
        name = f.path
        stored = 0
    records.append(_pax_record("path", name.encode("utf-8")))
    ustar_size = stored
    if stored >= _OCTAL11_LIMIT:
        records.append(_pax_record("size", b"%d" % stored))
        ustar_size = 0
    ustar_mtime = f.mtime
    if not 0 <= f.mtime < _OCTAL11_LIMIT:
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
    d, b = _split(f.path)
    paxname = f"{d}{PAX_DIR}/{b}".encode()
    head = (
        _ustar(paxname, 0o644, len(pax), ustar_mtime, b"x")
        + pax
        + bytes(_pad(len(pax)))
        + _ustar(name.encode("utf-8"), f.mode, ustar_size, ustar_mtime, _TYPEFLAGS[f.type], linkname)
        + mapbytes
    )
    return head, f.data if f.type == "file" else 0


def archive_size(files: Iterable[InnerFile]) -> int:
    """Exact length of ``write_archive(files)`` (for progress bars and uncompressed chunk counts)."""
    total = 2 * BLOCK
    for f in files:
        head, data = _plan(f)
        total += len(head) + data + _pad(data)
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
        if _scan_fd(fd, f.size) != list(f.regions):
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
            if _pad(data):
                yield _ZEROS[: _pad(data)]
    yield _ZEROS + _ZEROS


# --------------------------------------------------------------------------------------------- reader


def _octal(field_: bytes, what: str) -> int:
    """A ustar numeric field: octal digits then NUL/space padding; base-256 and junk are refused."""
    digits = field_.rstrip(b"\0 ")
    if not digits or any(c not in b"01234567" for c in digits):
        raise VerificationError(f"inner archive: bad {what} field in tar header")
    return int(digits, 8)


def _decimal(value: bytes, what: str, signed: bool = False) -> int:
    if not (_SIGNED_DECIMAL if signed else _DECIMAL).fullmatch(value):
        raise VerificationError(f"inner archive: bad {what} value in pax header")
    return int(value)


def _parse_pax(data: bytes) -> dict[str, bytes]:
    """Strictly parse pax records; unknown or duplicate keys are refused."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos, pos + 8)
        if sp < 0:
            raise VerificationError("inner archive: malformed pax record")
        n = _decimal(data[pos:sp], "pax record length")
        end = pos + n
        if end > len(data) or end <= sp + 2 or data[end - 1] != 0x0A:
            raise VerificationError("inner archive: malformed pax record")
        key, eq, value = data[sp + 1 : end - 1].partition(b"=")
        k = key.decode("ascii", "replace")
        if not eq or k not in _PAX_KEYS:
            raise VerificationError(f"inner archive: pax key {k[:40]!r} not allowed")
        if k in out:
            raise VerificationError(f"inner archive: duplicate pax key {k!r}")
        out[k] = value
        pos = end
    return out


def _utf8(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise VerificationError(f"inner archive: {what} is not UTF-8") from None


def _canonical_ustar(name: bytes, mode: int, size: int, mtime: int, typeflag: bytes, linkname: bytes) -> bytes:
    """The one ustar header block FORMAT.md section 8 allows for these values (the reader's own statement of
    it, independent of the writer's ``_ustar``; tests check that the two agree).  ``name`` is cut to its
    first 100 bytes, which may end inside a UTF-8 sequence; prefix, uname, gname, devmajor and devminor are
    NUL; numbers are zero-padded octal ending in NUL; the checksum is six octal digits, NUL, space."""
    h = bytearray(BLOCK)
    name = name[:100]
    h[0 : len(name)] = name
    h[100:108] = b"%07o\0" % mode
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % mtime
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[157 : 157 + len(linkname)] = linkname
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _canonical_record(key: str, value: bytes) -> bytes:
    """``LEN KEY=VALUE\\n`` with the smallest LEN that counts the whole record, its own digits included."""
    body = b" " + key.encode("ascii") + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode("ascii") + body


WRITEBACK_BYTES = 64 << 20  # start writeback of restored data every 64 MiB (Extractor._start_writeback)


class FileSink(Protocol):
    """Where a file entry's bytes go instead of a file under ``dest_root`` (e.g. a volume import).  Data
    comes in ascending, non-overlapping pieces; ``finish(size)`` ends the entry (the rest is a hole)."""

    def write_at(self, offset: int, data: memoryview) -> None: ...

    def finish(self, size: int) -> None: ...

    def abort(self) -> None: ...


SinkChooser = Callable[[Any], "FileSink | None"]


class Extractor:
    """Strict, bounded push parser for one inner archive, extracting into ``dest_root`` (or, if it is None,
    only validating: same checks and errors, nothing on disk is opened or written).

    Its input is already MAC-verified; this is the second line of defence, so it trusts no structure:
    only ``expected`` entries (objects with ``path``, ``type``, ``size``, ``data``), in order, with exactly
    those sizes; bounded headers and sparse maps; no path escapes; no symlink is ever followed.  Memory is
    bounded by one pax header or one sparse map (plus one small record per path already extracted, for
    the lexical conflict checks); entry data is written straight from the fed pieces.
    Any violation raises :class:`VerificationError` (one line); I/O failures raise :class:`BackupError`.
    """

    def __init__(
        self,
        dest_root: Path | None,
        expected: Sequence[Any],
        *,
        max_entry_header: int = 64 * 1024,
        sinks: SinkChooser | None = None,
    ) -> None:
        seen: set[str] = set()
        for e in expected:
            err = _path_problem(e.path)
            if err:
                raise VerificationError(f"inner archive: expected path {e.path!r}: {err}")
            if e.type not in _TYPEFLAGS:
                raise VerificationError(f"inner archive: expected entry {e.path!r} has bad type {e.type!r}")
            if e.path in seen:
                raise VerificationError(f"inner archive: expected entry {e.path!r} listed twice")
            if not (0 <= e.data <= e.size) or (e.type != "file" and (e.size or e.data)):
                raise VerificationError(f"inner archive: expected entry {e.path!r} has bad sizes")
            seen.add(e.path)
        self._expected = list(expected)
        self._max_header = max_entry_header
        self._validate_only = dest_root is None
        self._sinks = sinks  # file entries it returns a sink for are streamed there instead of extracted
        self._sink: FileSink | None = None
        self._root_fd = -1
        if dest_root is not None:
            try:
                self._root_fd = os.open(dest_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise BackupError(f"cannot open restore area {dest_root}: {e.strerror}") from e
        # path -> is it a directory, for every path this archive has made so far (entries and implicit parents)
        self._made: dict[str, bool] = {}
        self._index = 0
        self._state = "header"
        self._need = BLOCK
        self._buf = bytearray()
        self._pax: dict[str, bytes] | None = None
        self._pax_len = 0
        self._pax_hdr = b""  # the pax header's own ustar block, and its records, for the canonical check
        self._pax_raw = b""
        self._zero_blocks = 0
        self._fd = -1
        self._entry: Any = None
        self._mode = 0
        self._mtime = 0
        self._stored = 0
        # flat arrays of unsigned 64-bit ints, not lists of tuples: a 1,000,000-region map stays ~16 MB
        self._map_nums = array("Q")
        self._map_partial = b""
        self._map_bytes = 0
        self._regions = array("Q")  # offset, length, offset, length, ...
        self._reg_i = 0
        self._reg_done = 0
        self._data_left = 0
        self._pad_left = 0
        self._dirs: list[tuple[str, int, int]] = []
        self._failed = False
        # early writeback: the range of the current file written since the last hint, and how much
        self._wb_lo = self._wb_hi = self._wb_bytes = 0
        self.data_done = 0  # entry data bytes written (or validated) so far: what progress counts

    # ---- public

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Consume the next piece of the archive (any size)."""
        if self._failed:
            raise VerificationError("inner archive: extractor already failed")
        mv = memoryview(data).cast("B")
        try:
            while len(mv):
                mv = self._step(mv)
        except BaseException:
            self._fail()
            raise

    def finish(self) -> None:
        """Check the archive ended cleanly, apply directory modes/mtimes, release fds."""
        if self._failed:
            raise VerificationError("inner archive: extractor already failed")
        try:
            if self._state != "done":
                raise VerificationError(
                    f"inner archive truncated (at entry {self._index + 1} of {len(self._expected)})"
                )
            for path, mode, mtime in reversed(self._dirs):  # empty in validate-only mode
                fd = self._walk(path, create=False)
                try:
                    os.utime(fd, (mtime, mtime))
                    os.fchmod(fd, mode & 0o777)
                finally:
                    os.close(fd)
        except BaseException:
            self._fail()
            raise
        self.close()
        self._state = "closed"

    def close(self) -> None:
        """Release file descriptors after an error or when giving up (idempotent)."""
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.abort()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals

    def _fail(self) -> None:
        self._failed = True
        self.close()

    def _where(self) -> str:
        if self._entry is not None:
            return f"entry {self._entry.path!r}"
        return f"entry {self._index + 1}"

    def _bad(self, msg: str) -> VerificationError:
        return VerificationError(f"inner archive, {self._where()}: {msg}")

    def _collect(self, mv: memoryview) -> tuple[bytes | None, memoryview]:
        """Gather ``self._need`` bytes into the small buffer (headers, pax data, map blocks)."""
        take = min(self._need - len(self._buf), len(mv))
        self._buf += mv[:take]
        mv = mv[take:]
        if len(self._buf) < self._need:
            return None, mv
        out = bytes(self._buf)
        self._buf.clear()
        return out, mv

    def _step(self, mv: memoryview) -> memoryview:
        state = self._state
        if state == "data":
            return self._write_data(mv)
        if state == "pad":
            take = min(self._pad_left, len(mv))
            if any(mv[:take]):
                raise self._bad("non-zero padding")
            self._pad_left -= take
            if not self._pad_left:
                self._end_entry()
            return mv[take:]
        if state in ("done", "closed"):
            raise VerificationError("inner archive: data after the end of the archive")
        chunk, mv = self._collect(mv)
        if chunk is None:
            return mv
        if state == "header":
            self._on_header(chunk)
        elif state == "pax":
            self._on_pax(chunk)
        elif state == "map":
            self._on_map_block(chunk)
        return mv

    def _on_header(self, h: bytes) -> None:
        if h == _ZEROS:
            if self._pax is not None:
                raise self._bad("end of archive after a pax header")
            self._zero_blocks += 1
            if self._zero_blocks == 2:
                if self._index != len(self._expected):
                    missing = self._expected[self._index].path
                    raise VerificationError(f"inner archive: entry {missing!r} missing")
                self._state = "done"
            return
        if self._zero_blocks:
            raise VerificationError("inner archive: data after an end-of-archive block")
        stored_sum = _octal(h[148:156], "checksum")
        if stored_sum != sum(h) - sum(h[148:156]) + 8 * 0x20:
            raise self._bad("tar header checksum mismatch")
        if h[257:265] != b"ustar\x0000":
            raise self._bad("not a POSIX ustar header")
        typeflag = h[156:157]
        size = _octal(h[124:136], "size")
        if typeflag == b"x":
            if self._pax is not None:
                raise self._bad("two pax headers in a row")
            if not 0 < size <= self._max_header:
                raise self._bad(f"pax header size {size} out of bounds")
            if self._index >= len(self._expected):
                raise VerificationError("inner archive: unexpected extra entry")
            self._pax_len = size
            self._pax_hdr = h
            self._need = size + _pad(size)
            self._state = "pax"
            return
        if self._pax is None:
            raise self._bad("entry without pax header")
        if self._index >= len(self._expected):
            raise VerificationError("inner archive: unexpected extra entry")
        self._begin_entry(h, typeflag, size, self._pax)

    def _on_pax(self, chunk: bytes) -> None:
        if any(chunk[self._pax_len :]):
            raise self._bad("non-zero padding after pax header")
        self._pax_raw = chunk[: self._pax_len]
        self._pax = _parse_pax(self._pax_raw)
        self._need = BLOCK
        self._state = "header"

    def _begin_entry(self, h: bytes, typeflag: bytes, ustar_size: int, pax: dict[str, bytes]) -> None:
        exp = self._expected[self._index]
        self._entry = exp
        self._pax = None
        if typeflag != _TYPEFLAGS[exp.type]:
            raise self._bad(f"type {typeflag!r} where {exp.type} was expected")
        if "path" not in pax:
            raise self._bad("pax header without path")
        name = _utf8(pax["path"], "path")
        has_sparse_keys = any(k.startswith("GNU.sparse.") for k in pax)
        if has_sparse_keys:
            if "GNU.sparse.name" not in pax or "GNU.sparse.realsize" not in pax:
                raise self._bad("incomplete GNU sparse header")
            real = _utf8(pax["GNU.sparse.name"], "sparse name")
            if name != _sparse_name(real):
                raise self._bad("sparse entry name does not match GNU.sparse.name")
            name = real
        if name != exp.path:
            shown = name[:200]
            raise VerificationError(
                f"inner archive: entry {shown!r} where {exp.path!r} was expected (wrong order or extra entry)"
            )
        sparse = _is_sparse(exp)
        if has_sparse_keys != sparse:
            raise self._bad("sparse-ness differs from the manifest")
        realsize = None
        if sparse:
            if pax.get("GNU.sparse.major") != b"1" or pax.get("GNU.sparse.minor") != b"0":
                raise self._bad("unsupported GNU sparse version")
            realsize = _decimal(pax["GNU.sparse.realsize"], "realsize")
        size = ustar_size
        if "size" in pax:
            if ustar_size != 0:
                raise self._bad("size in both pax and ustar header")
            size = _decimal(pax["size"], "size")
        mtime = _octal(h[136:148], "mtime")
        if "mtime" in pax:
            if mtime != 0:
                raise self._bad("mtime in both pax and ustar header")
            mtime = _decimal(pax["mtime"], "mtime", signed=True)
            if not -(2**63) <= mtime < 2**63:  # what utime() accepts; checked here so that both modes agree
                raise self._bad("mtime out of range")
        self._mtime = mtime
        self._mode = _octal(h[100:108], "mode")
        linkname = h[157:257].rstrip(b"\0")
        if exp.type != "symlink" and (linkname or "linkpath" in pax):
            raise self._bad("link target on a non-link entry")
        target = pax.get("linkpath", linkname) if exp.type == "symlink" else b""
        if self._mode > 0o7777:
            raise self._bad("mode with file-type bits")
        if exp.type == "file":
            if sparse:
                if realsize != exp.size:
                    raise self._bad(f"size {realsize} where {exp.size} was expected")
                if size > exp.data + MAX_SPARSE_MAP:
                    raise self._bad("sparse entry too large")
            elif size != exp.size:
                raise self._bad(f"size {size} where {exp.size} was expected")
            self._check_canonical(h, size, mtime, target)
            self._stored = size
            if sparse:
                self._map_nums = array("Q")
                self._map_partial = b""
                self._map_bytes = 0
                self._need = BLOCK
                self._state = "map"
            else:
                self._regions = array("Q", [0, size] if size else [])
                self._open_file()
                self._start_data(size)
            return
        if size != 0:
            raise self._bad("directory or symlink with data")
        if exp.type == "symlink" and (not target or b"\0" in target or len(target) > MAX_LINK):
            raise self._bad("bad symlink target")
        self._check_canonical(h, size, mtime, target)
        if exp.type == "dir":
            self._make_dir(exp.path)
            if not self._validate_only:
                self._dirs.append((exp.path, self._mode, mtime))
        else:
            if "linkpath" in pax and linkname:
                raise self._bad("link target in both pax and ustar header")
            if not target or b"\0" in target or len(target) > MAX_LINK:
                raise self._bad("bad symlink target")
            self._make_symlink(exp.path, _utf8(target, "link target"))
        self._entry = None
        self._index += 1
        self._need = BLOCK
        self._state = "header"

    def _check_canonical(self, h: bytes, stored: int, mtime: int, target: bytes) -> None:
        """The entry's pax records, the pax header's ustar block and the entry's ustar block must be exactly
        what FORMAT.md section 8 prescribes for the expected entry with this stored size, mode, mtime and
        link target: no other record order, optional record, field format, name cut or padding."""
        exp = self._entry
        sparse = _is_sparse(exp)
        name = (_sparse_name(exp.path) if sparse else exp.path).encode("utf-8")
        records = [_canonical_record("path", name)]
        ustar_size, ustar_mtime = stored, mtime
        if stored >= _OCTAL11_LIMIT:
            records.append(_canonical_record("size", b"%d" % stored))
            ustar_size = 0
        if not 0 <= mtime < _OCTAL11_LIMIT:
            records.append(_canonical_record("mtime", b"%d" % mtime))
            ustar_mtime = 0
        linkname = target
        if len(target) > 100:
            records.append(_canonical_record("linkpath", target))
            linkname = b""
        if sparse:
            records += [
                _canonical_record("GNU.sparse.major", b"1"),
                _canonical_record("GNU.sparse.minor", b"0"),
                _canonical_record("GNU.sparse.name", exp.path.encode("utf-8")),
                _canonical_record("GNU.sparse.realsize", b"%d" % exp.size),
            ]
        if self._pax_raw != b"".join(records):
            raise self._bad("pax records not in the canonical form (FORMAT.md section 8)")
        d, b = _split(exp.path)
        paxname = f"{d}{PAX_DIR}/{b}".encode()
        if self._pax_hdr != _canonical_ustar(paxname, 0o644, len(self._pax_raw), ustar_mtime, b"x", b""):
            raise self._bad("pax header block not in the canonical form (FORMAT.md section 8)")
        typeflag = _TYPEFLAGS[exp.type]
        if h != _canonical_ustar(name, self._mode, ustar_size, ustar_mtime, typeflag, linkname):
            raise self._bad("ustar header not in the canonical form (FORMAT.md section 8)")

    def _on_map_block(self, block: bytes) -> None:
        """Parse the sparse map incrementally, one 512-byte block at a time (bounded memory)."""
        self._map_bytes += BLOCK
        if self._map_bytes > MAX_SPARSE_MAP or self._map_bytes > self._stored:
            raise self._bad("sparse map too large")
        buf = self._map_partial + block
        pos = 0
        nums = self._map_nums
        while True:
            if nums and len(nums) == 1 + 2 * nums[0]:
                if any(buf[pos:]):
                    raise self._bad("junk after the sparse map")
                self._map_done()
                return
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            value = _decimal(buf[pos:nl], "sparse map")
            if value >= 2**63:
                raise self._bad("sparse map number out of range")
            nums.append(value)
            pos = nl + 1
            if len(nums) == 1 and not 0 < nums[0] <= MAX_SPARSE_REGIONS:
                raise self._bad(f"sparse map with {nums[0]} regions")
        rest = buf[pos:]
        if len(rest) > 20 or (not rest.isdigit() and rest):
            raise self._bad("malformed sparse map")
        self._map_partial = rest

    def _map_done(self) -> None:
        exp = self._entry
        regions = self._map_nums[1:]
        self._map_nums = array("Q")
        prev_end = 0
        total = 0
        count = len(regions) // 2
        for i in range(count):
            off, length = regions[2 * i], regions[2 * i + 1]
            last = i == count - 1
            if off < prev_end or (i and off == prev_end):
                raise self._bad("sparse map regions overlap, touch or are unsorted")
            if length == 0 and not (last and off == exp.size):
                raise self._bad("empty sparse region")
            if off + length > exp.size:
                raise self._bad("sparse region beyond the end of the file")
            prev_end = off + length
            total += length
        if prev_end != exp.size:
            raise self._bad("sparse map does not end at the file size")
        if total != exp.data:
            raise self._bad(f"{total} data bytes where {exp.data} were expected")
        if self._map_bytes + total != self._stored:
            raise self._bad("sparse entry size does not match its map")
        if regions[-1] == 0:  # the trailing-hole marker: nothing to write, ftruncate extends the file
            del regions[-2:]
        self._regions = regions
        self._open_file()
        self._start_data(total)

    def _start_data(self, total: int) -> None:
        self._reg_i = 0
        self._reg_done = 0
        self._data_left = total
        self._pad_left = _pad(self._stored)
        if total:
            self._state = "data"
        elif self._pad_left:
            self._state = "pad"
        else:
            self._end_entry()

    def _write_data(self, mv: memoryview) -> memoryview:
        off, length = self._regions[2 * self._reg_i], self._regions[2 * self._reg_i + 1]
        n = min(length - self._reg_done, len(mv))
        if self._sink is not None:
            self._sink.write_at(off + self._reg_done, mv[:n])
        elif not self._validate_only:
            piece = mv[:n]
            pos = off + self._reg_done
            start = pos
            try:
                while len(piece):
                    w = os.pwrite(self._fd, piece, pos)
                    piece = piece[w:]
                    pos += w
            except OSError as e:
                raise BackupError(f"cannot write {self._entry.path}: {e.strerror}") from e
            if not self._wb_bytes:
                self._wb_lo, self._wb_hi = start, pos
            else:
                self._wb_lo, self._wb_hi = min(self._wb_lo, start), max(self._wb_hi, pos)
            self._wb_bytes += n
            if self._wb_bytes >= WRITEBACK_BYTES:
                self._start_writeback()
        self._reg_done += n
        self._data_left -= n
        self.data_done += n
        if self._reg_done == length:
            self._reg_i += 1
            self._reg_done = 0
        if not self._data_left:
            if self._pad_left:
                self._state = "pad"
            else:
                self._end_entry()
        return mv[n:]

    def _start_writeback(self) -> None:
        """Ask the kernel to start writing back what was just written (POSIX_FADV_DONTNEED starts
        asynchronous writeback of dirty pages without waiting for it), so that the restore's later fsync
        finds most of the data on disk already; restored images are not read back.  Best effort."""
        if self._wb_bytes and self._fd >= 0 and hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd, self._wb_lo, self._wb_hi - self._wb_lo, os.POSIX_FADV_DONTNEED)
        self._wb_bytes = 0

    def _end_entry(self) -> None:
        exp = self._entry
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.finish(exp.size)
        elif not self._validate_only:
            self._start_writeback()
            try:
                os.ftruncate(self._fd, exp.size)
                os.fchmod(self._fd, self._mode & 0o777)
                os.utime(self._fd, (self._mtime, self._mtime))
            except OSError as e:
                raise BackupError(f"cannot write {exp.path}: {e.strerror}") from e
            finally:
                os.close(self._fd)
                self._fd = -1
        self._entry = None
        self._index += 1
        self._need = BLOCK
        self._state = "header"

    # ---- filesystem, confined to dest_root

    def _claim(self, path: str, is_dir: bool) -> None:
        """Lexical check, in both modes, before ``path`` is made: no earlier entry of this archive that is a
        file or symlink may be one of its parents, and a file or symlink may not replace a directory made
        earlier.  (In extract mode the filesystem would refuse these too, with the same messages; this way
        validate-only mode refuses them as well.)  Parents are walked only up to the first known one."""
        made = self._made
        d = path.rpartition("/")[0]
        new_dirs = []
        p = d
        while p and p not in made:
            new_dirs.append(p)
            p = p.rpartition("/")[0]
        if p and not made[p]:
            raise self._bad(f"path component of {d!r} is a symlink or not a directory")
        if path in made and not is_dir:
            raise self._bad("already exists in the restore area")
        for p in new_dirs:
            made[p] = True
        made[path] = is_dir

    def _walk(self, path: str, create: bool) -> int:
        """An fd for directory ``path`` under dest_root, creating missing components if ``create``.
        Symlinked components are refused (O_NOFOLLOW on every step; no path string is ever resolved)."""
        fd = os.dup(self._root_fd)
        try:
            for part in path.split("/") if path else []:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST):
                raise self._bad(f"path component of {path!r} is a symlink or not a directory") from None
            raise BackupError(f"cannot create directory {path}: {e.strerror}") from e
        return fd

    def _parent(self, path: str) -> tuple[int, str]:
        d, _, b = path.rpartition("/")
        return self._walk(d, create=True), b

    def _open_file(self) -> None:
        exp = self._entry
        self._claim(exp.path, False)
        if self._sinks is not None:
            self._sink = self._sinks(exp)
            if self._sink is not None:
                return
        if self._validate_only:
            return
        pfd, base = self._parent(exp.path)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            self._fd = os.open(base, flags, 0o600, dir_fd=pfd)
        except FileExistsError:
            raise self._bad("already exists in the restore area") from None
        except OSError as e:
            raise BackupError(f"cannot create {exp.path}: {e.strerror}") from e
        finally:
            os.close(pfd)

    def _make_dir(self, path: str) -> None:
        self._claim(path, True)
        if self._validate_only:
            return
        pfd, base = self._parent(path)
        try:
            try:
                os.mkdir(base, 0o700, dir_fd=pfd)
            except FileExistsError:
                try:
                    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                except OSError:
                    raise self._bad("exists in the restore area and is not a directory") from None
                os.close(fd)
            except OSError as e:
                raise BackupError(f"cannot create directory {path}: {e.strerror}") from e
        finally:
            os.close(pfd)

    def _make_symlink(self, path: str, target: str) -> None:
        self._claim(path, False)
        if self._validate_only:
            return
        pfd, base = self._parent(path)
        try:
            os.symlink(target, base, dir_fd=pfd)
            os.utime(base, (self._mtime, self._mtime), dir_fd=pfd, follow_symlinks=False)
        except FileExistsError:
            raise self._bad("already exists in the restore area") from None
        except OSError as e:
            raise BackupError(f"cannot create symlink {path}: {e.strerror}") from e
        finally:
            os.close(pfd)


def same_content(a: Path, b: Path) -> bool:
    """Byte-exact comparison of a restored file ``b`` with its original ``a`` (demo, tests), reading only data:
    the sizes must match, ``b`` must equal ``a`` over ``a``'s data regions, and ``a`` must equal ``b`` over
    ``b``'s (so ``b`` holds zeros wherever ``a`` has a hole)."""
    size_a, regions_a = scan(a)
    size_b, regions_b = scan(b)
    if size_a != size_b:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for regions in (regions_a, regions_b):
            for offset, length in regions:
                for pos in range(offset, offset + length, 1 << 22):
                    n = min(1 << 22, offset + length - pos)
                    if os.pread(fa.fileno(), n, pos) != os.pread(fb.fileno(), n, pos):
                        return False
    return True
