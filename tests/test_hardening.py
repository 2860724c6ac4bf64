"""Regression tests for the findings of the restore-path security review.

Each test reproduces one way a verified-but-crafted backup (someone who has the passphrase), or an odd file
name in dom0, could have hurt dom0, and checks it no longer can.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tarfile
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from conftest import PASSPHRASE, VM_BACKUPS, Sim, same_content
from fake_qubes import FakeQubes, FakeVm
from qubes_backup_dom0.cli.common import table
from qubes_backup_dom0.errors import BackupError, VerificationError
from qubes_backup_dom0.format import extractor, manifest, tarwriter
from qubes_backup_dom0.format.manifest import ArchiveEntry, FileEntry, Manifest
from qubes_backup_dom0.qubes import interface as qubes
from qubes_backup_dom0.restore import apply
from qubes_backup_dom0.restore.machine import Restore, RestoreOptions
from qubes_backup_dom0.restore.plan import TargetSystem, plan_restore

UNSAFE = ["\n", "\t", "\r", "\x1b", "\x7f", "\x85", "\x9b", "\u2028", "\u2029", "\u202e", "\u2066"]


@pytest.mark.parametrize("char", UNSAFE, ids=[f"U+{ord(c):04X}" for c in UNSAFE])
def test_paths_with_control_characters_are_refused(char: str) -> None:
    path = f"appvms/work/x{char}zz"
    assert not manifest.valid_rel_path(path)
    with pytest.raises(VerificationError):
        extractor.Extractor(None, [tarwriter.InnerFile(path, None, "file", 1, 1)])
    assert manifest.valid_rel_path("appvms/work/ünïcödé name.txt")  # ordinary non-ASCII stays fine


# -- what a crafted backup can reach: only the volumes of the VMs this restore created ------------------------

MiB = 1 << 20


def _crafted(tmp_path: Path, vols: str, paths: list[str]) -> tuple[Manifest, list[tarwriter.InnerFile]]:
    """A backup (as its verified manifest and archive) of VM ``evil`` with the volume-config ``vols`` and
    an archive holding ``paths`` (each 1 MiB naming itself)."""
    xml = (
        '<qubes><labels><label id="label-1" color="0xcc0000">red</label></labels><pools>'
        '<pool name="lvm" driver="lvm_thin" volume_group="qubes_dom0" thin_pool="vm-pool"/>'
        '<pool name="varlibqubes" driver="file" dir_path="/var/lib/qubes"/></pools><properties/><domains>'
        '<domain id="domain-0" class="AdminVM"><properties><property name="label">label-1</property></properties>'
        '</domain><domain id="domain-9" class="StandaloneVM"><properties><property name="name">evil</property>'
        '<property name="qid">9</property><property name="label">label-1</property></properties><features/>'
        f"<tags/><volume-config>{vols}</volume-config></domain></domains></qubes>"
    )
    files = []
    for i, rel in enumerate(paths):
        src = tmp_path / f"f{i}"
        src.write_bytes(rel.encode().ljust(MiB, b"\0"))
        files.append(tarwriter.InnerFile.from_path(rel, src))
    entries = [FileEntry(f.path, f.type, f.size, f.data) for f in files]
    archives = [ArchiveEntry("vm1", "evil", "vm", entries)]
    return Manifest("00" * 16, "2026-12-01T10:00:00Z", archives, xml.encode()), files


def _apply(fq: FakeQubes, manifest: Manifest, files: list[tarwriter.InnerFile]) -> None:
    from qubes_backup_dom0.format import crypto
    from qubes_backup_dom0.format.header import Header

    hdr = Header(bytes(16), "2026-12-01T10:00:00Z", crypto.KdfParams(bytes(16), 1024, 8, 1), "none", 1 << 20)
    target = TargetSystem(frozenset(fq.vm_list()), {})
    plan = plan_restore(target, hdr, manifest, RestoreOptions())
    assert not plan.errors, plan.errors
    applier = apply.Applier(fq, plan, Path("/nonexistent-home"))  # type: ignore[arg-type]
    try:
        applier.create_all()
        (archive,) = plan.wanted
        sinks = applier.target_for(archive)
        ex = extractor.Extractor(None, archive.files, sinks=sinks.sinks)
        for piece in tarwriter.write_archive(files):
            ex.feed(piece)
        ex.finish()
        if sinks.done is not None:
            sinks.done()
        applier.commit()
    except BaseException:
        applier.rollback()
        raise


def _writes_outside(fq: FakeQubes, created: set[str]) -> list[tuple[str, ...]]:
    """Writes (FakeQubes records the VM last; an import's end names it first) to VMs not in ``created``."""
    return [c for c in fq.calls if c[0] != "create" and (c[1] if c[0] == "import-end" else c[-1]) not in created]


def test_archive_files_reach_only_the_created_vms_volumes(tmp_path: Path) -> None:
    """The manifest's file paths decide nothing about where data goes: a volume-config naming another VM's
    LV or image, and files under other VMs' directories, import only into the volumes of the VM this restore
    created (everything else in the archive is verified, then dropped)."""
    vols = ('<volume name="private" pool="lvm" vid="qubes_dom0/vm-work-private" save_on_stop="True" size="1048576"/>'
            '<volume name="root" pool="varlibqubes" vid="vm-templates/fedora/root" save_on_stop="True" '
            'size="1048576"/>')  # fmt: skip
    paths = ["appvms/evil/private.img", "appvms/work/private.img", "appvms/evil/icon.png",
             "vm-templates/fedora/root.img", "appvms/evil/root.img", "qubes.xml", "appvms/evil/firewall.xml.img"]
    manifest, files = _crafted(tmp_path, vols, paths)
    fq = FakeQubes({"work": FakeVm("AppVM", "red"), "fedora": FakeVm("TemplateVM", "black")})
    _apply(fq, manifest, files)
    assert not _writes_outside(fq, {"evil"}), _writes_outside(fq, {"evil"})
    imported = {(i.vm, i.volume): bytes(i.data).rstrip(b"\0") for i in fq.imports}
    # Which archive path feeds which volume follows the backup's own layout (here its vids move evil's
    # directory to vm-templates/fedora); wherever the bytes come from, they land in evil's own volumes.
    assert imported and imported.keys() <= {("evil", "private"), ("evil", "root")}, imported
    assert all(data.decode() in paths for data in imported.values())
    assert fq.vms["work"].volumes == {} and fq.vms["fedora"].volumes == {}


@pytest.mark.parametrize("name", ["../../qubes", "--help", "a b", "private/../../x", "x\ny"])
def test_hostile_volume_name_is_never_imported(tmp_path: Path, name: str) -> None:
    """A volume name from the backup that is no plain volume name never reaches the import service (whose
    argument it would be): refused with a clear error (nothing left behind), or its data dropped."""
    vols = (f'<volume name="{escape(name)}" pool="lvm" vid="qubes_dom0/vm-evil-x" save_on_stop="True" size="1048576"/>'
            '<volume name="private" pool="lvm" vid="qubes_dom0/vm-evil-private" save_on_stop="True" size="1048576"/>')
    paths = ["appvms/evil/private.img"]
    if manifest.valid_rel_path(f"appvms/evil/{name}.img"):
        paths.append(f"appvms/evil/{name}.img")
    crafted, files = _crafted(tmp_path, vols, paths)
    fq = FakeQubes({})
    try:
        _apply(fq, crafted, files)
    except BackupError as e:
        assert "volume" in str(e) and "\n" not in str(e)
        assert set(fq.vm_list()) == {"dom0"}  # rolled back
    assert {i.volume for i in fq.imports} <= {"private"}


def test_restore_writes_only_to_vms_it_created(same: tuple[Sim, str], tmp_path: Path) -> None:
    """Through the simulated qubesd's request log: a restore beside existing VMs (renamed copies and a
    failing one) sends every write to a VM it created, never to an existing VM or a global property."""
    dst, location = same
    log = tmp_path / "qubesd-requests.jsonl"
    dst.start_qubesd(log)
    existing = set(dst.collection().names())
    r = dst.restore("-d", "backupvm", "--rename-conflicting", "--skip-dom0-home", location, "fedora-41", "work",
                    "sys-net", "vault")  # fmt: skip
    assert r.returncode == 0, r.stderr
    requests = [json.loads(line) for line in log.read_text().splitlines()]
    created = {dict(w.split("=", 1) for w in q["payload"].split())["name"] for q in requests
               if q["method"].startswith(("admin.vm.Create.", "admin.vm.CreateInPool."))}  # fmt: skip
    assert created == {"fedora-411", "work1", "sys-net1", "vault1"} and not created & existing
    writes = [q for q in requests if not q["method"].endswith((".List", ".Get", ".GetAll", ".Info", ".GetDefault",
                                                                ".Index")) and q["method"] != "admin.vm.List"]
    assert writes
    for q in writes:
        if q["method"].startswith(("admin.vm.Create.", "admin.vm.CreateInPool.")):
            assert q["dest"] == "dom0"
        else:
            assert q["dest"] in created, q
    assert not any(q["method"].startswith("admin.property.Set") for q in requests)
    # the in-progress tag is the first write to each created VM, its removal the last one but the owner tag's
    for vm in created:
        mine = [q for q in writes if q["dest"] == vm]
        assert (mine[0]["method"], mine[0]["arg"]) == ("admin.vm.tag.Set", "backup-restore-in-progress")
        removal = mine.index({**mine[0], "method": "admin.vm.tag.Remove"})
        assert all(q["method"] == "admin.vm.tag.Remove" for q in mine[removal:]), mine[removal:]
    imports = {(q["dest"], q["arg"]) for q in requests if q["method"] == "internal.vm.volume.ImportEnd"}
    assert imports == {(vm, vol) for vm in created for vol in dst.volume_files(vm)}


def test_failed_restore_writes_only_to_vms_it_created_and_removes_them(
    fresh: tuple[Sim, str], source_backup: tuple[Sim, Path], tmp_path: Path
) -> None:
    dst, _ = fresh
    backup = source_backup[1]
    with tarfile.open(backup) as tar:
        names = tar.getnames()
    cut = dst.vm_backups / "truncated"
    cut.write_bytes(backup.read_bytes()[: backup.stat().st_size * 2 // 3 // 512 * 512])
    assert len(names) > 10
    log = tmp_path / "qubesd-requests.jsonl"
    dst.start_qubesd(log)
    existing = set(dst.collection().names())
    r = dst.restore("-d", "backupvm", f"{VM_BACKUPS}/{cut.name}")
    assert r.returncode != 0
    requests = [json.loads(line) for line in log.read_text().splitlines()]
    created = {dict(w.split("=", 1) for w in q["payload"].split())["name"] for q in requests
               if q["method"].startswith("admin.vm.Create")}  # fmt: skip
    assert created
    for q in requests:
        if q["method"].startswith("admin.vm.Create"):
            continue
        if q["method"].endswith(("Set", "Remove", "Attach", "ImportBegin", "ImportEnd", "Reset")):
            assert q["dest"] in created, q
    removed = {q["dest"] for q in requests if q["method"] == "admin.vm.Remove"}
    assert removed == created and set(dst.collection().names()) == existing


DOM0 = Path(qubes.__file__).parent


def test_no_dom0_module_writes_qubes_xml() -> None:
    """qubes.xml is qubesd's: no module of the dom0 package has a way to write it (the writer lives in the
    simulation package, qubes_backup_sim.store)."""
    for path in sorted(DOM0.glob("*.py")):
        text = path.read_text()
        assert "write_atomic" not in text, path
        for m in re.finditer(r"qubes_xml|qubes\.xml", text):
            line = text[text.rfind("\n", 0, m.start()) + 1 : text.find("\n", m.end())]
            assert not re.search(r"open\(.*['\"][wax+]|write_bytes|write_text|os\.replace|rename", line), (path, line)


def test_restore_process_writes_no_qubes_file(fresh: tuple[Sim, str]) -> None:
    """An audit hook on the restoring process itself: it opens nothing under the Qubes root or the volume
    devices for writing, and renames or removes nothing there (qubesd and the import service do that)."""
    dst, location = fresh
    guarded = (dst.qubes_root.resolve(), (dst.dom0 / "dev").resolve())
    bad: list[tuple[str, str]] = []
    active = [True]
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(p: object) -> bool:
        if not isinstance(p, (str, bytes, os.PathLike)) or isinstance(p, int):
            return False
        try:
            full = Path(os.fsdecode(p)).resolve()
        except (OSError, ValueError):
            return False
        return any(full == g or g in full.parents for g in guarded)

    def hook(event: str, args: tuple[object, ...]) -> None:
        if not active[0]:
            return
        if event == "open" and len(args) >= 3 and inside(args[0]):
            mode, flags = args[1], args[2]
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags
            ):
                bad.append((event, str(args[0])))
        elif event in ("os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate",
                       "os.mkdir") and args and inside(args[0]):  # fmt: skip
            bad.append((event, str(args[0])))

    sys.addaudithook(hook)
    try:
        job = Restore(dst.system, location, PASSPHRASE.encode(), source_vm="backupvm",
                      options=RestoreOptions(vms=("fedora-41", "work", "dom0")))  # fmt: skip
        try:
            job.open()
            job.plan()
            job.run()
        finally:
            job.close()
    finally:
        active[0] = False  # audit hooks cannot be removed: make it inert
    assert job.restored == ["fedora-41", "work"]
    assert not bad, bad
    assert dst.volume_files("work")["private"].is_file()


def test_table_neutralises_terminal_controls() -> None:
    out = table(["VM", "class"], [["work", "AppVM\r\x9b2J\u202eevil"]])
    assert not any(c in out for c in "\r\x9b\u202e")


def test_backup_skips_and_reports_unsafe_home_file_names(sim: Sim) -> None:
    (sim.home / "bad\nname").write_text("x")
    (sim.home / "fine").write_text("y")
    r = sim.backup("-d", "backupvm", "/home/user/backups", "dom0")
    assert r.returncode == 0, r.stderr
    assert "skipped (control characters in the file name)" in r.stderr


def test_restore_from_dom0_file_whose_name_has_a_space(tmp_path: Path, source_backup: tuple[Sim, Path]) -> None:
    from conftest import make_fresh

    src, backup = source_backup
    dst = make_fresh(tmp_path / "fresh", src)
    (dst.dom0 / "my backups").mkdir()
    os.link(backup, dst.dom0 / "my backups" / "backup of today")
    r = dst.restore("/my backups/backup of today", "vault", "fedora-41")
    assert r.returncode == 0, r.stderr
    assert same_content(src.volume_files("vault")["private"], dst.volume_files("vault")["private"])



def test_slow_drip_agent_cannot_keep_a_frame_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent that sends one byte every 0.2 s never stalls for the 2 s timeout, yet the frame must end."""
    import subprocess
    import sys

    from qubes_backup_dom0.qubes.transport import Channel
    from qubes_backup_protocol import frames

    drip = (
        "import sys, time\n"
        "from qubes_backup_protocol import frames\n"
        "data = frames.encode(frames.FrameType.MEMBER, 'backup-header', b'x' * 4000)\n"
        "for b in data:\n"
        "    sys.stdout.buffer.write(bytes([b])); sys.stdout.buffer.flush(); time.sleep(0.2)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", drip], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    channel = Channel(proc, timeout=2.0)  # generous for start-up; the drip (0.2 s) never stalls that long
    try:
        with pytest.raises(BackupError, match="too slowly"):
            channel.recv({frames.FrameType.MEMBER: (64, 4096)})
    finally:
        channel.close()
