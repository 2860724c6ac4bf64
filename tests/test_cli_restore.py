"""qvm-backup-restore through the real console script, the real qubes.Restore agent and the simulated qubesd
(issue 3, item 8; issue 9).

The brief's use cases A-D (B and D on lvm_thin, file-reflink and file pools, a running VM among the backed-up
ones), a backup of a system shaped like the reference qubes.xml, verify-only (which must notice missing data),
wrong passphrase, conflicts, dom0's home, and the Python API with progress and cancellation.  Restored VMs
are compared with the source through qubes.xml, their firewall, notes and the committed data of their volumes
(``conftest.assert_same_vm``).  After every failing restore dom0 must be as before: the same VMs, qubes.xml
the same document, the same files and volumes, no staging directory, no VM left in progress.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    BIN,
    IN_PROGRESS,
    PASSPHRASE,
    POOL,
    POOL_KINDS,
    RELEASE,
    RELEASES,
    VM_BACKUPS,
    Sim,
    SourceBackups,
    Unchanged,
    assert_restored_like,
    assert_same_vm,
    make_fresh,
    new_sim,
    one_error_line,
    share_backup,
    snapshot_tree,
    vm_metadata,
)
from lxml import etree
from qubes_backup_dom0.errors import BackupError, Cancelled
from qubes_backup_dom0.qubes import firewall
from qubes_backup_dom0.qubes.interface import Qubes, VolumeImport
from qubes_backup_dom0.restore import apply
from qubes_backup_dom0.restore.machine import Restore, RestoreOptions
from qubes_backup_sim import endpoints

__all__ = ["assert_same_vm"]  # test_s3 and test_ssh compare restored VMs with it

SAMPLE_XML = Path(__file__).parent / "data" / "qubes-r4-sample.xml"
#: The VM each pool kind's source system has running while it is backed up (a file pool cannot be read
#: while its VM runs, so that source has none).
RUNNING = {"lvm_thin": ("sys-firewall",), "file-reflink": ("sys-firewall",), "file": ()}

BackupOf = Callable[[str], tuple[Sim, Path]]


def data_files(sim: Sim) -> set[Path]:
    """Every volume data file on the system: LV files and images (whatever qubes.xml says)."""
    lvs = {p for p in (sim.dom0 / "dev").glob("*/*") if p.is_file()}
    return lvs | set(sim.qubes_root.rglob("*.img"))


def file_state(path: Path) -> tuple[object, ...]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_blocks, hashlib.sha256(path.read_bytes()).hexdigest()


def vm_state(sim: Sim, name: str) -> tuple[bytes, dict[str, object], dict[str, tuple[object, ...]]]:
    """A VM as it is on a system: its qubes.xml entry, its volumes' files and its directory."""
    files = {vol: file_state(path) for vol, path in sim.volume_files(name).items()}
    return domain_xml(sim, name), files, snapshot_tree(sim.vm_dir(name))


@pytest.fixture(scope="session")
def backup_of(tmp_path_factory: pytest.TempPathFactory, source_backups: SourceBackups) -> BackupOf:
    """A full backup of the small system (of RELEASE) built on a pool kind (one per kind, made once)."""
    made: dict[str, tuple[Sim, Path]] = {POOL: source_backups(RELEASE)}

    def get(pool: str) -> tuple[Sim, Path]:
        if pool not in made:
            src = new_sim(tmp_path_factory.mktemp(pool) / "sim", pool=pool, running=RUNNING[pool])
            made[pool] = src, src.backup_to_vm()
        return made[pool]

    return get


def fresh_for(tmp_path: Path, backup: tuple[Sim, Path]) -> tuple[Sim, str]:
    src, path = backup
    dst = make_fresh(tmp_path / "fresh", src)
    share_backup(path, dst)
    return dst, f"{VM_BACKUPS}/{path.name}"


def assert_running_vm_restored_committed(src: Sim, dst: Sim, vm: str = "sys-firewall") -> None:
    """A VM that ran during the backup comes back with its committed data, not what it wrote since."""
    for vol, committed in src.volume_files(vm).items():
        running = committed.with_name(committed.name + "-snap") if src.pool_kind == "lvm_thin" else \
            committed.with_name(committed.stem + "-dirty.img")  # fmt: skip
        assert running.is_file(), running
        restored = dst.volume_files(vm)[vol]
        assert restored.read_bytes() == committed.read_bytes() != running.read_bytes(), (vm, vol)


def domain_xml(sim: Sim, name: str) -> bytes:
    dom = sim.collection().get(name)
    assert dom is not None
    return etree.tostring(dom.element)


def assert_roots_follow_templates(sim: Sim) -> None:
    """Every AppVM's root snapshot source is its (effective) template's root volume on this system."""
    coll = sim.collection()
    for dom in coll.domains:
        template = coll.get(coll.effective_template(dom) or "")
        if dom.klass != "AppVM" or template is None:
            continue
        roots = (vel for vel in dom.element.iterfind("volume-config/volume") if vel.get("name") == "root")
        sources = [vel.get("source") for vel in roots]
        troot = [v.vid for v in template.volumes if v.name == "root"]
        assert sources == troot, (dom.name, sources, troot)


def fails(r: object, *words: str) -> str:
    assert r.returncode != 0, r.stdout  # type: ignore[attr-defined]
    line = one_error_line(r.stderr)  # type: ignore[attr-defined]
    for w in words:
        assert w in line, line
    return line


def rewrite_tar(src: Path, dst: Path, drop: set[str] = frozenset(), truncate_at: int | None = None) -> None:
    """A damaged copy of a backup: some members left out (re-written as a valid tar), or cut short."""
    if truncate_at is not None:
        dst.write_bytes(src.read_bytes()[:truncate_at])
        return
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for member in tin:
            if member.name in drop:
                continue
            data = tin.extractfile(member)
            assert data is not None
            tout.addfile(member, io.BytesIO(data.read()))


def chunk_members(backup: Path) -> list[str]:
    with tarfile.open(backup) as tar:
        return [n for n in tar.getnames() if re.fullmatch(r"vm\d+/\d{6}", n)]


# ---------------------------------------------------------------------------------------------- use cases

@pytest.mark.parametrize("release", RELEASES)
def test_a_full_restore_except_existing_sys_net_and_firewall(
    tmp_path: Path, source_backup: tuple[Sim, Path]
) -> None:
    """A: after a disk crash only sys-net and sys-firewall exist again; restore everything else."""
    src, backup = source_backup
    # the reinstalled service VMs, with their own (different) data: another seed
    dst = make_fresh(tmp_path / "crashed", src, keep=("dom0", "backupvm", "sys-net", "sys-firewall"), seed=1)
    share_backup(backup, dst)
    kept = {vm: vm_state(dst, vm) for vm in ("sys-net", "sys-firewall")}
    assert dst.volume_files("sys-net")["private"].read_bytes() != src.volume_files("sys-net")["private"].read_bytes()
    r = dst.restore("-d", "backupvm", "--skip-conflicting", f"{VM_BACKUPS}/{backup.name}")
    assert r.returncode == 0, r.stderr
    for vm, state in kept.items():
        assert vm_state(dst, vm) == state
    restored = [n for n in src.collection().names() if n not in ("dom0", "backupvm", "disp1234", "sys-net",
                                                                  "sys-firewall")]  # fmt: skip
    for vm in restored:
        assert_same_vm(src, vm, dst)
    assert sorted(dst.collection().names()) == sorted([*restored, "dom0", "backupvm", "sys-net", "sys-firewall"])
    assert dst.staging_dirs() == [] and dst.in_progress() == []


@pytest.mark.parametrize("pool", POOL_KINDS)
def test_b_full_restore_into_fresh_system(tmp_path: Path, backup_of: BackupOf, pool: str) -> None:
    """B: everything, sys-net included (it holds the Wi-Fi passwords), into a freshly installed system; on
    each pool kind, with sys-firewall running during the backup where the pool allows it."""
    src, _ = backup_of(pool)
    dst, location = fresh_for(tmp_path, backup_of(pool))
    assert dst.pool_kind == pool
    r = dst.restore("-d", "backupvm", location)
    assert r.returncode == 0, r.stderr
    vms = [d.name for d in src.collection().domains if d.include_in_backups and d.name != "dom0"]
    assert "sys-net" in vms
    for vm in vms:
        assert_same_vm(src, vm, dst)
    if RUNNING[pool]:
        assert_running_vm_restored_committed(src, dst)
    got, orig = dst.collection(), src.collection()
    for vm in vms:
        a, b = orig[vm], got[vm]
        assert (b.klass, b.netvm, b.label) == (a.klass, a.netvm, a.label), vm
        assert got.effective_template(b) == orig.effective_template(a), vm
    # dom0's home came back beside the (empty) current one, never over it.
    homes = list(dst.home.glob("home-restore-*"))
    assert len(homes) == 1
    assert snapshot_tree(homes[0]).keys() == snapshot_tree(src.home).keys()
    assert dst.staging_dirs() == [] and dst.in_progress() == []
    assert_roots_follow_templates(dst)


@pytest.mark.parametrize("release", RELEASES)
def test_c_old_copy_beside_current_with_rename(same: tuple[Sim, str], source_backup: tuple[Sim, Path]) -> None:
    """C: restore an old copy of personal (and its template) beside the current ones."""
    dst, location = same
    src, _ = source_backup
    originals = {vm: vm_state(dst, vm) for vm in ("personal", "debian-12")}
    r = dst.restore("-d", "backupvm", "--rename-conflicting", location, "debian-12", "personal")
    assert r.returncode == 0, r.stderr
    coll = dst.collection()
    p1, t1 = coll.get("personal1"), coll.get("debian-121")
    assert p1 is not None and t1 is not None, coll.names()
    assert dst.volume_files("personal1")["private"].is_file()
    assert dst.volume_files("debian-121")["root"].is_file()
    assert p1.template == "debian-121"  # the dependant follows the rename
    assert p1.netvm == "sys-firewall"
    old = coll.get("personal")
    assert old is not None
    assert p1.qid != old.qid and p1.uuid != old.uuid
    assert len({d.qid for d in coll.domains}) == len(coll.domains)
    renames = {"personal": "personal1", "debian-12": "debian-121"}
    assert_same_vm(src, "personal", dst, "personal1", renames)
    assert_same_vm(src, "debian-12", dst, "debian-121", renames)
    assert_roots_follow_templates(dst)
    for vm, state in originals.items():
        assert vm_state(dst, vm) == state


@pytest.mark.parametrize("pool", POOL_KINDS)
def test_d_one_vm_out_of_many(tmp_path: Path, backup_of: BackupOf, pool: str) -> None:
    """D: a single VM; nothing else is restored, registered or imported."""
    src, _ = backup_of(pool)
    dst, location = fresh_for(tmp_path, backup_of(pool))
    before = data_files(dst)
    r = dst.restore("-d", "backupvm", location, "legacy-hvm")
    assert r.returncode == 0, r.stderr
    assert sorted(dst.collection().names()) == ["backupvm", "dom0", "legacy-hvm"]
    assert_same_vm(src, "legacy-hvm", dst)
    assert list(dst.home.glob("home-restore-*")) == []
    new = data_files(dst) - before
    assert set(dst.volume_files("legacy-hvm").values()) <= new
    # ... and whatever else appeared is legacy-hvm's (a revision the import kept, as Qubes' pools do)
    assert all(p.name.startswith("vm-legacy-hvm-") or p.parent.name == "legacy-hvm" for p in new), new
    assert sorted(p.name for p in (dst.qubes_root / "appvms").iterdir()) == ["backupvm", "legacy-hvm"]


def test_d_running_vm_alone(tmp_path: Path, backup_of: BackupOf) -> None:
    """D with the VM that was running during the backup (reflink pool: its -dirty image is never read)."""
    src, _ = backup_of("file-reflink")
    dst, location = fresh_for(tmp_path, backup_of("file-reflink"))
    r = dst.restore("-d", "backupvm", "--ignore-missing", location, "fedora-41", "sys-firewall")
    assert r.returncode == 0, r.stderr  # its netvm sys-net is missing here: this system's default (none)
    assert dst.collection()["sys-firewall"].netvm is None
    assert_running_vm_restored_committed(src, dst)
    for vol, path in src.volume_files("sys-firewall").items():
        assert_restored_like(path, dst.volume_files("sys-firewall")[vol])


def test_d_missing_template_is_an_error(fresh: tuple[Sim, str]) -> None:
    dst, location = fresh
    guard = Unchanged(dst)
    r = dst.restore("-d", "backupvm", location, "personal")
    fails(r, "personal", "debian-12")
    guard.check()


def test_d_skip_broken_and_ignore_missing(fresh: tuple[Sim, str], source_backup: tuple[Sim, Path]) -> None:
    src, _ = source_backup
    dst, location = fresh
    # personal lacks its template (debian-12) and netvm here: skipped; vault's (inherited) template fedora-41
    # is restored with it, so vault is complete.
    r = dst.restore("-d", "backupvm", "--skip-broken", location, "personal", "vault", "fedora-41")
    assert r.returncode == 0, r.stderr
    assert "personal" not in dst.collection().names() and "vault" in dst.collection().names()
    assert not (dst.qubes_root / "appvms/personal").exists()
    assert not any("personal" in p.name for p in data_files(dst))
    assert_same_vm(src, "vault", dst)
    # With --ignore-missing it is restored, its template/netvm replaced by this system's defaults.  A fresh
    # system has no default template until one is installed: without one it is refused, nothing written.
    guard = Unchanged(dst)
    fails(dst.restore("-d", "backupvm", "--ignore-missing", location, "personal"), "personal", "default template")
    guard.check()
    dst.set_global("default_template", "fedora-41")  # qubes-prefs default_template fedora-41
    r = dst.restore("-d", "backupvm", "--ignore-missing", location, "personal")
    assert r.returncode == 0, r.stderr
    personal = dst.collection().get("personal")
    assert personal is not None  # created without a template: qubesd gives it this system's default one
    assert personal.template == "fedora-41" and not personal.has_property("netvm")
    assert_roots_follow_templates(dst)
    assert_restored_like(src.volume_files("personal")["private"], dst.volume_files("personal")["private"])
    assert dst.collection()["personal"].features == src.collection()["personal"].features


# ---------------------------------------------------------------------------------------------- reference

def _add_backup_vm(sim: Sim) -> None:
    """The sample has no VM to back up into: add one (not backed up itself), as a user would have.  Its
    volumes shrink to 64 MiB: a restore streams every volume's full size into the import (70 GiB here)."""
    from lxml import etree

    tree = etree.parse(str(sim.qubes_xml))
    for vol in tree.getroot().iter("volume"):
        if vol.get("size"):
            vol.set("size", str(64 << 20))
    domains = tree.getroot().find("domains")
    assert domains is not None
    dom = etree.SubElement(domains, "domain", id="domain-99")
    dom.set("class", "AppVM")
    props = etree.SubElement(dom, "properties")
    for name, value in (("name", "backupvm"), ("qid", "99"), ("label", "label-1"), ("include_in_backups", "False"),
                        ("template", "fedora-25")):  # fmt: skip
        etree.SubElement(props, "property", name=name).text = value
    tree.write(str(sim.qubes_xml), xml_declaration=True, encoding="UTF-8")


def _sample_system(base: Path) -> tuple[Sim, list[str]]:
    """A Qubes root built from the reference qubes.xml: sparse images with a little data for every file-pool
    save_on_stop volume.  Returns the system and the VMs that can be backed up (no LVM volumes)."""
    sim = Sim(base)
    sim.qubes_root.mkdir(parents=True)
    sim.home.mkdir(parents=True)
    (sim.home / ".bashrc").write_text("# sample\n")
    (sim.dom0 / "pw").write_text(PASSPHRASE + "\n")
    sim.vm_backups.mkdir(parents=True)
    shutil.copy(SAMPLE_XML, sim.qubes_xml)
    endpoints.write(sim.dir)  # as simgen does: how dom0's code reaches the simulated qubesd, lvm ...
    _add_backup_vm(sim)
    coll = sim.collection()
    selectable = []
    for dom in coll.domains:
        vols = [v for v in dom.volumes if v.save_on_stop]
        if dom.klass == "AdminVM" or not vols:
            continue
        paths = [coll.volume_path(v, sim.qubes_root) for v in vols]
        if any(p is None for p in paths):
            continue  # LVM: not selectable in this simulation
        for i, (vol, path) in enumerate(zip(vols, paths, strict=True)):
            assert path is not None
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.truncate(vol.size or (64 << 20))
                for off in (0, 5 << 20, 40 << 20):
                    f.seek(off)
                    f.write(f"{dom.name}/{vol.name}/{i}/{off}".encode() * 500)
        rules = [f"action=accept proto=tcp dsthost={dom.name}.example.org dstports=443-443", "action=drop"]
        (path.parent / "firewall.xml").write_bytes(firewall.rules_to_xml(rules))
        selectable.append(dom.name)
    return sim, selectable


def test_backup_of_reference_shaped_system_restores(tmp_path: Path) -> None:
    src, selectable = _sample_system(tmp_path / "ref")
    assert len(selectable) >= 4
    backup = src.backup_to_vm(*selectable)
    dst = make_fresh(tmp_path / "fresh", src, keep=("dom0", "backupvm"))
    share_backup(backup, dst)
    r = dst.restore("-d", "backupvm", "--ignore-missing", f"{VM_BACKUPS}/{backup.name}")
    assert r.returncode == 0, r.stderr
    coll = dst.collection()
    colors = {el.text: el.get("color") for el in coll.root.iterfind("labels/label")}
    src_colors = {el.text: el.get("color") for el in src.collection().root.iterfind("labels/label")}
    assert "scarlet" in colors and colors["scarlet"] == src_colors["scarlet"], colors
    for vm in selectable:  # restored into this system's default pool, whatever the sample's pools were
        a, b = src.collection().get(vm), coll.get(vm)
        assert a is not None and b is not None
        # a label this system lacks (the sample's "scarlet", made with admin.label.Create) is made again
        assert b.klass == a.klass and b.label == a.label
        # Qubes' own backup bookkeeping (backup-content/-path/-size) is not restored; everything else is
        assert b.features == {k: v for k, v in a.features.items() if not k.startswith("backup-")}
        assert vm_metadata(dst, vm)["firewall"] == vm_metadata(src, vm)["firewall"] != ["action=accept"]
        vols = src.volume_files(vm)  # (test-hvm's root is not save_on_stop there; here it is, and empty)
        assert vols.keys() <= dst.volume_files(vm).keys()
        for vol, path in vols.items():
            assert_restored_like(path, dst.volume_files(vm)[vol])


# ---------------------------------------------------------------------------------------------- failures

def test_wrong_passphrase(fresh: tuple[Sim, str]) -> None:
    dst, location = fresh
    (dst.dom0 / "bad").write_text("not the passphrase\n")
    guard = Unchanged(dst)
    r = dst.run("qvm-backup-restore", "-y", "-p", "/bad", "-d", "backupvm", location)
    line = fails(r, "passphrase")
    assert r.returncode == 3, line
    guard.check()


def test_conflicts_refused_without_flags(same: tuple[Sim, str]) -> None:
    dst, location = same
    guard = Unchanged(dst)
    r = dst.restore("-d", "backupvm", location)
    fails(r, "already exists", "--skip-conflicting")
    guard.check()


def test_verify_only_good_backup_writes_nothing(same: tuple[Sim, str]) -> None:
    dst, location = same
    guard = Unchanged(dst)
    r = dst.restore("-d", "backupvm", "--verify-only", location)
    assert r.returncode == 0, r.stderr
    assert "Backup verified" in r.stdout and "nothing was written" in r.stdout
    guard.check()


def _damaged(sim: Sim, backup: Path, kind: str) -> str:
    out = sim.vm_backups / f"damaged-{kind}"
    members = chunk_members(backup)
    if kind == "missing-chunk":
        victim = members[len(members) // 2]
        rewrite_tar(backup, out, drop={victim, victim + ".hmac"})
    elif kind == "missing-vm":  # a whole VM's data, trailer included
        archive = members[len(members) // 2].split("/")[0]
        with tarfile.open(backup) as tar:
            drop = {n for n in tar.getnames() if n.startswith(archive + "/")}
        rewrite_tar(backup, out, drop=drop)
    else:
        rewrite_tar(backup, out, truncate_at=backup.stat().st_size * 2 // 3 // 512 * 512)
    return f"{VM_BACKUPS}/{out.name}"


@pytest.mark.parametrize("kind", ["missing-chunk", "missing-vm", "truncated"])
@pytest.mark.parametrize("verify", [True, False], ids=["verify-only", "restore"])
def test_damaged_backup_fails_and_changes_nothing(
    fresh: tuple[Sim, str], source_backup: tuple[Sim, Path], kind: str, verify: bool
) -> None:
    dst, _ = fresh
    location = _damaged(dst, source_backup[1], kind)
    guard = Unchanged(dst)
    args = ["--verify-only"] if verify else []
    r = dst.restore("-d", "backupvm", *args, location)
    line = fails(r)
    assert re.search(r"damaged|tampered|truncated|ends too early|ended|end of data|missing", line), line
    guard.check()


def test_unknown_vm_and_missing_file(fresh: tuple[Sim, str]) -> None:
    dst, location = fresh
    guard = Unchanged(dst)
    fails(dst.restore("-d", "backupvm", location, "nosuchvm"), "nosuchvm")
    fails(dst.restore("-d", "backupvm", f"{VM_BACKUPS}/nothing-here"), "nothing-here")
    fails(dst.restore("/nothing-here"), "/nothing-here")
    fails(dst.restore("-d", "nosuchvm", location), "nosuchvm")
    guard.check()


# ---------------------------------------------------------------------------------------------- dom0 home

def test_dom0_home_goes_to_new_directory(same: tuple[Sim, str]) -> None:
    dst, location = same
    before = snapshot_tree(dst.home)
    r = dst.restore("-d", "backupvm", "--skip-conflicting", location)
    assert r.returncode == 0, r.stderr
    homes = sorted(dst.home.glob("home-restore-*"))
    assert len(homes) == 1
    now = snapshot_tree(dst.home)
    assert {k: v for k, v in now.items() if not k.startswith("home-restore-")} == before
    restored = snapshot_tree(homes[0])
    assert restored.keys() == before.keys()
    for rel, info in before.items():
        if info[0] == "file":
            assert restored[rel][5] == info[5] or info[5] == "", rel  # same hash (small files)
    assert f"dom0 home restored to /home/user/{homes[0].name}" in r.stdout


def test_skip_dom0_home(fresh: tuple[Sim, str]) -> None:
    dst, location = fresh
    r = dst.restore("-d", "backupvm", "--skip-dom0-home", location, "vault", "fedora-41")
    assert r.returncode == 0, r.stderr
    assert list(dst.home.iterdir()) == []
    # Asking for dom0 explicitly while skipping its home leaves nothing to do: refused, nothing written.
    r = dst.restore("-d", "backupvm", "--skip-dom0-home", location, "dom0")
    assert r.returncode != 0 and "nothing to restore" in r.stderr
    assert list(dst.home.iterdir()) == []


def test_restore_from_dom0_file(tmp_path: Path, source_backup: tuple[Sim, Path]) -> None:
    src, backup = source_backup
    dst = make_fresh(tmp_path / "fresh", src)
    (dst.dom0 / "backups").mkdir()
    os.link(backup, dst.dom0 / "backups" / backup.name)
    r = dst.restore(f"/backups/{backup.name}", "vault", "fedora-41")  # vault inherits fedora-41 as template
    assert r.returncode == 0, r.stderr
    assert_same_vm(src, "vault", dst)


# ---------------------------------------------------------------------------------------------- the API

def test_api_progress_and_result(fresh: tuple[Sim, str], source_backup: tuple[Sim, Path]) -> None:
    dst, location = fresh
    seen: list[tuple[int, int]] = []
    options = RestoreOptions(vms=("fedora-41", "work"), restore_devices=True)  # work has a block device
    job = Restore(dst.system, location, PASSPHRASE.encode(), source_vm="backupvm", options=options,
                  progress=lambda d, t: seen.append((d, t)))  # fmt: skip
    try:
        manifest = job.open()
        assert {a.vm for a in manifest.archives} >= {"work", "fedora-41"}
        plan = job.plan()
        assert [v.name for v in plan.vms if v.restore] == ["fedora-41", "work"]
        job.run()
    finally:
        job.close()
    assert job.restored == ["fedora-41", "work"]
    assert seen, "no progress reported"
    done = [d for d, _ in seen]
    assert done == sorted(done) and all(t == plan.data for _, t in seen) and done[-1] <= plan.data
    assert_same_vm(source_backup[0], "work", dst)


@pytest.fixture(scope="module")
def big_backup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Sim, Path]:
    """A backup with enough incompressible data in many 1 MiB chunks that a restore can be caught mid-way."""
    src = new_sim(tmp_path_factory.mktemp("big") / "sim", data_mib=48, compressible=0.0)
    r = src.backup("--chunk-size", str(1 << 20), "-Z", "none", "-d", "backupvm", VM_BACKUPS)
    assert r.returncode == 0, r.stderr
    return src, next(src.vm_backups.glob("qubes-backup-*"))


@pytest.mark.parametrize("how", ["callback", "thread"])
def test_api_cancel_leaves_dom0_unchanged(tmp_path: Path, big_backup: tuple[Sim, Path], how: str) -> None:
    src, backup = big_backup
    dst = make_fresh(tmp_path / "fresh", src)
    share_backup(backup, dst)
    guard = Unchanged(dst)
    calls = []
    job = Restore(dst.system, f"{VM_BACKUPS}/{backup.name}", PASSPHRASE.encode(), source_vm="backupvm")
    started = threading.Event()

    def progress(done: int, total: int) -> None:
        calls.append(done)
        started.set()
        if how == "callback" and len(calls) == 3:
            job.cancel()

    job.progress = progress
    if how == "thread":
        threading.Thread(target=lambda: started.wait(30) and job.cancel(), daemon=True).start()
    job.open()
    job.plan()
    with pytest.raises(BackupError) as info:
        job.run()
    job.close()
    assert isinstance(info.value, Cancelled) or "cancel" in str(info.value), info.value
    guard.check()
    assert sorted(dst.collection().names()) == ["backupvm", "dom0"] and dst.in_progress() == []


def test_exclude_on_restore(fresh: tuple[Sim, str]) -> None:
    dst, location = fresh
    r = dst.restore("-d", "backupvm", "-x", "work", "-x", "dom0", location)
    assert r.returncode == 0, r.stderr
    names = dst.collection().names()
    assert "work" not in names and "personal" in names and "sys-net" in names
    assert not (dst.qubes_root / "appvms/work").exists()
    assert not any(p.name.startswith(("vm-work-", "work")) for p in data_files(dst))
    assert list(dst.home.iterdir()) == []


def test_verify_only_ignores_missing_dependencies(fresh: tuple[Sim, str]) -> None:
    """Verifying one VM needs nothing on this system: its template need not exist here."""
    dst, location = fresh
    guard = Unchanged(dst)
    r = dst.restore("-d", "backupvm", "--verify-only", location, "personal")
    assert r.returncode == 0, r.stderr
    guard.check()


def test_c_rename_chain_follows_netvm_and_standalone(same: tuple[Sim, str], source_backup: tuple[Sim, Path]) -> None:
    """Renamed netvms are followed by the renamed VMs using them; a StandaloneVM keeps both its images."""
    dst, location = same
    src, _ = source_backup
    before = dst.collection()
    r = dst.restore("-d", "backupvm", "--rename-conflicting", location, "sys-net", "sys-firewall", "untrusted",
                    "legacy-hvm")  # fmt: skip
    assert r.returncode == 0, r.stderr
    coll = dst.collection()
    fw, net, untrusted = coll.get("sys-firewall1"), coll.get("sys-net1"), coll.get("untrusted1")
    assert fw is not None and net is not None and untrusted is not None, coll.names()
    assert fw.netvm == "sys-net1"
    # untrusted inherits the default netvm (sys-firewall, which exists here): it keeps inheriting it.
    assert coll.effective_netvm(untrusted) == "sys-firewall"
    renames = {vm: vm + "1" for vm in ("sys-net", "sys-firewall", "untrusted", "legacy-hvm")}
    for vm, new in renames.items():
        assert_same_vm(src, vm, dst, new, renames)
    assert {"root", "private"} <= set(dst.volume_files("legacy-hvm1"))
    # The originals (and the global properties) are untouched.
    for name in before.names():
        assert etree.tostring(before.get(name).element) == domain_xml(dst, name)
    assert coll.global_properties == before.global_properties
    assert_roots_follow_templates(dst)


def test_c_renamed_template_copy_and_vm_inheriting_the_default(same: tuple[Sim, str]) -> None:
    """vault inherits the default template; restored beside the current one together with an old copy of
    that template (renamed), it uses that copy (restore_plan: an inherited template restored with the VM
    under another name pins the VM to it) and starts from that copy's root."""
    dst, location = same
    r = dst.restore("-d", "backupvm", "--rename-conflicting", location, "fedora-41", "vault")
    assert r.returncode == 0, r.stderr
    coll = dst.collection()
    vault1 = coll.get("vault1")
    assert vault1 is not None and coll.get("fedora-411") is not None
    # Its disks belong to the template it was backed up with: pinned to the restored copy of it, not left
    # to inherit this system's default, and its root follows that copy.
    assert vault1.template == "fedora-411" and coll.effective_template(vault1) == "fedora-411"
    assert_roots_follow_templates(dst)


def test_api_home_target_taken_is_not_overwritten(fresh: tuple[Sim, str]) -> None:
    """The home-restore-<time> name already exists (two restores in one second): restore beside it."""
    dst, location = fresh
    job = Restore(dst.system, location, PASSPHRASE.encode(), source_vm="backupvm",
                  options=RestoreOptions(vms=("dom0",)))  # fmt: skip
    try:
        job.open()
        plan = job.plan()
        assert plan.home_target is not None
        taken = dst.home / plan.home_target
        taken.mkdir()
        (taken / "mine").write_text("the user's\n")
        job.run()
    finally:
        job.close()
    assert [p.name for p in taken.iterdir()] == ["mine"]
    assert job.home_restored_to is not None and job.home_restored_to != taken
    assert job.home_restored_to.parent == dst.home and (job.home_restored_to / ".bashrc").exists()


def test_d_inherited_default_template_missing_is_reported(fresh: tuple[Sim, str]) -> None:
    dst, location = fresh
    guard = Unchanged(dst)
    r = dst.restore("-d", "backupvm", location, "work")  # work inherits default_template fedora-41 (absent)
    fails(r, "work", "fedora-41")
    guard.check()


def test_passphrase_on_stdin(fresh: tuple[Sim, str]) -> None:
    dst, location = fresh
    r = subprocess.run(
        [str(BIN / "qvm-backup-restore"), "-y", "-p", "-", "--verify-only", "-d", "backupvm", location, "vault"],
        env=dst.env(), input=PASSPHRASE + "\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def _importing(sim: Sim) -> bool:
    """An import into a VM being restored has written data (its -import LV / image is being filled)."""
    if not sim.in_progress():
        return False
    files = [*(sim.dom0 / "dev").glob("*/*-import"), *sim.qubes_root.rglob("*-import.img")]
    return any(p.stat().st_blocks > 2048 for p in files if p.exists())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["int", "term", "kill"])
def test_interrupted_restore_leaves_dom0_unchanged(
    tmp_path: Path, big_backup: tuple[Sim, Path], sig: signal.Signals
) -> None:
    src, backup = big_backup
    dst = make_fresh(tmp_path / "fresh", src)
    share_backup(backup, dst)
    guard = Unchanged(dst)
    proc = dst.popen("qvm-backup-restore", "-y", "-p", "/pw", "-d", "backupvm", f"{VM_BACKUPS}/{backup.name}")
    try:
        deadline = time.monotonic() + 30
        while not _importing(dst):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    if sig == signal.SIGKILL:
        # Nothing runs after kill -9: the VMs it created stay, tagged in progress (Qubes will not start
        # them), until the next restore removes them before it does anything else.
        left = dst.in_progress()
        assert left and set(dst.collection().names()) == {"dom0", "backupvm", *left}
        assert all(any(t.startswith(apply.OWNER_PREFIX) for t in dst.collection()[vm].tags) for vm in left)
        r = dst.restore("-d", "backupvm", f"{VM_BACKUPS}/{backup.name}", "vault", "fedora-41")
        assert r.returncode == 0, r.stderr
        assert dst.staging_dirs() == [] and dst.in_progress() == []
        assert sorted(dst.collection().names()) == ["backupvm", "dom0", "fedora-41", "vault"]
        # nothing of the killed restore's VMs is left: every volume file is one of the VMs that exist now
        ours = re.compile(r"vm-(backupvm|vault|fedora-41)-(private|root|volatile)(-[0-9]+-back)?")
        for path in data_files(dst):
            assert ours.fullmatch(path.name) or path.parent.name in ("backupvm", "vault", "fedora-41"), path
        for vm in ("vault", "fedora-41"):
            assert_same_vm(src, vm, dst)
        return
    assert one_error_line(err).endswith("interrupted"), err
    guard.check()


def test_restored_data_is_durable_before_the_commit(
    fresh: tuple[Sim, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Durability, now that qubesd owns qubes.xml: every volume import finished (the import service syncs its
    data before qubesd commits it, see the next test) before the in-progress tags are removed, the commit;
    dom0's home staging is fsynced (every file and directory, by inode) before it is renamed into place."""
    dst, location = fresh
    synced: set[tuple[int, int]] = set()
    events: list[str] = []
    at_rename: list[set[tuple[int, int]]] = []
    real_fsync, real_rename = os.fsync, os.rename
    real_finish, real_remove_tag = VolumeImport.finish, Qubes.remove_tag

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))
        real_fsync(fd)

    def rename(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
        if Path(b).parent == dst.home:
            at_rename.append(set(synced))
        real_rename(a, b)

    def finish(self: VolumeImport) -> None:
        real_finish(self)
        events.append(f"import {self.vm}/{self.volume}")

    def remove_tag(self: Qubes, vm: str, tag: str) -> None:
        events.append(f"untag {vm} {tag}")
        real_remove_tag(self, vm, tag)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(apply.os, "rename", rename)
    monkeypatch.setattr(VolumeImport, "finish", finish)
    monkeypatch.setattr(Qubes, "remove_tag", remove_tag)
    job = Restore(dst.system, location, PASSPHRASE.encode(), source_vm="backupvm",
                  options=RestoreOptions(vms=("dom0", "fedora-41", "work")))  # fmt: skip
    stats: dict[Path, tuple[int, int, bool]] = {}
    real_fsync_tree = apply._fsync_tree

    def fsync_tree(tree: Path) -> None:
        real_fsync_tree(tree)
        for p in [tree, *tree.rglob("*")]:
            st = p.lstat()
            stats[p] = (st.st_dev, st.st_ino, p.is_symlink())

    monkeypatch.setattr(apply, "_fsync_tree", fsync_tree)
    try:
        job.open()
        job.plan()
        job.run()
    finally:
        job.close()
    assert job.restored == ["fedora-41", "work"] and job.home_restored_to is not None
    imports = [i for i, e in enumerate(events) if e.startswith("import ")]
    untags = [i for i, e in enumerate(events) if e.endswith(f" {IN_PROGRESS}")]
    assert {events[i] for i in imports} == {"import fedora-41/root", "import fedora-41/private",
                                             "import work/private"}  # fmt: skip
    assert untags and max(imports) < min(untags)
    assert len(at_rename) == 1 and len(stats) >= 4
    for path, (dev, ino, link) in stats.items():
        assert link or (dev, ino) in at_rename[0], f"{path} not fsynced before the rename"


def _load_import_service() -> object:
    path = Path(apply.__file__).parents[3] / "sim/qubes_backup_sim/rpc/admin.vm.volume.ImportWithSize"
    loader = importlib.machinery.SourceFileLoader("sim_import_service", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_sim_import_service_syncs_before_qubesd_commits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulated admin.vm.volume.ImportWithSize writes the data, fdatasyncs it, and only then asks
    qubesd to commit (ImportEnd ok): a crash after the commit cannot lose the imported volume."""
    service = _load_import_service()
    target = tmp_path / "vm-x-private-import"
    target.write_bytes(b"")
    data = os.urandom(3 << 20)[: (1 << 20) + 17] + bytes(2 << 20) + b"tail"
    events: list[str] = []

    def qubesd(method: str, arg: str, dest: str, payload: bytes) -> bytes:
        events.append(f"{method} {dest}/{arg} {payload[:2].decode()}")
        return b"0\0" + (f"{len(data)} {target}".encode() if method.endswith("ImportBegin") else b"")

    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        assert os.path.samestat(os.fstat(fd), target.stat())
        events.append("fdatasync")
        real_fdatasync(fd)

    monkeypatch.setattr(service, "qubesd", qubesd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(sys, "argv", ["admin.vm.volume.ImportWithSize", "private"])
    monkeypatch.setenv("QREXEC_REQUESTED_TARGET", "x")
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f"{len(data)}\n".encode() + data)))
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out))
    assert service.main() == 0  # type: ignore[attr-defined]
    sys.stdout.flush()
    assert out.getvalue() == b"0\0"
    assert events == [f"internal.vm.volume.ImportBegin x/private {str(len(data))[:2]}", "fdatasync",
                      "internal.vm.volume.ImportEnd x/private ok"]  # fmt: skip
    assert target.read_bytes() == data
    assert target.stat().st_blocks * 512 < len(data) - (1 << 20)  # the zeros were not written
