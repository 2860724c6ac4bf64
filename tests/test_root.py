"""Root or user: on a real dom0, qubes-backup's commands need root where lvm and writing VM volumes need it, and
say so in one line before anything is asked or done; elsewhere they run as a user (docs/INSTALL.md).

The commands run with QUBES_SIM unset against the fake endpoints of test_real_endpoints.py, as a user: the test
runs them with uid 1000 (a user namespace of bubblewrap when the test runs as root).  The endpoint that needs
root is the real one (QUBES_LVM / QUBES_RPC_DIR unset) where the check is under test; an overridden one (a
stand-in) needs none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, one_error_line
from fakes.qubesd import FakeQubesd
from test_real_endpoints import Endpoints, build


@pytest.fixture
def ep(tmp_path: Path):
    with FakeQubesd(tmp_path / "qubesd.sock") as fq:
        yield build(tmp_path, fq)


def as_user(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if os.geteuid() == 0:
        if shutil.which("bwrap") is None:
            pytest.fail("bwrap is needed to run a command as a user: apt-get install bubblewrap (bash .ci/run)",
                        pytrace=False)  # fmt: skip
        argv = ["bwrap", "--unshare-user", "--uid", "1000", "--gid", "1000", "--dev-bind", "/", "/", "--", *argv]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


def test_backup_as_user_needs_root_for_lvm(ep: Endpoints) -> None:
    argv = [str(BIN / "qvm-backup"), "-y", "-p", str(ep.tmp / "pw"), "--kdf-n", "1024", "--weak-kdf-ok",
            "-d", "backupvm", "/backups"]  # fmt: skip
    r = as_user(argv, without(ep.env(), "QUBES_LVM"))
    assert r.returncode == 1, r.stderr
    line = one_error_line(r.stderr)
    assert line == ("qvm-backup: error: lvm (snapshots of the VMs' volumes) needs root: run as root "
                    "(sudo qvm-backup ...)")  # fmt: skip
    assert ep.backup_files() == [] and ep.lvm_log() == []
    assert ep.fq.writes() == []
    # With a stand-in for lvm (the tests' fake endpoints) nothing needs root: the same backup runs as a user.
    r = as_user(argv, ep.env())
    assert r.returncode == 0, r.stderr
    assert len(ep.backup_files()) == 1


def test_restore_as_user_needs_root_to_write_vms(ep: Endpoints) -> None:
    restore = [str(BIN / "qvm-backup-restore"), "-y", "-p", str(ep.tmp / "pw"), "-d", "backupvm"]
    env = without(ep.env(), "QUBES_RPC_DIR")
    r = as_user([*restore, "/backups/qubes-backup-2026-01-01T000000"], env)
    assert r.returncode == 1, r.stderr
    line = one_error_line(r.stderr)
    assert line == ("qvm-backup-restore: error: restoring VMs (writing their volumes) needs root: run as root "
                    "(sudo qvm-backup-restore ...)")  # fmt: skip
    assert ep.fq.writes() == []
    # Verifying, listing and restoring only dom0's home write no VM volume: no root needed (they fail here for
    # another reason: there is no such backup).
    for extra in (["--verify-only"], ["--list"], []):
        vms = [] if extra else ["dom0"]
        r = as_user([*restore, *extra, "/backups/qubes-backup-2026-01-01T000000", *vms], env)
        assert r.returncode != 0 and "needs root" not in r.stderr, (extra, r.stderr)
