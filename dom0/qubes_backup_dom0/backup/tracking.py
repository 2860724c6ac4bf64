"""Change tracking for repository backups on lvm_thin (docs/CHANGE-TRACKING.md): it decides what is READ, never
what is stored.

While planning, each lvm_thin volume gets a new read-only snapshot (``ORIGIN-qbbase-REPO8-RANDOM``, qubes/bases.py)
instead of the transient one.  If the repository dom0 recorded at this location has a base of that volume
taken for dom0's recorded newest root, of the same size, VM (uuid) and pool, ``thin_delta`` says which blocks
may differ; only the repository blocks touching them are scanned and read.  Anything else reads the volume in
full: ``--rescan``, no base (first run, deleted by the user or by Qubes, another repository's), a re-created VM,
a grown or shrunk volume, thin_delta failing or saying anything unexpected, a thin pool above 90 % use.

While writing (``reuse``), a tracked file takes the ids of its unchanged blocks from the parent snapshot's map of
the same file, which dom0 fetched and verified this run, only when that parent is exactly the root the base was
taken for, with the same block size and file size; otherwise the file is scanned and read in full there and
then.  After the snapshot's root is committed and dom0's record written, ``promote`` makes each new snapshot the
volume's base (the old one removed); a failed run removes the new snapshots (``close``) and keeps the old bases,
which stay valid.  Leftovers of a killed run are removed when the next backup starts.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from qubes_backup_dom0.backup.plan import PlannedVolume, _fd_stamp
from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.format import repotree, sparse, tarwriter
from qubes_backup_dom0.qubes import bases, fiemap, pools, reflinkbases, repostate, thinmap
from qubes_backup_dom0.qubes.bases import OurLv
from qubes_backup_dom0.qubes.system import System

NO_ANSWER_LVM = "thin_delta gave no usable answer"
SNAPSHOT_THREADS = 2  # lvcreate processes at a time (lvm serializes them on the VG lock; their start-up overlaps)
NO_ANSWER_REFLINK = "the extents of its base and its copy could not be compared (FIEMAP)"


@dataclass
class Tracked:
    """One lvm_thin volume read through a new snapshot that becomes its base after a successful run."""

    ref: pools.VolumeRef
    vg: str
    origin: str
    snapshot: str  # the new snapshot's LV name
    size: int
    fd: int
    base: OurLv | None = None
    changed: list[tuple[int, int]] | None = None  # byte ranges (repository blocks) that may differ; None: all
    block_size: int = 0  # of the repository the base was taken for (the alignment of ``changed``)
    why: str = ""  # why the volume is read in full
    promoted: bool = False
    base_root: str | None = None  # the root the base was taken for
    vm_uuid: str | None = None
    image: Path | None = None  # file-reflink: the new copy (``next-PID/KEY.img``)
    pool_dir: Path | None = None  # file-reflink: the pool's directory
    check: list[tuple[int, int]] | None = None  # --rescan: tracking's answer, compared with what is read
    expected: tuple[set[int], dict[int, str]] | None = None  # (blocks tracking would read, the parent's map)
    missed: int = 0  # blocks --rescan found changed that tracking would have reused
    reused: bool = False  # unchanged since its base: no new snapshot, the base itself is kept (``snapshot``)
    held: contextlib.ExitStack | None = None  # closed when the planned volume is released


@dataclass
class Prepared:
    """A new snapshot taken before planning (``Tracking.prepare``) and what thin_delta said of it."""

    name: str  # the new snapshot's LV name
    identity: pools.Identity | None  # the committed LV's, right after the snapshot (None: it changed meanwhile)
    lv: OurLv | None = None  # the new snapshot as lvs lists it (thin id, size), None: unknown
    delta: list[tuple[int, int]] | None = None  # thin_delta's ranges against the base
    asked: bool = False  # thin_delta was run (``delta`` None then: no usable answer)


@dataclass
class Tracking:
    system: System
    location: str  # VM:PATH of the repository, as dom0's record names it
    rescan: bool = False
    notes: list[str] = field(default_factory=list)
    tracked: dict[int, Tracked] = field(default_factory=dict)  # id(InnerFile) ->
    _repo: str | None = None
    _record_root: str | None = None
    _ours: list[OurLv] | None = None
    _lv_sizes: dict[tuple[str, str], int] = field(default_factory=dict)
    _pools: dict[tuple[str, str], bool] = field(default_factory=dict)
    _dirs: dict[Path, bool] = field(default_factory=dict)  # file-reflink pools: bases kept there
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _prepared: dict[tuple[str, str], Prepared] = field(default_factory=dict)  # (vg, origin) ->
    _lvs: dict[tuple[str, str], OurLv] = field(default_factory=dict)  # every LV, from _start's lvs
    _unchanged: dict[tuple[str, str], OurLv] = field(default_factory=dict)  # (vg, origin) -> its base, kept
    _against_lv: dict[tuple[str, str], tuple[int, list[tuple[int, int]]]] = field(default_factory=dict)
    # ^ (vg, origin) -> (the committed LV's thin id, thin_delta's ranges between the base and it)

    def __post_init__(self) -> None:
        owners = repostate.owners(self.system, self.location)
        if len(owners) == 1:
            self._repo = owners[0]
            state = repostate.load(self.system, owners[0])
            self._record_root = state.root if state is not None else None

    # -- start: leftovers of killed runs, orphaned bases -------------------------------------------------

    def _start(self) -> list[OurLv]:
        """Called once, with the lock held: remove our leftovers (one lvremove) and list our bases."""
        if self._ours is not None:
            return self._ours
        for pool in thinmap.release_stale(self.system, pools._pid_alive):
            self.notes.append(f"released the metadata snapshot of thin pool {pool} left by a killed backup")
        ours, self._lvs = bases.list_lvs(self.system)
        drop = [lv for lv in ours if lv.is_next and not _alive(lv.tag(bases.PID))]
        drop += [lv for lv in ours if lv.is_base and (lv.vg, lv.tag(bases.ORIGIN)) not in self._lvs]  # VM removed
        drop += _superseded([lv for lv in ours if lv.is_base and lv not in drop], self.system)
        bases.remove(self.system, [lv.spec for lv in drop], "leftover change-tracking snapshots")
        self._ours = [lv for lv in ours if lv not in drop]
        return self._ours

    def _pool_ok(self, vg: str, pool: str) -> bool:
        """No base in a thin pool above 90 % data or metadata use: its bases are released (once per pool)."""
        key = (vg, pool)
        if key not in self._pools:
            usage = bases.pool_usage(self.system, vg, pool)
            ok = usage is not None and max(usage) <= bases.POOL_LIMIT
            if not ok:
                assert self._ours is not None
                drop = [lv for lv in self._ours if lv.vg == vg and lv.pool == pool]
                bases.remove(self.system, [lv.spec for lv in drop], "change-tracking bases")
                self._ours = [lv for lv in self._ours if lv not in drop]
                use = "unknown" if usage is None else f"data {usage[0]:g} %, metadata {usage[1]:g} %"
                self.notes.append(f"thin pool {vg}/{pool} is above {bases.POOL_LIMIT:g} % use ({use}): no "
                                  f"change-tracking bases kept there ({len(drop)} released), its volumes are read "
                                  "in full")  # fmt: skip
            self._pools[key] = ok
        return self._pools[key]

    # -- before planning: every new snapshot, then one lvs and one reservation per pool -----------------------

    def prepare(self, volumes: list[tuple[pools.VolumeRef, str | None, bool]]) -> None:
        """Before planning, for every lvm_thin volume to be backed up (``(ref, vm uuid, live)``): first, on one
        reserved metadata snapshot per pool, thin_delta between each usable base and the committed LV itself;
        a volume that maps exactly as its base (and is not written in place) keeps that base and takes no new
        snapshot (``_unchanged``).  Then a new snapshot of every other volume, all listed by one ``lvs``; one that
        is of the very LV compared (same thin id, device not replaced, not live) maps as that LV did, so its delta
        is the one already had; the others are compared with their bases on one more reservation per pool.
        ``plan_volume`` uses what was prepared (and does it all itself for a volume not prepared)."""
        todo: list[tuple[str, str, str, str | None, pools.VolumeRef, bool]] = []
        fresh = self._ours is None  # the lvs listing the committed LVs' thin ids comes after ``seen``
        seen: dict[tuple[str, str], pools.Identity] = {}
        for ref, vm_uuid, live in volumes:
            if ref.driver != "lvm_thin":
                continue
            vg, origin = pools._lv_path(ref.vid, ref)
            seen[(vg, origin)] = pools._dev_identity(self.system.dev_dir / vg / origin)
            pool = ref.pool_info.get("thin_pool", "")
            with self._lock:
                self._start()
                if not pool or not self._pool_ok(vg, pool) or any(k[:2] == (vg, origin) for k in todo):
                    continue
            todo.append((vg, origin, pool, vm_uuid, ref, live))
        if fresh and not self.rescan:
            todo = self._keep_unchanged(todo, seen)
        if not todo:
            return
        with ThreadPoolExecutor(max_workers=SNAPSHOT_THREADS, thread_name_prefix="snapshot") as workers:
            jobs = [workers.submit(self._snapshot, vg, origin, uuid, ref) for vg, origin, _p, uuid, ref, _l in todo]
            for job in jobs:
                job.result()  # the first failure fails the run (close() removes what was made)
        listed = bases.list_lvs(self.system)[1]
        asks: dict[tuple[str, str], list[tuple[tuple[str, str], tuple[int, int, int]]]] = {}
        for vg, origin, pool, vm_uuid, _ref, live in todo:
            prep = self._prepared[(vg, origin)]
            prep.lv = listed.get((vg, prep.name))
            base, _bs, why = self._usable_base(vg, origin, pool, vm_uuid, prep.lv.size if prep.lv else None)
            known = self._against_lv.get((vg, origin))
            committed = listed.get((vg, origin))
            if known is not None and not live and not why and prep.lv is not None and committed is not None and \
                    committed.thin_id == known[0] and committed.size == prep.lv.size and \
                    prep.identity is not None and prep.identity == seen[(vg, origin)]:  # fmt: skip
                # the snapshot is of that very LV, which was not replaced and is not written in place: it maps as
                # the LV did when thin_delta compared it with the base
                prep.delta, prep.asked = known[1], True
            elif base is not None and prep.lv is not None and prep.lv.thin_id is not None and not why:
                assert base.thin_id is not None and prep.lv.size is not None
                asks.setdefault((vg, pool), []).append(((vg, origin), (base.thin_id, prep.lv.thin_id, prep.lv.size)))
        for (vg, pool), wanted in asks.items():
            answers = bases.deltas(self.system, vg, pool, [pair for _key, pair in wanted])
            for (key, _pair), ranges in zip(wanted, answers, strict=True):
                self._prepared[key].delta, self._prepared[key].asked = ranges, True

    def _keep_unchanged(self, todo: list[tuple[str, str, str, str | None, pools.VolumeRef, bool]],
                        seen: dict[tuple[str, str], pools.Identity]) -> list[tuple[str, str, str, str | None,
                                                                                  pools.VolumeRef, bool]]:  # fmt: skip
        """thin_delta of each usable base against the committed LV it was taken of (its thin id from _start's
        lvs, listed after ``seen``): those that map exactly the same, whose LV is not written in place
        (``live``) and was not replaced meanwhile (its device the same as in ``seen``), need no new snapshot:
        the base holds what the committed LV holds.  Returns the others."""
        asks: dict[tuple[str, str], list[tuple[tuple[str, str], OurLv, tuple[int, int, int]]]] = {}
        for vg, origin, pool, vm_uuid, _ref, live in todo:
            lv = self._lvs.get((vg, origin))
            if live or lv is None or lv.thin_id is None or lv.pool != pool or lv.size is None:
                continue
            base, _bs, why = self._usable_base(vg, origin, pool, vm_uuid, lv.size)
            if base is not None and not why:
                assert base.thin_id is not None
                asks.setdefault((vg, pool), []).append(((vg, origin), base, (base.thin_id, lv.thin_id, lv.size)))
        for (vg, pool), wanted in asks.items():
            answers = bases.deltas(self.system, vg, pool, [pair for _k, _b, pair in wanted])
            for (key, base, pair), ranges in zip(wanted, answers, strict=True):
                if ranges is None or pools._dev_identity(self.system.dev_dir / key[0] / key[1]) != seen[key]:
                    continue
                if ranges == []:
                    self._unchanged[key] = base
                else:
                    self._against_lv[key] = (pair[1], ranges)
        return [item for item in todo if item[:2] not in self._unchanged]

    def _snapshot(self, vg: str, origin: str, vm_uuid: str | None, ref: pools.VolumeRef) -> None:
        before = pools._dev_identity(self.system.dev_dir / vg / origin)
        name = bases.create_next(self.system, vg, origin, vm_uuid, f"cannot back up {ref.vm}: {ref.label}",
                                 self._repo)  # fmt: skip
        after = pools._dev_identity(self.system.dev_dir / vg / origin)
        with self._lock:
            self._prepared[(vg, origin)] = Prepared(name, after if before == after else None)

    def _usable_base(self, vg: str, origin: str, pool: str, vm_uuid: str | None,
                     size: int | None) -> tuple[OurLv | None, int, str]:  # fmt: skip
        """(the base, its block size, "") when thin_delta may be asked, else (None, 0, why the volume is read
        in full)."""
        assert self._ours is not None
        found = [lv for lv in self._ours if lv.is_base and lv.vg == vg and lv.tag(bases.ORIGIN) == origin
                 and self._repo is not None and lv.tag(bases.REPO) == self._repo]  # fmt: skip
        base = found[0] if len(found) == 1 else None
        bs_tag = base.tag(bases.BS) if base is not None else None
        if base is None:
            return None, 0, "no base of this repository (first backup, or the base was removed)"
        if base.tag(bases.ROOT) != self._record_root:
            return None, 0, "its base was taken for another snapshot than the newest one dom0 recorded"
        if vm_uuid is not None and base.tag(bases.VM) != vm_uuid:
            return None, 0, "the VM was re-created since its base was taken"
        if base.size != size:
            return None, 0, "the volume was resized since its base was taken"
        if base.thin_id is None or base.pool != pool:
            return None, 0, "its thin device ids are unknown"
        if bs_tag is None or not bs_tag.isdigit() or not 4096 <= int(bs_tag) <= 1 << 30:
            return None, 0, "its base has no usable block size tag"
        return base, int(bs_tag), ""

    # -- planning -------------------------------------------------------------------------------------------

    def plan_volume(self, ref: pools.VolumeRef, path: str, mtime: int, vm_uuid: str | None) -> PlannedVolume | None:
        """The planned volume read through a new snapshot (kept for promotion), or None: plan it as usual."""
        if ref.driver == "file-reflink":
            return self._plan_reflink(ref, path, mtime, vm_uuid)
        if ref.driver != "lvm_thin":
            return None
        vg, origin = pools._lv_path(ref.vid, ref)
        pool = ref.pool_info.get("thin_pool", "")
        with self._lock:
            self._start()
            if not pool or not self._pool_ok(vg, pool):
                return None
        origin_dev = self.system.dev_dir / vg / origin
        with self._lock:
            prep = self._prepared.pop((vg, origin), None)
            same = self._unchanged.pop((vg, origin), None)
        if same is not None:
            return self._plan_unchanged(ref, path, mtime, vm_uuid, vg, origin, same)
        if prep is not None:
            name, before, after = prep.name, prep.identity, prep.identity
        else:
            before = pools._dev_identity(origin_dev)
            name = bases.create_next(self.system, vg, origin, vm_uuid, f"cannot back up {ref.vm}: {ref.label}",
                                     self._repo)  # fmt: skip
        stack = contextlib.ExitStack()
        try:
            stack.callback(self._drop, vg, name)  # until the volume is planned
            if prep is None:
                after = pools._dev_identity(origin_dev)
            if before != after or before is None:
                raise BackupError(f"cannot back up {ref.vm}: {ref.label} changed while it was snapshotted; try again")
            fd = pools._open_snapshot(self.system.dev_dir / vg / name, ref)
            stack.callback(os.close, fd)
            t = Tracked(ref, vg, origin, name, os.lseek(fd, 0, os.SEEK_END), fd, vm_uuid=vm_uuid)
            self._decide(t, pool, vm_uuid, prep)
            scan = t.changed if t.changed is not None else self._provisioned(t)
            # read in full: the allocation map, no zero scan (the writer drops zero blocks); a delta: scanned
            f = tarwriter.InnerFile.from_fd(path, fd, t.size, ref.label, mtime, scan, zeros=t.changed is not None)
            stack.pop_all()
            held = contextlib.ExitStack()
            held.callback(os.close, fd)
            with self._lock:
                self.tracked[id(f)] = t
            return PlannedVolume(ref, f, ("lvm", vg, origin, after), fd, _fd_stamp(fd), held)
        except BaseException:
            stack.close()
            raise

    def _plan_unchanged(self, ref: pools.VolumeRef, path: str, mtime: int, vm_uuid: str | None, vg: str,
                        origin: str, base: OurLv) -> PlannedVolume:  # fmt: skip
        """A volume that maps exactly as its base: nothing to read, every block's id from the parent's map.  Its
        planned source is an empty memfd, never read (no region); should the parent's map not be the base's
        (``reuse``), a snapshot is taken there and then and read in full."""
        assert base.size is not None
        fd = os.memfd_create("qubes-backup-unchanged", os.MFD_CLOEXEC)
        held = contextlib.ExitStack()
        held.callback(os.close, fd)
        bs = int(base.tag(bases.BS) or 0)
        t = Tracked(ref, vg, origin, base.name, base.size, fd, base=base, changed=[], block_size=bs,
                    base_root=base.tag(bases.ROOT), vm_uuid=vm_uuid, reused=True, held=held)  # fmt: skip
        try:
            f = tarwriter.InnerFile.from_fd(path, fd, t.size, ref.label, mtime, [])
        except BaseException:
            held.close()
            raise
        with self._lock:
            self.tracked[id(f)] = t
        return PlannedVolume(ref, f, ("lvm", vg, origin, ("unchanged", base.name)), fd, _fd_stamp(fd), held)

    def _snapshot_now(self, t: Tracked, f: tarwriter.InnerFile) -> None:
        """An unchanged volume whose base turned out not to be the parent's: a new snapshot now, read in full
        (``f`` reads it from here on; its descriptor is closed with the planned volume)."""
        assert t.held is not None
        name = bases.create_next(self.system, t.vg, t.origin, t.vm_uuid, f"cannot back up {t.ref.vm}: {t.ref.label}",
                                 self._repo)  # fmt: skip
        t.snapshot, t.reused, t.base = name, False, None
        try:
            fd = pools._open_snapshot(self.system.dev_dir / t.vg / name, t.ref)
        except BaseException:
            self._drop(t.vg, name)
            t.promoted = True
            raise
        t.held.callback(os.close, fd)
        if os.lseek(fd, 0, os.SEEK_END) != t.size:
            raise BackupError(f"cannot back up {t.ref.vm}: {t.ref.label} changed since the backup was planned (its "
                              "size); run the backup again")  # fmt: skip
        t.fd = f.fd = fd

    def _drop(self, vg: str, name: str) -> None:
        bases.remove(self.system, [f"{vg}/{name}"], "the change-tracking snapshot")

    def _provisioned(self, t: Tracked) -> list[tuple[int, int]] | None:
        if t.image is not None or not sparse.reads_as_block_device(t.fd):
            return None
        return thinmap.provisioned(self.system, t.vg, t.snapshot, t.size)

    def _decide(self, t: Tracked, pool: str, vm_uuid: str | None, prep: Prepared | None = None) -> None:
        """Set ``t.changed`` (read only those) or ``t.why`` (read everything); ``prep``: what ``prepare`` asked
        already (used only when it is about this very snapshot, at this size)."""
        base, bs, why = self._usable_base(t.vg, t.origin, pool, vm_uuid, t.size)
        if base is not None:
            assert base.thin_id is not None
            if prep is not None and prep.asked and prep.lv is not None and prep.lv.size == t.size:
                ranges = prep.delta
            elif (new := bases.thin_id(self.system, t.vg, t.snapshot)) is None or new[1] != pool:
                ranges, why = None, "its thin device ids are unknown"
            else:
                ranges = bases.delta(self.system, t.vg, pool, base.thin_id, new[0], t.size)
            if why:
                t.why = why
            elif ranges is None:
                t.why = NO_ANSWER_LVM
            else:
                t.base, t.block_size, t.base_root = base, bs, base.tag(bases.ROOT)
                t.changed = _align(ranges, t.block_size, t.size)
        else:
            t.why = why
        if self.rescan:  # read in full; the delta, when there is one, is checked against what is read
            t.check, t.changed, t.why = t.changed, None, "--rescan"

    # -- file-reflink: a reflink copy as the base, FIEMAP per block --------------------------------------------

    def _reflink_dir_ok(self, pool_dir: Path) -> bool:
        """Once per pool: leftovers removed; above 90 % use of its filesystem no base is kept (all released)."""
        if pool_dir not in self._dirs:
            reflinkbases.cleanup(pool_dir, pools._pid_alive)
            use = reflinkbases.usage(pool_dir)
            ok = use is not None and use <= reflinkbases.POOL_LIMIT
            if not ok:
                dropped = reflinkbases.cleanup(pool_dir, pools._pid_alive, keep_all=False)
                shown = "unknown" if use is None else f"{use:.0f} %"
                self.notes.append(f"the filesystem of pool directory {pool_dir} is above {reflinkbases.POOL_LIMIT:g} "
                                  f"% use ({shown}): no change-tracking bases kept there ({len(dropped)} released), "
                                  "its volumes are read in full")  # fmt: skip
            self._dirs[pool_dir] = ok
        return self._dirs[pool_dir]

    def _plan_reflink(self, ref: pools.VolumeRef, path: str, mtime: int, vm_uuid: str | None) -> PlannedVolume | None:
        image = pools.image_path(self.system, ref)
        pool_dir = self.system.dom0_path(ref.pool_info.get("dir_path", ""))
        with self._lock:
            if not self._reflink_dir_ok(pool_dir):
                return None
        try:
            src = os.open(image, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None  # the usual path reports it
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                return None
            cloned = reflinkbases.clone_next(pool_dir, ref.vid, src)
        finally:
            os.close(src)
        if cloned is None:
            return None
        next_image, fd = cloned
        t = Tracked(ref, "", "", "", st.st_size, fd, vm_uuid=vm_uuid, image=next_image, pool_dir=pool_dir)
        try:
            self._decide_reflink(t)
            f = tarwriter.InnerFile.from_fd(path, fd, t.size, ref.label, mtime, t.changed, zeros=t.changed is not None)
        except BaseException:
            os.close(fd)
            reflinkbases.remove_next(next_image)
            raise
        held = contextlib.ExitStack()
        held.callback(os.close, fd)
        with self._lock:
            self.tracked[id(f)] = t
        identity = ("file", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return PlannedVolume(ref, f, identity, fd, _fd_stamp(fd), held)

    def _decide_reflink(self, t: Tracked) -> None:
        assert t.pool_dir is not None
        base = reflinkbases.load(t.pool_dir, self._repo, t.ref.vid) if self._repo else None
        if base is None:
            t.why = "no base of this repository (first backup, or the base was removed)"
        elif base.root != self._record_root:
            t.why = "its base was taken for another snapshot than the newest one dom0 recorded"
        elif t.vm_uuid is not None and base.vm != t.vm_uuid:
            t.why = "the VM was re-created since its base was taken"
        elif base.size != t.size:
            t.why = "the volume was resized since its base was taken"
        elif not 4096 <= base.block_size <= 1 << 30 or base.block_size & (base.block_size - 1):
            t.why = "its base has no usable block size"
        else:
            try:
                bfd = os.open(base.image, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                t.why = "its base cannot be opened" if not self.rescan else "--rescan"
                return
            try:
                ranges = fiemap.changed(bfd, t.fd, t.size, base.block_size)
            finally:
                os.close(bfd)
            if ranges is None:
                t.why = NO_ANSWER_REFLINK
            else:
                t.block_size, t.base_root, t.changed = base.block_size, base.root, ranges
        if self.rescan:
            t.check, t.changed, t.why = t.changed, None, "--rescan"

    # -- writing: the read-decision hook --------------------------------------------------------------------

    def reuse(self, f: tarwriter.InnerFile, parent: repotree.TreeFile | None, parent_blocks: list[tuple[int, str]],
              parent_root: str | None, block_size: int) -> dict[int, str] | None:  # fmt: skip
        """For a tracked file: the (block number -> data id) of the blocks not read, from the parent's verified
        map, or None (an untracked file, or one read in full: rescanned here if it was planned as a delta)."""
        t = self.tracked.get(id(f))
        if t is None:
            return None
        pairs = parent is not None and parent.type == "file" and parent.size == f.size and \
            block_size == t.block_size and parent_root is not None and parent_root == t.base_root  # fmt: skip
        if t.changed is None:
            if t.check is not None and pairs:  # --rescan: what tracking would have reused, checked after reading
                t.expected = (_blocks(t.check, block_size), dict(parent_blocks))
            return None
        if not pairs:
            if t.reused:
                self._snapshot_now(t, f)
            t.why, t.changed = "the repository's newest snapshot is not the one its base was taken for", None
            f.regions = sparse.allocated_or_scanned(t.fd, t.size, f.label or f.path, self._provisioned(t))
            f.data = sum(n for _, n in f.regions)
            return None
        read = _blocks(t.changed, block_size)
        return {i: did for i, did in parent_blocks if i not in read}

    def check(self, f: tarwriter.InnerFile, entries: list[tuple[int, str]]) -> None:
        """After a file read in full by ``--rescan``: did tracking's answer miss a block whose id changed?"""
        t = self.tracked.get(id(f))
        if t is None or t.expected is None:
            return
        read, parent = t.expected
        new = dict(entries)
        t.missed = sum(1 for i in set(parent) | set(new) if i not in read and parent.get(i) != new.get(i))

    def mismatches(self) -> list[str]:
        """One line per volume where ``--rescan`` found blocks change tracking had missed."""
        return [f"change tracking missed {t.missed} changed block{'s' if t.missed > 1 else ''} of {t.ref.label}: this "
                "snapshot read it in full and is right, snapshots since its last --rescan may hold stale blocks of "
                "it (thin_delta or FIEMAP answered wrongly; please report it)"
                for t in self.tracked.values() if t.missed]  # fmt: skip

    def full_reads(self) -> list[str]:
        """``VM volume: why`` for each tracked volume read in full."""
        return [f"{t.ref.label}: {t.why}" for t in self.tracked.values() if t.changed is None]

    def no_answer(self) -> int:
        """How many volumes had a usable base but were read in full because thin_delta or FIEMAP failed."""
        return sum(1 for t in self.tracked.values() if t.changed is None and t.why in (NO_ANSWER_LVM,
                                                                                     NO_ANSWER_REFLINK))

    # -- the end of a run ----------------------------------------------------------------------------------------

    def promote(self, repo_id: str, root_id: str, block_size: int) -> list[str]:
        """After the root is committed and dom0's record written: the new snapshots become the bases (the old
        ones of this repository removed).  Returns warnings (the backup itself is complete)."""
        warnings = self._promote_reflink(repo_id, root_id, block_size)
        kept = [t for t in self.tracked.values() if not t.promoted and t.reused]
        if kept:
            try:
                assert self._record_root is not None  # a base is reused only when it is of dom0's recorded root
                bases.retag(self.system, [f"{t.vg}/{t.snapshot}" for t in kept], self._record_root, root_id)
            except BackupError as exc:
                warnings.append(f"{exc}: the volumes are read in full next time")
            finally:
                for t in kept:
                    t.promoted = True
        todo = [t for t in self.tracked.values() if not t.promoted]
        if not todo:
            return warnings
        ours = self._ours or []
        origins = {(t.vg, t.origin) for t in todo}
        old = [lv for lv in ours if lv.is_base and lv.tag(bases.REPO) == repo_id
               and (lv.vg, lv.tag(bases.ORIGIN)) in origins]  # fmt: skip
        try:
            pairs = [(f"{t.vg}/{t.snapshot}", f"{t.vg}/{_final_name(t.snapshot, t.origin, repo_id)}") for t in todo]
            bases.promote(self.system, pairs, repo_id, root_id, block_size, [lv.spec for lv in old])
        except BackupError as exc:
            return [*warnings, f"{exc}: the volumes are read in full next time"]
        finally:
            for t in todo:
                t.promoted = True
        return warnings

    def _promote_reflink(self, repo_id: str, root_id: str, block_size: int) -> list[str]:
        warnings = []
        for t in self.tracked.values():
            if t.promoted or t.image is None or t.pool_dir is None:
                continue
            t.promoted = True
            base = reflinkbases.Base(t.image, root_id, block_size, t.vm_uuid, t.size)
            try:
                reflinkbases.promote(t.pool_dir, repo_id, t.ref.vid, t.image, base)
            except OSError as exc:
                reflinkbases.remove_next(t.image)
                warnings.append(f"cannot keep the change-tracking base of {t.ref.label}: {exc.strerror or exc}; it "
                                "is read in full next time")  # fmt: skip
            else:
                reflinkbases.remove_next(t.image.parent / ".none")  # the next-PID directory once empty
        return warnings

    def close(self) -> None:
        """Remove the new snapshots that were not promoted (a failed or cancelled run), and those prepared but
        never planned; idempotent."""
        with self._lock:
            unplanned, self._prepared = list(self._prepared.items()), {}
        bases.remove(self.system, [f"{vg}/{p.name}" for (vg, _o), p in unplanned], "the change-tracking snapshots")
        left = [t for t in self.tracked.values() if not t.promoted]  # a reused base stays: valid for its root
        for t in left:
            t.promoted = True
            if t.image is not None:
                reflinkbases.remove_next(t.image)
        bases.remove(self.system, [f"{t.vg}/{t.snapshot}" for t in left if t.image is None and not t.reused],
                     "the change-tracking snapshots")  # fmt: skip


def _final_name(snapshot: str, origin: str, repo_id: str) -> str:
    """The name a promoted base keeps: its own when it was created under a base name of this repository."""
    base = bases.base_name(origin, repo_id)
    return snapshot if snapshot.startswith(f"{base}-") else base


def _blocks(ranges: list[tuple[int, int]], bs: int) -> set[int]:
    return {i for off, n in ranges for i in range(off // bs, -(-(off + n) // bs))}


def _align(ranges: Iterable[tuple[int, int]], bs: int, size: int) -> list[tuple[int, int]]:
    """Byte ranges widened to whole repository blocks (clipped to ``size``), merged."""
    out: list[tuple[int, int]] = []
    for off, n in ranges:
        start, end = off // bs * bs, min(-(-(off + n) // bs) * bs, size)
        if out and out[-1][0] + out[-1][1] >= start:
            out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], end) - out[-1][0])
        else:
            out.append((start, end - start))
    return out


def _alive(pid: str | None) -> bool:
    return pid is not None and pid.isdigit() and pools._pid_alive(int(pid))


def _superseded(found: list[OurLv], system: System) -> list[OurLv]:
    """Of several bases of one volume for one repository (a run killed while promoting), all but the one taken
    for dom0's recorded root."""
    groups: dict[tuple[str, str | None, str | None], list[OurLv]] = {}
    for lv in found:
        groups.setdefault((lv.vg, lv.tag(bases.ORIGIN), lv.tag(bases.REPO)), []).append(lv)
    drop: list[OurLv] = []
    for (_vg, _origin, repo_id), lvs in groups.items():
        if len(lvs) < 2:
            continue
        state = None
        with contextlib.suppress(BackupError, ValueError):
            state = repostate.load(system, repo_id or "")
        keep = [lv for lv in lvs if state is not None and lv.tag(bases.ROOT) == state.root][:1]
        drop += [lv for lv in lvs if lv not in keep]
    return drop


def release_all(system: System, reflink_dirs: Iterable[Path] = (), lvm: bool = True) -> list[str]:
    """``--release-bases``: remove every base of ours and every new snapshot whose run is gone (lvm, and the
    file-reflink pool directories given); one line each."""
    lines = [f"Released {path}" for d in reflink_dirs for path in reflinkbases.cleanup(d, pools._pid_alive, False)]
    ours = bases.list_lvs(system)[0] if lvm else []
    drop = [lv for lv in ours if lv.is_base or not _alive(lv.tag(bases.PID))]
    bases.remove(system, [lv.spec for lv in drop], "change-tracking bases")
    for lv in drop:
        what = f"base of repository {lv.tag(bases.REPO)}" if lv.is_base else "unpromoted snapshot of a killed run"
        lines.append(f"Released {bases.describe(lv)} ({what})")
    return lines


def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)
