"""Backups and restores across Qubes releases, and R4.2's representative subset of the restore suite.

test_cli_restore.py, test_cli_backup.py and the tamper suite run on R4.3 (conftest.RELEASE); their use cases A
and C and the exact-requests check of a backup also run on R4.2 (parametrized with ``release``).  Here: a
backup made on each release restored into a fresh system of each release (devices mapped as
docs/ARCHITECTURE.md says, notes where the release has them, a user's own label created with the backup's
colour, backup_timestamp the backup's creation time), and on R4.2 a damaged backup and a restore failing at
its commit rolled back (the label it created removed too).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    RELEASES,
    RUNNING_VMS,
    VM_BACKUPS,
    Sim,
    Unchanged,
    assert_restored_like,
    make_fresh,
    new_sim,
    one_error_line,
    share_backup,
    vm_metadata,
)
from qubes_backup_dom0.qubes.adminapi import AdminAPI
from qubes_backup_sim import launch
from test_cli_restore import _damaged

TEAL = "0x008080"
MadeOn = Callable[[str], tuple[Sim, Path]]


@pytest.fixture(scope="module")
def made_on(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MadeOn]:
    """A full backup of the small system of a release, with a label of the user's own (teal, on vault)."""
    made: dict[str, tuple[Sim, Path]] = {}

    def get(release: str) -> tuple[Sim, Path]:
        if release not in made:
            src = new_sim(tmp_path_factory.mktemp(f"made-on-{release}") / "sim", running=RUNNING_VMS,
                          release=release)  # fmt: skip
            api = AdminAPI(src.system.admin_socket())
            api.call("admin.label.Create", "dom0", "teal", TEAL.encode())
            api.call("admin.vm.property.Set", "vault", "label", b"teal")
            made[release] = src, src.backup_to_vm()
        return made[release]

    yield get
    for src, _ in made.values():
        launch.stop_qubesd(src.dir)


def _devices_after(src_devices: list[tuple[str, ...]], dst_release: str) -> list[tuple[str, ...]]:
    """A VM's device assignments (conftest._devices tuples) as they must be after a restore on dst_release."""
    out = []
    for devclass, backend, port, mode, identity, opts in src_devices:
        if dst_release == "4.2":
            out.append((devclass, backend, port, "", "", opts))
        else:
            mode = mode or ("required" if devclass in ("pci", "block") else "auto-attach")
            out.append((devclass, backend, port, mode, identity or "*", opts))
    return sorted(out)


@pytest.mark.parametrize("dst_release", RELEASES)
@pytest.mark.parametrize("src_release", RELEASES)
def test_full_restore_across_releases(tmp_path: Path, made_on: MadeOn, src_release: str, dst_release: str) -> None:
    """Everything into a freshly installed system: every VM as it was, its device assignments made the way
    the target release makes them, notes where both releases have them, teal created with its colour."""
    src, backup = made_on(src_release)
    dst = make_fresh(tmp_path / "fresh", src, release=dst_release)
    assert dst.release == dst_release
    share_backup(backup, dst)
    r = dst.restore("-d", "backupvm", f"{VM_BACKUPS}/{backup.name}")
    assert r.returncode == 0, r.stderr
    vms = [d.name for d in src.collection().domains if d.include_in_backups and d.name != "dom0"]
    created = re.search(r"created (\S+)Z", r.stdout)
    assert created, r.stdout
    for vm in vms:
        want, got = vm_metadata(src, vm), vm_metadata(dst, vm)
        want["devices"] = _devices_after(want["devices"], dst_release)  # type: ignore[arg-type]
        if dst_release == "4.2":
            want["notes"] = None  # R4.2 has none
        assert got == want, (vm, {k: (want[k], got[k]) for k in want if want[k] != got[k]})
        for vol, path in src.volume_files(vm).items():
            assert_restored_like(path, dst.volume_files(vm)[vol])
    work = dst.collection()["work"]
    assert work.raw_property("backup_timestamp") is not None  # the backup's creation time (to the second)
    assert dst.collection()["vault"].label == "teal"
    assert AdminAPI(dst.system.admin_socket()).call("admin.label.Get", "dom0", "teal") == TEAL.encode()
    notes_warnings = [line for line in r.stderr.splitlines() if "notes not restored" in line]
    assert bool(notes_warnings) == (src_release == "4.3" and dst_release == "4.2"), r.stderr
    if src_release == "4.3" and dst_release == "4.3":  # the assignment as it was: mode and identity
        assert ("block", "dom0", "loop7", "required", "*", "(('frontend-dev', 'xvdi'), ('read-only', 'yes'))") \
            in vm_metadata(dst, "work")["devices"]  # type: ignore[operator]  # fmt: skip
    assert dst.staging_dirs() == [] and dst.in_progress() == []


def test_r42_damaged_backup_changes_nothing(tmp_path: Path, made_on: MadeOn) -> None:
    """R4.2's rollback: a backup missing a chunk fails verification mid-restore; every VM created so far is
    removed (admin.vm.Remove) and dom0 is as it was."""
    src, backup = made_on("4.2")
    dst = make_fresh(tmp_path / "fresh", src)
    share_backup(backup, dst)
    location = _damaged(dst, backup, "missing-chunk")
    os.sync()  # the fresh system's files were just written: their block counts settle on writeback
    guard = Unchanged(dst)
    r = dst.restore("-d", "backupvm", location)
    assert r.returncode != 0 and "damaged or tampered" in one_error_line(r.stderr), r.stderr
    guard.check()


@pytest.mark.parametrize("release", RELEASES)
def test_failed_commit_removes_the_label_it_created(tmp_path: Path, made_on: MadeOn, release: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The label is created at the commit, after everything verified; a commit that then fails (qubesd
    refuses to remove an in-progress tag) removes the VMs and the label: dom0 as it was."""
    src, backup = made_on(release)
    dst = make_fresh(tmp_path / "fresh", src)
    share_backup(backup, dst)
    os.sync()
    guard = Unchanged(dst)
    launch.stop_qubesd(dst.dir)
    monkeypatch.setenv("QUBES_SIM_FAIL", "admin.vm.tag.Remove+backup-restore-in-progress#1")
    log = tmp_path / "requests.jsonl"
    launch.ensure_qubesd(dst.dir, idle=60, log=log)
    monkeypatch.delenv("QUBES_SIM_FAIL")
    r = dst.restore("-d", "backupvm", f"{VM_BACKUPS}/{backup.name}", "fedora-41", "vault")
    assert r.returncode != 0 and "injected failure" in one_error_line(r.stderr), r.stderr
    launch.stop_qubesd(dst.dir)
    guard.check()
    assert "teal" not in dst.collection().labels.values()
    calls = [(q["method"], q["arg"], q["dest"], q["payload"]) for q in map(json.loads, log.read_text().splitlines())]
    made = calls.index(("admin.label.Create", "teal", "dom0", TEAL))
    assert calls[made + 1] == ("admin.vm.property.Set", "label", "vault", "teal")
    assert calls.index(("admin.label.Remove", "teal", "dom0", "")) > calls.index(("admin.vm.Remove", "", "vault", ""))
