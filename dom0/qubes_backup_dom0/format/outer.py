"""Writer of the outer tar stream: plain ustar members, opaque names (docs/FORMAT.md section 1).

dom0 only ever *writes* tar; it never parses one that came back from a VM.
"""

from __future__ import annotations

import tarfile
from typing import Protocol

BLOCK = 512


class Sink(Protocol):
    def write(self, data: bytes | memoryview) -> None: ...


def member_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii", errors="strict")


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
