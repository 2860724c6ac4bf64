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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "dom0"))
sys.path.insert(0, str(REPO / "protocol"))

from qubes_backup_dom0.qubes.qubesxml import Collection  # noqa: E402
from qubes_backup_sim import simgen  # noqa: E402
from qubes_backup_sim.launch import ensure_qubesd, stop_qubesd  # noqa: E402
from qubes_backup_sim.storage import set_volume_attr  # noqa: E402
from qubes_backup_sim.store import write_atomic  # noqa: E402

BIN = Path(sys.executable).parent
PASSPHRASE = "bench passphrase: correct horse battery staple"
POLL = 0.02  # seconds between samples of the process tree (the agent's CPU is its last sample)
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
    agent_cpu: float = 0.0  # CPU seconds of the agent process(es) (polled from /proc; ours only)
    qubesd_cpu: float = 0.0  # CPU seconds of the simulated qubesd during the case (ours only)
    limit: str = ""  # key of the machine limit this case is compared with (Limits)

    @property
    def mbps(self) -> float:
        return self.data / self.wall / 1e6 if self.wall > 0 else 0.0

    @property
    def dom0_cpu(self) -> float:
        """CPU of everything in dom0 but the agent: qvm-backup* and its other children (lvm, imports)."""
        return max(self.cpu - self.agent_cpu, 0.0)

    def per_gb(self, cpu: float) -> float:
        return cpu / (self.data / 1e9) if self.data else 0.0


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


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float | None:
    """utime + stime of a live process, in seconds (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


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
        self._agent_cpu: dict[int, float] = {}  # last CPU seen per agent process

    @property
    def agent_cpu(self) -> float:
        return sum(self._agent_cpu.values())

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
                    cpu = proc_cpu(pid)
                    if cpu is not None:
                        self._agent_cpu[pid] = max(cpu, self._agent_cpu.get(pid, 0.0))
        self.tree_rss = max(self.tree_rss, rss_sum)
        if self.temp_probe is not None:
            self.temp = max(self.temp, self.temp_probe())

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(POLL)


_SANDBOX_REAPED: list[bool] = []


def sandboxed_cpu_is_counted() -> bool:
    """Whether a process run the way the sim sandboxes the agent (bwrap --unshare-all, its own pid namespace)
    has its CPU in our RUSAGE_CHILDREN.  Measured here it is not (the namespace's init is not reaped by
    bwrap's parent): the agent's CPU, polled from /proc, must then be added to the case's total."""
    if not _SANDBOX_REAPED:
        bwrap = shutil.which("bwrap")
        if bwrap is None or os.environ.get("QUBES_SIM_SANDBOX", "1") == "0":
            _SANDBOX_REAPED.append(True)  # the agent is an ordinary child, reaped and counted
        else:
            busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass"
            argv = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/", "/",
                    "--proc", "/proc", "--dev", "/dev", sys.executable, "-c", busy]  # fmt: skip
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            ok = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            _SANDBOX_REAPED.append(not ok or used >= 0.1)
    return _SANDBOX_REAPED[0]


def run_measured(
    case: Case,
    argv: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    agent_marker: bytes | None = None,
    temp_probe: Callable[[], int] | None = None,
    cwd: Path | None = None,
    stdout: Path | None = None,
) -> Case:
    """Run ``argv`` to completion and fill ``case`` with wall, CPU, RSS and temp-disk figures.

    Without an agent (the baselines all run in "dom0") dom0_rss is the peak of the summed RSS of the tree.
    ``stdout``: a file for the command's standard output (default: the log, with its standard error).
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with open(log, "ab") as out, open(stdout or os.devnull, "wb") as own:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=own if stdout else out,
                                stderr=subprocess.STDOUT if stdout is None else out, stdin=subprocess.DEVNULL)
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
        case.agent_cpu = sampler.agent_cpu
        if not sandboxed_cpu_is_counted():
            case.cpu += case.agent_cpu  # dom0's figure stays cpu - agent_cpu
    else:
        case.dom0_rss = max(sampler.tree_rss, sampler.dom0_hwm)
    case.temp_disk = sampler.temp
    if rc != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{case.label}: {argv[0]} exited with {rc}:\n{tail}")
    return case


# ------------------------------------------------------------------------------------------ systems

def warm(path: Path) -> None:
    """Read ``path`` once, into the page cache: a restore is measured, like a backup, with its input cached
    (the pipeline's cost, not a cold disk's)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass


def data_bytes(root: Path) -> int:
    """Allocated bytes of every regular file under ``root`` (the figure MB/s is computed against)."""
    return allocated(root)


def fresh_system(dst: Path, keep: tuple[str, ...] = ()) -> Path:
    """A freshly installed second system to restore into: dom0 (empty home), backupvm and ``keep`` (a single
    VM is restored into a system that already has its template, as on a real system), lvm_thin pools as a
    fresh R4.2 install.  Its simulated qubesd is started now, outside the timed run (a real one always runs).
    """
    if dst.exists():
        stop_qubesd(dst)
        shutil.rmtree(dst)
    simgen.generate(dst, "small", keep=("backupvm", *keep), pool=POOL)
    (dst / "dom0/pw").write_text(PASSPHRASE + "\n")
    start_qubesd(dst)
    return dst


POOL = "lvm_thin"  # what a fresh R4.2 install has, and what simgen's command line builds by default
QUBESD_IDLE = 3600.0  # seconds: the bench's qubesd must not exit (and restart, timed) between cases


def start_qubesd(system: Path) -> None:
    ensure_qubesd(system, idle=QUBESD_IDLE)


def qubesd_pid(system: Path) -> int | None:
    try:
        return int((system / "dom0/var/run/qubesd-sim.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def planned_data(system: Path, vms: tuple[str, ...] = ()) -> int:
    """The data (non-hole, non-zero bytes) a backup of ``vms`` (default: all) reads, as qvm-backup plans it."""
    from qubes_backup_dom0.backup.plan import plan_backup
    from qubes_backup_dom0.qubes.system import System

    plan = plan_backup(System.from_env({"QUBES_SIM": str(system)}), vms)
    try:
        return plan.data
    finally:
        plan.close()


def baseline_tree(src: Path, dst: Path) -> None:
    """The data of a full backup as plain files for the baselines (which know nothing of LVs): each backed-up
    VM's committed volumes hard-linked as DST/VMDIR/VOL.img (what Qubes' own backup reads), dom0's home
    copied as DST/dom0-home."""
    if dst.exists():
        shutil.rmtree(dst)
    coll = Collection.load(src / "dom0/var/lib/qubes/qubes.xml")
    for dom in coll.domains:
        if dom.klass == "AdminVM" or not dom.include_in_backups:
            continue
        vm_dir = dst / coll.default_vm_dir(dom.name, dom.klass)
        vm_dir.mkdir(parents=True)
        for vol in dom.volumes:
            if vol.save_on_stop:
                os.link(src / "dom0/dev" / vol.vid, vm_dir / f"{vol.name}.img")
    shutil.copytree(src / "dom0/home/user", dst / "dom0-home/user", symlinks=True)


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
        self.tree = work / "baseline-tree"  # the same volumes as plain files, for the baselines
        self.cases: dict[str, Case] = {}
        self.data = 0
        self.limits: Limits | None = None
        self.extra: dict[str, object] = {}  # other measured figures (snapshot cost, scan rates, start-up)

    def env(self, system: Path, **more: str) -> dict[str, str]:
        return dict(os.environ, QUBES_SIM=str(system), **more)

    def add(self, case: Case) -> Case:
        self.cases[case.key] = case
        extra = f" (scaled from {case.scaled_from:.0%})" if case.scaled_from else ""
        if case.skipped:
            print(f"  {case.label}: skipped: {case.skipped}", flush=True)
        else:
            print(
                f"  {case.label}: {case.wall:.2f} s, {case.mbps:.0f} MB/s, cpu {case.cpu:.1f} s "
                f"(dom0 {case.dom0_cpu:.1f}, agent {case.agent_cpu:.1f}, qubesd {case.qubesd_cpu:.1f}), "
                f"rss {case.dom0_rss / MIB:.0f}/{case.agent_rss / MIB:.0f} MiB, temp {case.temp_disk / MIB:.0f} MiB"
                f"{extra}",
                flush=True,
            )
        return case

    def generate(self, data_mib: float, apparent_gib: float) -> None:
        if self.src.exists():
            stop_qubesd(self.src)
            shutil.rmtree(self.src)
        simgen.generate(self.src, "bench", data_mib=data_mib, apparent_gib=apparent_gib, compressible=0.5,
                        pool=POOL)  # fmt: skip
        (self.src / "dom0/pw").write_text(PASSPHRASE + "\n")
        start_qubesd(self.src)
        self.data = planned_data(self.src)
        baseline_tree(self.src, self.tree)

    def measure(self, case: Case, argv: list[str], system: Path, marker: bytes, probe: Callable[[], int],
                stdout: Path | None = None, **env: str) -> Case:  # fmt: skip
        """One of our commands against ``system``, its qubesd's CPU counted apart."""
        pid = qubesd_pid(system)
        before = proc_cpu(pid) if pid else None
        run_measured(case, argv, self.log, self.env(system, **env), marker, probe, stdout=stdout)
        after = proc_cpu(pid) if pid else None
        if before is not None and after is not None:
            case.qubesd_cpu = after - before
        return case

    def backup(self, key: str, label: str, extra: list[str], vms: list[str] = (), data: int | None = None,  # type: ignore[assignment]
               limit: str = "", **env: str) -> Path:  # fmt: skip
        """qvm-backup into the simulated backupvm; returns the finished backup (moved out of the VM)."""
        wait_next_second()
        argv = [str(BIN / "qvm-backup"), "-y", "-d", "backupvm", "-p", "/pw", *extra, "/home/user/backups", *vms]
        case = Case(key, label, data=self.data if data is None else data, limit=limit,
                    temp_note="partial file in the backup VM (becomes the backup)")  # fmt: skip
        self.measure(case, argv, self.src, b"qubes.Backup", partial_probe(backups_in(self.src)), **env)
        backup = take_backup(self.src, self.work)
        case.output = allocated(backup)
        self.add(case)
        return backup

    def template_of(self, vm: str) -> str | None:
        """The template ``vm`` uses (explicit or the default) in the source system."""
        collection = Collection.load(self.src / "dom0/var/lib/qubes/qubes.xml")
        dom = collection.get(vm)
        return collection.effective_template(dom) if dom is not None else None

    def restore(self, key: str, label: str, backup: Path, vms: list[str], data: int, verify: bool = False) -> Case:
        """qvm-backup-restore from ``backup`` (hard-linked into a fresh second system's backupvm), through its
        simulated qubesd: VMs created with admin.vm.Create*, volumes through admin.vm.volume.ImportWithSize."""
        keep = tuple(self.template_of(vm) for vm in vms)
        dst = fresh_system(self.work / f"restored-{key}", tuple(t for t in keep if t))
        name = backup.name.split(".")[0]
        os.link(backup, backups_in(dst) / name)
        warm(backup)  # in the page cache, as the backup's own source data was (the agent writes it O_DIRECT)
        argv = [str(BIN / "qvm-backup-restore"), "-y", "-d", "backupvm", "-p", "/pw",
                *(["--verify-only"] if verify else []), f"/home/user/backups/{name}", *vms]  # fmt: skip
        lvs = dst / "dom0/dev"
        before = allocated(lvs)
        case = Case(key, label, data=data, limit="hmac2",
                    temp_note="volumes being imported (-import LVs, renamed into place by ImportEnd)")  # fmt: skip
        self.measure(case, argv, dst, b"qubes.Restore", lambda: _glob_size(lvs / "qubes_dom0", "*-import"))
        case.output = max(allocated(lvs) - before, 0)
        stop_qubesd(dst)
        shutil.rmtree(dst)
        return self.add(case)

    def on_tmpfs(self, run: Callable[[], None], key: str, label: str) -> None:
        """Run ``run`` with the backup VM's directory on a tmpfs (needs root; the case is skipped otherwise)."""
        target = backups_in(self.src)
        if os.geteuid() != 0 or not shutil.which("mount"):
            self.add(Case(key, label, skipped="needs root to mount a tmpfs"))
            return
        size = f"size={max(64 * MIB, 2 * self.data)}"
        if subprocess.run(["mount", "-t", "tmpfs", "-o", size, "bench-tmpfs", str(target)]).returncode != 0:
            self.add(Case(key, label, skipped="mounting a tmpfs failed"))
            return
        try:
            run()
        finally:
            subprocess.run(["umount", str(target)], check=False)

    def vm_data(self, vm: str) -> int:
        return planned_data(self.src, (vm,))

    # -------------------------------------------------------------------------------------- ours

    def ours(self) -> None:
        print("== qvm-backup / qvm-backup-restore", flush=True)
        full = self.backup("backup", "qvm-backup (zstd)", [], limit="zstd2")
        nocomp = self.backup("backup_nocomp", "qvm-backup --no-compress", ["--no-compress"], limit="hmac2")
        nocomp.unlink()
        self.on_tmpfs(self._tmpfs_pair, "backup_nocomp_tmpfs", "qvm-backup --no-compress, backup VM storage on tmpfs")
        self.restore("restore", "qvm-backup-restore (full)", full, [], self.data)
        self.restore("verify", "qvm-backup-restore --verify-only (full)", full, [], self.data, verify=True)
        small = self.vm_data(SMALL_VM)
        self.restore("restore_one_big", f"restore {SMALL_VM} from the full backup", full, [SMALL_VM], small)
        full.unlink()
        only = self.backup("backup_one", f"qvm-backup {SMALL_VM} only", [], [SMALL_VM], small)
        self.restore("restore_one_only", f"restore {SMALL_VM} from a backup of it alone", only, [SMALL_VM], small)
        only.unlink()

    def _tmpfs_pair(self) -> None:
        """zstd and --no-compress with the disk taken out: the pipeline's own limits, compared in one place."""
        self.backup("backup_nocomp_tmpfs", "qvm-backup --no-compress, backup VM storage on tmpfs", ["--no-compress"],
                    limit="hmac2").unlink()  # fmt: skip
        self.backup("backup_tmpfs", "qvm-backup (zstd), backup VM storage on tmpfs", [], limit="zstd2").unlink()

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
            f"tar -cS -C '{self.tree}' . | zstd -1 -T0 -q | openssl enc -aes-256-ctr -K {key} -iv {iv} "
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
        env = restic_env(self.work, repo, tmp)
        subprocess.run([exe, "init"], env=env, check=True, stdout=subprocess.DEVNULL)
        run_measured(case, [exe, "backup", "--quiet", str(self.tree)], self.log, env, temp_probe=tree_probe(tmp))
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
        env = borg_env(self.work)
        borg_init(exe, repo, env)
        run_measured(case, [exe, "create", f"{repo}::bench", "."], self.log, env, cwd=self.tree)
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
        dirs = [(p.relative_to(self.tree).as_posix(), allocated(p)) for p in sorted(self.tree.glob("*/*"))
                if p.is_dir()]  # fmt: skip
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
            f"cat > \"$FILE\" && scrypt enc {'-t 0.1 ' if self.smoke else ''}--passphrase file:'{pw}' \"$FILE\" "
            f"\"$FILE.enc\" && rm \"$FILE\" "
            f"&& openssl dgst -sha256 -hmac '{mac}' \"$FILE.enc\" > \"$FILE.enc.hmac\" && sync \"$FILE.enc\""
        )
        script = (
            f"set -e -o pipefail; cd '{out}'; tar -cS -C '{self.tree}' {' '.join(repr(c) for c in chosen)} "
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

    def small_system(self, key: str, vm: str, apparent: int, extents: Sequence[tuple[int, bytes | memoryview]]) -> Path:
        """A system with only ``vm`` (and backupvm) whose private LV is ``apparent`` bytes holding ``extents``
        (offset, data); its qubesd started."""
        root = self.work / f"case-{key}"
        if root.exists():
            stop_qubesd(root)
            shutil.rmtree(root)
        simgen.generate(root, "small", keep=(vm, "backupvm"), pool=POOL)
        (root / "dom0/pw").write_text(PASSPHRASE + "\n")
        lv = root / "dom0/dev/qubes_dom0" / f"vm-{vm}-private"
        tmp = lv.with_name(lv.name + ".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o660)
        try:
            os.ftruncate(fd, apparent)
            for off, data in extents:
                os.pwrite(fd, data, off)
        finally:
            os.close(fd)
        os.replace(tmp, lv)  # sim LVs are replaced by rename, never written in place
        xml = root / "dom0/var/lib/qubes/qubes.xml"
        coll = Collection.load(xml)
        dom = coll.get(vm)
        assert dom is not None
        set_volume_attr(dom, "private", "size", str(apparent))
        write_atomic(coll, xml)
        start_qubesd(root)
        return root

    def backup_at(self, root: Path, key: str, label: str, extra: list[str], vm: str, data: int, **env: str) -> None:
        saved = self.src
        self.src = root
        try:
            self.backup(key, label, extra, [vm], data, limit="hmac2", **env).unlink()
        finally:
            self.src = saved
            stop_qubesd(root)
            shutil.rmtree(root)

    def sparse(self, data_mib: int, apparent_gib: int) -> None:
        """A 64 GiB-apparent thin LV holding 1 GiB of scattered data vs a 1 GiB dense one (--no-compress).

        Each case is its own small system in which only ``work`` is backed up, so the difference is the cost
        of the holes.  Two ways of reading the sparse LV: as the simulation stores it (a sparse file, so
        SEEK_DATA skips the holes), and as a real thin LV reads (QUBES_SIM_BLOCKDEV=1: a block device reports
        everything as data, every byte is read and zero-scanned).
        """
        print("== sparse vs dense", flush=True)
        pool = memoryview(os.urandom(64 * MIB))
        size = data_mib * MIB

        def extents(apparent: int) -> list[tuple[int, bytes | memoryview]]:
            count = max(1, size // (256 << 10)) if apparent > size else max(1, size // (8 * MIB))
            ext = size // count
            stride = apparent // count
            out: list[tuple[int, bytes | memoryview]] = []
            for i in range(count):
                start = (i * 7919 * 4096) % (len(pool) - ext)
                out.append((i * stride, pool[start : start + ext]))
            return out

        cases: tuple[tuple[str, str, int, dict[str, str]], ...] = (
            ("sparse_dense", f"{data_mib} MiB dense thin LV", size, {}),
            ("sparse_sparse", f"{apparent_gib} GiB-apparent thin LV holding {data_mib} MiB (SEEK_DATA)",
             apparent_gib << 30, {}),
            ("sparse_blockdev", f"{apparent_gib} GiB-apparent thin LV holding {data_mib} MiB, read as a block "
             "device (QUBES_SIM_BLOCKDEV=1)", apparent_gib << 30, {"QUBES_SIM_BLOCKDEV": "1"}),
        )  # fmt: skip
        for key, label, apparent, env in cases:
            root = self.small_system(key, "work", apparent, extents(apparent))
            self.backup_at(root, key, label, ["--no-compress"], "work", size, **env)

    # -------------------------------------------------------------------------------------- start-up

    def startup(self) -> None:
        """Fixed costs: one VM holding 1 MiB vs the same VM holding nothing (same volumes, same snapshots),
        and --verify-only of the 1 MiB backup."""
        print("== start-up", flush=True)
        one = [(0, os.urandom(MIB))]
        root = self.small_system("one_empty", "vault", 2 << 30, [])
        self.backup_at(root, "one_empty", f"qvm-backup {SMALL_VM} holding no data", [], SMALL_VM, 0)
        root = self.small_system("one_mib", "vault", 2 << 30, one)
        saved = self.src
        self.src = root
        try:
            b = self.backup("one_mib", f"qvm-backup {SMALL_VM} holding 1 MiB", [], [SMALL_VM], MIB)
            self.verify_file("one_mib_verify", f"qvm-backup-restore --verify-only of the {SMALL_VM} 1 MiB backup",
                             root, b, MIB)  # fmt: skip
            b.unlink()
        finally:
            self.src = saved
            stop_qubesd(root)
            shutil.rmtree(root)

    def verify_file(self, key: str, label: str, system: Path, backup: Path, data: int) -> None:
        name = backup.name.split(".")[0]
        os.link(backup, backups_in(system) / name)
        argv = [str(BIN / "qvm-backup-restore"), "-y", "-d", "backupvm", "-p", "/pw", "--verify-only",
                f"/home/user/backups/{name}"]  # fmt: skip
        case = Case(key, label, data=data, temp_note="none (verify writes nothing)")
        self.measure(case, argv, system, b"qubes.Restore", lambda: 0)
        (backups_in(system) / name).unlink()
        self.add(case)

    def snapshot_cost(self, rounds: int = 5) -> None:
        """What one volume's snapshot costs here: lvcreate + lvremove through pools (the sim's lvm stand-in is
        one Python process per call, like the real lvm is one process per call)."""
        from qubes_backup_dom0.qubes import pools
        from qubes_backup_dom0.qubes.interface import Qubes
        from qubes_backup_dom0.qubes.system import System

        system = System.from_env({"QUBES_SIM": str(self.src)})
        qubes = Qubes(system)
        vols = qubes.volumes("work")
        info = vols["private"]
        ref = pools.VolumeRef("work", "Halted", "private", info["pool"], info["vid"], qubes.pool_info(info["pool"]))
        t0 = time.monotonic()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        for _ in range(rounds):
            with pools.committed(system, ref):
                pass
        per = (time.monotonic() - t0) / rounds
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / rounds
        count = sum(1 for d in Collection.load(self.qroot / "qubes.xml").domains if d.include_in_backups
                    for v in d.volumes if v.save_on_stop and v.pool == "lvm")  # fmt: skip
        self.extra["snapshot"] = {"seconds_per_volume": round(per, 3), "cpu_per_volume": round(cpu, 3),
                                  "volumes": count, "full_backup_seconds": round(per * count, 2),
                                  "full_backup_cpu": round(cpu * count, 2)}  # fmt: skip
        print(f"  snapshot (lvcreate + lvremove): {per * 1000:.0f} ms and {cpu * 1000:.0f} ms of CPU per volume, "
              f"{count} volumes in the dataset: {per * count:.1f} s, {cpu * count:.1f} CPU-s per full backup "
              "(twice that before, when the write phase snapshotted anew)")

    def imports(self) -> None:
        """Start-up: the interpreter alone, and importing what qvm-backup and the agent import (best of 5)."""
        agent_path = os.pathsep.join(str(REPO / d) for d in ("protocol", "vm-agent"))
        probes = {
            "python": [sys.executable, "-c", "pass"],
            "qvm-backup imports": [sys.executable, "-c", "import qubes_backup_dom0.cli.backup"],
            "qvm-backup-restore imports": [sys.executable, "-c", "import qubes_backup_dom0.cli.restore"],
            "agent imports": [sys.executable, "-c", "import qubes_backup_agent.backup_service"],
        }
        out: dict[str, float] = {}
        for name, argv in probes.items():
            best = float("inf")
            for _ in range(5):
                t0 = time.monotonic()
                subprocess.run(argv, check=True, env=dict(os.environ, PYTHONPATH=agent_path))
                best = min(best, time.monotonic() - t0)
            out[name] = round(best, 3)
        self.extra["startup"] = out
        print("  start-up (best of 5, wall): " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in out.items()))


def restic_env(work: Path, repo: Path, tmp: Path) -> dict[str, str]:
    """restic's environment in the bench: the passphrase, the repository, its TMPDIR and cache in ``work``."""
    return dict(os.environ, RESTIC_PASSWORD=PASSPHRASE, RESTIC_REPOSITORY=str(repo), TMPDIR=str(tmp),
                RESTIC_CACHE_DIR=str(work / "restic-cache"))  # fmt: skip


def borg_env(work: Path) -> dict[str, str]:
    """borg's environment in the bench: the passphrase, its base directory (cache, keys) in ``work``."""
    return dict(os.environ, BORG_PASSPHRASE=PASSPHRASE, BORG_BASE_DIR=str(work / "borg-base"),
                BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes")  # fmt: skip


def borg_init(exe: str, repo: Path, env: dict[str, str]) -> None:
    subprocess.run([exe, "init", "-e", "repokey-blake2", str(repo)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


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


# ------------------------------------------------------------------------------------------ machine limits

@dataclass
class Limits:
    """This machine's own limits, measured in the same run (bytes/s; best of a few tries, wall time).

    ``*_cpu`` rates are bytes per CPU-second of the measuring thread(s): far less sensitive to other work on
    the machine than wall time, they say what the primitive costs, not what the machine gave at that moment.
    """

    rates: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    def add(self, key: str, label: str, rate: float) -> None:
        self.rates[key] = rate
        self.labels[key] = label
        print(f"  {label}: {rate / 1e9:.2f} GB/s", flush=True)


def _best(fn: Callable[[], object], tries: int = 3) -> tuple[float, float]:
    """(best wall seconds, CPU seconds of that try) of ``fn``; CPU counts every thread of this process."""
    best, best_cpu = float("inf"), 0.0
    for _ in range(tries):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if wall < best:
            best, best_cpu = wall, cpu
    return best, best_cpu


def _threads(fn: Callable[[], object], n: int) -> Callable[[], None]:
    def run() -> None:
        ts = [threading.Thread(target=fn) for _ in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    return run


def sample_data(tree: Path, want: int) -> bytes:
    """Up to ``want`` bytes of the dataset's own data (its data regions, in file order): what zstd is timed on."""
    out = bytearray()
    for path in sorted(tree.rglob("*.img")):
        fd = os.open(path, os.O_RDONLY)
        try:
            for off, length in _data_regions(fd):
                out += os.pread(fd, min(length, want - len(out)), off)
                if len(out) >= want:
                    return bytes(out)
        finally:
            os.close(fd)
    return bytes(out)


def _data_regions(fd: int) -> list[tuple[int, int]]:
    from qubes_backup_dom0.format.sparse import scan_fd

    return scan_fd(fd, os.fstat(fd).st_size)


def measure_limits(tree: Path, smoke: bool) -> Limits:
    """HMAC-SHA256 and AES-256-CTR on 1 and 2 threads (the primitives the pipeline uses, from the same
    libraries), zstd -1 on the dataset's data (1 and 2 threads), one pipe hop (4 MiB writes, 1 MiB pipe, a
    reader thread), memcmp against zeros, and the zero scan on a dense zero file in memory."""
    import hmac

    import zstandard
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from qubes_backup_dom0.format import sparse

    print("== machine limits", flush=True)
    lim = Limits()
    n = (16 if smoke else 256) * MIB
    data = os.urandom(n)

    def mac() -> None:
        h = hmac.new(bytes(32), digestmod="sha256")
        h.update(data)
        h.digest()

    out = [bytearray(n + 16), bytearray(n + 16)]

    def aes(i: int = 0) -> None:
        enc = Cipher(algorithms.AES(bytes(32)), modes.CTR(bytes(16))).encryptor()
        enc.update_into(data, out[i])

    wall, cpu = _best(mac)
    lim.add("hmac1", "HMAC-SHA256, 1 thread", n / wall)
    lim.add("hmac1_cpu", "HMAC-SHA256, per CPU-second", n / cpu)
    wall, _ = _best(_threads(mac, 2))
    lim.add("hmac2", "HMAC-SHA256, 2 threads", 2 * n / wall)
    wall, cpu = _best(aes)
    lim.add("aes1", "AES-256-CTR, 1 thread", n / wall)
    lim.add("aes1_cpu", "AES-256-CTR, per CPU-second", n / cpu)
    wall, _ = _best(_threads(aes, 2))  # both threads write one buffer: only the speed is of interest
    lim.add("aes2", "AES-256-CTR, 2 threads", 2 * n / wall)
    sample = sample_data(tree, (16 if smoke else 128) * MIB) or data
    for threads, key in ((0, "zstd1"), (2, "zstd2")):
        cctx = zstandard.ZstdCompressor(level=1, threads=threads)
        wall, cpu = _best(lambda cctx=cctx: cctx.compress(sample))  # type: ignore[misc]
        lim.add(key, f"zstd -1 on the dataset's data, {max(threads, 1)} thread(s)", len(sample) / wall)
    wall, _ = _best(lambda: _pipe_hop(data))
    lim.add("pipe", "one pipe hop (4 MiB writes, 1 MiB pipe, reader thread)", n / wall)
    zeros = bytes(n)
    zbuf = bytearray(n)
    wall, _ = _best(lambda: zbuf == zeros)
    lim.add("memcmp", "memcmp of a zero buffer (bytearray == bytes)", n / wall)
    fd = os.memfd_create("bench-zeros")
    try:
        for off in range(0, n, 16 * MIB):
            os.pwrite(fd, zeros[: 16 * MIB], off)  # dense: written zeros, not holes
        wall, _ = _best(lambda: sparse.scan_zeros(fd, n))
        lim.add("scan", "sparse.scan_zeros over dense zeros in memory (memfd)", n / wall)
        buf = bytearray(sparse.SCAN_READ)

        def compare() -> None:
            runs: list[tuple[int, int]] = []
            for off in range(0, n, sparse.SCAN_READ):
                sparse._nonzero_runs(buf, sparse.SCAN_READ, off, runs)

        wall, _ = _best(compare)
        lim.add("scan_compare", "inner's zero test alone (in memory, no read)", n / wall)
    finally:
        os.close(fd)
    return lim


def _pipe_hop(data: bytes) -> None:
    import fcntl

    r, w = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), MIB)

    def reader() -> None:
        buf = bytearray(MIB)
        while os.readv(r, [buf]):
            pass

    t = threading.Thread(target=reader)
    t.start()
    view = memoryview(data)
    for off in range(0, len(view), 4 * MIB):
        piece = view[off : off + 4 * MIB]
        while piece:
            piece = piece[os.write(w, piece) :]
    os.close(w)
    t.join()
    os.close(r)


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
    limits: Limits = field(default_factory=Limits)
    extra: dict[str, object] = field(default_factory=dict)


def ratio(cases: dict[str, Case], a: str, b: str) -> float | None:
    """Throughput of ``a`` over throughput of ``b`` (same data), None if either is missing."""
    ca, cb = cases.get(a), cases.get(b)
    if ca is None or cb is None or ca.skipped or cb.skipped or ca.mbps == 0 or cb.mbps == 0:
        return None
    return ca.mbps / cb.mbps


def evaluate(cases: dict[str, Case], limits: Limits) -> list[Target]:
    """Issue #11's targets (and issue #6's that still apply), each from figures of this one run."""
    targets: list[Target] = []

    def at_least(name: str, value: float | None, want: float, unit: str = "x") -> None:
        shown = "n/a" if value is None else f"{value:.2f}{unit}"
        targets.append(Target(name, f">= {want:g}{unit}", shown, None if value is None else value >= want))

    def at_most(name: str, value: float | None, want: float, unit: str = "x") -> None:
        shown = "n/a" if value is None else f"{value:.2f}{unit}"
        targets.append(Target(name, f"<= {want:g}{unit}", shown, None if value is None else value <= want))

    def got(key: str) -> Case | None:
        c = cases.get(key)
        return c if c is not None and not c.skipped else None

    at_least("backup (zstd) vs stock pipeline (a)", ratio(cases, "backup", "stock"), 2.0)
    at_least("backup (zstd) vs restic", ratio(cases, "backup", "restic"), 3.0)
    at_least("backup (zstd) vs Qubes v4 re-enactment", ratio(cases, "backup", "qubes"), 30.0)
    at_least("--no-compress vs zstd, backup VM on tmpfs", ratio(cases, "backup_nocomp_tmpfs", "backup_tmpfs"), 1.0)
    at_least("(disk) --no-compress vs zstd, backup VM on disk", ratio(cases, "backup_nocomp", "backup"), 1.0)
    nt, h2 = got("backup_nocomp_tmpfs"), limits.rates.get("hmac2")
    at_least("--no-compress on tmpfs vs two-thread HMAC-SHA256", nt.mbps * 1e6 / h2 if nt and h2 else None, 0.5)
    bk = got("backup")
    at_most("backup (zstd) dom0 + agent CPU-s per GB", bk.per_gb(bk.cpu) if bk else None, 2.5, " s")
    nc = got("backup_nocomp_tmpfs") or got("backup_nocomp")
    at_most("--no-compress dom0 + agent CPU-s per GB", nc.per_gb(nc.cpu) if nc else None, 2.0, " s")
    dn = got("sparse_dense")
    for key, what in (("sparse_sparse", "SEEK_DATA"), ("sparse_blockdev", "read as a block device")):
        sp = got(key)
        at_most(f"64 GiB thin LV holding 1 GiB ({what}) vs 1 GiB dense (time)",
                sp.wall / dn.wall if sp and dn and dn.wall else None, 1.2)  # fmt: skip
    one, empty = got("one_mib"), got("one_empty")
    at_most("backup of one 1 MiB VM over the same VM with no data (wall)",
            one.wall - empty.wall if one and empty else None, 0.5, " s")  # fmt: skip
    at_least("full restore vs backup speed", ratio(cases, "restore", "backup"), 0.8)
    big, only = got("restore_one_big"), got("restore_one_only")
    at_most(f"restore {SMALL_VM} from full backup vs from its own backup",
            big.wall / only.wall if big and only and only.wall else None, 1.5)  # fmt: skip
    ours = [c for k, c in cases.items() if k.startswith(OURS) and not c.skipped]
    peak = max((c.dom0_rss for c in ours), default=None)
    at_most("dom0 peak RSS (any of our runs)", peak / MIB if peak else None, 300, " MiB")
    return targets


OURS = ("backup", "restore", "verify", "sparse", "one_")


# ------------------------------------------------------------------------------------------ output

def fmt_mib(n: int) -> str:
    return f"{n / MIB:,.0f}" if n else "-"


def table(report: Report) -> str:
    cases = {c.key: c for c in report.cases}
    base = cases.get("backup")
    lim = report.limits.rates
    lines = [
        "| case | wall s | MB/s (data) | of limit | CPU s | dom0 CPU-s/GB | agent CPU-s/GB | sim qubesd CPU s "
        "| dom0 peak RSS MiB | agent peak RSS MiB | peak temp disk MiB | output MiB | speed vs our backup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report.cases:
        label = c.label.replace("|", "\\|")  # pipeline labels contain '|': escape it for markdown tables
        if c.skipped:
            lines.append(f"| {label} | skipped: {c.skipped} |" + " |" * 11)
            continue
        rel = f"{c.mbps / base.mbps:.2f}x" if base and base.mbps and c.data == base.data else ""
        scaled = " (scaled)" if c.scaled_from else ""
        frac = f"{c.mbps * 1e6 / lim[c.limit]:.2f} {c.limit}" if c.limit in lim and c.data else ""
        ours = c.key.startswith(OURS)
        dom0_gb = f"{c.per_gb(c.dom0_cpu):.2f}" if c.data else "-"
        agent_gb = f"{c.per_gb(c.agent_cpu):.2f}" if ours and c.data else "-"
        qd = f"{c.qubesd_cpu:.2f}" if ours else "-"
        lines.append(
            f"| {label} | {c.wall:.2f}{scaled} | {c.mbps:,.0f} | {frac} | {c.cpu:.1f} | {dom0_gb} | {agent_gb} | {qd} "
            f"| {fmt_mib(c.dom0_rss)} | {fmt_mib(c.agent_rss)} | {fmt_mib(c.temp_disk)} | {fmt_mib(c.output)} | {rel} |"
        )
    lines += ["", "| machine limit (same run) | GB/s |", "|---|---:|"]
    lines += [f"| {report.limits.labels[k]} (`{k}`) | {v / 1e9:.2f} |" for k, v in lim.items()]
    lines += ["", "| target | wanted | measured | verdict |", "|---|---|---|---|"]
    for t in report.targets:
        verdict = "n/a" if t.ok is None else ("PASS" if t.ok else "FAIL")
        lines.append(f"| {t.name} | {t.wanted} | {t.measured} | {verdict} |")
    notes = [f"- {c.label}: temp = {c.temp_note}" + (f"; {c.note}" if c.note else "") for c in report.cases
             if not c.skipped and (c.temp_note or c.note)]  # fmt: skip
    snap = report.extra.get("snapshot")
    if isinstance(snap, dict):
        notes.append(f"- snapshots: lvcreate + lvremove of one volume took {snap['seconds_per_volume'] * 1000:.0f} ms "
                     f"here (the sim's lvm stand-in, one process per call); the full dataset has {snap['volumes']} "
                     f"volumes: {snap['full_backup_seconds']:.1f} s of each full backup's wall time and "
                     f"{snap['full_backup_cpu']:.1f} CPU-s of its dom0 CPU")  # fmt: skip
    up = report.extra.get("startup")
    if isinstance(up, dict):
        notes.append("- start-up (best of 5): " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in up.items()))
    ds = report.dataset
    head = (
        f"Dataset: {ds['apparent_gib']} GiB apparent, {ds['data_mib']:.0f} MiB of data backed up, half compressible, "
        f"pool {POOL}; machine: {report.machine['cpus']} CPUs, Python {report.machine['python']}, "
        f"{report.machine['date']}, 1-min load average {report.machine['loadavg_before']} before / "
        f"{report.machine['loadavg_after']} after.  \"of limit\": the case's MB/s over the machine limit named "
        "(below); CPU-s/GB: per GB (10^9 bytes) of data; dom0 = qvm-backup* and its children but the agent."
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
        ours = c.key.startswith(OURS)
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


def payload(report: Report) -> dict[str, object]:
    return {
        "machine": report.machine,
        "dataset": report.dataset,
        "cases": [dict(asdict(c), mbps=round(c.mbps, 1)) for c in report.cases],
        "targets": [asdict(t) for t in report.targets],
        "limits": report.limits.rates,
        "extra": report.extra,
    }


def write_docs(report: Report, text: str) -> None:
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(payload(report), indent=2) + "\n")
    CHART_SVG.write_text(chart(report))
    block = f"{BEGIN}\n{text}\n\n![throughput](performance/throughput.svg)\n{END}"
    doc = PERF_MD.read_text() if PERF_MD.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END) :]
    else:
        doc += "\n" + block + "\n"
    PERF_MD.write_text(doc)


# ------------------------------------------------------------------------------------------ main

PARTS = ("limits", "ours", "stock", "restic", "borg", "qubes", "sparse", "startup")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny dataset, seconds; results not written to docs/")
    ap.add_argument("--data-mib", type=float, default=1800.0, help="allocated data of the dataset (MiB)")
    ap.add_argument("--apparent-gib", type=float, default=7.0, help="apparent size of the dataset (GiB)")
    ap.add_argument("--qubes-subset-mib", type=float, default=300.0, help="data the Qubes re-enactment runs on")
    ap.add_argument("--sparse-data-mib", type=int, default=1024, help="data in the sparse/dense images (MiB)")
    ap.add_argument("--sparse-apparent-gib", type=int, default=64, help="apparent size of the sparse image")
    ap.add_argument("--work", type=Path, default=REPO / "bench-out", help="work directory (recreated)")
    ap.add_argument("--only", default="",
                    help="comma list of parts: limits,ours,stock,restic,borg,qubes,sparse,startup")  # fmt: skip
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/PERFORMANCE.md and docs/performance/")
    args = ap.parse_args(argv)
    if args.smoke:
        args.data_mib, args.apparent_gib, args.qubes_subset_mib = 24.0, 0.25, 4.0
        args.sparse_data_mib, args.sparse_apparent_gib = 16, 1
        args.no_docs = True
    parts = set(args.only.split(",")) if args.only else set(PARTS)
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
    print(f"  generated in {time.monotonic() - t0:.1f} s: {bench.data / MIB:.0f} MiB of data", flush=True)
    limits = measure_limits(bench.tree, args.smoke) if "limits" in parts else Limits()
    if "ours" in parts:
        bench.snapshot_cost()
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
    if "startup" in parts:
        bench.imports()
        bench.startup()
    report = Report(
        machine={"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "loadavg_before": round(load_before[0], 2), "loadavg_after": round(os.getloadavg()[0], 2)},
        dataset={"apparent_gib": args.apparent_gib, "data_mib": bench.data / MIB, "compressible": 0.5,
                 "smoke": args.smoke},
        cases=list(bench.cases.values()),
        targets=evaluate(bench.cases, limits),
        limits=limits,
        extra=bench.extra,
    )
    text = table(report)
    print("\n" + text)
    if not args.no_docs:
        write_docs(report, text)
        written = ", ".join(str(p.relative_to(REPO)) for p in (RESULTS_JSON, CHART_SVG, PERF_MD))
        print(f"\nwritten: {written}")
    else:
        (work / "results.json").write_text(json.dumps(payload(report), indent=2) + "\n")
        (work / "throughput.svg").write_text(chart(report))
    stop_qubesd(bench.src)
    shutil.rmtree(bench.src, ignore_errors=True)
    shutil.rmtree(bench.tree, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
