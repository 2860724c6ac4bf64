"""Writer of the outer tar stream: plain ustar members, opaque names (docs/FORMAT.md section 1).

dom0 only ever *writes* tar; it never parses one that came back from a VM.
"""

from __future__ import annotations

from typing import Protocol

BLOCK = 512


class Sink(Protocol):
    def write(self, data: bytes | memoryview) -> None: ...


def member_header(name: str, size: int) -> bytes:
    """The ustar header of member ``name`` (FORMAT.md section 1: mode 0600, owner 0, time 0, no user or group
    names), built directly: tarfile's TarInfo took longer than sealing a small object."""
    raw = name.encode("ascii")
    if len(raw) > 100 or not 0 <= size < 8**11:
        raise ValueError(f"tar member name or size out of range: {name!r}, {size}")
    h = bytearray(BLOCK)
    h[0 : len(raw)] = raw
    h[100:157] = b"0000600\x000000000\x000000000\x00%011o\x0000000000000\x00        0" % size
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


def padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


class OuterWriter:
    """Appends members to a sink; ``close`` writes the end-of-archive blocks."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.bytes_written = 0

    def add(self, name: str, data: bytes | memoryview) -> None:
        size = len(data)
        head = member_header(name, size)
        self.sink.write(head)
        if size:
            self.sink.write(data)
        pad = padding(size)
        if pad:
            self.sink.write(pad)
        self.bytes_written += len(head) + size + len(pad)

    def close(self) -> None:
        self.sink.write(b"\0" * (2 * BLOCK))
        self.bytes_written += 2 * BLOCK
