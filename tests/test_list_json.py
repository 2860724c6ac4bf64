"""A backup you can look into (issue 12 item 3): --list, --json, --list-backups."""

from __future__ import annotations

import json
import os
import re
import time

import pytest
from conftest import KDF, VM_BACKUPS, Sim, one_error_line
from qubes_backup_dom0.cli.listing import list_backups


def only_json(stdout: str) -> dict:  # type: ignore[type-arg]
    """stdout is exactly one JSON document."""
    doc = json.loads(stdout)
    assert stdout.strip().count("\n") == 0 and isinstance(doc, dict), stdout
    return doc


@pytest.fixture
def backed(sim: Sim) -> tuple[Sim, str]:
    return sim, f"{VM_BACKUPS}/{sim.backup_to_vm().name}"


def test_list_shows_id_time_compression_and_every_vm(backed: tuple[Sim, str]) -> None:
    sim, location = backed
    r = sim.restore("--list", "-d", "backupvm", location)
    assert r.returncode == 0, r.stderr
    head = r.stdout.splitlines()[0]
    assert re.fullmatch(r"Backup [0-9a-f]{32} made \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(zstd, 11 archive\(s\)\)", head)
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")] for line in r.stdout.splitlines()[3:]}
    assert rows["work"][1:4] == ["AppVM", "fedora-41", "(sys-firewall)"]
    assert rows["personal"][1:4] == ["AppVM", "debian-12", "sys-firewall"]
    assert rows["fedora-41"][1] == "TemplateVM"
    assert "dom0 home (user)" in rows
    assert len(rows) == 11
    assert "private.img" not in r.stdout
    verbose = sim.restore("--list", "-v", "-d", "backupvm", location)
    assert "work: appvms/work/private.img (file, " in verbose.stdout


def test_list_restores_and_changes_nothing(backed: tuple[Sim, str]) -> None:
    sim, location = backed
    xml = sim.qubes_xml.read_bytes()
    r = sim.restore("--list", "-d", "backupvm", location)
    assert r.returncode == 0
    assert sim.qubes_xml.read_bytes() == xml


def test_json_documents(backed: tuple[Sim, str]) -> None:
    sim, location = backed
    listed = only_json(sim.restore("--list", "--json", "-d", "backupvm", location).stdout)
    assert listed["command"] == "list" and listed["ok"] and listed["backup"]["authenticated"]
    work = next(v for v in listed["vms"] if v["name"] == "work")
    assert work["class"] == "AppVM" and work["template"] == "fedora-41"
    assert {f["path"] for f in work["files"]} >= {"appvms/work/private.img", "appvms/work/firewall.xml"}
    assert listed["dom0_home"]["user"] == "user"
    assert listed["data"] == sum(v["data"] for v in listed["vms"]) + listed["dom0_home"]["data"]

    verified = only_json(sim.restore("--verify-only", "--json", "-d", "backupvm", location).stdout)
    assert verified["command"] == "verify" and verified["ok"] and verified["restored"] == []
    assert verified["backup"]["id"] == listed["backup"]["id"]

    r = sim.run("qvm-backup", "-y", "-q", "-p", "/pw", *KDF, "--json", "-d", "backupvm", VM_BACKUPS, "work")
    made = only_json(r.stdout)
    assert made["command"] == "backup" and [v["name"] for v in made["vms"]] == ["work"]
    assert made["dom0_home"] is None and made["location"].startswith(f"backupvm:{VM_BACKUPS}/qubes-backup-")

    (sim.dom0 / "new").mkdir()
    r = sim.restore("--json", "--rename-conflicting", "-d", "backupvm", made["location"].split(":", 1)[1])
    restored = only_json(r.stdout)
    assert restored["command"] == "restore" and restored["restored"] == ["work1"], r.stderr


@pytest.mark.parametrize(("args", "command", "code"), [
    (("--list", "-d", "backupvm", f"{VM_BACKUPS}/nothere"), "list", 1),
    (("--verify-only", "-d", "nosuch", "/x"), "verify", 2),
    (("--list-backups", "-d", "backupvm", "/nothere"), "list-backups", 1),
    (("--no-such-option", "/x"), "restore", 2),
])  # fmt: skip
def test_json_errors_keep_the_exit_code(sim: Sim, args: tuple[str, ...], command: str, code: int) -> None:
    r = sim.restore("--json", *args)
    assert r.returncode == code
    doc = only_json(r.stdout)
    assert doc == {"version": 1, "command": command, "ok": False, "error": doc["error"], "exit_code": code}


def test_json_wrong_passphrase_is_exit_3(backed: tuple[Sim, str]) -> None:
    sim, location = backed
    (sim.dom0 / "wrong").write_text("wrong\n")
    r = sim.run("qvm-backup-restore", "-p", "/wrong", "--json", "--verify-only", "-d", "backupvm", location)
    assert r.returncode == 3
    assert "wrong passphrase" in only_json(r.stdout)["error"]


def test_list_backups_reads_headers_and_says_they_are_unverified(sim: Sim) -> None:
    first = sim.backup_to_vm("work")
    time.sleep(1.1)  # backup file names have a resolution of one second
    second = sim.backup_to_vm("vault")
    (sim.vm_backups / "notes.txt").write_text("not a backup")
    (sim.vm_backups / "qubes-backup-2030-01-01T000000").write_bytes(b"junk" * 300)
    # An older backup under a newer name: exactly what a user should be able to spot.
    os.link(first, sim.vm_backups / "qubes-backup-2031-01-01T000000")
    r = sim.restore("--list-backups", "-d", "backupvm", VM_BACKUPS)
    assert r.returncode == 0, r.stderr
    assert "NOT authenticated" in r.stdout
    doc = only_json(sim.restore("--list-backups", "--json", "-d", "backupvm", VM_BACKUPS).stdout)
    assert doc["authenticated"] is False
    by_name = {b["name"]: b for b in doc["backups"]}
    assert list(by_name) == sorted([first.name, second.name, "qubes-backup-2030-01-01T000000",
                                    "qubes-backup-2031-01-01T000000"])  # fmt: skip
    ids = {}
    for path in (first, second):
        listed = only_json(sim.restore("--list", "--json", "-d", "backupvm", f"{VM_BACKUPS}/{path.name}").stdout)
        ids[path.name] = listed["backup"]["id"]
        assert by_name[path.name]["id"] == ids[path.name]
        assert by_name[path.name]["created"] == listed["backup"]["created"]
        assert by_name[path.name]["name_time_mismatch"] is None
    assert by_name["qubes-backup-2030-01-01T000000"]["problem"].startswith("no backup header")
    replayed = by_name["qubes-backup-2031-01-01T000000"]
    assert replayed["id"] == ids[first.name] and "older than its name" in replayed["name_time_mismatch"]


def test_list_backups_of_a_dom0_directory_and_errors(sim: Sim) -> None:
    (sim.dom0 / "backups").mkdir()
    r = sim.backup("-q", "/backups", "work")
    assert r.returncode == 0, r.stderr
    found = list_backups(sim.system, "/backups")
    assert len(found) == 1 and found[0].backup_id is not None
    r = sim.restore("--list-backups", "-d", "backupvm", "s3://bucket/x")
    assert r.returncode == 1 and "needs a directory" in one_error_line(r.stderr)
