"""``--repo`` through the commands, as a user runs them: the first backup creates the repository, each one
prints its summary line, ``--list-snapshots`` (also ``--json``), ``--verify-only``, and a restore on a fresh
dom0 that has no record of the repository (``--expect-root`` pins what the user noted)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from conftest import KDF, Sim, assert_restored_like, make_fresh, new_sim, one_error_line

REPO = "/home/user/snapshots"
LINE = re.compile(r"Snapshot (\d+) of repository ([0-9a-f]{32}): (\d+) VMs? changed, ([0-9.]+) MiB stored, "
                  r"[0-9.]+ s; root ([0-9a-f]{64})")  # fmt: skip


def backup(sim: Sim, *vms: str) -> re.Match[str]:
    r = sim.run("qvm-backup", "-y", "-q", "-p", "/pw", *KDF, "-d", "backupvm", "--repo", REPO, *vms)
    assert r.returncode == 0, r.stderr
    m = LINE.fullmatch(r.stdout.strip())
    assert m is not None, r.stdout
    return m


def test_repository_from_the_command_line(tmp_path: Path) -> None:
    sim = new_sim(tmp_path / "sim")
    first = backup(sim, "work", "vault")
    assert first.group(1) == "1" and first.group(3) == "2"
    again = backup(sim, "work", "vault")
    assert (again.group(1), again.group(2), again.group(3)) == ("2", first.group(2), "0")
    assert float(again.group(4)) < 0.1

    r = sim.restore("-d", "backupvm", "--repo", REPO, "--list-snapshots", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["command"] == "list-snapshots" and doc["repository"] == first.group(2)
    assert [(s["snapshot"], s["root"], s["present"]) for s in doc["snapshots"]] == [
        (1, first.group(5), True), (2, again.group(5), True)]  # fmt: skip
    r = sim.restore("-d", "backupvm", "--repo", REPO, "--verify-only", "--snapshot", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Verified snapshot 1 of repository"), r.stdout

    # A fresh dom0 (the disaster case): no record of the repository.  A wrong pin is refused; the right one,
    # or none (then the newest root is shown and accepted), restores.
    fresh = make_fresh(tmp_path / "fresh", sim, keep=("dom0", "backupvm", "fedora-41", "sys-net", "sys-firewall"))
    shutil.copytree(sim.vm_root("backupvm") / REPO.lstrip("/"), fresh.vm_root("backupvm") / REPO.lstrip("/"))
    wrong = "ab" * 32
    r = fresh.restore("-d", "backupvm", "--repo", REPO, "--expect-root", wrong, "work")
    assert r.returncode == 3 and "does not descend" in one_error_line(r.stderr), r.stderr
    assert "work" not in fresh.collection().names()
    r = fresh.restore("-d", "backupvm", "--repo", REPO, "--expect-root", first.group(5), "work", "vault")
    assert r.returncode == 0, r.stderr
    assert "Restored vault, work from snapshot 2" in r.stdout or "Restored work, vault from snapshot 2" in r.stdout
    for vol, path in sim.volume_files("work").items():
        assert_restored_like(path, fresh.volume_files("work")[vol])
    # dom0 now remembers snapshot 2: a rolled-back repository is refused from here on
    newest = sorted((fresh.vm_root("backupvm") / REPO.lstrip("/") / "roots").iterdir())[-1]
    newest.unlink()
    r = fresh.restore("-d", "backupvm", "--repo", REPO, "--verify-only")
    assert r.returncode == 3 and "older than snapshot 2" in one_error_line(r.stderr), r.stderr


def test_usage_errors(tmp_path: Path) -> None:
    sim = new_sim(tmp_path / "sim")
    r = sim.run("qvm-backup", "-y", "-p", "/pw", "--repo", REPO, "work")
    assert r.returncode == 2 and "-d VM" in one_error_line(r.stderr)
    r = sim.restore("-d", "backupvm", "--repo", REPO, "--list-snapshots")
    assert r.returncode == 1 and "does not exist" in one_error_line(r.stderr), r.stderr
    r = sim.restore("-d", "backupvm", "--repo", REPO, "--backup-id", "0" * 32)
    assert r.returncode == 2 and "--backup-id does not apply" in one_error_line(r.stderr)
