"""Command-line compatibility with Qubes' qvm-backup / qvm-backup-restore (issue 12 item 2)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import subprocess
import termios
import time

import pytest
from conftest import BIN, KDF, PASSPHRASE, VM_BACKUPS, Sim, Unchanged, one_error_line


def _backup(sim: Sim, *vms: str) -> str:
    return f"{VM_BACKUPS}/{sim.backup_to_vm(*vms).name}"


def test_encrypt_option_is_accepted_and_documented(sim: Sim) -> None:
    r = sim.backup("-e", "-d", "backupvm", VM_BACKUPS, "work")
    assert r.returncode == 0, r.stderr
    help_text = sim.run("qvm-backup", "--help").stdout
    assert "always encrypted" in help_text


def test_usage_lines_show_optional_arguments_as_optional(sim: Sim) -> None:
    usage = " ".join(sim.run("qvm-backup", "--help").stdout.split("\n\n")[0].split())
    assert "[LOCATION] [VM ...]" in usage and "[--profile NAME]" in usage and "[-e]" in usage
    usage = " ".join(sim.run("qvm-backup-restore", "--help").stdout.split("\n\n")[0].split())
    assert usage.endswith("LOCATION [VM ...]") and "[-q | -v]" in usage and "[--ignore-username-mismatch]" in usage
    r = sim.run("qvm-backup", "-y")
    assert r.returncode == 2 and "either --profile or LOCATION is required" in one_error_line(r.stderr)


def test_restore_with_passphrase_file_needs_no_yes(sim: Sim) -> None:
    """As Qubes' tool: -p means go ahead (no terminal here, and no -y)."""
    location = _backup(sim, "work")
    r = sim.run("qvm-backup-restore", "-p", "/pw", "--verify-only", "-d", "backupvm", location)
    assert r.returncode == 0, r.stderr
    assert "Backup verified" in r.stdout


def test_restore_verbose_lists_files(sim: Sim) -> None:
    location = _backup(sim, "work")
    r = sim.restore("-v", "--verify-only", "-d", "backupvm", location)
    assert r.returncode == 0, r.stderr
    assert "work: appvms/work/private.img (file," in r.stderr and "appvms/work/firewall.xml" in r.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("-d", "nosuchvm", f"{VM_BACKUPS}/x"), "no such VM: nosuchvm"),
    (("-d", "backupvm", f"{VM_BACKUPS}/nothere"), "location does not exist: /home/user/backups/nothere"),
    (("/nothere",), "backup file /nothere does not exist in dom0"),
])  # fmt: skip
def test_restore_reports_vm_and_location_before_the_passphrase(sim: Sim, args: tuple[str, ...],
                                                               message: str) -> None:  # fmt: skip
    """No -p and no terminal: had the passphrase been asked first, that would have been the error."""
    r = sim.run("qvm-backup-restore", *args)
    assert message in one_error_line(r.stderr), r.stderr
    assert "passphrase" not in r.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("-d", "nosuchvm", "/x"), "no such VM: nosuchvm"),
    (("-d", "backupvm", "/home/user/nothere"), "location does not exist: /home/user/nothere"),
    (("/nothere",), "directory /nothere does not exist in dom0"),
    (("-d", "backupvm", VM_BACKUPS, "nosuchvm"), "no such VM: nosuchvm"),
])  # fmt: skip
def test_backup_reports_vm_and_location_before_the_passphrase(sim: Sim, args: tuple[str, ...],
                                                              message: str) -> None:  # fmt: skip
    r = sim.run("qvm-backup", "-y", *KDF, *args)
    # A missing location is 1 in dom0 and in a VM alike (issue 19 item 8); a VM that does not exist is usage.
    assert r.returncode == 1 if "does not exist" in message else r.returncode == 2
    assert message in one_error_line(r.stderr), r.stderr
    assert "passphrase" not in r.stderr


def test_backing_up_dom0_home_into_itself_is_refused(sim: Sim) -> None:
    (sim.home / "backups").mkdir()
    for location in ("/home/user", "/home/user/backups"):
        r = sim.backup(location, "dom0", "work")
        assert r.returncode == 2
        assert "cannot back up dom0's home directory into itself" in one_error_line(r.stderr)
    assert list((sim.home / "backups").iterdir()) == []
    r = sim.backup("-q", "/home/user/backups", "work")  # without dom0 it is fine
    assert r.returncode == 0, r.stderr


def test_backing_up_the_backup_vm_into_itself_warns(sim: Sim) -> None:
    r = sim.backup("-d", "backupvm", VM_BACKUPS, "backupvm", "work")
    assert r.returncode == 0, r.stderr
    assert "warning: the backup VM backupvm is backed up into itself" in r.stderr


def _restore_as(sim: Sim, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    (sim.dom0 / "home" / user).mkdir(parents=True, exist_ok=True)
    env = sim.env() | {"QUBES_SIM_USER": user}
    return subprocess.run([str(BIN / "qvm-backup-restore"), "-p", "/pw", *args], env=env, text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=120)  # fmt: skip


def test_dom0_home_of_another_user_needs_ignore_username_mismatch(sim: Sim) -> None:
    location = _backup(sim, "dom0")
    (sim.dom0 / "home/bob").mkdir(parents=True)  # bob's (empty) home exists before: the restore must not touch it
    before = Unchanged(sim)
    r = _restore_as(sim, "bob", "-d", "backupvm", location)
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert "user user's, this system's user is bob" in line and "--ignore-username-mismatch" in line
    before.check()
    assert list((sim.dom0 / "home/bob").iterdir()) == []
    r = _restore_as(sim, "bob", "--ignore-username-mismatch", "-d", "backupvm", location)
    assert r.returncode == 0, r.stderr
    assert "warning: the dom0 home is user user's" in r.stderr
    (restored,) = (sim.dom0 / "home/bob").glob("home-restore-*")
    assert restored.is_dir()
    r = _restore_as(sim, "bob", "--verify-only", "-d", "backupvm", location)  # verifying is no restore
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(("option", "message"), [
    ("--location-is-service", "--location-is-service is not supported"),
])  # fmt: skip
def test_qubes_options_that_do_not_apply_are_one_line(sim: Sim, option: str, message: str) -> None:
    r = sim.restore(option, "-d", "backupvm", f"{VM_BACKUPS}/x")
    assert r.returncode == 2 and message in one_error_line(r.stderr)
    r = sim.restore("-Z", "gzip", "-d", "backupvm", f"{VM_BACKUPS}/x")
    assert r.returncode == 2 and "cannot be overridden" in one_error_line(r.stderr)


def test_qubes_options_without_effect_are_accepted(sim: Sim) -> None:
    location = _backup(sim, "work")
    r = sim.restore("--ignore-size-limit", "--auto-close", "--verify-only", "-d", "backupvm", location)
    assert r.returncode == 0, r.stderr


def _on_terminal(sim: Sim, args: list[str], answers: list[tuple[str, bytes]]) -> tuple[int, str]:
    """Run with a terminal as stdin; each answer is typed once its prompt appeared on stderr."""
    master, slave = pty.openpty()

    def child() -> None:
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=sim.env(), stdin=slave, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=child)  # fmt: skip
    os.close(slave)
    err = b""
    try:
        for prompt, keys in answers:
            deadline = time.monotonic() + 60
            while prompt.encode() not in err + _drain(master):
                assert proc.stderr is not None and time.monotonic() < deadline, err
                if select.select([proc.stderr], [], [], 0.1)[0]:
                    err += os.read(proc.stderr.fileno(), 65536)
            time.sleep(0.2)
            os.write(master, keys)
            err = err.replace(prompt.encode(), b"", 1)
        _out, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return proc.returncode, (err + rest).decode()


_tty_seen = b""


def _drain(master: int) -> bytes:
    """What the program wrote to the terminal itself (getpass prompts there)."""
    global _tty_seen
    while select.select([master], [], [], 0)[0]:
        try:
            _tty_seen += os.read(master, 65536)
        except OSError:
            break
    seen, _tty_seen = _tty_seen, b""
    return seen


def test_answering_no_exits_0_as_qubes_does(sim: Sim) -> None:
    location = _backup(sim, "work")
    before = Unchanged(sim)
    rc, err = _on_terminal(sim, ["qvm-backup-restore", "--skip-conflicting", "--rename-conflicting", "-d",
                                 "backupvm", location],
                           [("passphrase", PASSPHRASE.encode() + b"\n"), ("[y/N]", b"n\n")])  # fmt: skip
    assert rc == 0, err
    assert "Restore cancelled." in err
    before.check()
