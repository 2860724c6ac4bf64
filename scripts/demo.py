"""`make demo`: the main job end to end on a simulated Qubes system.

1. build a realistic simulated system like a fresh R4.2 install (dom0 with a home, templates, sys-net,
   sys-firewall -- running --, AppVMs, a StandaloneVM, multi-GiB sparse volumes in an lvm_thin pool) and an
   empty backup VM; its simulated qubesd (started on demand) owns qubes.xml and the volumes;
2. `qvm-backup -d backupvm` into it: metadata through the Admin API, committed volume data through LVM thin
   snapshots, the stream through the real qubes.Backup agent process;
3. show that the backup VM sees only opaque names (tar -tvf) and no VM name;
4. `qvm-backup-restore -d backupvm` into a second, freshly installed simulated system (simgen --only
   backupvm), through the real qubes.Restore agent: VMs created through its qubesd, volumes imported through
   admin.vm.volume.ImportWithSize;
5. compare every restored VM with the original: volumes byte for byte (holes kept) and properties, features,
   tags and firewall rules;
6. incremental snapshots into a repository (`qvm-backup --repo`): a first snapshot, a second after a few writes
   into one VM (change tracking reads only those blocks), a third with nothing changed; the list of snapshots;
   the first snapshot's version of that VM restored next to the current one and compared; a keyless prune in
   the backup VM.
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
QUBES_XML = "dom0/var/lib/qubes/qubes.xml"  # written only by each system's simulated qubesd


def run(cmd: list[str], env: dict[str, str], **kw: object) -> subprocess.CompletedProcess[str]:
    print(f"\n$ QUBES_SIM={env['QUBES_SIM']} {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, env=env, text=True, check=True, **kw)  # type: ignore[call-overload]


def agent_confinement() -> str:
    """Whether the agent processes run confined: the simulated transport's rule (bubblewrap found, and not
    turned off with QUBES_SIM_SANDBOX=0); had bubblewrap been found but not worked, the commands would have
    failed."""
    if os.environ.get("QUBES_SIM_SANDBOX", "1") == "0":
        return "ran UNCONFINED (QUBES_SIM_SANDBOX=0)"
    if shutil.which("bwrap") is None:
        return ("ran UNCONFINED: bubblewrap is not installed (Debian/Ubuntu: apt install bubblewrap); on a real "
                "system the agent runs in its own VM")  # fmt: skip
    return "ran confined by bubblewrap (no network, nothing but the simulated backup VM's files)"


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sim", default="demo-sim", help="directory for the simulated systems (recreated)")
    ap.add_argument("--scale", default="default", choices=("small", "default"))
    # A restore streams every volume's full apparent size into qubesd's import (holes as zeros, which the
    # import service writes sparsely), as Qubes' own restore does; the demo keeps the total small.
    ap.add_argument("--apparent-gib", default="6", help="total apparent size of the VMs' volumes")
    args = ap.parse_args()
    base = Path(args.sim).absolute()
    if base.exists():
        shutil.rmtree(base)
    src, dst = base / "system", base / "restored-system"
    env = dict(os.environ, QUBES_SIM=str(src))

    print("== 1. A simulated Qubes system (lvm_thin pool, sys-firewall running)")
    run([str(BIN / "qubes-backup-simgen"), str(src), "--scale", args.scale, "--apparent-gib", args.apparent_gib], env)
    # Paths given to the commands are interpreted inside the simulated dom0: -p /passphrase is DIR/dom0/passphrase.
    (src / "dom0/passphrase").write_text(PASSPHRASE + "\n")

    print("\n== 2. qvm-backup into the backup VM (through the qubes.Backup agent process)")
    t0 = time.monotonic()
    out = run(
        [str(BIN / "qvm-backup"), "-y", "-d", "backupvm", "-p", "/passphrase", "/home/user/backups"],
        env, stdout=subprocess.PIPE,
    )  # fmt: skip
    print(out.stdout, end="")
    print(f"(backup took {time.monotonic() - t0:.1f} s including the KDF; the qubes.Backup agent "
          f"{agent_confinement()})")
    backups = sorted((src / "vms/backupvm/home/user/backups").glob("qubes-backup-*"))
    assert len(backups) == 1, backups
    backup = backups[0]

    print("\n== 3. What the backup VM sees: opaque member names only")
    listing = subprocess.run(["tar", "-tvf", str(backup)], text=True, check=True, stdout=subprocess.PIPE).stdout
    lines = listing.splitlines()
    print("\n".join(lines[:8] + (["..."] if len(lines) > 10 else []) + lines[-2:]))
    from qubes_backup_dom0.qubes.qubesxml import Collection

    names = Collection.load(src / QUBES_XML).names()
    header = subprocess.run(["tar", "-xOf", str(backup), "backup-header"], check=True, stdout=subprocess.PIPE).stdout
    leaked = [n for n in names if n in listing or n.encode() in header]
    print(f"{len(lines)} members; VM names in member names or header: {leaked or 'none'}")
    if leaked:
        return 1

    print("\n== 4. Restore into a freshly installed second system (through its qubesd and the qubes.Restore agent)")
    run([str(BIN / "qubes-backup-simgen"), str(dst), "--scale", args.scale, "--only", "backupvm"], env)
    (dst / "dom0/passphrase").write_text(PASSPHRASE + "\n")
    os.link(backup, dst / "vms/backupvm/home/user/backups" / backup.name)
    env2 = dict(os.environ, QUBES_SIM=str(dst))
    # Our own backup, so everything it holds is restored: devices and the settings that grant power too
    # (without these two options, -y restores neither: docs/SECURITY.md, "Backups from a compromised machine").
    out = run(
        [str(BIN / "qvm-backup-restore"), "-y", "-d", "backupvm", "-p", "/passphrase", "--restore-devices",
         "--restore-risky-settings", f"/home/user/backups/{backup.name}"],
        env2, stdout=subprocess.PIPE,
    )  # fmt: skip
    print(out.stdout, end="")

    print("\n== 5. Every restored VM compared with the original")
    bad = compare(src, dst)
    homes = list((dst / "dom0/home/user").glob("home-restore-*"))
    print(f"dom0 home restored to: {homes[0].relative_to(dst) if homes else 'not restored'}")
    print(f"The backup VM's agents (qubes.Backup, qubes.Restore) {agent_confinement()}.")
    return 1 if bad or repository(src, dst, env, env2) else 0


def repository(src: Path, dst: Path, env: dict[str, str], env2: dict[str, str]) -> int:
    """Section 6: snapshots into a repository, a restore of an older one, prune."""
    from qubes_backup_dom0.format.sparse import same_content
    from qubes_backup_dom0.qubes.qubesxml import Collection

    print("\n== 6. Incremental snapshots into a repository: only what changed is read, sent and stored")
    repo = ["-d", "backupvm", "-p", "/passphrase", "--repo", "/home/user/repo"]
    for what in ("first snapshot", "after 3 writes of 4 KiB into work's private volume", "nothing changed"):
        if what.startswith("after"):
            coll = Collection.load(src / QUBES_XML)
            lv = volume_file(src, coll, coll["work"].volume("private"))  # type: ignore[union-attr]
            shutil.copy(lv, dst / "work-private.before")  # the content snapshot 1 holds
            # as Qubes commits a VM's writes: a new LV that replaces the committed one (sparse copy)
            subprocess.run(["cp", "--sparse=always", str(lv), f"{lv}.new"], check=True)
            with open(f"{lv}.new", "r+b") as f:
                for off in (1 << 20, 7 << 20, lv.stat().st_size // 2 // 4096 * 4096):
                    f.seek(off)
                    f.write(os.urandom(4096))
            os.replace(f"{lv}.new", lv)
        print(f"\n-- {what}")
        t0 = time.monotonic()
        run([str(BIN / "qvm-backup"), "-y", *repo], env)
        print(f"(took {time.monotonic() - t0:.1f} s in all)")
    run([str(BIN / "qvm-backup-restore"), *repo, "--list-snapshots"], env)
    # the repository as the second system's backup VM sees it (hard links), and snapshot 1's work restored
    # beside the work restored in step 4
    shutil.copytree(src / "vms/backupvm/home/user/repo", dst / "vms/backupvm/home/user/repo", copy_function=os.link)
    run([str(BIN / "qvm-backup-restore"), "-y", *repo, "--snapshot", "1", "--rename-conflicting", "work"], env2)
    coll = Collection.load(dst / QUBES_XML)
    restored = [d for d in coll.domains if d.name != "work" and d.name.startswith("work")]
    before = dst / "work-private.before"
    same = len(restored) == 1 and same_content(before, volume_file(dst, coll, restored[0].volume("private")))  # type: ignore[arg-type]
    print(f"snapshot 1's work restored as {restored[0].name if restored else '?'}: its private volume is "
          f"{'byte-identical to' if same else 'DIFFERENT from'} work's before the writes")
    before.unlink()
    run([str(BIN / "qvm-backup-prune"), "-d", "backupvm", "--repo", "/home/user/repo", "--keep-last", "2"], env)
    return 0 if same else 1


def volume_file(sim: Path, coll: object, vol: object) -> Path:
    """The host file with a volume's committed data: an LV file (lvm_thin) or the clean image."""
    pool = coll.pools[vol.pool]  # type: ignore[attr-defined]
    if pool["driver"] == "lvm_thin":
        return sim / "dom0/dev" / vol.vid  # type: ignore[attr-defined]
    return sim / "dom0" / pool["dir_path"].lstrip("/") / f"{vol.vid}.img"  # type: ignore[attr-defined]


def metadata(sim: Path, coll: object, name: str) -> dict[str, object]:
    from qubes_backup_sim import firewall

    dom = coll[name]  # type: ignore[index]
    props = {k: v for k, v in dom.properties.items() if k not in ("qid", "uuid", "name", "template",
                                                                 "backup_timestamp")}  # fmt: skip
    fw = sim / "dom0/var/lib/qubes" / (coll.vm_dir(dom) or "") / "firewall.xml"  # type: ignore[attr-defined]
    return {"class": dom.klass, "template": coll.effective_template(dom), "properties": props,  # type: ignore[attr-defined]
            "features": dom.features, "tags": sorted(t for t in dom.tags if not t.startswith("created-by-")),
            "firewall": firewall.load(fw)}  # fmt: skip


def compare(src: Path, dst: Path) -> int:
    from qubes_backup_dom0.format.sparse import same_content
    from qubes_backup_dom0.qubes.qubesxml import Collection

    a, b = Collection.load(src / QUBES_XML), Collection.load(dst / QUBES_XML)
    vms = [d.name for d in a.domains if d.include_in_backups and not d.is_admin]
    volumes = bad = apparent = alloc_src = alloc_dst = 0
    for name in vms:
        if b.get(name) is None:
            print(f"  MISSING: {name}")
            bad += 1
            continue
        if metadata(src, a, name) != metadata(dst, b, name):
            print(f"  DIFFERENT properties/features/tags/firewall: {name}")
            bad += 1
        for vol in (v for v in a[name].volumes if v.save_on_stop):
            other = b[name].volume(vol.name)
            x = volume_file(src, a, vol)
            y = volume_file(dst, b, other) if other is not None else None
            volumes += 1
            if y is None or not same_content(x, y):
                print(f"  DIFFERENT: {name} volume {vol.name}")
                bad += 1
                continue
            apparent += x.stat().st_size
            alloc_src, alloc_dst = alloc_src + allocated(x), alloc_dst + allocated(y)
    running = [n for n in vms if (src / "dom0/dev/qubes_dom0" / f"vm-{n}-private-snap").exists()]
    print(f"{len(vms)} VMs: properties, features, tags and firewall rules equal; {volumes} volumes (LVs) "
          f"byte-identical, {bad} different")  # fmt: skip
    print(f"apparent {apparent / 2**30:.2f} GiB, allocated {alloc_src / 2**20:.1f} MiB before, "
          f"{alloc_dst / 2**20:.1f} MiB after (holes kept); running during the backup: {', '.join(running) or 'none'}"
          " (its committed data was backed up, not what it wrote since it started)")  # fmt: skip
    return bad


if __name__ == "__main__":
    sys.exit(main())
