"""A strict, bounded reader of the outer tar (docs/FORMAT.md section 1), instead of Python's ``tarfile``.

``tarfile`` reads a pax or GNU long-name header's data whole: a small sparse file that claims a 1 GiB
pax header made the agent allocate 1 GiB (issue 10 item 5).  A backup's outer tar never needs any of
that: every member is a plain ustar regular file with a short name, mode 0600, uid/gid 0, mtime 0.
This reader accepts exactly the header the writer (``qubes_backup_dom0.format.outer.member_header``) emits for
a valid member name and size, byte for byte, and nothing else.  It never buffers more than one 512-byte
block plus the piece the caller asks for.

- A member header is valid only if it is byte-identical to :func:`member_header` of its name and size
  (typeflag ``0``, name NUL-padded, mode ``0000600``, uid/gid ``0000000``, mtime ``00000000000``, empty
  linkname/uname/gname/prefix, magic ``ustar\\0`` version ``00``, devmajor/devminor NUL,
  checksum as POSIX specifies); the name must match the member grammar; size <= MAX_MEMBER_SIZE.
- Member data is followed by NUL padding to a multiple of 512; the padding of a member that is read is
  checked, a member that is skipped is skipped with its padding unread (a seek on a file or S3 object).
- Exception, for backups written by another tool (Qubes OS' own ``qvm-backup``, qubes/backup.py: every file
  is its own ``tar -cO --posix`` archive, ``backup-header`` first): a *first* member named ``backup-header``
  of at most 4096 bytes with any valid ustar header is passed on, so that dom0's header parser can name that
  format.  It may be preceded by the one pax extended header GNU tar's ``--posix`` writes for it: typeflag
  ``x``, named ``./PaxHeaders/backup-header`` (GNU tar >= 1.32) or ``./PaxHeaders.PID/backup-header``
  (older), at most 512 bytes of well-formed records of the keys ``atime``, ``ctime``, ``mtime`` only (never
  ``path`` or ``size``: what is passed on is exactly what the ustar header says).  Nothing after such a first
  member is read: the reader refuses to go on (the rest is not in the format this agent serves).
- The archive ends with two zero blocks.  A lone zero block followed by anything else, or the end of the
  input before the two zero blocks, is refused.  What follows the end marker is never read (a tool or a
  block device may add padding or leave old bytes there; it is outside the archive).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import BinaryIO

from qubes_backup_protocol import frames, names

from .storage import StorageError

BLOCK = 512
_ZEROS = bytes(BLOCK)
# The largest member a valid backup has: a chunk of the maximal chunk size (256 MiB) plus its 16-byte IV.
MAX_MEMBER_SIZE = (256 << 20) + 16
SKIP_PIECE = 1 << 20
# A first member named backup-header written by another tool (Qubes' own backup) is passed on to dom0 up to
# this size (dom0's header limit), so that dom0 can recognise that format; no other member is.
FOREIGN_HEADER_MAX = 4096
# GNU tar --posix (as Qubes' qvm-backup runs it) puts a pax extended header before backup-header, named by its
# default exthdr.name "%d/PaxHeaders/%f" (tar >= 1.32; before: "%d/PaxHeaders.%p/%f", %p a process id).
FOREIGN_PAX_MAX = 512
_FOREIGN_PAX_NAME_RE = re.compile(rb"\./PaxHeaders(?:\.[0-9]{1,10})?/backup-header")
_FOREIGN_PAX_KEYS = frozenset((b"atime", b"ctime", b"mtime"))
_PAX_TIME_RE = re.compile(rb"-?[0-9]{1,20}(?:\.[0-9]{1,9})?")


class TarError(StorageError):
    """The stored stream is not an outer tar of a backup (one line, sent to dom0 as an ERROR frame)."""


class ForeignFormatError(TarError):
    """The file is a tar of another tool (Qubes OS' own backup): not ours, but not damaged either."""


class TruncatedError(TarError):
    """The input ended inside a member's data or padding."""


def member_header(name: str, size: int) -> bytes:
    """The one valid ustar header for member ``name`` of ``size`` bytes (FORMAT.md section 1)."""
    raw = name.encode("ascii")
    if len(raw) > 100 or not 0 <= size < 8**11:
        raise ValueError("member name or size out of range")
    h = bytearray(BLOCK)
    h[0 : len(raw)] = raw
    h[100:108] = b"0000600\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _checksum_ok(h: bytes) -> bool:
    digits = h[148:156].replace(b"\0", b" ").strip()
    return bool(digits) and all(c in b"01234567" for c in digits) and int(digits, 8) == sum(h[:148]) + 256 + sum(
        h[156:]
    )


def _foreign_pax_size(h: bytes) -> int | None:
    """The data size if ``h`` is the pax extended header GNU tar --posix writes before ``backup-header``."""
    if h[156:157] != b"x" or h[257:265] != b"ustar\x0000" or not _checksum_ok(h):
        return None
    if _FOREIGN_PAX_NAME_RE.fullmatch(h[0:100].rstrip(b"\0")) is None or any(h[345:500]):  # no prefix
        return None
    digits = h[124:136].rstrip(b"\0 ")
    if not digits or any(c not in b"01234567" for c in digits):
        return None
    size = int(digits, 8)
    return size if 0 < size <= FOREIGN_PAX_MAX else None


def _foreign_pax_ok(data: bytes) -> bool:
    """``data`` is nothing but well-formed pax records ("LEN key=value\\n") of the time keys, each once."""
    seen: set[bytes] = set()
    while data:
        length, space, _ = data[:4].partition(b" ")
        if not space or not length.isdigit() or length.startswith(b"0"):
            return False
        record, data = data[: int(length)], data[int(length) :]
        if len(record) != int(length) or not record.endswith(b"\n"):
            return False
        key, eq, value = record[len(length) + 1 : -1].partition(b"=")
        if not eq or key not in _FOREIGN_PAX_KEYS or key in seen or _PAX_TIME_RE.fullmatch(value) is None:
            return False
        seen.add(key)
    return bool(seen)


def _pad(n: int) -> int:
    return -n % BLOCK


@dataclass(frozen=True)
class Member:
    name: str
    size: int


class OuterReader:
    """Pull reader: ``next()`` gives the next member (or None after the end marker), ``read(n)`` its data."""

    def __init__(self, fileobj: BinaryIO, seekable: bool) -> None:
        self._f = fileobj
        self._seekable = seekable
        self._member: Member | None = None
        self._data_left = 0  # unread data bytes of the current member
        self._pad_left = 0  # then its padding
        self._ended = False
        self._first = True
        self._foreign = False  # the first member was another tool's backup-header: read nothing after it

    def _read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            piece = self._f.read(n - len(out))
            if not piece:
                break
            out += piece
        return bytes(out)

    def _skip(self, n: int) -> None:
        if not n:
            return
        if self._seekable:
            self._f.seek(n, io.SEEK_CUR)
            return
        while n:
            piece = self._f.read(min(SKIP_PIECE, n))
            if not piece:
                raise TruncatedError("backup truncated inside a member")
            n -= len(piece)

    def next(self) -> Member | None:
        """Skip what is left of the current member and parse the next header."""
        if self._ended:
            return None
        if self._foreign:
            raise ForeignFormatError("not a qubes-backup tar: its first member's tar header was written by another "
                           "tool (Qubes OS' own qvm-backup, or a tar re-packed by hand); nothing after it is read")
        if self._member is not None:
            self._skip(self._data_left + self._pad_left)
            self._member = None
            self._data_left = self._pad_left = 0
        h = self._read_exact(BLOCK)
        if len(h) < BLOCK:
            raise TarError(
                "backup truncated: no end-of-archive marker" if not h else "backup truncated inside a tar header"
            )
        if h == _ZEROS:
            second = self._read_exact(BLOCK)
            if second != _ZEROS:
                raise TarError("not a backup tar: a lone zero block" if len(second) == BLOCK else
                               "backup truncated: incomplete end-of-archive marker")  # fmt: skip
            self._ended = True
            return None
        first, self._first = self._first, False
        pax = first and self._foreign_pax(h)
        if pax:
            h = self._read_exact(BLOCK)
            if len(h) < BLOCK:
                raise TarError("backup truncated inside a tar header")
        member = self._parse(h, first=first, after_pax=pax)
        if first:
            self._foreign = pax or h != member_header(member.name, member.size)
        self._member = member
        self._data_left = member.size
        self._pad_left = _pad(member.size)
        return member

    def _foreign_pax(self, h: bytes) -> bool:
        """True after reading and checking the pax header ``h`` (and its data) that GNU tar --posix writes
        before another tool's first member ``backup-header``; False if ``h`` is not such a header."""
        size = _foreign_pax_size(h)
        if size is None:
            return False
        data = self._read_exact(size + _pad(size))
        if len(data) < size + _pad(size):
            raise TruncatedError("backup truncated inside a pax header")
        if any(data[size:]) or not _foreign_pax_ok(data[:size]):
            raise TarError("malformed pax header before backup-header (only atime, ctime, mtime records)")
        return True

    @staticmethod
    def _parse(h: bytes, first: bool = False, after_pax: bool = False) -> Member:
        raw_name = h[0:100].split(b"\0", 1)[0]
        shown = frames.safe_text(raw_name.decode("latin-1"), limit=80)
        if after_pax and raw_name != names.HEADER.encode():
            raise TarError(f"a pax header for backup-header is followed by another member: {shown}")
        if h[156:157] != b"0":
            raise TarError(f"backup contains a non-regular member: {shown}")
        name = raw_name.decode("latin-1")
        if not raw_name.isascii() or not names.is_member_name(name):
            raise TarError(f"backup contains an unexpected member name: {shown}")
        digits = h[124:136].rstrip(b"\0 ")
        if not digits or any(c not in b"01234567" for c in digits):
            raise TarError(f"bad size field in the tar header of {shown}")
        size = int(digits, 8)
        if size > MAX_MEMBER_SIZE:
            raise TarError(f"backup member too large: {shown} ({size} bytes)")
        no_prefix = not any(h[345:500])
        if first and name == names.HEADER and size <= FOREIGN_HEADER_MAX and no_prefix and _checksum_ok(h):
            # The first member of a tar written by another tool (Qubes OS' own backup has a member of this
            # name): passed on, bounded, so that dom0's strict header parser can say which format it is.
            return Member(name, size)
        if after_pax:
            raise TarError(f"malformed tar header of {shown} after its pax header")
        if h != member_header(name, size):
            raise TarError(
                f"malformed tar header of {shown} (only plain ustar members, mode 0600, uid/gid 0, mtime 0)"
            )
        return Member(name, size)

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the current member's data (b"" once it is all read, after checking the
        padding); raises TruncatedError if the input ends early."""
        if self._member is None:
            return b""
        if not self._data_left:
            if self._pad_left:
                pad = self._read_exact(self._pad_left)
                if len(pad) < self._pad_left:
                    raise TruncatedError(f"backup truncated inside member {self._member.name}")
                self._pad_left = 0
                if any(pad):
                    raise TarError(f"non-zero padding after member {self._member.name}")
            return b""
        piece = self._f.read(min(n, self._data_left))
        if not piece:
            raise TruncatedError(f"backup truncated inside member {self._member.name}")
        self._data_left -= len(piece)
        return piece
