"""Backup planning: which VMs and files, in Qubes' restore order, each volume's committed state opened
(snapshot, reflink clone, image) and scanned for holes and zero runs; held until its archive is written.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from qubes_backup_protocol import names

from qubes_backup_dom0.errors import BackupError, UsageError
from qubes_backup_dom0.format import tarwriter
from qubes_backup_dom0.format.header import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_KDF_N,
    DEFAULT_KDF_P,
    DEFAULT_KDF_R,
)
from qubes_backup_dom0.format.manifest import ArchiveEntry, ArchiveSizes, FileEntry, Manifest
from qubes_backup_dom0.qubes import firewall, pools
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.qubes.qubesxml import Collection, Domain, Volume
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.text import has_unsafe_chars

PLAN_THREADS = 2  # VMs planned at once (snapshot + scan)
ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes total), data bytes (holes excluded)


@dataclass
class PlannedArchive(ArchiveSizes):
    member: str
    vm: str
    kind: str  # vm | home
    klass: str
    files: list[tarwriter.InnerFile]
    volumes: list[PlannedVolume] = field(default_factory=list)  # the files read from pools
    remover: pools.SnapshotRemover | None = None  # removes the volumes' lvm snapshots together
    running: bool = False  # the VM runs: its committed state (from before its start) is backed up
    live: list[str] = field(default_factory=list)  # revisions_to_keep=-1: written in place (crash-consistent)

    def release(self) -> None:
        """Release the volumes (close their readers), then remove their snapshots in one lvm call; idempotent."""
        try:
            for pv in self.volumes:
                pv.release()
        finally:
            if self.remover is not None:
                self.remover.flush()


@dataclass
class BackupPlan:
    system: System
    collection: Collection
    archives: list[PlannedArchive] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # files whose names cannot be stored safely
    qubes: Qubes | None = None
    not_selected: list[str] = field(default_factory=list)  # VMs of the system left out (Qubes lists them)

    def close(self) -> None:
        """Release every volume still held since planning (snapshots removed); idempotent.  The backup
        releases each archive's volumes right after writing it; this is for whatever was not written."""
        errors: list[BaseException] = []
        for a in self.archives:
            try:
                a.release()
            except BaseException as exc:  # release the others first
                errors.append(exc)
        if errors:
            raise errors[0]

    def record_backup_timestamps(self, when: int) -> list[str]:
        """After a successful backup, as Qubes does: backup_timestamp on each backed-up VM (the only write
        a backup makes).  Returns warnings for VMs where that failed (the backup itself is complete)."""
        if self.qubes is None:
            return []
        warnings: list[str] = []
        for a in self.archives:
            if a.kind != "vm":
                continue
            try:
                self.qubes.set_backup_timestamp(a.vm, when)
            except BackupError as exc:
                warnings.append(f"could not record backup_timestamp of {a.vm}: {exc}")
        return warnings

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
                backed_up[a.vm] = (self.collection.default_vm_dir(a.vm, a.klass), a.size)
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

def _dependencies(collection: Collection, dom: Domain) -> list[tuple[str, bool]]:
    """(name, strong) for what ``dom`` depends on, implied defaults counted: template and netvm are strong
    (Qubes allows no cycles through them), default_dispvm is weak (a template's default disposable VM is
    usually based on that template)."""
    deps = [
        (collection.effective_template(dom), True),
        (collection.effective_netvm(dom), True),
        (collection.effective_default_dispvm(dom), False),
    ]
    return [(n, strong) for n, strong in deps if n and n != dom.name]


def restore_order(collection: Collection, selected: list[Domain]) -> list[Domain]:
    """The restore order of the backed-up VMs (docs/FORMAT.md section 6).

    Ranks: TemplateVMs, then VMs with template_for_dispvms, then the rest, by name within a rank; each VM comes
    after the backed-up VMs it depends on -- template, netvm, default_dispvm, an absent property meaning the
    global default -- recursively.  A default_dispvm dependency is ignored when that VM itself depends on
    this one through template/netvm chains; a cycle left through default_dispvm alone is broken where the
    walk meets it.
    """
    by_name = {d.name: d for d in selected}
    edges = {d.name: [(n, s) for n, s in _dependencies(collection, d) if n in by_name] for d in selected}

    def strongly_reaches(src: str, target: str) -> bool:
        seen: set[str] = set()
        todo = [src]
        while todo:
            name = todo.pop()
            if name == target:
                return True
            if name not in seen:
                seen.add(name)
                todo.extend(n for n, strong in edges[name] if strong)
        return False

    ordered: list[Domain] = []
    state: dict[str, int] = {}

    def visit(name: str) -> None:
        if state.get(name):
            return  # done, or in progress (a cycle through default_dispvm edges only)
        state[name] = 1
        for dep, strong in edges[name]:
            if strong or not strongly_reaches(dep, name):
                visit(dep)
        state[name] = 2
        ordered.append(by_name[name])

    def rank(d: Domain) -> int:
        if d.klass == "TemplateVM":
            return 0
        return 1 if d.raw_property("template_for_dispvms") == "True" else 2

    for d in sorted(selected, key=lambda d: (rank(d), d.name)):
        visit(d.name)
    return ordered


@dataclass
class PlannedVolume:
    """A volume scanned while planning.  Its committed state (an lvm snapshot, a reflink clone, the image)
    stays open from the scan until its archive is written, so the bytes read are the very bytes scanned and
    no second snapshot is taken (each lvm call costs 0.1-0.3 s; docs/PERFORMANCE.md).  Once released (a
    plan written twice), a fresh reader is opened and its identity checked against the planned one."""

    ref: pools.VolumeRef
    file: tarwriter.InnerFile
    identity: pools.Identity
    fd: int | None = None
    stamp: tuple[int, int] | None = None  # (size, mtime_ns) of the open fd at the scan
    held: contextlib.ExitStack | None = None

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def release(self) -> None:
        """Close the held reader (remove the snapshot); idempotent, callable from any thread."""
        with self._lock:
            held, self.held, self.fd = self.held, None, None
        if held is not None:
            held.close()


def _fd_stamp(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_size, st.st_mtime_ns


def _plan_volume(
    system: System, ref: pools.VolumeRef, path: str, mtime: int, remover: pools.SnapshotRemover,
    zeros: bool = True,
) -> PlannedVolume:
    """Open the committed state of ``ref``, scan it for holes and zero runs (``zeros=False``: its allocation
    map only, see ``InnerFile.from_fd``), and keep it open (its snapshot goes to ``remover`` when released)."""
    stack = contextlib.ExitStack()
    try:
        c = stack.enter_context(pools.committed(system, ref, remover))
        f = tarwriter.InnerFile.from_fd(path, c.fd, c.size, ref.label, mtime, c.provisioned, zeros)
        return PlannedVolume(ref, f, c.identity, c.fd, _fd_stamp(c.fd), stack)
    except BaseException:
        stack.close()
        raise


class VolumePlanner(Protocol):
    """Plans a volume its own way (change tracking, backup/tracking.py), or returns None: the usual way."""

    def plan_volume(self, ref: pools.VolumeRef, path: str, mtime: int, vm_uuid: str | None) -> PlannedVolume | None:
        ...

    def prepare(self, volumes: list[tuple[pools.VolumeRef, str | None, bool]]) -> None:
        """Called once before any ``plan_volume``, with every volume that will be planned: its reference, its VM's
        uuid and whether it is written in place while its VM runs (``revisions_to_keep`` -1)."""
        ...


def _volume_refs(collection: Collection, dom: Domain, state: str) -> Iterator[tuple[Volume, pools.VolumeRef]]:
    """Each save_on_stop volume of ``dom`` (the ones a backup holds) and its reference."""
    for vol in dom.volumes:
        if not vol.save_on_stop:
            continue
        pool_info = collection.pools.get(vol.pool)
        if pool_info is None:
            raise BackupError(f"cannot back up {dom.name}: volume '{vol.name}' is in unknown pool '{vol.pool}'")
        yield vol, pools.VolumeRef(dom.name, state, vol.name, vol.pool, vol.vid, pool_info)


def _vm_files(
    system: System, qubes: Qubes, collection: Collection, dom: Domain, state: str, mtime: int,
    archive: PlannedArchive, planner: VolumePlanner | None = None, zeros: bool = True,
) -> list[tarwriter.InnerFile]:  # fmt: skip
    """DIR/firewall.xml, DIR/notes.txt (when there are notes), then DIR/VOL.img for each save_on_stop volume
    (the small files first: a restore applies the firewall before the VM's data arrives, as Qubes' does).
    The volumes are appended to ``archive.volumes`` as soon as they are open (so a failure can release them)."""
    remover = archive.remover = pools.SnapshotRemover(system)
    vm_dir = collection.default_vm_dir(dom.name, dom.klass)
    files: list[tarwriter.InnerFile] = []
    rules = qubes.firewall_rules(dom.name)
    files.append(tarwriter.InnerFile.from_bytes(f"{vm_dir}/firewall.xml", firewall.rules_to_xml(rules), 0o644, mtime))
    notes = qubes.notes(dom.name)
    if notes:
        files.append(tarwriter.InnerFile.from_bytes(f"{vm_dir}/notes.txt", notes.encode(), 0o644, mtime))
    for vol, ref in _volume_refs(collection, dom, state):
        if vol.attrib.get("revisions_to_keep") == "-1":
            archive.live.append(vol.name)
        pv = planner.plan_volume(ref, f"{vm_dir}/{vol.name}.img", mtime, dom.uuid) if planner else None
        pv = pv or _plan_volume(system, ref, f"{vm_dir}/{vol.name}.img", mtime, remover, zeros)
        archive.volumes.append(pv)
        files.append(pv.file)
    return files


def _changed(pv: PlannedVolume) -> BackupError:
    return BackupError(
        f"{pv.ref.label} changed since the backup was planned (the VM was started, shut down or its volume "
        "replaced); run the backup again"
    )


@contextlib.contextmanager
def attached_volumes(
    system: System, archive: PlannedArchive, release: Callable[[PlannedArchive], None] | None = None
) -> Iterator[None]:
    """Attach the archive's volumes (held since planning) while it is read; release them right after, through
    ``release`` when given (the backup removes snapshots on a background thread while the next archive is
    read), all snapshots of the archive in one lvm call."""
    with contextlib.ExitStack() as stack:
        stack.callback(release or PlannedArchive.release, archive)  # last: after any reader opened below
        try:
            for pv in archive.volumes:
                if pv.fd is not None:
                    if _fd_stamp(pv.fd) != pv.stamp:  # an image written in place (file pool, VM started)
                        raise _changed(pv)
                    pv.file.fd = pv.fd
                    continue
                c = stack.enter_context(pools.committed(system, pv.ref, archive.remover))
                if c.identity != pv.identity or c.size != pv.file.size:
                    raise _changed(pv)
                pv.file.fd = c.fd
            yield
        finally:
            for pv in archive.volumes:
                pv.file.fd = None


def _home_files(system: System, skipped: list[str]) -> list[tarwriter.InnerFile]:
    home = system.home_dir
    if not home.is_dir():
        raise BackupError(f"cannot back up dom0: home directory {home} is missing")
    files = [tarwriter.InnerFile.from_path(home.relative_to(system.dom0_root).as_posix(), home)]
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
                files.append(tarwriter.InnerFile.from_path(path.relative_to(system.dom0_root).as_posix(), path))
        # symlinked directories are listed as symlinks and not descended into
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return files


def plan_backup(
    system: System, vm_names: Iterable[str] = (), exclude: Iterable[str] = (), qubes: Qubes | None = None,
    planner: VolumePlanner | None = None, zeros: bool = True,
) -> BackupPlan:
    """Decide what goes into the backup: named VMs, or every VM with include_in_backups (asked of qubesd);
    ``planner``: change tracking's way of opening volumes (repository backups); ``zeros=False``: volumes are
    not scanned for zero runs, their allocation maps are their regions (repository backups: the writer drops
    all-zero blocks as it reads them; ``InnerFile.from_fd``), so ``data`` counts allocated bytes."""
    qubes = qubes if qubes is not None else Qubes(system)
    vm_states = qubes.vm_list()
    exclude = set(exclude)
    for name in exclude:
        if name not in vm_states:
            raise UsageError(f"no such VM to exclude: {name}")
    requested = list(dict.fromkeys(vm_names))
    for name in requested:
        if name not in vm_states:
            raise UsageError(f"no such VM: {name}")
    collection = qubes.collection()
    if requested:
        chosen = [collection[n] for n in requested if n not in exclude]
    else:
        chosen = [d for d in collection.domains if d.include_in_backups and d.name not in exclude]
    plan = BackupPlan(system, collection, qubes=qubes)
    chosen_names = {d.name for d in chosen}
    plan.not_selected = sorted(n for n in vm_states if n not in chosen_names)
    if any(d.klass == "AdminVM" for d in chosen):
        plan.archives.append(PlannedArchive("vm0", "dom0", "home", "AdminVM", _home_files(system, plan.skipped)))
    vms = [d for d in chosen if d.klass != "AdminVM"]
    if any(p.get("driver") == "lvm_thin" for p in collection.pools.values()):
        pools.remove_leftover_snapshots(system)  # of a killed earlier run
    mtime = int(time.time())
    try:
        if planner is not None:
            order = restore_order(collection, vms)
            planner.prepare([(ref, dom.uuid, vol.attrib.get("revisions_to_keep") == "-1") for dom in order
                             for vol, ref in _volume_refs(collection, dom, vm_states[dom.name][1])])  # fmt: skip
        # Two VMs at a time: one's snapshot (an lvm process, mostly waiting) overlaps the other's scan.
        with ThreadPoolExecutor(max_workers=PLAN_THREADS, thread_name_prefix="plan") as pool:
            jobs = []
            for number, dom in enumerate(restore_order(collection, vms), start=1):
                archive = PlannedArchive(names.archive_name(number), dom.name, "vm", dom.klass, [])
                plan.archives.append(archive)
                state = vm_states[dom.name][1]
                archive.running = state != "Halted"
                jobs.append((archive, pool.submit(_vm_files, system, qubes, collection, dom, state, mtime,
                                                  archive, planner, zeros)))  # fmt: skip
            for archive, job in jobs:
                archive.files = job.result()
        if not plan.archives:
            raise UsageError("nothing to back up: no VM selected")
    except BaseException:
        plan.close()
        raise
    # A plan that is dropped without being written or closed still releases its snapshots.
    weakref.finalize(plan, release_all, list(plan.archives))
    return plan


def release_all(archives: list[PlannedArchive]) -> None:
    for a in archives:
        a.release()
