"""The restore state machine: the one place where bytes from the backup VM enter dom0.

States, in order (any failure jumps to FAILED, which removes the staging area and leaves dom0 untouched)::

    CONNECTED -> HEADER (parse <= 4 KiB, check KDF ceilings, run KDF, verify header MAC)
              -> MANIFEST (<= 16 MiB, verify MAC, then decrypt, then parse XML)
              -> PLANNED (show the table; tell the agent which archives to send)
              -> RECEIVING (per chunk: bounded read, verify MAC, then decrypt -> decompress -> extract)
              -> VERIFIED (END seen, every wanted archive complete)
              -> COMMITTED (move VM directories into place, then write qubes.xml atomically)

Nothing is decrypted, decompressed or parsed before its MAC verified; the only thing read before that is
the frame layer (qubes_backup_protocol.frames) with lengths bounded per state.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import queue
import re
import shlex
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from qubes_backup_protocol import names
from qubes_backup_protocol.frames import (
    MAX_ERROR_LEN,
    MAX_LOCATION_LEN,
    Frame,
    FrameType,
    ProtocolError,
    safe_text,
)

from . import crypto, inner
from . import header as header_mod
from . import manifest as manifest_mod
from .chunking import decompressed_reader
from .errors import BackupError, Cancelled, UsageError, VerificationError
from .qubesxml import FILE_DRIVERS, Collection, Domain
from .system import System
from .transport import Channel, Transport, make_transport

ProgressCallback = Callable[[int, int], None]
STAGING_PREFIX = ".qubes-backup-restore-"
JOURNAL = "moved-into-place"
MAX_TRAILER = 256


class State(enum.Enum):
    CONNECTED = "connected"
    HEADER = "header verified"
    MANIFEST = "manifest verified"
    PLANNED = "planned"
    RECEIVING = "receiving"
    VERIFIED = "verified"
    COMMITTED = "committed"
    FAILED = "failed"


@dataclass(frozen=True)
class RestoreOptions:
    vms: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    verify_only: bool = False
    skip_broken: bool = False
    ignore_missing: bool = False
    skip_conflicting: bool = False
    rename_conflicting: bool = False
    skip_dom0_home: bool = False
    backup_id: str | None = None  # 32 lowercase hex digits: refuse any other backup (enforced by the restore)


@dataclass
class VmAction:
    """What will happen to one VM of the backup; ``restore`` False means skipped (``reason`` says why)."""

    name: str
    klass: str
    template: str | None
    netvm: str | None
    size: int
    archive: manifest_mod.ArchiveEntry | None
    restore: bool = True
    new_name: str | None = None
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    replace_refs: dict[str, str | None] = field(default_factory=dict)  # property -> new value (None: default)

    @property
    def target_name(self) -> str:
        return self.new_name or self.name

    @property
    def action(self) -> str:
        if not self.restore:
            return f"skip: {self.reason}"
        text = f"restore as {self.new_name}" if self.new_name else "restore"
        return "; ".join([text, *self.notes])


@dataclass
class RestorePlan:
    header: header_mod.Header
    manifest: manifest_mod.Manifest
    backup: Collection
    vms: list[VmAction]
    home: manifest_mod.ArchiveEntry | None  # dom0 home, when it will be restored
    home_target: str | None
    errors: list[str]

    @property
    def wanted(self) -> list[manifest_mod.ArchiveEntry]:
        wanted = [v.archive for v in self.vms if v.restore and v.archive is not None]
        if self.home is not None:
            wanted.insert(0, self.home)
        return wanted

    @property
    def data(self) -> int:
        return sum(a.data for a in self.wanted)


# ------------------------------------------------------------------------------------------------ helpers

def _member_limits(max_data: int) -> dict[FrameType, tuple[int, int]]:
    return {
        FrameType.MEMBER: (names.MAX_NAME_LEN, max_data),
        FrameType.ERROR: (0, MAX_ERROR_LEN),
        FrameType.END: (0, 0),
    }


FEED_DEPTH = 2  # decrypted chunks queued per archive
POOL_BUFFERS = 4  # plaintext buffers in flight: FEED_DEPTH queued + 1 being extracted + 1 being decrypted into
_POLL = 0.05  # how often a blocked thread looks whether the other side gave up


class _Stopped(Exception):
    """The other thread of the restore failed or gave up: stop waiting."""


class _BufferPool:
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
                raise _Stopped
            try:
                buf = self._free.get(timeout=_POLL)
            except queue.Empty:
                continue
            return buf if len(buf) >= size else bytearray(size)

    def put(self, buf: object) -> None:
        if isinstance(buf, bytearray):
            self._free.put(buf)


class _ChunkFeed:
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
                raise _Stopped
            try:
                self._q.put(data, timeout=_POLL)
                return
            except queue.Full:
                continue

    def _get(self) -> bytes | memoryview | None:
        while True:
            if self._stop.is_set():
                raise _Stopped
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


class _Syncer(threading.Thread):
    """fsyncs each archive's restored files (and their directories) as soon as its extraction finished,
    while the next archive is received; the commit waits for it before anything is registered."""

    def __init__(self) -> None:
        super().__init__(name="restore-fsync", daemon=True)
        self._q: queue.Queue[Path | None] = queue.Queue()
        self._halt = threading.Event()
        self.error: OSError | None = None

    def add(self, tree: Path) -> None:
        self._q.put(tree)

    def finish(self) -> None:
        """No more trees; join() then waits for the last fsync."""
        self._q.put(None)

    def abort(self) -> None:
        self._halt.set()
        self._q.put(None)

    def run(self) -> None:
        while (tree := self._q.get()) is not None:
            if self.error is None and not self._halt.is_set():
                try:
                    _fsync_tree(tree, self._halt)
                except OSError as e:
                    self.error = e


def _fsync_fd_of(path: str | os.PathLike[str], flags: int) -> None:
    fd = os.open(path, flags | os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(tree: Path, stop: threading.Event | None = None) -> None:
    """fsync every regular file and directory under ``tree`` (symlinks are made durable by their directory).

    Walks with directory fds (no path-length limit, no symlink followed) and fails on any unreadable
    directory instead of silently skipping it: a restore is durable or it fails.
    """

    def fail(e: OSError) -> None:
        raise e

    for _dirpath, _dirnames, filenames, dirfd in os.fwalk(tree, onerror=fail):
        for name in filenames:
            if stop is not None and stop.is_set():
                return
            if stat.S_ISREG(os.lstat(name, dir_fd=dirfd).st_mode):
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        os.fsync(dirfd)


class _Extraction(threading.Thread):
    """The one extraction thread of a restore: decompresses and extracts the archives' verified plaintext
    into the staging area, archive after archive, each from its own chunk feed, while the receiving thread
    already receives the next one.  The first error stops it (``error``, ``failed_archive``)."""

    def __init__(self, compression: str, syncer: _Syncer | None) -> None:
        super().__init__(name="restore-extract", daemon=True)
        self.compression = compression
        self.syncer = syncer
        self.stop = threading.Event()  # set by the first error on either side
        self.pool = _BufferPool(POOL_BUFFERS, self.stop)
        self._jobs: queue.Queue[tuple[Path | None, manifest_mod.ArchiveEntry, _ChunkFeed] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.failed_archive: manifest_mod.ArchiveEntry | None = None

    def start_archive(self, dest: Path | None, archive: manifest_mod.ArchiveEntry) -> _ChunkFeed:
        """The feed for the next archive's chunks (queued behind the archives still being extracted)."""
        feed = _ChunkFeed(FEED_DEPTH, self.stop, self.pool.put, as_bytes=self.compression == "gzip")
        self._jobs.put((dest, archive, feed))
        return feed

    def finish_input(self) -> None:
        self._jobs.put(None)

    def abort(self) -> None:
        self.stop.set()
        self._jobs.put(None)

    def run(self) -> None:
        while (job := self._jobs.get()) is not None and not self.stop.is_set():
            dest, archive, feed = job
            try:
                self._extract(dest, archive, feed)
            except _Stopped:
                return
            except BaseException as e:  # reported by the receiving thread
                self.error, self.failed_archive = e, archive
                self.stop.set()
                feed.drain()
                return
            if dest is not None and self.syncer is not None:
                self.syncer.add(dest)

    def _extract(self, dest: Path | None, archive: manifest_mod.ArchiveEntry, feed: _ChunkFeed) -> None:
        if dest is not None:
            dest.mkdir(mode=0o700)
        extractor = inner.Extractor(dest, archive.files)
        try:
            reader = decompressed_reader(self.compression, feed)
            while True:
                piece = reader.read(1 << 22)
                if not piece:
                    break
                extractor.feed(piece)
            extractor.finish()
        finally:
            extractor.close()
        if feed.read(1):
            raise VerificationError(f"archive {archive.member}: data after the end of the archive")


def _err_text(e: BaseException) -> str:
    return str(e) if isinstance(e, BackupError) else f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------- the machine

class Restore:
    """A restore, driven step by step by the CLI or a GUI.

    ``open()`` connects and verifies header and manifest, ``plan()`` decides per VM, ``run()`` receives,
    verifies and commits.  ``cancel()`` may be called from another thread; a cancelled or failed restore
    leaves dom0 as it was.
    """

    def __init__(
        self,
        system: System,
        location: str,
        passphrase: bytes,
        source_vm: str | None = None,
        options: RestoreOptions = RestoreOptions(),
        progress: ProgressCallback | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.system = system
        self.location = location
        self.passphrase = passphrase
        self.source_vm = source_vm
        self.options = options
        self.progress = progress
        self.transport = transport
        self.state = State.CONNECTED
        self.channel: Channel | None = None
        self.header: header_mod.Header | None = None
        self.keys: crypto.Keys | None = None
        self.manifest: manifest_mod.Manifest | None = None
        self.restore_plan: RestorePlan | None = None
        self.staging: Path | None = None
        self._cancel = threading.Event()
        self.restored: list[str] = []
        self.home_restored_to: Path | None = None
        self.confined = True  # False: the process reading the backup's tar runs without a sandbox
        self._worker: _Extraction | None = None
        self._syncer: _Syncer | None = None
        self._sealed = bytearray()  # reused for every chunk frame (read into, verified, decrypted out of)

    # -- connection ----------------------------------------------------------------------------------

    def _connect(self) -> Channel:
        if len(self.location.encode()) > MAX_LOCATION_LEN or "\n" in self.location or "\0" in self.location:
            raise UsageError("backup location is too long or contains a newline")
        if self.source_vm:
            transport = self.transport or make_transport(self.system)
            self.confined = getattr(transport, "confined", True)
            channel = Channel(transport.start("qubes.Restore", self.source_vm))
            channel.send(FrameType.LOCATION, "", self.location.encode())
        else:
            # A backup file in dom0 is just as untrusted: a confined agent process reads the tar, dom0
            # still only sees frames.
            path = self.system.dom0_path(self.location)
            if not path.is_file():
                raise UsageError(f"backup file {self.location} does not exist in dom0")
            from .transport import LocalFileTransport

            transport = self.transport or LocalFileTransport(path.parent)
            self.confined = getattr(transport, "confined", True)
            channel = Channel(transport.start("qubes.Restore", "dom0"))
            channel.send(FrameType.LOCATION, "", shlex.quote("/" + path.name).encode())  # one word, spaces too
        return channel

    def _recv(self, max_data: int, into: Callable[[FrameType, int], memoryview | None] | None = None) -> Frame:
        """The next frame: a MEMBER within ``max_data``, an END, or the agent's error (raised)."""
        assert self.channel is not None
        if self._cancel.is_set():
            raise Cancelled("restore cancelled")
        try:
            frame = self.channel.recv(_member_limits(max_data), names.is_member_name, into)
        except (ProtocolError, BackupError, OSError) as e:
            if self._cancel.is_set():  # the agent was killed by cancel(): that is why the stream broke
                raise Cancelled("restore cancelled") from None
            if isinstance(e, ProtocolError):
                raise VerificationError(f"backup VM sent a malformed stream: {e}") from None
            raise
        if self._cancel.is_set():
            raise Cancelled("restore cancelled")
        if frame is None:
            raise VerificationError("the backup ends too early (truncated, or the backup VM stopped)")
        if frame.type == FrameType.ERROR:
            raise BackupError(f"backup VM reports: {safe_text(frame.data)}")
        return frame

    def _expect(self, name: str, max_data: int) -> bytes:
        frame = self._recv(max_data)
        if frame.type != FrameType.MEMBER or frame.name != name:
            got = frame.name if frame.type == FrameType.MEMBER else frame.type.name
            raise VerificationError(f"backup is damaged or tampered with: expected {name}, got {safe_text(got)}")
        return bytes(frame.data)  # no copy: without ``into`` frame data is already bytes

    # -- header and manifest -------------------------------------------------------------------------

    def open(self) -> manifest_mod.Manifest:
        """Connect, verify the header and the manifest; returns the manifest."""
        try:
            # An interrupted earlier restore may have left staging (and unregistered files moved into place):
            # undo it first, so that it is neither restored over nor mistaken for existing VMs.
            cleanup_stale_staging(self.system)
            self.channel = self._connect()
            raw_header = self._expect(names.HEADER, header_mod.MAX_HEADER_SIZE)
            hdr = header_mod.parse(raw_header)  # strict grammar and ceilings, before the KDF
            keys = crypto.keys_from_passphrase(self.passphrase, hdr.kdf, hdr.backup_id)
            mac = self._expect(names.mac_name(names.HEADER), crypto.MAC_HEX_SIZE)
            if not crypto.verify_member(keys, names.HEADER, raw_header, mac):
                raise VerificationError("wrong passphrase, or the backup header was tampered with")
            self.header, self.keys = hdr, keys
            self.state = State.HEADER
            sealed = self._expect(names.MANIFEST, manifest_mod.MAX_MANIFEST_SIZE + crypto.IV_SIZE)
            mac = self._expect(names.mac_name(names.MANIFEST), crypto.MAC_HEX_SIZE)
            if not crypto.verify_member(keys, names.MANIFEST, sealed, mac):
                raise VerificationError("the backup manifest failed verification (tampered with or damaged)")
            self.manifest = manifest_mod.parse(bytes(crypto.decrypt(keys, sealed)))  # bytes already: no copy
            if self.manifest.backup_id != hdr.backup_id.hex():
                raise VerificationError("the manifest belongs to another backup")
            self.state = State.MANIFEST
            return self.manifest
        except BaseException:
            self._fail()
            raise

    # -- planning ------------------------------------------------------------------------------------

    def plan(self) -> RestorePlan:
        assert self.manifest is not None and self.header is not None
        try:
            self.restore_plan = plan_restore(self.system, self.header, self.manifest, self.options)
            self.state = State.PLANNED
            return self.restore_plan
        except BaseException:
            self._fail()
            raise

    # -- receiving -----------------------------------------------------------------------------------

    def run(self) -> None:
        """Receive and verify everything planned, then commit (or, with verify_only, write nothing)."""
        plan = self.restore_plan
        assert plan is not None and self.channel is not None and self.header is not None
        try:
            if plan.errors:
                raise BackupError(plan.errors[0])
            for archive in plan.wanted:
                self.channel.send(FrameType.WANT, archive.member)
            self.channel.send(FrameType.WANT_END)
            self.channel.close_input()
            if not self.options.verify_only:
                self.staging = _make_staging(self.system)
                self._syncer = _Syncer()
                self._syncer.start()
            self._worker = _Extraction(self.header.compression, self._syncer)
            self._worker.start()
            self.state = State.RECEIVING
            total, done = plan.data, 0
            for archive in plan.wanted:
                done = self._receive_archive(archive, done, total)
            self._worker.finish_input()
            frame = self._recv(0)
            if frame.type != FrameType.END:
                raise VerificationError(f"backup has unexpected extra member {safe_text(frame.name)}")
            # END is the last thing the agent may send: anything after it (a second END, a member) means the
            # stream is not what a well-behaved agent produces, so it is refused like any other tampering.
            if self.channel.read(1):
                raise VerificationError("backup VM sent data after the end of the backup")
            self.channel.wait()
            self._worker.join()  # the last archive(s) may still be extracting
            if self._worker.error is not None:
                raise self._worker_failure()
            self.state = State.VERIFIED
            if self.options.verify_only:
                self.state = State.COMMITTED
                return
            with _collection_lock(self.system):
                self._commit(plan)
            self.state = State.COMMITTED
        except BaseException:
            self._fail()
            raise
        finally:
            if self.channel is not None:
                self.channel.abort()

    def _sealed_buffer(self, ftype: FrameType, size: int) -> memoryview | None:
        """Where a chunk frame's data is read to (called only after its length passed the limit)."""
        if ftype != FrameType.MEMBER:
            return None
        if len(self._sealed) < size:
            self._sealed = bytearray(size)
        return memoryview(self._sealed)[:size]

    def _worker_failure(self) -> BackupError:
        worker = self._worker
        assert worker is not None
        err, archive = worker.error, worker.failed_archive
        if isinstance(err, BackupError):
            return err
        vm = archive.vm if archive is not None else "?"
        text = _err_text(err) if err is not None else "extraction stopped"
        return VerificationError(f"VM {vm}: the archive could not be extracted: {text}")

    def _receive_archive(self, archive: manifest_mod.ArchiveEntry, done: int, total: int) -> int:
        """Receive and verify one archive; its plaintext goes to the extraction thread, which may still be
        extracting it (or an earlier one) when this returns."""
        assert self.header is not None and self.keys is not None and self._worker is not None
        keys, chunk_size, worker = self.keys, self.header.chunk_size, self._worker
        if worker.error is not None:
            raise self._worker_failure()
        dest = None if self.staging is None else self.staging / archive.member
        feed = worker.start_archive(dest, archive)
        index = 0
        stored = 0
        last_len = chunk_size
        try:
            while True:
                expected_chunk = names.chunk_name(archive.member, index) if index < names.MAX_CHUNKS else None
                trailer = names.trailer_name(archive.member)
                # Read straight into the reused buffer: the frame layer checked the length first.
                frame = self._recv(chunk_size + crypto.IV_SIZE, self._sealed_buffer)
                if frame.type != FrameType.MEMBER or frame.name not in (expected_chunk, trailer):
                    got = frame.name if frame.type == FrameType.MEMBER else frame.type.name
                    raise VerificationError(
                        f"backup is damaged or tampered with: VM {archive.vm}: expected "
                        f"{expected_chunk} or {trailer}, got {safe_text(got)}"
                    )
                mac = self._expect(names.mac_name(frame.name), crypto.MAC_HEX_SIZE)
                if not crypto.verify_member(keys, frame.name, frame.data, mac):
                    raise VerificationError(
                        f"backup is damaged or tampered with: {frame.name} (VM {archive.vm}) failed verification"
                    )
                # Verified. Only now is anything of it interpreted.
                if frame.name == trailer:
                    count, total_stored = _parse_trailer(bytes(frame.data), archive)
                    if count != index or total_stored != stored or index == 0:
                        raise VerificationError(
                            f"backup is damaged or tampered with: VM {archive.vm} has {index} chunk(s), "
                            f"its trailer says {count}"
                        )
                    break
                if last_len != chunk_size:
                    raise VerificationError(f"backup is damaged: VM {archive.vm}: short chunk before the last")
                # A pooled buffer (blocks while the extraction thread holds them all: the memory bound).
                out = worker.pool.get(len(frame.data) - crypto.IV_SIZE + 15)
                plain = crypto.decrypt(keys, frame.data, out=out)
                if not plain:
                    raise VerificationError(f"backup is damaged: VM {archive.vm}: empty chunk")
                last_len = len(plain)
                stored += last_len
                index += 1
                feed.put(plain)
                if worker.error is not None:
                    raise self._worker_failure()
                if self.progress is not None:  # compressed bytes against data bytes: an estimate
                    self.progress(min(done + min(stored, archive.data), total), total)
            feed.put(None)
        except _Stopped:  # the extraction thread failed while we waited for it
            raise self._worker_failure() from None
        return done + archive.data

    def _stop_threads(self) -> None:
        """After a failure: stop extracting and syncing, and wait, so nothing writes into staging any more."""
        if self._worker is not None:
            self._worker.abort()
            if self._worker.is_alive() and self._worker is not threading.current_thread():
                self._worker.join()
        if self._syncer is not None:
            self._syncer.abort()
            if self._syncer.is_alive():
                self._syncer.join()
        self._syncer = None

    def _wait_durable(self) -> None:
        """Every restored file and directory in staging is on disk (the syncer's work)."""
        syncer, self._syncer = self._syncer, None
        if syncer is None:
            return
        syncer.finish()
        syncer.join()
        if syncer.error is not None:
            e = syncer.error
            raise BackupError(f"cannot write the restored files to disk: {e.strerror or e}")

    # -- commit --------------------------------------------------------------------------------------

    def _commit(self, plan: RestorePlan) -> None:
        """Move verified VMs into place and register them; qubes.xml's rename is the commit point."""
        assert self.staging is not None
        root = self.system.qubes_root
        current = Collection.load(self.system.qubes_xml)
        moves: list[tuple[str, Path, Path]] = []
        seen: set[Path] = set()
        for action in plan.vms:
            if not action.restore or action.archive is None:
                continue
            old = plan.backup.get(action.name)
            assert old is not None
            new_dom = current.add_domain(old, new_name=action.target_name)
            for prop, value in action.replace_refs.items():
                if value is None:
                    new_dom.remove_property(prop)
                else:
                    new_dom.set_property(prop, value)
            vm_dir = (root / _confine_volumes(current, new_dom)).resolve()
            for f in _file_moves(plan.backup, old, new_dom, current, action.archive):
                src = self.staging / action.archive.member / f[0]
                dst = Path(os.path.normpath(root / f[1]))
                # Every restored file lands inside its VM's new directory, once: nothing else is touched.
                if vm_dir not in dst.parents or root.resolve() not in vm_dir.parents or dst in seen:
                    raise VerificationError(f"manifest: file {safe_text(f[0])} of VM {action.target_name} "
                                            "has no valid place on this system")  # fmt: skip
                seen.add(dst)
                moves.append((action.target_name, src, dst))
        # Renamed VMs: dependants restored with them follow the new names.
        renames = {a.name: a.new_name for a in plan.vms if a.restore and a.new_name}
        restored_names = [a.target_name for a in plan.vms if a.restore and a.archive is not None]
        for old_name, new_name in renames.items():
            assert new_name is not None
            current.rename_references(old_name, new_name, restored_names)
        for name in restored_names:
            _root_follows_template(current, name)
        home_move = None
        if plan.home is not None and plan.home_target is not None:
            user_dir = next(f.path for f in plan.home.files)
            home_move = (self.staging / plan.home.member / user_dir, self.system.home_dir / plan.home_target)
        if home_move is not None and os.path.lexists(home_move[1]):
            # Two restores within the same second, or a directory the user made: never restore over it.
            home_move = (home_move[0], _free_path(home_move[1]))
        for _vm, _src, dst in moves:
            if dst.exists():
                raise BackupError(f"cannot restore: {dst} appeared during the restore; nothing was changed")
        journal = self.staging / JOURNAL
        with open(journal, "w", encoding="utf-8") as j:
            for vm, _src, dst in moves:
                # JSON lines: no name or path can forge another entry (json.dumps escapes every control char).
                j.write(json.dumps({"vm": vm, "path": os.fspath(dst)}) + "\n")
            j.flush()
            os.fsync(j.fileno())
        # Durability before the commit point: the images' data (fsynced by the syncer while later archives
        # were received) and the directory entries of the renames, so that a crash right after qubes.xml is
        # replaced never leaves a registered VM with an empty or zeroed image.
        self._wait_durable()
        touched: set[Path] = set()
        for _vm, src, dst in moves:
            _make_parents(dst.parent, touched)
            os.rename(src, dst)
        for d in sorted(touched):
            _fsync_fd_of(d, os.O_DIRECTORY)
        current.write_atomic(self.system.qubes_xml)  # the commit point
        journal.unlink()
        if home_move is not None:
            touched = set()
            _make_parents(home_move[1].parent, touched)
            os.rename(*home_move)
            for d in sorted(touched):
                _fsync_fd_of(d, os.O_DIRECTORY)
            self.home_restored_to = home_move[1]
        self.restored = restored_names
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging = None

    # -- failure and cancellation ----------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask a running restore to stop (from any thread); it then fails with Cancelled, dom0 unchanged.

        Only signals are sent from here: closing the channel's descriptors under the thread that is reading
        them could make it read a recycled descriptor.  Killing the agent wakes that thread at once.
        """
        self._cancel.set()
        channel = self.channel
        if channel is not None and channel.proc.poll() is None:
            with contextlib.suppress(OSError):
                channel.proc.kill()

    def _fail(self) -> None:
        self.state = State.FAILED
        if self.channel is not None:
            self.channel.abort()
        self._stop_threads()
        if self.staging is not None:
            _remove_staging(self.staging, self.system)
            self.staging = None

    def close(self) -> None:
        if self.channel is not None:
            self.channel.abort()
        self._stop_threads()
        if self.staging is not None:
            _remove_staging(self.staging, self.system)
            self.staging = None


# ------------------------------------------------------------------------------------------- plan helpers

def _parse_trailer(data: bytes, archive: manifest_mod.ArchiveEntry) -> tuple[int, int]:
    m = re.fullmatch(rb"chunks=(0|[1-9][0-9]{0,6})\nstored=(0|[1-9][0-9]{0,18})\n", data)
    if m is None or len(data) > MAX_TRAILER:
        raise VerificationError(f"backup is damaged: VM {archive.vm}: malformed trailer")
    return int(m.group(1)), int(m.group(2))


def _free_path(path: Path) -> Path:
    for i in range(1, 1000):
        candidate = path.with_name(f"{path.name}-{i}")
        if not os.path.lexists(candidate):
            return candidate
    raise BackupError(f"no free name to restore dom0's home beside {path}")


def _free_name(base: str, taken: Callable[[str], bool]) -> str:
    for i in range(1, 1000):
        candidate = f"{base[:28]}{i}"
        if not taken(candidate):
            return candidate
    raise BackupError(f"no free name to rename {base} to")


def plan_restore(
    system: System, hdr: header_mod.Header, manifest: manifest_mod.Manifest, options: RestoreOptions
) -> RestorePlan:
    """Decide, VM by VM, what the restore does (Qubes' semantics for conflicts and missing dependencies)."""
    backup = Collection.from_bytes(manifest.qubes)
    current = Collection.load(system.qubes_xml) if system.qubes_xml.is_file() else None
    if current is None:
        raise BackupError(f"no Qubes collection at {system.qubes_xml}: cannot register restored VMs")
    in_backup = {a.vm: a for a in manifest.archives if a.kind == "vm"}
    for name in [*options.vms, *options.exclude]:
        if name not in in_backup and name != "dom0" and backup.get(name) is None:
            raise UsageError(f"VM {name} is not in this backup")
    selected = set(options.vms) if options.vms else None
    errors: list[str] = []
    actions: list[VmAction] = []
    root = system.qubes_root
    reserved: set[str] = set()

    def exists(name: str) -> bool:
        dom = current.get(name)
        if dom is not None or name in reserved:
            return True
        return any((root / d / name).exists() for d in ("appvms", "vm-templates", "servicevms"))

    for archive in (a for a in manifest.archives if a.kind == "vm"):
        dom = backup.get(archive.vm)
        if dom is None:
            raise VerificationError(f"manifest: VM {archive.vm} has data but no entry in qubes.xml")
        act = VmAction(dom.name, dom.klass, _shown_ref(backup, dom, "template"), _shown_ref(backup, dom, "netvm"),
                       archive.size, archive)  # fmt: skip
        actions.append(act)
        if selected is not None and dom.name not in selected:
            act.restore, act.reason = False, "not selected"
        elif dom.name in options.exclude:
            act.restore, act.reason = False, "excluded"
        elif exists(dom.name):
            if options.verify_only:
                # Verifying writes nothing, so a VM that exists here is no conflict: its data is checked too
                # (the common case is verifying a backup on the system that made it).
                act.notes.append("exists here")
            elif options.rename_conflicting:
                act.new_name = _free_name(dom.name, exists)
                reserved.add(act.new_name)
            elif options.skip_conflicting:
                act.restore, act.reason = False, "already exists"
            else:
                act.restore, act.reason = False, "already exists (use --skip-conflicting or --rename-conflicting)"
                errors.append(
                    f"VM {dom.name} already exists on this system: use --skip-conflicting or --rename-conflicting"
                )
        if act.restore:
            reserved.add(act.target_name)

    # Dependencies: a template/netvm/dispvm must be restored with the VM or exist here.
    will_restore = {a.name for a in actions if a.restore}
    for act in actions:
        if not act.restore:
            continue
        dom = backup.get(act.name)
        assert dom is not None
        for prop in ("template", "netvm", "default_dispvm"):
            if prop in dom.properties:
                ref = dom.properties.get(prop) or None
            elif prop == "template" and (ref := backup.effective_template(dom)) is not None:
                # The VM used the old system's default template; its disks belong to that template, so unless
                # this system has the same default it is pinned to it, not left to inherit another one.
                if ref in will_restore or current.get(ref) is not None:
                    if current.global_properties.get("default_template") != ref:
                        act.replace_refs[prop] = ref
                    continue
            else:
                continue  # netvm/default_dispvm follow this system's defaults, as a new VM's would
            if ref is None or ref in will_restore or current.get(ref) is not None:
                continue
            what = f"missing {prop} {ref}"
            if options.verify_only:  # nothing is registered, so nothing can be broken: verify it anyway
                act.notes.append(what)
                continue
            if options.ignore_missing:
                default = current.global_properties.get(_DEFAULT_OF[prop]) or None
                if prop == "template" and (default is None or current.get(default) is None):
                    act.restore, act.reason = False, f"{what} and no default template"
                    errors.append(f"VM {act.name}: {what}, and this system has no default template")
                    continue
                act.replace_refs[prop] = None
                act.notes.append(f"{what}: using the default ({default or 'none'})")
            elif options.skip_broken:
                act.restore, act.reason = False, what
            else:
                act.restore, act.reason = False, what
                errors.append(f"VM {act.name}: {what}; use --skip-broken or --ignore-missing")
        if not act.restore:
            will_restore.discard(act.name)

    home_archive = next((a for a in manifest.archives if a.kind == "home"), None)
    home = None
    home_target = None
    home_wanted = not options.skip_dom0_home and "dom0" not in options.exclude
    if home_archive is not None and home_wanted and (selected is None or "dom0" in selected):
        home = home_archive
        home_target = datetime.now().strftime("home-restore-%Y-%m-%d-%H%M%S")
    if not any(a.restore for a in actions) and home is None and not errors:
        errors.append("nothing to restore: every VM of the backup is skipped")
    return RestorePlan(hdr, manifest, backup, actions, home, home_target, errors)


def _shown_ref(backup: Collection, dom: Domain, prop: str) -> str | None:
    """The template/netvm as the table shows it: explicit, or the backed-up system's default in brackets."""
    if dom.has_property(prop):
        return dom.raw_property(prop) or None
    effective = backup.effective_template(dom) if prop == "template" else backup.effective_netvm(dom)
    return f"({effective})" if effective else None


_DEFAULT_OF = {"template": "default_template", "netvm": "default_netvm", "default_dispvm": "default_dispvm"}


_VOLUME_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,30}")


def _confine_volumes(current: Collection, dom: Domain) -> str:
    """Every volume of a restored VM lives in the VM's own new directory, in a file pool of this system.

    The backup's qubes.xml chose pools and vids; left alone, a renamed copy would share the original's
    non-file (e.g. LVM) volumes, and a crafted one could point a volume or a snapshot ``source`` at another
    VM's data.  Returns the VM's directory (relative to the Qubes root).
    """
    vm_dir = Collection.default_vm_dir(dom.name, dom.klass)
    file_pool = next((n for n, a in current.pools.items() if a.get("driver") in FILE_DRIVERS), None)
    for vel in dom.element.iterfind("volume-config/volume"):
        name = vel.get("name", "")
        if current.pools.get(vel.get("pool", ""), {}).get("driver") == "linux-kernel":
            continue  # the kernel "volume" names a kernel of this system, no data
        if not _VOLUME_NAME_RE.fullmatch(name):
            raise VerificationError(f"VM {dom.name}: bad volume name {safe_text(name)!r}")
        if file_pool is None:
            raise BackupError("this system has no file pool to restore VM volumes into")
        if current.pools.get(vel.get("pool", ""), {}).get("driver") not in FILE_DRIVERS:
            vel.set("pool", file_pool)
        vel.set("vid", f"{vm_dir}/{name}")
        if name != "root" and "source" in vel.attrib:  # only an AppVM's root is a snapshot (of its template's)
            del vel.attrib["source"]
    return vm_dir


def _root_follows_template(current: Collection, name: str) -> None:
    """An AppVM's root volume is a snapshot of its template's root.  After renames, --ignore-missing and this
    system's defaults the template may differ from the one in the backup (a VM inheriting the default
    template keeps inheriting it), so point the snapshot source at the template the VM really has here;
    otherwise it would start from another template's image (e.g. a renamed copy's)."""
    dom = current.get(name)
    if dom is None or dom.klass != "AppVM":
        return
    template = current.get(current.effective_template(dom) or "")
    root = next((v for v in template.volumes if v.name == "root"), None) if template is not None else None
    if root is None or not root.vid:
        return
    for vel in dom.element.iterfind("volume-config/volume"):
        if vel.get("name") == "root" and vel.get("source"):
            vel.set("source", root.vid)


def _file_moves(
    backup: Collection, old: Domain, new: Domain, current: Collection, archive: manifest_mod.ArchiveEntry
) -> Iterable[tuple[str, str]]:
    """(path in the archive, path under the Qubes root) for each restored file."""
    old_dir = old.features.get("backup-path") or backup.vm_dir(old) or ""
    new_dir = Collection.default_vm_dir(new.name, new.klass)
    new_vids = {v.name: v.vid for v in new.volumes}
    by_file = {f"{v.vid}.img": new_vids.get(v.name) for v in old.volumes if v.save_on_stop}
    for f in archive.files:
        if by_file.get(f.path):
            yield f.path, f"{by_file[f.path]}.img"
        elif f.path.startswith(old_dir.rstrip("/") + "/"):
            yield f.path, new_dir + f.path[len(old_dir.rstrip("/")) :]
        else:
            raise VerificationError(f"manifest: file {f.path} of VM {old.name} has no place on this system")


# ------------------------------------------------------------------------------------------ staging area

@contextlib.contextmanager
def _collection_lock(system: System) -> Iterator[None]:
    """Serialise commits of concurrent restores: each reads qubes.xml and replaces it, so without the lock
    one of two restores at the same moment would lose the other's registrations."""
    fd = os.open(system.qubes_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # a lock that leaves no file
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _make_parents(path: Path, touched: set[Path]) -> None:
    """mkdir -p ``path``; ``touched`` gets every directory whose entries changed (to fsync them)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    touched.add(path)
    touched.update(m.parent for m in missing)


def _make_staging(system: System) -> Path:
    root = system.qubes_root
    cleanup_stale_staging(system)
    stamp = f"{os.getpid()}-{os.urandom(4).hex()}"
    path = root / f"{STAGING_PREFIX}{stamp}"
    path.mkdir(mode=0o700)
    return path


def _remove_staging(staging: Path, system: System) -> None:
    """Undo a partial commit (directories moved in before qubes.xml was written), then delete staging."""
    journal = staging / JOURNAL
    if journal.is_file():
        # Interrupted between moving files into place and writing qubes.xml: files of VMs that did not get
        # registered are removed again (their names did not exist before the restore).
        registered = set(Collection.load(system.qubes_xml).names()) if system.qubes_xml.is_file() else set()
        root = system.qubes_root.resolve()
        for line in journal.read_text(encoding="utf-8").split("\n"):
            if not line:
                continue
            try:
                entry = json.loads(line)
                vm, dst = entry["vm"], Path(os.path.normpath(entry["path"]))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line: what it named was never moved
            # Only files inside the unregistered VM's own directory (appvms/VM/..., vm-templates/VM/...).
            if not isinstance(vm, str) or vm in registered or root not in dst.parents:
                continue
            parts = dst.relative_to(root).parts
            if len(parts) < 3 or parts[1] != vm or dst.is_symlink() or not dst.is_file():
                continue
            dst.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                dst.parent.rmdir()  # only if empty: it was created by the restore
    shutil.rmtree(staging, ignore_errors=True)


def cleanup_stale_staging(system: System) -> list[Path]:
    """Remove what an interrupted restore left behind (run at the start of every restore)."""
    removed: list[Path] = []
    root = system.qubes_root
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        if entry.name.startswith(STAGING_PREFIX) and entry.is_dir() and not entry.is_symlink():
            pid = entry.name[len(STAGING_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
                continue  # another restore is running right now
            _remove_staging(entry, system)
            removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
