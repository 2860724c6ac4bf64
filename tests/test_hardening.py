"""Regression tests for the findings of the restore-path security review.

Each test reproduces one way a verified-but-crafted backup (someone who has the passphrase), or an odd file
name in dom0, could have hurt dom0, and checks it no longer can.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import Sim, same_content
from lxml import etree
from qubes_backup_dom0 import inner, manifest, restore
from qubes_backup_dom0.cli_common import table
from qubes_backup_dom0.errors import BackupError, VerificationError

UNSAFE = ["\n", "\t", "\r", "\x1b", "\x7f", "\x85", "\x9b", "\u2028", "\u2029", "\u202e", "\u2066"]


@pytest.mark.parametrize("char", UNSAFE, ids=[f"U+{ord(c):04X}" for c in UNSAFE])
def test_paths_with_control_characters_are_refused(char: str) -> None:
    path = f"appvms/work/x{char}zz"
    assert not manifest.valid_rel_path(path)
    with pytest.raises(VerificationError):
        inner.Extractor(None, [inner.InnerFile(path, None, "file", 1, 1)])
    assert manifest.valid_rel_path("appvms/work/ünïcödé name.txt")  # ordinary non-ASCII stays fine


def _staging_with_journal(sim: Sim, entries: list[dict[str, str]]) -> Path:
    staging = sim.qubes_root / f"{restore.STAGING_PREFIX}999999-test"
    staging.mkdir()
    (staging / restore.JOURNAL).write_text("".join(json.dumps(e) + "\n" for e in entries))
    return staging


def test_journal_cleanup_removes_only_unregistered_vms_own_files(sim: Sim) -> None:
    """A forged journal entry cannot make the clean-up delete qubes.xml or another VM's files."""
    root = sim.qubes_root
    (root / "appvms/newvm").mkdir()
    leftover = root / "appvms/newvm/private.img"
    leftover.write_bytes(b"moved in before the crash")
    victim = root / "appvms/work/private.img"
    staging = _staging_with_journal(sim, [
        {"vm": "newvm", "path": str(leftover)},
        {"vm": "zz", "path": str(sim.qubes_xml)},  # not inside a VM directory
        {"vm": "newvm", "path": str(victim)},  # another VM's directory
        {"vm": "work", "path": str(victim)},  # a registered VM
        {"vm": "newvm", "path": str(root / "appvms/newvm/../work/private.img")},
    ])  # fmt: skip
    restore._remove_staging(staging, sim.system)
    assert not staging.exists()
    assert not leftover.exists() and not leftover.parent.exists()
    assert sim.qubes_xml.is_file() and victim.is_file()


def test_journal_line_cannot_be_forged_through_a_name(sim: Sim) -> None:
    staging = _staging_with_journal(sim, [{"vm": "a\nzz", "path": f"x\t{sim.qubes_xml}"}])
    restore._remove_staging(staging, sim.system)
    assert sim.qubes_xml.is_file()


def _domain(xml: str) -> etree._Element:
    return etree.fromstring(xml)


def test_restored_volumes_are_confined_to_the_new_vm_directory(sim: Sim) -> None:
    current = sim.collection()
    foreign = _domain("""
      <domain id="domain-77" class="AppVM"><properties>
        <property name="name">evil</property><property name="qid">77</property>
        <property name="label">label-1</property>
      </properties><features/><tags/><volume-config>
        <volume name="private" pool="lvm" vid="qubes_dom0/vm-work-private" save_on_stop="True"
                source="appvms/work/private"/>
        <volume name="volatile" pool="default" vid="appvms/work/volatile"/>
      </volume-config></domain>""")
    dom = current.add_domain(foreign, new_name="evil")
    vm_dir = restore._confine_volumes(current, dom)
    assert vm_dir == "appvms/evil"
    vols = {v.name: v for v in dom.volumes}
    assert vols["private"].vid == "appvms/evil/private" and vols["volatile"].vid == "appvms/evil/volatile"
    assert vols["private"].source is None
    assert all(current.pools[v.pool].get("driver") in ("file", "file-reflink") for v in vols.values())


def test_volume_name_cannot_traverse(sim: Sim) -> None:
    current = sim.collection()
    foreign = _domain("""
      <domain id="domain-78" class="AppVM"><properties>
        <property name="name">evil2</property><property name="qid">78</property>
        <property name="label">label-1</property>
      </properties><features/><tags/><volume-config>
        <volume name="../../qubes" pool="default" vid="appvms/evil2/x"/>
      </volume-config></domain>""")
    try:
        dom = current.add_domain(foreign, new_name="evil2")
    except BackupError:
        return  # refused even earlier: fine
    with pytest.raises(VerificationError):
        restore._confine_volumes(current, dom)


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
    assert same_content(src.qubes_root / "appvms/vault/private.img", dst.qubes_root / "appvms/vault/private.img")



def test_slow_drip_agent_cannot_keep_a_frame_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent that sends one byte every 0.2 s never stalls for the 2 s timeout, yet the frame must end."""
    import subprocess
    import sys

    from qubes_backup_dom0.transport import Channel
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
