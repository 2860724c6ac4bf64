"""Change tracking on lvm_thin (backup/tracking.py, qubes/bases.py, docs/CHANGE-TRACKING.md): thin_delta's XML
(fixtures recorded from the real thin_delta 0.9.0, and the real tool run where installed), a second backup that
reads only the touched blocks and restores byte-exact, every fallback to a full read, ``--rescan`` giving the
same file lists, no snapshot of ours left after a failed or killed run, no base in a pool above 90 % use.

Backups go through the library as the CLI does (plan with the tracker, RepoBackup, promote), with the real agent
as a separate process; the CLI's own options are exercised at the end.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import KDF, PASSPHRASE, Sim, new_sim, run_repo_restore
from qubes_backup_dom0.backup.plan import plan_backup
from qubes_backup_dom0.backup.repository import RepoBackup, RepoBackupResult, RepoOptions
from qubes_backup_dom0.backup.tracking import Tracking
from qubes_backup_dom0.errors import BackupError, VerificationError
from qubes_backup_dom0.format import sparse
from qubes_backup_dom0.qubes import bases, repostate
from qubes_backup_dom0.qubes.qubesxml import Collection
from qubes_backup_dom0.restore.plan import RestoreOptions
from qubes_backup_sim import launch
from qubes_backup_sim.lvstore import LvStore
from qubes_backup_sim.store import write_atomic

PASS = PASSPHRASE.encode()
REPO = "/home/user/repo"
BS = 64 << 10  # the repository's block size here (= the sim pool's chunk)
VG = "qubes_dom0"
DATA = Path(__file__).parent / "data" / "thin_delta"
THIN_DELTA = shutil.which("thin_delta") or ("/usr/sbin/thin_delta" if os.path.exists("/usr/sbin/thin_delta") else None)
THIN_RESTORE = shutil.which("thin_restore") or "/usr/sbin/thin_restore"
CHUNK = 128 * 512


# -- thin_delta's XML ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.9.0", "1.1.0"])
def test_parser_reads_recorded_thin_delta(version: str) -> None:
    """Recorded from thin_delta 0.9.0 (Debian 12, Qubes R4.2's dom0 has 0.9) and 1.1.0 (the Rust rewrite:
    Debian 13, Fedora 41 of Qubes R4.3's dom0) on tests/data/thin_delta/metadata.xml (thin_restore'd): devices 1
    and 2 share blocks 0-1, 3 and 10; block 2 maps differently; 20 only in 1, 30 only in 2."""
    xml = (DATA / f"delta-{version}-1-2.xml").read_bytes()
    size = 64 * CHUNK
    assert bases.parse_delta(xml, 1, 2, size) == [(2 * CHUNK, CHUNK), (20 * CHUNK, CHUNK), (30 * CHUNK, CHUNK)]
    reverse = (DATA / f"delta-{version}-2-1.xml").read_bytes()
    assert bases.parse_delta(reverse, 2, 1, size) == bases.parse_delta(xml, 1, 2, size)
    assert bases.parse_delta(xml, 2, 1, size) is None  # another pair of devices
    assert bases.parse_delta(xml, 1, 2, 30 * CHUNK) is None  # a range beyond the volume (wyng #56)


@pytest.mark.parametrize("version", ["0.9.0", "1.1.0"])
def test_parser_reads_recorded_runs_of_blocks(version: str) -> None:
    """thin_delta of tests/data/thin_delta/metadata-ranges.xml (range mappings: runs of shared, remapped and new
    blocks) by both versions: the same ranges, which are exactly what is not "same"."""
    xml = (DATA / f"ranges-{version}-1-2.xml").read_bytes()
    assert bases.parse_delta(xml, 1, 2, 400 * CHUNK) == [(50 * CHUNK, 10 * CHUNK), (200 * CHUNK, 10 * CHUNK),
                                                          (310 * CHUNK, 22 * CHUNK)]  # fmt: skip
    assert bases.parse_delta(xml, 1, 2, 331 * CHUNK) is None  # block 331 is beyond such a volume


@pytest.mark.skipif(THIN_DELTA is None and not os.environ.get("CI"), reason="thin-provisioning-tools not installed")
def test_parser_reads_the_real_thin_delta(tmp_path: Path) -> None:
    meta = tmp_path / "meta.bin"
    meta.write_bytes(bytes(8 << 20))
    subprocess.run([THIN_RESTORE, "-i", str(DATA / "metadata.xml"), "-o", str(meta)], check=True, capture_output=True)
    assert THIN_DELTA is not None
    out = subprocess.run([THIN_DELTA, "--thin1", "1", "--thin2", "2", str(meta)], check=True, capture_output=True)
    assert bases.parse_delta(out.stdout, 1, 2, 64 * CHUNK) == [(2 * CHUNK, CHUNK), (20 * CHUNK, CHUNK),
                                                               (30 * CHUNK, CHUNK)]  # fmt: skip
    missing = subprocess.run([THIN_DELTA, "--thin1", "1", "--thin2", "9", str(meta)], capture_output=True)
    assert missing.returncode != 0


GOOD = (b'<superblock data_block_size="128"><diff left="1" right="2"><same begin="0" length="2"/>'
        b'<different begin="2" length="1"/></diff></superblock>')  # fmt: skip


@pytest.mark.parametrize("xml", [
    GOOD.replace(b'begin="2"', b'begin="1"'),  # overlapping
    GOOD.replace(b'length="1"', b'length="0"'),
    GOOD.replace(b"<different", b"<weird"),
    GOOD.replace(b'data_block_size="128"', b'data_block_size="3"'),
    GOOD.replace(b"</diff>", b'</diff><diff left="1" right="2"></diff>'),  # two diffs
    GOOD.replace(b"<diff", b"<!-- x --><diff"),
    GOOD[:-4],
    b"",
])  # fmt: skip
def test_malformed_deltas_give_no_delta(xml: bytes) -> None:
    assert bases.parse_delta(GOOD, 1, 2, 10 * CHUNK) == [(2 * CHUNK, CHUNK)]
    assert bases.parse_delta(xml, 1, 2, 10 * CHUNK) is None


# -- backups with tracking ------------------------------------------------------------------------------------


def backup(sim: Sim, vms: tuple[str, ...] = ("work",), rescan: bool = False, passphrase: bytes = PASS,
           repo: str = REPO, warnings: bool = False) -> tuple[RepoBackupResult, Tracking]:  # fmt: skip
    """One repository backup as qvm-backup --repo runs it."""
    system = sim.system
    tracking = Tracking(system, f"backupvm:{repo}", rescan=rescan)
    try:
        plan = plan_backup(system, list(vms), planner=tracking, zeros=False)  # as qvm-backup --repo plans
        job = RepoBackup(system, plan, "backupvm", repo, RepoOptions(kdf_n=1024, block_size=BS), tracking=tracking)
        try:
            job.connect()
            result = job.run(passphrase)
        finally:
            job.close()
            plan.close()
        result.warnings += tracking.promote(result.repo_id, result.root, BS)
        assert warnings or not result.warnings, result.warnings
        return result, tracking
    finally:
        tracking.close()


def restored(sim: Sim, tmp: Path) -> bytes:
    """Snapshot (newest) of work restored under a new name; its private volume's bytes."""
    opts = RestoreOptions(vms=("work",), rename_conflicting=True)
    run_repo_restore(sim.system, REPO, "backupvm", PASS, opts)
    store = LvStore(sim.dom0 / "dev")
    (name,) = [i.name for i in store.lvs(VG) if i.name.startswith("vm-work") and i.name.endswith("-private")
               and i.name != "vm-work-private"]  # fmt: skip
    data = store.path(VG, name).read_bytes()
    store.remove(VG, name)
    return data


def lv(sim: Sim, name: str = "vm-work-private") -> Path:
    return sim.dom0 / "dev" / VG / name


def write(sim: Sim, offsets: list[int], size: int | None = None, name: str = "vm-work-private") -> None:
    """Writes as Qubes' commit does: a new LV (copy) renamed over the committed one."""
    path = lv(sim, name)
    new = path.with_name(name + ".new")
    shutil.copyfile(path, new)
    with open(new, "r+b") as f:
        if size is not None:
            f.truncate(size)
        for off in offsets:
            f.seek(off)
            f.write(os.urandom(4096))
    os.replace(new, path)


def ours(sim: Sim) -> list[str]:
    """Our LVs' names, a base's random suffix left out (``ORIGIN-qbbase-REPO8[-RANDOM]``: created under its final
    name once dom0 knows the repository)."""
    store = LvStore(sim.dom0 / "dev")
    return sorted(re.sub(r"^(.*-qbbase-[0-9a-f]{8})-[0-9a-f]{6}$", r"\1", i.name) for i in store.lvs(VG)
                  if {bases.BASE_TAG, bases.NEXT_TAG} & set(i.tags))  # fmt: skip


def ours_raw(sim: Sim) -> list[str]:
    """Our LVs' names as they are."""
    return sorted(i.name for i in LvStore(sim.dom0 / "dev").lvs(VG) if {bases.BASE_TAG, bases.NEXT_TAG} & set(i.tags))


def unpromoted(sim: Sim) -> list[str]:
    """Our LVs tagged as new snapshots not yet promoted."""
    return sorted(i.name for i in LvStore(sim.dom0 / "dev").lvs(VG) if bases.NEXT_TAG in i.tags)


def data_blocks(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(any(b) for b in iter(lambda: f.read(BS), b""))


def allocated_blocks(path: Path) -> int:
    """Blocks the allocation map (SEEK_DATA) touches: what a full read of a repository backup reads."""
    _size, regions = sparse.scan(path)
    return len({i for off, n in regions for i in range(off // BS, (off + n - 1) // BS + 1)})


@pytest.fixture
def tracked(tmp_path: Path) -> tuple[Sim, RepoBackupResult]:
    """A system whose work VM was backed up once (its base kept)."""
    sim = new_sim(tmp_path / "sim")
    write(sim, [3 * BS, 40 * BS + 100])  # some data in the private volume
    first, t = backup(sim)
    assert t.full_reads() == ["volume 'private' of work: no base of this repository (first backup, or the base "
                              "was removed)"]  # fmt: skip
    return sim, first


def test_second_backup_reads_only_the_touched_blocks(tracked: tuple[Sim, RepoBackupResult], tmp_path: Path) -> None:
    sim, first = tracked
    assert ours(sim) == [f"vm-work-private-qbbase-{first.repo_id[:8]}"]
    info = LvStore(sim.dom0 / "dev").info(VG, ours(sim)[0])
    assert not info.active and info.readonly and set(info.tags) >= {bases.BASE_TAG, bases.REPO + first.repo_id,
                                                                    bases.ROOT + first.root, f"{bases.BS}{BS}"}
    unchanged, t = backup(sim)
    assert t.full_reads() == [] and unchanged.changed == []
    small = unchanged.read_blocks  # firewall.xml (and notes): not volumes, always read
    assert small <= 2 and unchanged.reused_blocks == data_blocks(lv(sim))
    assert unchanged.volume_read_blocks == 0  # the blocks read are firewall.xml's and the notes', no volume's
    rng = random.Random(5)
    size = lv(sim).stat().st_size
    touched = sorted(rng.sample(range(size // BS), 7))
    write(sim, [i * BS + rng.randrange(0, BS - 4096) for i in touched])
    third, t = backup(sim)
    assert t.full_reads() == []
    assert third.read_blocks == small + len(touched) and third.volume_read_blocks == len(touched)
    assert third.blocks == len(touched)  # each is new data
    assert restored(sim, tmp_path) == lv(sim).read_bytes()
    # --rescan reads everything and gives the very same file lists (no archive changed)
    again, t = backup(sim, rescan=True)
    assert t.full_reads() == ["volume 'private' of work: --rescan"]
    # every allocated block is read (no zero scan before: the copy above allocated the whole volume), only those
    # with data are stored
    assert again.changed == [] and again.read_blocks == small + allocated_blocks(lv(sim)) and again.reused_blocks == 0
    assert allocated_blocks(lv(sim)) > data_blocks(lv(sim))
    assert ours(sim) == [f"vm-work-private-qbbase-{first.repo_id[:8]}"]


def lvm_calls(sim: Sim) -> list[str]:
    """The sim's lvm commands run so far (lvm.log: one JSON list per call)."""
    log = sim.dom0 / "dev" / "lvm.log"
    return [json.loads(line)[0] for line in log.read_text().splitlines()] if log.exists() else []


def thin_calls(sim: Sim) -> list[str]:
    """The sim's dmsetup / thin_dump / thin_delta calls so far (thintools.log)."""
    log = sim.dom0 / "dev" / "thintools.log"
    return [json.loads(line)[0] for line in log.read_text().splitlines()] if log.exists() else []


def test_an_unchanged_volume_keeps_its_base_and_takes_no_snapshot(tracked: tuple[Sim, RepoBackupResult],
                                                                  tmp_path: Path) -> None:  # fmt: skip
    """thin_delta between the base and the committed LV says nothing differs: no lvcreate, no lvremove, the very
    same base retagged for the new root (one lvchange); it still pairs with the next run, which reads only what
    was written; the snapshots restore exact."""
    sim, first = tracked
    (name,) = ours_raw(sim)
    before = len(lvm_calls(sim))
    unchanged, t = backup(sim)
    calls = lvm_calls(sim)[before:]
    assert "lvcreate" not in calls and "lvremove" not in calls and calls.count("lvchange") == 1
    assert t.full_reads() == [] and unchanged.volume_read_blocks == 0
    assert unchanged.reused_blocks == data_blocks(lv(sim)) and unchanged.changed == []
    assert ours_raw(sim) == [name]
    tags = set(LvStore(sim.dom0 / "dev").info(VG, name).tags)
    assert bases.ROOT + unchanged.root in tags and bases.ROOT + first.root not in tags
    write(sim, [9 * BS + 5])
    before, thin = len(lvm_calls(sim)), len(thin_calls(sim))
    third, t = backup(sim)
    assert t.full_reads() == [] and third.volume_read_blocks == 1
    # the new snapshot is of the LV thin_delta just compared: its delta is that one, no second reservation
    assert lvm_calls(sim)[before:].count("lvcreate") == 1 and thin_calls(sim)[thin:] == ["dmsetup", "thin_delta",
                                                                                        "dmsetup"]  # fmt: skip
    assert restored(sim, tmp_path) == lv(sim).read_bytes()
    assert len(ours_raw(sim)) == 1 and ours_raw(sim) != [name]  # a new base, the old one removed


def test_a_live_volume_is_snapshotted_even_when_unchanged(tracked: tuple[Sim, RepoBackupResult]) -> None:
    """revisions_to_keep=-1: the committed LV is written in place while its VM runs, so what thin_delta said of
    it a moment ago proves nothing: a new snapshot is read (its delta from the base, here none)."""
    from qubes_backup_sim.storage import set_volume_attr

    sim, _first = tracked
    launch.stop_qubesd(sim.dir)
    coll = Collection.load(sim.qubes_xml)
    dom = coll.get("work")
    assert dom is not None
    set_volume_attr(dom, "private", "revisions_to_keep", "-1")
    write_atomic(coll, sim.qubes_xml)
    before = len(lvm_calls(sim))
    result, t = backup(sim)
    assert lvm_calls(sim)[before:].count("lvcreate") == 1
    assert t.full_reads() == [] and result.volume_read_blocks == 0


def test_an_unchanged_volume_whose_base_is_not_the_parents_is_read_through_a_new_snapshot(
        tracked: tuple[Sim, RepoBackupResult], tmp_path: Path) -> None:  # fmt: skip
    """The base kept for an unchanged volume turns out not to be the repository's newest snapshot's (another
    dom0 wrote one): a snapshot is taken then and read in full; it becomes the base, the old one removed."""
    sim, first = tracked
    record = repostate.load(sim.system, first.repo_id)
    assert record is not None
    write(sim, [6 * BS])
    backup(sim)  # R2, and a base of R2
    repostate.save(sim.system, record)  # dom0's record back at R1 ...
    _other_root(sim, first.root)  # ... and the base claims R1: unchanged against the committed LV
    (old,) = ours_raw(sim)
    before = len(lvm_calls(sim))
    result, t = backup(sim)
    assert lvm_calls(sim)[before:].count("lvcreate") == 1
    assert t.full_reads() == ["volume 'private' of work: the repository's newest snapshot is not the one its base "
                              "was taken for"]  # fmt: skip
    assert result.reused_blocks == 0 and result.volume_read_blocks >= data_blocks(lv(sim))  # allocated ones
    assert restored(sim, tmp_path) == lv(sim).read_bytes()
    assert len(ours_raw(sim)) == 1 and ours_raw(sim) != [old] and unpromoted(sim) == []


def test_a_failed_unchanged_run_keeps_the_base_as_it_was(tracked: tuple[Sim, RepoBackupResult]) -> None:
    sim, first = tracked
    (name,) = ours_raw(sim)
    with pytest.raises(VerificationError):
        backup(sim, passphrase=b"wrong")
    assert ours_raw(sim) == [name] and bases.ROOT + first.root in LvStore(sim.dom0 / "dev").info(VG, name).tags
    result, t = backup(sim)
    assert t.full_reads() == [] and result.volume_read_blocks == 0 and ours_raw(sim) == [name]


def test_tracked_and_rescanned_runs_agree_after_the_same_writes(tmp_path: Path) -> None:
    """Two copies of one system: the same writes, one tracked, one --rescan: identical file lists (trees)."""
    a = new_sim(tmp_path / "a")
    write(a, [5 * BS])
    backup(a)
    write(a, [9 * BS, 100 * BS + 7, 9 * BS + 8192])
    tracked_run, t = backup(a)
    assert t.full_reads() == []
    # the same repository, rescanned: the file list of work is the tracked run's (no change)
    rescanned, _ = backup(a, rescan=True)
    assert rescanned.changed == [] and tracked_run.changed == ["work"]


def _delete_base(sim: Sim) -> None:
    (name,) = ours_raw(sim)
    LvStore(sim.dom0 / "dev").remove(VG, name)


def _recreate_vm(sim: Sim) -> None:
    launch.stop_qubesd(sim.dir)  # it re-reads qubes.xml when started again
    coll = Collection.load(sim.qubes_xml)
    dom = coll.get("work")
    assert dom is not None
    dom.set_property("uuid", "3f1d2c4e-0000-4000-8000-000000000001")
    write_atomic(coll, sim.qubes_xml)


def _other_root(sim: Sim, root: str = "ab" * 32) -> None:
    (name,) = ours_raw(sim)
    store = LvStore(sim.dom0 / "dev")
    info = store.info(VG, name)
    info.tags = [t for t in info.tags if not t.startswith(bases.ROOT)] + [bases.ROOT + root]
    store.write_meta(info)


@pytest.mark.parametrize("case, why", [
    ("grown", "the volume was resized since its base was taken"),
    ("shrunk", "the volume was resized since its base was taken"),
    ("base deleted", "no base of this repository (first backup, or the base was removed)"),
    ("re-created VM", "the VM was re-created since its base was taken"),
    ("base of another snapshot", "its base was taken for another snapshot than the newest one dom0 recorded"),
    ("thin_delta fails", "thin_delta gave no usable answer"),
])  # fmt: skip
def test_fallbacks_read_in_full_and_stay_exact(tracked: tuple[Sim, RepoBackupResult], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, case: str, why: str) -> None:
    sim, _first = tracked
    size = lv(sim).stat().st_size
    write(sim, [7 * BS], size=size + 3 * BS if case == "grown" else size - 2 * BS if case == "shrunk" else None)
    {"base deleted": _delete_base, "re-created VM": _recreate_vm, "base of another snapshot": _other_root}.get(
        case, lambda s: None)(sim)
    if case == "thin_delta fails":
        monkeypatch.setenv("QUBES_SIM_THIN_FAIL", "delta")
    result, t = backup(sim)
    assert t.full_reads() == [f"volume 'private' of work: {why}"]
    assert result.reused_blocks == 0 and result.read_blocks >= data_blocks(lv(sim))
    assert restored(sim, tmp_path) == lv(sim).read_bytes()
    assert len(ours(sim)) == 1 and not (sim.dom0 / "dev" / VG / ".lvm/vm-pool.metasnap").exists()


def test_reverted_volume_reads_what_differs(tracked: tuple[Sim, RepoBackupResult], tmp_path: Path) -> None:
    """qvm-volume revert makes the committed LV an older revision: thin_delta compares mappings, so the blocks
    that differ from the base are exactly what is read; the restore is the reverted content."""
    sim, _ = tracked
    old = tmp_path / "old"
    shutil.copyfile(lv(sim), old)
    write(sim, [11 * BS, 12 * BS])
    backup(sim)
    os.replace(old, lv(sim))  # reverted to the state before the writes
    result, t = backup(sim)
    assert t.full_reads() == [] and result.read_blocks <= 2 + 2
    assert restored(sim, tmp_path) == lv(sim).read_bytes()


def test_base_of_a_root_older_than_the_newest_is_not_trusted(tracked: tuple[Sim, RepoBackupResult],
                                                             tmp_path: Path) -> None:
    """dom0's record and the base agree on root R1, but the repository's newest root is R2 (another dom0 wrote
    it; it descends from R1, so the backup accepts it): the base is not R2's, so the volume is read in full."""
    sim, first = tracked
    record = repostate.load(sim.system, first.repo_id)
    assert record is not None and record.root == first.root
    write(sim, [6 * BS])
    backup(sim)  # R2, and a base of R2
    repostate.save(sim.system, record)  # dom0's record back at R1 ...
    _other_root(sim, first.root)  # ... and the base claims R1
    write(sim, [8 * BS])
    result, t = backup(sim)
    assert t.full_reads() == ["volume 'private' of work: the repository's newest snapshot is not the one its base "
                              "was taken for"]  # fmt: skip
    assert result.reused_blocks == 0 and result.read_blocks >= data_blocks(lv(sim))
    assert restored(sim, tmp_path) == lv(sim).read_bytes()


def test_another_repository_has_its_own_base(tracked: tuple[Sim, RepoBackupResult]) -> None:
    sim, first = tracked
    other, t = backup(sim, repo="/home/user/repo2")
    assert t.full_reads() == ["volume 'private' of work: no base of this repository (first backup, or the base "
                              "was removed)"]  # fmt: skip
    assert ours(sim) == sorted(f"vm-work-private-qbbase-{r[:8]}" for r in (first.repo_id, other.repo_id))
    again, t = backup(sim)
    assert t.full_reads() == [] and again.changed == []


def test_failed_backup_leaves_no_snapshot_and_keeps_the_base(tracked: tuple[Sim, RepoBackupResult]) -> None:
    sim, first = tracked
    write(sim, [2 * BS])
    with pytest.raises(VerificationError):
        backup(sim, passphrase=b"wrong")
    assert ours(sim) == [f"vm-work-private-qbbase-{first.repo_id[:8]}"]
    result, t = backup(sim)  # the old base still pairs with the newest root
    assert t.full_reads() == [] and result.read_blocks <= 3


def test_failed_promotion_leaves_no_new_snapshot(tracked: tuple[Sim, RepoBackupResult],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """lvm refusing to retag the new snapshots (as the real-qubesd harness's lvm stand-in, which has no
    ``--deltag``): a warning, the backup complete, and the new snapshot removed at once (it was left until the
    next backup); the next run reads in full and keeps a base again."""
    sim, first = tracked
    write(sim, [5 * BS])
    real = bases.run_lvm

    def no_deltag(system: object, args: list[str], what: str) -> str:
        if args[0] == "lvchange" and "--deltag" in args:
            raise BackupError(f"{what}: lvm lvchange failed: lvchange: unrecognized option '--deltag'")
        return real(system, args, what)  # type: ignore[arg-type]

    monkeypatch.setattr(bases, "run_lvm", no_deltag)
    result, _t = backup(sim, warnings=True)
    assert result.warnings == ["cannot tag the new change-tracking bases: lvm lvchange failed: lvchange: "
                               "unrecognized option '--deltag': the volumes are read in full next time"]  # fmt: skip
    assert ours(sim) == [f"vm-work-private-qbbase-{first.repo_id[:8]}"]  # the old base only: no -qbnext- left
    monkeypatch.undo()
    write(sim, [6 * BS])
    result, t = backup(sim)
    assert t.full_reads() == ["volume 'private' of work: its base was taken for another snapshot than the newest "
                              "one dom0 recorded"]  # fmt: skip
    assert ours(sim) == [f"vm-work-private-qbbase-{first.repo_id[:8]}"] and result.reused_blocks == 0


def test_leftovers_of_a_killed_run_removed_at_the_next_start(tracked: tuple[Sim, RepoBackupResult]) -> None:
    sim, first = tracked
    store = LvStore(sim.dom0 / "dev")
    store.snapshot(VG, "vm-work-private", "vm-work-private-qbnext-999999", readonly=True,
                   tags=(bases.NEXT_TAG, f"{bases.PID}999999", f"{bases.ORIGIN}vm-work-private"))  # fmt: skip
    # killed between tagging and removing the old base: a second base, of an older root
    base = f"vm-work-private-qbbase-{first.repo_id[:8]}"
    info = store.info(VG, base)
    store.snapshot(VG, "vm-work-private", "vm-work-private-qbnext-999998", readonly=True,
                   tags=(*(t for t in info.tags if not t.startswith(bases.ROOT)), bases.ROOT + "cd" * 32))
    # a reserve/release child killed with SIGKILL: its pool's reservation and its marker; another pool's
    # marker naming a live process (a backup running now) is left alone
    markers = sim.dom0 / "var/lib/qubes-backup/thin-reservations"
    metasnap = sim.dom0 / "dev" / VG / ".lvm/vm-pool.metasnap"
    metasnap.touch()
    markers.mkdir(parents=True, exist_ok=True)
    (markers / "qubes_dom0-vm--pool").write_text("999999")
    (markers / "qubes_dom0-other").write_text(str(os.getpid()))
    _result, t = backup(sim)
    assert t.full_reads() == [] and ours(sim) == [base]
    assert not metasnap.exists() and sorted(p.name for p in markers.iterdir()) == ["qubes_dom0-other"]
    assert t.notes == ["released the metadata snapshot of thin pool qubes_dom0-vm--pool left by a killed backup"]


def test_no_base_above_90_percent_pool_use(tracked: tuple[Sim, RepoBackupResult], monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:  # fmt: skip
    sim, _ = tracked
    for usage in ("95.00,10.00", "40.00,91.50"):
        monkeypatch.setenv("QUBES_SIM_POOL_USAGE", usage)
        write(sim, [4 * BS])
        result, t = backup(sim)
        assert ours(sim) == [] and t.full_reads() == []  # read through the transient snapshot, in full
        assert len(t.notes) == 1 and "no change-tracking bases kept" in t.notes[0]
        assert result.reused_blocks == 0
    assert restored(sim, tmp_path) == lv(sim).read_bytes()
    monkeypatch.setenv("QUBES_SIM_POOL_USAGE", "89.00,10.00")
    backup(sim)
    assert len(ours(sim)) == 1


# -- the command line --------------------------------------------------------------------------------------------


def test_cli_rescan_and_release_bases(tmp_path: Path) -> None:
    sim = new_sim(tmp_path / "sim")
    for extra in ((), ("--rescan", "-v")):
        r = sim.run("qvm-backup", "-y", "-p", "/pw", *KDF, "-d", "backupvm", "--repo", REPO, *extra, "work")
        assert r.returncode == 0, r.stderr
    assert "note: read in full: volume 'private' of work: --rescan" in r.stderr.splitlines()
    r = sim.run("qvm-backup", "-y", "-p", "/pw", *KDF, "-d", "backupvm", "--rescan", "/home/user/backups", "work")
    assert r.returncode == 2 and "--rescan applies to --repo backups only" in r.stderr
    (base,) = ours(sim)
    assert base.startswith("vm-work-private-qbbase-")
    (name,) = [i.name for i in LvStore(sim.dom0 / "dev").lvs(VG) if i.name.startswith(base)]
    r = sim.run("qvm-backup", "--release-bases")
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    assert line.startswith(f"Released {VG}/{name} (base of repository {base[-8:]}")
    assert ours(sim) == []


def test_cli_says_when_the_tracker_gave_no_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """thin_delta failing where a base pairs (as on the real-qubesd harness, which has no device-mapper): one
    note without -v (before, the full read was said only with -v); a first backup (no base yet) has none."""
    sim = new_sim(tmp_path / "sim")
    r = sim.run("qvm-backup", "-y", "-p", "/pw", *KDF, "-d", "backupvm", "--repo", REPO, "work")
    assert r.returncode == 0 and "change tracking" not in r.stderr, r.stderr
    monkeypatch.setattr(sim, "env", lambda: {**Sim.env(sim), "QUBES_SIM_THIN_FAIL": "delta"})
    r = sim.run("qvm-backup", "-y", "-p", "/pw", *KDF, "-d", "backupvm", "--repo", REPO, "work")
    assert r.returncode == 0, r.stderr
    assert ("note: change tracking could not tell what changed in 1 volume (thin_delta or FIEMAP gave no usable "
            "answer): read in full; -v names them") in r.stderr.splitlines()  # fmt: skip


def test_plan_table_names_live_volumes(tmp_path: Path) -> None:
    """A running VM's volume with revisions_to_keep=-1 is written in place: the table says it is saved
    crash-consistent; the same volume of a halted VM, or a running VM's other volumes, get no such note."""
    from qubes_backup_dom0.cli.backup import summary
    from qubes_backup_sim.storage import set_volume_attr

    sim = new_sim(tmp_path / "sim", running=["work"])
    launch.stop_qubesd(sim.dir)
    coll = Collection.load(sim.qubes_xml)
    for name in ("work", "vault"):
        dom = coll.get(name)
        assert dom is not None
        set_volume_attr(dom, "private", "revisions_to_keep", "-1")
    write_atomic(coll, sim.qubes_xml)
    plan = plan_backup(sim.system, ["work", "vault"])
    try:
        rows = {line.split()[0]: line for line in summary(plan, False).splitlines() if line.split()}
    finally:
        plan.close()
    assert "live volume private: written in place while it runs, saved crash-consistent" in rows["work"]
    assert "running" in rows["work"] and "live" not in rows["vault"]


def test_random_runs_tracked_equals_rescan(tmp_path: Path) -> None:
    """Random changes between runs (writes, discards, growth, shrink, revert, base deleted, VM re-created, VM
    restarted: its LV replaced by an equal one, revisions_to_keep set to 0, 1 or -1, nothing): after each tracked
    run a --rescan run of the same state changes no archive (its file lists are the tracked run's), and the last
    snapshot restores byte-exact.  50 runs (issue 21: every kind of change once, then random ones; about 2
    minutes on an idle 2-core machine), 200 with QB_LONG=1."""
    runs = 200 if os.environ.get("QB_LONG") == "1" else 50
    rng = random.Random(21)
    sim = new_sim(tmp_path / "sim")
    write(sim, [rng.randrange(0, 60) * BS for _ in range(5)])
    backup(sim)
    kept = tmp_path / "kept"
    shutil.copyfile(lv(sim), kept)
    ops = ["write", "shrink", "revert", "discard", "grow", "base deleted", "re-created VM", "restart", "revisions",
           "nothing"]  # fmt: skip
    for step in range(runs):
        op = ops[step % len(ops)] if step < len(ops) else rng.choice(ops)
        size = lv(sim).stat().st_size
        if op == "write":
            write(sim, [rng.randrange(0, size - 4096) & ~4095 for _ in range(rng.randrange(1, 9))])
        elif op == "discard":
            write(sim, [])
            data = bytearray(lv(sim).read_bytes())
            at = rng.randrange(0, size // BS) * BS
            data[at : at + BS] = bytes(BS)
            lv(sim).write_bytes(data)  # in place, but into the new LV write() just made (no snapshot shares it)
        elif op in ("grow", "shrink"):
            write(sim, [0], size=size + BS * rng.randrange(1, 4) if op == "grow" else size - BS)
        elif op == "revert":
            os.replace(kept, lv(sim))
            shutil.copyfile(lv(sim), kept)  # another revert may come before the next copy
        elif op == "base deleted" and ours(sim):
            _delete_base(sim)
        elif op == "restart":
            write(sim, [])  # a VM that ran and wrote nothing: its committed LV replaced by an equal new one
        elif op in ("re-created VM", "revisions"):
            from qubes_backup_sim.storage import set_volume_attr

            launch.stop_qubesd(sim.dir)
            coll = Collection.load(sim.qubes_xml)
            dom = coll.get("work")
            assert dom is not None
            if op == "revisions":
                set_volume_attr(dom, "private", "revisions_to_keep", rng.choice(["0", "1", "-1"]))
            else:
                dom.set_property("uuid", f"3f1d2c4e-0000-4000-8000-{step:012d}")
            write_atomic(coll, sim.qubes_xml)
        tracked_run, _t = backup(sim)
        rescanned, _ = backup(sim, rescan=True)
        assert rescanned.changed == [], (step, op)
        assert tracked_run.seq + 1 == rescanned.seq
        if step % 3 == 2:
            shutil.copyfile(lv(sim), kept)
    assert restored(sim, tmp_path) == lv(sim).read_bytes()


def test_a_killed_backup_leaves_nothing_after_the_next_start(tracked: tuple[Sim, RepoBackupResult],
                                                              tmp_path: Path) -> None:  # fmt: skip
    """qvm-backup killed (SIGKILL, its whole process group) while thin_delta compares the new snapshot with the
    base (on a second reservation: the first thin_delta, base against the committed LV, failed): its new
    snapshot stays until the next backup starts, which removes it, keeps the base valid and still reads only
    what changed."""
    import shlex
    import signal
    import sys
    import time

    sim, first = tracked
    write(sim, [10 * BS])
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    mark = tmp_path / "first-delta-ran"
    blocked = tmp_path / "second-delta-waits"
    # the first thin_delta (base against the committed LV) fails, so the new snapshot is compared on a second
    # reservation, where the run is killed
    gate = f'if [ -e {shlex.quote(str(mark))} ]; then : > {shlex.quote(str(blocked))}; cat ' \
           f'{shlex.quote(str(fifo))} >/dev/null; exec "$0" "$@"; fi; : > {shlex.quote(str(mark))}; exit 1'  # fmt: skip
    gated = ["sh", "-c", gate, *sim.system.thin_delta_argv]
    code = ("import sys; from qubes_backup_dom0.cli.backup import main; sys.exit(main(sys.argv[1:]))")
    env = dict(sim.env(), QUBES_THIN_DELTA=shlex.join(gated))
    proc = subprocess.Popen([sys.executable, "-c", code, "-y", "-q", "-p", "/pw", *KDF, "-d", "backupvm", "--repo",
                             REPO, "work"], env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    metasnap = sim.dom0 / "dev" / VG / ".lvm/vm-pool.metasnap"
    deadline = time.monotonic() + 60  # a bound on a hang, not a measurement
    while not (blocked.exists() and metasnap.exists()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(fifo, "w"):  # the reserve/release child (its own session) goes on and releases
        pass
    while metasnap.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    base = f"vm-work-private-qbbase-{first.repo_id[:8]}"
    (left,) = unpromoted(sim)  # the killed run's, named as a base already (dom0 knew the repository)
    assert ours(sim) == [base, base] and left.startswith(f"{base}-") and bases.PID + str(proc.pid) in \
        LvStore(sim.dom0 / "dev").info(VG, left).tags  # fmt: skip
    result, t = backup(sim)
    assert t.full_reads() == [] and ours(sim) == [base]
    assert result.reused_blocks > 0 and result.read_blocks <= 3


def test_a_wrong_tracker_is_caught_by_rescan(tracked: tuple[Sim, RepoBackupResult], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A faulty thin_delta (QUBES_SIM_THIN_FAIL=dropdelta: its first changed range silently left out) makes a
    tracked run reuse a stale block: nothing can see that without reading.  The next --rescan reads everything,
    compares with what tracking would have reused, stores the right data and fails (exit 1) with one line."""
    sim, _ = tracked
    write(sim, [5 * BS, 20 * BS])
    monkeypatch.setenv("QUBES_SIM_THIN_FAIL", "dropdelta")
    wrong, t = backup(sim)
    assert t.full_reads() == [] and wrong.read_blocks <= 1 + 2  # one of the two blocks was not read
    write(sim, [30 * BS])
    r = sim.run("qvm-backup", "-y", "-q", "-p", "/pw", *KDF, "-d", "backupvm", "--repo", REPO, "--rescan", "work")
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == ["error: change tracking missed 1 changed block of volume 'private' of work: "
                                     "this snapshot read it in full and is right, snapshots since its last --rescan "
                                     "may hold stale blocks of it (thin_delta or FIEMAP answered wrongly; please "
                                     "report it)"]  # fmt: skip
    monkeypatch.delenv("QUBES_SIM_THIN_FAIL")
    assert restored(sim, tmp_path) == lv(sim).read_bytes()
    clean, t = backup(sim, rescan=True)  # a right tracker: no mismatch
    assert t.mismatches() == [] and clean.changed == []
    # with --json: the document says the run failed (the snapshot is written all the same)
    write(sim, [7 * BS, 21 * BS])
    monkeypatch.setenv("QUBES_SIM_THIN_FAIL", "dropdelta")
    backup(sim)
    monkeypatch.delenv("QUBES_SIM_THIN_FAIL")
    r = sim.run("qvm-backup", "-y", "-q", "-p", "/pw", *KDF, "-d", "backupvm", "--repo", REPO, "--rescan", "--json",
                "work")  # fmt: skip
    doc = json.loads(r.stdout)
    assert r.returncode == 1 and doc["ok"] is False and doc["exit_code"] == 1, r.stdout
    assert len(doc["tracking_mismatches"]) == 1 and doc["error"].startswith("--rescan: change tracking missed")
    assert doc["read_blocks"] > 0 and doc["reused_blocks"] == 0


def test_a_plan_failing_after_the_snapshots_leaves_none_of_them(tracked: tuple[Sim, RepoBackupResult],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The new snapshots are all taken before the VMs are planned (one lvs, one reservation per pool): a plan
    that fails afterwards (here: the firewall of work cannot be read) removes every one of them, planned or not;
    the base stays and still pairs."""
    from qubes_backup_dom0.qubes.interface import Qubes

    sim, first = tracked
    write(sim, [4 * BS])

    def broken(self: Qubes, name: str) -> object:
        raise BackupError(f"cannot read the firewall of {name}")

    monkeypatch.setattr(Qubes, "firewall_rules", broken)
    with pytest.raises(BackupError, match="cannot read the firewall of work"):
        backup(sim)
    assert unpromoted(sim) == [] and ours(sim) == [f"vm-work-private-qbbase-{first.repo_id[:8]}"]
    monkeypatch.undo()
    result, t = backup(sim)
    assert t.full_reads() == [] and result.volume_read_blocks == 1
