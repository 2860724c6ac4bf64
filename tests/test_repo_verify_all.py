"""``qvm-backup-restore --repo --verify-only --all-snapshots`` (docs/REPOSITORY.md section 8): every snapshot
still present verified, each distinct object fetched once across all of them (counted in dom0's session);
a damaged block only an older snapshot holds fails that snapshot alone, with its line, exit code 3 and the
snapshot named; and the ``--json`` documents of the repository commands (docs/JSON.md)."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest
from conftest import Sim, new_sim, one_error_line
from qubes_backup_dom0.format import repo
from qubes_backup_dom0.format.sparse import scan
from qubes_backup_dom0.qubes.repoclient import RepoSession
from qubes_backup_dom0.restore.plan import RestoreOptions
from qubes_backup_dom0.restore.repository import RepoRestore
from qubes_backup_dom0.restore.repoverify import AllSnapshots
from test_repo_roundtrip import BS, PASS, REPO, backup, copy_sparse


def first_data_block(path: Path) -> int:
    _size, regions = scan(path)
    return regions[0][0] // BS


def overwrite(sim: Sim, vm: str, index: int, seed: int) -> bytes:
    """Write block ``index`` of the VM's private volume anew; returns what it held."""
    path = sim.volume_files(vm)["private"]
    with open(path, "rb") as f:
        old = os.pread(f.fileno(), BS, index * BS)
    new = path.with_name("new")
    copy_sparse(path, new)
    with open(new, "r+b") as f:
        os.pwrite(f.fileno(), random.Random(seed).randbytes(BS), index * BS)
    os.rename(new, path)
    return old


@pytest.fixture
def three(tmp_path: Path) -> tuple[Sim, bytes]:
    """Three snapshots; returns the sim and the block of work's private volume only snapshot 1 holds."""
    sim = new_sim(tmp_path / "sim")
    backup(sim, ("work", "vault", "dom0"))
    index = first_data_block(sim.volume_files("work")["private"])
    old = overwrite(sim, "work", index, 1)
    backup(sim, ("work", "vault", "dom0"))
    overwrite(sim, "vault", first_data_block(sim.volume_files("vault")["private"]), 2)
    backup(sim, ("vault",))  # work and dom0's home carried
    return sim, old


def test_each_object_fetched_once_across_snapshots(three: tuple[Sim, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    sim, _old = three
    asked: list[str] = []
    original = RepoSession.request_many

    def request_many(self: RepoSession, wanted: list[str]) -> None:
        asked.extend(wanted)
        original(self, wanted)

    monkeypatch.setattr(RepoSession, "request_many", request_many)
    job = RepoRestore(sim.system, REPO, "backupvm", PASS, RestoreOptions(verify_only=True))
    job.open()
    checker = AllSnapshots(job)
    checks = checker.run()
    assert [(c.seq, c.ok) for c in checks] == [(1, True), (2, True), (3, True)]
    assert checks[0].objects > checks[1].objects > 0 and checks[2].objects > 0
    assert len(asked) == len(set(asked)), [n for n, c in Counter(asked).items() if c > 1]
    stored = {p.name for p in (sim.vm_root("backupvm") / REPO.lstrip("/") / "objects").rglob("*") if p.is_file()}
    assert {n for n in asked if not n.startswith("roots/")} == stored  # each object of the repository once
    assert len([n for n in asked if n.startswith("roots/")]) == 3
    assert checker.fetched == len(asked)


def test_damaged_older_snapshot(three: tuple[Sim, bytes]) -> None:
    sim, old = three
    repo_dir = sim.vm_root("backupvm") / REPO.lstrip("/")
    header = repo.parse_header((repo_dir / "repo-header").read_bytes())
    did = repo.object_id(repo.keys_from_passphrase(PASS, header), repo.DATA, old)
    damaged = repo_dir / "objects" / did[:2] / did
    data = bytearray(damaged.read_bytes())
    data[100] ^= 1
    damaged.write_bytes(bytes(data))

    r = sim.restore("-d", "backupvm", "--repo", REPO, "--verify-only", "--all-snapshots")
    assert r.returncode == 3, r.stderr
    assert "snapshot 1:" in one_error_line(r.stderr) and "1 of 3 snapshots failed" in one_error_line(r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Snapshot ")]
    assert len(lines) == 3 and "FAILED" in lines[0] and all(": verified," in ln for ln in lines[1:]), lines
    r = sim.restore("-d", "backupvm", "--repo", REPO, "--verify-only", "--all-snapshots", "--json")
    assert r.returncode == 3
    doc = json.loads(r.stdout)
    assert (doc["command"], doc["ok"], doc["exit_code"], doc["all_snapshots"]) == ("verify", False, 3, True)
    assert [(s["snapshot"], s["ok"]) for s in doc["snapshots"]] == [(1, False), (2, True), (3, True)]
    damaged.unlink()  # missing instead of damaged: the agent cannot send it (and ends its session)
    r = sim.restore("-d", "backupvm", "--repo", REPO, "--verify-only", "--all-snapshots")
    assert r.returncode == 3 and "(snapshot 1)" in one_error_line(r.stderr), r.stderr
    r = sim.restore("-d", "backupvm", "--repo", REPO, "--verify-only", "--all-snapshots", "--snapshot", "2")
    assert r.returncode == 2


def test_json_documents_of_repository_commands(tmp_path: Path) -> None:
    sim = new_sim(tmp_path / "sim")
    r = sim.backup("-q", "-d", "backupvm", "--repo", REPO, "--json", "work", "vault")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    assert (first["command"], first["ok"], first["snapshot"], first["new_repository"]) == ("backup", True, 1, True)
    assert sorted(first["read"]) == ["vault", "work"] and first["carried"] == [] and first["parent"] is None
    r = sim.backup("-d", "backupvm", "--repo", REPO, "--forget", "vault", "work")
    assert r.returncode == 0, r.stderr
    assert "Read work; left out (--forget): vault" in r.stderr
    r = sim.backup("-q", "-d", "backupvm", "--repo", REPO, "--json", "--forget", "nosuch", "work")
    assert r.returncode == 2
    assert json.loads(r.stdout)["error"].startswith("--forget nosuch: snapshot 2 holds no archive")
    r = sim.backup("-q", "-d", "backupvm", "--repo", REPO, "--json", "vault")
    doc = json.loads(r.stdout)
    assert (doc["snapshot"], doc["parent"], doc["read"], doc["carried"], doc["changed"]) == \
        (3, 2, ["vault"], ["work"], ["vault"])  # fmt: skip
    assert doc["cache_used"] and doc["parent_segments_fetched"] == 0
    r = sim.restore("-d", "backupvm", "--repo", REPO, "--verify-only", "--json")
    doc = json.loads(r.stdout)
    assert (doc["command"], doc["ok"], doc["snapshot"]) == ("verify", True, 3)
    assert doc["repository"] == first["repository"] and doc["tool"] == "qubes-backup"
    assert {v["name"] for v in doc["vms"] if v["action"] == "verify"} == {"work", "vault"}
    r = sim.restore("-d", "backupvm", "--repo", REPO, "--verify-only", "--all-snapshots", "--json")
    doc = json.loads(r.stdout)
    assert doc["ok"] and [s["snapshot"] for s in doc["snapshots"]] == [1, 2, 3]
    r = sim.restore("-d", "backupvm", "--repo", REPO, "--list-snapshots", "--json", "--snapshot", "0")
    assert r.returncode == 2 and json.loads(r.stdout)["command"] == "list-snapshots"


def test_profile_with_repository(tmp_path: Path) -> None:
    """--save-profile with --repo keeps the backup VM, the repository, the VMs and the passphrase; --profile
    then runs the next snapshot, and qvm-backup-restore --profile lists, verifies and restores from it."""
    sim = new_sim(tmp_path / "sim")
    r = sim.backup("-q", "-d", "backupvm", "--repo", REPO, "--save-profile", "nightly", "work", "vault")
    assert r.returncode == 0, r.stderr
    conf = sim.dom0 / "etc/qubes/backup/nightly.conf"
    saved = conf.read_text()
    assert f"repository: {REPO}" in saved and "destination_path" not in saved and "destination_vm: backupvm" in saved
    assert conf.stat().st_mode & 0o077 == 0
    r = sim.run("qvm-backup", "-y", "-q", "--profile", "nightly", "--kdf-n", "1024", "--weak-kdf-ok", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["snapshot"] == 2 and sorted(doc["read"]) == ["vault", "work"] and doc["changed"] == []
    r = sim.run("qvm-backup", "-y", "--profile", "nightly", "-d", "backupvm")
    assert r.returncode == 2 and "--dest-vm cannot be used together with --profile" in one_error_line(r.stderr)
    r = sim.run("qvm-backup-restore", "-y", "--profile", "nightly", "--list-snapshots", "--json")
    assert r.returncode == 0, r.stderr
    assert [s["snapshot"] for s in json.loads(r.stdout)["snapshots"]] == [1, 2]
    r = sim.run("qvm-backup-restore", "-y", "--profile", "nightly", "--verify-only", "--all-snapshots")
    assert r.returncode == 0 and r.stdout.startswith("Verified 2 snapshots"), r.stderr
    conf.write_text(saved.replace(f"repository: {REPO}", "destination_path: /home/user"))
    r = sim.run("qvm-backup-restore", "-y", "--profile", "nightly", "--list-snapshots")
    assert r.returncode == 2 and "describes single-file backups" in one_error_line(r.stderr)
