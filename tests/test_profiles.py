"""Backup profiles and unattended backups (issue 12 item 1): Qubes' YAML profiles in /etc/qubes/backup,
passphrase_text or passphrase_vm (qubes.BackupPassphrase+NAME), @tag:/@type: selectors, --save-profile."""

from __future__ import annotations

import re
import stat
import time

import pytest
import yaml
from conftest import KDF, PASSPHRASE, VM_BACKUPS, Sim, one_error_line
from qubes_backup_dom0.cli.profile import PLAINTEXT_WARNING, resolve
from qubes_backup_dom0.qubes.interface import Qubes
from test_cli_backup import archived, read_manifest, result_where


def write_profile(sim: Sim, name: str, text: str) -> None:
    d = sim.dom0 / "etc/qubes/backup"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.conf").write_text(text)


def run_profile(sim: Sim, name: str, *extra: str):  # type: ignore[no-untyped-def]
    return sim.run("qvm-backup", "-y", *KDF, *extra, "--profile", name)


BASE = f"destination_vm: backupvm\ndestination_path: {VM_BACKUPS}\n"


def test_profile_with_passphrase_text_and_selectors(sim: Sim) -> None:
    Qubes(sim.system).set_tag("personal", "nightly")
    selection = "include: [work, '@tag:nightly', '$type:TemplateVM']\nexclude: ['@type:AdminVM', debian-12]\n"
    write_profile(sim, "nightly", BASE + selection + f"compression: gzip\npassphrase_text: {PASSPHRASE}\n")
    r = run_profile(sim, "nightly")
    assert r.returncode == 0, r.stderr
    where = result_where(r.stdout).split(":", 1)[1]
    manifest = read_manifest(sim, where)
    assert archived(manifest) == {"work", "personal", "fedora-41"}
    assert (sim.vm_root("backupvm") / where.lstrip("/")).is_file()


def test_profile_passphrase_from_a_vm_service(sim: Sim) -> None:
    """passphrase_vm: the passphrase is the line qubes.BackupPassphrase+PROFILE prints in that VM."""
    home = sim.vm_root("vault") / "home/user"
    home.mkdir(parents=True, exist_ok=True)
    (home / ".backup-passphrase.nightly").write_text(f"  {PASSPHRASE}\n")  # stripped, as Qubes does
    write_profile(sim, "nightly", BASE + "include: [work]\npassphrase_vm: vault\n")
    r = run_profile(sim, "nightly", "-q")
    assert r.returncode == 0, r.stderr
    # The backup opens with the passphrase the VM gave.
    read_manifest(sim, result_where(r.stdout).split(":", 1)[1])


def test_profile_passphrase_vm_failing_is_one_line_and_writes_nothing(sim: Sim) -> None:
    (sim.vm_root("vault") / "home/user").mkdir(parents=True, exist_ok=True)  # no passphrase file in it
    write_profile(sim, "nightly", BASE + "include: [work]\npassphrase_vm: vault\n")
    r = run_profile(sim, "nightly")
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert "failed to retrieve the passphrase from VM vault (qubes.BackupPassphrase+nightly)" in line
    assert list(sim.vm_backups.iterdir()) == []


@pytest.mark.parametrize(("text", "message"), [
    ("include: [work]\n", "missing destination_vm"),
    (BASE + "include: [work]\n", "passphrase_text or passphrase_vm"),
    (BASE + "include: work\npassphrase_text: x\n", "include must be a list"),
    (BASE + "include: [work]\ncompression: xz\npassphrase_text: x\n", "compression 'xz' is not supported"),
    (BASE + "include: [work]\npassphrase_text: !!python/object/apply:os.system [id]\n", "not valid YAML"),
    ("[unclosed\n", "not valid YAML"),
    (BASE + "include: ['@color:red']\npassphrase_text: x\n", "unknown VM selector"),
    (BASE + "include: ['@tag:nobody-has-it']\npassphrase_text: x\n", "match no VM"),
    (BASE + "include: [work]\npassphrase_vm: nosuchvm\n", "passphrase_vm nosuchvm does not exist"),
])  # fmt: skip
def test_bad_profiles_are_one_line(sim: Sim, text: str, message: str) -> None:
    write_profile(sim, "bad", text)
    r = run_profile(sim, "bad")
    assert r.returncode == 2, r.stderr
    assert message in one_error_line(r.stderr)
    assert list(sim.vm_backups.iterdir()) == []


def test_missing_profile_and_conflicting_options(sim: Sim) -> None:
    r = run_profile(sim, "nothere")
    assert r.returncode == 2 and "backup profile does not exist: nothere" in one_error_line(r.stderr)
    write_profile(sim, "p", BASE + "include: [work]\npassphrase_text: x\n")
    for extra in (("-x", "work"), ("-p", "/pw"), ("--no-compress",), ("-d", "backupvm")):
        r = sim.run("qvm-backup", "-y", *KDF, *extra, "--profile", "p")
        assert r.returncode == 2 and "cannot be used together with --profile" in one_error_line(r.stderr), extra
    r = sim.run("qvm-backup", "-y", *KDF, "--profile", "p", VM_BACKUPS)
    assert r.returncode == 2 and "LOCATION cannot be used together with --profile" in one_error_line(r.stderr)
    r = sim.run("qvm-backup", "-y", *KDF, "--profile", "../etc/passwd")
    assert r.returncode == 2 and "bad profile name" in one_error_line(r.stderr)


def test_save_profile_warns_and_is_reusable(sim: Sim) -> None:
    r = sim.backup("--save-profile", "mine", "-x", "vault", "-Z", "gzip", "-d", "backupvm", VM_BACKUPS, "work",
                   "vault")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"{PLAINTEXT_WARNING} File location: /etc/qubes/backup/mine.conf" in r.stderr
    path = sim.dom0 / "etc/qubes/backup/mine.conf"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = yaml.safe_load(path.read_text())
    assert data == {"include": ["work", "vault"], "exclude": ["vault"], "passphrase_text": PASSPHRASE,
                    "compression": "gzip", "destination_vm": "backupvm", "destination_path": VM_BACKUPS}  # fmt: skip
    time.sleep(1.1)  # backup names have one-second resolution; the agent never replaces an existing one
    r2 = run_profile(sim, "mine", "-q")
    assert r2.returncode == 0, r2.stderr
    assert archived(read_manifest(sim, result_where(r2.stdout).split(":", 1)[1])) == {"work"}


def test_profile_into_a_dom0_directory(sim: Sim) -> None:
    (sim.dom0 / "backups").mkdir()
    write_profile(sim, "local", f"include: [work]\ndestination_vm: dom0\ndestination_path: /backups\n"
                  f"compression: false\npassphrase_text: {PASSPHRASE}\n")  # fmt: skip
    r = run_profile(sim, "local", "-q")
    assert r.returncode == 0, r.stderr
    assert re.match(r"Backup written to: /backups/qubes-backup-", r.stdout), r.stdout
    assert len(list((sim.dom0 / "backups").iterdir())) == 1


def test_resolve_selectors(sim: Sim) -> None:
    qubes = Qubes(sim.system)
    qubes.set_tag("work", "t1")
    qubes.set_tag("vault", "t1")
    assert sorted(resolve(qubes, ["@tag:t1"])) == ["vault", "work"]
    templates = resolve(qubes, ["@type:TemplateVM"])
    assert set(templates) == {"fedora-41", "debian-12"}
    assert resolve(qubes, ["work", "@tag:t1"]) == ["work", "vault"]  # no duplicates, order kept
    assert resolve(qubes, ["@type:AdminVM"]) == ["dom0"]


def test_backup_vm_halted_is_started_by_the_call_and_a_missing_one_fails_first(sim: Sim) -> None:
    """The sim equivalent of qrexec starting a halted backup VM, and of one that cannot be started."""
    assert Qubes(sim.system).vm_list()["backupvm"][1] == "Halted"
    write_profile(sim, "nightly", BASE + f"include: [work]\npassphrase_text: {PASSPHRASE}\n")
    r = run_profile(sim, "nightly", "-q")
    assert r.returncode == 0, r.stderr
    (sim.vm_root("vault") / "home/user").mkdir(parents=True, exist_ok=True)
    write_profile(sim, "nightly", BASE + "include: [work]\npassphrase_vm: vault\n")
    vm_root = sim.vm_root("backupvm")
    vm_root.rename(vm_root.with_name("backupvm.gone"))
    r = run_profile(sim, "nightly")
    assert r.returncode == 1
    assert "backupvm" in one_error_line(r.stderr) and "passphrase" not in r.stderr
