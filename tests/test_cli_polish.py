"""The rough edges of issue 19 items 5-9: Qubes' notes in the backup table, verify says verify, a directory as
restore location (``--latest``), exit codes and closed pipes, listing polish."""

from __future__ import annotations

import json

from conftest import KDF, VM_BACKUPS, Sim, new_sim
from qubes_backup_dom0.cli.backup import RUNNING_NOTE
from qubes_backup_dom0.cli.common import human


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


def _two_backups(sim: Sim) -> tuple[str, str]:
    import time

    first = sim.backup_to_vm("work")
    time.sleep(1.1)  # backup file names have a resolution of one second
    second = sim.backup_to_vm("vault")
    return first.name, second.name


def test_directory_as_restore_location_lists_its_backups_newest_first(sim: Sim) -> None:
    import re

    from conftest import Unchanged, one_error_line

    first, second = _two_backups(sim)
    (sim.dom0 / "backups").mkdir()
    assert sim.backup("-q", "/backups", "work").returncode == 0
    before = Unchanged(sim)
    for args, where, count in ((("-d", "backupvm", VM_BACKUPS), f"backupvm:{VM_BACKUPS}", 2),
                               (("-d", "backupvm", VM_BACKUPS + "/"), f"backupvm:{VM_BACKUPS}/", 2),
                               (("/backups",), "/backups", 1)):  # fmt: skip
        r = sim.restore(*args)
        assert r.returncode == 2, r.stderr
        assert f"{where} is a directory: give one of the {count} backups" in one_error_line(r.stderr)
        rows = [line for line in r.stdout.splitlines() if line.startswith("qubes-backup-")]
        assert len(rows) == count, r.stdout
        if count == 2:
            assert rows[0].startswith(second) and rows[1].startswith(first)  # newest first
            size = (sim.vm_backups / second).stat().st_size
            cells = [c.strip() for c in rows[0].split(" | ")]
            assert re.fullmatch(r"[0-9a-f]{32}", cells[1]) and cells[2].endswith("Z")
            assert cells[3] == human(size)
    before.check()
    # --list-backups: the same table, with the sizes (also in JSON)
    r = sim.restore("--list-backups", "-d", "backupvm", VM_BACKUPS)
    assert [line.split(" | ")[0].strip() for line in r.stdout.splitlines()[3:]] == [second, first]
    doc = json.loads(sim.restore("--list-backups", "--json", "-d", "backupvm", VM_BACKUPS).stdout)
    assert {b["name"]: b["size"] for b in doc["backups"]} == {
        n: (sim.vm_backups / n).stat().st_size for n in (first, second)}


def test_latest_restores_the_newest_and_backup_id_still_pins(sim: Sim) -> None:
    from conftest import one_error_line

    first, second = _two_backups(sim)
    ids = {n: json.loads(sim.restore("--list", "--json", "-d", "backupvm", f"{VM_BACKUPS}/{n}").stdout)
           ["backup"]["id"] for n in (first, second)}  # fmt: skip
    r = sim.restore("--latest", "--verify-only", "--json", "-d", "backupvm", VM_BACKUPS)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["backup"]["id"] == ids[second]
    assert f"Newest backup in backupvm:{VM_BACKUPS}: {second}" in r.stderr
    r = sim.restore("--latest", "--verify-only", "--backup-id", ids[first], "-d", "backupvm", VM_BACKUPS)
    assert r.returncode == 3 and ids[first] in one_error_line(r.stderr), r.stderr
    r = sim.restore("--latest", "--rename-conflicting", "-d", "backupvm", VM_BACKUPS)
    assert r.returncode == 0, r.stderr
    assert "vault1" in sim.collection().names()  # the newest backup holds vault
    r = sim.restore("--latest", "-d", "backupvm", "s3://bucket/x")
    assert r.returncode == 2 and "--latest needs a directory" in one_error_line(r.stderr)
    empty = sim.vm_root("backupvm") / "home/user/empty"
    empty.mkdir()
    r = sim.restore("--latest", "-d", "backupvm", "/home/user/empty")
    assert r.returncode == 1 and "no backup in backupvm:/home/user/empty" in one_error_line(r.stderr)


# ------------------------------------------------------------------------------------ exit codes and pipes


def test_answering_no_to_qvm_backup_exits_0(sim: Sim) -> None:
    from conftest import Unchanged
    from test_cli_compat import _on_terminal

    before = Unchanged(sim)
    rc, err = _on_terminal(sim, ["qvm-backup", "-p", "/pw", *KDF, "-d", "backupvm", VM_BACKUPS, "work"],
                           [("[y/N]", b"n\n")])  # fmt: skip
    assert rc == 0, err
    assert "Backup cancelled." in err
    assert list(sim.vm_backups.iterdir()) == []
    before.check()


def test_missing_location_is_the_same_code_in_dom0_and_in_a_vm(sim: Sim) -> None:
    from conftest import one_error_line

    cases = [("qvm-backup", ("-y", "-p", "/pw", *KDF), "/nothere", ("work",)),
             ("qvm-backup-restore", ("-y", "-p", "/pw"), "/nothere/qubes-backup-2026-01-01T000000", ()),
             ("qvm-backup-restore", ("--list-backups",), "/nothere", ())]  # fmt: skip
    for tool, opts, location, vms in cases:
        in_dom0 = sim.run(tool, *opts, location, *vms)
        in_vm = sim.run(tool, *opts, "-d", "backupvm", location, *vms)
        one_error_line(in_dom0.stderr), one_error_line(in_vm.stderr)
        assert in_dom0.returncode == in_vm.returncode == 1, (tool, in_dom0.stderr, in_vm.stderr)


def _closed(sim: Sim, which: str, tool: str, *args: str) -> tuple[int, str]:
    """Run with stdout or stderr a pipe nobody reads (closed at once, as `| head -0` would); the other is
    captured."""
    import subprocess

    from conftest import BIN

    proc = subprocess.Popen([str(BIN / tool), *args], env=sim.env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    closed, kept = (proc.stdout, proc.stderr) if which == "stdout" else (proc.stderr, proc.stdout)
    assert closed is not None and kept is not None
    closed.close()
    out = kept.read()
    return proc.wait(timeout=300), out


def test_closed_stdout_or_stderr_does_not_fail_a_written_backup(sim: Sim) -> None:
    for which in ("stdout", "stderr"):
        before = set(sim.vm_backups.iterdir())
        rc, out = _closed(sim, which, "qvm-backup", "-y", "-p", "/pw", *KDF, "-d", "backupvm", VM_BACKUPS, "work")
        assert rc == 0, out
        assert "internal error" not in out and "Traceback" not in out
        assert len(set(sim.vm_backups.iterdir()) - before) == 1
    rc, err = _closed(sim, "stdout", "qvm-backup-restore", "--list-backups", "-d", "backupvm", VM_BACKUPS)
    assert rc == 0 and err == "", err
    rc, err = _closed(sim, "stdout", "qvm-backup-restore", "-p", "/pw", "--verify-only", "-d", "backupvm",
                      f"{VM_BACKUPS}/{sorted(sim.vm_backups.iterdir())[0].name}")  # fmt: skip
    assert rc == 0 and "internal error" not in err, err


def test_backup_the_vm_reader_finds_malformed_is_exit_3(sim: Sim) -> None:
    """Non-zero padding after the header member: the agent's strict tar reader refuses it, in the backup VM
    and for a dom0 file alike; that is a damaged backup (exit 3, as a failed MAC), not a failure to read."""
    from conftest import one_error_line

    backup = sim.backup_to_vm("work")
    data = bytearray(backup.read_bytes())
    size = int(data[124:136].rstrip(b"\0 ").decode(), 8)  # the header member's size (ustar, octal)
    assert size % 512, "the header member needs padding for this test"
    data[512 + size] = 1
    bad = sim.vm_backups / "qubes-backup-2030-01-01T000000"
    bad.write_bytes(bytes(data))
    (sim.dom0 / "bad").write_bytes(bytes(data))
    for args in (("-d", "backupvm", f"{VM_BACKUPS}/{bad.name}"), ("/bad",)):
        r = sim.restore("--verify-only", *args)
        line = one_error_line(r.stderr)
        assert r.returncode == 3, r.stderr
        assert "the backup is damaged" in line and "non-zero padding after member backup-header" in line


# ------------------------------------------------------------------------------------------ listing polish


def test_list_shows_only_the_vms_asked_for_and_a_legend_for_defaults(sim: Sim) -> None:
    from qubes_backup_dom0.cli.restore import DEFAULT_LEGEND

    location = f"{VM_BACKUPS}/{sim.backup_to_vm('work', 'vault', 'dom0').name}"
    full = sim.restore("--list", "-d", "backupvm", location)
    assert {"work", "vault", "dom0 home (user)"} <= set(_rows(full.stdout)), full.stdout
    assert DEFAULT_LEGEND in full.stdout.splitlines()  # work's "(sys-firewall)" netvm is a default
    r = sim.restore("--list", "-d", "backupvm", location, "work")
    assert r.returncode == 0, r.stderr
    assert set(_rows(r.stdout)) == {"VM", "work"}, r.stdout
    r = sim.restore("--list", "-x", "work", "-d", "backupvm", location)
    assert set(_rows(r.stdout)) == {"VM", "vault", "dom0 home (user)"}, r.stdout
    doc = json.loads(sim.restore("--list", "--json", "-d", "backupvm", location, "vault").stdout)
    assert [v["name"] for v in doc["vms"]] == ["vault"] and doc["dom0_home"] is None
    assert doc["size"] == doc["vms"][0]["size"]


def test_help_names_every_kind_of_location() -> None:
    import subprocess

    from conftest import BIN

    for tool in ("qvm-backup", "qvm-backup-restore"):
        text = " ".join(subprocess.run([str(BIN / tool), "--help"], capture_output=True, text=True).stdout.split())
        assert "s3://" in text and "ssh://" in text, text


def test_warnings_say_warning_once_and_sizes_are_binary_units(sim: Sim) -> None:
    import re

    r = sim.backup("--save-profile", "mine", "-d", "backupvm", VM_BACKUPS, "work")
    assert r.returncode == 0, r.stderr
    warning = [line for line in r.stderr.splitlines() if "plain text" in line]
    assert warning == ["qvm-backup: warning: Passphrase will be saved in dom0 in plain text. File location: "
                       "/etc/qubes/backup/mine.conf"], r.stderr  # fmt: skip
    assert not re.search(r"warning:.*warning:", r.stderr, re.I | re.S), r.stderr
    assert re.fullmatch(r"Backup written to: .+, [0-9.]+ (B|KiB|MiB|GiB|TiB)\)", r.stdout.strip()), r.stdout
    assert not re.search(r"\d+ bytes", r.stdout + r.stderr)


def test_short_passphrase_is_warned_about(sim: Sim) -> None:
    from qubes_backup_dom0.cli.passphrase import SHORT_PASSPHRASE

    (sim.dom0 / "short").write_text("abc\n")
    r = sim.run("qvm-backup", "-y", "-p", "/short", *KDF, "-d", "backupvm", VM_BACKUPS, "work")
    assert r.returncode == 0, r.stderr
    assert "qvm-backup: warning: the passphrase has only 3 characters" in r.stderr
    assert f"use {SHORT_PASSPHRASE} or more characters" in r.stderr
    r = sim.backup("-d", "backupvm", VM_BACKUPS, "work")  # the usual test passphrase: long enough
    assert r.returncode == 0 and "the passphrase has only" not in r.stderr


def test_backups_started_in_the_same_second_get_different_names(sim: Sim) -> None:
    """Names resolve to the second: a backup started in the same second as the previous one is named one
    second later (its authenticated creation time too), not refused as "already exists"."""
    from qubes_backup_dom0.backup.targets import backup_instant
    from qubes_backup_dom0.format.naming import file_name

    instants = [backup_instant(sim.system) for _ in range(3)]
    assert len({file_name(t) for t in instants}) == 3
    assert instants == sorted(instants)
    # the real thing, twice in a row: two files, both restorable by name
    before = set(sim.vm_backups.iterdir())
    for _ in range(2):
        r = sim.run("qvm-backup", "-y", "-p", "/pw", *KDF, "-d", "backupvm", VM_BACKUPS, "work")
        assert r.returncode == 0, r.stderr
    assert len(set(sim.vm_backups.iterdir()) - before) == 2
