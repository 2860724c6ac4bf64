"""An aborted volume import is stopped the way Qubes' import script expects (issue 17 item 4).

Qubes' ``admin.vm.volume.Import`` script keeps qubesd's replies in a ``mktemp`` file removed by an EXIT trap,
and ends an import it could not complete with ``ImportEnd fail`` (qubesd then removes the half-written
volume).  SIGKILL skips both.  So an abort first ends the service's input (it sees a short import and fails
it itself), SIGTERM only a service still running ABORT_GRACE seconds later (the trap still runs), SIGKILL
only TERM_GRACE seconds after that.  The service here is tests/fakes/import_like_qubes.sh (a temporary file
and trap like Qubes' script, the simulated import service as its foreground child), or a hung one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import qubes_backup_sim
from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.qubes import interface
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.qubes.system import System
from qubes_backup_sim import launch, simgen

FAKES = Path(__file__).resolve().parent / "fakes"
IMPORT = "admin.vm.volume.ImportWithSize"
SIM_IMPORT = Path(qubes_backup_sim.__file__).resolve().parent / "rpc" / IMPORT
MiB = 1 << 20
HUNG = """#!/bin/bash
# reads nothing and never ends by itself; a temporary file and an EXIT trap as Qubes' script has
tmpfile=$(mktemp)
trap 'rm -f -- "$tmpfile"' EXIT
trap 'echo "TERM $QREXEC_REQUESTED_TARGET $1" >> "$FAKE_IMPORT_TRACE"; exit 143' TERM
echo "start $QREXEC_REQUESTED_TARGET $1" >> "$FAKE_IMPORT_TRACE"
sleep 600
"""
DEAF = HUNG.replace("trap 'echo \"TERM", "trap '' TERM\n: trap 'echo \"TERM")  # ignores SIGTERM too


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.sim = tmp / "sim"
        self.rpc = tmp / "rpc"
        self.tmpdir = tmp / "dom0-tmp"  # the service's TMPDIR: dom0's /tmp
        self.trace = tmp / "trace"
        self.log = tmp / "requests.jsonl"

    def service(self, text: str | None = None) -> None:
        target = self.rpc / IMPORT
        if text is None:
            shutil.copy(FAKES / "import_like_qubes.sh", target)
        else:
            target.write_text(text)
        target.chmod(0o755)

    def qubes(self) -> Qubes:
        return Qubes(System.from_env({"QUBES_SIM": str(self.sim), "QUBES_RPC_DIR": str(self.rpc)}))

    def events(self) -> list[str]:
        return self.trace.read_text().splitlines() if self.trace.exists() else []

    def requests(self) -> list[tuple[str, str, str]]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [(q["method"], q["dest"], q["payload"]) for q in map(json.loads, lines)]

    def lv(self, name: str) -> Path:
        return self.sim / "dom0/dev/qubes_dom0" / name


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    e = Env(tmp_path)
    simgen.generate(e.sim, "small", keep=("vault", "fedora-41"))
    e.rpc.mkdir()
    e.tmpdir.mkdir()
    launch.ensure_qubesd(e.sim, log=e.log, idle=60)
    monkeypatch.setenv("TMPDIR", str(e.tmpdir))
    monkeypatch.setenv("FAKE_PYTHON", sys.executable)
    monkeypatch.setenv("FAKE_SIM_IMPORT", str(SIM_IMPORT))
    monkeypatch.setenv("FAKE_IMPORT_TRACE", str(e.trace))
    monkeypatch.setattr(interface, "ABORT_GRACE", 10.0)
    monkeypatch.setattr(interface, "TERM_GRACE", 5.0)
    yield e
    launch.stop_qubesd(e.sim)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_abort_ends_the_input_and_the_script_fails_the_import_itself(env: Env) -> None:
    """Half the data, then abort: the script sees a short import, ends it (ImportEnd fail: qubesd drops the
    -import volume) and exits normally; no SIGTERM, nothing left in /tmp, the volume as it was."""
    env.service()
    private = env.lv("vm-vault-private")
    before = _digest(private)
    imp = env.qubes().import_volume("vault", "private", 16 * MiB)
    imp.write(os.urandom(MiB))
    started = time.monotonic()
    imp.abort()
    assert time.monotonic() - started < interface.ABORT_GRACE  # it ended by itself, not by a signal
    assert imp.proc.returncode == 0
    assert env.events() == ["start vault private", "exit vault private 0"]  # no TERM
    ends = [p for m, d, p in env.requests() if (m, d) == ("internal.vm.volume.ImportEnd", "vault")]
    assert len(ends) == 1 and ends[0].startswith("fail\n"), ends
    assert not env.lv("vm-vault-private-import").exists() and _digest(private) == before
    assert list(env.tmpdir.iterdir()) == []
    with pytest.raises(BackupError, match="aborted"):
        imp.write(b"more")
    imp.abort()  # idempotent


def test_a_hung_service_gets_sigterm_and_its_trap_runs(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service that neither reads nor ends: SIGTERM after ABORT_GRACE, and its EXIT trap removes its file."""
    env.service(HUNG)
    monkeypatch.setattr(interface, "ABORT_GRACE", 0.5)
    imp = env.qubes().import_volume("vault", "private", 16 * MiB)
    deadline = time.monotonic() + 10
    while not env.events():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert len(list(env.tmpdir.iterdir())) == 1  # its temporary file, while it runs
    imp.abort()
    assert imp.proc.returncode == 143  # ended by the TERM trap, not killed
    assert env.events() == ["start vault private", "TERM vault private"]
    assert list(env.tmpdir.iterdir()) == []


def test_abort_from_another_thread_while_a_write_blocks(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer is blocked in a write into a full pipe (the service stopped reading); a cancel on another
    thread aborts: the writer gets one clear error, the service its SIGTERM, /tmp stays clean."""
    env.service(HUNG)
    monkeypatch.setattr(interface, "ABORT_GRACE", 0.5)
    imp = env.qubes().import_volume("vault", "private", 64 * MiB)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for _ in range(16):
                imp.write(bytes(4 * MiB))  # blocks once the pipe is full
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.5)
    assert t.is_alive()  # blocked
    imp.abort()
    t.join(10)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], BackupError), errors
    assert "volume 'private' of vault" in str(errors[0])
    assert list(env.tmpdir.iterdir()) == []


def test_sigkill_only_after_sigterm_is_ignored(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last resort: a service that ignores SIGTERM too is killed TERM_GRACE seconds after it."""
    env.service(DEAF)
    monkeypatch.setattr(interface, "ABORT_GRACE", 0.3)
    monkeypatch.setattr(interface, "TERM_GRACE", 0.3)
    imp = env.qubes().import_volume("vault", "private", MiB)
    deadline = time.monotonic() + 10
    while not env.events():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    imp.abort()
    assert imp.proc.returncode == -9
