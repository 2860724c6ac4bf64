"""What a restore asks the backup VM for (issue 20, "Restore reads"), counted in the backup VM: the agent is
started through its real service entry point by a relay (tests/repo_proxy_agent.py) that logs every GET it
passes on.  Restoring the newest snapshot (all VMs with dom0's home, and one VM) asks only for objects that
snapshot references (its root, qubes.xml subset and file lists; the restored files' segments and data
blocks), each data block at most once per file that holds it (a block that recurs in a file is kept, not
fetched again; one shared by two VMs may be fetched for each), every other object once.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import pytest
from conftest import Sim, new_sim, run_repo_restore
from qubes_backup_dom0.format import repo, repotree
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.restore.plan import RestoreOptions
from test_repo_hostile_more import ProxyTransport, clear_refs
from test_repo_roundtrip import PASS, REPO, VMS, backup, copy_sparse, mutate

BS = 64 << 10


def write_blocks(sim: Sim, vm: str, block: bytes, positions: list[int]) -> None:
    path = sim.volume_files(vm)["private"]
    new = path.with_name("new")
    copy_sparse(path, new)
    with open(new, "r+b") as f:
        for i in positions:
            f.seek(i * BS)
            f.write(block)
    os.rename(new, path)


class Snapshot:
    """The newest snapshot as the test reads it with the passphrase: which objects each file's map uses."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.keys = repo.keys_from_passphrase(PASS, repo.parse_header((base / "repo-header").read_bytes()))
        self.root_file = sorted((base / "roots").iterdir())[-1]
        opened = self.open(self.root_file, repo.ROOT)
        self.root = repotree.parse_root(opened.plaintext, opened.refs)
        self.files: dict[tuple[str, str], tuple[list[str], list[str]]] = {}  # (vm, path) -> (segments, data ids)
        for a in self.root.archives:
            t = self.open(self.obj(a.tree), repo.TREE)
            for f in repotree.parse_tree(t.plaintext, BS, t.refs).files:
                sids = [sid for _, sid in f.segments]
                data = []
                for sid in sids:
                    s = self.open(self.obj(sid), repo.SEGMENT)
                    data += [d for _, d in repotree.parse_segment(s.plaintext, s.refs).blocks]
                self.files[(a.vm, f.path)] = (sids, data)

    def obj(self, oid: str) -> Path:
        return self.base / "objects" / oid[:2] / oid

    def open(self, path: Path, otype: str) -> repo.Opened:
        return repo.open_object(self.keys, path.read_bytes(), otype, None if otype == repo.ROOT else path.name, BS)

    def referenced(self) -> set[str]:
        """Every object the root references, by the references in clear."""
        seen: set[str] = set()
        todo = clear_refs(self.root_file.read_bytes())
        while todo:
            oid = todo.pop()
            if oid not in seen:
                seen.add(oid)
                todo += clear_refs(self.obj(oid).read_bytes())
        return seen


@pytest.fixture(scope="module")
def repo_sim(tmp_path_factory: pytest.TempPathFactory) -> Sim:
    """Two snapshots; work repeats a block 12 times, and work and personal share another one."""
    sim = new_sim(tmp_path_factory.mktemp("reads") / "sim")
    rng = random.Random(21)
    write_blocks(sim, "work", rng.randbytes(BS), [60 + 5 * i for i in range(12)])
    shared = rng.randbytes(BS)
    write_blocks(sim, "work", shared, [200])
    write_blocks(sim, "personal", shared, [300, 301])
    backup(sim)
    mutate(sim, rng)
    backup(sim)
    return sim


def restore_counting(sim: Sim, vms: tuple[str, ...], log: Path) -> list[str]:
    opts = RestoreOptions(vms=vms, rename_conflicting=True)
    transport = ProxyTransport(sim.system, {"log": str(log)})
    job = run_repo_restore(sim.system, REPO, "backupvm", PASS, opts, transport=transport)
    qubes = Qubes(sim.system)
    for name in job.restored:
        qubes.remove_vm(name)
    assert job.home_restored_to is not None or "dom0" not in vms
    return log.read_text().split()


def check_reads(snap: Snapshot, asked: list[str], vms: tuple[str, ...]) -> None:
    counts = Counter(asked)
    roots = [n for n in asked if n.startswith("roots/")]
    assert roots == [f"roots/{snap.root_file.name}"], roots
    objects = set(counts) - set(roots)
    assert objects <= snap.referenced(), "asked for objects the snapshot does not reference"
    restored = {k: v for k, v in snap.files.items() if k[0] in vms}
    segments = {s for sids, _ in restored.values() for s in sids}
    data = {d for _, ids in restored.values() for d in ids}
    trees = {a.tree for a in snap.root.archives}
    assert objects <= segments | data | trees | {snap.root.qubes}, "asked for another VM's map or data"
    assert data <= objects and segments <= objects  # and everything restored came from the repository
    holders = Counter(d for _, ids in restored.values() for d in set(ids))
    sholders = Counter(s for sids, _ in restored.values() for s in set(sids))
    for oid, n in counts.items():
        if oid in data:
            assert n <= holders[oid], f"data block {oid[:16]} asked for {n} times, in {holders[oid]} files"
        elif oid in segments:
            assert n <= sholders[oid], f"segment {oid[:16]} asked for {n} times, in {sholders[oid]} files"
        else:
            assert n == 1, f"{oid[:16]} asked for {n} times"


def test_restore_all_asks_only_for_the_snapshot_each_once(repo_sim: Sim, tmp_path: Path) -> None:
    snap = Snapshot(repo_sim.vm_root("backupvm") / REPO.lstrip("/"))
    vms = (*VMS, "dom0")
    asked = restore_counting(repo_sim, vms, tmp_path / "gets")
    check_reads(snap, asked, vms)
    # the block work repeats 12 times was fetched once; the one work and personal share at most twice
    work_ids = snap.files[("work", next(p for v, p in snap.files if v == "work" and p.endswith("private.img")))][1]
    repeated = Counter(work_ids).most_common(1)[0]
    assert repeated[1] >= 12 and Counter(asked)[repeated[0]] == 1


def test_restore_one_vm_asks_only_for_its_objects(repo_sim: Sim, tmp_path: Path) -> None:
    snap = Snapshot(repo_sim.vm_root("backupvm") / REPO.lstrip("/"))
    asked = restore_counting(repo_sim, ("personal",), tmp_path / "gets")
    check_reads(snap, asked, ("personal",))
    others = {d for (vm, _p), (_s, ids) in snap.files.items() if vm != "personal" for d in ids}
    mine = {d for (vm, _p), (_s, ids) in snap.files.items() if vm == "personal" for d in ids}
    assert not (set(asked) & (others - mine)), "asked for data only other VMs hold"
