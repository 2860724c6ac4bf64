"""``qvm-backup-prune`` as a user runs it (docs/REPOSITORY.md section 11, docs/PROTOCOL.md section 5c): a keyless
prune through the backup VM's agent, ``--dry-run``, ``--json``, a hostile agent's answers bounded and refused,
and ``--audit`` (passphrase) against the repository's authenticated history.

The repository: six snapshots of ``work`` (each run changes a few blocks) made in-process with dom0's clock set
to these times (so the daily rule has days to tell apart), the agent a separate process as always:

    1 2026-11-01T10:00  2 2026-11-02T10:00  3 2026-11-02T20:00  4 2026-11-09T10:00  5 2026-11-10T10:00
    6 2026-11-10T11:00

``--keep-last 1 --keep-daily 2`` keeps 6 (newest, last, daily) and 4 (daily: the newest of 2026-11-09) and
deletes 1, 2, 3, 5.  Each test starts from a copy of that repository and of dom0's record.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from conftest import BIN, PASSPHRASE, Sim, assert_restored_like, new_sim, one_error_line, run_repo_restore
from qubes_backup_dom0.backup.plan import plan_backup
from qubes_backup_dom0.backup.repository import RepoBackup, RepoOptions
from qubes_backup_dom0.qubes import repostate
from qubes_backup_dom0.restore.plan import RestoreOptions
from qubes_backup_protocol import repo as names
from test_repo_roundtrip import copy_sparse

REPO = "/home/user/prune-repo"
TIMES = ["2026-11-01T10:00:00Z", "2026-11-02T10:00:00Z", "2026-11-02T20:00:00Z", "2026-11-09T10:00:00Z",
         "2026-11-10T10:00:00Z", "2026-11-10T11:00:00Z"]  # fmt: skip
POLICY = ["--keep-last", "1", "--keep-daily", "2"]
KEPT, DELETED = [4, 6], [1, 2, 3, 5]
REASONS = {6: ["newest", "last", "daily"], 4: ["daily"]}
FAKE = Path(__file__).resolve().parent / "fakes" / "prune_agent.py"
RPC = Path(__file__).resolve().parent.parent / "rpc-policy"


class World:
    def __init__(self, sim: Sim, base: Path) -> None:
        self.sim = sim
        self.repo = sim.vm_root("backupvm") / REPO.lstrip("/")
        self.state = sim.dom0 / repostate.STATE_DIR.lstrip("/")
        self.pristine = base / "pristine"
        self.truth4 = base / "work-private-4"  # work's private volume as snapshot 4 saw it

    def reset(self) -> None:
        for live, saved in ((self.repo, self.pristine / "repo"), (self.state, self.pristine / "state")):
            shutil.rmtree(live)
            shutil.copytree(saved, live)

    def roots(self) -> list[int]:
        return sorted(names.root_seq(f"roots/{p.name}") for p in (self.repo / "roots").iterdir())

    def objects(self) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in (self.repo / "objects").rglob("*") if p.is_file()}

    def object(self, oid: str) -> Path:
        return self.repo / "objects" / oid[:2] / oid

    def references(self, seq: int) -> set[str]:
        """Every object snapshot ``seq`` references, by the clear references (docs/REPOSITORY.md section 5)."""
        (root,) = [p for p in (self.repo / "roots").iterdir() if names.root_seq(f"roots/{p.name}") == seq]
        seen: set[str] = set()
        todo = [root]
        while todo:
            raw = todo.pop().read_bytes()
            for i in range(int(raw[74:82])):
                ref = raw[83 + 65 * i : 83 + 65 * i + 64].decode()
                if ref not in seen:
                    seen.add(ref)
                    todo.append(self.object(ref))
        return seen

    def prune(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        argv = [str(BIN / "qvm-backup-prune"), "-d", "backupvm", "--repo", REPO, *args]
        return subprocess.run(argv, env={**self.sim.env(), **(env or {})}, text=True, capture_output=True,
                              timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip

    def audit(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.prune("--audit", "-p", "/pw", *POLICY, *args)


def _touch(sim: Sim, offset: int, data: bytes) -> None:
    """A new private volume for work with ``data`` at ``offset`` (renamed over the old: a hard link to the old
    one keeps the state a snapshot saw)."""
    path = sim.volume_files("work")["private"]
    new = path.with_name("new")
    copy_sparse(path, new)
    with open(new, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.rename(new, path)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("prune")
    sim = new_sim(base / "sim")
    world = World(sim, base)
    for i, created in enumerate(TIMES, start=1):
        _touch(sim, (40 + i) << 16, os.urandom(70000))
        if i == 4:
            os.link(sim.volume_files("work")["private"], world.truth4)
        plan = plan_backup(sim.system, ["work"])
        job = RepoBackup(sim.system, plan, "backupvm", REPO, RepoOptions(kdf_n=1024, block_size=64 << 10))
        try:
            with mock.patch("qubes_backup_dom0.backup.repository.now_utc", return_value=created):
                job.connect()
                assert job.run(PASSPHRASE.encode()).seq == i
        finally:
            job.close()
            plan.close()
    shutil.copytree(world.repo, world.pristine / "repo")
    shutil.copytree(world.state, world.pristine / "state")
    return world


@pytest.fixture
def world(built: World) -> Iterator[World]:
    built.reset()
    yield built


# ------------------------------------------------------------------------------------------------ prune

def test_dry_run_then_prune(world: World) -> None:
    """A dry run deletes nothing and reports exactly the fates and totals the prune then has; the prune deletes
    the snapshots the policy drops and the objects only they used (the bytes it says it freed)."""
    before_objects, before_roots = world.objects(), world.roots()
    r = world.prune(*POLICY, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    dry = json.loads(r.stdout)
    assert (world.objects(), world.roots()) == (before_objects, before_roots)
    assert dry["command"] == "prune" and dry["dry_run"] is True and dry["ok"] is True
    assert dry["policy"] == {"keep_last": 1, "keep_daily": 2, "keep_weekly": 0, "keep_monthly": 0}
    fates = {s["snapshot"]: (s["kept"], s["reasons"]) for s in dry["snapshots"]}
    assert fates == {n: (n in KEPT, REASONS.get(n, [])) for n in range(1, 7)}
    assert [s["created"] for s in dry["snapshots"]] == TIMES
    assert dry["snapshots_deleted"] == 4 and dry["objects_deleted"] > 0

    r = world.prune(*POLICY, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "would delete" in r.stdout and "Dry run on backupvm:" in r.stdout and "nothing was deleted" in r.stdout
    rows = {line.split("|")[0].strip(): line.split("|")[2].strip() for line in r.stdout.splitlines()[2:-1]}
    assert rows == {"1": "would delete", "2": "would delete", "3": "would delete", "4": "would keep: daily",
                    "5": "would delete", "6": "would keep: newest, last, daily"}  # fmt: skip
    assert (world.objects(), world.roots()) == (before_objects, before_roots)

    r = world.prune(*POLICY, "--json")
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)
    assert world.roots() == KEPT
    after = world.objects()
    assert set(after) < set(before_objects)
    gone = set(before_objects) - set(after)
    assert done["dry_run"] is False
    assert done["objects_deleted"] == len(gone) == dry["objects_deleted"]
    assert done["bytes_freed"] == sum(before_objects[o] for o in gone) == dry["bytes_freed"]
    assert done["objects_kept"] == len(after) and done["bytes_kept"] == sum(after.values())
    assert [(s["snapshot"], s["kept"]) for s in done["snapshots"]] == [
        (s["snapshot"], s["kept"]) for s in dry["snapshots"]]  # fmt: skip

    # pruning again deletes nothing: the policy keeps what it kept
    r = world.prune(*POLICY)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("0 snapshots deleted from backupvm:/home/user/prune-repo, "
                                                        "0 objects, 0.0 MiB freed; 2 kept")  # fmt: skip
    assert world.roots() == KEPT and world.objects() == after


def test_retained_snapshots_still_restore(world: World, tmp_path: Path) -> None:
    """After the prune every retained snapshot verifies, and snapshot 4 restores byte-exact."""
    r = world.prune(*POLICY, "-q")
    assert r.returncode == 0 and r.stdout.startswith("4 snapshots deleted"), r.stderr
    for n in KEPT:
        r = world.sim.restore("-d", "backupvm", "--repo", REPO, "--verify-only", "--snapshot", str(n))
        assert r.returncode == 0 and r.stdout.startswith(f"Verified snapshot {n} of repository"), r.stderr
    r = world.sim.restore("-d", "backupvm", "--repo", REPO, "--verify-only", "--snapshot", "3")
    assert r.returncode == 1 and "snapshot 3 is not in the repository any more" in one_error_line(r.stderr)
    opts = RestoreOptions(vms=("work",), rename_conflicting=True)
    job = run_repo_restore(world.sim.system, REPO, "backupvm", PASSPHRASE.encode(), opts, snapshot=4)
    (restored,) = job.restored
    assert restored != "work"
    assert_restored_like(world.truth4, world.sim.volume_files(restored)["private"])


def test_usage(world: World) -> None:
    r = world.prune()
    assert r.returncode == 2 and "the policy keeps nothing" in one_error_line(r.stderr), r.stderr
    r = world.prune("--keep-last", "x")
    assert r.returncode == 2 and "--keep-last" in r.stderr
    r = subprocess.run([str(BIN / "qvm-backup-prune"), "--repo", REPO, *POLICY], env=world.sim.env(), text=True,
                       capture_output=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "-d VM" in one_error_line(r.stderr)
    r = world.prune(*POLICY, "-p", "/pw")
    assert r.returncode == 2 and "--audit only" in one_error_line(r.stderr)
    r = subprocess.run([str(BIN / "qvm-backup-prune"), "-d", "nosuchvm", "--repo", REPO, *POLICY, "--json"],
                       env=world.sim.env(), text=True, capture_output=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and json.loads(r.stdout)["exit_code"] == 2
    r = subprocess.run([str(BIN / "qvm-backup-prune"), "-d", "backupvm", "--repo", "/home/user/nothing", *POLICY],
                       env=world.sim.env(), text=True, capture_output=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "location does not exist" in one_error_line(r.stderr), r.stderr


def test_prune_refused_while_the_repository_is_locked(world: World) -> None:
    """A backup (or another prune) holds the lock: the prune is refused with the agent's one line, exit 1."""
    import fcntl

    fd = os.open(world.repo / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        r = world.prune(*POLICY)
    finally:
        os.close(fd)
    assert r.returncode == 1 and "in use by another backup or prune" in one_error_line(r.stderr), r.stderr
    assert world.roots() == list(range(1, 7))


# ------------------------------------------------------------------------------------- a hostile agent

def _hostile(world: World, tmp_path: Path, mode: str, *args: str) -> subprocess.CompletedProcess[str]:
    rpc = tmp_path / "rpc"
    rpc.mkdir(exist_ok=True)
    shutil.copy(FAKE, rpc / "qubes.Backup")
    shutil.copy(RPC / "qubes.Restore", rpc / "qubes.Restore")
    env = {"QUBES_BACKUP_RPC_DIR": str(rpc), "QUBES_SIM_SANDBOX": "0", "QUBES_AGENT_FAKE_PRUNE": mode}
    return world.prune(*POLICY, *args, env=env)


@pytest.mark.parametrize(("mode", "args", "code", "says"), [
    ("badname", (), 3, "malformed prune answer"),
    ("bigerror", (), 3, "frame data too long"),
    ("bigfate", (), 3, "frame data too long"),
    ("badbits", (), 3, "snapshot fate outside the grammar"),
    ("lie-fates", ("--dry-run",), 3, "reports snapshot 1 kept (last), but the policy last=1 daily=2 deletes it"),
    ("lie-deleted", (), 3, "reported snapshot 4 kept, but no longer lists snapshot 4"),
    ("dry-deletes", ("--dry-run",), 3, "reported that nothing was deleted, but no longer lists snapshot 1"),
    ("after", (), 3, "malformed prune answer (after its report)"),
    ("escape", (), 1, "reports: all fine?[2J?]0;owned??gone"),
    ("manydamage", (), 3, "reports more than 50 findings"),
    ("damagecount", (), 3, "1 findings listed, 0 counted"),
])  # fmt: skip
def test_hostile_answers_are_bounded_and_refused(world: World, tmp_path: Path, mode: str, args: tuple[str, ...],
                                                 code: int, says: str) -> None:  # fmt: skip
    r = _hostile(world, tmp_path, mode, *args)
    line = one_error_line(r.stderr)
    assert r.returncode == code and says in line, r.stderr
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr and len(line) < 800
    if mode in ("lie-deleted", "escape", "bigerror"):  # the same, as the --json failure document
        world.reset()
        r = _hostile(world, tmp_path, mode, *args, "--json")
        doc = json.loads(r.stdout)
        assert r.returncode == code and doc["ok"] is False and doc["exit_code"] == code and says in doc["error"]
        assert "\x1b" not in r.stdout


BUSY_RESTORE = """#!/usr/bin/env python3
import sys
from qubes_backup_protocol import frames
sys.stdout.buffer.write(frames.encode(frames.FrameType.ERROR, "", b"repository /home/user/prune-repo is in use by "
                                      b"another backup or prune; try again later"))
"""


def test_listing_refused_after_the_prune_is_a_warning(world: World, tmp_path: Path) -> None:
    """A backup that takes the lock the moment the prune released it: the listing that checks the report is
    refused; the prune is done (exit 0) and a warning says its report is unchecked."""
    rpc = tmp_path / "rpc"
    rpc.mkdir()
    shutil.copy(RPC / "qubes.Backup", rpc / "qubes.Backup")
    (rpc / "qubes.Restore").write_text(BUSY_RESTORE)
    r = world.prune(*POLICY, "--json", env={"QUBES_BACKUP_RPC_DIR": str(rpc), "QUBES_SIM_SANDBOX": "0"})
    assert r.returncode == 0, r.stderr
    assert "warning: could not list the repository after the prune, so its report is unchecked" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["snapshots_deleted"] == 4 and len(doc["warnings"]) == 1 and world.roots() == KEPT


def test_too_many_snapshots_reported(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More FATE frames than a repository may hold are refused at the first one too many.  The bound is
    MAX_ROOTS (100,000: 35 s of frames); here dom0's bound is lowered to 1,000 and the agent sends 1,001, in
    process (the same line of read_answer checks it)."""
    from qubes_backup_dom0.errors import VerificationError
    from qubes_backup_dom0.qubes import prune as prune_mod
    from qubes_backup_dom0.qubes.transport import make_transport
    from qubes_backup_protocol.retention import Policy

    rpc = tmp_path / "rpc"
    rpc.mkdir()
    shutil.copy(FAKE, rpc / "qubes.Backup")
    for key, value in {"QUBES_BACKUP_RPC_DIR": str(rpc), "QUBES_SIM_SANDBOX": "0", "QUBES_AGENT_FAKE_PRUNE": "many",
                       "QUBES_AGENT_FAKE_COUNT": "1000"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(prune_mod, "MAX_FATES", 1000)
    with pytest.raises(VerificationError, match="reports more than 1000 snapshots"):
        prune_mod.prune(make_transport(world.sim.system), "backupvm", REPO, Policy(keep_last=1), False)


# ------------------------------------------------------------------------------------------------ audit

def test_audit(world: World) -> None:
    """Before the prune: every snapshot verifies and the ones the policy drops are "not pruned yet" (exit 0);
    after it: clean; a snapshot the policy keeps deleted behind dom0's back: exit 3, one line naming it."""
    before = world.objects()
    r = world.audit()
    assert r.returncode == 0, r.stderr
    assert "warning: snapshots 1, 2, 3, 5 not pruned yet" in r.stderr
    assert "the 2 snapshots the policy keeps are present; 4 not pruned yet; 6 verified" in r.stdout
    assert world.objects() == before and world.roots() == list(range(1, 7))  # --audit never prunes

    assert world.prune(*POLICY).returncode == 0
    r = world.audit("--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["command"] == "audit" and doc["ok"] is True and doc["not_pruned"] == [] and doc["warnings"] == []
    assert [(s["snapshot"], s["present"], s["policy_keeps"], s["verified"]) for s in doc["snapshots"]] == [
        (n, n in KEPT, n in KEPT, n in KEPT) for n in range(1, 7)]  # fmt: skip
    assert doc["objects"] == len(world.objects()) + len(KEPT)  # every object present is live, each fetched once

    (world.repo / "roots" / f"{names.root_name(4, TIMES[3]).split('/')[1]}").unlink()
    r = world.audit()
    line = one_error_line(r.stderr)
    assert r.returncode == 3 and "snapshot 4 of repository" in line and "missing" in line, r.stderr


def test_damaged_retained_snapshot(world: World) -> None:
    """A data block of the newest snapshot dropped from the store: the audit fails (exit 3), and a prune reports
    the damage, deletes nothing and fails (exit 3)."""
    blocks = sorted(oid for oid in world.references(6) if world.object(oid).read_bytes()[5:6] == b"d")
    world.object(blocks[0]).unlink()
    r = world.audit()
    assert r.returncode == 3 and "snapshot " in one_error_line(r.stderr), r.stderr
    before = (world.objects(), world.roots())
    r = world.prune(*POLICY)
    line = one_error_line(r.stderr)
    assert r.returncode == 3 and "is damaged" in line and "nothing was deleted" in line, r.stderr
    assert f"{blocks[0][:16]} is missing" in r.stderr
    assert (world.objects(), world.roots()) == before


def test_audit_wrong_passphrase(world: World) -> None:
    (world.sim.dom0 / "wrong").write_text("not the passphrase\n")
    r = world.prune("--audit", "-p", "/wrong", *POLICY)
    assert r.returncode == 3 and "wrong passphrase" in one_error_line(r.stderr), r.stderr
    r = world.prune("--audit", "-p", "/wrong", *POLICY, "--json")
    assert r.returncode == 3 and json.loads(r.stdout)["command"] == "audit"


def test_profile(world: World) -> None:
    """--profile NAME: the backup VM and repository from a repository's profile; its keep: mapping is the
    policy (the command line's --keep-... replace it); --audit takes its passphrase; a single-file profile, a
    profile with -d or --repo as well, or a bad keep: mapping is a usage error."""
    pdir = world.sim.dom0 / "etc/qubes/backup"
    pdir.mkdir(parents=True, exist_ok=True)
    base = (f"include: null\ndestination_vm: backupvm\nrepository: {REPO}\npassphrase_text: {PASSPHRASE}\n"
            "compression: true\n")  # fmt: skip
    (pdir / "nightly.conf").write_text(base + "keep:\n  last: 1\n  daily: 2\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "qvm-backup-prune"), *args], env=world.sim.env(), text=True,
                              capture_output=True, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip

    r = run("--profile", "nightly", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["policy"] == {"keep_last": 1, "keep_daily": 2, "keep_weekly": 0, "keep_monthly": 0}
    assert [s["snapshot"] for s in doc["snapshots"] if s["kept"]] == KEPT
    r = run("--profile", "nightly", "--dry-run", "--json", "--keep-last", "3")  # the command line wins
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["policy"] == {"keep_last": 3, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0}
    r = run("--profile", "nightly", "--audit", "--json")  # the passphrase from the profile
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["not_pruned"] == DELETED
    assert world.roots() == list(range(1, 7))  # nothing was pruned
    r = run("--profile", "nightly")
    assert r.returncode == 0, r.stderr
    assert world.roots() == KEPT

    (pdir / "plain.conf").write_text(base + "keep: {last: 1}\n")
    (pdir / "file.conf").write_text(base.replace("repository:", "destination_path:"))
    (pdir / "badkeep.conf").write_text(base + "keep: {hourly: 3}\n")
    for args, text in ((("--profile", "file"), "describes single-file backups"),
                       (("--profile", "plain", "-d", "backupvm"), "--dest-vm cannot be used together with --profile"),
                       (("--profile", "badkeep"), "keep must map some of last, daily, weekly, monthly")):  # fmt: skip
        r = run(*args)
        assert r.returncode == 2 and text in one_error_line(r.stderr), (args, r.stderr)
