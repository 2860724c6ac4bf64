"""`make demo`: the main job end to end on a simulated Qubes system.

1. build a realistic simulated system (dom0 with a home, a template, sys-net, sys-firewall, AppVMs, a
   StandaloneVM, multi-GiB sparse images) and an empty backup VM;
2. `qvm-backup -d backupvm` into it, through the real qubes.Backup agent process;
3. show that the backup VM sees only opaque names (tar -tvf) and no VM name;
4. `qvm-backup-restore -d backupvm` into a second, freshly installed simulated dom0, through the real
   qubes.Restore agent, and compare every restored file byte for byte, holes included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
PASSPHRASE = "correct horse battery staple"


def run(cmd: list[str], env: dict[str, str], **kw: object) -> subprocess.CompletedProcess[str]:
    print(f"\n$ QUBES_SIM={env['QUBES_SIM']} {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, env=env, text=True, check=True, **kw)  # type: ignore[call-overload]


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sim", default="demo-sim", help="directory for the simulated systems (recreated)")
    ap.add_argument("--scale", default="default", choices=("small", "default"))
    args = ap.parse_args()
    base = Path(args.sim).absolute()
    if base.exists():
        shutil.rmtree(base)
    src, dst = base / "system", base / "restored-system"
    env = dict(os.environ, QUBES_SIM=str(src))

    print("== 1. A simulated Qubes system")
    run([str(BIN / "qubes-backup-simgen"), str(src), "--scale", args.scale], env)
    # Paths given to the commands are interpreted inside the simulated dom0: -p /passphrase is DIR/dom0/passphrase.
    (src / "dom0/passphrase").write_text(PASSPHRASE + "\n")

    print("\n== 2. qvm-backup into the backup VM (through the qubes.Backup agent process)")
    t0 = time.monotonic()
    out = run(
        [str(BIN / "qvm-backup"), "-y", "-d", "backupvm", "-p", "/passphrase", "/home/user/backups"],
        env, stdout=subprocess.PIPE,
    )  # fmt: skip
    print(out.stdout, end="")
    print(f"(backup took {time.monotonic() - t0:.1f} s including the KDF)")
    backups = sorted((src / "vms/backupvm/home/user/backups").glob("qubes-backup-*"))
    assert len(backups) == 1, backups
    backup = backups[0]

    print("\n== 3. What the backup VM sees: opaque member names only")
    listing = subprocess.run(["tar", "-tvf", str(backup)], text=True, check=True, stdout=subprocess.PIPE).stdout
    lines = listing.splitlines()
    print("\n".join(lines[:8] + (["..."] if len(lines) > 10 else []) + lines[-2:]))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "dom0"))
    from qubes_backup_dom0.inner import same_content
    from qubes_backup_dom0.qubesxml import Collection
    from qubes_backup_sim.store import write_atomic

    names = Collection.load(src / "dom0/var/lib/qubes/qubes.xml").names()
    header = subprocess.run(["tar", "-xOf", str(backup), "backup-header"], check=True, stdout=subprocess.PIPE).stdout
    leaked = [n for n in names if n in listing or n.encode() in header]
    print(f"{len(lines)} members; VM names in member names or header: {leaked or 'none'}")
    if leaked:
        return 1

    print("\n== 4. Restore into a freshly installed second dom0 (through the qubes.Restore agent process)")
    fresh = Collection.load(src / "dom0/var/lib/qubes/qubes.xml")
    (dst / "dom0/var/lib/qubes").mkdir(parents=True)
    (dst / "dom0/home/user").mkdir(parents=True)
    (dst / "dom0/passphrase").write_text(PASSPHRASE + "\n")
    keep = {"dom0", "backupvm"}
    for dom in list(fresh.domains):
        if dom.name not in keep:
            dom.element.getparent().remove(dom.element)
    write_atomic(fresh, dst / "dom0/var/lib/qubes/qubes.xml")
    (dst / "vms/backupvm/home/user/backups").mkdir(parents=True)
    os.link(backup, dst / "vms/backupvm/home/user/backups" / backup.name)
    env2 = dict(os.environ, QUBES_SIM=str(dst))
    out = run(
        [str(BIN / "qvm-backup-restore"), "-y", "-d", "backupvm", "-p", "/passphrase",
         f"/home/user/backups/{backup.name}"],
        env2, stdout=subprocess.PIPE,
    )  # fmt: skip
    print(out.stdout, end="")

    print("\n== 5. Verified comparison of every restored file with the original")
    restored = Collection.load(dst / "dom0/var/lib/qubes/qubes.xml")
    qroot_src, qroot_dst = src / "dom0/var/lib/qubes", dst / "dom0/var/lib/qubes"
    compared = bad = 0
    total_apparent = total_alloc_src = total_alloc_dst = 0
    for path in sorted(p for p in qroot_src.rglob("*") if p.is_file() and p.name != "qubes.xml"):
        rel = path.relative_to(qroot_src)
        vm = rel.parts[1] if len(rel.parts) > 2 else None
        if vm is None or restored.get(vm) is None or vm == "backupvm":
            continue
        other = qroot_dst / rel
        same = other.is_file() and same_content(path, other)
        compared += 1
        bad += not same
        total_apparent += path.stat().st_size
        total_alloc_src += allocated(path)
        total_alloc_dst += allocated(other) if other.exists() else 0
        if not same:
            print(f"  DIFFERENT: {rel}")
    print(
        f"{compared} files compared byte for byte, {bad} different; apparent {total_apparent / 2**30:.2f} GiB, "
        f"allocated {total_alloc_src / 2**20:.1f} MiB before, {total_alloc_dst / 2**20:.1f} MiB after (holes kept)"
    )
    homes = list((dst / "dom0/home/user").glob("home-restore-*"))
    print(f"dom0 home restored to: {homes[0].relative_to(dst) if homes else 'not restored'}")
    return 1 if bad or not compared else 0


if __name__ == "__main__":
    sys.exit(main())
