"""The simulated qubesd (a separate process, real wire protocol), the lvm stand-in and the import service."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from qubes_backup_dom0.qubes.qubesxml import Collection
from qubes_backup_sim import launch, simgen, store

MiB = 1 << 20
SAMPLE = Path("/work/shared/reference/qubes-r4-sample.xml")
IMPORT = Path(launch.__file__).parent / "rpc" / "admin.vm.volume.ImportWithSize"
LVM = [sys.executable, "-m", "qubes_backup_sim.lvm"]


class Qd:
    def __init__(self, sim: Path, sock: Path, log: Path) -> None:
        self.sim, self.sock, self.log = sim, sock, log

    def raw(self, data: bytes) -> bytes:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.sock))
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out
        finally:
            s.close()

    def call(self, method: str, dest: str = "dom0", arg: str = "", payload: bytes = b"") -> bytes:
        return self.raw(f"{method}+{arg} dom0 name {dest}\0".encode() + payload)

    def ok(self, method: str, dest: str = "dom0", arg: str = "", payload: bytes = b"") -> str:
        reply = self.call(method, dest, arg, payload)
        assert reply.startswith(b"0\0"), reply
        return reply[2:].decode()

    def refused(self, method: str, dest: str = "dom0", arg: str = "", payload: bytes = b"") -> bool:
        """qubesd closed the connection without a reply (PermissionDenied, ProtocolError, no such method)."""
        return self.call(method, dest, arg, payload) == b""

    def err(self, method: str, dest: str = "dom0", arg: str = "", payload: bytes = b"") -> tuple[str, str]:
        reply = self.call(method, dest, arg, payload)
        assert reply.startswith(b"2\0") and reply.endswith(b"\0"), reply
        parts = reply[2:-1].split(b"\0")
        assert len(parts) == 3 and parts[1] == b"", reply
        return parts[0].decode(), parts[2].decode()

    def props(self, vm: str) -> dict[str, tuple[bool, str, str]]:
        out = {}
        for line in self.ok("admin.vm.property.GetAll", vm).splitlines():
            name, default, typ, *value = line.split(" ", 3)
            out[name] = (default == "default=True", typ.removeprefix("type="), value[0] if value else "")
        return out

    def info(self, vm: str, vol: str) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.ok("admin.vm.volume.Info", vm, vol).splitlines())

    def lv(self, name: str) -> Path:
        return self.sim / "dom0/dev/qubes_dom0" / name

    def requests(self) -> list[dict[str, str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]


def _start(sim: Path, tmp: Path, **kw: object) -> Iterator[Qd]:
    log = tmp / "requests.jsonl"
    sock = launch.ensure_qubesd(sim, log=log, idle=60, **kw)  # type: ignore[arg-type]
    try:
        yield Qd(sim, sock, log)
    finally:
        launch.stop_qubesd(sim)


@pytest.fixture
def qd(tmp_path: Path) -> Iterator[Qd]:
    sim = tmp_path / "sim"
    simgen.generate(sim, "small", pool="lvm_thin")
    yield from _start(sim, tmp_path)


@pytest.fixture
def qd_file(tmp_path: Path) -> Iterator[Qd]:
    """A system as the older simgen built it (file pool, images under var/lib/qubes/appvms)."""
    sim = tmp_path / "sim"
    simgen.generate(sim, "small", pool="file")
    yield from _start(sim, tmp_path, host_paths=True)


# -- reading -----------------------------------------------------------------------------------------------------
def test_list_and_properties_with_qubesd_defaults(qd: Qd) -> None:
    lines = [line.rsplit(" uuid=", 1)[0] for line in qd.ok("admin.vm.List").splitlines()]  # R4.3: uuid= last
    assert "dom0 class=AdminVM state=Running" in lines and "work class=AppVM state=Halted" in lines
    assert qd.ok("admin.vm.List", "work").startswith("work class=AppVM state=Halted uuid=")
    p = qd.props("work")
    assert p["memory"] == (False, "int", "800") and p["netvm"] == (True, "vm", "sys-firewall")
    assert p["template"] == (True, "vm", "fedora-41") and p["label"] == (False, "label", "blue")
    assert p["vcpus"] == (True, "int", "2") and p["virt_mode"] == (True, "str", "pvh")
    assert p["include_in_backups"] == (True, "bool", "True") and p["backup_timestamp"] == (True, "int", "")
    assert p["default_dispvm"] == (True, "vm", "fedora-41-dvm") and p["qrexec_timeout"] == (True, "int", "60")
    assert p["kernel"] == (True, "str", simgen.KERNEL) and p["autostart"] == (True, "bool", "False")
    assert qd.props("vault")["netvm"] == (False, "vm", "")  # explicitly none
    assert qd.props("fedora-41")["netvm"] == (True, "vm", "")  # templates: no default netvm
    assert "template" not in qd.props("fedora-41") and qd.props("sys-net")["virt_mode"] == (False, "str", "hvm")
    assert qd.ok("admin.vm.property.Get", "work", "memory") == "default=False type=int 800"
    g = qd.ok("admin.property.GetAll").splitlines()
    assert "default_netvm default=False type=vm sys-firewall" in g and "default_pool default=False type=str lvm" in g
    assert qd.ok("admin.property.Get", "dom0", "default_template") == "default=False type=vm fedora-41"


def test_labels_features_tags_devices_firewall_notes(qd: Qd) -> None:
    assert qd.ok("admin.label.List").split() == [n for n, _ in simgen.LABELS]
    assert qd.ok("admin.label.Get", "dom0", "red") == "0xcc0000"
    assert qd.ok("admin.label.Index", "dom0", "blue") == "6"
    assert qd.ok("admin.vm.feature.List", "fedora-41").split() == ["qrexec", "gui", "os"]
    assert qd.ok("admin.vm.feature.Get", "fedora-41", "os") == "Linux"
    assert qd.err("admin.vm.feature.Get", "fedora-41", "nope")[0] == "QubesFeatureNotFoundError"
    assert qd.ok("admin.vm.tag.List", "work") == "created-by-dom0\n"
    assert qd.ok("admin.deviceclass.List") == "pci\nusb\nblock\nmic\n"
    assert qd.ok("admin.vm.device.pci.Assigned", "sys-net").startswith("dom0+00_14.3:* device_id='*' ")
    assert qd.ok("admin.vm.device.pci.Assigned", "work") == ""  # (R4.2's calls: test_sim_release.py)
    assert qd.ok("admin.vm.firewall.Get", "work") == "action=accept dsthost=work.example.org\naction=drop\n"
    assert qd.ok("admin.vm.notes.Get", "work").startswith("work: AppVM")


def test_volumes_and_pools_lvm(qd: Qd) -> None:
    assert qd.ok("admin.vm.volume.List", "work") == "kernel\nprivate\nroot\nvolatile\n"
    i = qd.info("work", "private")
    assert i["pool"] == "lvm" and i["vid"] == "qubes_dom0/vm-work-private" and i["save_on_stop"] == "True"
    assert i["path"] == "/dev/mapper/qubes_dom0-vm--work--private"  # a name, not the data to read
    assert int(i["size"]) == qd.lv("vm-work-private").stat().st_size and 0 < int(i["usage"]) < int(i["size"])
    r = qd.info("work", "root")
    assert r["snap_on_start"] == "True" and r["save_on_stop"] == "False"
    assert r["source"] == "qubes_dom0/vm-fedora-41-root"
    assert set(i) == {"pool", "vid", "size", "usage", "rw", "source", "path", "save_on_stop", "snap_on_start",
                      "revisions_to_keep", "ephemeral", "is_outdated"}  # fmt: skip
    assert qd.ok("admin.pool.List").split() == ["linux-kernel", "lvm", "varlibqubes"]
    lvm = dict(line.split("=", 1) for line in qd.ok("admin.pool.Info", "dom0", "lvm").splitlines())
    assert (lvm["driver"], lvm["volume_group"], lvm["thin_pool"]) == ("lvm_thin", "qubes_dom0", "vm-pool")
    assert int(lvm["usage"]) > 0 and int(lvm["size"]) > 0
    vlq = qd.ok("admin.pool.Info", "dom0", "varlibqubes")
    assert "driver=file\n" in vlq and "dir_path=/var/lib/qubes\n" in vlq


def test_old_simgen_system_loads_with_host_paths(qd_file: Qd) -> None:
    qd = qd_file
    i = qd.info("work", "private")
    assert i["pool"] == "varlibqubes" and i["vid"] == "appvms/work/private"
    host = qd.sim.resolve() / "dom0/var/lib/qubes"
    assert i["path"] == f"{host}/appvms/work/private.img"
    assert f"dir_path={host}\n" in qd.ok("admin.pool.Info", "dom0", "varlibqubes")


def test_sample_document_loads(tmp_path: Path) -> None:
    sim = tmp_path / "sample"
    (sim / "dom0/var/lib/qubes").mkdir(parents=True)
    shutil.copy(SAMPLE, sim / "dom0/var/lib/qubes/qubes.xml")
    for qd in _start(sim, tmp_path):
        names = [line.split()[0] for line in qd.ok("admin.vm.List").splitlines()]
        assert len(names) == len(Collection.load(SAMPLE).domains)
        for name in names:
            assert qd.props(name)["klass"][2]
            for vol in qd.ok("admin.vm.volume.List", name).split():
                assert "pool" in qd.info(name, vol)
        assert "driver=lvm_thin" in qd.ok("admin.pool.Info", "dom0", "lvm")


# -- errors -----------------------------------------------------------------------------------------------------
def test_error_shapes(qd: Qd) -> None:
    assert qd.err("admin.vm.List", "nope") == ("QubesVMNotFoundError", "No such domain: 'nope'")
    # what qubesd refuses by closing the connection: unknown methods, ProtocolError, framing, size
    assert qd.refused("admin.vm.notes.Frobnicate", "work")
    assert qd.err("admin.vm.property.Get", "work", "nope")[0] == "QubesNoSuchPropertyError"
    assert qd.refused("admin.vm.List", "dom0", "", b"payload")
    assert qd.refused("admin.vm.property.Get", "work")  # argument missing
    assert qd.raw(b"admin.vm.List+ dom0 name dom0") == b""  # no terminator
    assert qd.raw(b"admin.vm.List dom0 dom0\0") == b""
    assert qd.call("admin.vm.feature.Set", "work", "x", b"a" * (64 * 1024 + 1)) == b""  # request too large
    assert "x" not in qd.ok("admin.vm.feature.List", "work").split()


def test_property_set_reset_and_refusals(qd: Qd) -> None:
    assert qd.ok("admin.vm.property.Set", "work", "memory", b"1000") == ""
    assert qd.props("work")["memory"] == (False, "int", "1000")
    qd.ok("admin.vm.property.Reset", "work", "memory")
    assert qd.props("work")["memory"] == (True, "int", "400")
    qd.ok("admin.vm.property.Set", "work", "kernelopts", b"a\\b")
    assert "kernelopts default=False type=str a\\\\b\n" in qd.ok("admin.vm.property.GetAll", "work")
    qd.ok("admin.vm.property.Set", "work", "netvm", b"")
    assert qd.props("work")["netvm"] == (False, "vm", "")
    bad = [("memory", b"lots"), ("memory", b""), ("autostart", b"maybe"), ("netvm", b"nope"), ("netvm", b"work"),
           ("template", b"work"), ("default_dispvm", b"work"), ("virt_mode", b"hvm2")]  # fmt: skip
    for prop, value in bad:
        exc, _ = qd.err("admin.vm.property.Set", "personal", prop, value)
        assert exc in ("QubesValueError", "QubesPropertyValueError"), (prop, value, exc)
    assert qd.err("admin.vm.property.Set", "personal", "netvm", b"vault")[0] == "QubesPropertyValueError"
    assert qd.err("admin.vm.property.Set", "work", "qid", b"99")[0] == "QubesPropertyAccessError"
    assert qd.err("admin.vm.property.Set", "work", "label", b"pink")[0] == "QubesLabelNotFoundError"
    assert qd.err("admin.vm.property.Set", "work", "nosuch", b"1")[0] == "QubesNoSuchPropertyError"
    assert qd.props("personal")["netvm"] == (False, "vm", "sys-firewall")  # nothing changed


def test_tags_features_devices_firewall_writes(qd: Qd) -> None:
    qd.ok("admin.vm.tag.Set", "work", "backup-restore-in-progress")
    assert "backup-restore-in-progress" in qd.ok("admin.vm.tag.List", "work").split()
    qd.ok("admin.vm.tag.Set", "work", "created-by-sys-net")  # dom0 may (qubes/ext/admin.py refuses others)
    assert qd.err("admin.vm.tag.Set", "work", "bad/tag")[0] == "QubesInvalidTagError"
    qd.ok("admin.vm.tag.Remove", "work", "backup-restore-in-progress")
    assert qd.err("admin.vm.tag.Remove", "work", "backup-restore-in-progress")[0] == "QubesTagNotFoundError"
    qd.ok("admin.vm.feature.Set", "work", "service.x", b"1")
    assert qd.ok("admin.vm.feature.Get", "work", "service.x") == "1"
    qd.ok("admin.vm.feature.Remove", "work", "service.x")
    # R4.3 assigns a PCI device to a pvh VM (it fails to start); a VM with one cannot go back to pvh
    qd.ok("admin.vm.device.pci.Assign", "backupvm", "dom0+00_1f.6", b"mode='required' _no-strict-reset='True'")
    assert qd.ok("admin.vm.device.pci.Assigned", "backupvm") == (
        "dom0+00_1f.6:* device_id='*' port_id='00_1f.6' devclass='pci' backend_domain='dom0' mode='required' "
        "frontend_domain='backupvm' _no-strict-reset='True'\n")  # fmt: skip
    qd.ok("admin.vm.property.Set", "backupvm", "virt_mode", b"hvm")
    assert qd.err("admin.vm.property.Set", "backupvm", "virt_mode", b"pvh")[0] == "QubesException"
    again = qd.err("admin.vm.device.pci.Assign", "backupvm", "dom0+00_1f.6", b"mode='required'")
    assert again[0] == "DeviceAlreadyAssigned"
    qd.ok("admin.vm.firewall.Set", "work", payload=b"action=accept proto=tcp dstports=443 dsthost=a.example\n"
          b"action=accept specialtarget=dns comment=name lookups\naction=drop\n")  # fmt: skip
    assert qd.ok("admin.vm.firewall.Get", "work") == (
        "action=accept proto=tcp dsthost=a.example dstports=443-443\n"
        "action=accept specialtarget=dns comment=name lookups\naction=drop\n")  # fmt: skip
    xml = (qd.sim / "dom0/var/lib/qubes/appvms/work/firewall.xml").read_text()
    assert '<firewall version="2">' in xml and '<property name="dstports">443-443</property>' in xml
    assert qd.refused("admin.vm.firewall.Set", "work", payload=b"action=maybe\n")  # a ProtocolError


def test_changes_persist_across_restart(qd: Qd) -> None:
    qd.ok("admin.vm.property.Set", "work", "memory", b"1234")
    qd.ok("admin.property.Set", "dom0", "default_netvm", b"sys-net")
    xml = Collection.load(qd.sim / "dom0" / store.QUBES_XML)
    assert xml["work"].raw_property("memory") == "1234"  # saved at once
    launch.stop_qubesd(qd.sim)
    assert not qd.sock.exists()
    launch.ensure_qubesd(qd.sim)
    assert qd.props("work")["memory"] == (False, "int", "1234")
    assert qd.props("work")["netvm"] == (True, "vm", "sys-net")


def test_request_log_is_exact(qd: Qd) -> None:
    qd.ok("admin.vm.property.Set", "work", "memory", b"900")
    assert qd.requests()[-1] == {"method": "admin.vm.property.Set", "arg": "memory", "dest": "work", "payload": "900"}


# -- life cycle -------------------------------------------------------------------------------------------------
def test_create_and_remove_lvm(qd: Qd) -> None:
    qd.ok("admin.vm.Create.AppVM", "dom0", "fedora-41", b"name=new1 label=green")
    p = qd.props("new1")
    assert p["template"][2] == "fedora-41" and p["label"][2] == "green"
    assert int(p["qid"][2]) not in {int(qd.props(n)["qid"][2]) for n in ("work", "vault", "backupvm")}
    assert qd.ok("admin.vm.tag.List", "new1") == "created-by-dom0\n"
    priv = qd.info("new1", "private")
    assert priv["vid"] == "qubes_dom0/vm-new1-private" and priv["size"] == str(2 << 30)
    assert qd.lv("vm-new1-private").stat().st_size == 2 << 30 and qd.lv("vm-new1-private").stat().st_blocks == 0
    root = qd.info("new1", "root")
    assert root["source"] == "qubes_dom0/vm-fedora-41-root" and root["size"] == qd.info("fedora-41", "root")["size"]
    assert not qd.lv("vm-new1-root").exists()
    assert qd.err("admin.vm.Create.AppVM", "dom0", "fedora-41", b"name=new1 label=green")[0] == "QubesValueError"
    assert qd.err("admin.vm.Create.AppVM", "dom0", "work", b"name=new2 label=green")[0] == "QubesValueError"
    assert qd.err("admin.vm.Create.AppVM", "dom0", "", b"name=../x label=red")[0] == "QubesValueError"
    qd.ok("admin.vm.Create.TemplateVM", "dom0", "", b"name=tpl2 label=black")
    assert qd.lv("vm-tpl2-root").stat().st_size == 10 << 30 and qd.info("tpl2", "root")["save_on_stop"] == "True"
    qd.ok("admin.vm.CreateInPool.StandaloneVM", "dom0", "", b"name=sa label=red pool=varlibqubes")
    sa = qd.sim / "dom0/var/lib/qubes/appvms/sa"
    assert (sa / "private.img").stat().st_size == 2 << 30 and (sa / "root.img").is_file()
    assert qd.info("sa", "private")["pool"] == "varlibqubes"
    qd.ok("admin.vm.Remove", "new1")
    qd.ok("admin.vm.Remove", "sa")
    assert not qd.lv("vm-new1-private").exists() and not sa.exists()
    assert "new1" not in qd.ok("admin.vm.List")
    assert "new1" not in Collection.load(qd.sim / "dom0/var/lib/qubes/qubes.xml")


def test_remove_refused_while_referenced_or_running(qd: Qd) -> None:
    assert qd.err("admin.vm.Remove", "fedora-41")[0] == "QubesVMInUseError"  # template of work, a global default
    assert qd.err("admin.vm.Remove", "sys-firewall")[0] == "QubesVMInUseError"  # default_netvm
    qd.ok("admin.vm.Start", "vault")
    assert qd.err("admin.vm.Remove", "vault")[0] == "QubesVMNotHaltedError"
    qd.ok("admin.vm.Shutdown", "vault")
    qd.ok("admin.vm.Remove", "vault")
    assert not qd.lv("vm-vault-private").exists()


def test_start_shutdown_commit_lvm(qd: Qd) -> None:
    qd.ok("admin.vm.tag.Set", "vault", "backup-restore-in-progress")
    assert qd.err("admin.vm.Start", "vault")[0] == "QubesException"
    qd.ok("admin.vm.tag.Remove", "vault", "backup-restore-in-progress")
    committed = qd.lv("vm-vault-private").read_bytes()
    qd.ok("admin.vm.Start", "vault")
    assert qd.ok("admin.vm.List", "vault").startswith("vault class=AppVM state=Running uuid=")
    assert qd.lv("vm-vault-private-snap").read_bytes() == committed
    assert qd.lv("vm-vault-root-snap").is_file()
    # the VM writes: the sim replaces the -snap by rename (never in place)
    new = qd.lv("vm-vault-private-snap.new")
    new.write_bytes(b"written while running".ljust(len(committed), b"\0"))
    os.replace(new, qd.lv("vm-vault-private-snap"))
    assert qd.lv("vm-vault-private").read_bytes() == committed  # committed state untouched
    assert qd.err("internal.vm.volume.ImportBegin", "vault", "private", b"4096")[0] == "QubesVMNotHaltedError"
    assert json.loads((qd.sim / "dom0" / store.RUN_STATE).read_text())["running"] == ["vault"]
    qd.ok("admin.vm.Shutdown", "vault")
    assert qd.lv("vm-vault-private").read_bytes().startswith(b"written while running")
    assert not qd.lv("vm-vault-private-snap").exists() and not qd.lv("vm-vault-root-snap").exists()
    backs = [p.name for p in qd.lv("").iterdir() if p.name.startswith("vm-vault-private-") and p.name.endswith("-back")]
    assert len(backs) == 1 and qd.lv(backs[0]).read_bytes() == committed  # revisions_to_keep=1
    assert qd.err("admin.vm.Shutdown", "vault")[0] == "QubesVMNotStartedError"


def test_start_shutdown_reflink(tmp_path: Path) -> None:
    sim = tmp_path / "sim"
    simgen.generate(sim, "small", pool="file-reflink", running=["work"])
    for qd in _start(sim, tmp_path):
        work = sim / "dom0/var/lib/qubes/appvms/work"
        assert qd.ok("admin.vm.List", "work").startswith("work class=AppVM state=Running uuid=")
        assert qd.info("work", "private")["path"] == "/var/lib/qubes/appvms/work/private-dirty.img"
        dirty = (work / "private-dirty.img").read_bytes()
        assert dirty != (work / "private.img").read_bytes()
        qd.ok("admin.vm.Shutdown", "work")
        assert (work / "private.img").read_bytes() == dirty and not (work / "root-dirty.img").exists()


def test_import_begin_end(qd: Qd) -> None:
    size, path = qd.ok("internal.vm.volume.ImportBegin", "work", "private", b"8192").split(" ", 1)
    assert size == "8192" and Path(path) == qd.lv("vm-work-private-import").resolve()
    with open(path, "r+b") as f:
        f.write(b"imported")
    qd.ok("internal.vm.volume.ImportEnd", "work", "private", b"ok")
    assert qd.lv("vm-work-private").read_bytes() == b"imported".ljust(8192, b"\0")
    assert qd.info("work", "private")["size"] == "8192" and not qd.lv("vm-work-private-import").exists()
    qd.ok("internal.vm.volume.ImportBegin", "work", "private", b"4096")
    exc, msg = qd.err("internal.vm.volume.ImportEnd", "work", "private", b"fail\ndisk on fire")
    assert exc == "QubesException" and msg == "Data import failed: disk on fire"
    assert not qd.lv("vm-work-private-import").exists() and qd.info("work", "private")["size"] == "8192"
    assert qd.err("internal.vm.volume.ImportBegin", "work", "root", b"4096")[0] == "StoragePoolException"
    assert qd.refused("internal.vm.volume.ImportBegin", "work", "private", b"-1")  # a ProtocolError
    assert qd.err("internal.vm.volume.ImportEnd", "work", "private", b"ok")[0] == "QubesException"  # none begun


# -- the import service -----------------------------------------------------------------------------------------
def _import(qd: Qd, vm: str, vol: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "QUBES_ADMIN_SOCKET": str(qd.sock), "QREXEC_REMOTE_DOMAIN": "dom0",
           "QREXEC_REQUESTED_TARGET": vm}  # fmt: skip
    return subprocess.run([sys.executable, str(IMPORT), vol], input=data, env=env, capture_output=True, timeout=60)


def test_import_service_end_to_end(qd: Qd) -> None:
    assert os.access(IMPORT, os.X_OK) and IMPORT.read_text().startswith("#!/usr/bin/env python3\n")
    payload = os.urandom(5000) + bytes(3 * MiB) + b"tail"
    r = _import(qd, "work", "private", f"{len(payload)}\n".encode() + payload)
    assert r.returncode == 0 and r.stdout == b"0\0", r
    lv = qd.lv("vm-work-private")
    assert lv.read_bytes() == payload and lv.stat().st_blocks * 512 < 2 * MiB  # the zero MiBs stay holes
    assert qd.info("work", "private")["size"] == str(len(payload))
    reqs = [q for q in qd.requests() if q["method"].startswith("internal.")]
    calls = [(q["method"], q["arg"], q["dest"], q["payload"]) for q in reqs]
    assert calls == [("internal.vm.volume.ImportBegin", "private", "work", str(len(payload))),
                     ("internal.vm.volume.ImportEnd", "private", "work", "ok")]  # fmt: skip


def test_import_service_early_eof_and_refusal(qd: Qd) -> None:
    before = qd.lv("vm-work-private").read_bytes()
    r = _import(qd, "work", "private", b"100000\n" + b"x" * 1000)
    assert r.returncode == 0 and r.stdout.startswith(b"2\0QubesException\0\0Data import failed:"), r
    assert qd.lv("vm-work-private").read_bytes() == before and not qd.lv("vm-work-private-import").exists()
    qd.ok("admin.vm.Start", "work")
    r = _import(qd, "work", "private", b"4\nabcd")
    assert r.returncode == 0 and r.stdout.startswith(b"2\0QubesVMNotHaltedError\0"), r
    r = _import(qd, "work", "private", b"12345678901234567890123\n")
    assert r.returncode == 0 and r.stdout.startswith(b"2\0")


# -- the lvm stand-in -------------------------------------------------------------------------------------------
def _lvm(qd: Qd, *args: str, warn: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QUBES_SIM_LVM_WARN": "1" if warn else "0"}
    return subprocess.run([*LVM, str(qd.sim / "dom0/dev"), *args], env=env, capture_output=True, text=True)


def test_lvm_stand_in(qd: Qd) -> None:
    r = _lvm(qd, "lvcreate", "--setactivationskip=n", "--activate", "y", "--snapshot", "--type=thin",
             "--permission=r", "--addtag=qubes-backup-snapshot", "--name=qbackup-1-x-0", "--",
             "qubes_dom0/vm-work-private", warn=True)  # fmt: skip
    assert r.returncode == 0 and "WARNING" in r.stderr, r
    snap = qd.lv("qbackup-1-x-0")
    assert snap.read_bytes() == qd.lv("vm-work-private").read_bytes()
    r = _lvm(qd, "lvs", "--noheadings", "--separator=|", "-o", "vg_name,lv_name,lv_tags")
    rows = [line.strip().split("|") for line in r.stdout.splitlines()]
    assert ["qubes_dom0", "qbackup-1-x-0", "qubes-backup-snapshot"] in rows
    assert ["qubes_dom0", "vm-work-private", ""] in rows
    r = _lvm(qd, "lvcreate", "--snapshot", "--type=thin", "--name=qbackup-1-x-0", "--", "qubes_dom0/vm-work-private")
    assert r.returncode == 5 and "already exists" in r.stderr
    r = _lvm(qd, "lvcreate", "--snapshot", "--type=thin", "--name=s2", "--", "qubes_dom0/vm-nope-private")
    assert r.returncode == 5 and r.stderr.strip() == 'Failed to find logical volume "qubes_dom0/vm-nope-private"'
    assert _lvm(qd, "lvremove", "-f", "qubes_dom0/qbackup-1-x-0").returncode == 0 and not snap.exists()
    r = _lvm(qd, "lvremove", "-f", "qubes_dom0/qbackup-1-x-0")
    assert r.returncode == 5 and 'Failed to find logical volume "qubes_dom0/qbackup-1-x-0"' in r.stderr
    assert _lvm(qd, "lvchange", "-an", "qubes_dom0/vm-work-private").returncode == 5
    assert _lvm(qd, "lvcreate", "--bogus", "x").returncode == 3
    assert _lvm(qd, "lvcreate", "--snapshot", "--name=../x", "--", "qubes_dom0/vm-work-private").returncode == 3
    assert "vm-work-private" in qd.ok("admin.vm.volume.Info", "work", "private")  # qubesd sees the same VG


def test_launch_reuses_a_running_server_and_fails_clearly(qd: Qd, tmp_path: Path) -> None:
    pid = (qd.sim / "dom0" / launch.PIDFILE).read_text()
    assert launch.ensure_qubesd(qd.sim) == qd.sock
    assert (qd.sim / "dom0" / launch.PIDFILE).read_text() == pid
    with pytest.raises(launch.LaunchError, match="not a simulated Qubes system"):
        launch.ensure_qubesd(tmp_path / "empty")
    broken = tmp_path / "broken"
    (broken / "dom0/var/lib/qubes").mkdir(parents=True)
    (broken / "dom0/var/lib/qubes/qubes.xml").write_text("<qubes><domains><domain/></domains></qubes>")
    with pytest.raises(launch.LaunchError, match="exited with status 1"):
        launch.ensure_qubesd(broken)
