"""The rough edges of issue 19 items 5-9: Qubes' notes in the backup table, verify says verify, a directory as
restore location (``--latest``), exit codes and closed pipes, listing polish."""

from __future__ import annotations

import json

from conftest import KDF, VM_BACKUPS, Sim, new_sim
from qubes_backup_dom0.cli.backup import RUNNING_NOTE


def _rows(table_text: str) -> dict[str, list[str]]:
    rows = {}
    for line in table_text.splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        if len(cells) > 2:
            rows[cells[0]] = cells
    return rows


def test_backup_table_notes_running_vms_and_lists_vms_not_selected(tmp_path) -> None:
    sim = new_sim(tmp_path / "sim", running=("sys-firewall",))
    r = sim.run("qvm-backup", "-p", "/pw", *KDF, "-y", "-d", "backupvm", VM_BACKUPS, "work", "sys-firewall")
    assert r.returncode == 0, r.stderr
    rows = _rows(r.stderr)
    assert rows["VM"][-1] == "note"
    assert rows["sys-firewall"][-1] == RUNNING_NOTE and rows["work"][-1] == ""
    listed = r.stderr.split("VMs not selected for backup:\n", 1)[1].splitlines()
    names = [line[3:] for line in listed if line.startswith(" - ")]
    assert names == sorted(set(sim.collection().names()) - {"work", "sys-firewall"}) and "dom0" in names
    r = sim.run("qvm-backup", "-p", "/pw", *KDF, "-y", "--json", "-d", "backupvm", VM_BACKUPS, "work",
                "sys-firewall")  # fmt: skip
    doc = json.loads(r.stdout)
    assert {v["name"]: v["running"] for v in doc["vms"]} == {"work": False, "sys-firewall": True}
    assert doc["not_selected"] == names


def test_backup_table_without_running_vm_has_no_note_column(sim: Sim) -> None:
    r = sim.backup("-d", "backupvm", VM_BACKUPS, "work")
    assert r.returncode == 0, r.stderr
    assert "note" not in _rows(r.stderr)["VM"]


def test_verify_only_says_verify_and_looks_at_nothing_here(tmp_path) -> None:
    """A backup of work without its template, verified on the system that made it (template, VM and all
    exist here) and on one that has none of them: every row says "verify", no "missing template", no
    "exists", and nothing of either system changes."""
    from conftest import Unchanged, make_fresh, share_backup

    sim = new_sim(tmp_path / "sim")
    backup = sim.backup_to_vm("work", "dom0")
    other = make_fresh(tmp_path / "fresh", sim, keep=("dom0", "backupvm"))
    share_backup(backup, other)
    for system in (sim, other):
        before = Unchanged(system)
        r = system.restore("--verify-only", "-d", "backupvm", f"{VM_BACKUPS}/{backup.name}")
        assert r.returncode == 0, r.stderr
        rows = _rows(r.stderr)
        assert rows["work"][-1] == "verify" and rows["dom0 home (user)"][-1] == "verify", r.stderr
        assert "missing" not in r.stderr and "exists" not in r.stderr, r.stderr
        assert "Backup verified" in r.stdout
        before.check()
        doc = json.loads(system.restore("--verify-only", "--json", "-d", "backupvm",
                                        f"{VM_BACKUPS}/{backup.name}").stdout)  # fmt: skip
        assert [v["action"] for v in doc["vms"]] == ["verify"]
