"""The simulated qubesd serves each Qubes release's own Admin API (``--release 4.2|4.3``, or the system's
``/etc/qubes-release`` that simgen writes): VM list fields, device calls and their payloads, notes, the
property catalog and refusals, as qubes-core-admin's ``release4.2`` / ``release4.3`` branches have them.

The ``REAL_*`` lines are what the real qubesd answered for the same state (qubes-core-admin release4.2
702cc3f951bc and release4.3 68fc8b6bb917, run with ../shared/realqubesd): the simulation must give the same
lines, not merely lines of the same shape.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree
from qubes_backup_sim import launch, release, simgen

# admin.vm.List, admin.vm.device.{pci,block}.List (4.2) / .Assigned (4.3) of the harness's "source" system
REAL_42_LIST = "dom0 class=AdminVM state=Running\n"
REAL_43_LIST = "dom0 class=AdminVM state=Running uuid=00000000-0000-0000-0000-000000000000\n"
REAL_42_PCI = "dom0+00_03.0 no-strict-reset=True permissive=True persistent=yes\n"
REAL_42_BLOCK = "sys-usb+sda1 frontend-dev=xvdi read-only=yes persistent=yes\n"
REAL_43_PCI = ("dom0+00_03.0:* device_id='*' port_id='00_03.0' devclass='pci' backend_domain='dom0' mode='required' "
               "frontend_domain='legacy-hvm' _no-strict-reset='True' _permissive='True'\n")  # fmt: skip
REAL_43_BLOCK = ("sys-usb+sda1:* device_id='*' port_id='sda1' devclass='block' backend_domain='sys-usb' "
                 "mode='required' frontend_domain='work' _frontend-dev='xvdi' _read-only='yes'\n")  # fmt: skip
# the real R4.3 qubesd after Assign with a device id in the payload and an auto-attach mode
REAL_43_IDENTITY = ("dom0+00_04.0:8086:1234::p020000 device_id='8086:1234::p020000' port_id='00_04.0' "
                    "devclass='pci' backend_domain='dom0' mode='required'")  # fmt: skip
REAL_43_EXISTS = "'pci device dom0:00_04.0:* already assigned to vault'"
REAL_43_ATTACH_HALTED = "VM not running, cannot attach device, do you mean `assign`?"
# what Qubes' own client (qubesadmin.devices.assign) sends for a restored PCI assignment
CLIENT_43_ASSIGN = (b"device_id='*' port_id='00_04.0' devclass='pci' backend_domain='dom0' mode='required' "
                    b"frontend_domain='vault' _no-strict-reset='True'")  # fmt: skip


class Qd:
    """One connection per call, as qubesadmin makes them; ``None`` when qubesd closed it without a reply."""

    def __init__(self, sim: Path, sock: Path) -> None:
        self.sim, self.sock = sim, sock

    def call(self, method: str, dest: str = "dom0", arg: str = "", payload: bytes = b"") -> bytes:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.sock))
        try:
            s.sendall(f"{method}+{arg} dom0 name {dest}\0".encode() + payload)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out
        finally:
            s.close()

    def ok(self, method: str, dest: str = "dom0", arg: str = "", payload: bytes = b"") -> str:
        reply = self.call(method, dest, arg, payload)
        assert reply.startswith(b"0\0"), (method, reply)
        return reply[2:].decode()

    def err(self, method: str, dest: str = "dom0", arg: str = "", payload: bytes = b"") -> tuple[str, str]:
        reply = self.call(method, dest, arg, payload)
        assert reply.startswith(b"2\0") and reply.endswith(b"\0"), (method, reply)
        exc, _tb, msg = reply[2:-1].split(b"\0")
        return exc.decode(), msg.decode()

    def refused(self, method: str, dest: str = "dom0", arg: str = "", payload: bytes = b"") -> bool:
        return self.call(method, dest, arg, payload) == b""

    def xml_devices(self, vm: str) -> list[dict[str, str]]:
        root = etree.parse(str(self.sim / "dom0/var/lib/qubes/qubes.xml")).getroot()
        dom = next(d for d in root.iter("domain") if d.findtext("properties/property[@name='name']") == vm)
        return [{**dev.attrib, **{f"option:{o.get('name')}": o.text or "" for o in dev.iter("option")},
                 "class": devs.get("class", "")}
                for devs in dom.iter("devices") for dev in devs.iter("device")]  # fmt: skip


def _start(sim: Path, **kw: object) -> Iterator[Qd]:
    sock = launch.ensure_qubesd(sim, idle=60, **kw)  # type: ignore[arg-type]
    try:
        yield Qd(sim, sock)
    finally:
        launch.stop_qubesd(sim)


@pytest.fixture
def qd42(tmp_path: Path) -> Iterator[Qd]:
    simgen.generate(tmp_path / "r42", "small", release="4.2")
    yield from _start(tmp_path / "r42")


@pytest.fixture
def qd43(tmp_path: Path) -> Iterator[Qd]:
    simgen.generate(tmp_path / "r43", "small", release="4.3")
    yield from _start(tmp_path / "r43")


# -- the release of a system -------------------------------------------------------------------------------------
def test_simgen_writes_the_release_and_its_files(tmp_path: Path) -> None:
    for rel in ("4.2", "4.3"):
        sim = tmp_path / rel
        simgen.generate(sim, "small", release=rel)
        assert release.read_release(sim / "dom0") == rel
        point = ".4" if rel == "4.2" else ".0"
        assert (sim / "dom0/etc/qubes-release").read_text() == f"Qubes release {rel}{point} (R{rel})\n"
        root = etree.parse(str(sim / "dom0/var/lib/qubes/qubes.xml")).getroot()
        devs = {dev.get("id"): dict(dev.attrib) for dev in root.iter("device")}
        extra = {"mode": "required", "identity": "*"} if rel == "4.3" else {}
        assert devs == {"00_14.3": {"id": "00_14.3", "backend-domain": "dom0", **extra},
                        "loop7": {"id": "loop7", "backend-domain": "dom0", **extra}}  # fmt: skip
        notes = sorted(p.parent.name for p in (sim / "dom0/var/lib/qubes").rglob("notes.txt"))
        assert notes == ([] if rel == "4.2" else sorted(notes)) and (rel == "4.2" or "work" in notes)
    assert release.read_release(tmp_path / "nothing") == release.DEFAULT == "4.3"  # built before releases
    with pytest.raises(ValueError, match="unknown Qubes release"):
        simgen.generate(tmp_path / "x", "small", release="4.1")


def test_release_option_overrides_the_system(tmp_path: Path) -> None:
    simgen.generate(tmp_path / "sim", "small", release="4.3")
    for qd in _start(tmp_path / "sim", release="4.2"):
        assert qd.ok("admin.vm.List", "dom0").startswith(REAL_42_LIST)


# -- VM list -----------------------------------------------------------------------------------------------------
def test_vm_list_fields(qd42: Qd, qd43: Qd) -> None:
    l42, l43 = qd42.ok("admin.vm.List"), qd43.ok("admin.vm.List")
    assert l42.startswith(REAL_42_LIST) and l43.startswith(REAL_43_LIST)  # dom0 first, then by name
    names = [line.split()[0] for line in l43.splitlines()]
    assert names[0] == "dom0" and names[1:] == sorted(names[1:])
    assert [line.split()[0] for line in l42.splitlines()] == names
    assert all(len(line.split()) == 3 for line in l42.splitlines())
    root = etree.parse(str(qd43.sim / "dom0/var/lib/qubes/qubes.xml")).getroot()
    uuid = next(d.findtext("properties/property[@name='uuid']") for d in root.iter("domain")
                if d.findtext("properties/property[@name='name']") == "work")  # fmt: skip
    assert qd43.ok("admin.vm.List", "work") == f"work class=AppVM state=Halted uuid={uuid}\n"
    assert qd42.ok("admin.vm.List", "work") == "work class=AppVM state=Halted\n"


# -- R4.2 devices ------------------------------------------------------------------------------------------------
def test_r42_device_list_and_attach(qd42: Qd) -> None:
    q = qd42
    assert q.ok("admin.vm.device.pci.List", "sys-net") == "dom0+00_14.3 persistent=yes\n"
    assert q.ok("admin.vm.device.block.List", "work") == REAL_42_BLOCK.replace("sys-usb+sda1", "dom0+loop7")
    # Qubes' R4.2 restore: Attach with persistent=True and the options; the list shows them, persistent last
    assert q.ok("admin.vm.device.pci.Attach", "legacy-hvm", "dom0+00_03.0",
                b"persistent=True no-strict-reset=True permissive=True") == ""  # fmt: skip
    assert q.ok("admin.vm.device.pci.List", "legacy-hvm") == REAL_42_PCI
    assert q.ok("admin.vm.device.pci.List", "legacy-hvm", "dom0+00_03.0") == REAL_42_PCI
    assert q.ok("admin.vm.device.pci.List", "legacy-hvm", "dom0+00_1f.0") == ""
    assert {"id": "00_03.0", "backend-domain": "dom0", "option:no-strict-reset": "True", "option:permissive": "True",
            "class": "pci"} in q.xml_devices("legacy-hvm")  # fmt: skip
    assert q.err("admin.vm.device.pci.Attach", "legacy-hvm", "dom0+00_03.0", b"persistent=True")[0] == \
        "DeviceAlreadyAttached"  # fmt: skip
    assert q.err("admin.vm.device.pci.Attach", "vault", "dom0+00_04.0", b"no-strict-reset=True") == (
        "QubesVMNotRunningError", "VM not running, can only attach device with persistent flag")
    assert q.err("admin.vm.device.pci.Attach", "personal", "dom0+00_04.0", b"persistent=True")[1] == \
        "Can't attach PCI device to VM in pvh mode"  # fmt: skip
    # what R4.2's qubesd refuses by closing the connection
    assert q.refused("admin.vm.device.pci.Attach", "legacy-hvm", "nosuchvm+00_04.0", b"persistent=True")
    assert q.refused("admin.vm.device.pci.Attach", "legacy-hvm", "dom0+00_04.0", b"persistent=True bad'=x")
    assert q.refused("admin.vm.device.pci.Attach", "legacy-hvm", "dom0+00_04.0", b"persistent=True k=a'b")
    assert q.refused("admin.vm.device.pci.Attach", "legacy-hvm", "dom0+zz", b"persistent=True")
    # block: the options R4.2's block extension knows; read-only asked of a halted backend's device: refused
    assert q.err("admin.vm.device.block.Attach", "vault", "sys-net+sdb", b"persistent=True color=red")[1] == \
        "Unsupported option color"  # fmt: skip
    assert q.refused("admin.vm.device.block.Attach", "vault", "sys-net+sdb", b"persistent=True")
    assert q.ok("admin.vm.device.block.Attach", "vault", "sys-net+sdb", b"persistent=True read-only=True") == ""
    assert q.ok("admin.vm.device.block.List", "vault") == "sys-net+sdb read-only=yes persistent=yes\n"
    assert q.ok("admin.vm.device.block.Detach", "vault", "sys-net+sdb") == ""
    assert q.ok("admin.vm.device.block.List", "vault") == ""
    # R4.3's calls do not exist
    for method in ("Assigned", "Attached", "Assign", "Unassign"):
        assert q.refused(f"admin.vm.device.pci.{method}", "vault", "dom0+00_04.0" if "ssign" in method[:6] else "",
                         CLIENT_43_ASSIGN if method == "Assign" else b"")  # fmt: skip


# -- R4.3 devices ------------------------------------------------------------------------------------------------
def test_r43_assigned_and_assign(qd43: Qd) -> None:
    q = qd43
    assert q.refused("admin.vm.device.pci.List", "sys-net")
    assert q.ok("admin.vm.device.block.Assigned", "work") == REAL_43_BLOCK.replace("sys-usb+sda1", "dom0+loop7") \
        .replace("port_id='sda1'", "port_id='loop7'").replace("backend_domain='sys-usb'", "backend_domain='dom0'")
    assert q.ok("admin.vm.device.pci.Attached", "sys-net") == ""  # nothing runs: nothing is attached
    # Qubes' client's serialization, and a minimal one (every key but mode is optional)
    assert q.ok("admin.vm.device.pci.Assign", "legacy-hvm", "dom0+00_03.0",
                b"mode='required' _no-strict-reset='True' _permissive='True'") == ""  # fmt: skip
    assert q.ok("admin.vm.device.pci.Assigned", "legacy-hvm") == REAL_43_PCI
    assert q.ok("admin.vm.device.pci.Assign", "vault", "dom0+00_04.0", CLIENT_43_ASSIGN) == ""
    assert q.err("admin.vm.device.pci.Assign", "vault", "dom0+00_04.0", b"mode='required'") == (
        "DeviceAlreadyAssigned", REAL_43_EXISTS)
    assert q.ok("admin.vm.device.pci.Unassign", "vault", "dom0+00_04.0") == ""
    # a device identity given in the payload; modes
    assert q.ok("admin.vm.device.pci.Assign", "vault", "dom0+00_04.0",
                b"device_id='8086:1234::p020000' mode='required'") == ""  # fmt: skip
    assert q.ok("admin.vm.device.pci.Assigned", "vault").startswith(REAL_43_IDENTITY)
    assert q.ok("admin.vm.device.block.Assign", "vault", "sys-net+sdc", b"mode='auto-attach' _devtype='cdrom'") == ""
    assert "mode='auto-attach' frontend_domain='vault' _devtype='cdrom'\n" in q.ok("admin.vm.device.block.Assigned",
                                                                                   "vault")  # fmt: skip
    assert {"id": "sdc", "backend-domain": "sys-net", "mode": "auto-attach", "identity": "*",
            "option:devtype": "cdrom", "class": "block"} in q.xml_devices("vault")  # fmt: skip
    # refused by closing the connection: manual or unknown modes, unknown keys, a mismatching port, R4.2's payload
    for payload in (b"mode='manual'", b"mode='bogus'", b"mode='required' color='x'",
                    b"port_id='00_05.0' mode='required'", b"persistent=True no-strict-reset=True",
                    b"mode='required' _k='\xff'"):  # fmt: skip
        assert q.refused("admin.vm.device.pci.Assign", "work", "dom0+00_04.0", payload), payload
    assert q.refused("admin.vm.device.block.Assign", "vault", "nosuchvm+sdc", b"mode='auto-attach'")
    # live attachment only
    assert q.err("admin.vm.device.pci.Attach", "vault", "dom0+00_04.0", b"mode='manual'") == (
        "QubesVMNotRunningError", REAL_43_ATTACH_HALTED)
    assert q.err("admin.vm.device.pci.Unassign", "work", "dom0+00_04.0")[0] == "DeviceNotAssigned"


def test_r43_loads_an_r42_qubes_xml(tmp_path: Path) -> None:
    """A system upgraded from R4.2: assignments without a mode are required ones; qubesd writes them back with
    mode and identity at its next change."""
    simgen.generate(tmp_path / "sim", "small", release="4.2")
    release.write_release(tmp_path / "sim/dom0", "4.3")
    for q in _start(tmp_path / "sim"):
        assert "mode='required'" in q.ok("admin.vm.device.pci.Assigned", "sys-net")
        q.ok("admin.vm.tag.Set", "work", "x")
        assert {"id": "00_14.3", "backend-domain": "dom0", "mode": "required", "identity": "*", "class": "pci"} in \
            q.xml_devices("sys-net")  # fmt: skip


# -- notes, properties, labels, refusals -------------------------------------------------------------------------
def test_notes_and_properties_per_release(qd42: Qd, qd43: Qd) -> None:
    assert qd43.ok("admin.vm.notes.Get", "work").startswith("work: AppVM")
    assert qd43.ok("admin.vm.notes.Set", "work", payload=b"hello\n") == ""
    assert qd43.ok("admin.vm.notes.Get", "work") == "hello\n"
    assert qd42.refused("admin.vm.notes.Get", "work") and qd42.refused("admin.vm.notes.Set", "work", payload=b"x")
    for prop in ("bootmode", "devices_denied", "stubdom_uuid"):
        assert qd43.ok("admin.vm.property.Get", "work", prop).startswith("default=True type=str")
        assert qd42.err("admin.vm.property.Get", "work", prop)[0] == "QubesNoSuchPropertyError"
    assert "appvm_default_bootmode " in qd43.ok("admin.vm.property.GetAll", "fedora-41")
    assert "appvm_default_bootmode " not in qd42.ok("admin.vm.property.GetAll", "fedora-41")


def test_label_create_and_remove(qd43: Qd) -> None:
    q = qd43
    assert q.ok("admin.label.Create", "dom0", "teal", b"0x008080") == ""
    assert q.ok("admin.label.Get", "dom0", "teal") == "0x008080" and q.ok("admin.label.Index", "dom0", "teal") == "9"
    assert q.err("admin.label.Create", "dom0", "teal", b"0x008080") == ("QubesValueError", "label already exists")
    for arg, color in (("12", b"0x008080"), ("te al", b"0x008080"), ("navy", b"008080"), ("navy", b"0x00808g")):
        assert q.refused("admin.label.Create", "dom0", arg, color)
    assert q.ok("admin.vm.property.Set", "vault", "label", b"teal") == ""
    assert q.err("admin.label.Remove", "dom0", "teal") == ("QubesException", "label still in use")
    assert q.ok("admin.vm.property.Set", "vault", "label", b"black") == ""
    assert q.ok("admin.label.Remove", "dom0", "teal") == ""
    assert q.refused("admin.label.Remove", "dom0", "red")  # Qubes' own labels stay
    assert q.err("admin.label.Remove", "dom0", "teal") == ("QubesValueError", "")


@pytest.mark.parametrize("rel", ["4.2", "4.3"])
def test_refusals_close_the_connection(tmp_path: Path, rel: str) -> None:
    """PermissionDenied, ProtocolError and unknown methods get no reply (qubesd aborts the connection); a
    QubesException gets its ``2`` reply."""
    simgen.generate(tmp_path / "sim", "small", release=rel)
    for q in _start(tmp_path / "sim"):
        assert q.refused("admin.vm.NoSuchCall", "work")
        assert q.refused("admin.vm.List", "dom0", "", b"payload")
        assert q.refused("admin.vm.property.Get", "work")  # argument missing
        assert q.refused("admin.vm.firewall.Set", "work", payload=b"action=maybe\n")
        assert q.call("admin.vm.List", "dom0", "", b"x" * (65 << 10)) == b""  # request too large
        assert q.err("admin.vm.List", "nosuchvm")[0] == "QubesVMNotFoundError"
        assert q.ok("admin.vm.tag.Set", "work", "created-by-sys-net") == ""  # from dom0: allowed
