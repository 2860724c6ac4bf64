"""VMs carried forward (docs/REPOSITORY.md section 7): a backup of some VMs makes a snapshot holding every VM of
the previous one, the others' archives unchanged (their own ``captured`` time), a deleted VM too, unless
``--forget`` leaves it out; the snapshot restores all of them byte-exact.  And dom0's cache of the newest
snapshot's maps (qubes/repocache.py): a second run fetches no segment of the parent when the cache matches,
falls back to fetching when it is damaged or the newest root is not the one dom0 wrote, and the snapshot it
makes is the same as without the cache.

Backups go through the library with the real agent as a separate process (test_repo_cli.py runs the CLI)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from conftest import Sim, assert_restored_like, new_sim
from qubes_backup_dom0.backup import carry
from qubes_backup_dom0.errors import UsageError, VerificationError
from qubes_backup_dom0.qubes import repocache, repostate
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.qubes.qubesxml import Collection
from qubes_backup_dom0.qubes.repoclient import RepoSession
from test_repo_roundtrip import BS, REPO, backup, copy_sparse, restore, tree_digest


def write_block(sim: Sim, vm: str, seed: int, at: int = 7) -> None:
    """Change one block of the VM's private volume (a new file renamed over it, as LVM does)."""
    path = sim.volume_files(vm)["private"]
    new = path.with_name("new")
    copy_sparse(path, new)
    with open(new, "r+b") as f:
        f.seek(at * BS)
        f.write(random.Random(seed).randbytes(BS))
    os.rename(new, path)


def keep(sim: Sim, vm: str, dest: Path) -> dict[str, Path]:
    dest.mkdir(parents=True)
    out = {}
    for vol, path in sim.volume_files(vm).items():
        os.link(path, dest / vol)
        out[vol] = dest / vol
    return out


def test_carried_vms_restore_byte_exact(tmp_path: Path) -> None:
    sim = new_sim(tmp_path / "sim")
    first = backup(sim, ("work", "personal", "vault"))
    truth = {vm: keep(sim, vm, tmp_path / "t1" / vm) for vm in ("personal", "vault")}
    write_block(sim, "work", 1)
    write_block(sim, "personal", 2)  # changed, but not backed up in run 2: snapshot 2 keeps run 1's copy
    truth["work"] = keep(sim, "work", tmp_path / "t2" / "work")
    second = backup(sim, ("work",))
    assert (second.read, sorted(second.carried), second.changed) == (["work"], ["personal", "vault"], ["work"])
    assert second.parent == 1 and second.archives == 3
    # the carried archives are referenced, not sent again: only work's changed block (and maps) went over
    assert second.blocks == 1

    for vm in ("work", "personal", "vault"):
        Qubes(sim.system).remove_vm(vm)
    job = restore(sim, None, ("work", "personal", "vault"))
    assert sorted(job.restored) == ["personal", "vault", "work"]
    chosen = job.chosen
    assert chosen is not None and chosen.root.seq == 2
    captured = {a.vm: a.captured for a in chosen.root.archives}
    assert captured["work"] >= chosen.root.created
    older = restore(sim, 1, ("personal",), verify=True).chosen
    assert older is not None
    then = {a.vm: a.captured for a in older.root.archives}  # when run 1 read them, carried as they were
    assert (captured["personal"], captured["vault"]) == (then["personal"], then["vault"])
    assert first.created <= then["vault"] <= chosen.root.created
    for vm, vols in truth.items():
        got = sim.volume_files(vm)
        assert sorted(got) == sorted(vols)
        for vol, src in vols.items():
            assert_restored_like(src, got[vol])


def test_deleted_vm_is_carried_until_forgotten(tmp_path: Path) -> None:
    sim = new_sim(tmp_path / "sim")
    backup(sim, ("work", "vault"))
    truth = keep(sim, "vault", tmp_path / "vault")
    Qubes(sim.system).remove_vm("vault")
    second = backup(sim, ("work",))
    assert second.carried == ["vault"]
    with pytest.raises(UsageError, match="--forget work: that VM is backed up"):
        backup(sim, ("work",), forget=("work",))
    with pytest.raises(UsageError, match="--forget nosuch: snapshot 2 holds no archive"):
        backup(sim, ("work",), forget=("nosuch",))
    third = backup(sim, ("work",), forget=("vault",))
    assert (third.seq, third.carried, third.forgotten, third.archives) == (3, [], ["vault"], 1)
    # snapshot 3 has no vault; snapshot 2 still has it and restores it byte-exact
    job = restore(sim, None, ("work",), verify=True)
    assert job.chosen is not None and [a.vm for a in job.chosen.root.archives] == ["work"]
    job = restore(sim, 2, ("vault",))
    assert job.restored == ["vault"]
    for vol, src in truth.items():
        assert_restored_like(src, sim.volume_files("vault")[vol])


def test_carried_home_and_dependencies(tmp_path: Path) -> None:
    """dom0's home is carried too; a carried VM's netvm and template stay described in the subset even when
    this run's VMs do not need them."""
    sim = new_sim(tmp_path / "sim")
    first = backup(sim, ("work", "dom0"))
    home_then = tree_digest(sim.home)
    (sim.home / "later.txt").write_bytes(b"written after snapshot 1")  # not in snapshot 2: home is carried
    second = backup(sim, ("vault",))
    assert sorted(second.carried) == ["dom0", "work"] and second.read == ["vault"]
    job = restore(sim, None, ("work", "vault", "dom0"), verify=True)
    assert job.chosen is not None and job.restore_plan is not None
    assert {a.vm: a.member for a in job.chosen.root.archives}["dom0"] == "vm0"
    wanted = {a.vm for a in job.restore_plan.wanted}
    assert wanted == {"work", "vault", "dom0"}
    assert first.seq == 1
    job = restore(sim, None, ("dom0",))
    assert job.home_restored_to is not None
    assert tree_digest(Path(str(job.home_restored_to))) == home_then


# ------------------------------------------------------------------------------------------------ the cache

def test_cache_saves_fetching_the_parents_segments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sim = new_sim(tmp_path / "sim")
    first = backup(sim, ("work", "vault", "dom0"))
    cache = repocache.cache_path(sim.system, first.repo_id)
    assert cache.stat().st_mode & 0o777 == 0o600
    cached = repocache.load(sim.system, first.repo_id, first.root, BS)
    assert cached is not None and cached
    asked: list[str] = []  # what dom0 asks the backup VM for (GET)
    original = RepoSession.request_many

    def request_many(self: RepoSession, wanted: list[str]) -> None:
        asked.extend(wanted)
        original(self, wanted)

    monkeypatch.setattr(RepoSession, "request_many", request_many)

    # the cache matches the newest root: no segment is fetched, and the snapshot is the one made without it
    write_block(sim, "work", 5)
    state = repostate.record_path(sim.system, first.repo_id)
    saved_state, saved_cache = state.read_bytes(), cache.read_bytes()
    objects = sim.vm_root("backupvm") / REPO.lstrip("/") / "objects"
    before = {p.name for p in objects.rglob("*") if p.is_file()}
    with_cache = backup(sim, ("work", "vault", "dom0"))
    assert with_cache.cache_used and with_cache.segments_fetched == 0 and with_cache.blocks == 1
    assert asked and not set(asked) & set(cached)  # the root and file lists only
    asked.clear()
    sent = {p.name for p in objects.rglob("*") if p.is_file()} - before
    root_with = restore(sim, None, ("work",), verify=True).chosen
    # undo snapshot 2 (root, its new objects, dom0's record), then make it again without the cache
    roots = sim.vm_root("backupvm") / REPO.lstrip("/") / "roots"
    sorted(roots.iterdir())[-1].unlink()
    for p in objects.rglob("*"):
        if p.is_file() and p.name in sent:
            p.unlink()
    state.write_bytes(saved_state)
    cache.unlink()
    without = backup(sim, ("work", "vault", "dom0"))
    assert not without.cache_used and without.segments_fetched > 0
    assert len(set(asked) & set(cached)) == without.segments_fetched
    root_without = restore(sim, None, ("work",), verify=True).chosen
    assert root_with is not None and root_without is not None
    # the same objects went over, but for the qubes.xml subset (run 2 set backup_timestamp in between)
    assert {p.name for p in objects.rglob("*") if p.is_file()} - before - {root_without.root.qubes} == \
        sent - {root_with.root.qubes}  # fmt: skip
    assert [(a.member, a.vm, a.tree) for a in root_with.root.archives] == \
        [(a.member, a.vm, a.tree) for a in root_without.root.archives]  # fmt: skip

    # a damaged cache is ignored (fetched as without one), then written afresh
    data = bytearray(cache.read_bytes())
    data[len(data) // 2] ^= 1
    cache.write_bytes(bytes(data))
    damaged = backup(sim, ("work", "vault", "dom0"))
    assert not damaged.cache_used and damaged.segments_fetched == without.segments_fetched
    again = backup(sim, ("work", "vault", "dom0"))
    assert again.cache_used and again.segments_fetched == 0
    assert saved_cache != cache.read_bytes()


def test_cache_of_another_root_is_not_used(tmp_path: Path) -> None:
    """The newest root is not the one dom0 cached (another dom0 backed up meanwhile): dom0 fetches."""
    sim = new_sim(tmp_path / "sim")
    first = backup(sim, ("work", "vault"))
    cache = repocache.cache_path(sim.system, first.repo_id)
    old = cache.read_bytes()
    second = backup(sim, ("work",))
    assert second.cache_used and second.segments_fetched == 0 and second.carried == ["vault"]
    # vault was carried into snapshot 2: its maps stayed in the cache, so backing it up fetches nothing
    again = backup(sim, ("vault",))
    assert again.cache_used and again.segments_fetched == 0
    cache.write_bytes(old)  # as if another dom0 wrote snapshots 2 and 3: this dom0's cache is of snapshot 1
    third = backup(sim, ("work",))
    assert not third.cache_used and third.segments_fetched > 0
    assert repocache.parse(old, first.repo_id, first.root, BS) is not None
    assert repocache.parse(old, first.repo_id, third.root, BS) is None
    assert repocache.parse(old, "0" * 32, first.root, BS) is None
    assert repocache.parse(old[:-1], first.repo_id, first.root, BS) is None


def test_merged_subset_keeps_carried_vms_and_their_dependencies(tmp_path: Path) -> None:
    """The parent's domain of a carried VM replaces this run's (a dependency here), a carried VM's template
    that dom0 no longer has comes from the parent's subset (backup-content False), a label this run's subset
    lacks is added, a qid taken meanwhile is renumbered; the archives are numbered in restore order."""
    coll = new_sim(tmp_path / "sim").collection()
    parent = coll.subset({"personal": ("appvms/personal", 5), "sys-firewall": ("appvms/sys-firewall", 7)})
    now = coll.copy()
    now.remove_domain("personal")
    now.remove_domain("debian-12")
    now["work"].set_property("qid", 7)  # personal's
    labels = now.root.find("labels")
    assert labels is not None
    labels.remove(next(x for x in labels if x.get("id") == "label-3"))  # personal's (yellow)
    current = now.subset({"work": ("appvms/work", 9)})
    assert current["sys-firewall"].features["backup-content"] == "False"

    merged = Collection.from_bytes(carry.merge_subsets(current.to_bytes(), parent.to_bytes(),
                                                       ["personal", "sys-firewall"], False))  # fmt: skip
    feats = {d.name: d.features for d in merged.domains}
    assert (feats["personal"]["backup-content"], feats["personal"]["backup-size"]) == ("True", "5")
    assert (feats["sys-firewall"]["backup-content"], feats["sys-firewall"]["backup-size"]) == ("True", "7")
    assert (feats["work"]["backup-content"], feats["work"]["backup-size"]) == ("True", "9")
    assert feats["debian-12"]["backup-content"] == "False" and "backup-path" not in feats["debian-12"]
    assert merged["personal"].label == "yellow"
    qids = [d.qid for d in merged.domains]
    assert len(qids) == len(set(qids))
    order = carry.numbering(merged.to_bytes(), ["work", "personal", "sys-firewall"])
    assert order["sys-firewall"] < order["work"] and order["sys-firewall"] < order["personal"]
    with pytest.raises(VerificationError, match="no domain"):
        carry.merge_subsets(current.to_bytes(), parent.to_bytes(), ["vault"], False)
