"""A backup made on a compromised machine (issue 18, docs/SECURITY.md "Backups from a compromised machine"):
it verifies under the passphrase and every setting in it is the attacker's.  Through the real CLI against
the simulated qubesd, which applies Qubes' own 85-admin-backup-restore policy to VMs' calls:

- tags a qrexec policy trusts never come back, whatever the options, so a restored VM cannot take over the
  next restore (the policy-85 takeover);
- devices and the other settings that grant power are shown, asked about on a terminal, and without one
  restored only with --restore-devices / --restore-risky-settings, one warning line each, listed by --json;
- no restore while a VM holds backup-restore-mgmt;
- what killed restores left is cleaned only after the passphrase verified the backup and the user agreed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import (
    ALL_SETTINGS,
    IN_PROGRESS,
    PASSPHRASE,
    STAGING_PREFIX,
    VM_BACKUPS,
    Sim,
    make_fresh,
    new_sim,
    one_error_line,
    share_backup,
)
from qubes_backup_dom0.qubes.adminapi import AdminAPI
from test_cli_compat import _on_terminal
from vm_calls import call_as, refused

VMS = ("fedora-41", "debian-12", "sys-net", "sys-firewall", "personal", "work")
USER_POLICY = "qubes.Filecopy * @tag:trusted-by-policy @anyvm allow\nqubes.VMShell * @tag:quarantine @anyvm deny\n"
DEAD_OWNER = "qubes-backup-restore-999999999-1-deadbeef"


def _api(sim: Sim) -> AdminAPI:
    return AdminAPI(sim.system.admin_socket())


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Sim, Path]:
    """A backup whose VMs carry what an attacker would put there (sys-net as simgen makes it already has a
    PCI device with no-strict-reset, autostart, provides_network, virt_mode hvm)."""
    src = new_sim(tmp_path_factory.mktemp("hostile") / "sim")
    api = _api(src)
    for tag in ("backup-restore-mgmt", "backup-restore-storage"):
        api.call("admin.vm.tag.Set", "work", tag)
    for tag in ("trusted-by-policy", "quarantine", "plain-tag"):
        api.call("admin.vm.tag.Set", "personal", tag)
    api.call("admin.vm.feature.Set", "personal", "qemu-extra-args", b"-device evil")
    api.call("admin.vm.feature.Set", "personal", "gui-allow-fullscreen", b"1")
    api.call("admin.vm.feature.Set", "personal", "service.cups", b"1")  # an ordinary feature
    api.call("admin.vm.property.Set", "personal", "kernelopts", b"init=/bin/sh")
    api.call("admin.vm.property.Set", "personal", "debug", b"True")
    api.call("admin.vm.property.Set", "personal", "memory", b"700")  # an ordinary property
    api.call("admin.vm.device.pci.Assign", "sys-net", "dom0+00_1f.6", b"mode='required' _permissive='True'")  # R4.3
    return src, src.backup_to_vm(*VMS)


def _target(base: Path, hostile: tuple[Sim, Path]) -> tuple[Sim, str]:
    src, backup = hostile
    dst = make_fresh(base, src)
    share_backup(backup, dst)
    (dst.dom0 / "etc/qubes/policy.d/30-user.policy").write_text(USER_POLICY)
    return dst, f"{VM_BACKUPS}/{backup.name}"


def _restore(dst: Sim, location: str, *options: str) -> tuple[int, str, dict[str, object]]:
    r = dst.run("qvm-backup-restore", "-y", "-p", "/pw", "--json", "--skip-conflicting", *options, "-d",
                "backupvm", location, *VMS)  # fmt: skip
    return r.returncode, r.stderr, json.loads(r.stdout)


def _tags(dst: Sim, vm: str) -> set[str]:
    return set(dst.collection()[vm].tags)


def test_without_a_terminal_nothing_that_grants_power_is_restored(tmp_path: Path,
                                                                  hostile: tuple[Sim, Path]) -> None:  # fmt: skip
    dst, location = _target(tmp_path / "dst", hostile)
    rc, err, doc = _restore(dst, location)
    assert rc == 0, err
    coll = dst.collection()
    # Policy tags never, the rest of the tags and settings not without the options.
    assert _tags(dst, "work") == {"created-by-dom0"}
    assert _tags(dst, "personal") == {"created-by-dom0"}
    personal, sysnet, fw = coll["personal"], coll["sys-net"], coll["sys-firewall"]
    assert personal.features == {"service.cups": "1"} and personal.properties["memory"] == "700"
    for prop in ("kernelopts", "debug"):
        assert not personal.has_property(prop)
    for prop in ("autostart", "provides_network", "virt_mode"):
        assert not sysnet.has_property(prop) and not fw.has_property("autostart")
    assert not any(len(d) for d in sysnet.element.iterfind("devices"))
    # A VM whose netvm did not keep provides_network stays offline (never another netvm).
    assert fw.raw_property("netvm") == "" and personal.raw_property("netvm") == ""
    # One warning line per setting not restored; --json lists the same settings.
    dropped = doc["dropped"]
    assert isinstance(dropped, list)
    got = {(d["vm"], d["kind"], d["name"]) for d in dropped}
    assert {("work", "tag", "backup-restore-mgmt"), ("work", "tag", "backup-restore-storage"),
            ("personal", "tag", "trusted-by-policy"), ("personal", "tag", "quarantine"),
            ("personal", "tag", "plain-tag"), ("personal", "feature", "qemu-extra-args"),
            ("personal", "feature", "gui-allow-fullscreen"), ("personal", "property", "kernelopts"),
            ("personal", "property", "debug"), ("sys-net", "device", "pci:dom0:00_1f.6"),
            ("sys-net", "property", "autostart"), ("sys-net", "property", "provides_network"),
            ("sys-net", "property", "virt_mode"), ("sys-firewall", "property", "autostart")} <= got  # fmt: skip
    warnings = [ln for ln in err.splitlines() if ln.startswith("qvm-backup-restore: warning: VM ")
                and (" not restored (" in ln or " not restored: " in ln)]  # fmt: skip
    assert len(warnings) == len(dropped), err
    assert any("pci device dom0:00_1f.6 (permissive=True)" in w and "--restore-devices" in w for w in warnings)
    never = {d["name"] for d in dropped if d["needs"] == "never"}
    assert never == {"backup-restore-mgmt", "backup-restore-storage", "trusted-by-policy"}
    # Otherwise complete: the VMs start.
    for vm in ("sys-net", "personal", "work"):
        _api(dst).call("admin.vm.Start", vm)


@pytest.mark.parametrize("options", [(), ALL_SETTINGS], ids=["default", "all-settings"])
def test_policy_tags_never_come_back_so_no_takeover_of_the_next_restore(
    tmp_path: Path, hostile: tuple[Sim, Path], options: tuple[str, ...]
) -> None:
    """The policy-85 takeover: the backup's work held backup-restore-mgmt.  Restored (with every option, or
    none), it has no policy tag, so while the next restore's VMs are tagged in progress, the simulated
    qubesd (applying Qubes' policy to work's calls) refuses work's changes to them."""
    dst, location = _target(tmp_path / "dst", hostile)
    r = dst.run("qvm-backup-restore", "-y", "-p", "/pw", "--skip-conflicting", *options, "-d", "backupvm",
                location, *VMS)  # fmt: skip
    rc, err = r.returncode, r.stderr
    assert rc == 0, err
    assert _tags(dst, "work") == {"created-by-dom0"}
    assert "trusted-by-policy" not in _tags(dst, "personal")
    if options:
        assert {"quarantine", "plain-tag"} <= _tags(dst, "personal")  # granted: restored
        coll = dst.collection()
        assert coll["personal"].raw_property("kernelopts") == "init=/bin/sh"
        assert coll["sys-net"].raw_property("autostart") == "True"
        assert coll["personal"].raw_property("netvm") == "sys-firewall"
    assert "VM work: tag backup-restore-mgmt not restored" in err
    # The next restore is in progress on "personal"; work tries to change it, as the policy would let a
    # backup-restore-mgmt VM do.
    _api(dst).call("admin.vm.tag.Set", "personal", IN_PROGRESS)
    assert refused(dst.system, "work", "admin.vm.property.Set", "personal", "kernelopts", b"evil")
    assert refused(dst.system, "work", "admin.vm.tag.Set", "personal", "backup-restore-mgmt")
    # The same call from a VM that holds the tag goes through: the refusal above is the policy's.
    _api(dst).call("admin.vm.tag.Set", "sys-net", "backup-restore-mgmt")
    call_as(dst.system, "sys-net", "admin.vm.property.Set", "personal", "kernelopts", b"evil")


def test_no_restore_while_a_vm_holds_backup_restore_mgmt(tmp_path: Path, hostile: tuple[Sim, Path]) -> None:
    dst, location = _target(tmp_path / "dst", hostile)
    _api(dst).call("admin.vm.tag.Set", "backupvm", "backup-restore-mgmt")
    names = sorted(dst.collection().names())
    r = dst.restore("-d", "backupvm", location)
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert "backupvm (tagged backup-restore-mgmt)" in line and "qvm-tags backupvm del backup-restore-mgmt" in line
    assert sorted(dst.collection().names()) == names and not dst.in_progress()


def test_on_a_terminal_the_user_chooses(tmp_path: Path, hostile: tuple[Sim, Path]) -> None:
    dst, location = _target(tmp_path / "dst", hostile)
    rc, err = _on_terminal(dst, ["qvm-backup-restore", "--skip-conflicting", "-d", "backupvm", location, *VMS],
                           [("passphrase", PASSPHRASE.encode() + b"\n"), ("restore the VMs above", b"y\n"),
                            ("device assignments", b"y\n"), ("[risky]", b"n\n")])  # fmt: skip
    assert rc == 0, err
    assert "[devices] pci device dom0:00_1f.6 (permissive=True)" in err
    assert "[never] tag backup-restore-mgmt" in err
    coll = dst.collection()
    pci = [d.get("id") for d in coll["sys-net"].element.iterfind("devices[@class='pci']/device")]
    assert pci == ["00_14.3", "00_1f.6"]
    assert coll["sys-net"].raw_property("virt_mode") == "hvm"  # goes with its PCI device
    assert not coll["sys-net"].has_property("autostart") and not coll["personal"].has_property("kernelopts")


# --------------------------------------------------------------------------------------------------- leftovers

def _leftover(dst: Sim, name: str, *tags: str) -> None:
    api = _api(dst)
    api.call("admin.vm.Create.AppVM", "dom0", "", f"name={name} label=red".encode())
    for tag in tags:
        api.call("admin.vm.tag.Set", name, tag)


@pytest.fixture
def with_leftovers(tmp_path: Path, hostile: tuple[Sim, Path]) -> tuple[Sim, str]:
    dst, location = _target(tmp_path / "dst", hostile)
    # fresh systems have no default template: give the leftovers one
    _leftover_template(dst)
    _leftover(dst, "lost", IN_PROGRESS, DEAD_OWNER)
    _leftover(dst, "notours", IN_PROGRESS, DEAD_OWNER + "-x")  # merely starts like an owner tag
    _leftover(dst, "nostart", IN_PROGRESS, "qubes-backup-restore-999999999-0-deadbeef")  # start unknown
    return dst, location


def _leftover_template(dst: Sim) -> None:
    api = _api(dst)
    if "fedora-41" not in dst.collection().names():
        api.call("admin.vm.Create.TemplateVM", "dom0", "", b"name=leftover-tpl label=black")
        dst.set_global("default_template", "leftover-tpl")


def test_leftovers_wait_for_the_passphrase_and_the_users_yes(with_leftovers: tuple[Sim, str]) -> None:
    dst, location = with_leftovers
    (dst.dom0 / "wrong").write_text("not the passphrase\n")
    r = dst.run("qvm-backup-restore", "-y", "-p", "/wrong", "-d", "backupvm", location, "fedora-41", "work")
    assert r.returncode == 3, r.stderr
    assert "lost" in dst.collection().names()  # a wrong passphrase changes nothing
    argv = ["qvm-backup-restore", "--skip-conflicting", "-d", "backupvm", location, "fedora-41", "work"]
    rc, err = _on_terminal(dst, argv, [("passphrase", PASSPHRASE.encode() + b"\n"),
                                       ("restore the VMs above", b"n\n")])  # fmt: skip
    assert rc == 0 and "remove VM lost (left by a killed restore" in err, err
    assert "lost" in dst.collection().names()  # "no": nothing removed
    r = dst.restore("--skip-conflicting", "-d", "backupvm", location, "fedora-41", "work")
    assert r.returncode == 0, r.stderr
    names = dst.collection().names()
    assert "lost" not in names and "removed VM lost (left by a killed restore)" in r.stderr
    assert "notours" in names and "nostart" in names  # owner tag not exactly ours / owner not provably dead


def test_a_killed_commits_home_staging_is_moved_into_place(tmp_path: Path, hostile: tuple[Sim, Path]) -> None:
    dst, location = _target(tmp_path / "dst", hostile)
    committed = dst.home / f"{STAGING_PREFIX}999999999-1-cafe0001"
    (committed / "vm0/home/user/Documents").mkdir(parents=True)
    (committed / "vm0/home/user/Documents/kept.txt").write_text("verified data\n")
    (committed / ".committed").write_text(json.dumps({"from": "vm0/home/user", "to": "home-restore-2026-01-02-030405"}))
    unfinished = dst.home / f"{STAGING_PREFIX}999999999-1-cafe0002"
    (unfinished / "vm0/home/user").mkdir(parents=True)
    r = dst.restore("--skip-conflicting", "-d", "backupvm", location, "fedora-41", "work")
    assert r.returncode == 0, r.stderr
    assert (dst.home / "home-restore-2026-01-02-030405/Documents/kept.txt").read_text() == "verified data\n"
    assert not committed.exists() and not unfinished.exists()
    assert "moved a killed restore's verified dom0 home to ~/home-restore-2026-01-02-030405" in r.stderr


def test_dom0_state_files_of_leftovers_are_ours_only(tmp_path: Path) -> None:
    """A staging directory whose mark points outside it, or whose target name is not ours, is removed, never
    followed."""
    from qubes_backup_dom0.restore import apply

    home = tmp_path / "home"
    for i, mark in enumerate([{"from": "../../etc", "to": "home-restore-2026-01-02-030405"},
                              {"from": "vm0/home/user", "to": "../../etc/x"}, "not a mark"]):  # fmt: skip
        staging = home / f"{STAGING_PREFIX}999999999-1-cafe000{i}"
        (staging / "vm0/home/user").mkdir(parents=True)
        (staging / ".committed").write_text(json.dumps(mark))
    handled = apply.cleanup_home_staging(home)
    assert len(handled) == 3 and sorted(os.listdir(home)) == []


# -------------------------------------------------------------------------------------- terminal neutralisation

#: C0 (CR, LF, TAB: what XML lets through), C1 (CSI, NEL), bidi overrides and isolates, a forged result line.
HOSTILE = "x\r\nRestored all VMs from backup 00\t\u009b2J\u0085\u202egnp.exe\u2066"


@pytest.fixture(scope="module")
def hostile_text(tmp_path_factory: pytest.TempPathFactory) -> tuple[Sim, Path]:
    """An authentic backup whose qubes.xml carries terminal controls in every text that can reach the
    terminal: a label name, a device id and its option, a tag, a feature, property values."""
    from lxml import etree
    from qubes_backup_dom0.api import run_backup
    from qubes_backup_dom0.backup.plan import plan_backup

    src = new_sim(tmp_path_factory.mktemp("controls") / "sim")
    plan = plan_backup(src.system, ["debian-12", "personal"])
    coll = plan.collection
    dom = coll["personal"]
    label = next(el for el in coll.root.iterfind("labels/label") if el.get("id") == dom.label_id)
    label.text = HOSTILE
    pci = etree.SubElement(dom.element, "devices", attrib={"class": "pci"})
    dev = etree.SubElement(pci, "device", attrib={"backend-domain": "dom0", "id": HOSTILE})
    etree.SubElement(dev, "option", name="permissive").text = HOSTILE
    etree.SubElement(dom.element.find("tags"), "tag", name=HOSTILE)
    dom.set_feature("gui-" + "x", HOSTILE)
    dom.set_property("kernelopts", HOSTILE)
    dom.set_property("kernel", HOSTILE)
    before = set(src.vm_backups.glob("qubes-backup-*"))
    run_backup(src.system, VM_BACKUPS, PASSPHRASE.encode(), plan=plan, dest_vm="backupvm")
    (new,) = set(src.vm_backups.glob("qubes-backup-*")) - before
    return src, new


def _assert_neutral(text: str) -> None:
    from qubes_backup_dom0.text import UNSAFE_RE

    for line in text.split("\n"):
        assert not UNSAFE_RE.search(line), repr(line)
        assert not line.startswith("Restored all VMs"), line


@pytest.mark.parametrize("options", [("--list",), ("--verify-only",), (), ("--restore-devices",), ALL_SETTINGS],
                         ids=["list", "verify", "restore", "devices", "all"])  # fmt: skip
def test_text_from_a_backup_reaches_the_terminal_neutralised(tmp_path: Path, hostile_text: tuple[Sim, Path],
                                                             options: tuple[str, ...]) -> None:  # fmt: skip
    dst, location = _target(tmp_path / "dst", hostile_text)
    r = dst.run("qvm-backup-restore", "-y", "-p", "/pw", "-v", "--ignore-missing", *options, "-d", "backupvm",
                location)
    _assert_neutral(r.stdout + r.stderr)
    if options == ALL_SETTINGS:  # such a tag is no valid tag: the restore fails in one (neutral) line
        assert r.returncode == 1 and "invalid argument 'x??Restored all VMs" in one_error_line(r.stderr)
    if options in ((), ("--restore-devices",)):  # the messages that carry the backup's words were all there
        assert r.returncode == 0, r.stderr
        for text in ("label x??Restored all VMs", "pci device dom0:x??Restored", "tag x??Restored all VMs",
                     "kernelopts=x??Restored", "[devices] pci device dom0:x??Restored"):  # fmt: skip
            assert text in r.stderr, (text, r.stderr)
