"""Unpacking verified plaintext: decompress and extract each archive on one thread, beside the receiver.

The receiving thread (receive.py) hands every verified, decrypted chunk to the archive's ``ChunkFeed``;
the one ``Extraction`` thread decompresses and parses each archive with the strict inner-tar extractor
(inner.py), archive after archive, sending file entries where the archive's ``ArchiveTarget`` says: a
volume import of a VM being restored, a bounded in-memory buffer (firewall rules, notes), a staging
directory (dom0's home), or nowhere (verify-only: parsed, checked, dropped).  Memory is bounded by a few
reused plaintext buffers (``BufferPool``): the receiver blocks while the extractor holds them all.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qubes_backup_dom0.errors import BackupError, VerificationError
from qubes_backup_dom0.format import extractor
from qubes_backup_dom0.format import manifest as manifest_mod
from qubes_backup_dom0.format.chunking import decompressed_reader

FEED_DEPTH = 2  # decrypted chunks queued per archive
POOL_BUFFERS = 4  # plaintext buffers in flight: FEED_DEPTH queued + 1 being extracted + 1 being decrypted into
_POLL = 0.05  # how often a blocked thread looks whether the other side gave up


class Stopped(Exception):
    """The other thread of the restore failed or gave up: stop waiting."""


class BufferPool:
    """A few reused plaintext buffers (fresh chunk-sized buffers are expensive: every one is page-faulted in
    anew).  Also the bound on decrypted data in memory: the receiver takes one per chunk, the chunk feed
    hands it back once the extraction thread has consumed it."""

    def __init__(self, count: int, stop: threading.Event) -> None:
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(count):
            self._free.put(bytearray())
        self._stop = stop

    def get(self, size: int) -> bytearray:
        while True:
            if self._stop.is_set():
                raise Stopped
            try:
                buf = self._free.get(timeout=_POLL)
            except queue.Empty:
                continue
            return buf if len(buf) >= size else bytearray(size)

    def put(self, buf: object) -> None:
        if isinstance(buf, bytearray):
            self._free.put(buf)


class ChunkFeed:
    """A blocking reader over one archive's verified, decrypted chunks, consumed by the extraction thread.

    ``read`` returns memoryviews into the chunks (no copies; ``as_bytes`` for readers that need bytes); a
    chunk's buffer goes back to ``release`` when the reader asks for more than it holds, i.e. once the
    consumer is done with it (zstd's stream reader and the extractor never keep a piece across reads).
    """

    def __init__(
        self,
        depth: int = FEED_DEPTH,
        stop: threading.Event | None = None,
        release: Callable[[object], None] | None = None,
        as_bytes: bool = False,
    ) -> None:
        self._q: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=depth)
        self._buf = memoryview(b"")
        self._item: bytes | memoryview | None = None
        self._eof = False
        self._stop = stop or threading.Event()
        self._release = release
        self._as_bytes = as_bytes

    def put(self, data: bytes | memoryview | None) -> None:
        while True:
            if self._stop.is_set():
                raise Stopped
            try:
                self._q.put(data, timeout=_POLL)
                return
            except queue.Full:
                continue

    def _get(self) -> bytes | memoryview | None:
        while True:
            if self._stop.is_set():
                raise Stopped
            try:
                return self._q.get(timeout=_POLL)
            except queue.Empty:
                continue

    def _done_with_item(self) -> None:
        item, self._item = self._item, None
        if item is not None and self._release is not None and isinstance(item, memoryview):
            self._release(item.obj)

    def read(self, size: int = -1) -> bytes | memoryview:
        while not self._buf and not self._eof:
            self._done_with_item()
            item = self._get()
            if item is None:
                self._eof = True
            else:
                self._item = item
                self._buf = memoryview(item).cast("B")
        if size < 0 or size >= len(self._buf):
            out, self._buf = self._buf, memoryview(b"")
        else:
            out, self._buf = self._buf[:size], self._buf[size:]
        return bytes(out) if self._as_bytes else out

    def drain(self) -> None:
        """Unblock a producer after the consumer failed."""
        self._done_with_item()
        try:
            while True:
                item = self._q.get_nowait()
                if isinstance(item, memoryview) and self._release is not None:
                    self._release(item.obj)
        except queue.Empty:
            pass


@dataclass
class ArchiveTarget:
    """Where one archive's entries go: files under ``dest`` (None: nowhere), or the sink ``sinks`` picks
    for an entry; ``done`` runs on the extraction thread once the archive extracted completely."""

    dest: Path | None = None
    sinks: extractor.SinkChooser | None = None
    done: Callable[[], None] | None = None


class Extraction(threading.Thread):
    """The one extraction thread of a restore: decompresses and extracts the archives' verified plaintext,
    archive after archive, each from its own chunk feed, while the receiving thread already receives the
    next one.  The first error stops it (``error``, ``failed_archive``)."""

    def __init__(self, compression: str) -> None:
        super().__init__(name="restore-extract", daemon=True)
        self.compression = compression
        self.stop = threading.Event()  # set by the first error on either side
        self.pool = BufferPool(POOL_BUFFERS, self.stop)
        self._jobs: queue.Queue[tuple[ArchiveTarget, manifest_mod.ArchiveEntry, ChunkFeed] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.failed_archive: manifest_mod.ArchiveEntry | None = None
        # Entry data bytes extracted so far, all archives together (what the restore's progress counts:
        # the same unit as the manifest's data sizes).  Written by this thread only, read by the receiver.
        self.extracted = 0

    def start_archive(self, target: ArchiveTarget, archive: manifest_mod.ArchiveEntry) -> ChunkFeed:
        """The feed for the next archive's chunks (queued behind the archives still being extracted)."""
        feed = ChunkFeed(FEED_DEPTH, self.stop, self.pool.put, as_bytes=self.compression == "gzip")
        self._jobs.put((target, archive, feed))
        return feed

    def finish_input(self) -> None:
        self._jobs.put(None)

    def abort(self) -> None:
        self.stop.set()
        self._jobs.put(None)

    def run(self) -> None:
        while (job := self._jobs.get()) is not None and not self.stop.is_set():
            target, archive, feed = job
            try:
                self._extract(target, archive, feed)
                if target.done is not None:
                    target.done()
            except Stopped:
                return
            except BaseException as e:  # reported by the receiving thread
                self.error, self.failed_archive = e, archive
                self.stop.set()
                feed.drain()
                return

    def _extract(self, target: ArchiveTarget, archive: manifest_mod.ArchiveEntry, feed: ChunkFeed) -> None:
        if target.dest is not None:
            target.dest.mkdir(mode=0o700)
        ex = extractor.Extractor(target.dest, archive.files, sinks=target.sinks)
        base = self.extracted
        try:
            reader = decompressed_reader(self.compression, feed)
            while True:
                piece = reader.read(1 << 22)
                if not piece:
                    break
                ex.feed(piece)
                self.extracted = base + ex.data_done
            ex.finish()
            self.extracted = base + ex.data_done
        finally:
            ex.close()
        if feed.read(1):
            raise VerificationError(f"archive {archive.member}: data after the end of the archive")

    def failure(self) -> BackupError:
        """The extraction error as one line (it names the VM whose archive failed)."""
        err, archive = self.error, self.failed_archive
        if isinstance(err, BackupError):
            return err
        vm = archive.vm if archive is not None else "?"
        text = f"{type(err).__name__}: {err}" if err is not None else "extraction stopped"
        return VerificationError(f"VM {vm}: the archive could not be extracted: {text}")


class MemorySink:
    """A small file kept in memory (firewall rules, notes), bounded: the manifest says its size, and
    anything above ``limit`` is refused before a byte is buffered."""

    def __init__(self, path: str, size: int, limit: int, on_finish: Callable[[bytes], None] | None = None) -> None:
        if size > limit:
            raise VerificationError(f"{path}: {size} bytes, more than the {limit} this file may have")
        self.path = path
        self.data = bytearray(size)
        self.on_finish = on_finish  # gets the whole file once the entry is complete

    def write_at(self, offset: int, data: memoryview) -> None:
        self.data[offset : offset + len(data)] = data

    def finish(self, size: int) -> None:
        del self.data[size:]
        if self.on_finish is not None:
            self.on_finish(bytes(self.data))

    def abort(self) -> None:
        self.data = bytearray()
