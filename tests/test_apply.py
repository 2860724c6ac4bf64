"""The apply step of a restore (apply.py) against an in-memory, strict stand-in for qubesd (fake_qubes.py):
creation order and tags, references mapped through one rename map, volume data byte-exact with holes,
firewall rules, rollback at every step, leftovers of a killed restore."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fake_qubes import FakeQubes, FakeVm
from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.format import extractor, tarwriter
from qubes_backup_dom0.format.header import Header
from qubes_backup_dom0.format.manifest import ArchiveEntry, FileEntry, Manifest
from qubes_backup_dom0.qubes import firewall
from qubes_backup_dom0.restore import apply
from qubes_backup_dom0.restore.plan import RestoreOptions, TargetSystem, plan_restore

MiB = 1 << 20
Backup = tuple[Manifest, dict[str, list[tarwriter.InnerFile]]]


def _domain(qid: int, klass: str, name: str, props: dict[str, str], vols: list[str]) -> str:
    p = "".join(f'<property name="{k}">{v}</property>' for k, v in {"name": name, "qid": str(qid),
                                                                    "label": "label-1", **props}.items())  # fmt: skip
    v = "".join(f'<volume name="{n}" pool="lvm" vid="qubes_dom0/vm-{name}-{n}" save_on_stop="True" size="{4 * MiB}"/>'
                for n in vols)  # fmt: skip
    opt = '<option name="no-strict-reset">True</option>'
    d = f'<devices class="pci"><device backend-domain="dom0" id="00_14.3">{opt}</device></devices>'
    d = d if name == "sys-net" else ""
    feats = '<feature name="backup-content">True</feature><feature name="gui">1</feature>'
    tags = '<tag name="created-by-dom0"/><tag name="mine"/>'
    return (f'<domain id="domain-{qid}" class="{klass}"><properties>{p}</properties><features>{feats}</features>'
            f'{d}<tags>{tags}</tags><volume-config>{v}</volume-config></domain>')


BACKUP_XML = (
    '<qubes><labels><label id="label-1" color="0xcc0000">red</label></labels><pools>'
    '<pool name="lvm" driver="lvm_thin" volume_group="qubes_dom0" thin_pool="vm-pool"/></pools>'
    '<properties><property name="default_template">fedora</property>'
    '<property name="default_netvm">sys-firewall</property></properties><domains>'
    '<domain id="domain-0" class="AdminVM"><properties><property name="label">label-1</property></properties></domain>'
    + _domain(1, "TemplateVM", "fedora", {}, ["root", "private"])
    + _domain(2, "AppVM", "sys-net", {"netvm": "", "provides_network": "True", "virt_mode": "hvm"}, ["private"])
    + _domain(3, "AppVM", "sys-firewall", {"netvm": "sys-net", "provides_network": "True"}, ["private"])
    + _domain(4, "AppVM", "sys-firewall1", {"netvm": "sys-net", "provides_network": "True"}, ["private"])
    + _domain(5, "AppVM", "work", {"netvm": "sys-firewall", "memory": "800"}, ["private"])
    + _domain(6, "AppVM", "work2", {"netvm": "sys-firewall1"}, ["private"])
    + "</domains></qubes>"
)
ORDER = ["fedora", "sys-net", "sys-firewall", "sys-firewall1", "work", "work2"]


@pytest.fixture
def backup(tmp_path: Path) -> Backup:
    """A manifest and, per VM, the files of its archive (volumes with holes, firewall.xml)."""
    files: dict[str, list[tarwriter.InnerFile]] = {}
    archives = []
    for i, name in enumerate(ORDER, 1):
        d = ("vm-templates/" if name == "fedora" else "appvms/") + name
        vm_files = []
        for vol in ["root", "private"] if name == "fedora" else ["private"]:
            src = tmp_path / f"{name}-{vol}.img"
            with open(src, "wb") as f:
                f.truncate(4 * MiB)
                f.seek(MiB + 3)
                f.write(f"{name}/{vol}".encode() * 1000)
            vm_files.append(tarwriter.InnerFile.from_path(f"{d}/{vol}.img", src))
        fw = tmp_path / f"{name}-firewall.xml"
        fw.write_bytes(firewall.rules_to_xml([f"action=accept dsthost={name}.example", "action=drop"]))
        vm_files.insert(0, tarwriter.InnerFile.from_path(f"{d}/firewall.xml", fw))  # first, as backups write it
        files[name] = vm_files
        entries = [FileEntry(f.path, f.type, f.size, f.data) for f in vm_files]
        archives.append(ArchiveEntry(f"vm{i}", name, "vm", entries))
    return Manifest("00" * 16, "2026-12-01T10:00:00Z", archives, BACKUP_XML.encode()), files


def _header() -> Header:
    from qubes_backup_dom0.format import crypto

    return Header(bytes(16), "2026-12-01T10:00:00Z", crypto.KdfParams(bytes(16), 1024, 8, 1), "none", 1 << 20)


def _target(fq: FakeQubes) -> TargetSystem:
    defaults = {k: fq.global_property(k) for k in ("default_template", "default_netvm", "default_dispvm")}
    return TargetSystem(frozenset(fq.vm_list()), defaults)


def _system_with(*names: str) -> FakeQubes:
    vms = {n: FakeVm("TemplateVM" if n == "fedora" else "AppVM", "red") for n in names}
    return FakeQubes(vms, {"default_template": "fedora", "default_netvm": "sys-firewall"} if "fedora" in names else {})


def _restore(fq: FakeQubes, backup: Backup, **opts: object) -> apply.Applier:
    """Restore ``backup`` into ``fq``; everything the user may agree to is restored unless ``opts`` say
    otherwise (what is not restored by default: tests/test_hostile_backup.py)."""
    manifest, files = backup
    opts = {"restore_devices": True, "restore_risky_settings": True, **opts}
    plan = plan_restore(_target(fq), _header(), manifest, RestoreOptions(**opts))  # type: ignore[arg-type]
    assert not plan.errors, plan.errors
    applier = apply.Applier(fq, plan, Path("/nonexistent-home"))  # type: ignore[arg-type]
    try:
        applier.create_all()
        for archive in plan.wanted:
            target = applier.target_for(archive)
            ex = extractor.Extractor(None, archive.files, sinks=target.sinks)
            for piece in tarwriter.write_archive(files[archive.vm]):
                ex.feed(piece)
            ex.finish()
            if target.done is not None:
                target.done()
        applier.commit()
    except BaseException:
        applier.rollback()
        raise
    return applier


def test_full_restore_creates_tags_first_then_commits(backup: Backup) -> None:
    fq = FakeQubes({})
    applier = _restore(fq, backup)
    assert [c[2] for c in fq.calls if c[0] == "create"] == ORDER  # templates first, dependencies before users
    for name in ORDER:
        vm = fq.vms[name]
        assert "backup-restore-in-progress" not in vm.tags and not any(t.startswith("qubes-backup-") for t in vm.tags)
        assert vm.tags == {"created-by-dom0", "mine"}
        assert vm.features == {"gui": "1"}  # backup-* markers are not restored
        assert vm.firewall == [f"action=accept dsthost={name}.example", "action=drop"]
        for f in backup[1][name]:
            if f.path.endswith(".img"):
                assert vm.volumes[Path(f.path).stem] == Path(str(f.source)).read_bytes()  # byte-exact, holes zero
    # backup_timestamp: the backup's (authenticated) creation time, 2026-12-01T10:00:00Z
    assert fq.vms["work"].props == {"template": "fedora", "netvm": "sys-firewall", "memory": "800",
                                    "backup_timestamp": "1796119200"}  # fmt: skip
    assert fq.vms["sys-net"].props["netvm"] == "" and fq.vms["sys-net"].props["virt_mode"] == "hvm"
    assert fq.vms["sys-net"].devices == [("pci", "dom0", "00_14.3", {"no-strict-reset": "True"})]
    # netvm is set in the last pass, after every VM has its data; the in-progress tags go last of all.
    calls = fq.calls
    last_import = max(i for i, c in enumerate(calls) if c[0] == "import-end")
    netvm_sets = [i for i, c in enumerate(calls) if c[:2] == ("property", "netvm")]
    untags = [i for i, c in enumerate(calls) if c[:2] == ("untag", "backup-restore-in-progress")]
    assert min(netvm_sets) > last_import and min(untags) > max(netvm_sets)
    for name in ORDER:  # the firewall is in place before the VM's data is imported
        assert calls.index(("firewall", name)) < min(i for i, c in enumerate(calls) if c[:1] == ("import",)
                                                     and c[-1] == name)  # fmt: skip
    assert applier.committed


def test_rename_map_applied_at_once(backup: Backup) -> None:
    """sys-firewall exists here; the backup's own sys-firewall1 keeps its name or moves, but a VM whose netvm
    was sys-firewall ends up on the copy of sys-firewall, and one on sys-firewall1 on that one's copy."""
    fq = _system_with("fedora", "sys-net", "sys-firewall")
    _restore(fq, backup, rename_conflicting=True, vms=("sys-firewall", "sys-firewall1", "work", "work2"))
    created = [c[2] for c in fq.calls if c[0] == "create"]
    copy_of_fw = created[0]
    assert copy_of_fw not in ("sys-firewall", "sys-firewall1") and created[1] == "sys-firewall1"
    assert fq.vms["work"].props["netvm"] == copy_of_fw
    assert fq.vms["work2"].props["netvm"] == "sys-firewall1"


@pytest.mark.parametrize("step", [("create", "AppVM", "work"), ("property", "memory"), ("import", "private"),
                                  ("import-end", "sys-firewall1"), ("firewall",), ("property", "netvm"),
                                  ("untag", "backup-restore-in-progress")])  # fmt: skip
def test_failure_at_any_step_removes_what_was_created(
    backup: Backup, step: tuple[str, ...]
) -> None:
    fq = _system_with("fedora")
    before = set(fq.vm_list())
    fq.fail_on = step
    with pytest.raises(BackupError):
        _restore(fq, backup, vms=("sys-net", "sys-firewall", "sys-firewall1", "work", "work2"))
    if step[0] != "untag":
        assert set(fq.vm_list()) == before
        assert any(c[0] == "remove" for c in fq.calls)


def test_leftovers_of_a_killed_restore(backup: Backup) -> None:
    fq = _system_with("fedora")
    dead = f"{apply.OWNER_PREFIX}999999999-1-deadbeef"
    fq.vms["half"] = FakeVm("AppVM", "red", tags={"backup-restore-in-progress", dead})
    fq.vms["half2"] = FakeVm("AppVM", "red", props={"netvm": "half"}, tags={"backup-restore-in-progress", dead})
    committing = f"{apply.OWNER_PREFIX}999999998-1-cafe0000"
    fq.vms["done1"] = FakeVm("AppVM", "red", tags={committing})
    fq.vms["done2"] = FakeVm("AppVM", "red", tags={"backup-restore-in-progress", committing})
    live = apply.new_owner_tag()  # a restore of this process that is still running: left alone
    fq.vms["running"] = FakeVm("AppVM", "red", tags={"backup-restore-in-progress", live})
    fq.vms["qubes-own"] = FakeVm("AppVM", "red", tags={"backup-restore-in-progress"})  # Qubes' tool's: not ours
    assert sorted(apply.cleanup_leftovers(fq)) == ["half", "half2"]  # type: ignore[arg-type]
    assert "half" not in fq.vms and "half2" not in fq.vms
    assert fq.vms["done1"].tags == set() and fq.vms["done2"].tags == set()  # commit finished
    assert "running" in fq.vms and "qubes-own" in fq.vms
    apply.release_owner_tag(live)
    assert apply.cleanup_leftovers(fq) == ["running"]  # type: ignore[arg-type]


def test_home_staging_of_a_live_restore_is_kept(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    live = apply._make_home_staging(home)
    stale = home / f"{apply.STAGING_PREFIX}999999999-1-deadbeef"
    stale.mkdir()
    assert apply.cleanup_home_staging(home) == [stale]
    assert live.is_dir() and not stale.exists()
    os.rmdir(live)


def test_templates_are_created_first_whatever_the_manifest_order(backup: Backup) -> None:
    manifest, files = backup
    reordered = Manifest(manifest.backup_id, manifest.created, list(reversed(manifest.archives)), manifest.qubes)
    fq = FakeQubes({})
    _restore(fq, (reordered, files))
    created = [c[2] for c in fq.calls if c[0] == "create"]
    assert created[0] == "fedora" and sorted(created) == sorted(ORDER)
    assert fq.vms["work"].props["template"] == "fedora"


def test_home_staging_is_removed_even_when_a_vm_cannot_be(backup: Backup, tmp_path: Path) -> None:
    manifest, _files = backup
    home = tmp_path / "home"
    home.mkdir()
    fq = FakeQubes({})
    plan = plan_restore(_target(fq), _header(), manifest, RestoreOptions(vms=("fedora",)))
    applier = apply.Applier(fq, plan, home)  # type: ignore[arg-type]
    applier.create_all()
    applier.home_staging = staging = apply._make_home_staging(home)
    nonce = staging.name.rsplit("-", 1)[-1]
    assert nonce in apply._live_nonces
    fq.fail_on = ("remove",)  # qubesd refuses every removal
    with pytest.raises(BackupError, match="could not remove"):
        applier.rollback()
    assert list(home.iterdir()) == []
    assert nonce not in apply._live_nonces


def test_finisher_bounds_work_and_reports_the_first_failure() -> None:
    """Imports finish in the background, at most FINISHING at once; a failure is raised by the next submit
    and by wait (the commit), never lost."""
    import threading
    import time

    fin = apply.Finisher()
    running, peak = 0, 0
    lock = threading.Lock()

    def job() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1

    for _ in range(6):
        fin.submit(job)
    fin.wait()
    assert peak == apply.FINISHING

    def fail() -> None:
        raise BackupError("import of volume 'private' of work failed: injected")

    fin.submit(fail)
    with pytest.raises(BackupError, match="injected"):
        fin.wait()
    with pytest.raises(BackupError, match="injected"):
        fin.submit(job)
    fin.close()


# -- across releases: devices, labels, properties -----------------------------------------------------------------

def _one_vm_backup(tmp_path: Path, devices: str = "", label: str = "red", props: str = "",
                   labels: str = "", notes: str = "") -> Backup:  # fmt: skip
    """A backup of one AppVM ``vm`` (no data but its firewall) with the given device elements and label."""
    xml = ('<qubes><labels><label id="label-1" color="0xcc0000">red</label>' + labels + '</labels><pools/>'
           '<properties/><domains><domain id="domain-0" class="AdminVM"><properties>'
           '<property name="label">label-1</property></properties></domain>'
           '<domain id="domain-1" class="AppVM"><properties><property name="name">vm</property>'
           f'<property name="qid">1</property><property name="label">{label}</property>{props}</properties>'
           f'<features/>{devices}<tags/><volume-config/></domain></domains></qubes>')  # fmt: skip
    fw = tmp_path / "fw.xml"
    fw.write_bytes(firewall.rules_to_xml(["action=drop"]))
    files = [tarwriter.InnerFile.from_path("appvms/vm/firewall.xml", fw)]
    if notes:
        files.append(tarwriter.InnerFile.from_bytes("appvms/vm/notes.txt", notes.encode(), 0o644, 0))
    archive = ArchiveEntry("vm1", "vm", "vm", [FileEntry(f.path, f.type, f.size, f.data) for f in files])
    return Manifest("00" * 16, "2026-12-01T10:00:00Z", [archive], xml.encode()), {"vm": files}


R42_DEVICES = ('<devices class="pci"><device backend-domain="dom0" id="00_14.3">'
               '<option name="no-strict-reset">True</option></device></devices>'
               '<devices class="block"><device backend-domain="dom0" id="loop7">'
               '<option name="read-only">yes</option></device></devices>'
               '<devices class="usb"><device backend-domain="dom0" id="2-1"/></devices>')  # fmt: skip
R43_DEVICES = ('<devices class="pci"><device backend-domain="dom0" id="00_14.3" mode="required" '
               'identity="8086:a0f0::p028000"><option name="no-strict-reset">True</option></device></devices>'
               '<devices class="block"><device backend-domain="dom0" id="loop7" mode="auto-attach" identity="*">'
               '<option name="read-only">yes</option></device></devices>'
               '<devices class="usb"><device backend-domain="dom0" id="*" mode="ask-to-attach" '
               'identity="1234:5678:0042:u030102"/></devices>')  # fmt: skip


@pytest.mark.parametrize("target", ["4.2", "4.3"])
@pytest.mark.parametrize("made_on", ["4.2", "4.3"])
def test_device_assignments_across_releases(tmp_path: Path, made_on: str, target: str) -> None:
    """Each assignment is made the way the target release makes one, mapped as docs/ARCHITECTURE.md says:
    R4.2 -> R4.3 required (PCI, block) / auto-attach (others); R4.3 -> R4.2 by port, persistent, with a
    warning for what R4.2 cannot express (identity, a mode that is not required) and none for any-port."""
    fq = FakeQubes({}, release=target)
    applier = _restore(fq, _one_vm_backup(tmp_path, R42_DEVICES if made_on == "4.2" else R43_DEVICES))
    got = [(c, a.backend, a.port, a.device_id, a.mode, a.options)  # type: ignore[attr-defined]
           for _, c, a in fq.assignments]
    warnings = [w for w in applier.warnings if "device" in w]
    pci, block = ("pci", "dom0", "00_14.3"), ("block", "dom0", "loop7")
    if target == "4.3" and made_on == "4.2":
        assert got == [(*pci, "*", "required", {"no-strict-reset": "True"}),
                       (*block, "*", "required", {"read-only": "yes"}),
                       ("usb", "dom0", "2-1", "*", "auto-attach", {})]  # fmt: skip
        assert warnings == []
    elif target == "4.3":  # R4.3 -> R4.3: as it was
        assert got == [(*pci, "8086:a0f0::p028000", "required", {"no-strict-reset": "True"}),
                       (*block, "*", "auto-attach", {"read-only": "yes"}),
                       ("usb", "dom0", "*", "1234:5678:0042:u030102", "ask-to-attach", {})]  # fmt: skip
        assert warnings == []
    elif made_on == "4.2":  # R4.2 -> R4.2: as it was
        assert [c for c in fq.calls if c[0] == "attach"] == [("attach", "pci", "dom0+00_14.3", "vm"),
                                                            ("attach", "block", "dom0+loop7", "vm"),
                                                            ("attach", "usb", "dom0+2-1", "vm")]  # fmt: skip
        assert warnings == []
    else:  # R4.3 -> R4.2
        assert got == [(*pci, "*", "required", {"no-strict-reset": "True"}),
                       (*block, "*", "required", {"read-only": "yes"})]
        assert warnings == [
            "VM vm: pci device dom0:00_14.3: assigned by port only (R4.2 has no device identities: 8086:a0f0::p028000)",
            "VM vm: block device dom0:loop7: auto-attach on R4.3, attached whenever the VM starts on R4.2",
            "VM vm: usb device dom0:* not assigned: R4.2 assigns devices by port only (this assigns device "
            "1234:5678:0042:u030102 in any port)"]  # fmt: skip


def test_device_options_that_could_smuggle_fields_are_not_sent(tmp_path: Path) -> None:
    """An authentic backup may be an attacker's: an option or identity that could end a field or add one
    (a quote, a space, '=') is not sent at all; the VM is restored without it, with a warning."""
    devices = ('<devices class="pci"><device backend-domain="dom0" id="00_14.3" mode="required" '
               """identity="x' mode='required"/></devices>"""
               '<devices class="block"><device backend-domain="dom0" id="loop7" mode="required" identity="*">'
               """<option name="read-only">yes' _x='1</option></device></devices>""")  # fmt: skip
    for release in ("4.2", "4.3"):
        fq = FakeQubes({}, release=release)
        applier = _restore(fq, _one_vm_backup(tmp_path, devices))
        sent = [c for c in fq.calls if c[0] in ("attach", "assign")]
        if release == "4.3":
            assert sent == [] and len([w for w in applier.warnings if "not assigned" in w]) == 2, applier.warnings
        else:  # R4.2 sends no identity at all: the port alone is assigned
            assert sent == [("attach", "pci", "dom0+00_14.3", "vm")] and fq.assignments[0][2].device_id == "*"  # type: ignore[attr-defined]
            assert len([w for w in applier.warnings if "not assigned" in w]) == 1, applier.warnings


def test_custom_label_is_created_with_the_backup_colour(tmp_path: Path) -> None:
    """A label made with admin.label.Create (teal) is created again at the commit, with the colour the backup
    has, and the VM gets it; until then the VM is red.  A rollback removes the label it created."""
    teal = '<label id="label-9" color="0x008080">teal</label>'
    fq = FakeQubes({})
    applier = _restore(fq, _one_vm_backup(tmp_path, label="label-9", labels=teal))
    assert fq.vms["vm"].label == "teal" and fq.label_colors["teal"] == "0x008080"
    assert applier.warnings == [] and applier.created_labels == ["teal"]
    creates = [c for c in fq.calls if c[0] == "create"]
    assert creates and fq.calls.index(("label-create", "teal", "0x008080")) > fq.calls.index(creates[0])
    # the commit fails after the label was made: the VM and the label are gone again
    fq = FakeQubes({})
    fq.fail_on = ("untag", "backup-restore-in-progress")
    with pytest.raises(BackupError):
        _restore(fq, _one_vm_backup(tmp_path, label="label-9", labels=teal))
    assert "vm" not in fq.vms and "teal" not in fq.label_colors and ("label-remove", "teal") in fq.calls
    # a label that exists here is used as it is; one that cannot be a label name is red, with a warning
    fq = FakeQubes({})
    fq.label_colors["teal"] = "0x00ff00"
    _restore(fq, _one_vm_backup(tmp_path, label="label-9", labels=teal))
    assert fq.vms["vm"].label == "teal" and fq.label_colors["teal"] == "0x00ff00"
    assert not [c for c in fq.calls if c[0] == "label-create"]
    fq = FakeQubes({})
    applier = _restore(fq, _one_vm_backup(tmp_path, label="label-9", labels=teal.replace("teal", "12")))
    assert fq.vms["vm"].label == "red" and applier.warnings == ["VM vm: label 12 does not exist here; using red"]


def test_property_the_release_lacks_is_a_warning(tmp_path: Path) -> None:
    """R4.3's bootmode restored on R4.2: not restored, said in one warning; the rest of the VM is."""
    props = '<property name="bootmode">debug</property><property name="memory">600</property>'
    fq = FakeQubes({}, release="4.2")
    applier = _restore(fq, _one_vm_backup(tmp_path, props=props))
    assert fq.vms["vm"].props["memory"] == "600" and "bootmode" not in fq.vms["vm"].props
    assert applier.warnings == ["VM vm: property bootmode does not exist on this Qubes release; not restored ('debug')"]
    fq = FakeQubes({}, release="4.3")
    _restore(fq, _one_vm_backup(tmp_path, props=props))
    assert fq.vms["vm"].props["bootmode"] == "debug"


def test_notes_per_release_and_a_refusal_is_a_warning(tmp_path: Path) -> None:
    """Notes are restored on R4.3; R4.2 has none (a warning, no call); qubesd refusing them (its limit of
    256000 bytes, its sanitiser missing) is a warning too: the VM is fine without its notes."""
    fq = FakeQubes({})
    applier = _restore(fq, _one_vm_backup(tmp_path, notes="hello\n"))
    assert fq.vms["vm"].notes == "hello\n" and applier.warnings == []
    fq = FakeQubes({}, release="4.2")
    applier = _restore(fq, _one_vm_backup(tmp_path, notes="hello\n"))
    assert ("notes", "vm") not in fq.calls
    assert applier.warnings == ["VM vm: notes not restored (this Qubes release has no notes)"]
    fq = FakeQubes({})
    fq.fail_on = ("notes",)
    applier = _restore(fq, _one_vm_backup(tmp_path, notes="hello\n"))
    assert applier.committed and "vm" in fq.vms
    assert [w for w in applier.warnings if w.startswith("VM vm: notes not restored (injected failure")]


def test_interrupted_while_qubesd_creates_a_vm(backup: Backup) -> None:
    """SIGTERM/Ctrl-C arrives while admin.vm.Create is under way: qubesd created the VM, the restore never saw
    the reply (nor tagged it).  The rollback still removes it: a VM of that name was not there before."""
    fq = _system_with("fedora")
    create = fq.create_vm

    def create_then_interrupted(klass: str, name: str, *args: object, **kw: object) -> None:
        create(klass, name, *args, **kw)  # type: ignore[arg-type]
        if name == "work":
            raise KeyboardInterrupt

    fq.create_vm = create_then_interrupted  # type: ignore[method-assign]
    before = set(fq.vm_list())
    with pytest.raises(KeyboardInterrupt):
        _restore(fq, backup, vms=("sys-net", "sys-firewall", "work"))
    assert set(fq.vm_list()) == before
    assert ("remove", "work") in fq.calls


def test_settings_that_grant_power_need_the_options(backup: Backup) -> None:
    """Without the options: no device, no risky property or tag; sys-firewall (whose provides_network is
    not restored) is nobody's netvm: its users are left without network, never on another netvm."""
    fq = FakeQubes({})
    applier = _restore(fq, backup, restore_devices=False, restore_risky_settings=False)
    assert fq.vms["sys-net"].devices == [] and "provides_network" not in fq.vms["sys-net"].props
    assert "virt_mode" not in fq.vms["sys-net"].props  # it goes with the PCI device
    assert fq.vms["work"].tags == {"created-by-dom0"} and fq.vms["work"].props["memory"] == "800"
    assert fq.vms["work"].props["netvm"] == "" and fq.vms["sys-firewall"].props["netvm"] == ""
    assert any("work: netvm sys-firewall not set" in w for w in applier.warnings), applier.warnings
    plan = applier.plan
    dropped = {(s.vm, s.kind, s.name) for s in plan.settings.not_restored()}
    assert ("sys-net", "device", "pci:dom0:00_14.3") in dropped and ("work", "tag", "mine") in dropped
    fq2 = FakeQubes({})
    _restore(fq2, backup, restore_devices=True, restore_risky_settings=False)
    assert fq2.vms["sys-net"].devices == [("pci", "dom0", "00_14.3", {"no-strict-reset": "True"})]
    assert fq2.vms["sys-net"].props["virt_mode"] == "hvm"


def test_policy_tags_are_never_restored_whatever_is_granted(backup: Backup) -> None:
    manifest, files = backup
    xml = manifest.qubes.replace(b'<tag name="mine"/>', b'<tag name="mine"/><tag name="backup-restore-mgmt"/>'
                                 b'<tag name="created-by-sys-gui"/><tag name="disp-created-by-x"/>'
                                 b'<tag name="qubes-backup-restore-1-1-deadbeef"/>')  # fmt: skip
    fq = FakeQubes({})
    _restore(fq, (Manifest(manifest.backup_id, manifest.created, manifest.archives, xml), files))
    assert {n: fq.vms[n].tags for n in ORDER} == {n: {"created-by-dom0", "mine"} for n in ORDER}


@pytest.mark.parametrize(("default", "restored"), [(["action=accept"], True),
                                                   (["action=accept dsthost=a.example", "action=drop"], False)])
def test_firewall_wider_than_a_new_vms_default_needs_the_option(backup: Backup, default: list[str],
                                                                restored: bool) -> None:  # fmt: skip
    fq = FakeQubes({})
    fq.firewall_rules = lambda vm: list(default)  # type: ignore[method-assign]
    applier = _restore(fq, backup, restore_risky_settings=False)
    assert (fq.vms["work"].firewall == ["action=accept dsthost=work.example", "action=drop"]) == restored
    assert any("firewall rules wider" in w for w in applier.warnings) != restored
    assert firewall.wider(["action=drop"], default) is False
