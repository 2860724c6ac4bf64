"""A backup VM whose template lacks qubes-backup-agent answers with Qubes' own qubes.Backup / qubes.Restore: both
commands stop at once with one line naming the VM and how to install the agent (they used to wait for the stall
timeout, 300 s, while Qubes' service waited for a line that never comes).

The stand-ins behave as Qubes' own (qubes-core-agent /etc/qubes-rpc, R4.2 and R4.3): qubes.Backup writes
``Starting Backupcopy`` on stdout, qubes.Restore ``Starting Restorecopy`` on stderr, then each reads a location
line.  The stall timeout is set far above the test's own limit, so a wait for it fails the test.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import BIN, KDF, VM_BACKUPS, Sim, new_sim, one_error_line
from qubes_backup_dom0.qubes.transport import Channel, QubesOwnService
from qubes_backup_protocol.frames import FrameType

REPLY = {FrameType.END: (0, 0), FrameType.ERROR: (0, 4096)}

QUBES_BACKUP = """echo Starting Backupcopy
read -r args
echo "Arguments: $args"
if [ -d "$args" ]; then cat > "$args/qubes-backup-by-qubes"; else echo "Invalid command"; exit 1; fi
"""
QUBES_RESTORE = """echo Starting Restorecopy >&2
read -r args
read -r paths
echo "Arguments: $args" >&2
if [ -f "$args" ]; then cat "$args"; else echo "Invalid command" >&2; exit 1; fi
"""
# What the simulation runs as a VM's service is a Python file (SimTransport): this one runs the shell script.
LAUNCH = 'import os, sys\nos.execv("/bin/sh", ["sh", "-c", {script!r}])\n'
LIMIT = 60  # seconds the test waits; the stall timeout (QUBES_BACKUP_TIMEOUT) is 600


def qubes_own(tmp_path: Path, backup: bool = True, restore: bool = True) -> Path:
    """An rpc dir with Qubes' own qubes.Backup and/or qubes.Restore (stand-ins); ours for the others."""
    rpc = tmp_path / "qubes-own-rpc"
    rpc.mkdir()
    repo_rpc = Path(__file__).resolve().parent.parent / "rpc-policy"
    for name, script, own in (("qubes.Backup", QUBES_BACKUP, backup), ("qubes.Restore", QUBES_RESTORE, restore)):
        if own:
            (rpc / name).write_text(LAUNCH.format(script=script))
        else:
            (rpc / name).symlink_to(repo_rpc / name)
    return rpc


def run(sim: Sim, rpc: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = sim.env() | {"QUBES_BACKUP_RPC_DIR": str(rpc), "QUBES_BACKUP_TIMEOUT": "600", "QUBES_SIM_SANDBOX": "0"}
    return subprocess.run([str(BIN / args[0]), *args[1:]], env=env, text=True, capture_output=True, timeout=LIMIT,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def assert_names_agent(r: subprocess.CompletedProcess[str], tool: str, service: str) -> None:
    assert r.returncode == 1, r.stderr
    line = one_error_line(r.stderr)
    assert line.startswith(f"{tool}: error: backupvm answered with Qubes' own {service} service"), line
    assert "install the qubes-backup-agent package in the template of backupvm" in line, line
    assert "docs/INSTALL.md" in line


@pytest.mark.parametrize(
    "args",
    [
        ("qvm-backup-restore", "--list-backups", "-d", "backupvm", VM_BACKUPS),
        ("qvm-backup-restore", "-y", "-p", "/pw", "-d", "backupvm", f"{VM_BACKUPS}/qubes-backup-2026-01-01T000000"),
        ("qvm-backup-restore", "-p", "/pw", "--verify-only", "-d", "backupvm", f"{VM_BACKUPS}/x"),
        ("qvm-backup", "-y", "-p", "/pw", *KDF, "-d", "backupvm", VM_BACKUPS),
    ],
    ids=["list-backups", "restore", "verify-only", "backup"],
)
def test_qubes_own_restore_service(tmp_path: Path, args: tuple[str, ...]) -> None:
    """Every command's first contact with the backup VM is a qubes.Restore request (qvm-backup: the listing that
    checks the directory)."""
    sim = new_sim(tmp_path / "sim")
    r = run(sim, qubes_own(tmp_path), *args)
    assert_names_agent(r, args[0], "qubes.Restore")


def test_qubes_own_backup_service(tmp_path: Path) -> None:
    """Our qubes.Restore (the directory check passes), Qubes' own qubes.Backup: the backup stops at its greeting,
    and nothing in the backup VM looks like a finished backup."""
    sim = new_sim(tmp_path / "sim")
    rpc = qubes_own(tmp_path, restore=False)
    r = run(sim, rpc, "qvm-backup", "-y", "-p", "/pw", *KDF, "-d", "backupvm", VM_BACKUPS)
    assert_names_agent(r, "qvm-backup", "qubes.Backup")
    assert not list(sim.vm_backups.glob("qubes-backup-*"))


def channel(argv: list[str]) -> Channel:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return Channel(proc, timeout=600, vm="backup VM backupvm", qube="backupvm")


@pytest.mark.parametrize("script,service", [(QUBES_BACKUP, "qubes.Backup"), (QUBES_RESTORE, "qubes.Restore")])
def test_channel_recognises_the_greeting(script: str, service: str) -> None:
    """Waiting for a frame: the greeting on stdout or stderr ends the wait at once."""
    ch = channel(["/bin/sh", "-c", script])
    try:
        with pytest.raises(QubesOwnService, match=f"backupvm answered with Qubes' own {service}"):
            ch.recv(REPLY)
    finally:
        ch.close()


def test_channel_recognises_the_greeting_while_sending() -> None:
    """Sending a stream that Qubes' own qubes.Backup takes whole (a location line that is a directory): the
    greeting on stdout stops the sending."""
    ch = channel(["/bin/sh", "-c", "echo Starting Backupcopy; cat > /dev/null"])
    try:
        with pytest.raises(QubesOwnService, match=r"qubes\.Backup"):
            for _ in range(100_000):
                ch.send(FrameType.DATA, "", b"x" * 65536)
    finally:
        ch.close()


def test_other_first_lines_are_not_taken_for_qubes_own() -> None:
    ch = channel(["/bin/sh", "-c", "echo Starting something else >&2; echo Starting Backup; exit 0"])
    try:
        with pytest.raises(Exception) as exc:
            ch.recv(REPLY)
        assert not isinstance(exc.value, QubesOwnService)
        assert ch.qubes_own_service() is None
    finally:
        ch.close()


def test_greeting_after_other_lines_on_stderr() -> None:
    """R4.2 runs a service through a login shell: a profile may write lines before the service's greeting."""
    ch = channel(["/bin/sh", "-c", "echo 'profile: a warning' >&2; " + QUBES_RESTORE])
    try:
        with pytest.raises(QubesOwnService, match=r"Qubes' own qubes\.Restore"):
            ch.recv(REPLY)
    finally:
        ch.close()


def test_our_frames_are_never_taken_for_a_greeting() -> None:
    """stdout that starts with a frame is our agent's, whatever its data holds (a backup may hold anything)."""
    ch = channel(["/bin/sh", "-c", r"printf 'QB\001\011\000\000\000\000\000\040\nStarting Backupcopy\n'; sleep 1"])
    try:
        with pytest.raises(Exception) as exc:
            ch.recv(REPLY)
        assert not isinstance(exc.value, QubesOwnService), exc.value
        assert ch.qubes_own_service() is None
    finally:
        ch.close()
