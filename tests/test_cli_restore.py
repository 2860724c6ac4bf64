"""qvm-backup-restore through the real console script and the real qubes.Restore agent (issue 3, item 8).

The brief's use cases A-D, a backup of a system shaped like the reference qubes.xml, verify-only (which
must notice missing data), wrong passphrase, conflicts, dom0's home, and the Python API with progress and
cancellation.  After every failing restore dom0 must be exactly as before: same qubes.xml bytes, same files,
no staging directory.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    BIN,
    PASSPHRASE,
    VM_BACKUPS,
    Sim,
    Unchanged,
    assert_restored_like,
    make_fresh,
    new_sim,
    one_error_line,
    share_backup,
    snapshot_tree,
)
from lxml import etree
from qubes_backup_dom0.errors import BackupError, Cancelled
from qubes_backup_dom0.qubesxml import Collection
from qubes_backup_dom0.restore import Restore, RestoreOptions

SAMPLE_XML = Path(__file__).parent / "data" / "qubes-r4-sample.xml"


def vm_files(sim: Sim, name: str) -> dict[str, Path]:
    """Relative path -> file for everything in a VM's directory (images and small files)."""
    coll = sim.collection()
    dom = coll.get(name)
    assert dom is not None, name
    vm_dir = sim.qubes_root / coll.vm_dir(dom)
    return {p.relative_to(vm_dir).as_posix(): p for p in sorted(vm_dir.rglob("*")) if p.is_file()}


def assert_same_vm(src: Sim, name: str, dst: Sim, new_name: str | None = None) -> None:
    """Every file of VM ``name`` in ``src`` is in ``dst`` (as ``new_name``) with the same bytes and holes."""
    a, b = vm_files(src, name), vm_files(dst, new_name or name)
    assert set(a) == set(b), (name, set(a) ^ set(b))
    assert any(k.endswith(".img") for k in a)
    for rel, path in a.items():
        assert_restored_like(path, b[rel])


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

def test_a_full_restore_except_existing_sys_net_and_firewall(
    tmp_path: Path, source_backup: tuple[Sim, Path]
) -> None:
    """A: after a disk crash only sys-net and sys-firewall exist again; restore everything else."""
    src, backup = source_backup
    dst = make_fresh(tmp_path / "crashed", src, keep=("dom0", "backupvm", "sys-net", "sys-firewall"))
    for vm in ("sys-net", "sys-firewall"):  # the reinstalled service VMs, with their own (different) data
        d = dst.qubes_root / "appvms" / vm
        d.mkdir(parents=True)
        with open(d / "private.img", "wb") as f:
            f.truncate(16 << 20)
            f.write(b"fresh install " + vm.encode())
    share_backup(backup, dst)
    kept = {vm: (domain_xml(dst, vm), snapshot_tree(dst.qubes_root / "appvms" / vm)) for vm in ("sys-net",
                                                                                           "sys-firewall")}
    r = dst.restore("-d", "backupvm", "--skip-conflicting", f"{VM_BACKUPS}/{backup.name}")
    assert r.returncode == 0, r.stderr
    for vm, (xml, files) in kept.items():
        assert domain_xml(dst, vm) == xml
        assert snapshot_tree(dst.qubes_root / "appvms" / vm) == files
    restored = [n for n in src.collection().names() if n not in ("dom0", "backupvm", "disp1234", "sys-net",
                                                                  "sys-firewall")]  # fmt: skip
    for vm in restored:
        assert_same_vm(src, vm, dst)
    assert sorted(dst.collection().names()) == sorted([*restored, "dom0", "backupvm", "sys-net", "sys-firewall"])
    assert dst.staging_dirs() == []


def test_b_full_restore_into_fresh_system(fresh: tuple[Sim, str], source_backup: tuple[Sim, Path]) -> None:
    """B: everything, sys-net included (it holds the Wi-Fi passwords), into a freshly installed system."""
    src, _ = source_backup
    dst, location = fresh
    r = dst.restore("-d", "backupvm", location)
    assert r.returncode == 0, r.stderr
    vms = [d.name for d in src.collection().domains if d.include_in_backups and d.name != "dom0"]
    assert "sys-net" in vms
    for vm in vms:
        assert_same_vm(src, vm, dst)
    got = dst.collection()
    orig = src.collection()
    for vm in vms:
        a, b = orig.get(vm), got.get(vm)
        assert b is not None and a is not None
        assert (b.klass, b.template, b.netvm, b.label) == (a.klass, a.template, a.netvm, a.label), vm
    # dom0's home came back beside the (empty) current one, never over it.
    homes = list(dst.home.glob("home-restore-*"))
    assert len(homes) == 1
    assert snapshot_tree(homes[0]).keys() == snapshot_tree(src.home).keys()
    assert dst.staging_dirs() == []
    assert_roots_follow_templates(dst)


def test_c_old_copy_beside_current_with_rename(same: tuple[Sim, str], source_backup: tuple[Sim, Path]) -> None:
    """C: restore an old copy of personal (and its template) beside the current ones."""
    dst, location = same
    src, _ = source_backup
    originals = {vm: (domain_xml(dst, vm), snapshot_tree(dst.qubes_root / d / vm))
                 for vm, d in (("personal", "appvms"), ("debian-12", "vm-templates"))}  # fmt: skip
    r = dst.restore("-d", "backupvm", "--rename-conflicting", location, "debian-12", "personal")
    assert r.returncode == 0, r.stderr
    coll = dst.collection()
    p1, t1 = coll.get("personal1"), coll.get("debian-121")
    assert p1 is not None and t1 is not None, coll.names()
    assert (dst.qubes_root / "appvms/personal1/private.img").is_file()
    assert (dst.qubes_root / "vm-templates/debian-121/root.img").is_file()
    assert p1.template == "debian-121"  # the dependant follows the rename
    assert p1.netvm == "sys-firewall"
    old = coll.get("personal")
    assert old is not None
    assert p1.qid != old.qid and p1.uuid != old.uuid
    assert len({d.qid for d in coll.domains}) == len(coll.domains)
    assert_same_vm(src, "personal", dst, "personal1")
    assert_same_vm(src, "debian-12", dst, "debian-121")
    assert_roots_follow_templates(dst)
    for vm, d in (("personal", "appvms"), ("debian-12", "vm-templates")):
        assert (domain_xml(dst, vm), snapshot_tree(dst.qubes_root / d / vm)) == originals[vm]


def test_d_one_vm_out_of_many(fresh: tuple[Sim, str], source_backup: tuple[Sim, Path]) -> None:
    """D: a single VM; nothing else is restored or registered."""
    src, _ = source_backup
    dst, location = fresh
    r = dst.restore("-d", "backupvm", location, "legacy-hvm")
    assert r.returncode == 0, r.stderr
    assert sorted(dst.collection().names()) == ["backupvm", "dom0", "legacy-hvm"]
    assert_same_vm(src, "legacy-hvm", dst)
    assert list(dst.home.glob("home-restore-*")) == []
    assert sorted(p.name for p in (dst.qubes_root / "appvms").iterdir()) == ["legacy-hvm"]


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
    # With --ignore-missing it is restored, its template/netvm replaced by this system's defaults (this fresh
    # system keeps the source's global defaults, and its default template fedora-41 now exists).
    r = dst.restore("-d", "backupvm", "--ignore-missing", location, "personal")
    assert r.returncode == 0, r.stderr
    personal = dst.collection().get("personal")
    assert personal is not None
    assert not personal.has_property("template") and not personal.has_property("netvm")
    assert_roots_follow_templates(dst)
    assert_same_vm(src, "personal", dst)


# ---------------------------------------------------------------------------------------------- reference

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
        (path.parent / "firewall.xml").write_text(f"<firewall vm='{dom.name}'/>\n")
        selectable.append(dom.name)
    return sim, selectable


def test_backup_of_reference_shaped_system_restores(tmp_path: Path) -> None:
    src, selectable = _sample_system(tmp_path / "ref")
    assert len(selectable) >= 4
    backup = src.backup_to_vm(*selectable)
    dst = make_fresh(tmp_path / "fresh", src, keep=("dom0",))
    share_backup(backup, dst)
    r = dst.restore("-d", "backupvm", "--ignore-missing", f"{VM_BACKUPS}/{backup.name}")
    assert r.returncode == 0, r.stderr
    for vm in selectable:
        assert_same_vm(src, vm, dst)
    coll = dst.collection()
    for vm in selectable:
        a, b = src.collection().get(vm), coll.get(vm)
        assert a is not None and b is not None
        assert b.klass == a.klass and b.label == a.label


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
    options = RestoreOptions(vms=("fedora-41", "work"))
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
    assert sorted(Collection.load(dst.qubes_xml).names()) == ["backupvm", "dom0"]


def test_exclude_on_restore(fresh: tuple[Sim, str]) -> None:
    dst, location = fresh
    r = dst.restore("-d", "backupvm", "-x", "work", "-x", "dom0", location)
    assert r.returncode == 0, r.stderr
    names = dst.collection().names()
    assert "work" not in names and "personal" in names and "sys-net" in names
    assert not (dst.qubes_root / "appvms/work").exists()
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
    for vm in ("sys-net", "sys-firewall", "untrusted", "legacy-hvm"):
        assert_same_vm(src, vm, dst, vm + "1")
    assert {"root.img", "private.img"} <= set(vm_files(dst, "legacy-hvm1"))
    # The originals (and the global properties) are untouched.
    for name in before.names():
        assert etree.tostring(before.get(name).element) == domain_xml(dst, name)
    assert coll.global_properties == before.global_properties
    assert_roots_follow_templates(dst)


def test_c_renamed_template_copy_and_vm_inheriting_the_default(same: tuple[Sim, str]) -> None:
    """vault inherits the default template; restored beside the current one together with an old copy of
    that template (renamed), it keeps inheriting this system's default, and starts from that template's root."""
    dst, location = same
    r = dst.restore("-d", "backupvm", "--rename-conflicting", location, "fedora-41", "vault")
    assert r.returncode == 0, r.stderr
    coll = dst.collection()
    vault1 = coll.get("vault1")
    assert vault1 is not None and coll.get("fedora-411") is not None
    assert coll.effective_template(vault1) == "fedora-41"
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
        while not any(p.stat().st_blocks > 2048 for d in dst.staging_dirs() for p in d.rglob("*.img")):
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
        # Nothing runs after kill -9: the staging dir stays until the next restore removes it.
        assert dst.qubes_xml.read_bytes() == guard.xml
        assert len(dst.staging_dirs()) == 1
        r = dst.restore("-d", "backupvm", f"{VM_BACKUPS}/{backup.name}", "vault", "fedora-41")
        assert r.returncode == 0, r.stderr
        assert dst.staging_dirs() == []
        assert sorted(dst.collection().names()) == ["backupvm", "dom0", "fedora-41", "vault"]
        return
    assert one_error_line(err).endswith("interrupted"), err
    guard.check()


def test_commit_fsyncs_every_restored_file_before_qubes_xml(
    fresh: tuple[Sim, str], source_backup: tuple[Sim, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Durability: every restored file (by inode: renames keep it) and every directory that received a
    rename are fsynced before qubes.xml's atomic replacement, the commit point, starts."""
    dst, location = fresh
    synced: set[tuple[int, int]] = set()
    at_commit: list[set[tuple[int, int]]] = []
    real_fsync, real_write = os.fsync, Collection.write_atomic

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))
        real_fsync(fd)

    def write_atomic(self: Collection, path: str | os.PathLike[str]) -> None:
        if Path(path) == dst.system.qubes_xml:
            at_commit.append(set(synced))
        real_write(self, path)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Collection, "write_atomic", write_atomic)
    job = Restore(dst.system, location, PASSPHRASE.encode(), source_vm="backupvm",
                  options=RestoreOptions(vms=("fedora-41", "work")))  # fmt: skip
    try:
        job.open()
        job.plan()
        job.run()
    finally:
        job.close()
    assert job.restored == ["fedora-41", "work"] and len(at_commit) == 1
    before_commit = at_commit[0]
    checked = 0
    for name in job.restored:
        for path in vm_files(dst, name).values():
            st = path.stat()
            assert (st.st_dev, st.st_ino) in before_commit, f"{path} not fsynced before the commit"
            parent = path.parent.stat()
            assert (parent.st_dev, parent.st_ino) in before_commit, f"{path.parent} not fsynced before the commit"
            checked += 1
    assert checked >= 4
