"""`make bench`: qvm-backup / qvm-backup-restore against the stock pipeline, restic, borg and Qubes' own.

Why this exists: issue #6 sets speed targets as *ratios measured in the same run on the same data*, so a
faster or slower machine does not change the verdict.  Everything runs against a simulated Qubes system
(docs/SIMULATION.md) through the real console scripts and the real agent process, exactly as a user would
run them; baselines back up the same Qubes root.

Measured per case: wall time, MB/s of allocated data (bytes that are not holes), CPU seconds of the
whole process tree (RUSAGE_CHILDREN deltas: every process is reaped by its parent, so grandchildren
count), peak RSS of dom0 (the qvm-backup / qvm-backup-restore process, VmHWM) and of the agent (the
qubes.Backup / qubes.Restore python process), and peak temporary disk (what "temporary" means differs per
tool and is stated in the table).  Results go to docs/performance/results.json, a table between markers in
docs/PERFORMANCE.md and a chart docs/performance/throughput.svg.

`--smoke` runs a tiny dataset (seconds) only to keep the harness working; its figures mean nothing and it
writes into the work directory, not into docs/.  Nothing here is part of `make test`: timings are never
asserted in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "dom0"))
sys.path.insert(0, str(REPO / "protocol"))

from qubes_backup_dom0.qubesxml import Collection  # noqa: E402
from qubes_backup_sim import simgen  # noqa: E402
from qubes_backup_sim.store import write_atomic  # noqa: E402

BIN = Path(sys.executable).parent
PASSPHRASE = "bench passphrase: correct horse battery staple"
POLL = 0.05
MIB = 1 << 20
DOCS = REPO / "docs"
RESULTS_JSON = DOCS / "performance" / "results.json"
CHART_SVG = DOCS / "performance" / "throughput.svg"
PERF_MD = DOCS / "PERFORMANCE.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
QUBES_CHUNK = 100 * MIB
SMALL_VM = "vault"


# ------------------------------------------------------------------------------------------ measuring

@dataclass
class Case:
    """One measured run.  ``data`` is the allocated (non-hole) input it processed, in bytes."""

    key: str
    label: str
    wall: float = 0.0
    data: int = 0
    cpu: float = 0.0
    dom0_rss: int = 0
    agent_rss: int = 0
    temp_disk: int = 0
    temp_note: str = ""
    output: int = 0
    scaled_from: float | None = None  # measured on this fraction of the data, wall/cpu scaled to all of it
    skipped: str = ""
    note: str = ""

    @property
    def mbps(self) -> float:
        return self.data / self.wall / 1e6 if self.wall > 0 else 0.0


def _read_proc_tree() -> dict[int, int]:
    """pid -> ppid for every process (racy by nature: processes come and go; errors are skipped)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2 :].split()
        if len(rest) > 1:
            parents[int(entry.name)] = int(rest[1])
    return parents


def _descendants(root: int, parents: dict[int, int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _status_kib(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    got: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in fields:
                    got[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return got


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def allocated(path: Path) -> int:
    """Bytes on disk (st_blocks) of a file or a whole tree; missing paths count 0."""
    try:
        st = path.lstat()
    except OSError:
        return 0
    if not path.is_dir() or path.is_symlink():
        return st.st_blocks * 512
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


class Sampler(threading.Thread):
    """Polls the process tree under ``root`` every POLL seconds: VmHWM per process, summed VmRSS, temp disk.

    Polling (not cgroups) keeps it working unprivileged and inside containers; VmHWM is a high-water mark,
    so a process living longer than one poll interval is never under-reported.
    """

    def __init__(self, root: int, agent_marker: bytes | None, temp_probe: Callable[[], int] | None) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.agent_marker = agent_marker
        self.temp_probe = temp_probe
        self.stop = threading.Event()
        self.dom0_hwm = 0
        self.agent_hwm = 0
        self.tree_rss = 0
        self.temp = 0
        self._agents: dict[int, bool] = {}

    def sample(self) -> None:
        pids = _descendants(self.root, _read_proc_tree())
        rss_sum = 0
        for pid in pids:
            st = _status_kib(pid, ("VmHWM", "VmRSS"))
            rss_sum += st.get("VmRSS", 0)
            if pid == self.root:
                self.dom0_hwm = max(self.dom0_hwm, st.get("VmHWM", 0))
                continue
            if self.agent_marker is not None:
                if pid not in self._agents:
                    self._agents[pid] = self.agent_marker in _cmdline(pid)
                if self._agents[pid]:
                    self.agent_hwm = max(self.agent_hwm, st.get("VmHWM", 0))
        self.tree_rss = max(self.tree_rss, rss_sum)
        if self.temp_probe is not None:
            self.temp = max(self.temp, self.temp_probe())

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(POLL)


def run_measured(
    case: Case,
    argv: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    agent_marker: bytes | None = None,
    temp_probe: Callable[[], int] | None = None,
    cwd: Path | None = None,
) -> Case:
    """Run ``argv`` to completion and fill ``case`` with wall, CPU, RSS and temp-disk figures.

    Without an agent (the baselines all run in "dom0") dom0_rss is the peak of the summed RSS of the tree.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        sampler = Sampler(proc.pid, agent_marker, temp_probe)
        sampler.start()
        rc = proc.wait()
        sampler.stop.set()
        sampler.join()
    case.wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    case.cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if agent_marker is not None:
        case.dom0_rss, case.agent_rss = sampler.dom0_hwm, sampler.agent_hwm
    else:
        case.dom0_rss = max(sampler.tree_rss, sampler.dom0_hwm)
    case.temp_disk = sampler.temp
    if rc != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{case.label}: {argv[0]} exited with {rc}:\n{tail}")
    return case


# ------------------------------------------------------------------------------------------ systems

def data_bytes(root: Path) -> int:
    """Allocated bytes of every regular file under ``root`` (the figure MB/s is computed against)."""
    return allocated(root)


def fresh_system(src: Path, dst: Path, keep: tuple[str, ...] = ()) -> Path:
    """A freshly installed second system: dom0 (empty home) and backupvm only, as scripts/demo.py builds it.

    ``keep`` registers more of the source's VMs (without their files): a single VM is restored into a system
    that already has its template, as on a real system.
    """
    if dst.exists():
        shutil.rmtree(dst)
    fresh = Collection.load(src / "dom0/var/lib/qubes/qubes.xml")
    (dst / "dom0/var/lib/qubes").mkdir(parents=True)
    (dst / "dom0/home/user").mkdir(parents=True)
    (dst / "dom0/pw").write_text(PASSPHRASE + "\n")
    for dom in list(fresh.domains):
        if dom.name not in ("dom0", "backupvm", *keep):
            dom.element.getparent().remove(dom.element)
    write_atomic(fresh, dst / "dom0/var/lib/qubes/qubes.xml")
    (dst / "vms/backupvm/home/user/backups").mkdir(parents=True)
    return dst


def backups_in(system: Path) -> Path:
    return system / "vms/backupvm/home/user/backups"


def partial_probe(directory: Path) -> Callable[[], int]:
    """Size of the agent's partial file (``.NAME.partial-*``): the only temporary file of our backup."""

    def probe() -> int:
        try:
            return sum(allocated(p) for p in directory.glob(".qubes-backup-*.partial-*"))
        except OSError:
            return 0

    return probe


def staging_probe(qroot: Path) -> Callable[[], int]:
    """Size of dom0's restore staging area (``.qubes-backup-restore-*``)."""

    def probe() -> int:
        try:
            return sum(allocated(p) for p in qroot.glob(".qubes-backup-restore-*"))
        except OSError:
            return 0

    return probe


def tree_probe(path: Path) -> Callable[[], int]:
    return lambda: allocated(path)


def take_backup(system: Path, work: Path) -> Path:
    """The one finished backup in the backup VM of ``system``, moved aside so names never collide."""
    found = sorted(backups_in(system).glob("qubes-backup-*"))
    if len(found) != 1:
        raise RuntimeError(f"expected one backup in {backups_in(system)}, found {found}")
    dest = work / found[0].name
    n = 0
    while dest.exists():
        n += 1
        dest = work / f"{found[0].name}.{n}"
    shutil.move(found[0], dest)  # a copy when the backup VM's directory is a tmpfs
    return dest


def wait_next_second() -> None:
    """Backup names have one-second resolution; never produce two in the same second."""
    time.sleep(1.05 - (time.time() % 1.0))


# ------------------------------------------------------------------------------------------ our tool

class Bench:
    def __init__(self, work: Path, smoke: bool, log: Path) -> None:
        self.work = work
        self.smoke = smoke
        self.log = log
        self.src = work / "system"
        self.qroot = self.src / "dom0/var/lib/qubes"
        self.cases: dict[str, Case] = {}
        self.data = 0

    def env(self, system: Path) -> dict[str, str]:
        return dict(os.environ, QUBES_SIM=str(system))

    def add(self, case: Case) -> Case:
        self.cases[case.key] = case
        extra = f" (scaled from {case.scaled_from:.0%})" if case.scaled_from else ""
        if case.skipped:
            print(f"  {case.label}: skipped: {case.skipped}", flush=True)
        else:
            print(
                f"  {case.label}: {case.wall:.2f} s, {case.mbps:.0f} MB/s, cpu {case.cpu:.1f} s, "
                f"rss {case.dom0_rss / MIB:.0f}/{case.agent_rss / MIB:.0f} MiB, temp {case.temp_disk / MIB:.0f} MiB"
                f"{extra}",
                flush=True,
            )
        return case

    def generate(self, data_mib: float, apparent_gib: float) -> None:
        if self.src.exists():
            shutil.rmtree(self.src)
        simgen.generate(self.src, "bench", data_mib=data_mib, apparent_gib=apparent_gib, compressible=0.5,
                        pool="file")
        (self.src / "dom0/pw").write_text(PASSPHRASE + "\n")
        self.data = data_bytes(self.qroot)

    def backup(self, key: str, label: str, extra: list[str], vms: list[str] = (), data: int | None = None) -> Path:  # type: ignore[assignment]
        """qvm-backup into the simulated backupvm; returns the finished backup (moved out of the VM)."""
        wait_next_second()
        argv = [str(BIN / "qvm-backup"), "-y", "-d", "backupvm", "-p", "/pw", *extra, "/home/user/backups", *vms]
        case = Case(key, label, data=self.data if data is None else data,
                    temp_note="partial file in the backup VM (becomes the backup)")  # fmt: skip
        run_measured(case, argv, self.log, self.env(self.src), b"qubes.Backup", partial_probe(backups_in(self.src)))
        backup = take_backup(self.src, self.work)
        case.output = allocated(backup)
        self.add(case)
        return backup

    def template_of(self, vm: str) -> str | None:
        """The template ``vm`` uses (explicit or the default) in the source system."""
        collection = Collection.load(self.src / "dom0/var/lib/qubes/qubes.xml")
        dom = collection.get(vm)
        return collection.effective_template(dom) if dom is not None else None

    def restore(self, key: str, label: str, backup: Path, vms: list[str], data: int) -> Case:
        """qvm-backup-restore from ``backup`` (hard-linked into a fresh second system's backupvm)."""
        keep = tuple(self.template_of(vm) for vm in vms)
        dst = fresh_system(self.src, self.work / f"restored-{key}", tuple(t for t in keep if t))
        os.link(backup, backups_in(dst) / backup.name.split(".")[0])
        argv = [str(BIN / "qvm-backup-restore"), "-y", "-d", "backupvm", "-p", "/pw",
                f"/home/user/backups/{backup.name.split('.')[0]}", *vms]  # fmt: skip
        case = Case(key, label, data=data, temp_note="dom0 staging dir (renamed into place at the end)")
        run_measured(case, argv, self.log, self.env(dst), b"qubes.Restore", staging_probe(dst / "dom0/var/lib/qubes"))
        case.output = allocated(dst / "dom0/var/lib/qubes")
        shutil.rmtree(dst)
        return self.add(case)

    def backup_tmpfs(self) -> None:
        """--no-compress with the backup VM's directory on tmpfs: the pipeline's own limit, without the disk.

        Diagnostic only (needs root for the mount; skipped otherwise): it separates "the disk is slow" from
        "the pipeline is slow" when the --no-compress target fails.
        """
        target = backups_in(self.src)
        key, label = "backup_nocomp_tmpfs", "qvm-backup --no-compress, backup VM storage on tmpfs"
        if os.geteuid() != 0 or not shutil.which("mount"):
            self.add(Case(key, label, skipped="needs root to mount a tmpfs"))
            return
        size = f"size={max(64 * MIB, 2 * self.data)}"
        if subprocess.run(["mount", "-t", "tmpfs", "-o", size, "bench-tmpfs", str(target)]).returncode != 0:
            self.add(Case(key, label, skipped="mounting a tmpfs failed"))
            return
        try:
            self.backup(key, label, ["--no-compress"]).unlink()
        finally:
            subprocess.run(["umount", str(target)], check=False)

    def vm_data(self, vm: str) -> int:
        coll = Collection.load(self.qroot / "qubes.xml")
        dom = coll.get(vm)
        assert dom is not None
        return allocated(self.qroot / coll.vm_dir(dom))

    # -------------------------------------------------------------------------------------- ours

    def ours(self) -> None:
        print("== qvm-backup / qvm-backup-restore", flush=True)
        full = self.backup("backup", "qvm-backup (zstd)", [])
        nocomp = self.backup("backup_nocomp", "qvm-backup --no-compress", ["--no-compress"])
        nocomp.unlink()
        self.backup_tmpfs()
        self.restore("restore", "qvm-backup-restore (full)", full, [], self.data)
        small = self.vm_data(SMALL_VM)
        self.restore("restore_one_big", f"restore {SMALL_VM} from the full backup", full, [SMALL_VM], small)
        full.unlink()
        only = self.backup("backup_one", f"qvm-backup {SMALL_VM} only", [], [SMALL_VM], small)
        self.restore("restore_one_only", f"restore {SMALL_VM} from a backup of it alone", only, [SMALL_VM], small)
        only.unlink()

    # -------------------------------------------------------------------------------------- baselines

    def stock(self) -> None:
        """(a) tar -cS | zstd -1 -T0 | openssl enc -aes-256-ctr | tee (HMAC-SHA256) > file, then fsync.

        The fsync (``sync FILE``) matches what our agent does before renaming the backup into place.
        """
        print("== baselines", flush=True)
        out = self.work / "stock"
        out.mkdir(exist_ok=True)
        key, iv, mac = os.urandom(32).hex(), os.urandom(16).hex(), os.urandom(32).hex()
        fifo = out / "mac.fifo"
        script = (
            f"set -e -o pipefail; rm -f '{fifo}'; mkfifo '{fifo}'; "
            f"openssl dgst -sha256 -hmac '{mac}' < '{fifo}' > '{out}/backup.hmac' & "
            f"tar -cS -C '{self.qroot}' . | zstd -1 -T0 -q | openssl enc -aes-256-ctr -K {key} -iv {iv} "
            f"| tee '{fifo}' > '{out}/backup.enc'; wait; sync '{out}/backup.enc'"
        )
        case = Case("stock", "stock: tar -S | zstd -1 -T0 | openssl | HMAC", data=self.data, temp_note="none")
        run_measured(case, ["bash", "-c", script], self.log)
        case.output = allocated(out / "backup.enc")
        shutil.rmtree(out)
        self.add(case)

    def restic(self) -> None:
        case = Case("restic", "restic backup (repo v2, encrypted)", data=self.data,
                    temp_note="restic's TMPDIR (pack files before they go to the repo)")  # fmt: skip
        exe = ensure_tool("restic", "restic")
        if exe is None:
            case.skipped = "restic is not installed and apt-get could not install it"
            self.add(case)
            return
        repo, tmp = self.work / "restic-repo", self.work / "restic-tmp"
        for p in (repo, tmp):
            shutil.rmtree(p, ignore_errors=True)
        tmp.mkdir()
        env = dict(os.environ, RESTIC_PASSWORD=PASSPHRASE, RESTIC_REPOSITORY=str(repo), TMPDIR=str(tmp),
                   RESTIC_CACHE_DIR=str(self.work / "restic-cache"))  # fmt: skip
        subprocess.run([exe, "init"], env=env, check=True, stdout=subprocess.DEVNULL)
        run_measured(case, [exe, "backup", "--quiet", str(self.qroot)], self.log, env, temp_probe=tree_probe(tmp))
        case.output = allocated(repo)
        version = subprocess.run([exe, "version"], capture_output=True, text=True).stdout.split()
        case.note = " ".join(version[:2])
        for p in (repo, tmp, self.work / "restic-cache"):
            shutil.rmtree(p, ignore_errors=True)
        self.add(case)

    def borg(self) -> None:
        case = Case("borg", "borg create (repokey-blake2, lz4)", data=self.data, temp_note="none (writes segments)")
        exe = ensure_tool("borg", "borgbackup")
        if exe is None:
            case.skipped = "borg is not installed and apt-get could not install it"
            self.add(case)
            return
        repo = self.work / "borg-repo"
        shutil.rmtree(repo, ignore_errors=True)
        env = dict(os.environ, BORG_PASSPHRASE=PASSPHRASE, BORG_BASE_DIR=str(self.work / "borg-base"),
                   BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes")  # fmt: skip
        subprocess.run([exe, "init", "-e", "repokey-blake2", str(repo)], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        run_measured(case, [exe, "create", f"{repo}::bench", "."], self.log, env, cwd=self.qroot)
        case.output = allocated(repo)
        case.note = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
        for p in (repo, self.work / "borg-base"):
            shutil.rmtree(p, ignore_errors=True)
        self.add(case)

    def qubes_v4(self, subset_mib: float) -> None:
        """(c) Qubes' v4 pipeline re-enacted on a subset of VMs, time scaled to all the data.

        tar -S | gzip | 100 MiB chunks written to a temp dir (as Qubes stages them in dom0), each chunk then
        ``scrypt enc`` with scrypt's default parameters (as Qubes does: the tool tunes N to ~5 s of work,
        bounded by 1/8 of RAM) and an HMAC, one chunk at a time (Qubes encrypts one chunk while tar
        produces the next: split's --filter serialises them, which is close to the same effective rate).
        """
        case = Case("qubes", "Qubes v4 re-enactment (tar -S | gzip | scrypt per 100 MiB)",
                    temp_note="chunk being encrypted (Qubes stages chunks on dom0's disk)")  # fmt: skip
        exe = ensure_tool("scrypt", "scrypt")
        if exe is None:
            case.skipped = "scrypt is not installed and apt-get could not install it"
            self.add(case)
            return
        coll = Collection.load(self.qroot / "qubes.xml")
        dirs: list[tuple[str, int]] = []
        for dom in coll.domains:
            if dom.klass == "AdminVM" or not (self.qroot / coll.vm_dir(dom)).is_dir():
                continue
            dirs.append((coll.vm_dir(dom), allocated(self.qroot / coll.vm_dir(dom))))
        dirs.sort(key=lambda d: d[1])
        chosen: list[str] = []
        subset = 0
        for d, size in dirs:
            if subset >= subset_mib * MIB:
                break
            chosen.append(d)
            subset += size
        out = self.work / "qubes-v4"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        pw = out / "pw"
        pw.write_text(PASSPHRASE + "\n")
        mac = os.urandom(16).hex()
        filt = (
            f"cat > \"$FILE\" && scrypt enc --passphrase file:'{pw}' \"$FILE\" \"$FILE.enc\" && rm \"$FILE\" "
            f"&& openssl dgst -sha256 -hmac '{mac}' \"$FILE.enc\" > \"$FILE.enc.hmac\" && sync \"$FILE.enc\""
        )
        script = (
            f"set -e -o pipefail; cd '{out}'; tar -cS -C '{self.qroot}' {' '.join(repr(c) for c in chosen)} "
            f"| gzip -6 | split -b {QUBES_CHUNK} -a 4 --filter '{filt}' - chunk."
        )
        case.data = self.data
        run_measured(case, ["bash", "-c", script], self.log, temp_probe=lambda: _glob_size(out, "chunk.*"))
        fraction = subset / self.data
        case.scaled_from = fraction
        case.wall /= fraction
        case.cpu /= fraction
        case.output = int(_glob_size(out, "chunk.*.enc") / fraction)
        case.note = f"measured on {len(chosen)} VM dirs, {subset / MIB:.0f} MiB allocated; scrypt enc defaults"
        shutil.rmtree(out)
        self.add(case)

    # -------------------------------------------------------------------------------------- sparse

    def sparse(self, data_mib: int, apparent_gib: int) -> None:
        """A 64 GiB-apparent private.img holding 1 GiB of scattered data vs a 1 GiB dense one (--no-compress).

        Each case is its own small Qubes root in which only ``work`` is backed up, so the difference is the
        cost of the holes: SEEK_DATA/SEEK_HOLE scanning, sparse tar maps and extent bookkeeping.
        """
        print("== sparse vs dense", flush=True)
        pool = os.urandom(64 * MIB)
        for key, label, apparent in (
            ("sparse_dense", f"{data_mib} MiB dense image", data_mib * MIB),
            ("sparse_sparse", f"{apparent_gib} GiB-apparent image holding {data_mib} MiB", apparent_gib << 30),
        ):
            root = self.work / f"case-{key}"
            shutil.rmtree(root, ignore_errors=True)
            simgen.generate(root, "small", pool="file")
            (root / "dom0/pw").write_text(PASSPHRASE + "\n")
            img = root / "dom0/var/lib/qubes/appvms/work/private.img"
            img.unlink()
            extents = max(1, data_mib * MIB // (256 << 10)) if apparent > data_mib * MIB else 1
            ext_size = data_mib * MIB // extents
            stride = apparent // extents
            fd = os.open(img, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, apparent)
                for i in range(extents):
                    off = i * stride
                    written = 0
                    while written < ext_size:
                        n = min(ext_size - written, 8 * MIB)
                        start = (i * 7919 * 4096 + written) % (len(pool) - n)
                        os.pwrite(fd, pool[start : start + n], off + written)
                        written += n
            finally:
                os.close(fd)
            saved = self.src
            self.src = root
            try:
                b = self.backup(key, label, ["--no-compress"], ["work"], self.vm_data_at(root, "work"))
                b.unlink()
            finally:
                self.src = saved
            shutil.rmtree(root)
        del pool

    @staticmethod
    def vm_data_at(root: Path, vm: str) -> int:
        return allocated(root / "dom0/var/lib/qubes/appvms" / vm)


def _glob_size(directory: Path, pattern: str) -> int:
    try:
        return sum(allocated(p) for p in directory.glob(pattern))
    except OSError:
        return 0


_apt_updated = False


def ensure_tool(exe: str, package: str) -> str | None:
    """The tool's path, installing its Debian package once if missing (best effort: None if impossible)."""
    global _apt_updated
    found = shutil.which(exe)
    if found or not shutil.which("apt-get") or os.geteuid() != 0:
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if not _apt_updated:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        _apt_updated = True
    subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env, capture_output=True)
    return shutil.which(exe)


# ------------------------------------------------------------------------------------------ targets

@dataclass
class Target:
    name: str
    wanted: str
    measured: str
    ok: bool | None  # None: could not be measured


@dataclass
class Report:
    machine: dict[str, object]
    dataset: dict[str, object]
    cases: list[Case] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)


def ratio(cases: dict[str, Case], a: str, b: str) -> float | None:
    """Throughput of ``a`` over throughput of ``b`` (same data), None if either is missing."""
    ca, cb = cases.get(a), cases.get(b)
    if ca is None or cb is None or ca.skipped or cb.skipped or ca.mbps == 0 or cb.mbps == 0:
        return None
    return ca.mbps / cb.mbps


def evaluate(cases: dict[str, Case]) -> list[Target]:
    targets: list[Target] = []

    def at_least(name: str, value: float | None, want: float, unit: str = "x") -> None:
        shown = "n/a" if value is None else f"{value:.2f}{unit}"
        targets.append(Target(name, f">= {want:g}{unit}", shown, None if value is None else value >= want))

    def at_most(name: str, value: float | None, want: float, unit: str = "x") -> None:
        shown = "n/a" if value is None else f"{value:.2f}{unit}"
        targets.append(Target(name, f"<= {want:g}{unit}", shown, None if value is None else value <= want))

    at_least("backup vs stock pipeline (a)", ratio(cases, "backup", "stock"), 2.0)
    at_least("backup vs restic", ratio(cases, "backup", "restic"), 3.0)
    at_least("backup vs Qubes v4 re-enactment", ratio(cases, "backup", "qubes"), 30.0)
    nc = cases.get("backup_nocomp")
    at_least("--no-compress backup throughput", nc.mbps / 1000 if nc else None, 1.0, " GB/s")
    nt = cases.get("backup_nocomp_tmpfs")
    at_least("(diagnostic) --no-compress, backup VM on tmpfs", nt.mbps / 1000 if nt and not nt.skipped else None,
             1.0, " GB/s")  # fmt: skip
    at_least("full restore vs backup speed", ratio(cases, "restore", "backup"), 0.8)
    big, only = cases.get("restore_one_big"), cases.get("restore_one_only")
    at_most(f"restore {SMALL_VM} from full backup vs from its own backup",
            big.wall / only.wall if big and only and only.wall else None, 1.5)  # fmt: skip
    ours = [c for k, c in cases.items() if k.startswith(("backup", "restore", "sparse")) and not c.skipped]
    peak = max((c.dom0_rss for c in ours), default=None)
    at_most("dom0 peak RSS (any of our runs)", peak / MIB if peak else None, 300, " MiB")
    sp, dn = cases.get("sparse_sparse"), cases.get("sparse_dense")
    at_most("64 GiB sparse image vs 1 GiB dense file (time)",
            sp.wall / dn.wall if sp and dn and dn.wall else None, 1.2)  # fmt: skip
    return targets


# ------------------------------------------------------------------------------------------ output

def fmt_mib(n: int) -> str:
    return f"{n / MIB:,.0f}" if n else "-"


def table(report: Report) -> str:
    cases = {c.key: c for c in report.cases}
    base = cases.get("backup")
    lines = [
        "| case | wall s | MB/s (allocated) | CPU s | dom0 peak RSS MiB | agent peak RSS MiB | peak temp disk MiB "
        "| output MiB | speed vs our backup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report.cases:
        label = c.label.replace("|", "\\|")  # pipeline labels contain '|': escape it for markdown tables
        if c.skipped:
            lines.append(f"| {label} | skipped: {c.skipped} | | | | | | | |")
            continue
        rel = f"{c.mbps / base.mbps:.2f}x" if base and base.mbps and c.data == base.data else ""
        scaled = " (scaled)" if c.scaled_from else ""
        lines.append(
            f"| {label} | {c.wall:.2f}{scaled} | {c.mbps:,.0f} | {c.cpu:.1f} | {fmt_mib(c.dom0_rss)} "
            f"| {fmt_mib(c.agent_rss)} | {fmt_mib(c.temp_disk)} | {fmt_mib(c.output)} | {rel} |"
        )
    lines += ["", "| target | wanted | measured | verdict |", "|---|---|---|---|"]
    for t in report.targets:
        verdict = "n/a" if t.ok is None else ("PASS" if t.ok else "FAIL")
        lines.append(f"| {t.name} | {t.wanted} | {t.measured} | {verdict} |")
    notes = [f"- {c.label}: temp = {c.temp_note}" + (f"; {c.note}" if c.note else "") for c in report.cases
             if not c.skipped and (c.temp_note or c.note)]  # fmt: skip
    ds = report.dataset
    head = (
        f"Dataset: {ds['apparent_gib']} GiB apparent, {ds['data_mib']:.0f} MiB allocated, half compressible; "
        f"machine: {report.machine['cpus']} CPUs, Python {report.machine['python']}, {report.machine['date']}, "
        f"1-min load average {report.machine['loadavg_before']} before / {report.machine['loadavg_after']} after."
    )
    return "\n".join([head, "", *lines, "", "Notes:", "", *notes])


def chart(report: Report) -> str:
    """A horizontal bar chart of MB/s of allocated data, as plain SVG (no plotting library needed)."""
    rows = [c for c in report.cases if not c.skipped and c.mbps > 0]
    width, left, bar_h, gap, top = 1040, 440, 22, 8, 50
    height = top + len(rows) * (bar_h + gap) + 40
    peak = max((c.mbps for c in rows), default=1.0)
    scale = (width - left - 90) / peak
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="DejaVu Sans, Arial, sans-serif" font-size="13">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="16" font-weight="bold">'
        "Throughput, MB/s of allocated data (higher is better)</text>",
    ]
    for i, c in enumerate(rows):
        y = top + i * (bar_h + gap)
        ours = c.key.startswith(("backup", "restore", "sparse"))
        color = "#2b7bba" if ours else "#999999"
        w = max(1.0, c.mbps * scale)
        label = c.label.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        out.append(f'<text x="{left - 8}" y="{y + bar_h * 0.7:.1f}" text-anchor="end">{label}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>')
        out.append(f'<text x="{left + w + 6:.1f}" y="{y + bar_h * 0.7:.1f}">{c.mbps:,.0f}</text>')
    y = height - 14
    out.append(f'<rect x="{left}" y="{y - 11}" width="12" height="12" fill="#2b7bba"/>')
    out.append(f'<text x="{left + 18}" y="{y}">qubes-backup</text>')
    out.append(f'<rect x="{left + 140}" y="{y - 11}" width="12" height="12" fill="#999999"/>')
    out.append(f'<text x="{left + 158}" y="{y}">baselines</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_docs(report: Report, text: str) -> None:
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": report.machine,
        "dataset": report.dataset,
        "cases": [dict(asdict(c), mbps=round(c.mbps, 1)) for c in report.cases],
        "targets": [asdict(t) for t in report.targets],
    }
    RESULTS_JSON.write_text(json.dumps(payload, indent=2) + "\n")
    CHART_SVG.write_text(chart(report))
    block = f"{BEGIN}\n{text}\n\n![throughput](performance/throughput.svg)\n{END}"
    doc = PERF_MD.read_text() if PERF_MD.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END) :]
    else:
        doc += "\n" + block + "\n"
    PERF_MD.write_text(doc)


# ------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny dataset, seconds; results not written to docs/")
    ap.add_argument("--data-mib", type=float, default=1800.0, help="allocated data of the dataset (MiB)")
    ap.add_argument("--apparent-gib", type=float, default=7.0, help="apparent size of the dataset (GiB)")
    ap.add_argument("--qubes-subset-mib", type=float, default=300.0, help="data the Qubes re-enactment runs on")
    ap.add_argument("--sparse-data-mib", type=int, default=1024, help="data in the sparse/dense images (MiB)")
    ap.add_argument("--sparse-apparent-gib", type=int, default=64, help="apparent size of the sparse image")
    ap.add_argument("--work", type=Path, default=REPO / "bench-out", help="work directory (recreated)")
    ap.add_argument("--only", default="", help="comma list of parts: ours,stock,restic,borg,qubes,sparse")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/PERFORMANCE.md and docs/performance/")
    args = ap.parse_args(argv)
    if args.smoke:
        args.data_mib, args.apparent_gib, args.qubes_subset_mib = 24.0, 0.25, 4.0
        args.sparse_data_mib, args.sparse_apparent_gib = 16, 1
        args.no_docs = True
    parts = set(args.only.split(",")) if args.only else {"ours", "stock", "restic", "borg", "qubes", "sparse"}
    work = args.work.absolute()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    log = work / "bench.log"
    bench = Bench(work, args.smoke, log)
    print(f"== dataset: {args.apparent_gib:g} GiB apparent, {args.data_mib:g} MiB data (work dir {work})", flush=True)
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(f"  warning: load average {load_before[0]:.2f} before starting: other work skews the figures")
    t0 = time.monotonic()
    bench.generate(args.data_mib, args.apparent_gib)
    print(f"  generated in {time.monotonic() - t0:.1f} s: {bench.data / MIB:.0f} MiB allocated", flush=True)
    if "ours" in parts:
        bench.ours()
    if "stock" in parts:
        bench.stock()
    if "restic" in parts:
        bench.restic()
    if "borg" in parts:
        bench.borg()
    if "qubes" in parts:
        bench.qubes_v4(args.qubes_subset_mib)
    if "sparse" in parts:
        bench.sparse(args.sparse_data_mib, args.sparse_apparent_gib)
    report = Report(
        machine={"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "loadavg_before": round(load_before[0], 2), "loadavg_after": round(os.getloadavg()[0], 2)},
        dataset={"apparent_gib": args.apparent_gib, "data_mib": bench.data / MIB, "compressible": 0.5,
                 "smoke": args.smoke},
        cases=list(bench.cases.values()),
        targets=evaluate(bench.cases),
    )
    text = table(report)
    print("\n" + text)
    if not args.no_docs:
        write_docs(report, text)
        written = ", ".join(str(p.relative_to(REPO)) for p in (RESULTS_JSON, CHART_SVG, PERF_MD))
        print(f"\nwritten: {written}")
    else:
        (work / "results.json").write_text(json.dumps([asdict(c) for c in report.cases], indent=2) + "\n")
        (work / "throughput.svg").write_text(chart(report))
    shutil.rmtree(bench.src, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
