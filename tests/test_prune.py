"""The keyless prune on real repositories: written by the real backup (dom0's RepoBackup and the agent's
service), pruned by the real agent code (``qubes-backup-agent prune`` and ``prune_location``), checked from
dom0 (verify-only restores through the agent, which fetch and verify every object of a snapshot).

- what a prune keeps is exactly the objects dom0 fetched when it verified the kept snapshots, round after
  round, and a dry run changes nothing;
- the lock: a prune during a backup session (and a backup during a prune) is refused with one line;
- a prune killed (SIGKILL) after k deletions, for several k: every snapshot still listed verifies, the next
  prune completes;
- damage in a kept snapshot (a missing or malformed object) stops the prune before it deletes anything;
- the command line: report, --json, exit codes, one-line errors.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BIN, Sim, new_sim, one_error_line, run_repo_backup
from helpers_agent import open_channel
from qubes_backup_agent import prune as prune_mod
from qubes_backup_agent.prune import prune_location
from qubes_backup_agent.repository import Repository
from qubes_backup_agent.storage import StorageError
from qubes_backup_dom0.backup.repository import RepoBackupResult
from qubes_backup_dom0.qubes.repoclient import RepoSession
from qubes_backup_dom0.restore.plan import RestoreOptions
from qubes_backup_dom0.restore.repository import RepoRestore
from qubes_backup_protocol import frames
from qubes_backup_protocol import repo as names
from qubes_backup_protocol.frames import FrameType
from qubes_backup_protocol.retention import Policy

PASS = b"correct horse battery staple"
REPO = "/home/user/repo"
VMS = ("work", "vault")
OPENING = {FrameType.MEMBER: (64, 1 << 20), FrameType.ENTRY: (64, 0), FrameType.END: (0, 0),
           FrameType.ERROR: (0, frames.MAX_ERROR_LEN)}  # fmt: skip


def backup(sim: Sim) -> RepoBackupResult:
    return run_repo_backup(sim.system, VMS, REPO, passphrase=PASS, block_size=64 << 10)  # type: ignore[no-any-return]


def change(sim: Sim, rng: random.Random) -> None:
    """Overwrite a few scattered pieces of work's private volume (old blocks become garbage once pruned)."""
    path = sim.volume_files("work")["private"]
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for _ in range(3):
            f.seek(rng.randrange(0, size - (1 << 17)) & ~4095)
            f.write(rng.randbytes(1 << 17))


def verify(sim: Sim, snapshot: int) -> set[str]:
    """Verify a whole snapshot from dom0 (every object fetched and checked once); the objects it asked for."""
    asked: list[str] = []
    original = RepoSession.request_many

    def request_many(self: RepoSession, wanted: list[str]) -> None:
        asked.extend(wanted)
        original(self, wanted)

    RepoSession.request_many = request_many  # type: ignore[method-assign]
    try:
        job = RepoRestore(sim.system, REPO, "backupvm", PASS, RestoreOptions(verify_only=True), snapshot=snapshot)
        try:
            job.open()
            assert not job.plan().errors
            job.run()
        finally:
            job.close()
        assert job.chosen is not None and job.chosen.root.seq == snapshot
    finally:
        RepoSession.request_many = original  # type: ignore[method-assign]
    return {n for n in asked if names.is_object_name(n)}


def base(sim: Sim) -> Path:
    return sim.vm_root("backupvm") / REPO.lstrip("/")


def present(sim: Sim) -> tuple[list[int], set[str]]:
    roots = sorted(names.root_seq(f"roots/{p.name}") for p in (base(sim) / "roots").iterdir())
    objects = {p.name for p in (base(sim) / "objects").rglob("*") if p.is_file()}
    return roots, objects


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def agent(sim: Sim, *args: str, wrapper: str | None = None, kill_after: int = 0) -> subprocess.CompletedProcess[str]:
    """``qubes-backup-agent ARGS`` in the backup VM (its root: the VM's directory of the simulation)."""
    env = dict(os.environ, QUBES_AGENT_ROOT=str(sim.vm_root("backupvm")), PRUNE_KILL_AFTER=str(kill_after))
    cmd = [str(BIN / "qubes-backup-agent"), *args] if wrapper is None else [sys.executable, "-c", wrapper, *args]
    return subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture
def repo_sim(tmp_path: Path) -> Iterator[Sim]:
    sim = new_sim(tmp_path / "sim")
    yield sim


def snapshots(sim: Sim, n: int, rng: random.Random) -> dict[int, set[str]]:
    """``n`` more snapshots, each verified right after it was written: its objects, per sequence number."""
    out = {}
    for _ in range(n):
        change(sim, rng)
        seq = backup(sim).seq
        out[seq] = verify(sim, seq)
    return out


def test_prune_keeps_exactly_what_the_kept_snapshots_reference(repo_sim: Sim) -> None:
    """Rounds of backups and prunes (keep-last 1 to 3): after each prune the snapshots left are the policy's,
    each verifies, and the objects left are exactly those dom0 fetched verifying them.  A dry run first
    reports the same and changes nothing; a backup after a prune builds on what is left."""
    sim = repo_sim
    rng = random.Random(7)
    refs = snapshots(sim, 3, rng)
    for keep in (2, 1):
        before = tree(base(sim))
        (base(sim) / "tmp" / ".partial-left").write_bytes(b"x")  # as a killed backup leaves it
        dry = agent(sim, "prune", "--repo", REPO, "--keep-last", str(keep), "--dry-run", "--json")
        assert dry.returncode == 0, dry.stderr
        assert tree(base(sim)) == {**before, "tmp/.partial-left": b"x"}
        real = agent(sim, "prune", "--repo", REPO, "--keep-last", str(keep), "--json")
        assert real.returncode == 0, real.stderr
        doc, drydoc = json.loads(real.stdout), json.loads(dry.stdout)
        assert drydoc["dry_run"] and not doc["dry_run"]
        assert {k: v for k, v in doc.items() if k != "dry_run"} == {k: v for k, v in drydoc.items() if k != "dry_run"}
        roots, objects = present(sim)
        assert roots == sorted(refs)[-keep:]
        assert [s["seq"] for s in doc["snapshots"] if s["kept"]] == roots
        assert objects == set().union(*(refs[s] for s in roots))
        had = {p for p in before if p.startswith("objects/")}
        assert doc["objects_kept"] == len(objects) and doc["objects_deleted"] == len(had) - len(objects)
        assert os.listdir(base(sim) / "tmp") == []
        for s in roots:
            assert verify(sim, s) == refs[s]
        refs = {s: refs[s] for s in roots}
        if keep == 2:
            refs |= snapshots(sim, 2, rng)
    r = sim.restore("-d", "backupvm", "--repo", REPO, "--list-snapshots", "--json")
    assert r.returncode == 0, r.stderr
    listed = {s["snapshot"]: s["present"] for s in json.loads(r.stdout)["snapshots"]}
    assert sorted(s for s, here in listed.items() if here) == sorted(refs) and len(listed) == max(refs)


def _session(sim: Sim, service: str) -> object:
    ch = open_channel(sim.system, service)
    ch.send(FrameType.LOCATION, names.REQUEST, REPO.encode())
    while (f := ch.recv(OPENING)) is not None and f.type not in (FrameType.END, FrameType.ERROR):
        pass
    assert f is not None and f.type == FrameType.END, f
    return ch


def test_lock_against_a_concurrent_backup(repo_sim: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prune while a backup session is open is refused (one line, exit 1), as is a backup while a prune
    runs; a dry run may run beside a restore (both read), a prune may not."""
    sim = repo_sim
    snapshots(sim, 2, random.Random(1))
    root = sim.vm_root("backupvm")
    with _session(sim, "qubes.Backup") as ch:  # type: ignore[attr-defined]
        with pytest.raises(StorageError, match=r"^repository /home/user/repo is in use by another backup or prune"):
            prune_location(REPO, root, Policy(keep_last=1), dry_run=False)
        r = agent(sim, "prune", "--repo", REPO, "--keep-last", "1")
        assert r.returncode == 1 and "in use by another backup or prune" in one_error_line(r.stderr), r.stderr
        assert r.stderr.count("\n") == 1 and r.stdout == ""
        ch.close_input()
        assert ch.wait(30) != 0  # no COMMIT: nothing committed
    assert present(sim)[0] == [1, 2]

    refused: list[bytes] = []
    original = Repository.delete_object

    def delete_object(self: Repository, oid: str) -> None:
        if not refused:  # a backup starts while the prune deletes objects
            with open_channel(sim.system, "qubes.Backup") as ch:
                ch.send(FrameType.LOCATION, names.REQUEST, REPO.encode())
                f = ch.recv(OPENING)
                assert f is not None and f.type == FrameType.ERROR
                refused.append(bytes(f.data))
                ch.close_input()
                assert ch.wait(30) != 0
        original(self, oid)

    monkeypatch.setattr(Repository, "delete_object", delete_object)
    report = prune_location(REPO, root, Policy(keep_last=1), dry_run=False)
    assert refused and b"in use by another backup or prune" in refused[0], refused
    assert report.objects_deleted > 0 and present(sim)[0] == [2]
    monkeypatch.undo()

    with _session(sim, "qubes.Restore") as ch:  # type: ignore[attr-defined]
        assert prune_location(REPO, root, Policy(keep_last=1), dry_run=True).objects_deleted == 0
        with pytest.raises(StorageError, match="in use"):
            prune_location(REPO, root, Policy(keep_last=1), dry_run=False)
        ch.close_input()
    assert backup(sim).seq == 3  # the lock was released every time
    verify(sim, 3)


KILLER = """
import os, signal, sys
from qubes_backup_agent import cli, repository
after, done = int(os.environ["PRUNE_KILL_AFTER"]), [0]
def wrap(method):
    def killed(self, *args):
        if done[0] == after:
            os.kill(os.getpid(), signal.SIGKILL)
        done[0] += 1
        return method(self, *args)
    return killed
for name in ("delete_root", "delete_object", "clean_tmp"):
    setattr(repository.Repository, name, wrap(getattr(repository.Repository, name)))
sys.exit(cli.main(sys.argv[1:]))
"""


BUGGY = """
import sys
from qubes_backup_agent import cli
def bug(*args, **kwargs):
    raise ZeroDivisionError("a bug of the prune")
cli.prune_location = bug
sys.exit(cli.main(sys.argv[1:]))
"""


def test_internal_error_is_one_line_and_debug_shows_the_traceback(repo_sim: Sim) -> None:
    """A bug of the prune is exit 1 and one line that says how to see more; with --debug, the traceback too
    (docs/EXIT-CODES.md)."""
    args = ("prune", "--repo", REPO, "--keep-last", "1")
    r = agent(repo_sim, *args, wrapper=BUGGY)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert one_error_line(r.stderr).endswith("internal error: ZeroDivisionError: a bug of the prune (run with "
                                             "--debug for details)"), r.stderr  # fmt: skip
    r = agent(repo_sim, *args, "--debug", wrapper=BUGGY)
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr, r.stderr
    last = r.stderr.splitlines()[-1]
    assert last == "qubes-backup-agent: error: internal error: ZeroDivisionError: a bug of the prune", r.stderr


def test_killed_prune_leaves_every_listed_snapshot_whole(repo_sim: Sim) -> None:
    """SIGKILLed before its first deletion, after the first root, between the roots and the objects, in the
    middle of the objects, before clearing tmp/: every snapshot still listed verifies from dom0 (as a
    restore would read it), and the next prune completes with the policy's snapshots and objects."""
    sim = repo_sim
    refs = snapshots(sim, 3, random.Random(3))
    saved = base(sim).with_name("saved")
    shutil.copytree(base(sim), saved)
    total = len(present(sim)[1])
    dry = prune_location(REPO, sim.vm_root("backupvm"), Policy(keep_last=1), dry_run=True)
    dropped = sum(not f.kept for f in dry.snapshots)
    steps = dropped + dry.objects_deleted + 1  # roots, objects, tmp/
    assert dropped == 2 and dry.objects_deleted > 2
    for k in sorted({0, 1, dropped, dropped + dry.objects_deleted // 2, steps - 1}):
        shutil.rmtree(base(sim))
        shutil.copytree(saved, base(sim))
        (base(sim) / "tmp" / ".partial-left").write_bytes(b"x")
        r = agent(sim, "prune", "--repo", REPO, "--keep-last", "1", wrapper=KILLER, kill_after=k)
        assert r.returncode == -signal.SIGKILL, (k, r.returncode, r.stderr)
        roots, objects = present(sim)
        assert len(roots) == 3 - min(k, dropped), (k, roots)
        assert len(objects) == total - max(0, min(k - dropped, dry.objects_deleted)), (k, len(objects))
        for s in roots:
            assert verify(sim, s) == refs[s], (k, s)
        again = agent(sim, "prune", "--repo", REPO, "--keep-last", "1")
        assert again.returncode == 0, (k, again.stderr)
        assert present(sim) == ([3], refs[3]) and os.listdir(base(sim) / "tmp") == []
        verify(sim, 3)


def test_damage_stops_the_prune(repo_sim: Sim) -> None:
    """A kept snapshot that lost a data block, or whose map segment's clear header is malformed: exit 3,
    the finding named, nothing deleted (the malformed object kept, its references not guessed)."""
    sim = repo_sim
    refs = snapshots(sim, 2, random.Random(5))
    objects = base(sim) / "objects"
    by_type: dict[str, list[Path]] = {}
    for oid in sorted(refs[2]):
        path = objects / oid[:2] / oid
        by_type.setdefault(path.read_bytes()[5:6].decode(), []).append(path)
    missing = by_type["d"][0]
    kept_bytes = missing.read_bytes()
    missing.unlink()
    before = tree(base(sim))
    r = agent(sim, "prune", "--repo", REPO, "--keep-last", "1")
    assert r.returncode == 3, r.stderr
    assert f"data block {missing.name[:16]} is missing" in r.stdout and "Nothing deleted" in r.stdout
    assert "is damaged" in one_error_line(r.stderr) and r.stderr.count("\n") == 1
    assert tree(base(sim)) == before
    missing.write_bytes(kept_bytes)

    segment = by_type["s"][0]
    raw = bytearray(segment.read_bytes())
    raw[5:6] = b"d"  # a data block's type where the file list names a segment
    segment.write_bytes(bytes(raw))
    before = tree(base(sim))
    r = agent(sim, "prune", "--repo", REPO, "--keep-last", "1", "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == 3 and doc["exit_code"] == 3 and doc["objects_deleted"] == 0
    assert any(segment.name[:16] in line and "malformed" in line for line in doc["damaged"]), doc["damaged"]
    assert tree(base(sim)) == before


def test_command_line_errors(repo_sim: Sim) -> None:
    sim = repo_sim
    cases = [
        (["prune", "--repo", REPO], 2, "keeps nothing"),
        (["prune", "--repo", REPO, "--keep-last", "-1"], 2, "not a count"),
        (["prune", "--keep-last", "1"], 2, "--repo"),
        (["frobnicate"], 2, "invalid choice"),
        (["prune", "--repo", REPO, "--keep-last", "1"], 1, "does not exist"),
        (["prune", "--repo", "/home", "--keep-last", "1"], 1, "is not empty and holds no repository"),
        (["prune", "--repo", "/../../etc", "--keep-last", "1"], 1, "escapes the VM root"),
    ]
    for args, code, why in cases:
        r = agent(sim, *args)
        assert r.returncode == code and why in one_error_line(r.stderr), (args, r.returncode, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stdout == "", (args, r.stderr)
    r = agent(sim, "prune", "--repo", REPO, "--keep-daily", "2", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["exit_code"] == 1
    snapshots(sim, 2, random.Random(2))
    r = agent(sim, "prune", "--repo", REPO, "--keep-last", "1", "--keep-daily", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"Pruned: repository {REPO}, policy last=1 daily=3"
    assert lines[1].split()[:2] == ["snapshot", "2"] and lines[1].endswith("kept (newest, last, daily)")
    assert lines[2].split()[:2] == ["snapshot", "1"] and lines[2].endswith("deleted"), lines
    assert lines[3].startswith("Snapshots: 1 kept, 1 deleted. Objects: ")
    assert prune_mod.PruneReport.__dataclass_fields__.keys() >= {"snapshots", "objects_deleted", "bytes_freed",
                                                                 "objects_kept", "bytes_kept", "dry_run"}  # fmt: skip
