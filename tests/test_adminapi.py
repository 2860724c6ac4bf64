"""The qubesd client (wire protocol, strict reply parsing), the Qubes interface over it, firewall.xml."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pytest
from fakes.qubesd import FakeQubesd, error, ok
from fakes.system import FakeVM, install, volume_info
from hypothesis import given
from hypothesis import strategies as st
from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.qubes import adminapi, firewall
from qubes_backup_dom0.qubes.adminapi import AdminAPI, AdminAPIError, PolicyDenied, QubesdError
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.qubes.system import System


@pytest.fixture
def fq(tmp_path: Path):
    with FakeQubesd(tmp_path / "qubesd.sock") as server:
        yield server


def test_request_wire_format_and_ok_reply(fq: FakeQubesd) -> None:
    fq.add("admin.vm.feature.Set", "work", "gui", b"1", reply=ok(b""))
    fq.add("admin.vm.List", reply=ok(b"dom0 class=AdminVM state=Running\n"))
    api = AdminAPI(fq.path, timeout=5)
    assert api.call("admin.vm.feature.Set", "work", "gui", b"1") == b""
    assert api.call("admin.vm.List") == b"dom0 class=AdminVM state=Running\n"
    assert fq.requests == [("admin.vm.feature.Set", "work", "gui", b"1"), ("admin.vm.List", "dom0", "", b"")]
    assert not fq.malformed


def test_error_reply_is_one_line_with_message(fq: FakeQubesd) -> None:
    fq.add("admin.vm.property.Get", "nope", "label", reply=error("QubesVMNotFoundError", "No such domain: 'nope'"))
    with pytest.raises(QubesdError) as ei:
        AdminAPI(fq.path).call("admin.vm.property.Get", "nope", "label")
    assert ei.value.exc_type == "QubesVMNotFoundError"
    assert ei.value.message == "No such domain: 'nope'"
    assert str(ei.value) == "qubesd: admin.vm.property.Get on nope failed: No such domain: 'nope'"
    assert isinstance(ei.value, BackupError)


def test_empty_reply_is_policy_denied(fq: FakeQubesd) -> None:
    fq.add("admin.vm.Start", "work", reply=b"")
    with pytest.raises(PolicyDenied):
        AdminAPI(fq.path).call("admin.vm.Start", "work")


def test_unexpected_request_is_recorded(fq: FakeQubesd) -> None:
    with pytest.raises(QubesdError):
        AdminAPI(fq.path).call("admin.vm.Remove", "work")
    assert fq.unexpected == [("admin.vm.Remove", "work", "", b"")]


def test_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AdminAPIError, match=r"^cannot reach qubesd at .*nothing\.sock: "):
        AdminAPI(tmp_path / "nothing.sock").call("admin.vm.List")


def test_oversized_request_refused_before_sending(fq: FakeQubesd) -> None:
    with pytest.raises(AdminAPIError, match="too large"):
        AdminAPI(fq.path).call("admin.vm.notes.Set", "work", "", b"x" * 70000)
    assert fq.requests == []


@pytest.mark.parametrize("bad", ["with space", "a\0b", "new\nline", ""])
def test_bad_tokens_refused(fq: FakeQubesd, bad: str) -> None:
    with pytest.raises(AdminAPIError):
        AdminAPI(fq.path).call("admin.vm.List", bad)


@pytest.mark.parametrize(
    "raw",
    [b"1\0x", b"0", b"2\0Exc\0\0msg", b"2\0Exc\0tb\0msg\0extra\0", b"2\0bad type\0\0m\0", b"garbage", b"2\0"],
)
def test_malformed_replies(raw: bytes) -> None:
    with pytest.raises(AdminAPIError, match="malformed reply"):
        adminapi.parse_reply(raw, "admin.vm.List", "dom0")


def test_error_message_control_chars_neutralised() -> None:
    with pytest.raises(QubesdError) as ei:
        adminapi.parse_reply(b"2\0QubesException\0\0line1\nline2\x1b[31m\0", "m", "d")
    assert "\n" not in str(ei.value) and "\x1b" not in str(ei.value)


def test_reply_bound(tmp_path: Path) -> None:
    with FakeQubesd(tmp_path / "s") as server:
        server.add("admin.vm.List", reply=ok(b"x" * (adminapi.MAX_REPLY + 10)))
        with pytest.raises(AdminAPIError, match="exceeds"):
            AdminAPI(server.path).call("admin.vm.List")


# -- parsers --------------------------------------------------------------------------------------------

_values = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@given(_values)
def test_getall_escaping_round_trip(value: str) -> None:
    line = f"description default=False type=str {value.replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + 'n')}\n"
    props = adminapi.parse_properties(line.encode())
    assert props["description"] == adminapi.Property(False, "str", value)


@given(st.binary(max_size=200))
def test_parsers_never_crash(data: bytes) -> None:
    for parse in (adminapi.parse_properties, adminapi.parse_kv, adminapi.parse_names, adminapi.parse_vm_list,
                  adminapi.parse_devices, adminapi.parse_property,
                  lambda d: adminapi.parse_assigned(d, "pci")):  # fmt: skip
        with contextlib.suppress(AdminAPIError):
            parse(data)  # type: ignore[operator]


def test_property_lines() -> None:
    props = adminapi.parse_properties(b"netvm default=True type=vm \nmemory default=False type=int 400\n"
                                      b"debug default=False type=bool True\n")  # fmt: skip
    assert props["netvm"] == adminapi.Property(True, "vm", "")
    assert props["memory"].value == "400" and props["debug"].value == "True"
    for bad in (b"x default=Maybe type=str v\n", b"x default=True type=bool yes\n", b"x default=True type=int 1.5\n",
                b"x default=True\n", b"x default=True type=str a\nx default=True type=str b\n",
                b"x default=True type=str a", b"x default=True type=str bad\\escape\n", b"\n"):  # fmt: skip
        with pytest.raises(AdminAPIError):
            adminapi.parse_properties(bad)
    assert adminapi.parse_property(b"default=False type=label red") == adminapi.Property(False, "label", "red")


def test_kv_names_vmlist_devices() -> None:
    assert adminapi.parse_kv(b"pool=lvm\nvid=qubes_dom0/vm-a-private\nsource=\n") == {
        "pool": "lvm", "vid": "qubes_dom0/vm-a-private", "source": ""}  # fmt: skip
    with pytest.raises(AdminAPIError):
        adminapi.parse_kv(b"pool=a\npool=b\n")
    assert adminapi.parse_names(b"") == []
    assert adminapi.parse_names(b"a\nb\n") == ["a", "b"]
    with pytest.raises(AdminAPIError):
        adminapi.parse_names(b"a b\n")
    assert adminapi.parse_vm_list(b"dom0 class=AdminVM state=Running\nwork class=AppVM state=Halted\n") == {
        "dom0": ("AdminVM", "Running"), "work": ("AppVM", "Halted")}  # fmt: skip
    with pytest.raises(AdminAPIError):
        adminapi.parse_vm_list(b"work class=AppVM\n")
    # R4.3: every line ends with the VM's uuid (dom0's is all zeros)
    r43 = adminapi.parse_vm_list_full(b"dom0 class=AdminVM state=Running uuid=00000000-0000-0000-0000-000000000000\n"
                                      b"work class=AppVM state=Halted uuid=8e4154df-6083-4a59-8316-58b408edbca8\n")
    assert r43.vms == {"dom0": ("AdminVM", "Running"), "work": ("AppVM", "Halted")}
    assert r43.uuids["work"] == "8e4154df-6083-4a59-8316-58b408edbca8"
    assert adminapi.parse_vm_list_full(b"dom0 class=AdminVM state=Running\n").uuids == {}
    for bad in (b"work class=AppVM state=Halted uuid=x\n", b"work class=AppVM state=Halted id=1\n",
                b"a class=AppVM state=Halted uuid=8e4154df-6083-4a59-8316-58b408edbca8\nb class=AppVM state=Halted\n"):
        with pytest.raises(AdminAPIError):
            adminapi.parse_vm_list(bad)
    devs = adminapi.parse_devices(b"dom0+00_14.0 persistent=yes no-strict-reset=True\nsys-usb+2-1 persistent=no\n")
    assert devs[0] == adminapi.DeviceAssignment("dom0", "00_14.0", "*", "required", {"no-strict-reset": "True"})
    assert not devs[1].persistent and devs[1].mode == "manual"
    with pytest.raises(AdminAPIError):
        adminapi.parse_devices(b"nobackend persistent=yes\n")


# R4.3's admin.vm.device.CLASS.Assigned lines, as the real qubesd answered (release4.3 68fc8b6bb917)
REAL_ASSIGNED = (b"dom0+00_03.0:* device_id='*' port_id='00_03.0' devclass='pci' backend_domain='dom0' mode='required' "
                 b"frontend_domain='legacy-hvm' _no-strict-reset='True' _permissive='True'\n"
                 b"dom0+00_04.0:8086:1234::p020000 device_id='8086:1234::p020000' port_id='00_04.0' devclass='pci' "
                 b"backend_domain='dom0' mode='auto-attach'\n")  # fmt: skip


def test_r43_assigned_lines() -> None:
    devs = adminapi.parse_assigned(REAL_ASSIGNED, "pci")
    assert devs == [
        adminapi.DeviceAssignment("dom0", "00_03.0", "*", "required",
                                  {"no-strict-reset": "True", "permissive": "True"}),
        adminapi.DeviceAssignment("dom0", "00_04.0", "8086:1234::p020000", "auto-attach", {})]  # fmt: skip
    # a quote inside a value is sent as \' and read back as it was
    line = (b"sys-usb+sda1:* device_id='*' port_id='sda1' devclass='block' backend_domain='sys-usb' mode='required' "
            b"_label='it\\'s mine'\n")  # fmt: skip
    assert adminapi.parse_assigned(line, "block")[0].options == {"label": "it's mine"}
    good = b"dom0+00_03.0:* device_id='*' port_id='00_03.0' devclass='pci' backend_domain='dom0' mode='required'"
    for bad in (good.replace(b"dom0+00_03.0:*", b"dom0+00_05.0:*"),  # the head is not the assignment
                good.replace(b"mode='required'", b"mode='manual'"),  # live attachments are not assignments
                good.replace(b" mode='required'", b""),  # no mode
                good + b" colour='red'",  # an unknown key
                good + b" mode='required'",  # a key twice
                good.replace(b"devclass='pci'", b"devclass='block'"),
                good.replace(b"'*'", b"'\x01'", 1), good[:-1], b"dom0+00_03.0:*"):  # fmt: skip
        with pytest.raises(AdminAPIError):
            adminapi.parse_assigned(bad + b"\n", "pci")


@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True),
                       st.from_regex(r"[A-Za-z0-9_.,+:-]{0,12}", fullmatch=True), max_size=4),
       st.sampled_from(["*", "8086:a0f0::p028000", "0000:0000::?******"]),
       st.sampled_from(adminapi.ASSIGNMENT_MODES))  # fmt: skip
def test_assign_serialization_round_trip(options: dict[str, str], device_id: str, mode: str) -> None:
    """What ``…Assign`` is sent reads back, through qubesd's own splitting, as the same assignment."""
    a = adminapi.DeviceAssignment("sys-usb", "sda1", device_id, mode, options)
    adminapi.check_assignment("block", a)
    payload = adminapi.serialize_assignment("block", a, "work").decode()
    line = f"sys-usb+sda1:{device_id} {payload}\n".encode()
    assert adminapi.parse_assigned(line, "block") == [a]


# -- the Qubes interface ----------------------------------------------------------------------------------

def _qubes(fq: FakeQubesd) -> Qubes:
    return Qubes(System(None, Path("/"), "user"), AdminAPI(fq.path, timeout=5))


def test_collection_from_api_answers(fq: FakeQubesd) -> None:
    tpl = FakeVM("fedora", "TemplateVM", qid=2, label="black", volumes={
        "root": volume_info("lvm", "qubes_dom0/vm-fedora-root", 1 << 30, True),
        "volatile": volume_info("lvm", "qubes_dom0/vm-fedora-volatile", 1 << 30, False)})  # fmt: skip
    work = FakeVM(
        "work", qid=3, label="blue", features={"gui": "1", "service.cups": ""}, tags=["created-by-dom0", "mine"],
        props={"template": (False, "vm", "fedora"), "netvm": (False, "vm", ""),
               "description": (False, "str", "two\nlines \\ here")},
        devices={"pci": ["dom0+00_14.0 persistent=yes no-strict-reset=True", "dom0+00_15.0 persistent=no"]},
        volumes={"private": volume_info("lvm", "qubes_dom0/vm-work-private", 2 << 30, True),
                 "root": volume_info("lvm", "qubes_dom0/vm-work-root", 1 << 30, False,
                                     source="qubes_dom0/vm-fedora-root", rw="False")},
    )  # fmt: skip
    install(fq, [tpl, work], {"lvm": {"driver": "lvm_thin", "volume_group": "qubes_dom0", "thin_pool": "vm-pool"}})
    col = _qubes(fq).collection()
    assert col.names() == ["dom0", "fedora", "work"]
    assert col.labels["label-6"] == "blue"
    assert col.pools == {"lvm": {"name": "lvm", "driver": "lvm_thin", "volume_group": "qubes_dom0",
                                 "thin_pool": "vm-pool"}}  # fmt: skip
    assert col.global_properties == {"default_template": "fedora"}  # the default default_netvm is not stored
    w = col["work"]
    assert w.properties == {"name": "work", "label": "label-6", "qid": "3",
                            "uuid": "00000000-0000-0000-0000-000000000003",
                            "template": "fedora", "netvm": "", "description": "two\nlines \\ here"}  # fmt: skip
    assert w.label == "blue" and w.netvm is None and w.has_property("netvm")
    assert w.features == {"gui": "1", "service.cups": ""}
    assert w.tags == ["created-by-dom0", "mine"]
    devs = w.element.findall("devices")
    assert [d.get("class") for d in devs] == ["pci", "usb", "block", "mic"]
    pci = devs[0].findall("device")
    assert [(d.get("backend-domain"), d.get("id")) for d in pci] == [("dom0", "00_14.0")]  # only persistent
    assert pci[0].find("option").get("name") == "no-strict-reset"
    vols = {v.name: v for v in w.volumes}
    assert vols["private"].save_on_stop and vols["private"].rw and vols["private"].size == 2 << 30
    assert vols["root"].source == "qubes_dom0/vm-fedora-root" and not vols["root"].rw
    assert col["dom0"].volumes == []
    assert not fq.writes() and not fq.unexpected
    sub = _qubes(fq).collection(["work"])
    assert sub.names() == ["dom0", "work"]


def test_collection_unknown_vm(fq: FakeQubesd) -> None:
    install(fq, [FakeVM("work")], {})
    with pytest.raises(BackupError, match="no such VM: ghost"):
        _qubes(fq).collection(["ghost"])


def test_notes_never_asked_on_r42(fq: FakeQubesd) -> None:
    """R4.2 has no notes: not one admin.vm.notes.* call (the release is told from the VM list)."""
    install(fq, [FakeVM("a"), FakeVM("b", qid=2)], {}, release="4.2")
    q = _qubes(fq)
    assert q.notes("a") is None and q.notes("b") is None and q.set_notes("a", "x") is False
    assert q.release == "4.2"
    assert [r[0] for r in fq.requests] == ["admin.vm.List"] and not fq.unexpected


def test_notes_on_r43_and_refused_once(fq: FakeQubesd) -> None:
    install(fq, [FakeVM("a", notes=""), FakeVM("b", qid=2, notes="hello\n")], {}, release="4.3")
    q = _qubes(fq)
    assert q.notes("a") == "" and q.notes("b") == "hello\n" and q.release == "4.3"
    # refused (a policy without notes): asked once per run, then remembered
    fq.add("admin.vm.notes.Get", "a", reply=b"")
    q = _qubes(fq)
    assert q.notes("a") is None and q.notes("b") is None and q.notes("a") is None
    assert [r[1] for r in fq.requests if r[0] == "admin.vm.notes.Get"][2:] == ["a"]


def test_restore_writes_send_exact_requests(fq: FakeQubesd) -> None:
    for key in [("admin.vm.Create.AppVM", "dom0", "fedora", b"name=work label=red"),
                ("admin.vm.CreateInPool.TemplateVM", "dom0", "", b"name=t label=black pool=lvm"),
                ("admin.vm.property.Set", "work", "memory", b"800"),
                ("admin.vm.property.Reset", "work", "netvm", b""),
                ("admin.vm.feature.Set", "work", "gui", b"1"),
                ("admin.vm.tag.Set", "work", "backup-restore-in-progress", b""),
                ("admin.vm.tag.Remove", "work", "backup-restore-in-progress", b""),
                ("admin.vm.device.pci.Attach", "work", "dom0+00_14.0", b"persistent=True no-strict-reset=True"),
                ("admin.vm.device.pci.Assign", "work", "dom0+00_14.0",
                 b"device_id='8086:a0f0::p028000' port_id='00_14.0' devclass='pci' backend_domain='dom0' "
                 b"mode='required' frontend_domain='work' _no-strict-reset='True'"),
                ("admin.vm.device.usb.Assign", "work", "sys-usb+_",
                 b"device_id='1234:5678::u030102' port_id='*' devclass='usb' backend_domain='sys-usb' "
                 b"mode='ask-to-attach' frontend_domain='work'"),
                ("admin.label.Create", "dom0", "teal", b"0x008080"), ("admin.label.Remove", "dom0", "teal", b""),
                ("admin.vm.firewall.Set", "work", "", b"action=accept proto=tcp dstports=443-443\naction=drop\n"),
                ("admin.vm.notes.Set", "work", "", b"n"),
                ("admin.vm.Remove", "work", "", b"")]:  # fmt: skip
        fq.add(*key, reply=ok())
    q = _qubes(fq)
    q.create_vm("AppVM", "work", "red", "fedora")
    q.create_vm("TemplateVM", "t", "black", None, pool="lvm")
    q.set_property("work", "memory", "800")
    q.reset_property("work", "netvm")
    q.set_feature("work", "gui", "1")
    q.set_tag("work", "backup-restore-in-progress")
    q.remove_tag("work", "backup-restore-in-progress")
    pci = adminapi.DeviceAssignment("dom0", "00_14.0", "8086:a0f0::p028000", "required", {"no-strict-reset": "True"})
    q._release = "4.2"  # as its VM list would have said
    q.assign_device("work", "pci", dataclasses.replace(pci, device_id="*"))
    q._release = "4.3"
    q.assign_device("work", "pci", pci)
    q.assign_device("work", "usb", adminapi.DeviceAssignment("sys-usb", "*", "1234:5678::u030102", "ask-to-attach", {}))
    q.create_label("teal", "0x008080")
    q.remove_label("teal")
    q.set_firewall("work", ["action=accept proto=tcp dstports=443-443", "action=drop"])
    q.set_notes("work", "n")
    q.remove_vm("work")
    assert not fq.unexpected and len(fq.requests) == 15


# -- firewall.xml -----------------------------------------------------------------------------------------

RULES = ["action=accept proto=tcp dsthost=example.com dstports=443-443",
         "action=accept specialtarget=dns", "action=accept proto=icmp icmptype=8",
         "action=accept dst4=10.0.0.0/8 comment=office network, all ports", "action=drop"]  # fmt: skip


def test_firewall_round_trip() -> None:
    xml = firewall.rules_to_xml(RULES)
    assert xml.startswith(b"<?xml") and b'<firewall version="2">' in xml
    assert b'<property name="action">accept</property>' in xml
    assert firewall.xml_to_rules(xml) == RULES
    assert firewall.xml_to_rules(firewall.rules_to_xml([])) == []


@pytest.mark.parametrize("rule", ["proto=tcp", "action=allow", "action=accept bogus=1", "action=accept action=drop",
                                  "action=accept dsthost=a;b", "action=accept comment=a\x1bb", "noequals"])  # fmt: skip
def test_firewall_bad_rules(rule: str) -> None:
    with pytest.raises(firewall.FirewallError):
        firewall.rules_to_xml([rule])


@pytest.mark.parametrize("doc", [
    b"<firewall><rules/></firewall>",
    b'<firewall version="1"><rules/></firewall>',
    b'<firewall version="2"><rules><rule><properties><property name="x">1</property></properties></rule></rules>'
    b"</firewall>",
    b'<firewall version="2"><rules><rule><properties/><properties/></rule></rules></firewall>',
    b'<firewall version="2"><rules><rule>text<properties/></rule></rules></firewall>',
    b'<firewall version="2"><other/></firewall>',
    b'<!DOCTYPE x [<!ENTITY e "a">]><firewall version="2"><rules/></firewall>',
    b"<firewall",
])  # fmt: skip
def test_firewall_xml_strict(doc: bytes) -> None:
    with pytest.raises(firewall.FirewallError):
        firewall.xml_to_rules(doc)


@given(st.lists(st.sampled_from(RULES), max_size=8))
def test_firewall_round_trip_property(rules: list[str]) -> None:
    assert firewall.xml_to_rules(firewall.rules_to_xml(rules)) == rules


def test_device_options_cannot_smuggle_words(tmp_path: Path) -> None:
    """A device option from a backup is one KEY=VALUE word: a value with a space (``x persistent=False``) or a
    key that is not a plain name is refused before anything is sent."""
    from qubes_backup_dom0.qubes.adminapi import AdminAPIError
    from qubes_backup_dom0.qubes.interface import Qubes
    from qubes_backup_dom0.qubes.system import System

    class NoCalls:
        socket_path = str(tmp_path / "none")

        def call(self, *a: object) -> bytes:
            raise AssertionError(f"sent {a}")

    q = Qubes(System(None, Path("/"), "user"), api=NoCalls())  # type: ignore[arg-type]
    for release in ("4.2", "4.3"):
        q._release = release
        for devclass, options, devid in (("pci", {"x": "1 persistent=False"}, "*"), ("pci", {"A B": "1"}, "*"),
                                         ("pci.Detach", {}, "*"), ("pci", {"x": "a'b"}, "*"),
                                         ("pci", {"x": "a=b"}, "*"), ("pci", {}, "x' mode='manual"),
                                         ("pci", {}, "a b")):  # fmt: skip
            with pytest.raises(AdminAPIError):
                a = adminapi.DeviceAssignment("dom0", "00_14.3", devid, "required", options)
                q.assign_device("vm", devclass, a)
        with pytest.raises(AdminAPIError):  # modes R4.3 assigns, nothing else
            q.assign_device("vm", "pci", adminapi.DeviceAssignment("dom0", "00_14.3", "*", "manual", {}))
    q._release = "4.2"
    with pytest.raises(AdminAPIError, match="by port only"):
        q.assign_device("vm", "usb", adminapi.DeviceAssignment("dom0", "*", "1234:5678::u030102", "required", {}))
