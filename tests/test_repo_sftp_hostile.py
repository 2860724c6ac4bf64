"""The agent's SFTP client (vm-agent repostore/sftp.py) against a hostile server: every answer is bounded and
must answer a request made; a server that breaks the protocol ends the session with one line.

The "server" is a small script given to the agent as its ssh program (``QUBES_AGENT_SSH``): it ignores ssh's
arguments and speaks SFTP on its stdin/stdout, honestly up to the scenario's point, then misbehaves.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers_agent import make_sim
from qubes_backup_agent.repostore import open_remote
from qubes_backup_agent.storage import StorageError

SERVER = r'''
import os, struct, sys
SCENARIO = os.environ["FAKE_SFTP"]
inp, out = sys.stdin.buffer, sys.stdout.buffer

def read(n):
    data = b""
    while len(data) < n:
        piece = inp.read(n - len(data))
        if not piece:
            sys.exit(0)
        data += piece
    return data

def send(ptype, payload, length=None):
    body = bytes([ptype]) + payload
    out.write(struct.pack(">I", len(body) if length is None else length) + body)
    out.flush()

def string(b):
    return struct.pack(">I", len(b)) + b

DIR, FILE = struct.pack(">III", 0x4, 0o040700, 0), struct.pack(">IQI", 0x5, 10, 0o100600)
while True:
    length, = struct.unpack(">I", read(4))
    packet = read(length)
    ptype, rest = packet[0], packet[1:]
    if ptype == 1:
        send(2, struct.pack(">I", 3))
        continue
    rid, rest = rest[:4], rest[4:]
    path = rest[4:4 + struct.unpack(">I", rest[:4])[0]]
    if SCENARIO == "huge-packet":
        send(105, rid + DIR, length=1 << 30)
    elif SCENARIO == "unasked" and ptype == 17:
        send(105, struct.pack(">I", 0xDEAD) + DIR)
    elif ptype in (7, 17):  # LSTAT, STAT
        if path.endswith(b"repo"):
            send(105, rid + DIR)
        elif path.endswith(b"repo-header"):
            send(105, rid + FILE)
        else:
            send(101, rid + struct.pack(">I", 2) + string(b"no such file") + string(b""))
    elif ptype in (3, 11):  # OPEN, OPENDIR
        send(102, rid + string(b"h"))
    elif ptype == 4:  # CLOSE
        send(101, rid + struct.pack(">I", 0) + string(b"") + string(b""))
    elif ptype == 5:  # READ: more than asked for
        send(103, rid + string(b"x" * 100_000))
    elif ptype == 12:  # READDIR: more names than any packet may carry
        send(104, rid + struct.pack(">I", 1_000_000))
    else:
        send(101, rid + struct.pack(">I", 8) + string(b"unsupported") + string(b""))
'''


@pytest.fixture
def vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    make_sim(tmp_path)
    script = tmp_path / "fake-ssh"
    script.write_text(f"#!{sys.executable}\n{SERVER}")
    script.chmod(0o755)
    monkeypatch.setenv("QUBES_AGENT_SSH", str(script))
    return tmp_path / "sim" / "vms" / "backupvm"


@pytest.mark.parametrize(("scenario", "expect"), [
    ("huge-packet", "sent a packet of 1073741824 bytes"),
    ("unasked", "answered a request that was not made"),
    ("listing", "sent a listing of 1000000 names at once"),
    ("read", "sent more than was asked for"),
])  # fmt: skip
def test_hostile_sftp_server(vm: Path, monkeypatch: pytest.MonkeyPatch, scenario: str, expect: str) -> None:
    monkeypatch.setenv("FAKE_SFTP", scenario)
    with pytest.raises(StorageError) as err:
        store = open_remote("ssh://nas/srv/repo", vm, create=False)  # (the header is there: no listing yet)
        try:
            if scenario == "listing":
                store.roots()
            else:
                store.load("repo-header", 4096)
        finally:
            store.close()
    assert expect in str(err.value) and "\n" not in str(err.value), err.value
