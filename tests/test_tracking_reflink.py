"""Change tracking on file-reflink (qubes/fiemap.py, qubes/reflinkbases.py, docs/CHANGE-TRACKING.md section 6),
on a loop-mounted XFS with reflink (needs root and mkfs.xfs; skipped otherwise): FIEMAP compared per block
(eight 4 KiB writes into a single-extent 256 MiB file give eight blocks, not the file), extents that move between
the two listings give no answer, and a tracked repository backup reads only the touched blocks, agrees with
--rescan and restores byte-exact."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Sim, new_sim, run_repo_restore
from qubes_backup_dom0.qubes import fiemap, reflinkbases
from qubes_backup_dom0.restore.plan import RestoreOptions
from test_tracking import BS, PASS, REPO, backup

FICLONE = 0x40049409
MKFS = shutil.which("mkfs.xfs")


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or MKFS is None:
        pytest.skip("needs root and mkfs.xfs for a loop-mounted reflink filesystem")
    image, mnt = tmp_path / "xfs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(700 << 20)
    subprocess.run([MKFS, "-q", "-m", "reflink=1", str(image)], check=True, capture_output=True)
    if subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a loop filesystem here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _clone(src: Path, dst: Path) -> None:
    with open(src, "rb") as s, open(dst, "wb") as d:
        fcntl.ioctl(d.fileno(), FICLONE, s.fileno())


def test_per_block_not_per_extent(xfs: Path) -> None:
    a, b = xfs / "a.img", xfs / "b.img"
    with open(a, "wb") as f:
        f.write(os.urandom(256 << 20))  # one write: one or two extents
    _clone(a, b)
    with open(b, "r+b") as f:
        for k in range(8):
            f.seek(k * (32 << 20) + 5 * 4096)
            f.write(os.urandom(4096))
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        changed = fiemap.changed(fa, fb, 256 << 20, 256 << 10)
        assert changed == [(k * (32 << 20), 256 << 10) for k in range(8)]
        assert fiemap.changed(fa, fa, 256 << 20, 256 << 10) == []
        # extents that move between the two listings of one file: no answer
        calls = {"n": 0}
        real = fiemap.extents

        def moving(fd: int, size: int) -> list[fiemap.Extent] | None:
            calls["n"] += 1
            got = real(fd, size)
            if got and calls["n"] == 3:  # the base's second listing
                got = [(lo, ph + 4096, n) for lo, ph, n in got]
            return got

        fiemap.extents = moving  # type: ignore[assignment]
        try:
            assert fiemap.changed(fa, fb, 256 << 20, 256 << 10) is None
        finally:
            fiemap.extents = real  # type: ignore[assignment]
    finally:
        os.close(fa)
        os.close(fb)


def test_unwritten_extents_compare_by_place_and_state(xfs: Path) -> None:
    """fallocate'd ranges are unwritten extents (they read as zeros): a listing with them is an answer, not a full
    read; the same place in the same state is the same; a clone (XFS gives it holes where its source has
    unwritten extents) may differ inside that range only, and a write into the copy is found."""
    a, b = xfs / "a.img", xfs / "b.img"
    size, bs = 64 << 20, 256 << 10
    with open(a, "wb") as f:
        f.truncate(size)
        f.write(os.urandom(1 << 20))
        os.posix_fallocate(f.fileno(), 8 << 20, 32 << 20)  # unwritten: 8 MiB to 40 MiB
    _clone(a, b)
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        ext = fiemap.extents(fa, size)
        assert ext is not None and any(ph & fiemap.UNWRITTEN_BIT for _lo, ph, _n in ext)
        assert fiemap.changed(fa, fa, size, bs) == []
        with open(b, "r+b") as f:
            f.seek(0)
            f.write(os.urandom(4096))
            f.seek((20 << 20) + 4096)
            f.write(os.urandom(4096))
        got = fiemap.changed(fa, fb, size, bs)
        assert got is not None and got[0] == (0, bs)
        blocks = {i for off, n in got for i in range(off // bs, (off + n) // bs)}
        assert (20 << 20) // bs in blocks and all(i == 0 or (8 << 20) // bs <= i < (40 << 20) // bs for i in blocks)
    finally:
        os.close(fa)
        os.close(fb)


def _image(sim: Sim) -> Path:
    (path,) = [p for p in sim.volume_files("work").values() if p.name == "private.img"]
    return path


def _write(path: Path, offsets: list[int]) -> None:
    new = path.with_name(path.name + ".new")
    _clone(path, new)
    with open(new, "r+b") as f:
        for off in offsets:
            f.seek(off)
            f.write(os.urandom(4096))
    os.replace(new, path)


def test_reflink_backup_reads_only_touched_blocks(xfs: Path, tmp_path: Path) -> None:
    sim = new_sim(xfs / "sim", pool="file-reflink")
    img = _image(sim)
    _write(img, [2 * BS, 30 * BS + 5])
    first, t = backup(sim)
    assert len(t.full_reads()) == 1
    pool_dir = img.parents[2]
    assert [p.name for p in (reflinkbases.bases_dir(pool_dir) / first.repo_id).iterdir()] != []
    unchanged, t = backup(sim)
    assert t.full_reads() == [] and unchanged.changed == []
    small = unchanged.read_blocks
    size = img.stat().st_size
    touched = sorted({(size // 7 * k) // BS for k in range(1, 6)})
    _write(img, [i * BS + 100 for i in touched])
    third, t = backup(sim)
    assert t.full_reads() == [] and third.read_blocks == small + len(touched)
    again, t = backup(sim, rescan=True)
    assert again.changed == [] and t.full_reads() == ["volume 'private' of work: --rescan"]
    opts = RestoreOptions(vms=("work",), rename_conflicting=True)
    run_repo_restore(sim.system, REPO, "backupvm", PASS, opts)
    restored = [p for p in sim.volume_files("work1").values() if p.name == "private.img"]
    assert restored and restored[0].read_bytes() == img.read_bytes()
    assert not list(reflinkbases.bases_dir(pool_dir).glob("next-*"))
    released = reflinkbases.cleanup(pool_dir, lambda pid: False, keep_all=False)  # --release-bases
    assert [Path(p).parent.name for p in released] == [first.repo_id]
    assert not reflinkbases.bases_dir(pool_dir).exists()  # no empty directory left in the pool's directory


def test_random_reflink_runs_tracked_equals_rescan(xfs: Path, tmp_path: Path) -> None:
    """file-reflink on a loop XFS, random changes between runs (writes, a discard, growth, shrink, revert, base
    deleted, VM re-created, nothing), each committed as Qubes' file-reflink does (a reflink copy written and
    renamed over the image): after each tracked run a --rescan of the same state changes no archive (the tracked
    run's file lists were right), and the last snapshot restores byte-exact.  50 runs, 200 with QB_LONG=1."""
    import ctypes
    import random

    from qubes_backup_dom0.qubes.qubesxml import Collection
    from qubes_backup_sim import launch
    from qubes_backup_sim.store import write_atomic

    runs = 200 if os.environ.get("QB_LONG") == "1" else 50
    rng = random.Random(2121)
    sim = new_sim(xfs / "sim", pool="file-reflink")
    img = _image(sim)
    _write(img, [rng.randrange(0, 60) * BS for _ in range(5)])
    first, _t = backup(sim)
    pool_dir = img.parents[2]
    kept = xfs / "kept.img"
    _clone(img, kept)
    ops = ["write", "shrink", "revert", "discard", "grow", "base deleted", "re-created VM", "nothing"]
    for step in range(runs):
        op = ops[step % len(ops)] if step < len(ops) else rng.choice(ops)
        size = img.stat().st_size
        if op == "write":
            _write(img, [rng.randrange(0, size - 4096) & ~4095 for _ in range(rng.randrange(1, 9))])
        elif op in ("discard", "grow", "shrink"):
            new = img.with_name(img.name + ".new")
            _clone(img, new)
            with open(new, "r+b") as f:
                if op == "discard":
                    at = rng.randrange(0, size // BS) * BS
                    libc = ctypes.CDLL(None, use_errno=True)  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                    assert libc.fallocate(f.fileno(), 3, ctypes.c_long(at), ctypes.c_long(BS)) == 0
                else:
                    f.truncate(size + BS * rng.randrange(1, 4) if op == "grow" else size - BS)
            os.replace(new, img)
        elif op == "revert":
            os.replace(kept, img)
            _clone(img, kept)
        elif op == "base deleted":
            shutil.rmtree(reflinkbases.bases_dir(pool_dir) / first.repo_id, ignore_errors=True)
        elif op == "re-created VM":
            launch.stop_qubesd(sim.dir)
            coll = Collection.load(sim.qubes_xml)
            dom = coll.get("work")
            assert dom is not None
            dom.set_property("uuid", f"3f1d2c4e-0000-4000-8000-{step:012d}")
            write_atomic(coll, sim.qubes_xml)
        tracked_run, _t = backup(sim)
        rescanned, _t = backup(sim, rescan=True)
        assert rescanned.changed == [] and rescanned.seq == tracked_run.seq + 1, (step, op)
        if step % 3 == 2:
            kept.unlink()
            _clone(img, kept)
    opts = RestoreOptions(vms=("work",), rename_conflicting=True)
    run_repo_restore(sim.system, REPO, "backupvm", PASS, opts)
    restored = [p for p in sim.volume_files("work1").values() if p.name == "private.img"]
    assert restored and restored[0].read_bytes() == img.read_bytes()
