"""Repository round trips on a simulated lvm_thin system (docs/REPOSITORY.md): consecutive snapshots with
random writes, discards and growth; the newest and an older snapshot restore byte-exact with their holes;
an unchanged run stores no block; what each run sends is what changed.

Backups and restores go through the library (RepoBackup, RepoRestore) with the real agent started through
its service entry point as a separate process (the CLI is exercised in test_repo_cli.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import random
import shutil
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import KDF, PASSPHRASE, Sim, assert_restored_like, new_sim, run_repo_backup, run_repo_restore
from qubes_backup_dom0.backup.repository import RepoBackupResult
from qubes_backup_dom0.format.sparse import same_content, scan
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.qubes.repoclient import RepoSession
from qubes_backup_dom0.restore import repository
from qubes_backup_dom0.restore.plan import RestoreOptions
from qubes_backup_dom0.restore.repository import RepoRestore

PASS = PASSPHRASE.encode()  # the one in /pw
REPO = "/home/user/repo"
VMS = ("work", "personal", "vault")
BS = 64 << 10
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


def backup(sim: Sim, vms: tuple[str, ...] = (*VMS, "dom0"), zeros: bool = False, **kw: object) -> RepoBackupResult:
    result: RepoBackupResult = run_repo_backup(sim.system, vms, REPO, passphrase=PASS, zeros=zeros,
                                               **{"block_size": BS, **kw})  # fmt: skip
    return result


def restore(sim: Sim, snapshot: int | None, vms: tuple[str, ...], verify: bool = False) -> RepoRestore:
    opts = RestoreOptions(vms=vms, rename_conflicting=True, verify_only=verify)
    job = run_repo_restore(sim.system, REPO, "backupvm", PASS, opts, snapshot=snapshot)
    return job


def punch(path: Path, offset: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, ctypes.c_long(offset), ctypes.c_long(length)):
            os.pwrite(fd, bytes(length), offset)  # no hole punching here: zeros (a hole to the backup too)
    finally:
        os.close(fd)


def copy_sparse(src: Path, dst: Path) -> None:
    size, regions = scan(src)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(size)
        for off, length in regions:
            fo.seek(off)
            fi.seek(off)
            fo.write(fi.read(length))


def mutate(sim: Sim, rng: random.Random) -> None:
    """What a week of use does to the volumes: scattered writes, discards, sometimes growth.  Like Qubes (and
    the sim's LVM), a volume is never written in place: a new file is renamed over it."""
    for vm in VMS:
        for path in sim.volume_files(vm).values():
            if rng.random() < 0.3:
                continue  # unchanged this time
            new = path.with_name(path.name + ".new")
            copy_sparse(path, new)
            size = new.stat().st_size
            if rng.random() < 0.3:  # grown, with data past the first segment (4096 blocks = 256 MiB)
                size += rng.choice([1 << 20, 300 << 20]) + rng.randrange(1, BS)
                os.truncate(new, size)
                with open(new, "r+b") as f:
                    f.seek(size - 5000)
                    f.write(rng.randbytes(5000))
            with open(new, "r+b") as f:
                for _ in range(rng.randrange(1, 12)):
                    off = rng.randrange(0, size - 65536) & ~4095
                    f.seek(off)
                    f.write(rng.randbytes(rng.choice([4096, 16384, 65536])))
            for _ in range(rng.randrange(0, 3)):
                off = rng.randrange(0, size - 2 * BS) & ~(BS - 1)
                punch(new, off, BS * rng.randrange(1, 3))
            os.rename(new, path)
    home = sim.home / "Documents"
    home.mkdir(exist_ok=True)
    (home / f"note-{rng.randrange(1000)}.txt").write_bytes(rng.randbytes(rng.randrange(0, 300000)))


def changed_blocks(old: Path, new: Path) -> int:
    """Blocks of ``new`` that hold data and differ from the same block of ``old``."""
    _size, regions = scan(new)
    indexes = sorted({i for off, n in regions for i in range(off // BS, (off + n - 1) // BS + 1)})
    count = 0
    with open(old, "rb") as fo, open(new, "rb") as fn:
        for i in indexes:
            a, b = os.pread(fo.fileno(), BS, i * BS), os.pread(fn.fileno(), BS, i * BS)
            count += a != b and any(b)
    return count


def keep_truth(sim: Sim, dest: Path) -> dict[str, dict[str, Path]]:
    """Hard links to the volumes as backed up (never written in place afterwards) and a copy of the home."""
    out: dict[str, dict[str, Path]] = {}
    for vm in VMS:
        out[vm] = {}
        for vol, path in sim.volume_files(vm).items():
            (dest / vm).mkdir(parents=True, exist_ok=True)
            os.link(path, dest / vm / vol)
            out[vm][vol] = dest / vm / vol
    shutil.copytree(sim.home, dest / "home", symlinks=True,
                    ignore=lambda d, names: [n for n in names if n.startswith("home-restore-")])  # fmt: skip
    return out


def tree_digest(root: Path) -> dict[str, tuple[str, int, str]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith("home-restore-")]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            kind = "l" if p.is_symlink() else "d" if p.is_dir() else "f"
            content = ""
            if kind == "l":
                content = os.readlink(p)
            elif kind == "f":
                content = hashlib.sha256(p.read_bytes()).hexdigest()
            out[rel] = (kind, st.st_mode & 0o777 if kind != "l" else 0, content)
    return out


def check_restored(sim: Sim, job: RepoRestore, truth: dict[str, dict[str, Path]], home_truth: Path) -> None:
    qubes = Qubes(sim.system)
    try:
        plan = job.restore_plan
        assert plan is not None
        renamed = {a.name: a.target_name for a in plan.vms if a.restore}
        assert sorted(renamed) == sorted(VMS)
        for vm, vols in truth.items():
            got = sim.volume_files(renamed[vm])
            for vol, src in vols.items():
                assert_restored_like(src, got[vol])
        assert job.home_restored_to is not None
        restored_home = Path(str(job.home_restored_to))
        assert tree_digest(restored_home) == tree_digest(home_truth)
        shutil.rmtree(restored_home)
    finally:
        for vm in VMS:
            name = renamed.get(vm) if job.restore_plan else None
            if name and name != vm and name in qubes.vm_list():
                qubes.remove_vm(name)


@pytest.fixture
def repo_sim(tmp_path: Path) -> Sim:
    return new_sim(tmp_path / "sim")


def test_consecutive_snapshots_restore_exactly(repo_sim: Sim, tmp_path: Path) -> None:
    sim = repo_sim
    rng = random.Random(20)
    truths: list[tuple[dict[str, dict[str, Path]], Path]] = []
    results: list[RepoBackupResult] = []
    runs = 5
    for k in range(1, runs + 1):
        if k > 1:
            mutate(sim, rng)
        result = backup(sim)
        assert result.seq == k
        results.append(result)
        truths.append((keep_truth(sim, tmp_path / f"truth{k}"), tmp_path / f"truth{k}" / "home"))
        if k > 1:  # only blocks whose content changed went over (the new home file's too)
            changed = sum(changed_blocks(truths[-2][0][vm][vol], path) for vm in VMS
                          for vol, path in truths[-1][0][vm].items())  # fmt: skip
            new_files = set(tree_digest(truths[-1][1]).items()) - set(tree_digest(truths[-2][1]).items())
            home = sum(-(-(truths[-1][1] / rel).stat().st_size // BS) for rel, (kind, _m, _c) in new_files
                       if kind == "f")  # fmt: skip
            assert 0 < result.blocks <= changed + home, (result.blocks, changed, home)
        older = rng.randrange(1, k) if k > 1 else None
        for which in (None, older) if older else (None,):
            job = restore(sim, which, (*VMS, "dom0"))
            assert job.chosen is not None and job.chosen.root.seq == (which or k)
            check_restored(sim, job, *truths[(which or k) - 1])
    assert results[0].new_repository and not any(r.new_repository for r in results[1:])
    assert all(r.repo_id == results[0].repo_id for r in results)


def test_unchanged_run_stores_no_block(repo_sim: Sim) -> None:
    first = backup(repo_sim)
    assert first.blocks > 0
    again = backup(repo_sim)
    assert again.blocks == 0 and again.changed == []
    # Only the snapshot's root and (backup_timestamp changed) the qubes.xml subset are new.
    assert again.objects <= 2 and again.stored < 64 << 10, again
    assert again.seq == first.seq + 1


def test_a_changed_block_sends_that_block_and_its_map_part(repo_sim: Sim) -> None:
    sim = repo_sim
    backup(sim)
    path = sim.volume_files("work")["private"]
    new = path.with_name("new")
    copy_sparse(path, new)
    with open(new, "r+b") as f:
        f.seek(3 * BS + 100)
        f.write(b"\x01" * 10)
    os.rename(new, path)
    r = backup(sim)
    # one data block, its segment, work's file list, qubes.xml, the root
    assert r.blocks == 1 and r.changed == ["work"] and r.objects <= 5, r


def test_allocation_map_or_zero_scan_give_the_same_snapshot(repo_sim: Sim, tmp_path: Path) -> None:
    """Planned from the allocation map (no zero scan: zero blocks dropped as they are read) or from the exact
    regions of a zero scan, a volume is stored as the same blocks (the same file list), its zeros restored as
    holes; only the blocks read differ (the allocated zero blocks)."""
    sim = repo_sim
    path = sim.volume_files("work")["private"]
    new = path.with_name("new")
    copy_sparse(path, new)
    rng = random.Random(9)
    with open(new, "r+b") as f:
        os.pwrite(f.fileno(), bytes(6 * BS), 20 * BS)  # allocated, all zeros: a hole to the backup
        os.pwrite(f.fileno(), rng.randbytes(BS), 30 * BS)
        os.pwrite(f.fileno(), bytes(BS // 2), 30 * BS + BS // 4)  # a zero run inside a block with data
        os.pwrite(f.fileno(), rng.randbytes(100) + bytes(3 * BS), 31 * BS + 7)  # data, then zero blocks
    os.rename(new, path)
    scanned = backup(sim, ("work",), zeros=True)
    mapped = backup(sim, ("work",))
    assert mapped.changed == [] and mapped.blocks == 0 and mapped.objects <= 2, mapped
    assert mapped.volume_read_blocks >= scanned.volume_read_blocks + 6 + 2
    truth = tmp_path / "truth"
    truth.mkdir()
    os.link(path, truth / "private")
    job = restore(sim, None, ("work",))
    assert job.restore_plan is not None
    try:
        (restored,) = [a.target_name for a in job.restore_plan.vms if a.restore]
        got = sim.volume_files(restored)["private"]
        assert same_content(truth / "private", got)
        _size, regions = scan(got)
        allocated = {i for off, n in regions for i in range(off // BS, (off + n - 1) // BS + 1)}
        assert {30, 31} <= allocated and not allocated & {20, 21, 22, 23, 24, 25, 32, 33}
    finally:
        for name in job.restored:
            Qubes(sim.system).remove_vm(name)


def test_identical_blocks_stored_once(repo_sim: Sim) -> None:
    """A block that appears many times (in one volume and across VMs) is one object."""
    sim = repo_sim
    block = random.Random(3).randbytes(BS)
    for vm in ("work", "personal"):
        path = sim.volume_files(vm)["private"]
        new = path.with_name("new")
        copy_sparse(path, new)
        with open(new, "r+b") as f:
            for i in range(10):
                f.seek((100 + 7 * i) * BS)
                f.write(block)
        os.rename(new, path)
    r = backup(sim, ("work", "personal"))
    objects = sorted((sim.vm_root("backupvm") / REPO.lstrip("/") / "objects").rglob("*"))
    assert r.objects == len([p for p in objects if p.is_file()]) + 1  # + the root (in roots/)
    job = restore(sim, None, ("work", "personal"), verify=True)
    assert job.restore_plan is not None and job.restore_plan.data >= 20 * BS


def test_verify_only_and_older_snapshot_after_more_runs(repo_sim: Sim) -> None:
    sim = repo_sim
    backup(sim, ("work",))
    rng = random.Random(5)
    mutate(sim, rng)
    backup(sim, ("work",))
    for snap in (1, 2):
        job = restore(sim, snap, ("work",), verify=True)
        assert job.chosen is not None and job.chosen.root.seq == snap
    assert [s.seq for s in job.snapshots()] == [1, 2]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_backup_leaves_the_earlier_snapshots(repo_sim: Sim, sig: int) -> None:
    """qvm-backup killed while it sends objects: no new root, the earlier snapshot still restores, and the next
    backup completes (the agent clears what the killed one left in tmp/)."""
    sim = repo_sim
    backup(sim, ("work",))
    path = sim.volume_files("work")["private"]
    new = path.with_name("new")
    copy_sparse(path, new)
    with open(new, "r+b") as f:
        f.write(random.Random(9).randbytes(12 << 20))
    os.rename(new, path)
    base = sim.vm_root("backupvm") / REPO.lstrip("/")
    before = {p.name for p in (base / "objects").rglob("*") if p.is_file()}
    roots = sorted(p.name for p in (base / "roots").iterdir())
    proc = sim.popen("qvm-backup", "-y", "-q", "-p", "/pw", *KDF, "-d", "backupvm", "--repo", REPO,
                     "--block-size", "64K", "work", start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if {p.name for p in (base / "objects").rglob("*") if p.is_file()} - before:
            break  # objects of the new snapshot are arriving
        time.sleep(0.005)
    assert proc.poll() is None, "the backup ended before it could be interrupted"
    os.killpg(proc.pid, sig)
    proc.communicate(timeout=60)
    time.sleep(0.2)  # a SIGKILLed dom0's agent dies with it (bubblewrap --die-with-parent)
    assert sorted(p.name for p in (base / "roots").iterdir()) == roots
    assert restore(sim, 1, ("work",), verify=True).chosen is not None
    result = backup(sim, ("work",))
    assert result.seq == 2 and os.listdir(base / "tmp") == []
    restore(sim, 2, ("work",), verify=True)


def test_restore_asks_for_each_object_once(repo_sim: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    """Restoring one VM whose volume repeats a block asks for every object at most once (a recurring block is
    kept, not fetched again), and only for objects of that snapshot and VM."""
    sim = repo_sim
    block = random.Random(4).randbytes(BS)
    path = sim.volume_files("work")["private"]
    new = path.with_name("new")
    copy_sparse(path, new)
    with open(new, "r+b") as f:
        for i in range(12):
            f.seek((60 + 5 * i) * BS)
            f.write(block)
    os.rename(new, path)
    first = backup(sim, ("work", "vault"))
    asked: list[str] = []
    original = RepoSession.request_many

    def request_many(self: RepoSession, wanted: list[str]) -> None:
        asked.extend(wanted)
        original(self, wanted)

    monkeypatch.setattr(RepoSession, "request_many", request_many)
    job = restore(sim, None, ("work",))
    assert job.restored == ["work1"]
    assert len(asked) == len(set(asked)), [n for n, c in Counter(asked).items() if c > 1]
    assert asked[0].startswith("roots/0000000001-")
    chosen = job.chosen
    assert chosen is not None and chosen.root_id == first.root
    work_tree = chosen.trees["vm1" if chosen.root.archives[0].vm == "work" else "vm2"]
    segments = {sid for f in work_tree.files for _, sid in f.segments}
    assert segments <= set(asked)
    data = [n for n in asked if n not in segments and not n.startswith("roots/")]
    # the qubes.xml subset and the two file lists, then work's distinct data blocks (fewer than its blocks)
    assert len(data) - 3 < sum(-(-f.data // BS) for f in work_tree.files)
    Qubes(sim.system).remove_vm("work1")


@pytest.mark.parametrize("stream_blocks", [1, 40], ids=["a-stream-per-file", "streams-split-inside-an-archive"])
def test_restore_in_several_streams_is_exact(repo_sim: Sim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             stream_blocks: int) -> None:  # fmt: skip
    """The files of consecutive VM archives are asked for as one stream of blocks, cut at STREAM_BLOCKS: cut
    after every file, or inside an archive, the restore is the same, byte for byte with its holes."""
    sim = repo_sim
    backup(sim)
    truth = keep_truth(sim, tmp_path / "truth")
    monkeypatch.setattr(repository, "STREAM_BLOCKS", stream_blocks)
    streams: list[list[str]] = []  # the archive of each file, per stream
    original = RepoRestore._stream

    def counted(self: RepoRestore, files: list[tuple[Any, Any]], targets: dict[int, Any]) -> None:
        if files:
            streams.append([archive.member for archive, _tf in files])
        original(self, files, targets)

    monkeypatch.setattr(RepoRestore, "_stream", counted)
    job = restore(sim, None, (*VMS, "dom0"))
    check_restored(sim, job, truth, tmp_path / "truth" / "home")
    if stream_blocks == 1:
        assert all(len(files) == 1 for files in streams), streams
    else:  # an archive whose files went in two streams
        assert any(set(a) & set(b) for a, b in itertools.pairwise(streams)), streams
