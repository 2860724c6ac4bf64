"""The backup pipeline: select VMs, then read -> compress -> chunk -> encrypt+MAC -> outer tar -> sink.

Reading skips holes (inner.py), zstd compresses independent frames on a thread pool, encryption and MAC run in a small
thread pool (cryptography and hashlib release the GIL), and a writer thread feeds the sink, so all cores
work and dom0 memory stays bounded by a few chunks whatever the size of the backup.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from qubes_backup_protocol import names

from qubes_backup_dom0.backup.plan import (
    BackupOptions,
    BackupPlan,
    PlannedArchive,
    ProgressCallback,
    attached_volumes,
)
from qubes_backup_dom0.errors import BackupError, Cancelled
from qubes_backup_dom0.format import crypto, tarwriter
from qubes_backup_dom0.format.chunking import BufferPool, Chunker, ZstdPool
from qubes_backup_dom0.format.header import (
    Header,
    now_utc,
)
from qubes_backup_dom0.format.outer import OuterWriter, Sink

# ---------------------------------------------------------------------------------------------- streaming

DEFAULT_OPTIONS = BackupOptions()


class _Stop:
    pass


@dataclass
class _Sealer:
    """Encrypt-then-MAC of one chunk, on a worker thread, into reused buffers.

    The keys come from a future: the KDF runs while the first archive is read and compressed (only sealing
    needs them).  The plaintext buffer goes back to its pool as soon as it is encrypted; the sealed buffer
    goes back when the writer has written it."""

    keys: Future[crypto.Keys]
    plain: BufferPool
    sealed: BufferPool

    def __call__(self, name: str, plaintext: bytes | bytearray | memoryview) -> tuple[str, memoryview, bytes]:
        keys = self.keys.result()
        out = self.sealed.get() if len(plaintext) + crypto.IV_SIZE + 15 <= self.sealed.size else None
        sealed, mac = crypto.seal_member(keys, name, plaintext, out=out)
        self.plain.put(plaintext)
        return name, sealed, mac


def _stream_archive(
    archive: PlannedArchive,
    chunker: Chunker,
    report: Callable[[int], None],
    submit_chunk: Callable[[str, bytes | bytearray | memoryview], None],
) -> bytes:
    """Compress and cut one archive's tar stream into chunks (handed to ``submit_chunk``); the trailer."""
    index = 0
    stored = 0

    def submit(chunk: bytes | bytearray | memoryview) -> None:
        nonlocal index, stored
        submit_chunk(names.chunk_name(archive.member, index), chunk)
        index += 1
        stored += len(chunk)

    # into=chunker: volume data is read straight into the chunker's buffer (the chunk itself without
    # compression, the zstd block being filled).  Progress counts data bytes (not tar headers).
    for piece in tarwriter.write_archive(archive.files, reuse=True, counted=report, into=chunker):
        for chunk in chunker.feed(piece):
            submit(chunk)
    for chunk in chunker.finish():
        submit(chunk)
    if index == 0:  # cannot happen: a tar stream is never empty; refuse rather than write it
        raise BackupError(f"internal error: archive of {archive.vm} produced no data")
    return f"chunks={index}\nstored={stored}\n".encode()


def write_backup(
    plan: BackupPlan,
    passphrase: bytes,
    sink: Sink,
    options: BackupOptions = DEFAULT_OPTIONS,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    created: str | None = None,
) -> Header:
    """Stream the whole backup into ``sink`` (a file or the agent channel).  Returns the header written.

    ``created``: the creation time to record (``header.now_utc()`` format; default now), so that a caller
    can name the backup after the very instant its authenticated header states.

    Stops within moments when ``cancel`` is set or the calling thread gets KeyboardInterrupt (SIGINT, and
    SIGTERM in the CLI): queued chunks are dropped, not drained through a slow backup VM, and a sink with an
    ``interrupt()`` method (targets.AgentTarget) has its writer thread's wait broken at once.

    Threads: this one reads (zstd compresses on a pool of ``workers`` threads); ``workers`` threads encrypt and MAC;
    one writer thread writes the header and manifest (once the KDF, started first on its own thread, is
    done), then the sealed chunks in order.  Everything the sink gets is written by the writer thread.
    """
    kdf = crypto.KdfParams(crypto.random_bytes(16), options.kdf_n, options.kdf_r, options.kdf_p)
    header = Header(crypto.random_bytes(16), created or now_utc(), kdf, options.compression, options.chunk_size)
    header_bytes = header.render()  # checks our own parameters against the restore-side ceilings
    manifest = plan.manifest(header.backup_id.hex(), header.created).render()
    kdf_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdf")
    keys_future = kdf_thread.submit(crypto.keys_from_passphrase, passphrase, kdf, header.backup_id)
    kdf_thread.shutdown(wait=False)
    outer = OuterWriter(sink)
    plain_pool = BufferPool(options.chunk_size, keep=2 * options.workers + 3)
    sealed_pool = BufferPool(options.chunk_size + crypto.IV_SIZE + 15, keep=2 * options.workers + 3)
    sealer = _Sealer(keys_future, plain_pool, sealed_pool)

    def write_head() -> None:
        keys = keys_future.result()
        outer.add(names.HEADER, header_bytes)
        outer.add(names.mac_name(names.HEADER), crypto.mac_member(keys, names.HEADER, header_bytes))
        sealed = crypto.encrypt(keys, manifest)
        outer.add(names.MANIFEST, sealed)
        outer.add(names.mac_name(names.MANIFEST), crypto.mac_member(keys, names.MANIFEST, sealed))

    # In flight at once: `workers` chunks being sealed plus a couple queued for the writer.
    Item = Future[tuple[str, memoryview | bytes, bytes]] | _Stop
    pending: queue.Queue[Item] = queue.Queue(maxsize=options.workers + 1)
    writer_error: list[BaseException] = []
    stop = threading.Event()  # set when the backup fails or is interrupted: the writer writes nothing more

    def writer() -> None:
        try:
            write_head()
            while True:
                item = pending.get()
                if isinstance(item, _Stop):
                    return
                if stop.is_set():
                    continue  # failing: drop what is queued, never drain it into the sink
                name, data, mac = item.result()
                outer.add(name, data)
                sealed_pool.put(data)
                if mac:
                    outer.add(names.mac_name(name), mac)
        except BaseException as e:  # reported by the producer
            writer_error.append(e)
            while True:  # drain so the producer never blocks on a full queue
                item = pending.get()
                if isinstance(item, _Stop):
                    return

    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("backup cancelled")
        if writer_error:
            raise writer_error[0]

    def put(item: Item) -> None:
        """Queue for the writer; waits in short steps so that a cancel or a writer failure is seen."""
        while True:
            check()
            try:
                pending.put(item, timeout=_POLL)
                return
            except queue.Full:
                continue

    total = plan.data
    done = 0
    wthread = threading.Thread(target=writer, name="backup-writer", daemon=True)
    wthread.start()

    def report(n: int) -> None:
        nonlocal done
        check()
        done += n
        if progress is not None:
            progress(min(done, total), total)

    zstd_pool = ZstdPool(options.workers) if options.compression == "zstd" else None
    # Snapshots of a written archive are removed (an lvm process each) while the next archive is read.
    releaser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="release")
    released: list[Future[None]] = []

    def release(archive: PlannedArchive) -> None:
        released.append(releaser.submit(archive.release))

    try:
        with ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="seal") as pool:

            def seal(name: str, chunk: bytes | bytearray | memoryview) -> None:
                put(pool.submit(sealer, name, chunk))

            for archive in plan.archives:
                chunker = Chunker(options.compression, options.chunk_size, pool=plain_pool, zstd_pool=zstd_pool)
                try:
                    with attached_volumes(plan.system, archive, release):  # snapshots live while it is read
                        trailer = _stream_archive(archive, chunker, report, seal)
                finally:
                    chunker.close()
                tname = names.trailer_name(archive.member)
                put(pool.submit(_seal_trailer, keys_future, tname, trailer))
        put(_Stop())
        while wthread.is_alive():  # in steps: Ctrl-C, SIGTERM and cancel are seen while the VM reads
            wthread.join(_POLL)
            check()
    except BaseException:
        _stop_writer(stop, sink, pending, wthread)
        releaser.shutdown(wait=True)
        raise
    finally:
        if zstd_pool is not None:
            zstd_pool.close()
    releaser.shutdown(wait=True)
    for f in released:
        f.result()  # a snapshot that could not be removed fails the backup, as before
    if writer_error:
        raise writer_error[0]
    outer.close()
    if progress is not None:
        progress(total, total)
    return header


def _seal_trailer(keys: Future[crypto.Keys], name: str, trailer: bytes) -> tuple[str, bytes, bytes]:
    """A trailer is stored in the clear (FORMAT.md section 5), MACed like every member."""
    return name, trailer, crypto.mac_member(keys.result(), name, trailer)


_POLL = 0.1  # seconds between checks for cancel / writer failure while waiting on the writer
WRITER_GRACE = 5.0  # seconds a failing backup waits for its writer thread to notice (it is a daemon thread)


def _stop_writer(stop: threading.Event, sink: Sink, pending: queue.Queue[Any], wthread: threading.Thread) -> None:
    """The backup failed or was interrupted: the writer must stop now, not after draining the queue."""
    stop.set()
    interrupt = getattr(sink, "interrupt", None)
    if interrupt is not None:
        interrupt()  # breaks the writer's wait on a slow backup VM at once
    while True:
        try:
            pending.get_nowait()
        except queue.Empty:
            break
    with contextlib.suppress(queue.Full):  # only this thread puts, and the queue was just emptied
        pending.put_nowait(_Stop())
    wthread.join(WRITER_GRACE)
