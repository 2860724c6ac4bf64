"""Repositories on an ssh server and in S3 (``--repo ssh://…``, ``--repo s3://…``; vm-agent repostore/).

The servers are test_ssh.py's (a real OpenSSH sshd on 127.0.0.1, started by the test) and test_s3.py's (moto's
S3 server on 127.0.0.1), with their rules: without sshd, ssh-keygen, boto3 or moto these tests FAIL, they do
not skip.  The agent runs unsandboxed (``QUBES_SIM_SANDBOX=0``: a sandboxed agent has no network, see
test_ssh.py's docstring); path confinement still applies inside it.

Each test runs for both stores: snapshots through the CLIs and byte-exact restores of the newest and an older
one; the lock (a concurrent session, a stale lock); a backup that never reached COMMIT leaves no root; the
server's hostile answers (an oversize header, an object larger than its type allows, too many roots) are
refused with one line, before they are read whole.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import KDF, Sim, assert_restored_like, make_fresh, new_sim, one_error_line
from helpers_agent import make_sim, open_channel
from qubes_backup_agent.repostore import base as store_base
from qubes_backup_agent.repostore import open_remote
from qubes_backup_agent.storage import StorageError
from qubes_backup_protocol import repo as names
from qubes_backup_protocol.frames import FrameType
from test_repo_agent import HEADER, _objects, opening, run_backup
from test_repo_roundtrip import copy_sparse
from test_s3 import S3Server, s3server, s3sim  # noqa: F401 - s3server is a fixture
from test_ssh import SshServer, install_client, sshd, sshsim  # noqa: F401 - sshd is a fixture

LINE = re.compile(r"Snapshot (\d+) of repository ([0-9a-f]{32}): (\d+) VMs? changed, ([0-9.]+) MiB stored, "
                  r"[0-9.]+ s; root ([0-9a-f]{64})")  # fmt: skip
KEEP = ("dom0", "backupvm", "fedora-41", "sys-net", "sys-firewall")


@dataclass
class Remote:
    """A repository location on one of the two servers, and the server's side of it (as its admin sees it)."""

    kind: str
    url: str
    wrap: Callable[[Sim], Sim]  # the CLIs of this system reach the server
    put: Callable[[str, bytes], None]  # a file of the repository, written on the server
    get: Callable[[str], bytes | None]
    files: Callable[[], list[str]]  # every file of the repository, relative names
    remove: Callable[[str], None]
    downloaded: Callable[[], int]  # bytes the server sent so far (all clients)
    env: dict[str, str]  # what an agent started by the test needs (beside the VM's ssh files)
    base: Path | None = None  # (ssh) the repository directory on the server
    connections: Callable[[], int] | None = None  # (ssh) connections made to the server so far


def _ssh_remote(tmp_path: Path, server: SshServer) -> Remote:
    base = server.remote_dir(tmp_path) / "repo"

    def put(name: str, data: bytes) -> None:
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_bytes(data)

    def get(name: str) -> bytes | None:
        return (base / name).read_bytes() if (base / name).is_file() else None

    def keys() -> list[str]:
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()) if base.exists() else []

    return Remote("ssh", server.url(base), lambda sim: sshsim(sim, server), put, get, keys,
                  lambda name: (base / name).unlink(), lambda: server.proxy.received()[0], {}, base,
                  lambda: server.proxy.received()[1])


def _s3_remote(server: S3Server) -> Remote:
    bucket = f"qb-{os.urandom(6).hex()}"
    server.client.create_bucket(Bucket=bucket)

    def put(name: str, data: bytes) -> None:
        server.client.put_object(Bucket=bucket, Key=f"repo/{name}", Body=data)

    def get(name: str) -> bytes | None:
        try:
            return bytes(server.client.get_object(Bucket=bucket, Key=f"repo/{name}")["Body"].read())
        except server.client.exceptions.NoSuchKey:
            return None

    def keys() -> list[str]:
        return sorted(k.removeprefix("repo/") for k in server.keys(bucket))

    def remove(name: str) -> None:
        server.client.delete_object(Bucket=bucket, Key=f"repo/{name}")

    def downloaded() -> int:
        return sum(size for method, *_rest, size in server.counter.requests() if method == "GET")

    return Remote("s3", f"s3://{bucket}/repo", lambda sim: s3sim(sim, server), put, get, keys, remove, downloaded,
                  server.env)


@pytest.fixture(params=["ssh", "s3"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Remote:
    if request.param == "ssh":
        return _ssh_remote(tmp_path, request.getfixturevalue("sshd"))
    return _s3_remote(request.getfixturevalue("s3server"))


@pytest.fixture
def agent_env(remote: Remote, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For agents started by the test itself (not through a CLI): unsandboxed, the server's credentials."""
    monkeypatch.setenv("QUBES_SIM_SANDBOX", "0")
    for k, v in remote.env.items():
        monkeypatch.setenv(k, v)
    yield


def backup(sim: Sim, url: str, *vms: str) -> re.Match[str]:
    r = sim.run("qvm-backup", "-y", "-q", "-p", "/pw", *KDF, "-d", "backupvm", "--repo", url, *vms)
    assert r.returncode == 0, r.stderr
    m = LINE.fullmatch(r.stdout.strip())
    assert m is not None, r.stdout
    return m


def change(sim: Sim, vm: str, offset: int, data: bytes) -> None:
    path = sim.volume_files(vm)["private"]
    new = path.with_name("new")
    copy_sparse(path, new)
    with open(new, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.rename(new, path)


def roots(remote: Remote) -> list[str]:
    return [k for k in remote.files() if k.startswith("roots/")]


def test_snapshots_restore_byte_exact(tmp_path: Path, remote: Remote) -> None:
    """Three snapshots over the server; the newest and the first restore byte-exact (data and holes) on a fresh
    system; the server holds exactly the directory layout (no partial file, no lock left)."""
    sim = remote.wrap(new_sim(tmp_path / "sim"))
    first = backup(sim, remote.url, "work", "vault")
    saved = tmp_path / "work-1.img"
    copy_sparse(sim.volume_files("work")["private"], saved)
    change(sim, "work", 3 << 20, os.urandom(70_000))
    second = backup(sim, remote.url, "work", "vault")
    assert (second.group(1), second.group(2), second.group(3)) == ("2", first.group(2), "1")
    change(sim, "work", 5 << 20, b"\x07" * 5000)
    connections = remote.connections() if remote.connections else 0
    third = backup(sim, remote.url, "work", "vault")
    if remote.connections:  # one ssh connection for the whole backup
        assert remote.connections() - connections == 1
    assert third.group(1) == "3"
    keys = remote.files()
    roots_before = roots(remote)
    assert len(roots(remote)) == 3 and names.HEADER in keys and names.HEADER_MAC in keys
    objects = [k for k in keys if k.startswith("objects/")]
    assert objects and all(re.fullmatch(r"objects/([0-9a-f]{2})/\1[0-9a-f]{62}", k) for k in objects), objects
    assert set(keys) == {names.HEADER, names.HEADER_MAC, *roots(remote), *objects}, keys  # tmp/ empty, no lock

    if remote.base is not None:  # ssh: the files are the user's alone
        assert all(p.stat().st_mode & 0o077 == 0 for p in remote.base.rglob("*")), remote.base

    fresh = remote.wrap(make_fresh(tmp_path / "fresh", sim, keep=KEEP))
    connections = remote.connections() if remote.connections else 0
    r = fresh.restore("-d", "backupvm", "--repo", remote.url, "--expect-root", third.group(5), "work", "vault")
    assert r.returncode == 0, r.stderr
    for vm in ("work", "vault"):
        for vol, path in sim.volume_files(vm).items():
            assert_restored_like(path, fresh.volume_files(vm)[vol])
    if remote.connections:  # one ssh connection for the whole restore (hundreds of GETs)
        assert remote.connections() - connections == 1
    older = remote.wrap(make_fresh(tmp_path / "older", sim, keep=KEEP))
    r = older.restore("-d", "backupvm", "--repo", remote.url, "--expect-root", third.group(5), "--snapshot", "1",
                      "work")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert_restored_like(saved, older.volume_files("work")["private"])
    assert older.volume_files("work")["private"].read_bytes() != sim.volume_files("work")["private"].read_bytes()

    # prune without the passphrase: in the VM (cron) a dry run, then qvm-backup-prune through the agent:
    # snapshots 1 and 2 go, with the objects only they used
    before = remote.files()
    env = dict(os.environ, QUBES_AGENT_ROOT=str(sim.vm_root("backupvm")), **remote.env)
    agent = [str(Path(sys.executable).parent / "qubes-backup-agent"), "prune", "--repo", remote.url, "--keep-last", "1"]
    r = subprocess.run([*agent, "--dry-run", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["repository"] == remote.url and doc["dry_run"] and doc["objects_deleted"] > 0, doc
    assert remote.files() == before
    r = sim.run("qvm-backup-prune", "-d", "backupvm", "--repo", remote.url, "--keep-last", "1")
    assert r.returncode == 0, r.stderr
    after = remote.files()
    assert roots(remote) == [k for k in roots_before if k.startswith("roots/0000000003-")], after
    assert set(after) < set(before) and store_base.LOCK_NAME not in after
    r = sim.restore("-d", "backupvm", "--repo", remote.url, "--verify-only")
    assert r.returncode == 0 and r.stdout.startswith("Verified snapshot 3"), r.stderr


def test_lock(tmp_path: Path, remote: Remote, agent_env: None) -> None:
    """A backup session holds the lock: a second backup and a restore are refused meanwhile; a lock left by a
    killed agent is not broken: one line says whose it is and how to remove it."""
    sim = remote.wrap(new_sim(tmp_path / "sim"))
    backup(sim, remote.url, "work")
    install_vm_ssh(sim, remote)
    with open_channel(sim.system, "qubes.Backup") as ch:
        ch.send(FrameType.LOCATION, names.REQUEST, remote.url.encode())
        first = opening(ch)
        assert first[-1].type == FrameType.END, first
        holder = remote.get(store_base.LOCK_NAME)
        assert holder is not None and re.fullmatch(rb"host \S+ pid \d+ since \S+Z\n", holder), holder
        for args in (("qvm-backup", "-y", "-q", "-p", "/pw", *KDF, "-d", "backupvm", "--repo", remote.url, "work"),
                     ("qvm-backup-restore", "-y", "-p", "/pw", "-d", "backupvm", "--repo", remote.url,
                      "--verify-only")):  # fmt: skip
            r = sim.run(*args)
            line = one_error_line(r.stderr)
            assert r.returncode != 0 and "in use by another backup or prune" in line, r.stderr
        ch.close_input()  # dom0 went away before COMMIT: the agent ends its session and releases the lock
        assert ch.wait(30) != 0
    assert remote.get(store_base.LOCK_NAME) is None
    with open_channel(sim.system, "qubes.Backup") as ch:  # an agent SIGKILLed mid-session leaves its lock
        ch.send(FrameType.LOCATION, names.REQUEST, remote.url.encode())
        assert opening(ch)[-1].type == FrameType.END
        ch.kill()
    holder = remote.get(store_base.LOCK_NAME)
    assert holder is not None
    r = sim.run("qvm-backup", "-y", "-q", "-p", "/pw", *KDF, "-d", "backupvm", "--repo", remote.url, "work")
    assert r.returncode != 0 and "in use by another backup or prune" in one_error_line(r.stderr), r.stderr
    _first, reply, rc = run_backup(sim.system, remote.url, [])  # the agent's whole line (dom0 shows 200 chars)
    assert reply is not None and rc != 0
    assert bytes(reply.data).decode() == (f"repository {remote.url} is in use by another backup or prune "
                                          f"({holder.decode().strip()}); if none is running, remove its "
                                          "lock.exclusive")  # fmt: skip
    assert len(roots(remote)) == 1 and remote.get(store_base.LOCK_NAME) == holder  # not broken silently
    remote.remove(store_base.LOCK_NAME)
    backup(sim, remote.url, "work")  # what the user does after reading that line
    assert len(roots(remote)) == 2


def install_vm_ssh(sim: Sim, remote: Remote) -> None:
    """(ssh) the VM's key and known_hosts are in place already: remote.wrap installed them."""
    if remote.kind == "ssh":
        assert (sim.vm_root("backupvm") / "home/user/.ssh/id_ed25519").is_file()


def test_backup_without_commit_leaves_no_root(tmp_path: Path, remote: Remote, agent_env: None) -> None:
    """dom0 gone before COMMIT (killed, cancelled): objects may stay, no root, no header, no lock, no partial
    file; the next backup completes."""
    make_sim(tmp_path)  # the agent alone: a backup VM, no VMs to back up
    sim = remote.wrap(Sim(tmp_path / "sim"))
    root = names.root_name(1, "2026-11-27T09:00:00Z")
    _first, reply, rc = run_backup(sim.system, remote.url, [*HEADER, *_objects(3), (root, b"x")], commit=False)
    assert reply is None and rc != 0
    left = remote.files()
    assert not roots(remote) and names.HEADER not in left and store_base.LOCK_NAME not in left, left
    assert all(k.startswith("objects/") for k in left), left
    if remote.kind == "ssh":  # (an S3 PUT needs no temporary object)
        remote.put("tmp/.partial-0123456789abcdef", b"as a SIGKILLed agent leaves it")
    _first, reply, rc = run_backup(sim.system, remote.url, [*HEADER, *_objects(1), (root, b"r")])
    assert reply is not None and reply.type == FrameType.DONE and rc == 0, reply
    assert remote.get(root) == b"r" and not [k for k in remote.files() if k.startswith("tmp/")]
    # a root is never replaced: the same name again is refused, the stored one unchanged
    _first, reply, rc = run_backup(sim.system, remote.url, [(names.root_name(2, "2026-11-28T09:00:00Z"), b"2")])
    assert reply is not None and reply.type == FrameType.DONE
    remote.put("roots/0000000003-20261129T090000Z", b"planted")
    store = open_remote(remote.url, sim.vm_root("backupvm"), create=False)
    try:
        with pytest.raises(StorageError, match="exists already"):
            store.commit(None, "roots/0000000003-20261129T090000Z", b"mine")
    finally:
        store.close()
    assert remote.get("roots/0000000003-20261129T090000Z") == b"planted"


def test_hostile_server_answers_bounded(tmp_path: Path, remote: Remote, agent_env: None,
                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """What the server returns is bounded before it is read: an oversize header, an object larger than its
    type allows, more roots than MAX_ROOTS (lowered to 5 here), are one-line refusals; a missing object too."""
    make_sim(tmp_path)  # the agent alone: a backup VM, no VMs to back up
    sim = remote.wrap(Sim(tmp_path / "sim"))
    vm = sim.vm_root("backupvm")
    root = names.root_name(1, "2026-11-27T09:00:00Z")
    _f, reply, _rc = run_backup(sim.system, remote.url, [*HEADER, (root, b"r")])
    assert reply is not None and reply.type == FrameType.DONE, reply
    oid = "ab" * 32
    big = b"qbr1 d n " + oid.encode() + b" 00000000\n" + bytes(store_base.object_bound("d"))
    remote.put(f"objects/ab/{oid}", big)
    with open_channel(sim.system, "qubes.Restore") as ch:
        ch.send(FrameType.LOCATION, names.REQUEST, remote.url.encode())
        assert opening(ch)[-1].type == FrameType.END
        ch.send(FrameType.GET, oid)
        got = ch.recv({FrameType.ERROR: (0, 4096), FrameType.MEMBER: (64, 64 << 20)})
        assert got is not None and got.type == FrameType.ERROR and b"larger than its type allows" in bytes(got.data)
    # the prune reads, as the directory store's: HEAD and the references it states, no more; HEAD alone when it
    # does not parse; what the file has when it is shorter (the prune's strict parser refuses those)
    refs = b"".join(bytes([c]) * 64 + b"\n" for c in b"12")
    segment = b"qbr1 s n " + b"ef" * 32 + b" 00000002\n" + refs + bytes(200)
    remote.put(f"objects/ef/{'ef' * 32}", segment)
    short = b"qbr1 s n " + b"ee" * 32 + b" 00004097\n" + bytes(5000)
    remote.put(f"objects/ee/{'ee' * 32}", short)
    remote.put(f"objects/ed/{'ed' * 32}", b"not an object" * 100)
    store = open_remote(remote.url, vm, create=False)
    try:
        with pytest.raises(StorageError, match="missing"):
            store.serve("cd" * 32, io.BytesIO())
        assert store.read_clear("ef" * 32) == segment[: 83 + 130]
        assert store.read_clear("ee" * 32) == short
        assert store.read_clear("ed" * 32) == (b"not an object" * 100)[:83]
        with pytest.raises(FileNotFoundError):
            store.read_clear("cd" * 32)
        assert sorted(store.object_ids()) == sorted([oid, "ed" * 32, "ee" * 32, "ef" * 32])
        assert store.object_size("ef" * 32) == len(segment)
        store.delete_object("ee" * 32)
        store.delete_object("ee" * 32)  # already gone: not an error
        assert sorted(store.object_ids()) == sorted([oid, "ed" * 32, "ef" * 32])
        with pytest.raises(FileNotFoundError):
            store.object_size("ee" * 32)
    finally:
        store.close()

    remote.put(names.HEADER, b"x" * (8 << 20))  # the header's bound is 4096 bytes
    before = remote.downloaded()
    with open_channel(sim.system, "qubes.Restore") as ch:
        ch.send(FrameType.LOCATION, names.REQUEST, remote.url.encode())
        f = opening(ch)[-1]
        assert f.type == FrameType.ERROR, f
        assert bytes(f.data).endswith(f"repo-header in repository {remote.url} is larger than possible "
                                      f"({8 << 20} bytes)".encode()), f  # fmt: skip
    assert remote.downloaded() - before < 1 << 20  # refused before it was read
    remote.put(names.HEADER, b"format=x\n")

    for i in range(2, 8):
        remote.put(names.root_name(i, "2026-11-28T09:00:00Z"), b"r")
    monkeypatch.setattr(names, "MAX_ROOTS", 5)
    store = open_remote(remote.url, vm, create=False)
    try:
        with pytest.raises(StorageError, match="more than 5 snapshot roots"):
            store.roots()
    finally:
        store.close()
    shutil.rmtree(tmp_path / "sim", ignore_errors=True)


def test_ssh_unknown_host_is_one_line(tmp_path: Path, sshd: SshServer) -> None:  # noqa: F811 - the fixture
    """ssh's own refusals (here: a host key not in the VM's known_hosts) are one line, as for backup files."""
    make_sim(tmp_path)
    vm = Sim(tmp_path / "sim").vm_root("backupvm")
    install_client(vm, sshd, known=False)
    with pytest.raises(StorageError) as err:
        open_remote(sshd.url(sshd.remote_dir(tmp_path) / "repo"), vm, create=True)
    assert str(err.value).startswith("ssh: host key of ") and "\n" not in str(err.value), err.value
