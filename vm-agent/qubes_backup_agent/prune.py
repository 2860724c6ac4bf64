"""Keyless prune in the backup VM (docs/REPOSITORY.md section 11): delete the snapshots a retention policy
does not keep, then every object no retained snapshot references.  No key, no plaintext: the references are
read from each object's clear HEAD and REFS (section 5), which dom0 wrote and MACed and its reader checks
against the body.

The algorithm, under the repository's exclusive lock (a backup or another prune is refused meanwhile):

1. list the roots; the policy (``qubes_backup_protocol.retention``, on the times in the root names) says which
   are kept; the newest by sequence number always is (dom0 builds the next backup on it);
2. the live set: list every object with its size (one pass); from every retained root, follow the references
   level by level (root -> file lists and qubes.xml subset -> segments -> data blocks), reading only the clear
   prefix of the objects whose references are followed and checking its grammar strictly (type letter, the
   type the level calls for, id = file name, N within the type's bound, references 64 hex strictly ascending,
   the file long enough for them, an IV and a MAC).  Data blocks, which reference nothing, are not read: the
   listing shows them present with a data block's possible size.  A referenced object that is missing, whose
   clear part is malformed, or a data block of an impossible size, is *damage*: the prune reports it and
   deletes nothing at all (the malformed object is kept; its references are not guessed), so damage is never
   "fixed" silently and no older snapshot is deleted while a retained one is broken;
3. delete the dropped roots, each followed by an fsync of ``roots/``;
4. delete every object not in the live set, then clear ``tmp/`` (partial files of a killed backup).

A prune killed at any point leaves every retained snapshot whole: objects are deleted only after the roots
that referenced them are durably gone, and only objects no retained root reaches.  The next prune recomputes
the same kept set (the rules keep what they kept, whatever dropped roots are already gone) and completes.
A dry run takes the lock shared, computes the same report and deletes nothing.
"""

from __future__ import annotations

import itertools
import operator
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from qubes_backup_protocol import repo as names
from qubes_backup_protocol.retention import Policy, parse_time, reasons

from .repository import open_repository
from .storage import StorageError

HEAD_LEN, REF_LEN, IV_LEN, MAC_LEN = 83, 65, 16, 65
MAX_REFS = {"r": 10_001, "t": 262_144, "s": 4_096, "d": 0, "x": 0}
TYPE_NAMES = {"r": "snapshot root", "t": "file list", "s": "map segment", "d": "data block", "x": "qubes.xml subset"}
LEVELS = ("tx", "s", "d")  # the types each depth below a root calls for: t or x, then s (under t), then d (under s)
MAX_DAMAGE_LINES = 50  # the report lists this many findings, then how many more
_HEAD_RE = re.compile(rb"qbr1 ([rtsdx]) ([zn]) ([0-9a-f]{64}) ([0-9]{8})\n")
_HEX = b"0123456789abcdef"
DATA_MIN = HEAD_LEN + IV_LEN + MAC_LEN  # a data block's file: HEAD, no references, IV, ciphertext, MAC
DATA_MAX = HEAD_LEN + IV_LEN + (4 << 20) + 8192 + MAC_LEN  # ... of the largest block size (section 5's bound)


class Store(Protocol):
    """What prune needs of a repository's storage (a directory: repository.Repository)."""

    def roots(self) -> list[str]: ...
    def object_sizes(self) -> dict[str, int]: ...
    def read_clear(self, name: str) -> bytes: ...
    def delete_root(self, name: str) -> None: ...
    def delete_object(self, oid: str) -> None: ...
    def delete_objects(self, oids: list[str]) -> None: ...
    def clean_tmp(self) -> None: ...


@dataclass
class SnapshotFate:
    name: str  # roots/SSSSSSSSSS-YYYYMMDDTHHMMSSZ
    seq: int
    created: str  # YYYY-MM-DDTHH:MM:SSZ, from the name
    kept: bool
    reasons: list[str]  # why kept: newest, last, daily, weekly, monthly (or bad-time); empty when deleted


@dataclass
class PruneReport:
    snapshots: list[SnapshotFate]
    objects_deleted: int  # objects (files under objects/) deleted, or that a dry run would delete
    bytes_freed: int  # their bytes
    objects_kept: int
    bytes_kept: int
    dry_run: bool
    damaged: list[str] = field(default_factory=list)  # findings in retained snapshots: then nothing is deleted
    damage_count: int = 0  # all findings (damaged lists the first MAX_DAMAGE_LINES)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Malformed(Exception):
    """An object's clear part does not follow section 5's grammar."""


def parse_clear(data: bytes, oid: str | None, types: str, size: int | None) -> tuple[str, list[str]]:
    """The type and references of an object's clear prefix (``read_clear``), checked strictly: the type is
    one of ``types``, the id is ``oid`` (a root is not named by its id), N within the type's bound,
    references 64 hex strictly ascending, and the file (``size`` bytes) long enough to hold them, an IV and
    a MAC."""
    m = _HEAD_RE.fullmatch(data[:HEAD_LEN])
    if m is None:
        raise Malformed("malformed clear header")
    otype, got_id, nrefs = m.group(1).decode(), m.group(3).decode(), int(m.group(4))
    if otype not in types:
        raise Malformed(f"a {TYPE_NAMES[otype]} where a {' or '.join(TYPE_NAMES[t] for t in types)} belongs")
    if oid is not None and got_id != oid:
        raise Malformed(f"its header names another object ({got_id[:16]})")
    if nrefs > MAX_REFS[otype]:
        raise Malformed(f"{nrefs} references, more than a {TYPE_NAMES[otype]} may have")
    end = HEAD_LEN + REF_LEN * nrefs
    if len(data) != end or (size is not None and size < end + IV_LEN + MAC_LEN):
        raise Malformed("truncated")
    lines = data[HEAD_LEN:]
    # every 65th byte a line feed, and nothing else but lowercase hex: in C, not one regex per line
    if lines[REF_LEN - 1 :: REF_LEN] != b"\n" * nrefs or lines.translate(None, _HEX) != b"\n" * nrefs:
        raise Malformed("malformed reference list")
    refs = lines.decode("ascii").split("\n")
    refs.pop()  # after the last line feed
    if not all(map(operator.lt, refs, itertools.islice(refs, 1, None))):
        raise Malformed("references out of order")
    return otype, refs


def decide(roots: list[str], policy: Policy) -> list[SnapshotFate]:
    """Each root's fate under the policy, ascending sequence number.  A root whose name states an impossible
    time is kept (``bad-time``): its age is unknown."""
    if not roots:
        return []
    seqs = [names.root_seq(n) for n in roots]
    if len(set(seqs)) != len(seqs):
        twice = sorted({s for s in seqs if seqs.count(s) > 1})
        raise StorageError(f"the repository has two roots of snapshot {twice[0]} (a fork, or another "
                           "writer): refusing to prune; dom0 tells the genuine one (qvm-backup-restore "
                           "--verify-only)")  # fmt: skip
    timed: list[tuple[int, datetime]] = []
    bad: set[int] = set()
    for name in roots:
        try:
            timed.append((names.root_seq(name), parse_time(names.root_created(name))))
        except ValueError:
            bad.add(names.root_seq(name))
    why = reasons(timed, policy)
    newest = max(names.root_seq(n) for n in roots)
    if newest in bad:  # reasons() named the newest of the dated ones "newest": only the real one is
        for seq in list(why):
            why[seq] = [r for r in why[seq] if r != "newest"]
            if not why[seq]:
                del why[seq]
    fates = []
    for name in roots:
        seq = names.root_seq(name)
        kept = why.get(seq, [])
        if seq in bad:
            kept = ["newest", "bad-time"] if seq == newest else ["bad-time"]
        fates.append(SnapshotFate(name, seq, names.root_created(name), bool(kept), list(kept)))
    return fates


class _Damage:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.count = 0

    def add(self, line: str) -> None:
        self.count += 1
        if len(self.lines) < MAX_DAMAGE_LINES:
            self.lines.append(line)


def live_set(store: Store, retained: list[SnapshotFate], sizes: dict[str, int], damage: _Damage) -> set[str]:
    """Every object a retained snapshot references, transitively (only those present; what is missing or
    malformed goes to ``damage``).  ``sizes``: the objects present and their sizes.

    Level by level (LEVELS: the roots' file lists and qubes.xml subsets, then their segments, then the
    segments' data blocks), each object judged once, at the shallowest level that reaches it.  Data blocks
    reference nothing: they are judged by the listing (present, a data block's plausible size), not read."""
    live: set[str] = set()
    seen: set[str] = set()  # reached (live, missing or malformed)
    parents: list[_Parent] = []  # the objects whose references make up the level
    ids: set[str] = set()
    for fate in retained:
        where = f"snapshot {fate.seq} ({fate.name})"
        parent = _Parent(fate.name, None, "r", where)
        try:
            ids.update(parent.refs(store, None))
        except FileNotFoundError:  # gone since it was listed, under our lock: something else deletes here
            damage.add(f"{where}: its root vanished while the prune ran")
            continue
        except Malformed as exc:
            damage.add(f"{where}: its root is malformed ({exc})")
            continue
        parents.append(parent)
    for types in LEVELS:
        ids -= seen
        seen |= ids
        present = ids.intersection(sizes)
        live |= present  # kept, even when malformed
        bad = dict.fromkeys(ids - present, "is missing")
        if types == "d":
            for oid in present:
                if not DATA_MIN <= sizes[oid] <= DATA_MAX:
                    bad[oid] = f"is malformed (a file of {sizes[oid]} bytes, not a data block's); kept"
        origin = _origins(store, sizes, parents, set(bad) if types == "d" else ids)
        for oid in sorted(bad):
            damage.add(f"{origin.get(oid, 'a kept snapshot')}: {_what(types)} {oid[:16]} {bad[oid]}")
        if types == "d":
            break
        parents, ids = [], set()
        for oid in sorted(present):
            parent = _Parent(oid, oid, types, origin.get(oid, "a kept snapshot"))
            try:
                ids.update(parent.refs(store, sizes[oid]))
            except FileNotFoundError:
                damage.add(f"{parent.where}: {_what(types)} {oid[:16]} is missing")
                continue
            except Malformed as exc:
                damage.add(f"{parent.where}: {_what(types)} {oid[:16]} is malformed ({exc}); kept, its references "
                           "unknown")  # fmt: skip
                continue
            parents.append(parent)
    return live


@dataclass
class _Parent:
    name: str  # roots/NAME or the id
    oid: str | None  # the id its header must state (None: a root)
    types: str  # the types its place calls for
    where: str  # the kept snapshot that reached it first

    def refs(self, store: Store, size: int | None) -> list[str]:
        return parse_clear(store.read_clear(self.name), self.oid, self.types, size)[1]


def _origins(store: Store, sizes: dict[str, int], parents: list[_Parent], need: set[str]) -> dict[str, str]:
    """For each id of ``need``, the snapshot of the first parent referencing it.  The parents' clear parts are
    read again rather than kept (a level's references are millions of ids); for data blocks only when one is
    damaged."""
    origin: dict[str, str] = {}
    for parent in parents:
        if len(origin) == len(need):
            break
        try:
            refs = parent.refs(store, sizes.get(parent.name))
        except (FileNotFoundError, Malformed):  # it parsed a moment ago: something else writes here
            continue
        for oid in need.intersection(refs):
            origin.setdefault(oid, parent.where)
    return origin


def _what(types: str) -> str:
    return " or ".join(TYPE_NAMES[t] for t in types)


def prune(store: Store, policy: Policy, dry_run: bool) -> PruneReport:
    """Prune ``store``, whose lock the caller holds (exclusively unless ``dry_run``)."""
    roots = store.roots()
    if len(roots) >= names.MAX_ROOTS:
        raise StorageError(f"the repository lists {len(roots)} snapshots or more; prune handles fewer than "
                           f"{names.MAX_ROOTS}")  # fmt: skip
    fates = decide(roots, policy)
    sizes = store.object_sizes()
    damage = _Damage()
    live = live_set(store, [f for f in fates if f.kept], sizes, damage)
    doomed = sorted(sizes.keys() - live)
    freed = sum(map(sizes.__getitem__, doomed))
    report = PruneReport(fates, len(doomed), freed, len(sizes) - len(doomed), sum(sizes.values()) - freed, dry_run,
                         damage.lines, damage.count)  # fmt: skip
    if damage.count:
        report.objects_deleted = report.bytes_freed = 0
        report.objects_kept, report.bytes_kept = len(sizes), sum(sizes.values())
        return report
    if dry_run:
        return report
    for fate in fates:
        if not fate.kept:
            store.delete_root(fate.name)  # durable before any object goes
    store.delete_objects(doomed)
    store.clean_tmp()
    return report


def prune_location(location: str, root: Path, policy: Policy, dry_run: bool) -> PruneReport:
    """Open the repository directory ``location`` (a path in the VM, confined to ``root``), take its lock
    (refused with one line while a backup or another prune runs) and prune it.  Errors: StorageError."""
    repo = open_repository(location, root, create=False)
    try:
        repo.lock(exclusive=not dry_run)
        return prune(repo, policy, dry_run)
    finally:
        repo.close()
