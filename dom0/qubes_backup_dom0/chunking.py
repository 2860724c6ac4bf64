"""Compression and cutting into fixed-size chunks (docs/FORMAT.md section 7).

Each inner archive is compressed as one stream and cut into chunks of exactly ``chunk_size`` bytes (the
last one shorter).  zstd compresses on all cores (its worker threads run outside the GIL).
"""

from __future__ import annotations

import collections
import gzip
import os
import threading
import zlib
from collections.abc import Iterator
from typing import Protocol

import zstandard

ZSTD_LEVEL = 1  # zstd -1: about 30% less CPU than level 3 for ~9% larger backups; dom0 CPU is the limit
GZIP_LEVEL = 6


def zstd_compressor(threads: int | None = None) -> zstandard.ZstdCompressor:
    """One compressor for the whole backup (its worker threads are started once, not per archive); each
    archive is still its own zstd frame (a ``chunker`` per archive, finished at its end)."""
    n = threads if threads is not None else (os.cpu_count() or 1)
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=n if n > 1 else 0)


class BufferPool:
    """Reused buffers of one size (chunk plaintexts, sealed chunks): a fresh 16 MiB bytearray is zero-filled
    and page-faulted in on every allocation (and glibc may hand its pages back to the kernel when it is
    freed), which cost more CPU than a memcpy of the same size.  ``get`` and ``put`` may be called from any
    thread.  At most ``keep`` idle buffers are kept: the
    pipeline's bounded queues bound how many are in use."""

    def __init__(self, size: int, keep: int = 8) -> None:
        self.size = size
        self.keep = keep
        self._free: collections.deque[bytearray] = collections.deque()
        self._lock = threading.Lock()

    def get(self) -> bytearray:
        try:
            return self._free.pop()
        except IndexError:
            return bytearray(self.size)

    def put(self, buf: object) -> None:
        """Give back a buffer (or a memoryview of one) once nothing reads or writes it any more; anything but
        a bytearray of the pool's size (zstd's own ``bytes`` chunks, a trailer) is ignored."""
        obj = buf.obj if isinstance(buf, memoryview) else buf
        if not isinstance(obj, bytearray) or len(obj) != self.size:
            return
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(obj)


class Chunker:
    """Feed plaintext pieces; get back compressed chunks of exactly ``chunk_size`` bytes.

    Without compression (and for gzip) the chunks are views of buffers from ``pool``: the consumer gives
    each back (``pool.put``) once it is done with it.  zstd's chunks are its own fresh ``bytes``.
    """

    def __init__(
        self,
        compression: str,
        chunk_size: int,
        threads: int | None = None,
        pool: BufferPool | None = None,
        zstd_ctx: zstandard.ZstdCompressor | None = None,
    ) -> None:
        self.chunk_size = chunk_size
        self.compression = compression
        self.pool = pool if pool is not None else BufferPool(chunk_size, keep=0)
        self._buf: bytearray | None = None
        self._fill = 0
        self._zstd = None
        self._gzip = None
        if compression == "zstd":
            cctx = zstd_ctx if zstd_ctx is not None else zstd_compressor(threads)
            self._zstd = cctx.chunker(chunk_size=chunk_size)
        elif compression == "gzip":
            self._gzip = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        elif compression != "none":
            raise ValueError(f"unknown compression {compression}")

    def _cut(self, data: bytes | memoryview) -> Iterator[memoryview]:
        """Copy into pooled chunk buffers (``data`` may be a borrowed view, reused after this call)."""
        view = memoryview(data).cast("B")
        while len(view):
            if self._buf is None:
                self._buf = self.pool.get()
            take = min(self.chunk_size - self._fill, len(view))
            self._buf[self._fill : self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == self.chunk_size:
                out, self._buf, self._fill = memoryview(self._buf), None, 0
                yield out

    def feed(self, data: bytes | memoryview) -> Iterator[bytes | bytearray | memoryview]:
        """Chunks completed by ``data``; ``data`` is not kept (it may be a reused buffer)."""
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
        if self._fill and self._buf is not None:
            out, self._buf, self._fill = memoryview(self._buf)[: self._fill], None, 0
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
