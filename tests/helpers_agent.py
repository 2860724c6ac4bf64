"""Shared by test_agent.py and test_transport.py: a simulated system with a backup VM, outer tars, frames."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.qubes.transport import Channel, SimTransport
from qubes_backup_protocol import frames, names
from qubes_backup_protocol.frames import Frame, FrameType

VM = "backupvm"
BACKUP_NAME = "qubes-backup-2026-11-27T090102"
REPLY = {
    FrameType.DONE: (0, frames.MAX_LOCATION_LEN),
    FrameType.ERROR: (0, frames.MAX_ERROR_LEN),
}
RESTORE_REPLY = {
    FrameType.MEMBER: (names.MAX_NAME_LEN, (256 << 20) + 16),
    FrameType.END: (0, 0),
    FrameType.ERROR: (0, frames.MAX_ERROR_LEN),
}


def make_sim(tmp: Path) -> System:
    sim = tmp / "sim"
    (sim / "dom0" / "home" / "user").mkdir(parents=True)
    (sim / "vms" / VM / "home" / "user" / "backups").mkdir(parents=True)
    return System(sim.resolve(), sim.resolve() / "dom0", "user")


def vm_home(system: System) -> Path:
    return system.vm_root(VM) / "home" / "user"


def open_channel(system: System, service: str, sandbox: bool | None = None, timeout: float = 30) -> Channel:
    transport = SimTransport(system, sandbox=sandbox)
    return Channel(transport.start(service, VM), timeout=timeout, vm=VM)


def backup(
    system: System, location: str, chunks: list[bytes], commit: bool = True, sandbox: bool | None = None
) -> tuple[Frame | None, int, str]:
    """Run qubes.Backup; returns (reply frame, exit status, stderr tail)."""
    with open_channel(system, "qubes.Backup", sandbox) as ch:
        ch.send(FrameType.LOCATION, BACKUP_NAME, location.encode())
        reply = None
        try:
            for piece in chunks:
                ch.send(FrameType.DATA, "", piece)
            if commit:
                ch.send(FrameType.COMMIT)
        except frames.ProtocolError:
            raise
        except Exception:  # agent stopped reading: its ERROR frame is still in the pipe
            pass
        ch.close_input()
        reply = ch.recv(REPLY)
        rc = ch.wait(30)
        return reply, rc, ch.stderr_tail()


def outer_members(archives: dict[str, int], seed: int = 1) -> list[tuple[str, bytes]]:
    """A structurally valid outer member list: header, manifest, then chunk/MAC pairs and trailers."""
    out: list[tuple[str, bytes]] = []

    def add(name: str, data: bytes) -> None:
        out.append((name, data))
        out.append((names.mac_name(name), (f"{len(out):064x}\n").encode()))

    add(names.HEADER, b"format=qubes-backup\nversion=1\n")
    add(names.MANIFEST, bytes([seed]) * 100)
    for archive, nchunks in archives.items():
        for i in range(nchunks):
            add(names.chunk_name(archive, i), bytes([(i + seed) % 256]) * (1000 + 37 * i))
        add(names.trailer_name(archive), f"chunks={nchunks}\n".encode())
    return out


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
