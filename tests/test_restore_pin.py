"""Issue 10 item 1, restore side: a replaced or older backup is visible and can be refused.

The backup VM may hand back a whole older backup (same passphrase) under the newest one's name: every MAC of
it verifies.  The restore names the backup it restored (id, creation time) in its result line, warns when the
file name's time disagrees with the authenticated creation time, and ``--backup-id`` refuses any other backup
before anything is written."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from conftest import VM_BACKUPS, Sim, new_sim, one_error_line


def _id_of(stdout: str) -> str:
    m = re.search(r"backup id ([0-9a-f]{32})", stdout)
    assert m, stdout
    return m.group(1)


def _two_backups(sim: Sim) -> tuple[Path, str, Path, str]:
    r1 = sim.backup("-d", "backupvm", VM_BACKUPS, "work")
    assert r1.returncode == 0, r1.stderr
    time.sleep(1.1)  # names have one-second resolution
    r2 = sim.backup("-d", "backupvm", VM_BACKUPS, "work")
    assert r2.returncode == 0, r2.stderr
    old, new = sorted(sim.vm_backups.glob("qubes-backup-*"))
    return old, _id_of(r1.stdout), new, _id_of(r2.stdout)


def test_result_line_names_the_backup_and_the_pin_is_enforced(tmp_path: Path) -> None:
    sim = new_sim(tmp_path / "sim")
    _old, old_id, new, new_id = _two_backups(sim)
    loc = f"{VM_BACKUPS}/{new.name}"
    ok = sim.restore("-q", "--verify-only", "-d", "backupvm", "--backup-id", new_id, loc)
    assert ok.returncode == 0, ok.stderr
    assert f"backup {new_id}" in ok.stdout and "created 20" in ok.stdout
    refused = sim.restore("-q", "--verify-only", "-d", "backupvm", "--backup-id", old_id, loc)
    assert refused.returncode == 3, refused.stderr
    assert "not the expected" in one_error_line(refused.stderr) and new_id in refused.stderr


def test_older_backup_under_the_newest_name_is_visible_and_refused(tmp_path: Path) -> None:
    sim = new_sim(tmp_path / "sim")
    old, old_id, new, new_id = _two_backups(sim)
    # The newest backup is a day younger than the old one, and the backup VM replaces it with the older,
    # valid one, keeping the newest name.
    stamp = time.strftime("%Y-%m-%dT%H%M%S", time.gmtime(time.time() + 86400))
    newest = new.with_name(f"qubes-backup-{stamp}")
    new.rename(newest)
    shutil.copyfile(old, newest)
    os.utime(newest)
    loc = f"{VM_BACKUPS}/{newest.name}"
    quiet = sim.restore("-q", "--verify-only", "-d", "backupvm", loc)
    assert quiet.returncode == 0, quiet.stderr  # it is a valid backup: only a pin can refuse it ...
    assert f"backup {old_id}" in quiet.stdout  # ... but the result line names the one really restored
    assert "warning: the file name says" in quiet.stderr and "older than its name" in quiet.stderr  # even -q
    pinned = sim.restore("-q", "-d", "backupvm", "--backup-id", new_id, loc)
    assert pinned.returncode == 3 and old_id in one_error_line(pinned.stderr)
    assert sim.collection().get("work") is not None  # the existing VM untouched, nothing created
    assert not [d for d in sim.collection().names() if d.startswith("work") and d != "work"]
