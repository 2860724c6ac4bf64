"""Property test over consecutive repository backups of a simulated lvm_thin system (issue 20, "Tests").

A seeded random history (the seed is printed, and taken from ``QB_SEED`` when set, to replay a failure) runs
at least 30 backups into one repository.  Before each run, VMs change the way Qubes changes them: random
writes and discards (holes punched) into their private volumes, volume growth, VM start and shutdown (a
running VM writes into its ``-snap`` LV; a backup reads the committed LV, so those writes count only from the
shutdown on), VM deletion and re-creation under the same name (a new, empty volume).  One run changes nothing
committed (only a running VM's ``-snap``, if any) and must store no data block.

After every run, the newest and one random older snapshot verify (``--verify-only``: every object fetched
and checked); the newest and a random older snapshot are restored byte-exact every RESTORE_EVERY runs and at
the last run: every volume's bytes equal the committed source at that run, and its allocation (SEEK_DATA /
SEEK_HOLE, per block) is exactly the source's non-zero blocks: holes stay holes, zeros become holes.

Sizes: default 30 runs, byte-exact restores every 6th run (measured: about 27 s of CPU, 2-4 min of wall time
on the shared 2 cores at load 10-14); ``QB_LONG=1``: 45 runs, more and bigger writes (up to 1 MiB) and growth
(up to 300 MiB), a byte-exact restore of both snapshots after every run (7 min there).
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from conftest import Sim, new_sim, run_repo_restore
from qubes_backup_dom0.backup.plan import plan_backup
from qubes_backup_dom0.backup.repository import RepoBackup, RepoBackupResult, RepoOptions
from qubes_backup_dom0.format.sparse import same_content, scan
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.restore.plan import RestoreOptions
from test_repo_roundtrip import PASS, REPO, copy_sparse, punch

LONG = os.environ.get("QB_LONG") == "1"
RUNS = 45 if LONG else 30
RESTORE_EVERY = 1 if LONG else 6
BS = 64 << 10
VMS = ("work", "personal", "vault")
RECREATED = "vault"  # deleted and re-created under the same name (nothing refers to it)
FORCED = {3: "start", 8: "delete", 9: "re-create", 12: "shutdown"}  # besides the random ones


@dataclass
class History:
    sim: Sim
    base: Path
    rng: random.Random
    qubes: Qubes
    present: set[str] = field(default_factory=lambda: set(VMS))
    running: set[str] = field(default_factory=set)
    truths: list[dict[str, dict[str, Path]]] = field(default_factory=list)  # per run: vm -> volume -> frozen copy

    # -- what a day of use does ------------------------------------------------------------------------

    def working_file(self, vm: str) -> Path:
        """What the VM writes to: its committed LV, or the -snap LV while it runs."""
        path = self.sim.volume_files(vm)["private"]
        return path.with_name(path.name + "-snap") if vm in self.running else path

    def change(self, path: Path, grow: bool) -> None:
        """Scattered writes, discards, sometimes growth; a new file renamed over the old (never in place:
        earlier runs' truths are hard links)."""
        rng = self.rng
        new = path.with_name(path.name + ".new")
        copy_sparse(path, new)
        size = new.stat().st_size
        if grow:
            size += rng.choice([1 << 20, 64 << 20] + ([300 << 20] if LONG else [])) + rng.randrange(1, BS)
            os.truncate(new, size)
            with open(new, "r+b") as f:
                f.seek(size - 5000)
                f.write(rng.randbytes(5000))
        with open(new, "r+b") as f:
            for _ in range(rng.randrange(1, 20 if LONG else 6)):
                off = rng.randrange(0, min(size, 64 << 20) - (1 << 17)) & ~4095
                f.seek(off)
                f.write(rng.randbytes(rng.choice([4096, 16384, 65536] + ([1 << 20] if LONG else []))))
            if rng.random() < 0.2:  # a block rewritten with zeros: a hole to the backup
                f.seek(rng.randrange(0, 1000) * BS)
                f.write(bytes(BS))
        for _ in range(rng.randrange(0, 3)):
            off = rng.randrange(0, min(size, 64 << 20) - 2 * BS) & ~(BS - 1)
            punch(new, off, BS * rng.randrange(1, 3))
        os.rename(new, path)

    def day(self, k: int) -> list[str]:
        """Random events; returns what happened (for the failure message).  Every kind of event happens in
        every history: ``FORCED`` runs start work, delete and re-create vault, and shut work down."""
        rng, events = self.rng, []
        forced = FORCED.get(k)
        if forced == "delete" and RECREATED in self.running:
            self.qubes.api.call("admin.vm.Shutdown", RECREATED)
            self.running.discard(RECREATED)
            events.append(f"shutdown {RECREATED}")
        for vm in sorted(self.present):
            r = rng.random()
            if forced == "start" and vm == "work":
                r = 0 if vm not in self.running else 1
            if forced == "shutdown" and vm == "work":
                r = 0.2 if vm in self.running else 1
            if forced == "delete" and vm == RECREATED:
                r = 1
            if r < 0.12 and vm not in self.running:
                self.qubes.api.call("admin.vm.Start", vm)
                self.running.add(vm)
                events.append(f"start {vm}")
            elif r < 0.24 and vm in self.running:
                self.qubes.api.call("admin.vm.Shutdown", vm)
                self.running.discard(vm)
                events.append(f"shutdown {vm}")
            if rng.random() < 0.6:
                grow = vm not in self.running and rng.random() < 0.15
                self.change(self.working_file(vm), grow)
                events.append(f"write {vm}{' +grow' if grow else ''}{' (running)' if vm in self.running else ''}")
        chance = rng.random() < 0.08 and k > max(FORCED)  # random deletions only after the forced one
        if RECREATED in self.present and RECREATED not in self.running and (chance or forced == "delete"):
            self.qubes.remove_vm(RECREATED)
            self.present.discard(RECREATED)
            events.append(f"delete {RECREATED}")
        elif RECREATED not in self.present and (rng.random() < 0.5 or forced == "re-create") and forced != "delete":
            self.qubes.create_vm("AppVM", RECREATED, "black", None)
            self.present.add(RECREATED)
            self.change(self.working_file(RECREATED), grow=False)
            events.append(f"re-create {RECREATED}")
        return events

    def running_writes_only(self) -> list[str]:
        """A day that changes nothing committed: only running VMs write (into their -snap)."""
        for vm in sorted(self.running):
            self.change(self.working_file(vm), grow=False)
        return [f"write {vm} (running)" for vm in sorted(self.running)]

    def freeze(self, k: int) -> None:
        """Hard links to the committed volumes as this run backs them up."""
        truth: dict[str, dict[str, Path]] = {}
        for vm in sorted(self.present):
            truth[vm] = {}
            for vol, path in self.sim.volume_files(vm).items():
                dest = self.base / f"truth{k}" / vm / vol
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, dest)
                truth[vm][vol] = dest
        self.truths.append(truth)

    # -- backup and restore ----------------------------------------------------------------------------

    def backup(self) -> RepoBackupResult:
        plan = plan_backup(self.sim.system, sorted(self.present, key=VMS.index), zeros=False)  # as --repo plans
        job = RepoBackup(self.sim.system, plan, "backupvm", REPO, RepoOptions(kdf_n=1024, block_size=BS))
        try:
            job.connect()
            return job.run(PASS)
        finally:
            job.close()
            plan.close()

    def restore(self, seq: int, verify: bool) -> None:
        truth = self.truths[seq - 1]
        opts = RestoreOptions(vms=tuple(truth), rename_conflicting=True, verify_only=verify)
        job = run_repo_restore(self.sim.system, REPO, "backupvm", PASS, opts, snapshot=seq)
        assert job.chosen is not None and job.chosen.root.seq == seq
        if verify:
            return
        assert job.restore_plan is not None
        names = {a.name: a.target_name for a in job.restore_plan.vms if a.restore}
        try:
            assert sorted(names) == sorted(truth)
            for vm, vols in truth.items():
                got = self.sim.volume_files(names[vm])
                for vol, src in vols.items():
                    same_exactly(src, got[vol], f"snapshot {seq}, {vm}:{vol}")
        finally:
            for name in job.restored:
                self.qubes.remove_vm(name)


def data_blocks(path: Path) -> set[int]:
    """Blocks SEEK_DATA finds data in (the allocation map, per block)."""
    _size, regions = scan(path)
    return {i for off, n in regions for i in range(off // BS, (off + n - 1) // BS + 1)}


def nonzero_blocks(path: Path) -> set[int]:
    out = set()
    with open(path, "rb") as f:
        for i in sorted(data_blocks(path)):
            if any(os.pread(f.fileno(), BS, i * BS)):
                out.add(i)
    return out


def same_exactly(src: Path, dst: Path, what: str) -> None:
    """Same size and bytes; the restored file's allocated blocks are exactly the source's non-zero blocks."""
    assert src.stat().st_size == dst.stat().st_size, f"{what}: size"
    assert same_content(src, dst), f"{what}: content differs"
    assert data_blocks(dst) == nonzero_blocks(src), f"{what}: holes differ"


def stored_objects(sim: Sim) -> dict[str, str]:
    """Object file name -> type letter, as the agent stored them."""
    base = sim.vm_root("backupvm") / REPO.lstrip("/") / "objects"
    return {p.name: p.read_bytes()[5:6].decode() for p in base.rglob("*") if p.is_file()}


def test_thirty_backups_of_a_changing_system(tmp_path: Path) -> None:
    seed = int(os.environ.get("QB_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"QB_SEED={seed}")  # shown with the failure: replay with QB_SEED=...
    sim = new_sim(tmp_path / "sim")
    h = History(sim, tmp_path, random.Random(seed), Qubes(sim.system))
    idle_run = h.rng.choice([k for k in range(2, RUNS + 1) if k not in FORCED])
    log: list[str] = []
    try:
        for k in range(1, RUNS + 1):
            events = [] if k == 1 else h.running_writes_only() if k == idle_run else h.day(k)
            log.append(f"run {k}: {', '.join(events) or 'nothing'}")
            before = stored_objects(sim)
            result = h.backup()
            h.freeze(k)
            assert result.seq == k
            if k == idle_run:  # nothing committed changed: no block stored (counted in the backup VM too)
                new = {n: t for n, t in stored_objects(sim).items() if n not in before}
                assert result.blocks == 0 and result.changed == [], result
                assert "d" not in new.values() and "s" not in new.values() and "t" not in new.values(), new
            older = h.rng.randrange(1, k) if k > 1 else 1
            exact = k % RESTORE_EVERY == 0 or k == RUNS
            for seq in dict.fromkeys((k, older)):
                h.restore(seq, verify=not exact)
        happened = ", ".join(e for line in log for e in line.partition(": ")[2].split(", "))
        for event in ("start work", "shutdown work", "delete vault", "re-create vault"):
            assert event in happened.split(", "), (event, log)
    except BaseException:
        print("\n".join(log[-10:]))
        print(f"QB_SEED={seed}")
        raise
    finally:
        shutil.rmtree(tmp_path / "sim" / "vms" / "backupvm" / REPO.lstrip("/"), ignore_errors=True)
