"""The real ``qvm-backup`` with QUBES_SIM unset, against fake endpoints (issue 9 item 4).

A fake qubesd on a temporary socket (QUBES_ADMIN_SOCKET) answers as R4.2 or R4.3 does and records every
request (a call the release does not have is unexpected), a
fake ``lvm`` (QUBES_LVM, several words) makes snapshots as files under QUBES_DEV_DIR, and a fake ``qvm-run``
on PATH starts the agent's real service file.  Checked: the exact requests (no write but
backup_timestamp), the committed state read per driver (lvm_thin snapshot, file-reflink clean image of a
running VM, file pool only while halted), zero runs stored as holes, snapshots always removed (also after a
failure and an interruption), leftovers of a dead run removed, and the backup restores with the
emergency recipe (stock tools) byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from fakes.qubesd import FakeQubesd, error, ok
from fakes.system import FakeVM, install, volume_info
from qubes_backup_dom0.api import run_backup
from qubes_backup_dom0.backup.plan import BackupOptions, plan_backup
from qubes_backup_dom0.qubes import firewall
from qubes_backup_dom0.qubes.qubesxml import Collection
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.restore.machine import Restore
from test_emergency import run_recipe, same_bytes

FAKES = Path(__file__).resolve().parent / "fakes"
BIN = Path(sys.executable).parent
PASSPHRASE = "fake endpoints passphrase"
VG = "qubes_dom0"
MIB = 1 << 20
WORK_RULES = ["action=accept proto=tcp dsthost=example.com dstports=443-443", "action=drop"]
COMMON_READS = {
    "admin.vm.List", "admin.label.List", "admin.label.Get", "admin.label.Index", "admin.pool.List",
    "admin.pool.Info", "admin.property.GetAll", "admin.deviceclass.List", "admin.vm.property.GetAll",
    "admin.vm.feature.List", "admin.vm.feature.Get", "admin.vm.tag.List", "admin.vm.firewall.Get",
    "admin.vm.volume.List", "admin.vm.volume.Info",
}  # fmt: skip
#: The reads of each release: R4.2 lists devices with ``…List`` and has no notes; R4.3 has ``…Assigned``.
READS = {
    "4.2": COMMON_READS | {f"admin.vm.device.{c}.List" for c in ("pci", "usb", "block", "mic")},
    "4.3": COMMON_READS | {"admin.vm.notes.Get"}
    | {f"admin.vm.device.{c}.Assigned" for c in ("pci", "usb", "block", "mic")},
}  # fmt: skip
#: work's device assignments as each release lists them (the same two assignments).
WORK_DEVICES = {
    "4.2": {"pci": ["dom0+00_14.0 no-strict-reset=True persistent=yes"],
            "block": ["sys-usb+sda1 frontend-dev=xvdi read-only=yes persistent=yes"]},
    "4.3": {"pci": ["dom0+00_14.0:8086:a0f0::p028000 device_id='8086:a0f0::p028000' port_id='00_14.0' devclass='pci' "
                    "backend_domain='dom0' mode='required' frontend_domain='work' _no-strict-reset='True'"],
            "block": ["sys-usb+sda1:* device_id='*' port_id='sda1' devclass='block' backend_domain='sys-usb' "
                      "mode='auto-attach' frontend_domain='work' _frontend-dev='xvdi' _read-only='yes'"]},
}  # fmt: skip


def write_image(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces:
            f.seek(off)
            f.write(data)


@dataclass
class Endpoints:
    tmp: Path
    fq: FakeQubesd

    @property
    def dev(self) -> Path:
        return self.tmp / "dev"

    @property
    def vms_dir(self) -> Path:
        return self.tmp / "vms"

    @property
    def backups(self) -> Path:
        return self.vms_dir / "backupvm" / "backups"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("QUBES_SIM",) and not k.startswith("FAKE_")}
        env.update(
            QUBES_ADMIN_SOCKET=str(self.fq.path),
            QUBES_LVM=f"{sys.executable} {FAKES / 'lvm.py'} {self.dev}",
            QUBES_DEV_DIR=str(self.dev),
            QUBES_RPC_DIR=str(self.tmp / "rpc"),
            FAKE_QREXEC_VMS=str(self.vms_dir),
            PATH=f"{self.tmp / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        )
        env.update(extra)
        return env

    def backup(self, *vms: str, **extra: str) -> subprocess.CompletedProcess[str]:
        argv = [str(BIN / "qvm-backup"), "-y", "-q", "-p", str(self.tmp / "pw"), "--kdf-n", "1024", "--weak-kdf-ok",
                "-d", "backupvm", "/backups", *vms]  # fmt: skip
        return subprocess.run(argv, env=self.env(**extra), capture_output=True, text=True, timeout=120, check=False)

    def lvm_log(self) -> list[list[str]]:
        log = self.tmp / "lvm.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def lvs(self) -> list[str]:
        return sorted(p.name for p in (self.dev / VG).iterdir() if p.is_file())

    def system(self) -> System:
        return System.from_env(self.env())

    def backup_files(self) -> list[Path]:
        return sorted(self.backups.iterdir()) if self.backups.is_dir() else []


RANDOM = random.Random(9)
WORK_DATA = [(0, RANDOM.randbytes(128 << 10)), (128 << 10, bytes(896 << 10)), (3 * MIB, RANDOM.randbytes(64 << 10))]
FEDORA_DATA = [(0, RANDOM.randbytes(300 << 10))]
CLEAN = [(0, b"committed state " * 4096)]
DIRTY = [(0, b"running VM write " * 4096)]
FILE_DATA = [(MIB, RANDOM.randbytes(10 << 10))]


def build(tmp: Path, fq: FakeQubesd, fvm_state: str = "Halted", release: str = "4.2") -> Endpoints:
    ep = Endpoints(tmp, fq)
    write_image(ep.dev / VG / "vm-fedora-root", 4 * MIB, FEDORA_DATA)
    write_image(ep.dev / VG / "vm-work-private", 8 * MIB, WORK_DATA)
    reflink_dir, file_dir = tmp / "reflink-pool", tmp / "file-pool"
    write_image(reflink_dir / "appvms/rvm/private.img", 2 * MIB, CLEAN)
    write_image(reflink_dir / "appvms/rvm/private-dirty.img", 2 * MIB, DIRTY)
    write_image(file_dir / "appvms/fvm/private.img", 2 * MIB, FILE_DATA)
    (ep.vms_dir / "backupvm" / "backups").mkdir(parents=True)
    (tmp / "pw").write_text(PASSPHRASE + "\n")
    (tmp / "bin").mkdir()
    qvm_run = tmp / "bin" / "qvm-run"
    qvm_run.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKES / 'qvm_run.py'} \"$@\"\n")
    qvm_run.chmod(0o755)
    lvm_vol = {"path": f"/dev/mapper/{VG}-vm--work--private"}
    vms = [
        FakeVM("fedora", "TemplateVM", qid=2, label="black", volumes={
            "root": volume_info("lvm", f"{VG}/vm-fedora-root", 4 * MIB, True),
            "volatile": volume_info("lvm", f"{VG}/vm-fedora-volatile", 4 * MIB, False)}),
        FakeVM("work", qid=3, label="blue", state="Running", firewall=WORK_RULES, features={"gui": "1"},
               props={"template": (False, "vm", "fedora"), "memory": (False, "int", "800")},
               devices=WORK_DEVICES[release], notes="" if release == "4.3" else None,
               volumes={"private": volume_info("lvm", f"{VG}/vm-work-private", 8 * MIB, True, **lvm_vol),
                        "root": volume_info("lvm", f"{VG}/vm-work-root", 4 * MIB, False,
                                            source=f"{VG}/vm-fedora-root")}),
        FakeVM("rvm", qid=4, label="green", state="Running", notes="my notes\nline 2\n", volumes={
            "private": volume_info("varlibqubes", "appvms/rvm/private", 2 * MIB, True,
                                   path=str(reflink_dir / "appvms/rvm/private-dirty.img"))}),
        FakeVM("fvm", qid=5, label="red", state=fvm_state, volumes={
            "private": volume_info("legacy", "appvms/fvm/private", 2 * MIB, True)}),
        FakeVM("backupvm", qid=6, label="red", state="Running",  # the backup VM: not backed up itself
               props={"include_in_backups": (False, "bool", "False")}),
    ]  # fmt: skip
    pools = {
        "lvm": {"driver": "lvm_thin", "volume_group": VG, "thin_pool": "vm-pool"},
        "varlibqubes": {"driver": "file-reflink", "dir_path": str(reflink_dir)},
        "legacy": {"driver": "file", "dir_path": str(file_dir)},
    }
    dom0 = FakeVM("dom0", "AdminVM", "Running", "black", 0, tags=[], firewall=[],
                  props={"include_in_backups": (False, "bool", "False")})  # fmt: skip
    install(fq, vms, pools, {"default_template": (False, "vm", "fedora")}, dom0=dom0, release=release)
    return ep


@pytest.fixture
def fq(tmp_path: Path):
    with FakeQubesd(tmp_path / "qubesd.sock") as server:
        yield server


@pytest.fixture
def ep(tmp_path: Path, fq: FakeQubesd) -> Endpoints:
    return build(tmp_path, fq)


def restore_with_recipe(tmp: Path, backup: Path) -> Path:
    res = run_recipe(tmp / "recipe", backup, passphrase=PASSPHRASE)
    assert res.rc == 0, res.stderr
    return res.target


@pytest.mark.parametrize("release", ["4.2", "4.3"])
def test_backup_all_through_fake_endpoints(tmp_path: Path, fq: FakeQubesd, release: str) -> None:
    ep = build(tmp_path, fq, release=release)
    leftover_dead = "qbackup-999999-deadbeef-1"  # pid 999999 does not exist (pid_max is below it here)
    leftover_alive = f"qbackup-{os.getpid()}-cafecafe-1"
    untagged = "qbackup-999999-00000000-2"
    for name, tag in ((leftover_dead, "qubes-backup-snapshot"), (leftover_alive, "qubes-backup-snapshot"),
                      (untagged, "")):  # fmt: skip
        write_image(ep.dev / VG / name, MIB, [(0, b"old")])
        if tag:
            (ep.dev / VG / ".tags").mkdir(exist_ok=True)
            (ep.dev / VG / ".tags" / name).write_text(tag)
    proc = ep.backup(FAKE_LVM_WARN="1")
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr.lower(), proc.stderr  # lvm's warnings are not ours to repeat

    # leftovers: only the dead run's tagged snapshot went; nothing of ours is left
    assert ep.lvs() == sorted([leftover_alive, untagged, "vm-fedora-root", "vm-work-private"])
    log = ep.lvm_log()
    assert log[0] == ["lvs", "--noheadings", "--separator=|", "-o", "vg_name,lv_name,lv_tags"]
    assert log[1] == ["lvremove", "-f", f"{VG}/{leftover_dead}"]
    creates = [a for a in log if a[0] == "lvcreate"]
    removes = [a for a in log[2:] if a[0] == "lvremove"]
    # one snapshot per volume, held from the scan until its archive is written (read what was scanned);
    # VMs are planned two at a time, so in either order
    assert sorted(a[-1] for a in creates) == [f"{VG}/vm-fedora-root", f"{VG}/vm-work-private"]
    assert sorted(a[2] for a in removes) == sorted(f"{VG}/{a[7][len('--name='):]}" for a in creates)
    for a in creates:
        name = a[7][len("--name="):]
        assert name.startswith("qbackup-") and not name.endswith(("-snap", "-back", "-import"))
        assert a[:8] == ["lvcreate", "--setactivationskip=n", "--activate=y", "--snapshot", "--type=thin",
                         "--permission=r", "--addtag=qubes-backup-snapshot", a[7]]  # fmt: skip

    # requests: reads only (this release's: no call it does not have), plus backup_timestamp on each backed-up
    # VM, after the backup
    fq = ep.fq
    assert not fq.unexpected and not fq.malformed
    assert {r[0] for r in fq.requests} - {"admin.vm.property.Set"} <= READS[release]
    notes_asked = sorted(d for m, d, *_ in fq.requests if m == "admin.vm.notes.Get")
    assert notes_asked == ([] if release == "4.2" else ["fedora", "fvm", "rvm", "work"])
    writes = fq.writes()
    assert [(m, d, a) for m, d, a, _ in writes] == [
        ("admin.vm.property.Set", vm, "backup_timestamp") for vm in ("fedora", "fvm", "rvm", "work")]  # fmt: skip
    assert all(p.isdigit() for *_, p in writes)
    assert fq.requests[-4:] == writes
    assert {d for m, d, *_ in fq.requests if m == "admin.vm.firewall.Get"} == {"fedora", "work", "rvm", "fvm"}
    # The location is checked first (a listing through qubes.Restore, before the passphrase), then the backup.
    assert [json.loads(line) for line in (ep.vms_dir / "qvm-run.log").read_text().splitlines()] == [
        ["--pass-io", "--no-gui", "--service", "--", "backupvm", service]
        for service in ("qubes.Restore", "qubes.Backup")]  # fmt: skip

    (backup,) = ep.backup_files()
    target = restore_with_recipe(ep.tmp, backup)
    assert same_bytes(target / "appvms/work/private.img", ep.dev / VG / "vm-work-private")
    assert same_bytes(target / "vm-templates/fedora/root.img", ep.dev / VG / "vm-fedora-root")
    rvm = target / "appvms/rvm/private.img"
    assert same_bytes(rvm, ep.tmp / "reflink-pool/appvms/rvm/private.img")  # the committed state, not -dirty
    assert same_bytes(target / "appvms/fvm/private.img", ep.tmp / "file-pool/appvms/fvm/private.img")
    assert firewall.xml_to_rules((target / "appvms/work/firewall.xml").read_bytes()) == WORK_RULES
    if release == "4.3":
        assert (target / "appvms/rvm/notes.txt").read_text() == "my notes\nline 2\n"
    else:  # R4.2: no notes, and they are not asked for
        assert not (target / "appvms/rvm/notes.txt").exists()
    assert not (target / "appvms/work/notes.txt").exists()  # empty notes: no file
    assert sorted(p.name for p in (target / "appvms/work").iterdir()) == ["firewall.xml", "private.img"]

    manifest = Restore(ep.system(), str(backup), PASSPHRASE.encode()).open()
    files = {f.path: f for a in manifest.archives for f in a.files}
    assert [a.vm for a in manifest.archives] == ["fedora", "fvm", "rvm", "work"]
    assert files["appvms/work/private.img"].size == 8 * MIB
    assert files["appvms/work/private.img"].data == (128 << 10) + (64 << 10)  # the zero run became a hole
    coll = Collection.from_bytes(manifest.qubes)
    work = coll["work"]
    assert work.features["backup-path"] == "appvms/work" and work.features["gui"] == "1"
    assert work.properties["memory"] == "800" and "include_in_backups" not in work.properties
    # device assignments as this release's qubes.xml holds them (R4.3: mode and the device's identity)
    devices = sorted((devs.get("class"), dict(dev.attrib), {o.get("name"): o.text for o in dev.iter("option")})
                     for devs in work.element.iter("devices") for dev in devs.iter("device"))  # fmt: skip
    r43 = release == "4.3"
    assert devices == [
        ("block", {"backend-domain": "sys-usb", "id": "sda1",
                   **({"mode": "auto-attach", "identity": "*"} if r43 else {})},
         {"frontend-dev": "xvdi", "read-only": "yes"}),
        ("pci", {"backend-domain": "dom0", "id": "00_14.0",
                 **({"mode": "required", "identity": "8086:a0f0::p028000"} if r43 else {})},
         {"no-strict-reset": "True"})]  # fmt: skip
    assert coll["fedora"].features["backup-path"] == "vm-templates/fedora"
    assert coll.global_properties == {"default_template": "fedora"}


def test_lvm_failure_mid_backup_leaves_no_snapshot(ep: Endpoints) -> None:
    proc = ep.backup(FAKE_LVM_FAIL="lvcreate:2")  # the second snapshot, while the first (scanned) is held
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert ("work" in lines[0] or "fedora" in lines[0]) and "injected failure" in lines[0]
    assert ep.lvs() == ["vm-fedora-root", "vm-work-private"]
    assert ep.backup_files() == [] or all(p.name.startswith(".") for p in ep.backup_files())
    assert ep.fq.writes() == []  # no backup_timestamp for a failed backup


def test_lvm_failure_at_planning(ep: Endpoints) -> None:
    proc = ep.backup("work", FAKE_LVM_FAIL="lvcreate")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("qvm-backup: error: cannot back up work: snapshot of volume 'private'")
    assert ep.lvs() == ["vm-fedora-root", "vm-work-private"]


def test_interrupted_backup_removes_snapshots(ep: Endpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ep.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("QUBES_SIM", raising=False)
    system = System.from_env()
    plan = plan_backup(system, ["work"])
    calls = 0

    def progress(done: int, total: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            assert any(n.startswith("qbackup-") for n in ep.lvs())  # the snapshot is in use now
            raise KeyboardInterrupt

    (ep.tmp / "local").mkdir()
    with pytest.raises(KeyboardInterrupt):
        run_backup(system, str(ep.tmp / "local"), b"pw", plan=plan, progress=progress,
                   options=BackupOptions(kdf_n=1024))  # fmt: skip
    assert ep.lvs() == ["vm-fedora-root", "vm-work-private"]
    assert ep.fq.writes() == []
    assert list((ep.tmp / "local").iterdir()) == []  # nothing that looks like a backup


def test_running_vm_in_file_pool_is_refused(tmp_path: Path, fq: FakeQubesd) -> None:
    ep = build(tmp_path, fq, fvm_state="Running")
    proc = ep.backup("fvm")
    assert proc.returncode == 1
    msg = proc.stderr.strip()
    assert len(msg.splitlines()) == 1
    assert "fvm" in msg and "'legacy'" in msg and "halted" in msg
    proc = ep.backup("work", "rvm")  # the others are fine
    assert proc.returncode == 0, proc.stderr


def test_other_driver_is_one_clear_line(tmp_path: Path, fq: FakeQubesd) -> None:
    ep = build(tmp_path, fq)
    fq.add("admin.pool.List", reply=ok(b"lvm\nvarlibqubes\nlegacy\nzfs\n"))
    fq.add("admin.pool.Info", "dom0", "zfs", reply=ok(b"driver=zfs\nsize=1\nusage=0\n"))
    fq.add("admin.vm.volume.Info", "fvm", "private", reply=ok(
        "".join(f"{k}={v}\n" for k, v in volume_info("zfs", "tank/fvm", MIB, True).items()).encode()))
    proc = ep.backup("fvm")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "qvm-backup: error: cannot back up fvm: volume 'private' is in pool 'zfs' with driver 'zfs', "
        "which cannot be read (supported: lvm_thin, file-reflink, file)")  # fmt: skip


def test_missing_qubesd_is_one_clear_line(ep: Endpoints) -> None:
    ep.fq.stop()
    proc = ep.backup("work")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(f"qvm-backup: error: cannot reach qubesd at {ep.fq.path}: ")


def test_qubesd_error_is_one_clear_line(ep: Endpoints) -> None:
    ep.fq.add("admin.vm.firewall.Get", "work", reply=error("QubesException", "firewall is broken"))
    proc = ep.backup("work")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "qvm-backup: error: qubesd: admin.vm.firewall.Get on work failed: firewall is broken"


def test_planned_snapshots_held_until_written_or_closed(ep: Endpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan's snapshots stay until their archive is written (one lvcreate per volume); a plan that is
    never written releases them on close(), or when it is dropped."""
    for k, v in ep.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("QUBES_SIM", raising=False)
    system = System.from_env()
    plan = plan_backup(system, ["work", "fedora"])
    assert sum(n.startswith("qbackup-") for n in ep.lvs()) == 2
    plan.close()
    plan.close()  # idempotent
    assert ep.lvs() == ["vm-fedora-root", "vm-work-private"]
    plan = plan_backup(system, ["work"])
    assert any(n.startswith("qbackup-") for n in ep.lvs())
    del plan
    import gc

    gc.collect()
    assert ep.lvs() == ["vm-fedora-root", "vm-work-private"]
