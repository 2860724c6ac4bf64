"""Issue 10, items 2 and 3, through the Python API: two restores in one process must not destroy each other,
and ``--rename-conflicting`` must leave every reference on the right copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.restore.apply import IN_PROGRESS, OWNER_PREFIX
from qubes_backup_dom0.restore.machine import Restore, RestoreOptions
from qubes_backup_sim import simgen

from .harness import (
    BIN,
    PASSPHRASE,
    POOL,
    VM,
    World,
    backup_vm_names,
    clone_target,
    fresh_target,
    home_staging,
    run_restore,
    vm_state,
)

# What another process's restore runs at its start: the leftover cleanup (VMs and dom0-home staging).
CLEANUP = """
import sys
from pathlib import Path
from qubes_backup_dom0.restore.apply import cleanup_home_staging, cleanup_leftovers
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.qubes.system import System
s = System(Path(sys.argv[1]), Path(sys.argv[1]) / "dom0", "user")
print(len(cleanup_leftovers(Qubes(s))), len(cleanup_home_staging(s.home_dir)))
"""


def _no_tags_of_ours(system: System) -> None:
    for name, (_c, _s, tags) in vm_state(system).items():
        assert IN_PROGRESS not in tags and not any(t.startswith(OWNER_PREFIX) for t in tags), (name, tags)


def test_second_open_while_first_transfers_leaves_it_alone(world: World) -> None:
    """A second restore opened (in this process), and another process's leftover cleanup, while a first
    restore is transferring (its VMs created and tagged in progress, dom0's home in its staging): neither
    removes the first one's VMs or staging, and the first one completes."""
    system = clone_target(world, "two-restores")
    seen: dict[str, object] = {}

    def progress(done: int, total: int) -> None:
        staging = home_staging(system)
        if seen or not staging or first.applier is None:
            return
        created = list(first.applier.created)
        second = Restore(system, world.a_location, PASSPHRASE, source_vm=VM)
        try:
            second.open()
            errors = second.plan().errors  # the first one's VMs exist: the second one sees conflicts
        finally:
            second.close()
        other = subprocess.run([sys.executable, "-c", CLEANUP, str(system.sim_dir)], capture_output=True,
                               text=True, timeout=60, check=True)  # fmt: skip
        seen.update(created=created, staging=staging, errors=errors, other=other.stdout.split(),
                    vms_after=set(vm_state(system)), staging_after=home_staging(system))  # fmt: skip

    first = Restore(system, world.a_location, PASSPHRASE, source_vm=VM, progress=progress)
    try:
        first.open()
        first.plan()
        first.run()
    finally:
        first.close()
    assert seen, "the first restore never reached the point where both its VMs and staging exist"
    assert len(seen["created"]) == len(backup_vm_names(world))  # type: ignore[arg-type]
    assert set(seen["created"]) <= seen["vms_after"]  # type: ignore[call-overload, operator]
    assert seen["staging_after"] == seen["staging"]
    assert seen["errors"], "the second restore should have seen the first one's VMs as existing"
    assert seen["other"] == ["0", "0"], seen["other"]
    assert set(first.restored) == backup_vm_names(world)
    assert set(vm_state(system)) == {"dom0", VM, *backup_vm_names(world)}
    _no_tags_of_ours(system)
    assert not home_staging(system) and first.home_restored_to is not None


def _tag_origins(q: Qubes) -> None:
    for name, (klass, _state) in q.vm_list().items():
        if klass != "AdminVM" and name != VM:
            q.set_tag(name, f"origin-{name}")


def _origin(q: Qubes, vm: str | None) -> str | None:
    """Which VM of the backup ``vm`` (a name on the target) is a copy of; None for a VM of the target."""
    if not vm:
        return None
    tags = [t for t in q.tags(vm) if t.startswith("origin-")]
    return tags[0][len("origin-") :] if tags else None


def test_rename_conflicting_keeps_references_on_the_right_copies(tmp_path: Path) -> None:
    """Backup with sys-firewall and sys-firewall1 (and VMs using each, explicitly), restored where
    sys-firewall (and its template and netvm) exist: every restored reference (template, netvm) names the
    copy of the VM it named in the backup, and the plan's table shows those real, renamed names."""
    src_dir = tmp_path / "src"
    simgen.generate(src_dir, "small", pool=POOL, apparent_gib=0.1)
    src = System(src_dir.resolve(), src_dir.resolve() / "dom0", "user")
    qs = Qubes(src)
    qs.create_vm("AppVM", "sys-firewall1", "green", "fedora-41")
    qs.set_property("sys-firewall1", "provides_network", "True")
    qs.set_property("sys-firewall1", "netvm", "sys-net")
    qs.set_property("work", "netvm", "sys-firewall")
    qs.set_property("personal", "netvm", "sys-firewall1")
    _tag_origins(qs)
    explicit = {name: {p: v.value for p, v in qs.properties(name).items() if p in ("template", "netvm")
                       and not v.default}
                for name, (klass, _s) in qs.vm_list().items() if klass != "AdminVM" and name != VM}  # fmt: skip
    assert explicit["work"]["netvm"] == "sys-firewall" and explicit["personal"]["netvm"] == "sys-firewall1"
    (src.dom0_root / "pw").write_bytes(PASSPHRASE + b"\n")
    subprocess.run([str(BIN / "qvm-backup"), "-q", "-y", "-d", VM, "-p", "/pw", "--kdf-n", "1024", "--weak-kdf-ok",
                    "/home/user/backups"], env={**os.environ, "QUBES_SIM": str(src.sim_dir)}, check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    (backup,) = (src.vm_root(VM) / "home/user/backups").glob("qubes-backup-*")
    dst = fresh_target(tmp_path / "dst", keep=(VM, "fedora-41", "sys-net", "sys-firewall"))
    (dst.vm_root(VM) / "home/user/backups").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(backup, dst.vm_root(VM) / "home/user/backups" / backup.name)

    everything = RestoreOptions(rename_conflicting=True, restore_devices=True, restore_risky_settings=True)
    job = run_restore(dst, f"/home/user/backups/{backup.name}", options=everything)
    plan = job.restore_plan
    assert plan is not None
    renames = plan.renames
    assert renames["sys-firewall"] not in ("sys-firewall", "sys-firewall1"), renames
    assert "sys-firewall1" not in renames  # no conflict here: the backup's own sys-firewall1 keeps its name
    restored = {a.name for a in plan.vms if a.restore}
    assert {"sys-firewall", "sys-firewall1", "work", "personal"} <= restored
    qd = Qubes(dst)
    copies = {_origin(qd, name): name for name in qd.vm_list()}
    assert restored <= set(copies), copies
    for backup_name, props in ((n, p) for n, p in explicit.items() if n in restored):
        target_name = renames.get(backup_name, backup_name)
        assert copies[backup_name] == target_name
        here = qd.properties(target_name)
        for prop, value in props.items():
            assert _origin(qd, here[prop].value) == (value or None), (backup_name, target_name, prop, here[prop].value)
        action = next(a for a in plan.vms if a.name == backup_name)
        for prop, value in props.items():  # the table shows the renamed references
            shown = renames.get(value, value) if value else None  # an explicit "none" shows as none
            assert getattr(action, prop) == shown, (backup_name, prop, getattr(action, prop))
    _no_tags_of_ours(dst)
