"""The retention checker (issue 20 item 7): random histories of backups, prunes with random policies, crashes
of either (killed after k steps) and a backup attempted while a prune holds the lock.  After every step: every
snapshot root present has every object it references, transitively, and the newest snapshot ever committed
is still there; after a completed prune the repository holds exactly the live objects (so at most 1.10 times
their bytes: exactly 1.0) and the snapshots the policy keeps, and a dry run changed nothing.

The prune is the real one (``qubes_backup_agent.prune.prune``, on the storage interface); the repository is
an in-memory model of the directory storage (``MemStore``: the same methods, a crash is an exception raised
at the k-th deletion or store, leaving everything as it is then); backups follow dom0's rule (send every
object the new snapshot needs that the newest snapshot present does not reference, root last).  What a
snapshot references is the model's own record, not read back through the prune's parser.  test_prune.py
runs the real prune on repositories the real backup wrote.

Size: 1,000 histories of up to 14 steps by default (a few seconds); QB_LONG=1: 20,000 of up to 40 steps.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qubes_backup_agent.prune import Malformed, PruneReport, SnapshotFate, parse_clear, prune
from qubes_backup_agent.repository import open_repository
from qubes_backup_agent.storage import StorageError
from qubes_backup_protocol import repo as names
from qubes_backup_protocol.retention import TIME_FORMAT, Policy, keep

LONG = os.environ.get("QB_LONG") == "1"
HISTORIES = 20_000 if LONG else 1_000
MAX_STEPS = 40 if LONG else 14
SEG_BLOCKS = 4  # blocks per segment in the model (4096 in the format: the shape is what matters)
START = datetime(2026, 1, 1, tzinfo=UTC)


class Crash(Exception):
    """The process was killed here: the store keeps whatever state it has."""


@functools.lru_cache(maxsize=4096)
def obj(otype: str, content: bytes, refs: frozenset[str]) -> tuple[str, bytes]:
    """A model object: the format's clear prefix (HEAD, REFS), an IV, an opaque body, a MAC line."""
    oid = hashlib.sha256(otype.encode() + content).hexdigest()
    ordered = sorted(refs)
    head = f"qbr1 {otype} n {oid} {len(ordered):08d}\n".encode() + b"".join(f"{r}\n".encode() for r in ordered)
    return oid, head + bytes(16) + content + b"m" * 64 + b"\n"


class MemStore:
    """The directory storage's prune methods (repository.Repository), in memory, with a lock and crashes."""

    def __init__(self) -> None:
        self.root_files: dict[str, bytes] = {}
        self.objects: dict[str, bytes] = {}
        self.tmp: set[str] = set()
        self.holder: str | None = None  # who holds the lock exclusively
        self.budget: int | None = None  # mutations left before the crash
        self.hook: Callable[[], None] | None = None  # called before each storage call (a concurrent backup)

    def _call(self) -> None:
        if self.hook is not None:
            self.hook()

    def _mutate(self) -> None:
        if self.budget is not None:
            if self.budget == 0:
                raise Crash
            self.budget -= 1

    def lock(self, who: str) -> None:
        if self.holder is not None:
            raise StorageError("repository /r is in use by another backup or prune; try again later")
        self.holder = who

    def unlock(self) -> None:
        self.holder = None

    def roots(self) -> list[str]:
        self._call()
        return sorted(self.root_files, key=names.root_seq)

    def object_sizes(self) -> dict[str, int]:
        self._call()
        return {oid: len(data) for oid, data in self.objects.items()}

    def read_clear(self, name: str) -> bytes:
        self._call()
        data = self.root_files[name] if name in self.root_files else self.objects.get(name)
        if data is None:
            raise FileNotFoundError(name)
        return data[: 83 + 65 * int(data[75:83])]

    def delete_root(self, name: str) -> None:
        self._call()
        self._mutate()
        del self.root_files[name]

    def delete_object(self, oid: str) -> None:
        self._call()
        self._mutate()
        self.objects.pop(oid, None)

    def delete_objects(self, oids: list[str]) -> None:
        for oid in oids:
            self.delete_object(oid)

    def clean_tmp(self) -> None:
        self._call()
        self._mutate()
        self.tmp.clear()


class Model:
    """A system of three VMs (files of block values) and its repository; what each snapshot references."""

    def __init__(self) -> None:
        self.store = MemStore()
        self.files: dict[str, list[int]] = {f"vm{i}": [i] * 6 for i in range(3)}  # block values, 0 is a hole
        self.refs: dict[int, set[str]] = {}  # seq -> every object the snapshot references (transitively)
        self.newest = 0  # the newest snapshot ever committed
        self.now = START
        self.sizes: dict[str, int] = {}

    def snapshot_objects(self, seq: int) -> tuple[list[tuple[str, bytes]], tuple[str, bytes], set[str]]:
        """Objects of a new snapshot (leaves first), its root, and its closure."""
        out: list[tuple[str, bytes]] = []
        tree_ids = set()
        for vm, blocks in sorted(self.files.items()):
            seg_ids = set()
            for n in range(0, len(blocks), SEG_BLOCKS):
                data_ids = set()
                for value in blocks[n : n + SEG_BLOCKS]:
                    if value:
                        oid, raw = obj("d", value.to_bytes(4, "big"), frozenset())
                        out.append((oid, raw))
                        data_ids.add(oid)
                if data_ids:
                    oid, raw = obj("s", f"{vm}/{n}:{blocks[n : n + SEG_BLOCKS]}".encode(), frozenset(data_ids))
                    out.append((oid, raw))
                    seg_ids.add(oid)
            listing = f"{vm}:{len(blocks)}:{sorted(seg_ids)}".encode()
            oid, raw = obj("t", listing, frozenset(seg_ids))
            out.append((oid, raw))
            tree_ids.add(oid)
        xid, xraw = obj("x", b"qubes " + ",".join(sorted(self.files)).encode(), frozenset())
        out.append((xid, xraw))
        _rid, rraw = obj("r", f"seq {seq} {self.now}".encode(), frozenset(tree_ids | {xid}))
        closure = {oid for oid, _ in out}
        return out, (names.root_name(seq, self.now.strftime(TIME_FORMAT)), rraw), closure

    def backup(self, rng: random.Random, crash_after: int | None) -> None:
        """One backup: change some blocks, then store what the newest snapshot present does not reference
        (dom0 verified those), root last; a crash leaves stored objects and a partial file, no root."""
        store = self.store
        store.lock("backup")  # refused while a prune runs: then nothing else happens
        try:
            store.tmp.clear()  # what a killed backup left (Repository.prepare)
            for blocks in self.files.values():
                for _ in range(rng.randrange(0, 4)):
                    i = rng.randrange(0, len(blocks) + 2)
                    value = rng.choice([0, rng.randrange(1, 40)])
                    if i >= len(blocks):
                        blocks.append(value)
                    else:
                        blocks[i] = value
            self.now += timedelta(seconds=rng.choice([1, 3600, 86400, 86400 * 6, 86400 * 31]) + rng.randrange(5000))
            present = store.roots()
            parent = self.refs[names.root_seq(present[-1])] if present else set()
            seq = self.newest + 1
            objects, (root_name, root_raw), closure = self.snapshot_objects(seq)
            store.budget = crash_after
            for oid, raw in objects:
                if oid not in parent:
                    store.tmp.add(f".partial-{oid[:8]}")
                    store._mutate()
                    store.objects[oid] = raw
                    store.tmp.discard(f".partial-{oid[:8]}")
            store._mutate()
            store.root_files[root_name] = root_raw
            self.refs[seq] = closure | {root_name}
            self.newest = seq
        except Crash:
            pass
        finally:
            store.budget = None
            store.unlock()

    def check(self) -> None:
        """After every step: each root present has all its objects; the newest committed one is present."""
        store = self.store
        present = {names.root_seq(n) for n in store.root_files}
        assert self.newest == 0 or self.newest in present, "the newest snapshot was deleted"
        for seq in present:
            missing = {o for o in self.refs[seq] if not o.startswith("roots/")} - set(store.objects)
            assert not missing, f"snapshot {seq} lost {len(missing)} object(s)"

    def live(self) -> set[str]:
        return set().union(*(self.refs[names.root_seq(n)] for n in self.store.root_files)) - set(self.store.root_files)


def run_prune(model: Model, policy: Policy, dry_run: bool, crash_after: int | None,
              concurrent_at: int | None) -> PruneReport | None:  # fmt: skip
    """The prune as prune_location runs it (exclusive lock, then prune); a concurrent backup attempt at the
    ``concurrent_at``-th storage call must be refused and change nothing."""
    store = model.store
    calls = 0
    attempted: list[bool] = []

    def hook() -> None:
        nonlocal calls
        calls += 1
        if calls == concurrent_at:
            before = (dict(store.root_files), dict(store.objects), model.newest)
            with pytest.raises(StorageError, match="in use by another backup or prune"):
                model.backup(random.Random(calls), None)
            assert (store.root_files, store.objects, model.newest) == before
            attempted.append(True)

    store.lock("prune")
    store.budget, store.hook = crash_after, hook
    try:
        return prune(store, policy, dry_run)
    except Crash:
        return None
    finally:
        store.budget, store.hook = None, None
        store.unlock()
        assert concurrent_at is None or calls < concurrent_at or attempted


def expected_kept(roots: list[str], policy: Policy) -> set[int]:
    from qubes_backup_protocol.retention import parse_time

    return keep([(names.root_seq(n), parse_time(names.root_created(n))) for n in roots], policy)


def random_history(seed: int, length: int) -> list[tuple[Any, ...]]:
    """A history drawn from one seed (cheap to draw, replayable from the seed a failure reports): backups
    (killed after k stores, sometimes) and prunes (random policy, dry run sometimes, killed after k
    deletions sometimes, a backup attempted at the k-th storage call sometimes)."""
    rng = random.Random(seed)
    steps: list[tuple[Any, ...]] = []
    for _ in range(length):
        if rng.random() < 0.55:
            steps.append(("backup", rng.getrandbits(32), rng.choice([None, None, rng.randrange(0, 30)])))
            continue
        counts = [0, 0, 0, 0]
        while not any(counts):
            counts = [rng.choice([0, rng.randrange(1, 5)]), rng.choice([0, rng.randrange(1, 6)]),
                      rng.choice([0, rng.randrange(1, 4)]), rng.choice([0, rng.randrange(1, 3)])]  # fmt: skip
        steps.append(("prune", Policy(*counts), rng.random() < 0.15, rng.choice([None, None, rng.randrange(0, 40)]),
                      rng.choice([None, rng.randrange(1, 60)])))  # fmt: skip
    return steps


COUNT = {"histories": 0, "crashed prunes": 0, "completed prunes": 0, "refused backups": 0}


def play(history: list[tuple[Any, ...]]) -> None:
    COUNT["histories"] += 1
    model = Model()
    model.backup(random.Random(0), None)
    for step in history:
        store = model.store
        if step[0] == "backup":
            model.backup(random.Random(step[1]), step[2])
            model.check()
            continue
        _, policy, dry_run, crash_after, concurrent_at = step
        roots_before = store.roots()
        state_before = (dict(store.root_files), dict(store.objects), set(store.tmp))
        report = run_prune(model, policy, dry_run, crash_after, concurrent_at)
        model.check()
        if concurrent_at is not None and report is not None:
            COUNT["refused backups"] += 1
        if report is None:
            COUNT["crashed prunes"] += 1
            assert set(store.root_files) <= set(state_before[0])
            continue
        want = expected_kept(roots_before, policy)
        assert {f.seq for f in report.snapshots if f.kept} == want and not report.damaged
        if dry_run:
            assert (store.root_files, store.objects, store.tmp) == state_before
            continue
        COUNT["completed prunes"] += 1
        assert {names.root_seq(n) for n in store.root_files} == want
        live = model.live()
        assert set(store.objects) == live and not store.tmp
        live_bytes = sum(len(store.objects[o]) for o in live)
        assert sum(len(b) for b in store.objects.values()) <= 1.10 * live_bytes
        assert (report.objects_kept, report.bytes_kept) == (len(live), live_bytes)
        gone = set(state_before[1]) - live
        assert (report.objects_deleted, report.bytes_freed) == (len(gone), sum(len(state_before[1][o]) for o in gone))


@settings(max_examples=HISTORIES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**64 - 1), st.integers(1, MAX_STEPS))
def _histories(seed: int, length: int) -> None:
    play(random_history(seed, length))


def test_random_histories_keep_every_retained_snapshot_whole() -> None:
    """At least HISTORIES random histories (counted), with crashed and completed prunes and refused
    concurrent backups among them."""
    for key in COUNT:
        COUNT[key] = 0
    _histories()
    assert COUNT["histories"] >= HISTORIES, COUNT
    assert min(COUNT.values()) > 0, COUNT


def test_a_killed_prune_is_completed_by_the_next_with_the_same_kept_set() -> None:
    """Killed after every possible number of deletions, the next prune keeps what the first would have."""
    for crash_after in range(0, 60):
        model = Model()
        rng = random.Random(crash_after)
        for _ in range(8):
            model.backup(rng, None)
        policy = Policy(keep_last=2, keep_daily=2)
        want = expected_kept(model.store.roots(), policy)
        assert run_prune(model, policy, False, crash_after, None) is None or crash_after > 0
        model.check()
        report = run_prune(model, policy, False, None, None)
        assert report is not None
        assert {names.root_seq(n) for n in model.store.root_files} == want
        assert set(model.store.objects) == model.live()


def test_damage_stops_the_prune_before_anything_is_deleted() -> None:
    """A kept snapshot whose object is missing, or whose clear part is malformed: reported, nothing deleted,
    the malformed object kept."""
    for damage in ("missing data", "missing tree", "short data", "bad head", "wrong type", "refs out of order",
                   "truncated"):
        model = Model()
        rng = random.Random(1)
        for _ in range(5):
            model.backup(rng, None)
        store = model.store
        newest = max(model.refs)
        victims = sorted(o for o in model.refs[newest] if o in store.objects)
        by_type = {t: [o for o in victims if store.objects[o][5:6] == t.encode()] for t in "rtsdx"}
        if damage == "missing data":
            del store.objects[by_type["d"][0]]
        elif damage == "missing tree":
            del store.objects[by_type["t"][0]]
        elif damage == "short data":  # data blocks are not read: judged by the listing's size
            store.objects[by_type["d"][0]] = store.objects[by_type["d"][0]][:163]
        else:
            oid = by_type["s"][0]
            raw = bytearray(store.objects[oid])
            if damage == "bad head":
                raw[0:4] = b"qbr2"
            elif damage == "wrong type":
                raw[5:6] = b"t"
            elif damage == "refs out of order" and int(raw[75:83]) > 1:
                raw[83:83 + 130] = raw[83 + 65:83 + 130] + raw[83:83 + 65]
            else:
                raw[83 + 10] = ord("X")
            store.objects[oid] = bytes(raw)
        before = (dict(store.root_files), dict(store.objects))
        if damage.startswith("missing"):  # shared by every snapshot kept: one finding, not one per snapshot
            everything = run_prune(model, Policy(keep_last=9), False, None, None)
            assert everything is not None and everything.damage_count == 1, everything
        report = run_prune(model, Policy(keep_last=1), False, None, None)
        assert report is not None and report.damage_count >= 1 and report.damaged, damage
        assert f"snapshot {newest}" in report.damaged[0], report.damaged
        assert (store.root_files, store.objects) == before, damage
        assert report.objects_deleted == 0 and any(not f.kept for f in report.snapshots)


def test_parse_clear_is_strict() -> None:
    oid, raw = obj("s", b"x", frozenset({"a" * 64, "b" * 64}))
    clear = raw[: 83 + 130]
    assert parse_clear(clear, oid, "s", len(raw)) == ("s", ["a" * 64, "b" * 64])
    bad = [
        (clear, "f" * 64, "s", len(raw)),  # another id
        (clear, oid, "d", len(raw)),  # a segment where a data block belongs
        (clear[:-1], oid, "s", len(raw)),  # truncated clear part
        (clear, oid, "s", 83 + 130 + 80),  # no room for an IV and a MAC
        (clear[:83] + clear[83 + 65 :] + clear[83 : 83 + 65], oid, "s", len(raw)),  # out of order
        (clear.replace(b"a" * 64, b"A" * 64), oid, "s", len(raw)),  # not lowercase hex
        (clear.replace(b" 00000002\n", b" 00004097\n"), oid, "s", 10**9),  # more than a segment may have
        (clear.replace(b"qbr1 s n", b"qbr1 s q"), oid, "s", len(raw)),
        (clear[:83] + clear[83 : 83 + 65] * 2, oid, "s", len(raw)),  # one reference twice
        (clear[: 83 + 63] + b"\na" + clear[83 + 65 :], oid, "s", len(raw)),  # a line one short, the next one long
        (clear[:83] + b" " + clear[84:], oid, "s", len(raw)),  # not hex, the line feeds in place
    ]
    for data, want_id, types, size in bad:
        with pytest.raises(Malformed):
            parse_clear(data, want_id, types, size)
    assert SnapshotFate("roots/x", 1, "t", True, ["newest"]).kept


def test_two_roots_of_one_number_are_refused() -> None:
    model = Model()
    model.backup(random.Random(1), None)
    model.backup(random.Random(2), None)
    name = model.store.roots()[-1]
    model.store.root_files[name[:-2] + ("1" if name[-2] != "1" else "2") + "Z"] = model.store.root_files[name]
    before = (dict(model.store.root_files), dict(model.store.objects))
    with pytest.raises(StorageError, match="two roots of snapshot 2"):
        run_prune(model, Policy(keep_last=1), False, None, None)
    assert (model.store.root_files, model.store.objects) == before


def test_directory_listing_gives_regular_object_files_and_their_sizes(tmp_path: Path) -> None:
    """The directory store's one-pass listing (prune's only look at data blocks): every regular file named
    like an object under its ``objects/XX/``, with its size; nothing else (a symbolic link, a directory, a
    stray name, an object under the wrong ``XX``)."""
    (tmp_path / names.HEADER).write_text("x")
    objects = tmp_path / names.OBJECTS_DIR
    ab, cd = objects / "ab", objects / "cd"
    ab.mkdir(parents=True)
    cd.mkdir()
    (ab / ("ab" * 32)).write_bytes(b"1" * 300)
    (ab / ("ab" + "0" * 62)).write_bytes(b"")
    (ab / ("cd" * 32)).write_bytes(b"wrong XX")
    (ab / "stray").write_bytes(b"not an object")
    (ab / ("ab" + "1" * 62)).symlink_to(ab / ("ab" * 32))
    (ab / ("ab" + "2" * 62)).mkdir()
    (objects / "ef").symlink_to(ab)
    (objects / "zz").mkdir()
    (objects / "zz" / ("zz" + "0" * 62)).write_bytes(b"x")
    repo = open_repository(str(tmp_path), Path("/"), create=False)
    try:
        assert repo.object_sizes() == {"ab" * 32: 300, "ab" + "0" * 62: 0}
    finally:
        repo.close()
