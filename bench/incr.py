"""`make bench-incr`: repository snapshots (`qvm-backup --repo`) against today's full backup, restic and borg.

Issue 20's performance targets are ratios measured in one run on one simulated lvm_thin system (by default
64 GiB apparent, 20 GiB allocated, 13 backed-up volumes; the reference's workload,
../shared/reference/incremental.md section 3): a first snapshot, an unchanged re-run, a 1% change (scattered
4, 16 or 64 KiB writes of random bytes, 4 KiB aligned, at offsets uniform over each volume, as many as 1% of
its allocated bytes), a restore of the newest snapshot, prune, dom0's memory and its state on disk.  The same
data, the same re-run and the same change go through restic and borg, which re-read every image each run (as
they must for a Qubes volume: a new LV after every shutdown; restic ``--force``, borg
``--files-cache=disabled``).  Between the tools the change is undone byte for byte (holes punched again).

The measuring machinery (CPU of the whole process tree, the agent's CPU, peak RSS of dom0 and the agent, the
sim's qubesd CPU) is bench/run.py's.  "sent" is what dom0 sent to the backup VM: dom0's own count of the
objects' bytes (``--json`` ``stored_bytes``) plus the tar framing of each member (512-byte header, padding to
512, the 1 KiB end); it is cross-checked against the files the repository gained.  Results:
docs/performance/incr-results.json and a section of docs/PERFORMANCE.md.  ``--smoke`` runs a tiny dataset
(well under a minute) to keep the harness working; its figures mean nothing and nothing goes to docs/.
Nothing here is part of `make test`: timings are never asserted in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import run  # bench/run.py (this script's directory is on sys.path): systems, measuring, baselines
import zstandard
from qubes_backup_dom0.format.chunking import ZSTD_LEVEL
from qubes_backup_sim.launch import stop_qubesd
from run import (
    BIN,
    MIB,
    Bench,
    Case,
    allocated,
    borg_env,
    borg_init,
    ensure_tool,
    fresh_system,
    planned_data,
    restic_env,
    run_measured,
    tree_probe,
    wait_next_second,
    warm,
)

REPO_IN_VM = "/home/user/repo"
BLOCK = 256 << 10  # the repository's default block size (docs/REPOSITORY.md section 14)
SEG_BLOCKS = 4096
STATE = "dom0/var/lib/qubes-backup"
KIB = 1 << 10
DOCS = run.DOCS
RESULTS_JSON = DOCS / "performance" / "incr-results.json"
BEGIN, END = "<!-- incr-results:begin -->", "<!-- incr-results:end -->"
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
SEEK_DATA, SEEK_HOLE = 3, 4


# ------------------------------------------------------------------------------------------ the change

@dataclass
class Write:
    path: Path
    offset: int
    length: int
    old: bytes = b""
    holes: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) that were holes before


def _holes(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The hole ranges of [start, end) of an open file (SEEK_DATA / SEEK_HOLE)."""
    out, pos = [], start
    while pos < end:
        try:
            data = os.lseek(fd, pos, SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            data = end
        if data > pos:
            out.append((pos, min(data, end) - pos))
        if data >= end:
            break
        pos = os.lseek(fd, data, SEEK_HOLE)
    return out


def _punch(fd: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, ctypes.c_long(offset), ctypes.c_long(length)):
        raise OSError(ctypes.get_errno(), "fallocate(PUNCH_HOLE) failed: the change cannot be undone exactly")


class Change:
    """The reference's 1% scattered change, deterministic from ``seed``; ``apply()`` then ``undo()`` restores every
    byte and every hole, so each tool meets the same data before and after."""

    def __init__(self, volumes: list[Path], fraction: float = 0.01, seed: int = 7) -> None:
        rng = random.Random(seed)
        self.seed = seed
        self.writes: list[Write] = []
        for path in volumes:
            size, budget = path.stat().st_size, int(allocated(path) * fraction)
            while budget > 0 and size > 64 * KIB:
                length = rng.choice((4 * KIB, 16 * KIB, 64 * KIB))
                self.writes.append(Write(path, rng.randrange(0, size - 64 * KIB) & ~4095, length))
                budget -= length
        self.applied = False

    @property
    def bytes(self) -> int:
        return sum(w.length for w in self.writes)

    def apply(self) -> None:
        assert not self.applied
        rng = random.Random(f"{self.seed}:content")
        for path, writes in self._by_file():
            fd = os.open(path, os.O_RDWR)
            try:
                for w in writes:
                    w.holes = _holes(fd, w.offset, w.offset + w.length)
                    w.old = os.pread(fd, w.length, w.offset)
                    os.pwrite(fd, rng.randbytes(w.length), w.offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        self.applied = True

    def undo(self) -> None:
        assert self.applied
        for path, writes in self._by_file():
            fd = os.open(path, os.O_RDWR)
            try:
                for w in reversed(writes):  # overlapping writes: the first one's old bytes win
                    os.pwrite(fd, w.old, w.offset)
                    for off, n in w.holes:
                        _punch(fd, off, n)
                    w.old, w.holes = b"", []
                os.fsync(fd)
            finally:
                os.close(fd)
        self.applied = False

    def _by_file(self) -> list[tuple[Path, list[Write]]]:
        out: dict[Path, list[Write]] = {}
        for w in self.writes:
            out.setdefault(w.path, []).append(w)
        return list(out.items())

    def touched(self, block: int = BLOCK) -> dict[Path, set[int]]:
        out: dict[Path, set[int]] = {}
        for w in self.writes:
            out.setdefault(w.path, set()).update(range(w.offset // block, (w.offset + w.length - 1) // block + 1))
        return out

    def compressed_touched(self, block: int = BLOCK) -> tuple[int, int, int]:
        """(touched blocks holding data, their raw bytes, their size compressed as the repository compresses them:
        zstd at its level, never more than the raw block) of the changed files, read now (after ``apply``)."""
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        count = raw = packed = 0
        for path, blocks in self.touched(block).items():
            fd = os.open(path, os.O_RDONLY)
            try:
                for i in sorted(blocks):
                    data = os.pread(fd, block, i * block)
                    if not data or data.count(0) == len(data):
                        continue
                    count, raw, packed = count + 1, raw + len(data), packed + min(len(cctx.compress(data)), len(data))
            finally:
                os.close(fd)
        return count, raw, packed


def data_blocks(volumes: list[Path], block: int = BLOCK) -> int:
    """Blocks of the volumes that any data region touches (what a snapshot maps: its allocated blocks)."""
    from qubes_backup_dom0.format.sparse import scan

    total = 0
    for path in volumes:
        _size, regions = scan(path)
        seen: set[int] = set()
        for off, n in regions:
            seen.update(range(off // block, (off + n - 1) // block + 1))
        total += len(seen)
    return total


# ------------------------------------------------------------------------------------------ the bench

def files(root: Path) -> dict[str, int]:
    """Relative path -> size of every regular file under ``root``."""
    out: dict[str, int] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            with contextlib.suppress(OSError):
                out[p.relative_to(root).as_posix()] = p.lstat().st_size
    return out


def tar_bytes(sizes: list[int]) -> int:
    """A plain ustar stream of members of these sizes: a 512-byte header each, data padded to 512, 1 KiB end."""
    return sum(512 + -(-n // 512) * 512 for n in sizes) + 1024


@dataclass
class RepoRun:
    """What one ``qvm-backup --repo`` sent and stored."""

    key: str
    stored_bytes: int  # dom0's account (objects' bytes)
    objects: int
    data_blocks_sent: int
    new_files: int  # files the repository gained (objects and the root)
    new_bytes: int
    new_data_bytes: int  # of those: data blocks (type d)
    new_map_bytes: int  # of those: segments, file lists, the qubes.xml subset, the root
    sent: int  # tar stream dom0 sent: stored + framing
    read_blocks: int = 0  # blocks dom0 read (volumes, dom0's home and the VMs' config files)
    reused_blocks: int = 0  # blocks change tracking did not read (ids from the parent's verified map)
    volume_read_blocks: int = 0  # of read_blocks: those read from volumes
    lvm_calls: int = 0  # lvm commands this run ran (the sim's lvm.log)
    thin_calls: int = 0  # dmsetup / thin_dump / thin_delta calls (the sim's thintools.log)
    seconds: float = 0.0  # dom0's own count from the passphrase on (--json "seconds": KDF, run, promotion)

    @classmethod
    def measured(cls, key: str, doc: dict[str, object], repo: Path, before: dict[str, int]) -> RepoRun:
        after = files(repo)
        new = {k: v for k, v in after.items() if before.get(k) != v and not k.startswith("tmp/")}
        kinds = {k: _object_type(repo / k) for k in new}
        data = sum(v for k, v in new.items() if kinds[k] == "d")
        stored, objects = int(doc["stored_bytes"]), int(doc["objects"])  # type: ignore[call-overload]
        framing = tar_bytes(list(new.values())) - sum(new.values()) if len(new) == objects else 1024 + 1023 * objects
        return cls(key, stored, objects, int(doc["data_blocks"]), len(new), sum(new.values()), data,  # type: ignore[call-overload]
                   sum(new.values()) - data, stored + framing, int(doc.get("read_blocks", 0)),  # type: ignore[call-overload]
                   int(doc.get("reused_blocks", 0)), int(doc.get("volume_read_blocks", 0)),  # type: ignore[call-overload]
                   seconds=float(doc.get("seconds", 0.0)))  # type: ignore[arg-type]  # fmt: skip


def log_lines(path: Path) -> int:
    """Lines of one of the sim's call logs (lvm.log, thintools.log); 0 when absent."""
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def can_reflink(directory: Path) -> bool:
    """Whether files in ``directory`` can be cloned (FICLONE): the sim's thin snapshots then share extents, as a
    thin pool's share blocks, and the bench may write into volumes in place (a hard-linked snapshot would change
    with them)."""
    import fcntl

    a, b = directory / ".reflink-probe", directory / ".reflink-probe2"
    try:
        a.write_bytes(b"x" * 4096)
        with open(a, "rb") as src, open(b, "wb") as dst:
            fcntl.ioctl(dst.fileno(), 0x40049409, src.fileno())
        return True
    except OSError:
        return False
    finally:
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)


def _object_type(path: Path) -> str:
    """An object's type letter from its clear header ("qbr1 T ..."); "?" for anything else (the header files)."""
    with open(path, "rb") as f:
        head = f.read(6)
    return chr(head[5]) if head[:5] == b"qbr1 " and len(head) == 6 else "?"


class Incr(Bench):
    def __init__(self, work: Path, smoke: bool, log: Path) -> None:
        super().__init__(work, smoke, log)
        self.runs: dict[str, RepoRun] = {}
        self.facts: dict[str, object] = {}
        self.volumes: list[Path] = []
        self.change: Change | None = None
        self.kdf = ["--kdf-n", "1024", "--weak-kdf-ok"] if smoke else []  # the smoke: seconds, not the KDF's
        self.baseline_change = True  # restic's and borg's run after the change too (not needed by a target)
        self.load_before = os.getloadavg()[0]
        self.fraction: float | None = None  # the baselines ran on this fraction of the data (--baselines-subset)
        self.started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        self.series: list[dict[str, object]] = []  # the runs that only build snapshots for prune
        self.reflink = False  # the work directory clones files (see can_reflink)

    def add(self, case: Case) -> Case:
        """Record ``case`` and save everything measured so far (work/progress.json: a run cut short keeps it)."""
        super().add(case)
        self.facts["load_max"] = round(max(float(self.facts.get("load_max", 0.0)), os.getloadavg()[0]), 2)  # type: ignore[arg-type]
        progress = {"facts": self.facts, "cases": [asdict(c) for c in self.cases.values()],
                    "runs": [asdict(r) for r in self.runs.values()], "load_before": self.load_before,
                    "date": self.started}  # fmt: skip
        (self.work / "progress.json").write_text(json.dumps(progress, indent=2, default=str) + "\n")
        return case

    @property
    def repo(self) -> Path:
        return self.src / "vms/backupvm/home/user/repo"

    def prepare(self, data_mib: float, apparent_gib: float) -> None:
        self.generate(data_mib, apparent_gib)
        self.volumes = sorted(self.tree.rglob("*.img"))  # hard links to the LVs: the change reaches both
        self.change = Change(self.volumes)
        apparent = sum(p.stat().st_size for p in self.volumes)
        self.facts.update(volumes=len(self.volumes), apparent_bytes=apparent, data_bytes=self.data,
                          allocated_blocks=data_blocks(self.volumes), change_writes=len(self.change.writes),
                          change_bytes=self.change.bytes)  # fmt: skip

    # -------------------------------------------------------------------------------------- today's format

    def single_file(self) -> None:
        print("== today's full backup (single file)", flush=True)
        full = self.backup("v1_backup", "qvm-backup (full, today's format)", self.kdf, limit="zstd2")
        self.restore("v1_restore", "qvm-backup-restore (full, today's format)", full, [], self.data)
        full.unlink()

    def restore_pairs(self, pairs: int) -> None:
        """Issue 20's restore target alone (``--restore-pairs N``): today's full backup and a first snapshot of
        the same data, then N pairs of restores, today's and the snapshot's, interleaved so that the machine's
        drift between runs falls on both (on a shared VM the same work varies by 10-15% in CPU seconds)."""
        print("== restores, interleaved: today's full restore and the snapshot's", flush=True)
        full = self.backup("v1_backup", "qvm-backup (full, today's format)", self.kdf, limit="zstd2")
        self.repo_backup("repo_first", "qvm-backup --repo: first snapshot")
        data = planned_data(self.src)
        # the source's volumes are not needed any more: their space goes to the restores (the default dataset,
        # its backup, its repository and one restored system would not fit the image otherwise)
        stop_qubesd(self.src)
        shutil.rmtree(self.src / "dom0/dev", ignore_errors=True)
        shutil.rmtree(self.tree, ignore_errors=True)
        ratios = []
        for i in range(1, pairs + 1):
            drop_caches()
            today = self.restore(f"v1_restore_{i}", f"qvm-backup-restore (full, today's format), pair {i}", full, [],
                                 self.data)  # fmt: skip
            drop_caches()
            ours = self.repo_restore(f"repo_restore_{i}", f"qvm-backup-restore --repo: newest snapshot, pair {i}", data)
            ratios.append(today.wall / ours.wall)
            print(f"  pair {i}: the snapshot restore at {ratios[-1]:.2f}x today's speed (wall time)", flush=True)
        print(f"  ratios: {', '.join(f'{r:.2f}' for r in ratios)} (target: >= 1x)", flush=True)
        full.unlink()

    # -------------------------------------------------------------------------------------- repository

    def repo_backup(self, key: str, label: str, extra: tuple[str, ...] = (), record: bool = True) -> RepoRun:
        """One ``qvm-backup --repo`` run, measured; ``record``: a case of the table (else only its figures)."""
        wait_next_second()
        before = files(self.repo)
        out = self.work / f"{key}.json"
        argv = [str(BIN / "qvm-backup"), "-y", "-d", "backupvm", "-p", "/pw", *self.kdf, "--json", "--repo", REPO_IN_VM,
                *extra]  # fmt: skip
        case = Case(key, label, data=planned_data(self.src),
                    temp_note="the repository's tmp/ (objects being written)")  # fmt: skip
        dev = self.src / "dom0/dev"
        calls = log_lines(dev / "lvm.log"), log_lines(dev / "thintools.log")
        self.measure(case, argv, self.src, b"qubes.Backup", tree_probe(self.repo / "tmp"), stdout=out)
        doc = json.loads(out.read_text())
        got = RepoRun.measured(key, doc, self.repo, before)
        got.lvm_calls = log_lines(dev / "lvm.log") - calls[0]
        got.thin_calls = log_lines(dev / "thintools.log") - calls[1]
        case.output = got.sent
        self.runs[key] = got
        if record:
            self.add(case)
        else:
            self.series.append({"wall": round(case.wall, 3), "cpu": round(case.cpu, 3), "sent": got.sent,
                                "read_blocks": got.read_blocks})  # fmt: skip
        print(f"    sent {got.sent:,} bytes ({got.objects} objects, {got.data_blocks_sent} data blocks); read "
              f"{got.read_blocks:,} blocks, {got.reused_blocks:,} from the parent's map; {got.lvm_calls} lvm and "
              f"{got.thin_calls} thin-tool calls; the repository gained {got.new_files} files, {got.new_bytes:,} "
              f"bytes ({got.new_data_bytes:,} data)", flush=True)  # fmt: skip
        return got

    def repo_restore(self, key: str, label: str, data: int | None = None) -> Case:
        """The newest snapshot, restored into a fresh system (the repository hard-linked into its backup VM);
        ``data``: the source's planned data, when known already."""
        data = planned_data(self.src) if data is None else data
        dst = fresh_system(self.work / f"restored-{key}")
        target = dst / "vms/backupvm/home/user/repo"
        for rel in files(self.repo):
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(self.repo / rel, target / rel)
            warm(self.repo / rel)  # in the page cache, as the single-file restore's backup is
        argv = [str(BIN / "qvm-backup-restore"), "-y", "-d", "backupvm", "-p", "/pw", "--repo", REPO_IN_VM]
        lvs = dst / "dom0/dev"
        before = allocated(lvs)
        case = Case(key, label, data=data, temp_note="volumes being imported (-import LVs)")
        self.measure(case, argv, dst, b"qubes.Restore", lambda: run._glob_size(lvs / "qubes_dom0", "*-import"))
        case.output = max(allocated(lvs) - before, 0)
        stop_qubesd(dst)
        shutil.rmtree(dst)
        return self.add(case)

    def repository_runs(self, snapshots: int) -> None:
        """The repository runs.  Issue 20's: a first snapshot, an unchanged re-run without change tracking
        (``--rescan``: every block read and hashed), the 1% change, a restore.  Issue 21's (change tracking; the
        sim's snapshots share extents on the reflink filesystem these runs need): an unchanged tracked run, a 0.1%
        change and the 1% change (10x the writes).  Then more snapshots, each after a new 1% change, until the
        repository holds ``snapshots`` (30: issue 20's prune target), and prune."""
        print("== qvm-backup --repo", flush=True)
        assert self.change is not None and self.reflink
        self.facts["change_tracking"] = True
        self.facts["nonvolume_blocks"] = 0
        first = self.repo_backup("repo_first", "qvm-backup --repo: first snapshot")
        self.facts["nonvolume_blocks"] = max(first.read_blocks - int(self.facts["allocated_blocks"]), 0)  # type: ignore[call-overload]
        self.repo_backup("repo_rerun", "qvm-backup --repo --rescan: unchanged re-run (every block read)", ("--rescan",))
        self.repo_backup("repo_tracked", "qvm-backup --repo: unchanged re-run, change tracking")
        small = Change(self.volumes, fraction=0.001, seed=11)
        small.apply()
        self.facts.update(small_writes=len(small.writes), small_bytes=small.bytes,
                          small_touched=small.compressed_touched()[0])  # fmt: skip
        self.repo_backup("repo_small", "qvm-backup --repo: after a 0.1% change, change tracking")
        self.change.apply()
        count, raw, packed = self.change.compressed_touched()
        self.facts.update(touched_blocks=count, touched_raw=raw, touched_compressed=packed)
        self.repo_backup("repo_change", "qvm-backup --repo: after the 1% change, change tracking")
        self.facts["state_bytes"], self.facts["state_files"] = state_size(self.src)
        self.repo_restore("repo_restore", "qvm-backup-restore --repo: newest snapshot")
        for i in range(snapshots - len(list((self.repo / "roots").iterdir()))):
            free = shutil.disk_usage(self.work).free
            if free < 3 << 29:
                print(f"  series stopped after {i} snapshots: {free / (1 << 30):.1f} GiB free", flush=True)
                break
            Change(self.volumes, fraction=0.01, seed=100 + i).apply()
            self.repo_backup(f"repo_series_{i}", f"series {i}", record=False)
        self.facts["series"] = self.series
        self.facts["repo_bytes"] = allocated(self.repo)
        self.prune()

    def prune(self, repo: Path | None = None, keep_last: int = 7) -> None:
        """``qubes-backup-agent prune --keep-last 7`` on the repository (in the backup VM, no passphrase): of
        its 30 snapshots of this system (30 nights), the newest week kept, 23 deleted.  Prune lists every object
        and deletes the dead ones, so the time per object is reported too."""
        repo = repo or self.repo
        if importlib.util.find_spec("qubes_backup_agent.prune") is None:
            self.facts["prune"] = "not measured: prune not merged"
            print("  prune: not measured (qubes_backup_agent.prune is not in this tree)", flush=True)
            return
        snapshots = len(list((repo / "roots").iterdir()))
        objects = sum(len(os.listdir(d)) for d in (repo / "objects").iterdir())
        out = self.work / "prune.json"
        argv = [sys.executable, "-m", "qubes_backup_agent.cli", "prune", "--repo", str(repo),
                "--keep-last", str(keep_last), "--json"]  # fmt: skip
        case = Case("prune", f"qubes-backup-agent prune --keep-last {keep_last}: {snapshots} snapshots, "
                    f"{objects:,} objects", temp_note="none")  # fmt: skip
        run_measured(case, argv, self.log, dict(os.environ, QUBES_AGENT_ROOT="/"), stdout=out)
        doc = json.loads(out.read_text())
        self.facts["prune"] = {k: doc.get(k) for k in ("objects_deleted", "bytes_freed", "objects_kept", "bytes_kept")}
        self.facts["prune"]["snapshots"], self.facts["prune"]["objects"] = snapshots, objects  # type: ignore[index]
        self.facts["prune"]["per_object_ms"] = round(case.wall / objects * 1000, 4)  # type: ignore[index]
        case.output = int(doc.get("bytes_freed") or 0)
        self.add(case)

    # -------------------------------------------------------------------------------------- baselines

    def restic(self) -> None:
        print("== restic", flush=True)
        exe = ensure_tool("restic", "restic")
        if exe is None:
            for key in ("restic_first", "restic_rerun", "restic_change"):
                self.add(Case(key, key, skipped="restic is not installed and apt-get could not install it"))
            return
        repo, tmp = self.work / "restic-repo", self.work / "restic-tmp"
        tmp.mkdir(exist_ok=True)
        env = restic_env(self.work, repo, tmp)
        subprocess.run([exe, "init"], env=env, check=True, stdout=subprocess.DEVNULL)
        version = " ".join(subprocess.run([exe, "version"], capture_output=True, text=True).stdout.split()[:2])
        argv = [exe, "backup", "--quiet", "--force", str(self.tree)]
        self._baseline(("restic_first", "restic_rerun", "restic_change"), "restic backup --force", argv, env, None,
                       repo, tree_probe(tmp), version)  # fmt: skip
        for p in (repo, tmp, self.work / "restic-cache"):
            shutil.rmtree(p, ignore_errors=True)

    def borg(self) -> None:
        print("== borg", flush=True)
        exe = ensure_tool("borg", "borgbackup")
        if exe is None:
            for key in ("borg_first", "borg_rerun", "borg_change"):
                self.add(Case(key, key, skipped="borg is not installed and apt-get could not install it"))
            return
        repo = self.work / "borg-repo"
        env = borg_env(self.work)
        borg_init(exe, repo, env)
        version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
        self._baseline(("borg_first", "borg_rerun", "borg_change"), "borg create --files-cache=disabled",
                       [exe, "create", "--files-cache=disabled", f"{repo}::{{now:%Y%m%dT%H%M%S.%f}}", "."], env,
                       self.tree, repo, None, version)  # fmt: skip
        for p in (repo, self.work / "borg-base"):
            shutil.rmtree(p, ignore_errors=True)

    def _baseline(self, keys: tuple[str, str, str], what: str, argv: list[str], env: dict[str, str],
                  cwd: Path | None, repo: Path, probe: object, note: str) -> None:  # fmt: skip
        assert self.change is not None
        for key, when in zip(keys, ("first run", "unchanged re-run", "after the 1% change"), strict=True):
            if key.endswith("_change"):
                if not self.baseline_change:
                    break
                self.change.apply()
            before = allocated(repo)
            case = Case(key, f"{what}: {when}", data=self.data, note=note,
                        temp_note="restic's TMPDIR" if probe else "none")  # fmt: skip
            run_measured(case, argv, self.log, env, temp_probe=probe, cwd=cwd)  # type: ignore[arg-type]
            case.output = max(allocated(repo) - before, 0)
            if self.fraction is not None:  # measured on part of the volumes: wall, CPU and output scaled up
                case.scaled_from = self.fraction
                case.wall, case.cpu, case.output = (case.wall / self.fraction, case.cpu / self.fraction,
                                                    int(case.output / self.fraction))  # fmt: skip
            self.add(case)
        if self.change.applied:
            self.change.undo()


def state_size(system: Path) -> tuple[int, list[str]]:
    """Bytes of every file under the simulated dom0's /var/lib/qubes-backup, and their names."""
    found = files(system / STATE)
    return sum(found.values()), sorted(found)


# ------------------------------------------------------------------------------------------ verdicts

@dataclass
class Target:
    name: str
    wanted: str
    measured: str
    ok: bool | None  # None: not measured


def evaluate(b: Incr) -> list[Target]:
    c, r, f = b.cases, b.runs, b.facts
    out: list[Target] = []

    def got(key: str) -> Case | None:
        case = c.get(key)
        return case if case is not None and not case.skipped and case.wall > 0 else None

    def add(name: str, wanted: str, value: float | None, ok: bool | None, shown: str) -> None:
        measured = value is not None
        out.append(Target(name, wanted, shown if measured else "not measured", ok if measured else None))

    def per_cpu(a: Case | None, b: Case | None) -> str:
        """The same ratio by CPU seconds per byte (less sensitive to other work on a shared machine)."""
        if a is None or b is None or not a.cpu or not b.cpu or not a.data or not b.data:
            return ""
        return f"; by CPU-s: {(b.cpu / b.data) / (a.cpu / a.data):.2f}x"

    first, v1 = got("repo_first"), got("v1_backup")
    x = first.mbps / v1.mbps if first and v1 and v1.mbps else None
    add("first run vs today's full backup (MB/s)", ">= 0.8x", x, x is not None and x >= 0.8,
        f"{x or 0:.2f}x{per_cpu(first, v1)}")
    rerun = r.get("repo_rerun")
    sent = rerun.sent if rerun else None
    add("unchanged re-run: bytes sent", "<= 64 KiB", sent, sent is not None and sent <= 64 * KIB,
        f"{(sent or 0) / KIB:.1f} KiB")
    ours = got("repo_rerun")
    for tool in ("restic", "borg"):
        theirs = got(f"{tool}_rerun")
        x = theirs.wall / ours.wall if ours and theirs else None
        add(f"unchanged re-run vs {tool}'s re-run (wall)", ">= 3x faster", x, x is not None and x >= 3.0,
            f"{x or 0:.2f}x faster{per_cpu(ours, theirs)}")
    ch = r.get("repo_change")
    packed = f.get("touched_compressed")
    if ch and isinstance(packed, int):
        x = ch.sent / (packed + ch.new_map_bytes)
        add("1% change: sent vs compressed touched blocks + changed map parts", "<= 1.1x", x, x <= 1.1,
            f"{x:.3f}x ({ch.sent / MIB:.1f} MiB vs {packed / MIB:.1f} + {ch.new_map_bytes / MIB:.2f} MiB)")
    else:
        add("1% change: sent vs compressed touched blocks + changed map parts", "<= 1.1x", None, None, "")
    rr, v1r = got("repo_restore"), got("v1_restore")
    x = rr.mbps / v1r.mbps if rr and v1r and v1r.mbps else None
    add("restore newest snapshot vs today's full restore (MB/s)", ">= 1x", x, x is not None and x >= 1.0,
        f"{x or 0:.2f}x{per_cpu(rr, v1r)}")
    prune, pf = got("prune"), f.get("prune")
    if prune is not None and isinstance(pf, dict):
        n = int(pf["snapshots"])
        add(f"prune of {n} snapshots of this system" + ("" if n >= 30 else " (not 30)"), "<= 10 s (30 snapshots)",
            prune.wall, prune.wall <= 10 if n >= 30 else None, f"{prune.wall:.2f} s: {pf['objects']:,} objects, "
            f"{pf['objects_deleted']:,} deleted ({pf['per_object_ms']} ms per object)")  # fmt: skip
    else:
        add("prune of 30 snapshots", "<= 10 s", None, None, "")
        out[-1].measured = str(pf or "not measured")
    out += tracking_targets(b)
    peaks = [k.dom0_rss for key, k in c.items() if key.startswith("repo_") and not k.skipped]
    peak = max(peaks) if peaks else None
    add("dom0 peak RSS (repository runs)", "<= 300 MiB", peak, peak is not None and peak <= 300 * MIB,
        f"{(peak or 0) / MIB:.0f} MiB")
    state, blocks, vols = f.get("state_bytes"), f.get("allocated_blocks"), f.get("volumes")
    if isinstance(state, int) and isinstance(blocks, int) and isinstance(vols, int):
        limit = 40 * blocks + 4 * KIB * vols
        add("dom0 state on disk", "<= 40 B/allocated block + 4 KiB/volume", state, state <= limit,
            f"{state:,} bytes (limit {limit:,}: {blocks:,} blocks, {vols} volumes)")
    return out


def tracking_targets(b: Incr) -> list[Target]:
    """Issue 21's: the unchanged tracked run, the 1% change's reads, 10x the writes, the tool calls."""
    c, r, f = b.cases, b.runs, b.facts
    if not f.get("change_tracking"):
        return [Target("change tracking (issue 21)", "measured", "not measured: the work directory cannot clone "
                       "files (run as root with mkfs.xfs for the XFS image)", None)]  # fmt: skip
    out: list[Target] = []
    un, unr = c.get("repo_tracked"), r.get("repo_tracked")
    if un is not None and unr is not None:
        out.append(Target("tracked unchanged re-run: wall after the passphrase (dom0's --json seconds: the KDF, "
                          "reading, sending, committing, promoting the bases)", "<= 3 s",
                          f"{unr.seconds:.2f} s; the whole process {un.wall:.2f} s (with Python's start-up and the "
                          f"planning before the passphrase; {unr.lvm_calls} lvm + {unr.thin_calls} thin-tool calls "
                          "in all)",
                          unr.seconds <= 3.0))  # fmt: skip
        out.append(Target("tracked unchanged re-run: volume data read", "none",
                          f"{unr.volume_read_blocks} blocks ({unr.read_blocks} read in all: dom0's home, VM files)",
                          unr.volume_read_blocks == 0))  # fmt: skip
        out.append(Target("tracked unchanged re-run: bytes sent", "<= 64 KiB", f"{unr.sent / KIB:.1f} KiB",
                          unr.sent <= 64 * KIB))  # fmt: skip
    ch, touched = r.get("repo_change"), f.get("touched_blocks")
    if ch is not None and isinstance(touched, int) and touched:
        x = ch.volume_read_blocks / touched
        out.append(Target("1% change: volume blocks read vs candidate (touched) blocks", "<= 1.1x",
                          f"{x:.3f}x ({ch.volume_read_blocks:,} vs {touched:,})", x <= 1.1))  # fmt: skip
    out.append(Target("1% change: wall vs wyng-backup's", "<= wyng's", "not measured: wyng-backup needs a "
                      "real LVM thin pool (it runs lvm, thin_delta and dmsetup on one)", None))  # fmt: skip
    sm = r.get("repo_small")
    if ch is not None and sm is not None and sm.volume_read_blocks and sm.sent:
        writes = int(f.get("change_writes", 0)) / max(int(f.get("small_writes", 1)), 1)  # type: ignore[call-overload]
        rd, sd = ch.volume_read_blocks / sm.volume_read_blocks, ch.sent / sm.sent
        out.append(Target(f"{writes:.1f}x the writes (1% vs 0.1% change): bytes read and sent", "<= 10x",
                          f"read {rd:.2f}x, sent {sd:.2f}x", rd <= writes and sd <= writes))  # fmt: skip
    calls = [f"{k.removeprefix('repo_')} {v.lvm_calls}+{v.thin_calls}" for k, v in r.items()
             if not k.startswith("repo_series")]  # fmt: skip
    out.append(Target("lvm + thin-tool calls per run (counted)", "reported", ", ".join(calls), None))
    return out


# ------------------------------------------------------------------------------------------ output

def table(b: Incr, targets: list[Target], machine: dict[str, object]) -> str:
    f = b.facts
    head = (f"Measured {machine['date']} on {machine['cpus']} CPUs ({machine['cpu_model']}), {machine['mem_gib']} GiB "
            f"RAM, kernel {machine['kernel']}, Python {machine['python']}; load average (1 min) "
            f"{machine['loadavg_before']} before / {machine['loadavg_after']} after, up to {f.get('load_max', '?')} "
            "when a case ended (the machine was shared with "
            f"other work: {machine['load_note']}).  Dataset: simulated lvm_thin system, "
            f"{int(f['apparent_bytes']) / (1 << 30):.1f} GiB apparent, {int(f['data_bytes']) / (1 << 30):.2f} GiB "  # type: ignore[call-overload]
            f"allocated in {f['volumes']} volumes, half compressible; change: {f['change_writes']:,} writes of 4/16/64 "
            f"KiB, {int(f['change_bytes']) / MIB:.0f} MiB ({f.get('touched_blocks', '?')} touched 256 KiB blocks).")  # type: ignore[call-overload]
    lines = [head, "",
             "| case | wall s | MB/s (data) | CPU s | dom0 CPU s | agent CPU s | dom0 peak RSS MiB "
             "| agent peak RSS MiB | output MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for c in b.cases.values():
        label = c.label.replace("|", "\\|")
        if c.skipped:
            lines.append(f"| {label} | skipped: {c.skipped} |" + " |" * 7)
            continue
        ours = c.key.startswith(("repo_", "v1_"))
        agent = f"{c.agent_cpu:.1f}" if ours else "-"
        if c.scaled_from:
            label += f" (measured on {c.scaled_from:.0%} of the data, scaled)"
        lines.append(f"| {label} | {c.wall:.2f} | {c.mbps:,.0f} | {c.cpu:.1f} | {c.dom0_cpu:.1f} | {agent} "
                     f"| {run.fmt_mib(c.dom0_rss)} | {run.fmt_mib(c.agent_rss) if ours else '-'} "
                     f"| {c.output / MIB:,.2f} |")  # fmt: skip
    lines += ["", "| target | wanted | measured | verdict |", "|---|---|---|---|"]
    for t in targets:
        verdict = "n/a" if t.ok is None else ("PASS" if t.ok else "FAIL")
        lines.append(f"| {t.name} | {t.wanted} | {t.measured} | {verdict} |")
    return "\n".join(lines)


def machine_info(load_before: float) -> dict[str, object]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return {"cpus": os.cpu_count(), "cpu_model": model, "mem_gib": round(mem, 1), "kernel": platform.release(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "loadavg_before": round(load_before, 2)}  # fmt: skip


def write_docs(payload: dict[str, object], text: str) -> None:
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(payload, indent=2) + "\n")
    block = f"{BEGIN}\n{text}\n{END}"
    doc = run.PERF_MD.read_text()
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END) :]
    else:
        doc += f"\n## Repository snapshots (`make bench-incr`, issue 20)\n\n{block}\n"
    run.PERF_MD.write_text(doc)


def finish(bench: Incr, machine: dict[str, object], smoke: bool, no_docs: bool) -> None:
    """Evaluate, print, and write the results (docs/, or the work directory for the smoke)."""
    machine["loadavg_after"] = round(os.getloadavg()[0], 2)
    loaded = max(float(machine["loadavg_before"]), os.getloadavg()[0]) > 0.5  # type: ignore[arg-type]
    machine["load_note"] = "figures are wall times on a loaded machine" if loaded else "little other load"
    targets = evaluate(bench)
    text = table(bench, targets, machine)
    payload = {"machine": machine, "facts": bench.facts, "smoke": smoke,
               "cases": [dict(asdict(c), mbps=round(c.mbps, 1)) for c in bench.cases.values()],
               "runs": [asdict(r) for r in bench.runs.values()], "targets": [asdict(t) for t in targets]}  # fmt: skip
    print("\n" + text)
    if no_docs:
        (bench.work / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    else:
        write_docs(payload, text)
        print(f"\nwritten: {RESULTS_JSON.relative_to(run.REPO)}, {run.PERF_MD.relative_to(run.REPO)}")


def subset(tree: Path, fraction: float, dst: Path) -> tuple[float, float, list[str]]:
    """Hard-link the VM directories of ``tree`` whose share of both the data and the apparent size is closest to
    ``fraction`` into ``dst`` (with dom0's home); returns (data share, apparent share, the directories)."""
    dirs = sorted(p for p in tree.glob("*/*") if p.is_dir() and p.parent.name != "dom0-home")
    sizes = [(sum(allocated(f) for f in d.glob("*.img")), sum(f.stat().st_size for f in d.glob("*.img"))) for d in dirs]
    tot_d, tot_a = sum(d for d, _ in sizes), sum(a for _, a in sizes)
    best: tuple[float, int] = (9.0, 0)
    for mask in range(1, 1 << len(dirs)):
        d = sum(sizes[i][0] for i in range(len(dirs)) if mask >> i & 1) / tot_d
        a = sum(sizes[i][1] for i in range(len(dirs)) if mask >> i & 1) / tot_a
        best = min(best, (abs(d - fraction) + abs(a - fraction), mask))
    chosen = [dirs[i] for i in range(len(dirs)) if best[1] >> i & 1]
    for d in chosen:
        (dst / d.relative_to(tree)).mkdir(parents=True)
        for f in d.glob("*.img"):
            os.link(f, dst / f.relative_to(tree))
    shutil.copytree(tree / "dom0-home", dst / "dom0-home", symlinks=True)
    share_d = sum(sizes[dirs.index(d)][0] for d in chosen) / tot_d
    share_a = sum(sizes[dirs.index(d)][1] for d in chosen) / tot_a
    return share_d, share_a, [d.relative_to(tree).as_posix() for d in chosen]


def baselines_subset(args: argparse.Namespace) -> int:
    """restic's and borg's first run and re-run on part of a cut-short run's volumes (its baseline tree, left in
    its work directory), scaled to all of the data; saved into its progress.json for ``--report``."""
    work = args.work.absolute()
    saved = json.loads((work / "progress.json").read_text())
    bench = Incr(work, False, work / "bench.log")
    bench.facts = saved["facts"]
    for c in saved["cases"]:
        bench.cases[c["key"]] = Case(**c)
    for r in saved["runs"]:
        bench.runs[r["key"]] = RepoRun(**r)
    bench.load_before, bench.started = saved.get("load_before", bench.load_before), saved.get("date", bench.started)
    bench.data = int(bench.facts["data_bytes"])  # type: ignore[call-overload]
    part = work / "subset-tree"
    shutil.rmtree(part, ignore_errors=True)
    share_d, share_a, chosen = subset(work / "baseline-tree", args.baselines_subset, part)
    bench.tree, bench.fraction, bench.baseline_change = part, share_d, False
    bench.change = Change([])
    bench.facts["baselines_subset"] = {"data_share": round(share_d, 4), "apparent_share": round(share_a, 4),
                                       "dirs": chosen}  # fmt: skip
    print(f"== baselines on {share_d:.1%} of the data ({share_a:.1%} of the apparent size): {', '.join(chosen)}")
    bench.restic()
    bench.borg()
    shutil.rmtree(part, ignore_errors=True)
    return 0


def report_only(args: argparse.Namespace) -> int:
    """The figures of a run cut short (its progress.json), optionally with prune measured on a hard-linked copy
    of its repository made while it ran."""
    saved = json.loads(args.report.read_text())
    bench = Incr(args.report.parent, False, args.report.parent / "bench.log")
    bench.facts = saved["facts"]
    for c in saved["cases"]:
        bench.cases[c["key"]] = Case(**c)
    for r in saved["runs"]:
        bench.runs[r["key"]] = RepoRun(**r)
    if args.prune_repo:
        bench.prune(args.prune_repo.absolute())
    machine = machine_info(saved.get("load_before", os.getloadavg()[0]))
    machine["date"] = saved.get("date", machine["date"])
    finish(bench, machine, False, args.no_docs)
    return 0


PARTS = ("single", "ours", "restic", "borg")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny dataset, well under a minute; nothing written to docs/")
    ap.add_argument("--data-mib", type=float, default=20900.0,
                    help="allocated data asked of simgen (MiB; it makes ~1.5%% less: 20 GiB and more by default)")
    ap.add_argument("--apparent-gib", type=float, default=67.0,
                    help="apparent size asked of simgen (GiB; it makes ~4%% less: 64 GiB and more by default)")
    ap.add_argument("--work", type=Path, default=run.REPO / "bench-out-incr", help="work directory (recreated)")
    ap.add_argument("--only", default="", help="comma list of parts: " + ",".join(PARTS))
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/PERFORMANCE.md and docs/performance/")
    ap.add_argument("--no-baseline-change", action="store_true",
                    help="skip restic's and borg's run after the change (no target needs it; saves their longest runs)")
    ap.add_argument("--report", type=Path, metavar="PROGRESS",
                    help="only evaluate and write the figures a run saved in PROGRESS (its progress.json)")
    ap.add_argument("--prune-repo", type=Path, metavar="DIR",
                    help="with --report: first measure prune on this copy of the run's repository")
    ap.add_argument("--baselines-fraction", type=float, metavar="F",
                    help="restic and borg on about F of the volumes, scaled to all of the data (saves time)")
    ap.add_argument("--restore-pairs", type=int, default=0, metavar="N",
                    help="only the restore target: N interleaved pairs of today's full restore and the snapshot "
                    "restore of the same data (nothing written to docs/)")  # fmt: skip
    ap.add_argument("--snapshots", type=int, default=30, help="snapshots in the repository prune is measured on")
    ap.add_argument("--no-xfs", action="store_true",
                    help="do not run on a loop-mounted XFS image (as root with mkfs.xfs, the default: the sim's "
                    "thin snapshots are then reflink clones, which change tracking's runs need)")  # fmt: skip
    ap.add_argument("--baselines-subset", type=float, metavar="F",
                    help="only restic's and borg's first run and re-run, on about F of the volumes of the run left "
                    "in --work (cut short after its own cases), scaled to all of the data")  # fmt: skip
    args = ap.parse_args(argv)
    if args.report:
        return report_only(args)
    if args.baselines_subset:
        return baselines_subset(args)
    if args.restore_pairs:
        args.no_docs = True
    if args.smoke:
        args.data_mib, args.apparent_gib, args.no_docs = 24.0, 0.25, True
        args.snapshots = min(args.snapshots, 7)
    parts = set(args.only.split(",")) if args.only else set(PARTS)
    work = args.work.absolute()
    unmount(work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    xfs = None if args.no_xfs else mount_xfs(work)
    try:
        return _run(args, parts, work, xfs)
    finally:
        if xfs is not None:
            keep = work.with_name(work.name + "-log")
            shutil.rmtree(keep, ignore_errors=True)
            keep.mkdir()
            for name in ("bench.log", "progress.json", "results.json"):
                if (work / name).exists():
                    shutil.copy(work / name, keep / name)
            unmount(work)
            xfs.unlink(missing_ok=True)
            print(f"(log and progress kept in {keep})")


def drop_caches() -> None:
    """Written data out and the page cache emptied (root only; else nothing): each restore of a pair starts from
    the same state, its input then read once into the cache by the restore case itself."""
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def mount_xfs(work: Path) -> Path | None:
    """A sparse XFS image (reflink on) of all the free disk but 2 GiB, mounted on ``work``; None where that cannot
    be done (not root, no mkfs.xfs, no loop device): the bench then runs on ``work`` as it is.  Mounted without
    ``discard`` (XFS's default, and a backup VM's usual): deleted files are reused inside the image, which never
    grows beyond its size, and an unlink does not wait for a hole punched in the backing file.  The loop device
    does direct I/O on the image (4 KiB sectors): its data is cached once, in XFS's page cache, as a disk's is,
    not a second time as the backing file's pages (which made 20 GiB of data not fit in 24 GiB of RAM)."""
    image = work.with_name(work.name + ".xfs.img")
    if os.geteuid() != 0 or shutil.which("mkfs.xfs") is None:
        return None
    try:
        image.unlink(missing_ok=True)
        with open(image, "wb") as f:
            f.truncate(max(shutil.disk_usage(work).free - (2 << 30), 1 << 30))
        subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", "-s", "size=4096", str(image)], check=True)
        dev = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", "--sector-size", "4096", str(image)],
                             check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
        try:
            subprocess.run(["mount", dev, str(work)], check=True)
        except subprocess.CalledProcessError:
            subprocess.run(["losetup", "-d", dev], check=False)
            raise
        # no copy-on-write preallocation beyond what is written (XFS reserves 128 KiB per CoW by default, which
        # 8,000 scattered 4 KiB writes per change turn into GBs held until its background clean-up): inherited
        subprocess.run(["xfs_io", "-c", "cowextsize 4096", str(work)], check=False)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"(no XFS image: {e}; running on the work directory's own filesystem)", flush=True)
        image.unlink(missing_ok=True)
        return None
    return image


def unmount(work: Path) -> None:
    """Unmount ``work`` and detach its loop device (attached by mount_xfs, which mount does not auto-clear)."""
    if os.path.ismount(work):
        dev = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(work)], capture_output=True, text=True).stdout
        subprocess.run(["umount", str(work)], check=False)
        if dev.strip().startswith("/dev/loop"):
            subprocess.run(["losetup", "-d", dev.strip()], check=False)


def _run(args: argparse.Namespace, parts: set[str], work: Path, xfs: Path | None) -> int:
    load_before = os.getloadavg()[0]
    bench = Incr(work, args.smoke, work / "bench.log")
    bench.reflink = can_reflink(work)
    bench.facts["filesystem"] = ("XFS image (loop with direct I/O, reflink)" if xfs else "the work directory's own") + (
        ", reflink" if bench.reflink else ", no reflink: change tracking's runs skipped")  # fmt: skip
    bench.baseline_change = not args.no_baseline_change
    print(f"== dataset: {args.apparent_gib:g} GiB apparent, {args.data_mib:g} MiB data (work dir {work}); "
          f"load average {load_before:.2f}", flush=True)  # fmt: skip
    t0 = time.monotonic()
    try:
        bench.prepare(args.data_mib, args.apparent_gib)
        print(f"  generated in {time.monotonic() - t0:.1f} s: {bench.data / MIB:.0f} MiB of data in "
              f"{len(bench.volumes)} volumes; the change: {bench.facts['change_writes']} writes", flush=True)
        if args.restore_pairs:
            bench.restore_pairs(args.restore_pairs)
            return 0
        if "single" in parts:
            bench.single_file()
        if args.baselines_fraction and ("restic" in parts or "borg" in parts):
            part = work / "subset-tree"
            share_d, share_a, chosen = subset(bench.tree, args.baselines_fraction, part)
            bench.tree, bench.fraction = part, share_d
            bench.facts["baselines_subset"] = {"data_share": round(share_d, 4), "apparent_share": round(share_a, 4),
                                               "dirs": chosen}  # fmt: skip
            print(f"== baselines on {share_d:.1%} of the data ({share_a:.1%} of the apparent size): "
                  f"{', '.join(chosen)}")
        if "restic" in parts:
            bench.restic()
        if "borg" in parts:
            bench.borg()
        if "ours" in parts and not bench.reflink:
            # without reflink the sim's LV snapshots are hard links: the change written in place would reach the
            # kept bases too, and dom0's --rescan would rightly report blocks its tracking missed
            print("== qvm-backup --repo: skipped: the repository runs need a reflink filesystem (run as root with "
                  "mkfs.xfs, without --no-xfs)", flush=True)  # fmt: skip
        elif "ours" in parts:  # last: its series of snapshots changes the volumes for good
            bench.repository_runs(args.snapshots)
    finally:
        stop_qubesd(bench.src)
    machine = machine_info(load_before)
    machine["date"] = f"{bench.started} to {time.strftime('%H:%M UTC', time.gmtime())}"
    finish(bench, machine, args.smoke, args.no_docs)
    for big in (bench.src, work / "baseline-tree", work / "subset-tree"):  # the log and results stay
        shutil.rmtree(big, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
