"""Applying a restore plan to this system through qubesd, with rollback.

Every change goes through the system interface (qubes.py, i.e. the Admin API): no file of Qubes' is
written here.  The sequence, per restored VM, in the manifest's restore order (templates first):

1. ``admin.vm.Create.CLASS`` (template given at creation), then at once the tag
   ``backup-restore-in-progress`` (Qubes refuses to start such a VM) and our owner tag;
2. properties (except the VM references), features, tags, devices -- those the plan restores
   (``plan.settings``, restore/risk.py: settings that grant power only when granted, policy tags never);
3. while the archives arrive (only verified plaintext): firewall rules and notes (first in each archive),
   then volume data through ``admin.vm.volume.ImportWithSize``;
4. after everything verified: ``netvm``, ``default_dispvm`` and the other VM references, mapped through the
   restore's renames, in a last pass;
5. the commit: the in-progress tags removed, then the owner tags.

Any failure or interruption before the commit removes every VM this restore created (``admin.vm.Remove``);
a restore that was killed leaves VMs carrying both tags, which the next restore removes (or, if its commit
had started, finishes committing — their data was verified by then): found when it plans
(``find_leftovers``), done only after its own backup verified and the user agreed (``clean_leftovers``).
dom0's home goes to a staging directory beside it and is renamed into place after the VMs are committed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from qubes_backup_dom0.errors import BackupError, VerificationError
from qubes_backup_dom0.format import extractor, tarwriter
from qubes_backup_dom0.format import manifest as manifest_mod
from qubes_backup_dom0.qubes import firewall
from qubes_backup_dom0.qubes.adminapi import ANY, DeviceAssignment, QubesdError
from qubes_backup_dom0.qubes.interface import RELEASE_42, Qubes, VolumeImport
from qubes_backup_dom0.qubes.qubesxml import FILE_DRIVERS, Collection, Domain
from qubes_backup_dom0.restore import risk
from qubes_backup_dom0.restore.extract import ArchiveTarget, MemorySink
from qubes_backup_dom0.restore.plan import RestorePlan, VmAction

IN_PROGRESS = "backup-restore-in-progress"  # Qubes' own tag: such a VM cannot be started
OWNER_PREFIX = "qubes-backup-restore-"  # + PID-STARTTIME-NONCE: which restore created the VM
STAGING_PREFIX = ".qubes-backup-restore-"  # dom0 home staging, beside the home it is restored into
MAX_FIREWALL = 1 << 20
MAX_NOTES = 256 << 10
#: Properties not set from the backup: identity (new here), set at creation, or set in the last pass.
SKIP_PROPERTIES = frozenset({"name", "qid", "uuid", "label", "template", "dispid", "installed_by_rpm",
                             "template_for_dispvms", "backup_timestamp"})  # fmt: skip
#: VM references set in the last pass (after every restored VM exists), mapped through renames.
LAST_PASS = ("netvm", "default_dispvm", "management_dispvm", "audiovm", "guivm")
#: Properties whose value may not exist here (e.g. a kernel version): refused -> default, with a warning.
SOFT_PROPERTIES = frozenset({"kernel", "kernelopts"})

_VOLUME_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_LABEL = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # what admin.label.Create takes (not all digits)
_COLOR = re.compile(r"0x[0-9a-fA-F]{6}")  # Qubes' volume names: root, private, volatile, kernel
_live_nonces: set[str] = set()  # restores of this process that are running (their VMs are not leftovers)
_live_lock = threading.Lock()


_OWNER_RE = re.compile(r"qubes-backup-restore-([1-9][0-9]{0,9})-([1-9][0-9]{0,19})-([0-9a-f]{8})")
COMMITTED_MARK = ".committed"  # in a home staging: its data is complete and where it goes (JSON)
_HOME_TARGET_RE = re.compile(r"home-restore-[0-9]{4}-[0-9]{2}-[0-9]{2}-[0-9]{6}")
MAX_MARK = 4096


def _proc_start(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat): with the pid, it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(4096)
    except OSError:
        return None
    return stat.rsplit(b")", 1)[-1].split()[19].decode()


def _owner_dead(tag: str) -> bool:
    """True only when ``tag`` is exactly one of our owner tags and its restore provably ended: its process
    is gone (no /proc entry), or the pid now names another process (another start time), or it is this
    process and no restore of ours with that nonce is running.  Anything else (a malformed tag, a /proc
    that cannot be read, an owner whose start time was not known) is not a leftover."""
    m = _OWNER_RE.fullmatch(tag)
    if m is None:
        return False
    pid, start, nonce = int(m.group(1)), m.group(2), m.group(3)
    if pid == os.getpid():
        with _live_lock:
            return nonce not in _live_nonces and start == _proc_start(pid)
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(4096)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        return stat.rsplit(b")", 1)[-1].split()[19].decode() != start
    except (IndexError, UnicodeDecodeError):
        return False


def new_owner_tag() -> str:
    nonce = os.urandom(4).hex()
    with _live_lock:
        _live_nonces.add(nonce)
    return f"{OWNER_PREFIX}{os.getpid()}-{_proc_start(os.getpid()) or '0'}-{nonce}"


def release_owner_tag(tag: str) -> None:
    with _live_lock:
        _live_nonces.discard(tag.rsplit("-", 1)[-1])


# ------------------------------------------------------------------------------------------------ leftovers

@dataclass
class Leftovers:
    """What killed restores left, found before anything is changed: shown to the user, removed (or, for a
    restore killed inside its commit, finished) only after the backup verified and the user agreed."""

    remove: list[tuple[str, str]] = field(default_factory=list)  # (VM, owner tag): every VM still in progress
    finish: list[tuple[str, str, bool]] = field(default_factory=list)  # (VM, owner, in progress): commit started
    staging_remove: list[Path] = field(default_factory=list)
    staging_move: list[tuple[Path, str, str]] = field(default_factory=list)  # (staging, ~/NAME, path inside)

    @property
    def removed_names(self) -> set[str]:
        return {name for name, _ in self.remove}

    def __bool__(self) -> bool:
        return bool(self.remove or self.finish or self.staging_remove or self.staging_move)

    def describe(self) -> list[str]:
        """One line per thing to be done (names are ours or qubesd's: no text of a backup)."""
        out = [f"remove VM {name} (left by a killed restore: {owner}, process gone)" for name, owner in self.remove]
        done = sorted({name for name, _, _ in self.finish})
        if done:
            out.append(f"finish the commit of VM(s) {', '.join(done)} (a restore killed after verifying them)")
        out += [f"remove the unfinished dom0-home staging ~/{p.name}" for p in self.staging_remove]
        out += [f"move the verified dom0-home staging ~/{p.name} to ~/{to} (a restore killed in its commit)"
                for p, to, _ in self.staging_move]  # fmt: skip
        return out


def find_leftovers(qubes: Qubes | None, home: Path | None) -> Leftovers:
    """Find (change nothing) the VMs and home staging of restores that were killed."""
    found = Leftovers()
    groups: dict[str, list[tuple[str, bool]]] = {}
    if qubes is not None:
        for name, (klass, _state) in qubes.vm_list().items():
            if klass == "AdminVM":
                continue
            tags = qubes.tags(name)
            for tag in tags:
                if tag.startswith(OWNER_PREFIX) and _owner_dead(tag):
                    groups.setdefault(tag, []).append((name, IN_PROGRESS in tags))
    rolled_back = set()
    for tag, vms in groups.items():
        if all(in_progress for _, in_progress in vms):
            found.remove += [(name, tag) for name, _ in vms]
            rolled_back.add(tag)
        else:  # the commit had started: every VM was complete and verified
            found.finish += [(name, tag, in_progress) for name, in_progress in vms]
    if home is not None and home.is_dir():
        for entry in sorted(home.iterdir()):
            if not entry.name.startswith(STAGING_PREFIX) or entry.is_symlink() or not entry.is_dir():
                continue
            owner = OWNER_PREFIX + entry.name[len(STAGING_PREFIX) :]
            if not _owner_dead(owner):
                continue
            target = None if owner in rolled_back else _committed_target(entry)
            if target is None:
                found.staging_remove.append(entry)
            else:
                found.staging_move.append((entry, *target))
    return found


def _committed_target(staging: Path) -> tuple[str, str] | None:
    """Where a staging's home goes if its restore had reached its commit (its mark, strictly checked)."""
    try:
        fd = os.open(staging / COMMITTED_MARK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, MAX_MARK + 1)
    finally:
        os.close(fd)
    try:
        mark = json.loads(data) if len(data) <= MAX_MARK else None
    except ValueError:
        return None
    if not isinstance(mark, dict) or not isinstance(mark.get("from"), str) or not isinstance(mark.get("to"), str):
        return None
    src = mark["from"]
    if not _HOME_TARGET_RE.fullmatch(mark["to"]) or not manifest_mod.valid_rel_path(src) or src.count("/") > 3:
        return None
    path = staging / src
    if path.is_symlink() or not path.is_dir():
        return None
    return mark["to"], src


def clean_leftovers(qubes: Qubes | None, found: Leftovers, home: Path | None) -> list[str]:
    """Do what ``found`` lists (each owner checked dead again); returns one line per thing done."""
    done: list[str] = []
    if qubes is not None:
        finished: set[str] = set()
        for name, owner, in_progress in found.finish:
            if _owner_dead(owner) and in_progress:
                qubes.remove_tag(name, IN_PROGRESS)
        for name, owner, _ in found.finish:
            if _owner_dead(owner):
                qubes.remove_tag(name, owner)
                finished.add(name)
        if finished:
            done.append(f"finished the commit of VM(s) {', '.join(sorted(finished))} (a killed restore's)")
        # All at once: a VM of one dead restore may use a VM of another (two restores that ran side by side)
        # as its template or netvm, so removing restore by restore would leave the one still referenced.
        doomed = [name for name, owner in found.remove if _owner_dead(owner)]
        left = _remove_all(qubes, doomed)
        done += [f"removed VM {name} (left by a killed restore)" for name in doomed if name not in left]
        done += [f"could not remove VM {name} (left by a killed restore): remove it with qvm-remove"
                 for name in left]  # fmt: skip
    if home is not None and (found.staging_remove or found.staging_move):
        with _home_lock(home):
            for path in found.staging_remove:
                if path.is_dir() and _owner_dead(OWNER_PREFIX + path.name[len(STAGING_PREFIX) :]):
                    shutil.rmtree(path, ignore_errors=True)
                    done.append(f"removed the unfinished dom0-home staging ~/{path.name}")
            for path, to, src in found.staging_move:
                if not path.is_dir() or not _owner_dead(OWNER_PREFIX + path.name[len(STAGING_PREFIX) :]):
                    continue
                dst = _free_path(home / to)
                os.rename(path / src, dst)
                _fsync_dir(home)
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"moved a killed restore's verified dom0 home to ~/{dst.name}")
    return done


def cleanup_leftovers(qubes: Qubes) -> list[str]:
    """Find and undo what killed restores left of VMs; returns the names of the VMs removed."""
    found = find_leftovers(qubes, None)
    clean_leftovers(qubes, found, None)
    vms = set(qubes.vm_list())
    return [name for name, _ in found.remove if name not in vms]


def cleanup_home_staging(home: Path) -> list[Path]:
    """Remove (or, when its restore had reached its commit, move into place) home staging no live restore
    owns; returns the stagings handled."""
    found = find_leftovers(None, home)
    clean_leftovers(None, found, home)
    return [*found.staging_remove, *(p for p, _, _ in found.staging_move)]


def _remove_all(qubes: Qubes, names: list[str]) -> list[str]:
    """Remove VMs, dependants first; a VM still referenced by another one of the list is retried after
    it.  Returns the names that could not be removed."""
    left = list(reversed(names))
    for _round in range(3):
        failed = []
        for name in left:
            try:
                qubes.remove_vm(name)
            except BackupError:
                failed.append(name)
        if not failed or len(failed) == len(left):
            left = failed
            break
        left = failed
    for name in left:  # last resort: drop its references to other VMs of ours, then try again
        for prop in LAST_PASS:
            with contextlib.suppress(BackupError):
                qubes.reset_property(name, prop)
    return [n for n in left if not _try_remove(qubes, n)]


def _try_remove(qubes: Qubes, name: str) -> bool:
    try:
        qubes.remove_vm(name)
    except BackupError:
        return False
    return True


# -------------------------------------------------------------------------------------------------- sinks

FINISHING = 2  # volume imports finished at once beside the extraction (each one is a process)


class Finisher:
    """Finishes volume imports on background threads: a volume's trailing hole (often most of it: a
    2 GiB private volume holding 50 MiB), the service's fdatasync and ImportEnd overlap the extraction of
    the next volumes.  At most FINISHING at a time (``submit`` waits for a free slot).  The first failure
    is raised by the next ``submit`` or by ``wait`` (the commit waits for every import)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=FINISHING, thread_name_prefix="import-finish")
        self._slots = threading.BoundedSemaphore(FINISHING)
        self._futures: list[Future[None]] = []

    def submit(self, fn: Callable[[], None]) -> None:
        self.check()
        self._slots.acquire()
        try:
            future = self._pool.submit(fn)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)

    def check(self) -> None:
        for f in self._futures:
            if f.done() and f.exception() is not None:
                f.result()

    def wait(self) -> None:
        for f in self._futures:
            f.result()

    def close(self) -> None:
        """Wait for the threads (after the imports were aborted, they end at once); errors are dropped."""
        self._pool.shutdown(wait=True)


class ImportSink:
    """A volume import fed by the extractor: data at ascending offsets, holes as zeros (the import service
    takes exactly SIZE bytes and writes them sparsely).  With a ``finisher`` the end of the import (the
    trailing hole, the service's own finishing) runs in the background."""

    def __init__(self, imp: VolumeImport, finisher: Finisher | None = None) -> None:
        self.imp = imp
        self.pos = 0
        self.finisher = finisher

    def write_at(self, offset: int, data: memoryview) -> None:
        if offset > self.pos:
            self.imp.write_zeros(offset - self.pos)
        self.imp.write(data)
        self.pos = offset + len(data)

    def finish(self, size: int) -> None:
        tail, self.pos = size - self.pos, size
        if self.finisher is None:
            self._finish(tail)
        else:
            self.finisher.submit(lambda: self._finish(tail))

    def _finish(self, tail: int) -> None:
        if tail > 0:
            self.imp.write_zeros(tail)
        self.imp.finish()

    def abort(self) -> None:
        self.imp.abort()


@dataclass
class _VmFiles:
    """Where one VM archive's entries go."""

    volumes: dict[str, str]  # path in the archive -> volume name
    firewall: str
    notes: str


def _vm_files(plan: RestorePlan, action: VmAction) -> _VmFiles:
    dom = plan.backup[action.name]
    base = (dom.features.get("backup-path") or plan.backup.vm_dir(dom) or "").rstrip("/")
    volumes: dict[str, str] = {}
    for vol in dom.volumes:
        if vol.save_on_stop and not _VOLUME_NAME.fullmatch(vol.name):
            # it would be the import service's argument: a plain volume name or nothing
            raise VerificationError(f"VM {action.name}: the backup names a volume {vol.name[:40]!r}, which is no "
                                    "valid volume name")  # fmt: skip
        if vol.save_on_stop:
            volumes[f"{base}/{vol.name}.img"] = vol.name
            driver = plan.backup.pools.get(vol.pool, {}).get("driver")
            if vol.vid and "/" in vol.vid and driver in FILE_DRIVERS:
                volumes.setdefault(f"{vol.vid}.img", vol.name)  # backups of file pools name the image by vid
    return _VmFiles(volumes, f"{base}/firewall.xml", f"{base}/notes.txt")


@dataclass(frozen=True)
class BackedUpDevice:
    """One device assignment in the backup's qubes.xml: an R4.2 backup's ``<device backend-domain id>`` (a
    persistent assignment: no mode, no identity), an R4.3 backup's with ``mode`` and ``identity`` (the
    device's own id; ``*``: whatever is in that port)."""

    devclass: str
    backend: str
    port: str
    identity: str
    mode: str | None  # None: R4.2's persistent assignment
    options: dict[str, str]


def _devices(dom: Domain) -> Iterator[BackedUpDevice]:
    for devs in dom.element.iterfind("devices"):
        for dev in devs.iterfind("device"):
            options = {o.get("name", ""): o.text or "" for o in dev.iterfind("option")}
            mode = dev.get("mode")
            legacy = dev.get("required")  # R4.3's own reader takes this older spelling too
            if mode is None and legacy is not None:
                mode = "required" if legacy.lower() in ("1", "yes", "true", "on") else "auto-attach"
            identity = options.pop("identity", None) or dev.get("identity") or ANY
            yield BackedUpDevice(devs.get("class", ""), dev.get("backend-domain", ""), dev.get("id", ANY),
                                 identity, mode, options)  # fmt: skip


def map_device(dev: BackedUpDevice, backend: str, release: str) -> tuple[DeviceAssignment | None, str | None]:
    """The assignment to make on this system (of ``release``) for one in the backup, and what to tell the
    user about it (None: nothing).

    R4.3 here: the backup's mode and device identity; an R4.2 backup's persistent assignment becomes
    ``required`` for PCI and block devices (as R4.3's qubesd reads an R4.2 qubes.xml, and as Qubes' own
    restore does) and ``auto-attach`` for the others (R4.3 makes only PCI and block devices required).
    R4.2 here: R4.2's only kind, a persistent assignment of a port (attached whenever the VM starts): an
    assignment of a device identity in any port cannot be made; a device identity is dropped and a mode
    other than required is said."""
    if release != RELEASE_42:
        mode = dev.mode or ("required" if dev.devclass in ("pci", "block") else "auto-attach")
        return DeviceAssignment(backend, dev.port, dev.identity, mode, dev.options), None
    if dev.port == ANY:
        return None, f"R4.2 assigns devices by port only (this assigns device {dev.identity} in any port)"
    notes = []
    if dev.identity != ANY:
        notes.append(f"assigned by port only (R4.2 has no device identities: {dev.identity})")
    if dev.mode not in (None, "required"):
        notes.append(f"{dev.mode} on R4.3, attached whenever the VM starts on R4.2")
    return DeviceAssignment(backend, dev.port, ANY, "required", dev.options), "; ".join(notes) or None


def _label_color(backup: Collection, label: str) -> str | None:
    """The colour (``0xRRGGBB``) the backup's qubes.xml gives label ``label``."""
    labels = backup.root.find("labels")
    for el in [] if labels is None else labels.iterfind("label"):
        if el.text == label:
            return el.get("color")
    return None


# ------------------------------------------------------------------------------------------------ applier

class Applier:
    """Creates the plan's VMs, feeds their data, commits — or removes everything it created."""

    def __init__(self, qubes: Qubes, plan: RestorePlan, home_dir: Path) -> None:
        self.qubes = qubes
        self.plan = plan
        self.home_dir = home_dir
        self.owner = new_owner_tag()
        self.created: list[str] = []
        self.warnings: list[str] = []
        self.committed = False
        self.home_staging: Path | None = None
        self.home_restored_to: Path | None = None
        self.created_labels: list[str] = []
        self._creating: str | None = None  # the VM being created (Create sent, not yet in self.created)
        self._before: set[str] = set()  # the VMs there were before the first creation
        self._labels_later: dict[str, tuple[str, str]] = {}  # VM -> (label, colour) to create at the commit
        self._imports: list[VolumeImport] = []
        self._lock = threading.Lock()
        self._finisher = Finisher()

    # -- 1, 2: create
    def create_all(self) -> None:
        """Create every restored VM: templates, then templates for disposables, then the rest (Qubes' own
        restore order; a VM's template is thereby created before it, whatever order the manifest has)."""
        labels = set(self.qubes.labels())
        self._before = set(self.qubes.vm_list())
        for action in sorted(self._restored(), key=self._rank):
            self._create(action, labels)

    def _restored(self) -> list[VmAction]:
        return [a for a in self.plan.vms if a.restore and a.archive is not None]

    def _rank(self, action: VmAction) -> int:
        dom = self.plan.backup[action.name]
        if dom.klass == "TemplateVM":
            return 0
        return 1 if dom.raw_property("template_for_dispvms") == "True" else 2

    def _create(self, action: VmAction, labels: set[str]) -> None:
        dom = self.plan.backup[action.name]
        name = action.target_name
        label = dom.label or "red"
        if label not in labels:  # a label of the user's (admin.label.Create): made at the commit, red till then
            color = _label_color(self.plan.backup, label)
            if color is not None and _LABEL.fullmatch(label) and not label.isdigit() and _COLOR.fullmatch(color):
                self._labels_later[name] = (label, color)
            else:
                self.warnings.append(f"VM {name}: label {label} does not exist here; using red")
            label = "red"
        explicit, template = self.plan.reference(action, "template")
        self._creating = name  # an interruption from here until it is in self.created: see rollback
        try:  # qubesd's error names dom0 (the call's destination), not the VM
            if dom.klass in ("AppVM", "DispVM"):
                self.qubes.create_vm(dom.klass, name, label, template if explicit else None)
            else:
                self.qubes.create_vm(dom.klass, name, label, None)
        except BackupError as e:
            self._creating = None  # qubesd answered: it did not create it
            raise BackupError(f"restoring VM {name}: cannot create it: {e}") from None
        self.created.append(name)
        self._creating = None
        self.qubes.set_tag(name, IN_PROGRESS)  # before any other write to the new VM
        self.qubes.set_tag(name, self.owner)
        settings = self.plan.settings
        props = dom.properties
        if "template_for_dispvms" in props:
            self.qubes.set_property(name, "template_for_dispvms", props["template_for_dispvms"])
        for prop, value in props.items():
            if prop in SKIP_PROPERTIES or prop in LAST_PASS or settings.dropped(dom.name, "property", prop):
                continue
            try:
                self.qubes.set_property(name, prop, value)
            except QubesdError as e:
                if e.exc_type == "QubesNoSuchPropertyError":  # e.g. R4.3's bootmode restored on R4.2
                    self.warnings.append(f"VM {name}: property {prop} does not exist on this Qubes release; "
                                         f"not restored ({value!r})")  # fmt: skip
                    continue
                if prop not in SOFT_PROPERTIES:
                    raise BackupError(f"restoring VM {name}: property {prop}: {e}") from None
                self.warnings.append(f"VM {name}: {prop} {value!r} refused here ({e}); left at the default")
            except BackupError as e:
                if prop not in SOFT_PROPERTIES:
                    raise BackupError(f"restoring VM {name}: property {prop}: {e}") from None
                self.warnings.append(f"VM {name}: {prop} {value!r} refused here ({e}); left at the default")
        # the restored data is this backup's: its (authenticated) creation time is the VM's last backup
        created = int(self.plan.header.created_datetime.timestamp())
        try:
            self.qubes.set_property(name, "backup_timestamp", str(created))
        except BackupError as e:
            self.warnings.append(f"VM {name}: backup_timestamp not set ({e})")
        for feature, value in dom.features.items():
            if feature in ("backup-content", "backup-path", "backup-size"):
                continue
            if not settings.dropped(dom.name, "feature", feature):
                self.qubes.set_feature(name, feature, value)
        for tag in dom.tags:
            # Tags a policy trusts never come back, whatever was granted (risk.py); the rest as the plan says.
            if not risk.is_restore_tag(tag) and not settings.dropped(dom.name, "tag", tag):
                self.qubes.set_tag(name, tag)
        release = self.qubes.release
        for dev in _devices(dom):
            if settings.dropped(dom.name, "device", f"{dev.devclass}:{dev.backend}:{dev.port}"):
                continue
            backend = self.plan.renames.get(dev.backend, dev.backend)
            what = f"{dev.devclass} device {backend}:{dev.port}"
            assignment, note = map_device(dev, backend, release)
            try:
                if assignment is None:
                    raise BackupError(note or "")
                self.qubes.assign_device(name, dev.devclass, assignment)
            except BackupError as e:  # as Qubes' restore: the VM is fine without it; say so
                self.warnings.append(f"VM {name}: {what} not assigned: {e}")
                continue
            if note:
                self.warnings.append(f"VM {name}: {what}: {note}")

    # -- 3: data
    def target_for(self, archive: manifest_mod.ArchiveEntry) -> ArchiveTarget:
        if archive.kind == "home":
            self.home_staging = _make_home_staging(self.home_dir, self.owner)
            return ArchiveTarget(dest=self.home_staging / archive.member)
        action = next(a for a in self.plan.vms if a.archive is archive)
        files = _vm_files(self.plan, action)
        name = action.target_name

        def set_firewall(data: bytes) -> None:
            try:
                rules = firewall.xml_to_rules(data)
            except (BackupError, etree.LxmlError) as e:
                raise VerificationError(f"VM {name}: firewall rules in the backup are malformed: {e}") from None
            if risk.RISKY not in self.plan.settings.granted:
                default = self.qubes.firewall_rules(name)  # what qubesd gave the new VM
                if firewall.wider(rules, default):
                    setting = risk.Setting(action.name, "firewall", "firewall", "", risk.RISKY)
                    self.warnings.append(self.plan.settings.warning(setting, name))
                    return
            self.qubes.set_firewall(name, rules)

        def set_notes(data: bytes) -> None:
            try:
                if not self.qubes.set_notes(name, data.decode("utf-8", "replace")):
                    self.warnings.append(f"VM {name}: notes not restored (this Qubes release has no notes)")
            except BackupError as e:  # as a device: the VM is fine without them; say so
                self.warnings.append(f"VM {name}: notes not restored ({e})")

        def sinks(entry: tarwriter.InnerFile) -> extractor.FileSink | None:
            # Backups put firewall.xml and notes.txt before the volumes: they are applied as soon as they are
            # complete (verified chunks; the VM is still tagged in progress), before the VM's data is imported.
            if entry.path == files.firewall:
                return MemorySink(entry.path, entry.size, MAX_FIREWALL, set_firewall)
            if entry.path == files.notes:
                return MemorySink(entry.path, entry.size, MAX_NOTES, set_notes)
            if entry.path in files.volumes:
                imp = self.qubes.import_volume(name, files.volumes[entry.path], entry.size)
                with self._lock:
                    self._imports.append(imp)
                return ImportSink(imp, self._finisher)
            return None  # other files of older backups (icons ...): verified, then dropped

        return ArchiveTarget(sinks=sinks)

    # -- 4, 5: last pass and commit
    def commit(self) -> None:
        self._finisher.wait()  # every volume imported (ImportEnd accepted) before anything is committed
        self._finisher.close()
        self._restore_labels()
        offline = self._without_network()
        for action in self._restored():
            for prop in LAST_PASS:
                if self.plan.settings.dropped(action.name, "property", prop):
                    continue
                explicit, value = self.plan.reference(action, prop)
                if prop == "netvm" and explicit and value in offline:
                    self.warnings.append(f"VM {action.target_name}: netvm {value} not set ({value}'s "
                                         "provides_network was not restored): it has no network; set it with "
                                         f"qvm-prefs {action.target_name} netvm")  # fmt: skip
                    value = None
                if explicit:
                    self._set_reference(action.target_name, prop, value)
        if self.home_staging is not None:
            _fsync_tree(self.home_staging)
            self._mark_home_committed()
        for name in self.created:  # the commit: from here on, the restore is finished even if killed
            self.qubes.remove_tag(name, IN_PROGRESS)
        self.committed = True
        for name in self.created:
            self.qubes.remove_tag(name, self.owner)
        self._move_home()
        release_owner_tag(self.owner)

    def _mark_home_committed(self) -> None:
        """The staging's mark: complete and verified, and where it goes.  A restore killed from here on
        has its home moved into place by the next one (unless its VMs were all still in progress: then it
        is rolled back as a whole, home included)."""
        plan, staging = self.plan, self.home_staging
        if staging is None or plan.home is None or plan.home_target is None:
            return
        user_dir = next(f.path for f in plan.home.files)
        mark = json.dumps({"from": f"{plan.home.member}/{user_dir}", "to": plan.home_target}).encode()
        fd = os.open(staging / COMMITTED_MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, mark)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(staging)

    def _without_network(self) -> set[str]:
        """Names (here) of restored VMs whose provides_network from the backup is not restored: other VMs
        cannot use them as netvm (qubesd refuses); they stay offline instead of using another netvm."""
        return {a.target_name for a in self._restored()
                if self.plan.settings.dropped(a.name, "property", "provides_network")}  # fmt: skip

    def _restore_labels(self) -> None:
        """The user's own labels the backup's VMs have and this system lacks: created with the backup's colour
        (``admin.label.Create``) and set, now that everything verified; removed again by a rollback."""
        if not self._labels_later:
            return
        existing = set(self.qubes.labels())
        for name, (label, color) in self._labels_later.items():
            if label not in existing:
                try:
                    self.qubes.create_label(label, color)
                except BackupError as e:
                    self.warnings.append(f"VM {name}: label {label} ({color}) could not be created ({e}); using red")
                    continue
                self.created_labels.append(label)
                existing.add(label)
            self.qubes.set_property(name, "label", label)

    def _set_reference(self, name: str, prop: str, value: str | None) -> None:
        try:
            self.qubes.set_property(name, prop, value or "")
        except BackupError as e:
            if prop in ("netvm", "default_dispvm"):
                raise BackupError(f"restoring VM {name}: {prop} {value or 'none'}: {e}") from None
            self.warnings.append(f"VM {name}: {prop} {value!r} refused here ({e}); left at the default")

    def _move_home(self) -> None:
        plan = self.plan
        if self.home_staging is None or plan.home is None or plan.home_target is None:
            return
        user_dir = next(f.path for f in plan.home.files)
        with _home_lock(self.home_dir):
            dst = _free_path(self.home_dir / plan.home_target)
            os.rename(self.home_staging / plan.home.member / user_dir, dst)
            _fsync_dir(self.home_dir)
        self._drop_home_staging()
        self.home_restored_to = dst

    def _drop_home_staging(self) -> None:
        """Delete the home staging and forget it as a live restore's (idempotent)."""
        if self.home_staging is not None:
            shutil.rmtree(self.home_staging, ignore_errors=True)
            release_owner_tag(self.home_staging.name)  # its name ends in the nonce, like an owner tag
            self.home_staging = None

    # -- rollback
    def abort_imports(self) -> None:
        """From any thread: stop running imports, all at once: each one's input ends (its service then ends the
        import itself), then each is waited for (and killed only when it does not end: VolumeImport.abort)."""
        with self._lock:
            imports = list(self._imports)
        for imp in imports:
            imp.hang_up()
        for imp in imports:
            imp.abort()

    def rollback(self) -> None:
        """Remove every VM this restore created (before the commit) and the home staging."""
        self.abort_imports()
        self._finisher.close()  # no import thread writes any more
        self._drop_home_staging()  # first: also when some VM cannot be removed
        pending, self._creating = self._creating, None
        if pending is not None and pending not in self.created and not self.committed:
            # interrupted while qubesd was creating it (SIGTERM, Ctrl-C during admin.vm.Create): a VM of that
            # name that was not there before is this restore's (qubesd refuses to create an existing name)
            with contextlib.suppress(BackupError):
                if pending in self.qubes.vm_list() and pending not in self._before:
                    self.created.append(pending)
        if not self.committed and self.created:
            left = _remove_all(self.qubes, self.created)
            if left:
                release_owner_tag(self.owner)  # the next restore cleans them up
                raise BackupError(f"could not remove VM(s) {', '.join(left)} created by this restore; "
                                  "remove them with qvm-remove")  # fmt: skip
        if not self.committed:
            for label in self.created_labels:  # unused again once its VMs are gone
                with contextlib.suppress(BackupError):
                    self.qubes.remove_label(label)
            self.created_labels.clear()
        release_owner_tag(self.owner)


# --------------------------------------------------------------------------------------------- dom0 home

@contextlib.contextmanager
def _home_lock(home: Path) -> Iterator[None]:
    """Serialises stale-staging cleanup and the final rename of concurrent restores."""
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _make_home_staging(home: Path, owner: str | None = None) -> Path:
    """A new staging directory named after the restore's owner tag (``owner``; a new one if None): a killed
    restore's staging and VMs are thereby one group for the next restore's clean-up (``find_leftovers``)."""
    if not home.is_dir():
        raise BackupError(f"cannot restore dom0's home: {home} does not exist")
    owner = owner or new_owner_tag()
    path = home / (STAGING_PREFIX + owner[len(OWNER_PREFIX) :])
    path.mkdir(mode=0o700)
    with _live_lock:
        _live_nonces.add(path.name.rsplit("-", 1)[-1])
    return path


def _free_path(path: Path) -> Path:
    if not os.path.lexists(path):
        return path
    for i in range(1, 1000):
        candidate = path.with_name(f"{path.name}-{i}")
        if not os.path.lexists(candidate):
            return candidate
    raise BackupError(f"no free name to restore dom0's home beside {path}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(tree: Path) -> None:
    """fsync every regular file and directory under ``tree`` (no symlink followed; errors are errors)."""

    def fail(e: OSError) -> None:
        raise e

    try:
        for _dirpath, _dirnames, filenames, dirfd in os.fwalk(tree, onerror=fail):
            for name in filenames:
                if not stat.S_ISREG(os.lstat(name, dir_fd=dirfd).st_mode):
                    continue  # symlinks are made durable by their directory
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.fsync(dirfd)
    except OSError as e:
        raise BackupError(f"cannot write the restored home to disk: {e.strerror or e}") from None
