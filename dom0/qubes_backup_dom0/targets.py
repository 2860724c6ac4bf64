"""Where a backup goes: a directory in dom0, or the qubes.Backup service of a VM.

Either way a backup is complete only when the whole stream arrived and was synced: before that it lives
under a temporary name that does not look like a backup (``.qubes-backup-…partial``), and any failure
removes it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from datetime import datetime
from pathlib import Path

from qubes_backup_protocol.frames import MAX_DATA_FRAME, MAX_ERROR_LEN, MAX_LOCATION_LEN, FrameType, safe_text

from .errors import BackupError, UsageError
from .system import System
from .transport import Channel, Transport

ABORT_GRACE = 5.0  # seconds an agent gets to clean up after an aborted backup before it is killed


def backup_file_name(now: datetime | None = None) -> str:
    return (now or datetime.now()).strftime("qubes-backup-%Y-%m-%dT%H%M%S")


class LocalTarget:
    """A backup file in a dom0 directory."""

    def __init__(self, system: System, location: str, name: str) -> None:
        self.directory = system.dom0_path(location)
        self.shown = location
        self.name = name
        if not self.directory.is_dir():
            raise UsageError(f"backup location {location} is not a directory in dom0")
        if not os.access(self.directory, os.W_OK):
            raise UsageError(f"backup location {location} is not writable")
        if (self.directory / name).exists():
            raise UsageError(f"{location}/{name} already exists")
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=self.directory)
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._tmp = Path(tmp)

    def write(self, data: bytes | memoryview) -> None:
        try:
            self._file.write(data)
        except OSError as e:
            raise BackupError(f"writing the backup to {self.shown} failed: {e.strerror}") from None

    def commit(self) -> str:
        try:
            os.fsync(self._file.fileno())
            self._file.close()
            final = self.directory / self.name
            os.rename(self._tmp, final)
            dfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            self.abort()
            raise BackupError(f"finishing the backup in {self.shown} failed: {e.strerror}") from None
        return f"{self.shown.rstrip('/')}/{self.name}"

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self._tmp.unlink(missing_ok=True)


class AgentTarget:
    """The qubes.Backup service of a VM; the agent stores the stream and only it names the result."""

    def __init__(self, transport: Transport, vm: str, location: str, name: str) -> None:
        if len(location.encode()) > MAX_LOCATION_LEN or "\n" in location or "\0" in location:
            raise UsageError("backup location is too long or contains a newline")
        self.vm = vm
        self.channel = Channel(transport.start("qubes.Backup", vm))
        self.channel.send(FrameType.LOCATION, name, location.encode())

    def _agent_failed(self, what: str) -> BackupError:
        reply = None
        try:
            reply = self.channel.recv({FrameType.ERROR: (0, MAX_ERROR_LEN)})
        except Exception:
            reply = None
        reason = safe_text(reply.data) if reply is not None else "no reason given"
        return BackupError(f"backup VM {self.vm} {what}: {reason}")

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            for start in range(0, len(view), MAX_DATA_FRAME):
                self.channel.send(FrameType.DATA, "", view[start : start + MAX_DATA_FRAME])
        except (BrokenPipeError, ConnectionResetError):
            raise self._agent_failed("stopped receiving the backup") from None

    def commit(self) -> str:
        try:
            self.channel.send(FrameType.COMMIT)
            self.channel.close_input()
        except (BrokenPipeError, ConnectionResetError):
            raise self._agent_failed("failed before the backup was complete") from None
        reply = self.channel.recv(
            {FrameType.DONE: (0, MAX_LOCATION_LEN + 256), FrameType.ERROR: (0, MAX_ERROR_LEN)}
        )
        code = self.channel.wait()
        if reply is None or reply.type != FrameType.DONE or code != 0:
            reason = safe_text(reply.data) if reply is not None else "no answer"
            raise BackupError(f"backup VM {self.vm} could not store the backup: {reason}")
        return f"{self.vm}:{safe_text(reply.data)}"

    def abort(self) -> None:
        """End the stream without COMMIT and give the agent a moment to remove its partial file: killing it
        at once (as Channel.abort does) races its clean-up and leaves ``.qubes-backup-*.partial`` behind."""
        with contextlib.suppress(Exception):
            self.channel.close_input()
            self.channel.wait(timeout=ABORT_GRACE)
        self.channel.abort()
