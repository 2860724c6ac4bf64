"""A hostile backup VM against a repository (docs/REPOSITORY.md section 10; first set): it rolls back,
forks, swaps, drops, transplants or inflates what it stores.  Every case: refused with one line and exit
code 3 (VerificationError), before any VM is committed, dom0 left as it was.

The attacker works on the repository's files in the backup VM, which the real agent then serves; dom0 sees
only what an agent can send.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import BIN, Sim, Unchanged, new_sim, one_error_line, run_repo_backup
from qubes_backup_dom0.errors import BackupError, VerificationError
from qubes_backup_dom0.format import repo
from qubes_backup_dom0.qubes import repostate
from qubes_backup_dom0.restore.plan import RestoreOptions
from qubes_backup_dom0.restore.repository import RepoRestore
from test_repo_roundtrip import PASS, REPO, backup, copy_sparse

OTHER = "/home/user/other-repo"


class World:
    def __init__(self, sim: Sim, base: Path) -> None:
        self.sim = sim
        self.base = base
        self.repo = sim.vm_root("backupvm") / REPO.lstrip("/")
        self.other = sim.vm_root("backupvm") / OTHER.lstrip("/")
        self.pristine = base / "pristine"
        self.state_dir = sim.dom0 / repostate.STATE_DIR.lstrip("/")

    def roots(self, where: Path | None = None) -> list[Path]:
        return sorted(((where or self.repo) / "roots").iterdir())

    def objects(self, otype: str, where: Path | None = None) -> list[Path]:
        out = []
        for p in sorted(((where or self.repo) / "objects").rglob("*")):
            if p.is_file() and p.read_bytes()[5:6] == otype.encode():
                out.append(p)
        return out

    def reset(self) -> None:
        shutil.rmtree(self.repo)
        shutil.copytree(self.pristine, self.repo)


def _touch(sim: Sim, vm: str, offset: int, data: bytes) -> None:
    path = sim.volume_files(vm)["private"]
    new = path.with_name("new")
    copy_sparse(path, new)
    with open(new, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.rename(new, path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Three snapshots of work and vault (each run changes work), and a second repository made with the same
    passphrase in the same backup VM."""
    base = tmp_path_factory.mktemp("hostile")
    sim = new_sim(base / "sim")
    w = World(sim, base)
    for i in range(3):
        _touch(sim, "work", (40 + i) << 16, os.urandom(70000))
        backup(sim, ("work", "vault"))
    shutil.copytree(w.repo, w.pristine)
    # the second repository: same passphrase, another id; dom0's record of it is dropped (another machine)
    other = run_repo_backup(sim.system, ("work",), OTHER, passphrase=PASS, block_size=64 << 10)
    (w.state_dir / f"{other.repo_id}.json").unlink()
    return w


@pytest.fixture
def w(world: World) -> Iterator[World]:
    yield world
    world.reset()


def restore(w: World, snapshot: int | None = None, verify: bool = False) -> None:
    opts = RestoreOptions(vms=("work", "vault"), rename_conflicting=True, verify_only=verify)
    job = RepoRestore(w.sim.system, REPO, "backupvm", PASS, opts, snapshot=snapshot)
    try:
        job.open()
        job.plan()
        job.run()
    finally:
        job.close()


def refused(w: World, action: Callable[[], None] | None = None, match: str = "") -> str:
    """The restore (or ``action``) must fail with a VerificationError of one line; dom0 unchanged."""
    before = Unchanged(w.sim)
    with pytest.raises(BackupError) as info:
        (action or (lambda: restore(w)))()
    err = info.value
    message = str(err)
    assert isinstance(err, VerificationError) and err.exit_code == 3, f"{type(err).__name__}: {message}"
    assert "\n" not in message and message, message
    assert match in message, message
    before.check()
    return message


# ----------------------------------------------------------------------------------------------- the cases

def test_sanity_the_untouched_repository_restores(w: World) -> None:
    restore(w, verify=True)
    restore(w, snapshot=1, verify=True)


def test_rollback_newest_root_withheld(w: World) -> None:
    w.roots()[-1].unlink()
    refused(w, match="older than snapshot 3")


def test_rollback_whole_repository_older_copy(w: World, tmp_path: Path) -> None:
    """The repository as it was after snapshot 2 (the VM kept a copy)."""
    w.roots()[-1].unlink()
    objects = w.repo / "objects"
    shutil.rmtree(objects)
    shutil.copytree(w.pristine / "objects", objects)
    refused(w, match="rolled back")


def test_root_other_than_asked(w: World) -> None:
    first, second = w.roots()[0], w.roots()[1]
    first.write_bytes(second.read_bytes())
    refused(w, lambda: restore(w, snapshot=1), match="asked for snapshot 1")


def test_root_renamed_to_a_newer_number(w: World) -> None:
    newest = w.roots()[-1]
    shutil.copy(newest, newest.with_name("0000000004-20991231T000000Z"))
    refused(w, match="asked for snapshot 4")


def test_same_number_listed_twice(w: World) -> None:
    newest = w.roots()[-1]
    shutil.copy(newest, newest.with_name(newest.name[:11] + "20991231T000000Z"))
    refused(w, match="twice")


def test_fork_same_number_other_snapshot(w: World) -> None:
    """dom0 recorded snapshot 3; the VM offers another snapshot 3 (one dom0 never saw: written by whoever has
    the passphrase, from snapshot 2)."""
    state_file = next(w.state_dir.glob("*.json"))
    saved = state_file.read_bytes()
    w.roots()[-1].unlink()
    state_file.unlink()  # a writer without dom0's record
    try:
        _touch(w.sim, "vault", 5 << 16, b"fork" * 1000)
        backup(w.sim, ("work", "vault"))
    finally:
        state_file.write_bytes(saved)
    refused(w, match="not the one dom0 recorded")


def test_swapped_data_object(w: World) -> None:
    blocks = w.objects("d")
    contents = [p.read_bytes() for p in blocks]
    for p, data in zip(blocks, contents[1:] + contents[:1], strict=True):
        p.write_bytes(data)
    refused(w, match="another object")


def test_swapped_segment(w: World) -> None:
    segs = w.objects("s")
    contents = [p.read_bytes() for p in segs]
    for p, data in zip(segs, contents[1:] + contents[:1], strict=True):  # every one answered by another
        p.write_bytes(data)
    refused(w, lambda: restore(w, verify=True), match="another object")


def test_object_under_another_type(w: World) -> None:
    """A data object's bytes where the file list of a VM should be."""
    data = w.objects("d")[0].read_bytes()
    for tree in w.objects("t"):
        tree.write_bytes(data)
    refused(w, lambda: restore(w, verify=True), match="instead")


def test_dropped_object(w: World) -> None:
    for p in w.objects("d"):
        p.unlink()
    refused(w, match="missing")


def test_flipped_byte(w: World) -> None:
    for p in w.objects("d"):
        raw = bytearray(p.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        p.write_bytes(raw)
    refused(w, match="failed verification")


def test_truncated_object(w: World) -> None:
    for p in w.objects("d"):
        p.write_bytes(p.read_bytes()[:-100])
    refused(w)


def test_object_from_another_repository_same_passphrase(w: World) -> None:
    """Another repository's data object, renamed to an id of this one."""
    theirs = w.objects("d", w.other)[0].read_bytes()
    for mine in w.objects("d"):
        mine.write_bytes(theirs)
    refused(w)


def test_root_from_another_repository_same_passphrase(w: World) -> None:
    theirs = w.roots(w.other)[0]
    shutil.copy(theirs, w.repo / "roots" / "0000000004-20991231T000000Z")
    refused(w, match="failed verification")


def test_header_from_another_repository_same_passphrase(w: World) -> None:
    for name in ("repo-header", "repo-header.hmac"):
        shutil.copy(w.other / name, w.repo / name)
    refused(w, match="held repository")


def test_oversize_root(w: World) -> None:
    newest = w.roots()[-1]
    with open(newest, "r+b") as f:
        f.truncate(repo.max_object_size(repo.ROOT, 64 << 10) + 1)
    refused(w, match="too long")


def test_oversize_segment(w: World) -> None:
    for seg in w.objects("s"):
        with open(seg, "r+b") as f:
            f.truncate(repo.max_object_size(repo.SEGMENT, 64 << 10) + 1)
    refused(w, lambda: restore(w, verify=True), match="too long")


def test_backup_onto_a_rolled_back_repository(w: World) -> None:
    w.roots()[-1].unlink()
    before = sorted(p.name for p in w.roots())
    refused(w, lambda: backup(w.sim, ("vault",)), match="older than snapshot 3")
    assert sorted(p.name for p in w.roots()) == before  # nothing was committed


def test_cli_one_line_exit_3(w: World) -> None:
    w.roots()[-1].unlink()
    before = Unchanged(w.sim)
    r = w.sim.restore("-d", "backupvm", "--repo", REPO, "--rename-conflicting")
    assert r.returncode == 3, r.stderr
    assert "older than snapshot 3" in one_error_line(r.stderr)
    before.check()


@pytest.mark.parametrize(("mode", "words"), [("reply", "injected failure"), ("stop-reading", "stopped reading")],
                         ids=["error-reply", "broken-pipe"])  # fmt: skip
def test_failed_import_mid_restore_rolls_back(w: World, monkeypatch: pytest.MonkeyPatch, mode: str,
                                              words: str) -> None:  # fmt: skip
    """The volume imports run on the restore's writing thread: one that fails (qubesd's error reply, or the
    service stops reading) fails the restore with its one line, and nothing created is left."""
    monkeypatch.setenv("QUBES_SIM_IMPORT_FAIL", mode)  # every import (the VMs are restored under new names)
    before = Unchanged(w.sim)
    with pytest.raises(BackupError) as info:
        restore(w)
    message = str(info.value)
    assert "\n" not in message and message.startswith("import of volume") and words in message, message
    before.check()


def test_interrupted_mid_import_rolls_back(w: World) -> None:
    """SIGTERM while the writing thread is blocked on an import that stopped reading (the receiving thread
    waiting for room in its queue): exit 130, one line, the imports aborted, nothing created is left."""
    before = Unchanged(w.sim)
    env = {**w.sim.env(), "QUBES_SIM_IMPORT_FAIL": "stall", "QUBES_BACKUP_IMPORT_GRACE": "1"}
    argv = [str(BIN / "qvm-backup-restore"), "-y", "-p", "/pw", "-d", "backupvm", "--repo", REPO,
            "--rename-conflicting", "work", "vault"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not any(w.sim.dom0.rglob("*-import*")):  # an import began (its -import volume exists)
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no import began"
            time.sleep(0.02)
        time.sleep(0.5)  # the stalled import's pipe fills, the writing thread blocks on it
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert one_error_line(err).endswith("interrupted"), err
    before.check()
