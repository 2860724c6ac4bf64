"""The backup pipeline: select VMs, then read -> compress -> chunk -> encrypt+MAC -> outer tar -> sink.

Reading skips holes (inner.py), zstd compresses on its own threads, encryption and MAC run in a small
thread pool (cryptography and hashlib release the GIL), and a writer thread feeds the sink, so all cores
work and dom0 memory stays bounded by a few chunks whatever the size of the backup.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qubes_backup_protocol import names

from . import crypto, inner
from .chunking import Chunker
from .errors import BackupError, Cancelled, UsageError
from .header import DEFAULT_CHUNK_SIZE, DEFAULT_KDF_N, DEFAULT_KDF_P, DEFAULT_KDF_R, Header, now_utc
from .manifest import ArchiveEntry, ArchiveSizes, FileEntry, Manifest
from .outer import OuterWriter, Sink
from .qubesxml import Collection, Domain
from .system import System
from .text import has_unsafe_chars

ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes total), data bytes (holes excluded)


@dataclass
class PlannedArchive(ArchiveSizes):
    member: str
    vm: str
    kind: str  # vm | home
    klass: str
    files: list[inner.InnerFile]


@dataclass
class BackupPlan:
    system: System
    collection: Collection
    archives: list[PlannedArchive] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # files whose names cannot be stored safely

    @property
    def data(self) -> int:
        return sum(a.data for a in self.archives)

    @property
    def size(self) -> int:
        return sum(a.size for a in self.archives)

    def manifest(self, backup_id: str, created: str) -> Manifest:
        entries = [
            ArchiveEntry(a.member, a.vm, a.kind, [FileEntry(f.path, f.type, f.size, f.data) for f in a.files])
            for a in self.archives
        ]
        backed_up: dict[str, tuple[str, int]] = {}
        for a in self.archives:
            if a.kind == "home":
                backed_up["dom0"] = (f"dom0-home/{self.system.user}", a.size)
            else:
                dom = self.collection.get(a.vm)
                vm_dir = self.collection.vm_dir(dom) if dom is not None else None
                assert dom is not None and vm_dir is not None  # planned from this collection; not dom0
                backed_up[a.vm] = (vm_dir, a.size)
        vm_names = [a.vm for a in self.archives if a.kind == "vm"]
        deps = self.collection.dependencies(vm_names)
        qubes = self.collection.subset(backed_up, deps).to_bytes()
        return Manifest(backup_id, created, entries, qubes)


@dataclass(frozen=True)
class BackupOptions:
    compression: str = "zstd"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    kdf_n: int = DEFAULT_KDF_N
    kdf_r: int = DEFAULT_KDF_R
    kdf_p: int = DEFAULT_KDF_P
    workers: int = max(2, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------- planning

def _restore_order(collection: Collection, selected: list[Domain]) -> list[Domain]:
    """Templates first, then every VM after the backed-up VMs it depends on (template, netvm, dispvm)."""
    by_name = {d.name: d for d in selected}
    ordered: list[Domain] = []
    state: dict[str, int] = {}

    def visit(d: Domain) -> None:
        if state.get(d.name) == 2:
            return
        if state.get(d.name) == 1:  # a dependency cycle (netvm loops are possible): break it here
            return
        state[d.name] = 1
        for dep in sorted(d.dependency_names()):
            if dep in by_name:
                visit(by_name[dep])
        state[d.name] = 2
        ordered.append(d)

    rank = {"TemplateVM": 0, "StandaloneVM": 1}
    for d in sorted(selected, key=lambda d: (rank.get(d.klass, 2), d.name)):
        visit(d)
    return ordered


def _vm_files(
    system: System, collection: Collection, dom: Domain, skipped: list[str]
) -> list[inner.InnerFile]:
    root = system.qubes_root
    files: list[inner.InnerFile] = []
    volume_paths: set[Path] = set()
    for vol in dom.volumes:
        if not vol.save_on_stop:
            continue
        path = collection.volume_path(vol, root)
        if path is None:
            pool = collection.pools.get(vol.pool, {}).get("driver", vol.pool)
            raise BackupError(
                f"cannot back up {dom.name}: volume '{vol.name}' is in pool '{vol.pool}' ({pool}); "
                "only file pools are supported"
            )
        try:
            rel = path.relative_to(root)
        except ValueError:
            raise BackupError(f"cannot back up {dom.name}: volume '{vol.name}' is outside the Qubes root") from None
        if not path.is_file():
            raise BackupError(f"cannot back up {dom.name}: volume file {path} is missing")
        volume_paths.add(path)
        files.append(inner.InnerFile.from_path(rel.as_posix(), path))
    vm_dir = root / (collection.vm_dir(dom) or collection.default_vm_dir(dom.name, dom.klass))
    if vm_dir.is_dir():
        for dirpath, dirnames, filenames in os.walk(vm_dir):
            dirnames.sort()
            for fname in sorted(filenames):
                path = Path(dirpath) / fname
                if path in volume_paths or ".img" in fname or path.is_symlink() or not path.is_file():
                    continue  # other volumes (root/volatile snapshots, revisions) are not backed up
                if has_unsafe_chars(fname):
                    skipped.append(str(path))
                    continue
                files.append(inner.InnerFile.from_path(path.relative_to(root).as_posix(), path))
    if not files:
        raise BackupError(f"cannot back up {dom.name}: nothing to back up in {vm_dir}")
    return files


def _home_files(system: System, skipped: list[str]) -> list[inner.InnerFile]:
    home = system.home_dir
    if not home.is_dir():
        raise BackupError(f"cannot back up dom0: home directory {home} is missing")
    files = [inner.InnerFile.from_path(home.relative_to(system.dom0_root).as_posix(), home)]
    for dirpath, dirnames, filenames in os.walk(home):
        dirnames.sort()
        # Names with control characters are not stored (a restore refuses them): listed as skipped instead.
        unsafe = {n for n in dirnames + filenames if has_unsafe_chars(n)}
        skipped.extend(str(Path(dirpath) / n) for n in sorted(unsafe))
        dirnames[:] = [d for d in dirnames if d not in unsafe]
        entries = sorted(dirnames + [f for f in filenames if f not in unsafe])
        for name in entries:
            path = Path(dirpath) / name
            if path.is_symlink() or path.is_dir() or path.is_file():
                files.append(inner.InnerFile.from_path(path.relative_to(system.dom0_root).as_posix(), path))
        # symlinked directories are listed as symlinks and not descended into
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return files


def plan_backup(
    system: System, vm_names: Iterable[str] = (), exclude: Iterable[str] = ()
) -> BackupPlan:
    """Decide what goes into the backup: named VMs, or every VM with include_in_backups."""
    if not system.qubes_xml.is_file():
        raise BackupError(f"no Qubes collection at {system.qubes_xml}")
    collection = Collection.load(system.qubes_xml)
    exclude = set(exclude)
    for name in exclude:
        if collection.get(name) is None:
            raise UsageError(f"no such VM to exclude: {name}")
    requested = list(dict.fromkeys(vm_names))
    if requested:
        for name in requested:
            if collection.get(name) is None:
                raise UsageError(f"no such VM: {name}")
        chosen = [collection.get(n) for n in requested if n not in exclude]
    else:
        chosen = [d for d in collection.domains if d.include_in_backups and d.name not in exclude]
    chosen_doms = [d for d in chosen if d is not None]
    plan = BackupPlan(system, collection)
    if any(d.klass == "AdminVM" for d in chosen_doms):
        plan.archives.append(PlannedArchive("vm0", "dom0", "home", "AdminVM", _home_files(system, plan.skipped)))
    vms = [d for d in chosen_doms if d.klass != "AdminVM"]
    for number, dom in enumerate(_restore_order(collection, vms), start=1):
        files = _vm_files(system, collection, dom, plan.skipped)
        plan.archives.append(PlannedArchive(names.archive_name(number), dom.name, "vm", dom.klass, files))
    if not plan.archives:
        raise UsageError("nothing to back up: no VM selected")
    return plan


# ---------------------------------------------------------------------------------------------- streaming

class _Stop:
    pass


def _encrypt_and_mac(
    keys: crypto.Keys, name: str, plaintext: bytes | bytearray | memoryview
) -> tuple[str, memoryview, bytes]:
    sealed = crypto.encrypt(keys, plaintext)
    return name, sealed, crypto.mac_member(keys, name, sealed)


def write_backup(
    plan: BackupPlan,
    passphrase: bytes,
    sink: Sink,
    options: BackupOptions = BackupOptions(),
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
    """
    kdf = crypto.KdfParams(crypto.random_bytes(16), options.kdf_n, options.kdf_r, options.kdf_p)
    header = Header(crypto.random_bytes(16), created or now_utc(), kdf, options.compression, options.chunk_size)
    header_bytes = header.render()  # checks our own parameters against the restore-side ceilings
    keys = crypto.keys_from_passphrase(passphrase, kdf, header.backup_id)
    outer = OuterWriter(sink)
    outer.add(names.HEADER, header_bytes)
    outer.add(names.mac_name(names.HEADER), crypto.mac_member(keys, names.HEADER, header_bytes))
    manifest = plan.manifest(header.backup_id.hex(), header.created).render()
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
            while True:
                item = pending.get()
                if isinstance(item, _Stop):
                    return
                if stop.is_set():
                    continue  # failing: drop what is queued, never drain it into the sink
                name, data, mac = item.result()
                outer.add(name, data)
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

    def done_future(value: tuple[str, memoryview | bytes, bytes]) -> Future[tuple[str, memoryview | bytes, bytes]]:
        f: Future[tuple[str, memoryview | bytes, bytes]] = Future()
        f.set_result(value)
        return f

    total = plan.data
    done = 0
    wthread = threading.Thread(target=writer, name="backup-writer", daemon=True)
    wthread.start()
    try:
        with ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="seal") as pool:
            for archive in plan.archives:
                chunker = Chunker(options.compression, options.chunk_size, threads=options.workers)
                index = 0
                stored = 0

                def submit(chunk: bytes | bytearray | memoryview, archive: PlannedArchive = archive) -> None:
                    nonlocal index, stored
                    name = names.chunk_name(archive.member, index)
                    index += 1
                    stored += len(chunk)
                    put(pool.submit(_encrypt_and_mac, keys, name, chunk))

                for piece in inner.write_archive(archive.files):
                    check()
                    for chunk in chunker.feed(piece):
                        submit(chunk)
                    done += len(piece)
                    if progress is not None:
                        progress(min(done, total), total)
                for chunk in chunker.finish():
                    submit(chunk)
                if index == 0:  # cannot happen: a tar stream is never empty; refuse rather than write it
                    raise BackupError(f"internal error: archive of {archive.vm} produced no data")
                trailer = f"chunks={index}\nstored={stored}\n".encode()
                tname = names.trailer_name(archive.member)
                put(done_future((tname, trailer, crypto.mac_member(keys, tname, trailer))))
        put(_Stop())
        while wthread.is_alive():  # in steps: Ctrl-C, SIGTERM and cancel are seen while the VM reads
            wthread.join(_POLL)
            check()
    except BaseException:
        _stop_writer(stop, sink, pending, wthread)
        raise
    if writer_error:
        raise writer_error[0]
    outer.close()
    if progress is not None:
        progress(total, total)
    return header


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
