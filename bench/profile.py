"""Where the CPU goes: `perf record -a` of a backup (zstd and --no-compress) and a restore, grouped by process
and by kind of work (docs/PERFORMANCE.md, "Where the CPU goes").

    .venv/bin/python bench/profile.py [--data-mib 600] [--work /tmp/qb-profile]

Needs `perf` (Debian's linux-perf) and root (system-wide sampling).  Builds its own simulated system
(`simgen --scale bench`), runs the real console scripts against it, and prints one markdown table per case:
each process role's share of all busy samples (idle excluded), split into kinds of work by symbol.  A role is
told by its command line, polled while the case runs: dom0 = qvm-backup* (all its threads), agent = the
backup VM's service, lvm = the lvm stand-in, import = the simulated admin.vm.volume.ImportWithSize.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "bench"))

import run  # noqa: E402  (bench/run.py: fresh systems, the passphrase)

ROLES = (("qubes.Backup", "agent"), ("qubes.Restore", "agent"), ("qubes_backup_sim.lvm", "lvm"),
         ("ImportWithSize", "import"), ("qubes_backup_sim.qubesd", "sim qubesd"), ("qvm-backup", "dom0"))


SAMPLE = re.compile(r"^\s*(?P<comm>.+?)\s+(?P<pid>\d+)\s+[0-9a-f]+\s+(?P<sym>.*?)\s*\((?P<dso>[^()]*)\)$")


def kind(comm: str, dso: str, sym: str) -> str:
    """The kind of work a sample is in, by its symbol and object."""
    s = sym.lower()
    if "scrypt" in s:
        return "scrypt (KDF)"
    if "aes" in s:
        return "AES"
    if "zstd" in dso.lower() or s.startswith("zstd"):
        return "zstd"
    if "libcrypto" in dso or "sha256" in s:
        return "HMAC-SHA256"
    if "kernel" in dso:
        if "copy" in s or "memcpy" in s or "clear_page" in s or "iov_iter_zero" in s or "memmove" in s:
            return "kernel copies"
        if "fault" in s or "mm_fault" in s or "anonymous_page" in s or "folio" in s:
            return "page faults"
        return "kernel other"
    if "libpython" in dso or "python3" in dso.rsplit("/", 1)[-1]:
        return "Python"
    if "libc" in dso and ("mem" in s or "str" in s):
        return "libc copies/compares"
    return "other"


class Roles(threading.Thread):
    """pid -> role, polled from /proc while the case runs (processes are gone when perf's data is read)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.roles: dict[int, str] = {}
        self.parent: dict[int, int] = {}

    def in_tree(self, pid: int, root: int) -> bool:
        seen = 0
        while pid in self.parent and seen < 64:
            if pid == root:
                return True
            pid, seen = self.parent[pid], seen + 1
        return pid == root

    def run(self) -> None:
        while not self.stop.is_set():
            for d in os.listdir("/proc"):
                if d.isdigit() and int(d) not in self.roles:
                    try:
                        cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                        stat = Path(f"/proc/{d}/stat").read_text()
                    except OSError:
                        continue
                    self.parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
                    for marker, role in ROLES:
                        if marker in cmd:
                            self.roles[int(d)] = role
                            break
                    else:
                        self.roles[int(d)] = "other (" + (cmd.split(" ", 1)[0].rsplit("/", 1)[-1] or "?") + ")"
            time.sleep(0.005)


def profile(label: str, argv: list[str], env: dict[str, str], work: Path) -> str:
    data = work / "perf.data"
    roles = Roles()
    roles.start()
    t0 = time.monotonic()
    proc = subprocess.Popen(["perf", "record", "-q", "-a", "-F", "999", "-o", str(data), "--", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    if proc.wait() != 0:
        raise SystemExit(f"{label}: {argv[0]} failed")
    wall = time.monotonic() - t0
    roles.stop.set()
    roles.join()
    out = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,pid,ip,sym,dso"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in out.splitlines():
        m = SAMPLE.match(line)
        if m is None or m["pid"] == "0":
            continue
        pid = int(m["pid"])
        if not roles.in_tree(pid, proc.pid):
            continue  # not ours (the machine may be shared)
        role = roles.roles.get(pid, "other")
        counts[(role, kind(m["comm"], m["dso"], m["sym"]))] += 1
    total = sum(counts.values()) or 1
    by_role: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for (role, k), n in counts.items():
        by_role[role][k] += n
    lines = [f"### {label} ({wall:.1f} s wall, {total} busy samples at 999 Hz on all CPUs)", "",
             "| process | share | of which (percent of all busy samples) |", "|---|---:|---|"]  # fmt: skip
    for role, kinds in sorted(by_role.items(), key=lambda kv: -sum(kv[1].values())):
        share = 100 * sum(kinds.values()) / total
        detail = ", ".join(f"{k} {100 * n / total:.0f}" for k, n in kinds.most_common() if 100 * n / total >= 1)
        lines.append(f"| {role} | {share:.0f}% | {detail} |")
    data.unlink()
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-mib", type=float, default=600.0)
    ap.add_argument("--apparent-gib", type=float, default=3.0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qb-profile"))
    args = ap.parse_args(argv)
    if shutil.which("perf") is None or os.geteuid() != 0:
        print("bench/profile.py needs perf and root", file=sys.stderr)
        return 2
    work = args.work
    if work.exists():
        run.stop_qubesd(work / "src")
        run.stop_qubesd(work / "dst")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    src = work / "src"
    run.simgen.generate(src, "bench", data_mib=args.data_mib, apparent_gib=args.apparent_gib, pool=run.POOL)
    (src / "dom0/pw").write_text(run.PASSPHRASE + "\n")
    run.start_qubesd(src)
    env = dict(os.environ, QUBES_SIM=str(src))
    backups = src / "vms/backupvm/home/user/backups"
    report = []
    for label, extra in (("qvm-backup (zstd)", []), ("qvm-backup --no-compress", ["--no-compress"])):
        for old in backups.glob("qubes-backup-*"):
            old.unlink()
        cmd = [str(BIN / "qvm-backup"), "-y", "-d", "backupvm", "-p", "/pw", *extra, "/home/user/backups"]
        report.append(profile(label, cmd, env, work))
    for old in backups.glob("qubes-backup-*"):
        old.unlink()
    subprocess.run([str(BIN / "qvm-backup"), "-y", "-d", "backupvm", "-p", "/pw", "/home/user/backups"], env=env,
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    made = sorted(glob.glob(str(backups / "qubes-backup-*")))[-1]
    dst = run.fresh_system(work / "dst")
    (dst / "vms/backupvm/home/user/backups").mkdir(parents=True, exist_ok=True)
    os.link(made, dst / "vms/backupvm/home/user/backups" / Path(made).name)
    name = Path(made).name
    cmd = [str(BIN / "qvm-backup-restore"), "-y", "-d", "backupvm", "-p", "/pw", f"/home/user/backups/{name}"]
    dst_env = dict(os.environ, QUBES_SIM=str(dst))
    report.append(profile("qvm-backup-restore (full, of the zstd backup)", cmd, dst_env, work))
    print("\n".join(report))
    run.stop_qubesd(src)
    run.stop_qubesd(dst)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
