"""The frame layer: the only thing dom0 parses before a MAC has verified.

Every frame is a fixed 10-byte header (declared with construct), then ``name_len`` bytes of name, then
``data_len`` bytes of data.  The header is parsed with fixed-width fields only; the caller bounds the
lengths *before* reading name or data, so a hostile peer cannot make the reader allocate or wait for more
than it allowed.  See docs/PROTOCOL.md.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from construct import Const, Int8ub, Int16ub, Int32ub, Struct
from construct import Enum as CEnum

MAGIC = b"QB"
VERSION = 1


class FrameType(enum.IntEnum):
    # dom0 -> agent
    LOCATION = 1  # name: backup file name (qubes.Backup) or empty; data: the location string
    WANT = 2  # name: an archive prefix (vmN) dom0 wants (qubes.Restore)
    WANT_END = 3  # end of the want list
    DATA = 4  # data: a piece of the backup stream (qubes.Backup)
    COMMIT = 5  # the backup stream is complete (qubes.Backup)
    GET = 6  # name: a repository file dom0 wants (repository mode, docs/REPOSITORY.md section 9)
    PASSPHRASE = 7  # data: the passphrase (qubes.RestoreParanoid, dom0 -> DisposableVM)
    PRUNE = 8  # data: the retention policy and dry-run flag of a keyless prune (prune_frames.py)
    GETS = 9  # data: up to 64 repository object ids dom0 wants, in order (repo.py; qubes.Restore)
    # agent -> dom0
    MEMBER = 16  # name: outer member name; data: its content (qubes.Restore)
    END = 17  # no more members
    ERROR = 18  # data: a short UTF-8 message
    DONE = 19  # data: where the backup was stored (qubes.Backup)
    ENTRY = 20  # name: a backup file name; data: its size and backup-header member (qubes.Restore listing)
    DAMAGED = 21  # data: a short UTF-8 message: the backup file is malformed (qubes.Restore), else as ERROR
    FATE = 22  # name: roots/NAME; data: kept or deleted by a prune, and why (prune_frames.py)
    # DisposableVM -> dom0 (qubes.RestoreParanoid; grammar in plan_frames.py, docs/PROTOCOL.md section 8)
    PLAN_VM = 32  # name: archive vmN; data: one VM of the plan
    PLAN_END = 33  # data: what the backup is (id, time, compression, chunk size, dom0 home)
    VOLUME_DATA = 34  # name: vmN/VOLUME; data: the volume's next bytes
    VOLUME_HOLE = 35  # name: vmN/VOLUME; data: how many zero bytes come next (8 bytes, big-endian)
    VOLUME_END = 36  # name: vmN/VOLUME; the volume is complete
    VERIFIED = 37  # every wanted archive verified, END seen


FrameHeader = Struct(
    "magic" / Const(MAGIC),
    "version" / Const(VERSION, Int8ub),
    "type" / CEnum(Int8ub, FrameType),
    "name_len" / Int16ub,
    "data_len" / Int32ub,
)
HEADER_SIZE = FrameHeader.sizeof()
# The same declaration compiled by construct into plain Python (4x faster per frame: one per object of a
# repository session); parsing and building give what FrameHeader gives.
_COMPILED = FrameHeader.compile()

MAX_ERROR_LEN = 512
MAX_LOCATION_LEN = 4096
MAX_DATA_FRAME = 1 << 22  # qubes.Backup stream pieces


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame, or one larger than allowed."""


@dataclass(frozen=True)
class Frame:
    type: FrameType
    name: str
    data: bytes | memoryview  # a memoryview only when the caller asked read_frame to read ``into`` a buffer


def encode_header(ftype: FrameType, name_len: int, data_len: int) -> bytes:
    return _COMPILED.build({"type": ftype, "name_len": name_len, "data_len": data_len})


def encode(ftype: FrameType, name: str = "", data: bytes = b"") -> bytes:
    raw_name = name.encode("ascii")
    return encode_header(ftype, len(raw_name), len(data)) + raw_name + bytes(data)


def write_frame(out: BinaryIO, ftype: FrameType, name: str = "", data: bytes | memoryview = b"") -> None:
    """Write one frame; large data is written without being copied into the header buffer."""
    raw_name = name.encode("ascii")
    out.write(encode_header(ftype, len(raw_name), len(data)) + raw_name)
    if len(data):
        out.write(data)


def read_exact(stream: BinaryIO, size: int) -> bytes:
    """Read exactly ``size`` bytes or raise ProtocolError on a short stream."""
    if size == 0:
        return b""
    buf = stream.read(size)
    if buf is None or len(buf) != size:
        got = bytearray(buf or b"")
        while len(got) < size:
            piece = stream.read(size - len(got))
            if not piece:
                raise ProtocolError(f"stream ended inside a frame ({len(got)} of {size} bytes)")
            got += piece
        return bytes(got)
    return buf


def readinto_exact(stream: BinaryIO, view: memoryview) -> None:
    """Fill ``view`` completely from the stream (its ``readinto`` when it has one, so nothing is copied
    twice), or raise ProtocolError on a short stream."""
    size, pos = len(view), 0
    readinto = getattr(stream, "readinto", None)
    while pos < size:
        if readinto is not None:
            n = readinto(view[pos:])
        else:
            piece = stream.read(size - pos) or b""
            n = len(piece)
            view[pos : pos + n] = piece
        if not n:
            raise ProtocolError(f"stream ended inside a frame ({pos} of {size} bytes)")
        pos += n


def read_header(stream: BinaryIO) -> tuple[FrameType, int, int] | None:
    """Read a frame header; None on a clean end of stream before any byte."""
    raw = stream.read(HEADER_SIZE)
    if not raw:
        return None
    if len(raw) < HEADER_SIZE:
        raw += read_exact(stream, HEADER_SIZE - len(raw))
    if raw[:2] != MAGIC or raw[2] != VERSION:
        raise ProtocolError("bad frame header")
    try:
        ftype = FrameType(raw[3])
    except ValueError:
        raise ProtocolError(f"unknown frame type {raw[3]}") from None
    parsed = _COMPILED.parse(raw)
    return ftype, int(parsed.name_len), int(parsed.data_len)


NameCheck = Callable[[str], bool]


BufferFor = Callable[[FrameType, int], "memoryview | None"]


def read_frame(
    stream: BinaryIO,
    allowed: dict[FrameType, tuple[int, int]],
    name_ok: NameCheck | None = None,
    into: BufferFor | None = None,
) -> Frame | None:
    """Read one frame whose type is in ``allowed``: ``{type: (max_name_len, max_data_len)}``.

    Lengths are checked against the limits before anything else is read.  ``name_ok`` validates the name
    (ASCII only).  Returns None on a clean end of stream.

    ``into(type, data_len)`` may return a writable memoryview of exactly ``data_len`` bytes (it is only
    called after the length passed its limit); the data is then read straight into it and ``Frame.data`` is
    that view.  When it returns None (or is not given) the data comes back as ``bytes``.
    """
    head = read_header(stream)
    if head is None:
        return None
    ftype, name_len, data_len = head
    if ftype not in allowed:
        raise ProtocolError(f"unexpected frame type {ftype.name}")
    max_name, max_data = allowed[ftype]
    if name_len > max_name:
        raise ProtocolError(f"frame name too long ({name_len} > {max_name} bytes)")
    if data_len > max_data:
        raise ProtocolError(f"frame data too long ({data_len} > {max_data} bytes)")
    raw_name = read_exact(stream, name_len)
    try:
        name = raw_name.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("frame name is not ASCII") from None
    if name_len and name_ok is not None and not name_ok(name):
        raise ProtocolError(f"malformed name {safe_text(name)!r}")
    view = into(ftype, data_len) if into is not None and data_len else None
    if view is None:
        return Frame(ftype, name, read_exact(stream, data_len))
    if len(view) != data_len:
        raise ValueError("read_frame: the buffer for the frame data has the wrong size")
    readinto_exact(stream, view)
    return Frame(ftype, name, view)


def safe_text(text: str | bytes | memoryview, limit: int = 200) -> str:
    """Printable ASCII rendering of peer-supplied text, for one-line error messages (no escapes)."""
    if not isinstance(text, str):
        text = bytes(text).decode("utf-8", "replace")
    out = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
    return out if len(out) <= limit else out[:limit] + "..."
