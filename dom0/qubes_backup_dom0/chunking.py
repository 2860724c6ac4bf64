"""Compression and cutting into fixed-size chunks (docs/FORMAT.md section 7).

Each inner archive is compressed as one stream and cut into chunks of exactly ``chunk_size`` bytes (the
last one shorter).  zstd compresses on all cores (its worker threads run outside the GIL).
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator
from typing import Protocol

import zstandard

ZSTD_LEVEL = 1  # zstd -1: about 30% less CPU than level 3 for ~9% larger backups; dom0 CPU is the limit
GZIP_LEVEL = 6


class Chunker:
    """Feed plaintext pieces; get back compressed chunks of exactly ``chunk_size`` bytes."""

    def __init__(self, compression: str, chunk_size: int, threads: int | None = None) -> None:
        self.chunk_size = chunk_size
        self.compression = compression
        self._buf = bytearray(chunk_size if compression != "zstd" else 0)
        self._fill = 0
        self._zstd = None
        self._gzip = None
        if compression == "zstd":
            n = threads if threads is not None else (os.cpu_count() or 1)
            cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=n if n > 1 else 0)
            self._zstd = cctx.chunker(chunk_size=chunk_size)
        elif compression == "gzip":
            self._gzip = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        elif compression != "none":
            raise ValueError(f"unknown compression {compression}")

    def _cut(self, data: bytes | memoryview) -> Iterator[bytes | bytearray | memoryview]:
        """Cut into chunks, copying only what straddles a chunk boundary (into a preallocated buffer)."""
        view = memoryview(data)
        if not self._fill and len(view) >= self.chunk_size:
            # Fast path: whole chunks straight out of the input, no copy.
            whole = len(view) - len(view) % self.chunk_size
            for start in range(0, whole, self.chunk_size):
                yield view[start : start + self.chunk_size]
            view = view[whole:]
        while len(view):
            take = min(self.chunk_size - self._fill, len(view))
            self._buf[self._fill : self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == self.chunk_size:
                out, self._buf, self._fill = self._buf, bytearray(self.chunk_size), 0
                yield out

    def feed(self, data: bytes | memoryview) -> Iterator[bytes | bytearray | memoryview]:
        if self._zstd is not None:
            yield from self._zstd.compress(data)
        elif self._gzip is not None:
            yield from self._cut(self._gzip.compress(data))
        else:
            yield from self._cut(data)

    def finish(self) -> Iterator[bytes | bytearray | memoryview]:
        if self._zstd is not None:
            yield from self._zstd.finish()
            return
        if self._gzip is not None:
            yield from self._cut(self._gzip.flush())
        if self._fill:
            out, self._fill = memoryview(self._buf)[: self._fill], 0
            yield out


class RawReader(Protocol):
    def read(self, size: int = -1) -> bytes | memoryview: ...


def decompressed_reader(compression: str, raw: RawReader) -> RawReader:
    """A pull reader over a verified compressed stream; each ``read(n)`` returns at most n bytes.

    Pulling (instead of pushing whole chunks through a decompressor) bounds memory even for a chunk that
    decompresses a thousandfold.
    """
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(  # type: ignore[return-value]
            raw, read_size=1 << 20, read_across_frames=True  # type: ignore[arg-type]
        )
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[arg-type, call-overload]
    if compression == "none":
        return raw
    raise ValueError(f"unknown compression {compression}")
