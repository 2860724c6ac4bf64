"""Base snapshots of lvm_thin volumes for change tracking (docs/CHANGE-TRACKING.md), and ``thin_delta``.

A *base* is a read-only thin snapshot of what the last successful repository backup read of a volume, kept in
dom0's pool until the next backup.  Everything about it is in its LV tags (``lvs -o lv_tags``), so a base is
found by its tags, never by its name alone:

- ``qubes-backup-base``: a promoted base; ``qubes-backup-next``: a new snapshot not yet promoted (removed at the
  next start when its process ``qbpid-PID`` is gone, or when its run fails);
- ``qbof-ORIGIN``: the committed LV it was taken of (``vm-NAME-VOLUME``); ``qbvm-UUID``: that VM's uuid, so a
  VM removed and re-created under the same name does not pair with the old one's base;
- ``qbrepo-ID``, ``qbroot-ID``, ``qbbs-N`` (added when promoted): the repository, the root of the snapshot it
  was read for and that repository's block size.  A base is used only against exactly that root.

Names say what it is to ``lvs`` and ``qvm-pool volumes`` users: ``ORIGIN-qbbase-REPO8-RANDOM`` (the first 8 hex
digits of the repository id, 6 random hex digits: each run's is new, so it is created under the name it keeps and
promotion renames nothing) when dom0 knows which repository the location holds, else (a first backup)
``ORIGIN-qbnext-PID``, renamed to ``ORIGIN-qbbase-REPO8`` when promoted; never ending in ``-snap``, ``-back`` or
``-import``, which qubesd treats as its own.

``thin_delta --metadata-snap --thin1 BASE --thin2 NEW POOL_tmeta`` (on a reserved metadata snapshot, released
by the same child as the thin map's, thinmap.on_metadata_snapshot) lists which blocks of the two devices map
differently; its XML is parsed strictly (anything unexpected: no delta, the volume is read in full).
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from qubes_backup_protocol.frames import safe_text

from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.qubes import thinmap
from qubes_backup_dom0.qubes.lvm import run_lvm
from qubes_backup_dom0.qubes.system import System

BASE_TAG = "qubes-backup-base"
NEXT_TAG = "qubes-backup-next"
ORIGIN, VM, REPO, ROOT, BS, PID = "qbof-", "qbvm-", "qbrepo-", "qbroot-", "qbbs-", "qbpid-"
POOL_LIMIT = 90.0  # percent of a thin pool's data or metadata above which no base is kept
_LV = re.compile(r"^[A-Za-z0-9_.+-]{1,127}$")
_NUM = re.compile(r"0|[1-9][0-9]{0,19}")
_PERCENT = re.compile(r"[0-9]{1,3}(\.[0-9]{1,6})?")
_KINDS = ("same", "different", "left_only", "right_only")


@dataclass(frozen=True)
class OurLv:
    """One LV carrying our tags."""

    vg: str
    name: str
    tags: frozenset[str]
    pool: str
    thin_id: int | None
    size: int | None

    @property
    def spec(self) -> str:
        return f"{self.vg}/{self.name}"

    def tag(self, prefix: str) -> str | None:
        found = [t[len(prefix) :] for t in self.tags if t.startswith(prefix)]
        return found[0] if len(found) == 1 else None

    @property
    def is_base(self) -> bool:
        return BASE_TAG in self.tags

    @property
    def is_next(self) -> bool:
        return NEXT_TAG in self.tags and not self.is_base


def base_name(origin: str, repo_id: str) -> str:
    return f"{origin}-qbbase-{repo_id[:8]}"


def next_name(origin: str, repo_id: str | None = None) -> str:
    """The new snapshot's name: final (``ORIGIN-qbbase-REPO8-RANDOM``) when the repository is known."""
    if repo_id:
        return f"{base_name(origin, repo_id)}-{secrets.token_hex(3)}"
    return f"{origin}-qbnext-{os.getpid()}"


def list_lvs(system: System) -> tuple[list[OurLv], dict[tuple[str, str], OurLv]]:
    """Our tagged LVs, and every LV (ours too) by (VG, name) with its pool, thin id and size, from one ``lvs``."""
    out = run_lvm(system, ["lvs", "--noheadings", "--units=b", "--nosuffix", "--separator=|", "-o",
                           "vg_name,lv_name,lv_tags,pool_lv,thin_id,lv_size"],
                  "cannot list logical volumes (looking for change-tracking bases)")  # fmt: skip
    ours: list[OurLv] = []
    every: dict[tuple[str, str], OurLv] = {}
    for line in out.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 6 or not _LV.match(parts[0]) or not _LV.match(parts[1]):
            continue
        vg, name, tags, pool, tid, size = parts
        size = size.removesuffix("B")
        tagset = frozenset(t for t in tags.split(",") if t)
        lv = OurLv(vg, name, tagset, pool, int(tid) if _NUM.fullmatch(tid) else None,
                   int(size) if _NUM.fullmatch(size) else None)  # fmt: skip
        every[(vg, name)] = lv
        if BASE_TAG in tagset or NEXT_TAG in tagset:
            ours.append(lv)
    return ours, every


def thin_id(system: System, vg: str, lv: str) -> tuple[int, str] | None:
    """(thin device id, pool) of ``VG/LV``, or None."""
    return thinmap._thin_id(system, vg, lv)


def create_next(system: System, vg: str, origin: str, vm_uuid: str | None, label: str,
                repo_id: str | None = None) -> str:  # fmt: skip
    """A read-only, activated thin snapshot of the committed LV, tagged as a not yet promoted base."""
    name = next_name(origin, repo_id)
    tags = [NEXT_TAG, f"{PID}{os.getpid()}", f"{ORIGIN}{origin}"] + ([f"{VM}{vm_uuid}"] if vm_uuid else [])
    run_lvm(system, ["lvcreate", "--setactivationskip=n", "--activate=y", "--snapshot", "--type=thin",
                     "--permission=r", *(f"--addtag={t}" for t in tags), f"--name={name}", "--", f"{vg}/{origin}"],
            f"snapshot of {label} ({vg}/{origin})")  # fmt: skip
    return name


def remove(system: System, specs: list[str], what: str) -> None:
    """``lvremove -f`` of ``VG/LV``s in one process; while already failing, only a warning."""
    if not specs:
        return
    try:
        run_lvm(system, ["lvremove", "-f", *specs], f"cannot remove {what} {', '.join(specs)}")
    except BackupError as exc:
        if sys.exc_info()[0] is not None:
            print(f"warning: {exc} (the next backup removes it)", file=sys.stderr)
            return
        raise


def promote(system: System, nexts: list[tuple[str, str]], repo_id: str, root_id: str, block_size: int,
            old: list[str]) -> None:  # fmt: skip
    """Make each new snapshot ``(VG/NEXT, VG/BASE-NAME)`` a base of root ``root_id``: tags first (one lvchange),
    then the ``old`` bases removed (one lvremove), then each renamed to its base name (only those not created
    under it), then all deactivated.  Killed in between, the next start keeps the base of dom0's recorded root
    (tags, not names, say what a base is)."""
    if not nexts:
        return
    tags = ["--deltag", NEXT_TAG, "--deltag", f"{PID}{os.getpid()}", "--addtag", BASE_TAG, "--addtag",
            f"{REPO}{repo_id}", "--addtag", f"{ROOT}{root_id}", "--addtag", f"{BS}{block_size}"]  # fmt: skip
    try:
        run_lvm(system, ["lvchange", *tags, *(n for n, _ in nexts)], "cannot tag the new change-tracking bases")
    except BackupError:  # still tagged as new snapshots of this run: no base, so none may stay behind
        remove(system, [n for n, _ in nexts], "the new change-tracking snapshots")
        raise
    remove(system, old, "the previous change-tracking bases")
    for spec, new in nexts:
        if spec == new:
            continue
        vg, _, name = spec.partition("/")
        run_lvm(system, ["lvrename", vg, name, new.partition("/")[2]], f"cannot rename {spec} to {new}")
    # nothing reads a base (thin_delta reads the pool's metadata): no dm device kept for it
    run_lvm(system, ["lvchange", "--activate=n", *(new for _, new in nexts)],
            "cannot deactivate the new change-tracking bases")  # fmt: skip


def retag(system: System, specs: list[str], old_root: str, root_id: str) -> None:
    """Bases kept as they are (their volume did not change, so no new snapshot was taken) become bases of root
    ``root_id`` (one lvchange).  Killed before, they keep ``old_root``'s tag: read in full next time."""
    if specs:
        run_lvm(system, ["lvchange", "--deltag", f"{ROOT}{old_root}", "--addtag", f"{ROOT}{root_id}", *specs],
                "cannot tag the unchanged change-tracking bases")  # fmt: skip


def pool_usage(system: System, vg: str, pool: str) -> tuple[float, float] | None:
    """(data %, metadata %) of thin pool ``VG/POOL``, or None when lvm does not say."""
    try:
        out = run_lvm(system, ["lvs", "--noheadings", "--separator=|", "-o", "data_percent,metadata_percent",
                               f"{vg}/{pool}"], f"cannot read the use of thin pool {vg}/{pool}")  # fmt: skip
    except BackupError:
        return None
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    if len(lines) != 1 or lines[0].count("|") != 1:
        return None
    data, meta = (p.strip() for p in lines[0].split("|"))
    if not _PERCENT.fullmatch(data) or not _PERCENT.fullmatch(meta):
        return None
    return float(data), float(meta)


# ------------------------------------------------------------------------------------------- thin_delta


class DeltaParser(thinmap.ThinXml):
    """thin_delta's (non-verbose) XML: superblock > diff(left, right) > same | different | left_only |
    right_only (begin, length in data blocks), ascending, not overlapping, within the volume; ``out``: the byte
    ranges that are not ``same``."""

    def __init__(self, left: int, right: int, size: int) -> None:
        super().__init__(size)
        self.left, self.right = left, right
        self.diffs = 0

    def _element(self, depth: int, el: ET.Element) -> bool:
        if (depth, el.tag) == (1, "diff"):
            self.diffs += 1
            if _num(el, "left") != self.left or _num(el, "right") != self.right:
                raise ValueError("another pair of devices")
        elif depth == 2 and el.tag in _KINDS:
            self._range(_num(el, "begin"), _num(el, "length"), keep=el.tag != "same")
        else:
            return False
        return True

    def finish(self) -> list[tuple[int, int]] | None:
        """The byte ranges that may differ (merged, within the volume), or None: no delta."""
        return self.out if self._close() and self.diffs == 1 else None


def _num(el: ET.Element, attr: str) -> int:
    value = el.get(attr)
    if value is None or not _NUM.fullmatch(value):
        raise ValueError(f"{el.tag}: bad {attr}")
    return int(value)


def parse_delta(xml: bytes, left: int, right: int, size: int) -> list[tuple[int, int]] | None:
    parser = DeltaParser(left, right, size)
    parser.feed(xml)
    return parser.finish()


def delta(system: System, vg: str, pool: str, left: int, right: int, size: int) -> list[tuple[int, int]] | None:
    """The byte ranges where thin devices ``left`` (the base) and ``right`` (the new snapshot) of ``VG/POOL``
    may differ, from thin_delta on a reserved (always released) metadata snapshot; None: read everything."""
    tmeta = f"{system.dev_dir}/mapper/{thinmap.dm_name(vg, pool)}_tmeta"
    parser = DeltaParser(left, right, size)
    argv = [*system.thin_delta_argv, "--metadata-snap", "--thin1", str(left), "--thin2", str(right), tmeta]
    if not thinmap.on_metadata_snapshot(system, vg, pool, argv, parser.feed):
        return None
    return parser.finish()


def deltas(system: System, vg: str, pool: str,
           pairs: list[tuple[int, int, int]]) -> list[list[tuple[int, int]] | None]:  # fmt: skip
    """``delta`` of each ``(left, right, size)`` of thin pool ``VG/POOL``, all on one reserved metadata snapshot
    (so the snapshots compared must all exist before this call)."""
    tmeta = f"{system.dev_dir}/mapper/{thinmap.dm_name(vg, pool)}_tmeta"
    tools = [[*system.thin_delta_argv, "--metadata-snap", "--thin1", str(left), "--thin2", str(right), tmeta]
             for left, right, _size in pairs]  # fmt: skip
    out: list[list[tuple[int, int]] | None] = []
    for (left, right, size), xml in zip(pairs, thinmap.on_metadata_snapshot_many(system, vg, pool, tools),
                                        strict=True):  # fmt: skip
        out.append(None if xml is None else parse_delta(xml, left, right, size))
    return out


def describe(lv: OurLv) -> str:
    return safe_text(lv.spec)
