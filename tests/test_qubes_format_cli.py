"""qvm-backup-restore given a backup in Qubes OS' own format (issue 17 item 3, issue 18 item 4).

No switch to another tool on unauthenticated bytes: the backup is reported in one line with the exact
command that restores it with Qubes' own tool (exit code 4), and that tool runs only with
``--use-qubes-restore``, never given our ``-p``/``-y``; the result (also ``--json``) says which tool ran.
``--list-backups`` shows Qubes' file names and marks Qubes' format.  Qubes' tool is a fake here
(``QUBES_BACKUP_QUBES_RESTORE``) that records its arguments; the backups are the real sample made by Qubes'
own qvm-backup and ones written as qubes/backup.py writes them (tests/qubes_format.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import qubes_format
from conftest import BIN, VM_BACKUPS, Sim, one_error_line
from qubes_backup_dom0.cli.qubes_tools import EXIT_QUBES_FORMAT, QUBES_RESTORE, qubes_command

REAL = Path(__file__).parent / "data" / "qubes-os-backup" / "qubes-2026-12-06T022756"
QUBES_VM_NAME = "qubes-backup-2025-03-04T050607"  # how Qubes' own qubes.Backup names a backup in a VM


def fake_tool(tmp: Path, rc: int = 7) -> Path:
    tool = tmp / "qubes-qvm-backup-restore"
    tool.write_text("#!/bin/sh\n"
                    f'for a in "$@"; do printf "%s\\n" "$a"; done > {shlex.quote(str(tmp / "tool.args"))}\n'
                    'echo "fake Qubes tool output"\n'
                    f'echo "handed=$QUBES_BACKUP_HANDED_OVER" > {shlex.quote(str(tmp / "tool.env"))}\n'
                    f"exit {rc}\n")  # fmt: skip
    tool.chmod(0o755)
    return tool


def run(sim: Sim, tool: Path | None, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = sim.env() | extra
    if tool is not None:
        env["QUBES_BACKUP_QUBES_RESTORE"] = str(tool)
    return subprocess.run([str(BIN / "qvm-backup-restore"), *args], env=env, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, capture_output=True)  # fmt: skip


def tool_args(tmp: Path) -> list[str] | None:
    path = tmp / "tool.args"
    return path.read_text().splitlines() if path.exists() else None


def command_in(line: str) -> list[str]:
    """The command a one-line report names (after "Qubes' own tool: "), split as a shell would."""
    text = line.split("restore it with Qubes' own tool: ", 1)[1].split("; or run this command again", 1)[0]
    return shlex.split(text)


def test_reported_in_one_line_with_the_exact_command(sim: Sim, tmp_path: Path) -> None:
    shutil.copyfile(REAL, sim.vm_backups / REAL.name)
    location = f"{VM_BACKUPS}/{REAL.name}"
    tool = fake_tool(tmp_path)
    xml = sim.qubes_xml.read_bytes()
    r = run(sim, tool, "-y", "-p", "/pw", "-d", "backupvm", "-x", "sys-net", "--skip-conflicting", "-v", location,
            "tiny")  # fmt: skip
    assert r.returncode == EXIT_QUBES_FORMAT == 4, r.stderr
    line = one_error_line(r.stderr)
    assert "Qubes OS' own format (version 4" in line and "not restored" in line and "--use-qubes-restore" in line
    assert command_in(line) == [QUBES_RESTORE, "-d", "backupvm", "-x", "sys-net", "--skip-conflicting", "--verbose",
                                location, "tiny"]  # fmt: skip
    assert r.stdout == ""
    assert tool_args(tmp_path) is None  # Qubes' tool did not run
    assert sim.qubes_xml.read_bytes() == xml


def test_command_is_quoted_for_a_shell(sim: Sim, tmp_path: Path) -> None:
    """A dom0 file whose path needs quoting; --list becomes Qubes' --verify-only (Qubes' tool has no --list)."""
    odd = sim.dom0 / "old backups $HOME"
    odd.mkdir()
    shutil.copyfile(REAL, odd / REAL.name)
    location = f"/old backups $HOME/{REAL.name}"
    r = run(sim, fake_tool(tmp_path), "--list", "-p", "/pw", location)
    assert r.returncode == 4, r.stderr
    line = one_error_line(r.stderr)
    assert command_in(line) == [QUBES_RESTORE, "--verify-only", location]
    assert shlex.quote(location) in line
    assert tool_args(tmp_path) is None
    # A location or VM that starts with "-" comes after "--", as an option never could.
    args = argparse.Namespace(source_vm="dom0", exclude=[], location="-odd", vms=["-vm"], quiet=True)
    assert qubes_command(args) == [QUBES_RESTORE, "--quiet", "--", "-odd", "-vm"]


@pytest.mark.parametrize("where", ["dom0 file", "backup VM"])
def test_use_qubes_restore_runs_it_without_p_and_y(sim: Sim, tmp_path: Path, where: str) -> None:
    if where == "dom0 file":
        shutil.copyfile(REAL, sim.dom0 / REAL.name)
        loc = ["/" + REAL.name]
    else:
        if not qubes_format.have_tools() and not os.environ.get("CI"):
            pytest.skip("the scrypt tool is missing (.ci/run installs it)")
        qubes_format.write_qubes_backup(sim.vm_backups / QUBES_VM_NAME, "pw", {"vm1/private.img": b"x" * 9000})
        loc = ["-d", "backupvm", f"{VM_BACKUPS}/{QUBES_VM_NAME}"]
    tool = fake_tool(tmp_path, rc=7)
    r = run(sim, tool, "-y", "-p", "/pw", "--use-qubes-restore", "--verify-only", *loc)
    assert r.returncode == 7, r.stderr  # Qubes' tool's exit code
    args = tool_args(tmp_path)
    assert args == [*loc[:-1], "--verify-only", loc[-1]]
    assert not {"-p", "--passphrase-file", "/pw", "-y", "--yes", "--use-qubes-restore"} & set(args)
    assert (tmp_path / "tool.env").read_text() == "handed=1\n"  # it never hands over back to us
    running, = [ln for ln in r.stderr.splitlines() if "running Qubes' own tool" in ln]
    assert shlex.split(running.split("running Qubes' own tool: ", 1)[1]) == [str(tool), *args]
    assert "fake Qubes tool output" in r.stdout
    assert r.stdout.splitlines()[-1] == (f"Qubes OS' own {tool} ran for this backup in Qubes' format "
                                         "(not qubes-backup): exit code 7")  # fmt: skip


def test_json_says_which_tool_ran(sim: Sim, tmp_path: Path) -> None:
    shutil.copyfile(REAL, sim.dom0 / REAL.name)
    tool = fake_tool(tmp_path, rc=0)
    r = run(sim, tool, "-p", "/pw", "--json", "--use-qubes-restore", "/" + REAL.name)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # only our document on stdout: Qubes' tool's output went to stderr
    assert doc["tool"] == "qubes-os" and doc["ok"] is True and doc["tool_exit_code"] == 0
    assert doc["tool_command"] == [str(tool), "/" + REAL.name]
    assert doc["backup"] == {"format": "qubes-os", "format_version": 4, "authenticated": False}
    assert "fake Qubes tool output" in r.stderr

    (tmp_path / "tool.args").unlink()
    r = run(sim, tool, "-p", "/pw", "--json", "/" + REAL.name)
    assert r.returncode == 4
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["exit_code"] == 4 and doc["tool"] is None
    assert doc["qubes_restore_command"] == [QUBES_RESTORE, "/" + REAL.name]
    assert tool_args(tmp_path) is None


def test_our_backups_are_restored_by_us_with_the_option(sim: Sim, tmp_path: Path) -> None:
    backup = sim.backup_to_vm("work")
    tool = fake_tool(tmp_path)
    r = run(sim, tool, "-y", "-p", "/pw", "--json", "--use-qubes-restore", "--verify-only", "-d", "backupvm",
            f"{VM_BACKUPS}/{backup.name}")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tool"] == "qubes-backup"
    assert tool_args(tmp_path) is None


def test_no_qubes_tool_installed(sim: Sim, tmp_path: Path) -> None:
    shutil.copyfile(REAL, sim.dom0 / REAL.name)
    r = run(sim, tmp_path / "not-installed", "-p", "/pw", "--use-qubes-restore", "/" + REAL.name)
    assert r.returncode == 4
    line = one_error_line(r.stderr)
    assert "not installed" in line and "qubes-core-admin-client" in line and QUBES_RESTORE in line
    # Started by Qubes' tool (it found us first on PATH): never back to it, no loop.
    r = run(sim, fake_tool(tmp_path), "-p", "/pw", "--use-qubes-restore", "/" + REAL.name,
            QUBES_BACKUP_HANDED_OVER="1")  # fmt: skip
    assert r.returncode == 4 and tool_args(tmp_path) is None
    assert "not installed" in one_error_line(r.stderr)


def test_list_backups_shows_qubes_names_and_format(sim: Sim) -> None:
    ours = sim.backup_to_vm("work")
    shutil.copyfile(REAL, sim.vm_backups / REAL.name)  # Qubes' dom0 name
    shutil.copyfile(REAL, sim.vm_backups / QUBES_VM_NAME)  # Qubes' name in a backup VM
    (sim.vm_backups / "qubes-2025-13-01T000000.txt").write_text("not listed")
    r = run(sim, None, "--list-backups", "-d", "backupvm", VM_BACKUPS)
    assert r.returncode == 0, r.stderr
    rows = {ln.split("|")[0].strip(): ln for ln in r.stdout.splitlines() if "|" in ln}
    assert set(rows) >= {REAL.name, QUBES_VM_NAME, ours.name}
    assert "Qubes OS' own format (version 4)" in rows[REAL.name]
    assert "Qubes OS' own format (version 4)" in rows[QUBES_VM_NAME]
    assert "Qubes OS' own format" not in rows[ours.name]
    doc = json.loads(run(sim, None, "--list-backups", "--json", "-d", "backupvm", VM_BACKUPS).stdout)
    formats = {b["name"]: b["format"] for b in doc["backups"]}
    assert formats == {REAL.name: "qubes-os", QUBES_VM_NAME: "qubes-os", ours.name: "qubes-backup"}
