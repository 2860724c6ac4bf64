"""The agent's side of a repository (vm-agent repository.py), through its real service entry points: what it
stores, what it refuses, its lock, and what a backup that never reached COMMIT leaves."""

from __future__ import annotations

import os
from pathlib import Path

from helpers_agent import VM, make_sim, open_channel, vm_home
from qubes_backup_dom0.format import repo
from qubes_backup_dom0.format.outer import OuterWriter
from qubes_backup_dom0.qubes.system import System
from qubes_backup_protocol import frames
from qubes_backup_protocol import repo as names
from qubes_backup_protocol.frames import FrameType

OPENING = {FrameType.MEMBER: (64, 1 << 20), FrameType.ENTRY: (64, 0), FrameType.END: (0, 0),
           FrameType.ERROR: (0, frames.MAX_ERROR_LEN)}  # fmt: skip
ANSWER = {FrameType.MEMBER: (64, 64 << 20), FrameType.ERROR: (0, frames.MAX_ERROR_LEN),
          FrameType.DONE: (0, 4096)}  # fmt: skip


def opening(ch: object) -> list[frames.Frame]:
    out = []
    while True:
        f = ch.recv(OPENING)  # type: ignore[attr-defined]
        assert f is not None
        out.append(f)
        if f.type in (FrameType.END, FrameType.ERROR):
            return out


def stream(members: list[tuple[str, bytes]], end: bool = True) -> bytes:
    buf = bytearray()

    class Sink:
        def write(self, data: bytes | memoryview) -> None:
            buf.extend(data)

    w = OuterWriter(Sink())
    for name, data in members:
        w.add(name, data)
    if end:
        w.close()
    return bytes(buf)


def _objects(n: int) -> list[tuple[str, bytes]]:
    keys = repo.derive_keys(b"k" * 32, b"r" * 16)
    return [repo.seal(keys, repo.DATA, os.urandom(1000 + i)) for i in range(n)]


def run_backup(system: System, location: str, members: list[tuple[str, bytes]], commit: bool = True,
               end: bool = True) -> tuple[list[frames.Frame], frames.Frame | None, int]:  # fmt: skip
    with open_channel(system, "qubes.Backup") as ch:
        ch.send(FrameType.LOCATION, names.REQUEST, location.encode())
        first = opening(ch)
        if first[-1].type == FrameType.ERROR:
            return first, first[-1], ch.wait(30)
        try:
            data = stream(members, end)
            for i in range(0, len(data), 1 << 20):
                ch.send(FrameType.DATA, "", data[i : i + (1 << 20)])
            if commit:
                ch.send(FrameType.COMMIT)
        except BrokenPipeError:
            pass
        ch.close_input()
        reply = ch.recv(ANSWER)
        return first, reply, ch.wait(30)


HEADER = [(names.HEADER, b"format=x\n"), (names.HEADER_MAC, b"0" * 64 + b"\n")]  # opaque to the agent


def test_new_repository_then_listed_and_served(tmp_path: Path) -> None:
    system = make_sim(tmp_path)
    objs = _objects(3)
    root = names.root_name(1, "2026-11-27T09:00:00Z")
    first, reply, rc = run_backup(system, "/home/user/r", [*HEADER, *objs, (root, b"root bytes")])
    assert [f.type for f in first] == [FrameType.END]  # a new (empty) repository
    assert reply is not None and reply.type == FrameType.DONE and bytes(reply.data) == root.encode() and rc == 0
    base = vm_home(system) / "r"
    assert (base / root).read_bytes() == b"root bytes" and not os.listdir(base / "tmp")
    for oid, data in objs:
        assert (base / "objects" / oid[:2] / oid).read_bytes() == data
    with open_channel(system, "qubes.Restore") as ch:
        ch.send(FrameType.LOCATION, names.REQUEST, b"/home/user/r")
        first = opening(ch)
        assert [(f.type, f.name) for f in first] == [(FrameType.MEMBER, names.HEADER), (FrameType.MEMBER,
                names.HEADER_MAC), (FrameType.ENTRY, root), (FrameType.END, "")]  # fmt: skip
        ch.send(FrameType.GET, objs[1][0])
        got = ch.recv(ANSWER)
        assert got is not None and got.name == objs[1][0] and bytes(got.data) == objs[1][1]
        ch.send(FrameType.GET, "f" * 64)
        got = ch.recv(ANSWER)
        assert got is not None and got.type == FrameType.ERROR and b"missing" in bytes(got.data)


def test_killed_backup_leaves_no_root_and_the_next_one_cleans_up(tmp_path: Path) -> None:
    system = make_sim(tmp_path)
    root = names.root_name(1, "2026-11-27T09:00:00Z")
    _first, reply, rc = run_backup(system, "/home/user/r", [*HEADER, *_objects(2), (root, b"x")], commit=False)
    assert reply is None and rc != 0
    base = vm_home(system) / "r"
    assert not (base / "roots" / root.split("/")[1]).exists() and not (base / names.HEADER).exists()
    (base / "tmp" / ".partial-left").write_bytes(b"partial")  # as a SIGKILLed agent leaves it
    _first, reply, rc = run_backup(system, "/home/user/r", [*HEADER, *_objects(1), (root, b"x")])
    assert reply is not None and reply.type == FrameType.DONE and rc == 0
    assert os.listdir(base / "tmp") == []


def test_refusals(tmp_path: Path) -> None:
    system = make_sim(tmp_path)
    other = vm_home(system) / "notrepo"
    other.mkdir()
    (other / "file").write_bytes(b"x")
    _f, reply, rc = run_backup(system, "/home/user/notrepo", [])
    assert reply is not None and b"holds no repository" in bytes(reply.data) and rc != 0
    root1 = names.root_name(1, "2026-11-27T09:00:00Z")
    cases = [
        ([*HEADER, ("vm1/000000", b"x"), (root1, b"r")], b"unexpected member"),  # not a repository name
        ([*_objects(1), (root1, b"r")], b"needs its header"),  # a new repository without its header
        ([*HEADER, (root1, b"r"), *_objects(1)], b"after the snapshot root"),
        ([*HEADER, *_objects(1)], b"no snapshot root"),
        ([*HEADER, ("f" * 64, b"qbr1 d n " + b"e" * 64 + b" 00000000\n" + bytes(100)), (root1, b"r")],
         b"malformed"),  # its header line names another object
    ]
    for members, why in cases:
        _f, reply, rc = run_backup(system, "/home/user/r2", members)
        assert reply is not None and reply.type == FrameType.ERROR and why in bytes(reply.data), (why, reply)
        assert rc != 0 and not list((vm_home(system) / "r2" / "roots").glob("*"))
    _f, reply, _rc = run_backup(system, "/home/user/r2", [*HEADER, (root1, b"r")])
    assert reply is not None and reply.type == FrameType.DONE
    _f, reply, rc = run_backup(system, "/home/user/r2", [(root1, b"again")])  # not newer than snapshot 1
    assert reply is not None and b"not newer" in bytes(reply.data) and rc != 0
    assert (vm_home(system) / "r2" / root1).read_bytes() == b"r"
    second = names.root_name(2, "2026-11-28T09:00:00Z")
    _f, reply, rc = run_backup(system, "/home/user/r2", [*HEADER, (second, b"r")])
    assert reply is not None and b"header" in bytes(reply.data) and rc != 0  # never a second header


def test_lock_one_backup_at_a_time(tmp_path: Path) -> None:
    """While a restore session reads the repository, a backup (or prune) is refused, not queued."""
    system = make_sim(tmp_path)
    root = names.root_name(1, "2026-11-27T09:00:00Z")
    run_backup(system, "/home/user/r", [*HEADER, (root, b"r")])
    with open_channel(system, "qubes.Restore") as reader:
        reader.send(FrameType.LOCATION, names.REQUEST, b"/home/user/r")
        opening(reader)
        _first, reply, rc = run_backup(system, "/home/user/r", [])
        assert reply is not None and b"in use" in bytes(reply.data) and rc != 0
    _first, reply, rc = run_backup(system, "/home/user/r", [(names.root_name(2, "2026-11-28T09:00:00Z"), b"r2")])
    assert reply is not None and reply.type == FrameType.DONE, reply


def test_location_confined(tmp_path: Path) -> None:
    system = make_sim(tmp_path)
    for location in ("/../../dom0", "../x", "/home/user/../../../etc"):  # (ssh://, s3://: test_repo_remote.py)
        with open_channel(system, "qubes.Restore") as ch:
            ch.send(FrameType.LOCATION, names.REQUEST, location.encode())
            f = ch.recv(OPENING)
            assert f is not None and f.type == FrameType.ERROR, location
    assert VM


def _served_repository(tmp_path: Path, n: int) -> tuple[System, list[tuple[str, bytes]]]:
    system = make_sim(tmp_path)
    objs = _objects(n)
    root = names.root_name(1, "2026-11-27T09:00:00Z")
    _first, reply, rc = run_backup(system, "/home/user/r", [*HEADER, *objs, (root, b"root bytes")])
    assert reply is not None and reply.type == FrameType.DONE and rc == 0
    return system, objs


def test_gets_is_answered_one_member_per_id_in_order_then_error_where_one_is_missing(tmp_path: Path) -> None:
    system, objs = _served_repository(tmp_path, 4)
    with open_channel(system, "qubes.Restore") as ch:
        ch.send(FrameType.LOCATION, names.REQUEST, b"/home/user/r")
        opening(ch)
        order = [objs[2], objs[0], objs[3], objs[0]]  # any order, an id twice
        ch.send(FrameType.GETS, "", names.encode_gets([oid for oid, _ in order]))
        for oid, data in order:
            got = ch.recv(ANSWER)
            assert got is not None and got.type == FrameType.MEMBER and got.name == oid and bytes(got.data) == data
        ch.send(FrameType.GET, objs[1][0])  # GET still works in between
        got = ch.recv(ANSWER)
        assert got is not None and got.name == objs[1][0]
        ch.send(FrameType.GETS, "", names.encode_gets([objs[1][0], "e" * 64, objs[2][0]]))
        got = ch.recv(ANSWER)
        assert got is not None and got.name == objs[1][0]
        got = ch.recv(ANSWER)
        assert got is not None and got.type == FrameType.ERROR and b"missing" in bytes(got.data)
        assert ch.wait(30) != 0


def test_a_malformed_gets_is_refused(tmp_path: Path) -> None:
    system, objs = _served_repository(tmp_path, 1)
    line = (objs[0][0] + "\n").encode()
    bad = [b"", line[:-1] + b" ", line + line[:40], line.upper(), (names.HEADER + "\n").ljust(65).encode(), line * 65]
    for data in bad:
        with open_channel(system, "qubes.Restore") as ch:
            ch.send(FrameType.LOCATION, names.REQUEST, b"/home/user/r")
            opening(ch)
            ch.send(FrameType.GETS, "", data)
            got = ch.recv(ANSWER)
            assert got is not None and got.type == FrameType.ERROR and b"bad request" in bytes(got.data), data[:70]
            assert ch.wait(30) != 0
