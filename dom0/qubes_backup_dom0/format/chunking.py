"""Compression and cutting into fixed-size chunks (docs/FORMAT.md section 7).

Each inner archive is compressed as one stream and cut into chunks of exactly ``chunk_size`` bytes (the
last one shorter).  zstd compresses fixed plaintext blocks as independent frames, one-shot, on a pool of
threads (python-zstandard releases the GIL), and joins the frames in order: one zstd stream of several
frames, which ``zstd -dc`` and our reader decode as a whole.
"""

from __future__ import annotations

import collections
import gzip
import os
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import zstandard

ZSTD_LEVEL = 1  # zstd -1: about 30% less CPU than level 3 for ~9% larger backups; dom0 CPU is the limit
GZIP_LEVEL = 6
ZSTD_BLOCK = 4 << 20  # plaintext per zstd frame: big enough that the ratio is that of one stream (+0.1%)
SCRATCH_SIZE = 4 << 20  # gzip's read buffer (gzip compresses each read at once)


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
        a bytearray of the pool's size (a trailer) is ignored."""
        obj = buf.obj if isinstance(buf, memoryview) else buf
        if not isinstance(obj, bytearray) or len(obj) != self.size:
            return
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(obj)


class ZstdPool:
    """Threads that compress zstd blocks, one ``ZstdCompressor`` each; shared by all archives of a backup
    (started once).  ``inflight`` bounds the blocks submitted and not yet taken per archive."""

    def __init__(self, threads: int | None = None, block: int = ZSTD_BLOCK) -> None:
        self.threads = max(1, threads if threads is not None else (os.cpu_count() or 1))
        self.block = block
        self.inflight = self.threads + 1  # every thread busy and one frame ready to take
        self.blocks = BufferPool(block, keep=self.inflight + 1)
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="zstd")

    def _compress(self, data: memoryview) -> bytes:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        return cctx.compress(data)

    def submit(self, data: memoryview) -> Future[bytes]:
        return self._executor.submit(self._compress, data)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ZstdPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Chunker:
    """Feed plaintext pieces; get back compressed chunks of exactly ``chunk_size`` bytes.

    The chunks are views of buffers from ``pool``: the consumer gives each back (``pool.put``) once it is
    done with it.  ``space()`` lends the free tail of the buffer the next bytes go to (the current chunk
    without compression, the current zstd block): a reader may read straight into it and then ``feed``
    exactly the view of what it read (no copy).  Anything else fed is copied (it may be a reused buffer).
    """

    def __init__(
        self,
        compression: str,
        chunk_size: int,
        threads: int | None = None,
        pool: BufferPool | None = None,
        zstd_pool: ZstdPool | None = None,
    ) -> None:
        self.chunk_size = chunk_size
        self.compression = compression
        self.pool = pool if pool is not None else BufferPool(chunk_size, keep=0)
        self._buf: bytearray | None = None  # the chunk being filled
        self._fill = 0
        self._lent: bytearray | None = None  # the buffer whose tail space() lent
        self._zstd: ZstdPool | None = None
        self._own_zstd = False
        self._block: bytearray | None = None  # zstd: the plaintext block being filled
        self._bfill = 0
        self._frames: collections.deque[tuple[Future[bytes], bytearray]] = collections.deque()
        self._gzip = None
        self._scratch: bytearray | None = None
        if compression == "zstd":
            self._zstd = zstd_pool
            if self._zstd is None:
                self._zstd, self._own_zstd = ZstdPool(threads), True
        elif compression == "gzip":
            self._gzip = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        elif compression != "none":
            raise ValueError(f"unknown compression {compression}")

    # --------------------------------------------------------------------------- reading in place

    def space(self) -> memoryview:
        """A writable, non-empty view where the next plaintext bytes are to go; valid until the next call."""
        if self._zstd is not None:
            if self._block is None:
                self._block, self._bfill = self._zstd.blocks.get(), 0
            self._lent = self._block
            return memoryview(self._block)[self._bfill :]
        if self._gzip is not None:
            if self._scratch is None:
                self._scratch = bytearray(SCRATCH_SIZE)
            self._lent = self._scratch
            return memoryview(self._scratch)
        if self._buf is None:
            self._buf = self.pool.get()
        self._lent = self._buf
        return memoryview(self._buf)[self._fill :]

    def _in_place(self, data: bytes | memoryview) -> bool:
        lent, self._lent = self._lent, None
        return lent is not None and isinstance(data, memoryview) and data.obj is lent

    # --------------------------------------------------------------------------- cutting

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

    # --------------------------------------------------------------------------- zstd frames

    def _take_frame(self) -> Iterator[memoryview]:
        fut, block = self._frames.popleft()
        frame = fut.result()
        assert self._zstd is not None
        self._zstd.blocks.put(block)
        yield from self._cut(frame)

    def _submit_block(self) -> Iterator[memoryview]:
        assert self._zstd is not None and self._block is not None
        block, n = self._block, self._bfill
        self._block, self._bfill = None, 0
        self._frames.append((self._zstd.submit(memoryview(block)[:n]), block))
        while self._frames and (len(self._frames) > self._zstd.inflight or self._frames[0][0].done()):
            yield from self._take_frame()  # in order; waits only when too many are in flight

    def _feed_zstd(self, data: bytes | memoryview, in_place: bool) -> Iterator[memoryview]:
        assert self._zstd is not None
        if in_place:
            self._bfill += len(data)
            if self._bfill == len(self._block or b""):
                yield from self._submit_block()
            return
        view = memoryview(data).cast("B")
        while len(view):
            if self._block is None:
                self._block, self._bfill = self._zstd.blocks.get(), 0
            take = min(len(self._block) - self._bfill, len(view))
            self._block[self._bfill : self._bfill + take] = view[:take]
            self._bfill += take
            view = view[take:]
            if self._bfill == len(self._block):
                yield from self._submit_block()

    # --------------------------------------------------------------------------- interface

    def feed(self, data: bytes | memoryview) -> Iterator[memoryview]:
        """Chunks completed by ``data``; ``data`` is not kept (it may be a reused buffer)."""
        in_place = self._in_place(data)
        if self._zstd is not None:
            yield from self._feed_zstd(data, in_place)
        elif self._gzip is not None:
            yield from self._cut(self._gzip.compress(data))
        elif in_place:
            self._fill += len(data)
            if self._fill == self.chunk_size:
                assert self._buf is not None
                out, self._buf, self._fill = memoryview(self._buf), None, 0
                yield out
        else:
            yield from self._cut(data)

    def finish(self) -> Iterator[memoryview]:
        self._lent = None
        try:
            if self._zstd is not None:
                if self._bfill or not self._frames:  # an empty stream is still one (empty) frame
                    if self._block is None:
                        self._block, self._bfill = self._zstd.blocks.get(), 0
                    yield from self._submit_block()
                while self._frames:
                    yield from self._take_frame()
            if self._gzip is not None:
                yield from self._cut(self._gzip.flush())
            if self._fill and self._buf is not None:
                out, self._buf, self._fill = memoryview(self._buf)[: self._fill], None, 0
                yield out
        finally:
            self.close()

    def close(self) -> None:
        """Stop what runs for this chunker (its own zstd threads; blocks of a shared pool are dropped)."""
        if self._own_zstd and self._zstd is not None:
            self._zstd.close()
            self._own_zstd = False
        self._frames.clear()


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
