"""dom0's side of the pipe: starting services (SimTransport/QrexecTransport) and the Channel's guarantees."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from helpers_agent import REPLY, VM, make_sim
from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.qubes import transport
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.qubes.transport import Channel, ChannelClosed, QrexecTransport, SimTransport
from qubes_backup_protocol import frames
from qubes_backup_protocol.frames import FrameType


@pytest.fixture
def system(tmp_path: Path) -> System:
    return make_sim(tmp_path)


def fake_service(tmp_path: Path, name: str, body: str) -> Path:
    """A stand-in service script, to make an agent misbehave in ways the real one does not."""
    rpc = tmp_path / "rpc"
    rpc.mkdir(exist_ok=True)
    (rpc / name).write_text("import os, sys, time\n" + body)
    return rpc


def test_unknown_vm(system: System) -> None:
    for vm in ("nosuchvm", "../dom0", ""):
        with pytest.raises(BackupError, match="no such VM"):
            SimTransport(system).start("qubes.Backup", vm)


def test_unknown_service(system: System) -> None:
    with pytest.raises(BackupError, match="not installed"):
        SimTransport(system).start("qubes.Nothing", VM)


def test_make_transport(system: System) -> None:
    assert isinstance(transport.make_transport(system), SimTransport)
    real = System(None, Path("/"), "user")
    assert isinstance(transport.make_transport(real), QrexecTransport)


def test_confined_flag(system: System, monkeypatch: pytest.MonkeyPatch) -> None:
    assert SimTransport(system, sandbox=False).confined is False
    monkeypatch.setenv("QUBES_SIM_SANDBOX", "0")
    assert SimTransport(system).confined is False
    monkeypatch.delenv("QUBES_SIM_SANDBOX")
    assert SimTransport(system).confined is (shutil.which("bwrap") is not None)


def test_rpc_dir_override(system: System, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rpc = fake_service(tmp_path, "qubes.Backup", "sys.stdout.buffer.write(b'hello')\n")
    monkeypatch.setenv("QUBES_BACKUP_RPC_DIR", str(rpc))
    proc = SimTransport(system, sandbox=False).start("qubes.Backup", VM)
    out, _ = proc.communicate(timeout=10)
    assert out == b"hello"


def test_qrexec_command_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """qvm-run is the one found on PATH (as on dom0), started as Qubes' own restore starts services."""
    seen: list[list[str]] = []

    def fake_popen(argv: list[str], env: object, cwd: object) -> object:
        seen.append(argv)
        return object()

    qvm_run = tmp_path / "bin" / "qvm-run"
    qvm_run.parent.mkdir()
    qvm_run.write_text("#!/bin/sh\nexit 1\n")
    qvm_run.chmod(0o755)
    monkeypatch.setattr(transport, "_popen", fake_popen)
    monkeypatch.setenv("PATH", f"{qvm_run.parent}{os.pathsep}/nonexistent")
    QrexecTransport().start("qubes.Restore", "usbvm")
    assert seen == [[str(qvm_run), "--pass-io", "--no-gui", "--service", "--", "usbvm", "qubes.Restore"]]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BackupError, match="qvm-run not found on PATH"):
        QrexecTransport().start("qubes.Restore", "usbvm")


def test_agent_environment_and_pipes(system: System, tmp_path: Path) -> None:
    body = (
        "import json\n"
        "sys.stdout.write(json.dumps({'root': os.environ.get('QUBES_AGENT_ROOT'), 'cwd': os.getcwd(),\n"
        "  'sim': os.environ.get('QUBES_SIM'), 'home': os.environ.get('HOME')}))\n"
    )
    rpc = fake_service(tmp_path, "qubes.Backup", body)
    os.environ["QUBES_SIM"] = str(system.sim_dir)
    try:
        proc = SimTransport(system, rpc=rpc).start("qubes.Backup", VM)
    finally:
        del os.environ["QUBES_SIM"]
    size = fcntl.fcntl(proc.stdin.fileno(), getattr(fcntl, "F_GETPIPE_SZ", 1032))  # type: ignore[union-attr]
    out, _ = proc.communicate(timeout=10)
    info = json.loads(out)
    root = str(system.vm_root(VM))
    assert info["root"] == root and info["cwd"] == root and info["sim"] is None
    assert info["home"] == root + "/home/user"
    assert size >= 65536  # 1 MiB when the system allows it


def test_stall_is_detected(system: System, tmp_path: Path) -> None:
    rpc = fake_service(tmp_path, "qubes.Restore", "time.sleep(30)\n")
    ch = Channel(SimTransport(system, rpc=rpc).start("qubes.Restore", VM), timeout=0.5, vm=VM)
    with ch:
        start = time.monotonic()
        with pytest.raises(BackupError, match=rf"{VM} did not answer for 0\.5 s"):
            ch.recv(REPLY)
        assert time.monotonic() - start < 5


def test_timeout_from_environment(system: System, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUBES_BACKUP_TIMEOUT", "0.3")
    rpc = fake_service(tmp_path, "qubes.Restore", "time.sleep(30)\n")
    with Channel(SimTransport(system, rpc=rpc).start("qubes.Restore", VM)) as ch:
        assert ch.timeout == 0.3
        with pytest.raises(BackupError, match=r"did not answer for 0\.3 s"):
            ch.recv(REPLY)


def test_stall_while_writing(system: System, tmp_path: Path) -> None:
    rpc = fake_service(tmp_path, "qubes.Backup", "time.sleep(30)\n")  # never reads stdin
    ch = Channel(SimTransport(system, rpc=rpc).start("qubes.Backup", VM), timeout=0.5)
    with ch, pytest.raises(BackupError, match="did not answer"):
        for _ in range(100):
            ch.send(FrameType.DATA, "", b"x" * frames.MAX_DATA_FRAME)


def test_noisy_stderr_does_not_deadlock_and_is_bounded(system: System, tmp_path: Path) -> None:
    body = (
        "sys.stderr.write('noise ' * 500000); sys.stderr.write('the real reason'); sys.stderr.flush()\n"
        "from qubes_backup_protocol import frames\n"
        "frames.write_frame(sys.stdout.buffer, frames.FrameType.ERROR, '', b'failed')\n"
    )
    rpc = fake_service(tmp_path, "qubes.Backup", body)
    with Channel(SimTransport(system, rpc=rpc).start("qubes.Backup", VM), timeout=10) as ch:
        frame = ch.recv(REPLY)
        assert frame is not None and frame.data == b"failed"
        ch.wait(10)
        tail = ch.stderr_tail()
        assert tail.endswith("the real reason") and len(tail) <= 400


def test_agent_that_stops_reading(system: System, tmp_path: Path) -> None:
    body = (
        "from qubes_backup_protocol import frames\n"
        "frames.write_frame(sys.stdout.buffer, frames.FrameType.ERROR, '', b'disk full')\n"
    )
    rpc = fake_service(tmp_path, "qubes.Backup", body)
    with Channel(SimTransport(system, rpc=rpc).start("qubes.Backup", VM), timeout=10) as ch:
        with pytest.raises(ChannelClosed):
            for _ in range(100):
                ch.send(FrameType.DATA, "", b"x" * frames.MAX_DATA_FRAME)
        frame = ch.recv(REPLY)
        assert frame is not None and frame.type == FrameType.ERROR and frame.data == b"disk full"


def test_hostile_frames_rejected(system: System, tmp_path: Path) -> None:
    cases = {
        "garbage": "sys.stdout.buffer.write(b'HTTP/1.1 200 OK')\n",
        "huge": "sys.stdout.buffer.write(b'QB\\x01\\x13\\x00\\x00\\xff\\xff\\xff\\xff')\n",
        "short": "sys.stdout.buffer.write(b'QB\\x01\\x13\\x00\\x00\\x00\\x00\\x00\\x10abc')\n",
    }
    for name, body in cases.items():
        rpc = fake_service(tmp_path, f"qubes.{name}", body)
        ch = Channel(SimTransport(system, rpc=rpc).start(f"qubes.{name}", VM), timeout=10)
        with ch, pytest.raises(frames.ProtocolError):
            ch.recv(REPLY)


def test_wait_kills_a_lingering_agent(system: System, tmp_path: Path) -> None:
    rpc = fake_service(tmp_path, "qubes.Backup", "time.sleep(30)\n")
    ch = Channel(SimTransport(system, rpc=rpc).start("qubes.Backup", VM), timeout=10)
    with pytest.raises(BackupError, match="did not answer"):
        ch.wait(0.3)
    assert ch.proc.poll() is not None
    ch.close()


def test_unconfined_python_is_this_one(system: System, tmp_path: Path) -> None:
    rpc = fake_service(tmp_path, "qubes.Backup", "sys.stdout.write(sys.executable)\n")
    proc = SimTransport(system, rpc=rpc, sandbox=False).start("qubes.Backup", VM)
    out, _ = proc.communicate(timeout=10)
    assert out.decode() == sys.executable


def test_local_file_transport_reads_a_dom0_backup(tmp_path: Path) -> None:
    from helpers_agent import RESTORE_REPLY, outer_members, write_tar
    from qubes_backup_dom0.qubes.transport import LocalFileTransport
    from qubes_backup_protocol import names

    members = outer_members({"vm1": 1})
    folder = tmp_path / "dom0dir"
    folder.mkdir()
    write_tar(folder / "b.tar", members)
    (tmp_path / "outside.tar").write_bytes((folder / "b.tar").read_bytes())
    with Channel(LocalFileTransport(folder).start("qubes.Restore", "dom0"), timeout=10) as ch:
        ch.send(FrameType.LOCATION, "", b"/b.tar")
        got = []
        while (frame := ch.recv(RESTORE_REPLY, names.is_member_name)) is not None:
            got.append(frame)
            if frame.name == "manifest.hmac":
                ch.send(FrameType.WANT, "vm1")
                ch.send(FrameType.WANT_END)
            if frame.type == FrameType.END:
                break
        assert [(f.name, f.data) for f in got[:-1]] == members and got[-1].type == FrameType.END
        assert ch.wait(10) == 0
    with Channel(LocalFileTransport(folder).start("qubes.Restore"), timeout=10) as ch:
        ch.send(FrameType.LOCATION, "", b"/../outside.tar")
        frame = ch.recv(RESTORE_REPLY)
        assert frame is not None and frame.type == FrameType.ERROR
