"""Where a backup goes: a directory in dom0, or the qubes.Backup service of a VM.

Either way a backup is complete only when the whole stream arrived and was synced: before that it lives
under a temporary name that does not look like a backup (``.qubes-backup-…partial``), and any failure
removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from qubes_backup_protocol.frames import (
    HEADER_SIZE,
    MAX_DATA_FRAME,
    MAX_ERROR_LEN,
    MAX_LOCATION_LEN,
    FrameType,
    ProtocolError,
    safe_text,
)

from qubes_backup_dom0.errors import BackupError, UsageError
from qubes_backup_dom0.format import naming
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.qubes.transport import Channel, QubesOwnService, Transport
from qubes_backup_dom0.text import printable

ABORT_GRACE = 3.0  # seconds an agent gets to clean up after an aborted backup before it is stopped
TERM_GRACE = 1.0  # then seconds between SIGTERM and SIGKILL
COALESCE = 64 << 10  # writes smaller than this are gathered and sent with the next (docs/SECURITY.md sec. 5)
MAX_DONE_LEN = MAX_LOCATION_LEN + 256  # the agent's DONE text (checked, never shown as the result)


LAST_INSTANT = "/var/lib/qubes-backup/last-backup-time"  # seconds since the epoch of this dom0's last backup


def backup_instant(system: System) -> datetime:
    """The instant a new backup is named after (whole seconds, UTC): now, or one second after the previous
    backup this dom0 started if that one had the same second.  Names resolve to the second, so two backups
    started in the same second (a script backing up VMs one after another) would otherwise get the same name
    and the second would fail with "already exists".  The record is a best effort: without it, now."""
    now = int(time.time())
    path = system.dom0_path(LAST_INSTANT)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return datetime.fromtimestamp(now, UTC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # two backups started at once get different instants too
        raw = os.pread(fd, 32, 0)
        last = int(raw) if raw.strip().isdigit() else 0
        if now <= last < now + 60:  # a record far in the future (a clock set back) is ignored
            now = last + 1
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % now, 0)
    except OSError:
        pass
    finally:
        os.close(fd)
    return datetime.fromtimestamp(now, UTC)


def backup_file_name(now: datetime | None = None) -> str:
    """``qubes-backup-YYYY-MM-DDTHHMMSS`` in UTC: the same instant as the header's ``created``."""
    return naming.file_name(now)


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
        self.sent = 0  # bytes of the backup stream written

    def write(self, data: bytes | memoryview) -> None:
        self.sent += len(data)
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
    """The qubes.Backup service of a VM.  The agent stores the stream; dom0 chose the name and states the
    result itself (``commit``): the agent's DONE text is only checked, never shown as the result.

    Small writes (tar headers, MACs, padding) are gathered and sent with the next large one, so that a
    chunk's whole member travels under one deadline (stall timeout + its size at ``transport.MIN_RATE``):
    a backup VM that reads slowly is cut off after a bounded time per chunk (docs/SECURITY.md section 5).
    """

    def __init__(self, transport: Transport, vm: str, location: str, name: str) -> None:
        check_location(location)
        self.vm = vm
        self.location = location
        self.name = name
        self.sent = 0  # bytes of the backup stream handed to the agent
        self._pending = bytearray()
        self.channel = Channel(transport.start("qubes.Backup", vm), vm=f"backup VM {vm}", qube=vm)
        self.channel.send(FrameType.LOCATION, name, location.encode())

    def _agent_failed(self, what: str) -> BackupError:
        reply = None
        try:
            reply = self.channel.recv({FrameType.ERROR: (0, MAX_ERROR_LEN)})
        except QubesOwnService:
            raise  # not our agent at all: say so, and how to install it
        except Exception:
            reply = None
        reason = safe_text(reply.data) if reply is not None else "no reason given"
        return BackupError(f"backup VM {self.vm} {what}: {reason}")

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.sent += len(view)
        if len(view) < COALESCE:
            self._pending += view
            if len(self._pending) >= COALESCE:
                self._flush()
            return
        self._send((bytes(self._pending), view))
        self._pending.clear()

    def _flush(self) -> None:
        if self._pending:
            self._send((bytes(self._pending),))
            self._pending.clear()

    def _send(self, parts: tuple[bytes | memoryview, ...]) -> None:
        """``parts`` (one logical write) as DATA frames of at most MAX_DATA_FRAME, all under one deadline."""
        total = sum(len(p) for p in parts)
        nframes = -(-total // MAX_DATA_FRAME)
        deadline = self.channel.send_deadline(total + nframes * HEADER_SIZE)
        frame: list[bytes | memoryview] = []
        room = MAX_DATA_FRAME
        try:
            for part in parts:
                view = memoryview(part)
                while len(view):
                    take = view[:room]
                    frame.append(take)
                    room -= len(take)
                    view = view[len(take) :]
                    if room == 0:
                        self.channel.send_parts(FrameType.DATA, "", tuple(frame), deadline)
                        frame, room = [], MAX_DATA_FRAME
            if frame:
                self.channel.send_parts(FrameType.DATA, "", tuple(frame), deadline)
        except (BrokenPipeError, ConnectionResetError):
            raise self._agent_failed("stopped receiving the backup") from None

    def interrupt(self) -> None:
        """Stop a write in progress in another thread at once (SIGTERM, Ctrl-C, cancel)."""
        self.channel.interrupt()

    def commit(self) -> str:
        try:
            self._flush()
            self.channel.send(FrameType.COMMIT)
            self.channel.close_input()
        except (BrokenPipeError, ConnectionResetError):
            raise self._agent_failed("failed before the backup was complete") from None
        try:
            reply = self.channel.recv({FrameType.DONE: (0, MAX_DONE_LEN), FrameType.ERROR: (0, MAX_ERROR_LEN)})
        except ProtocolError as exc:
            raise BackupError(f"backup VM {self.vm} gave a malformed answer at the end of the backup: {exc}") from None
        if reply is None:
            raise BackupError(f"backup VM {self.vm} could not store the backup: no answer")
        if reply.type == FrameType.ERROR:
            raise BackupError(f"backup VM {self.vm} could not store the backup: {safe_text(reply.data)}")
        code = self.channel.wait()
        if code != 0:
            raise BackupError(f"backup VM {self.vm} could not store the backup: its service exited with status {code}")
        return self._result(reply.data)

    def _result(self, done: bytes | memoryview) -> str:
        """Where the backup is, in dom0's words, once the agent's DONE text confirmed the name dom0 chose.

        An honest agent answers the final path (a directory: ``.../NAME``; S3: ``s3://bucket/prefix/NAME``)
        or, for a hook command, the command line it ran.  Anything else is refused: the backup VM is
        untrusted, and what it says is never printed as the result.
        """
        try:
            text = bytes(done).decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None and text.rsplit("/", 1)[-1] == self.name:
            return f"{self.vm}:{self.location.rstrip('/')}/{self.name}"
        if text is not None and text == _command_line(self.location):
            return f"{self.vm}, command {printable(self.location)}, as {self.name}"
        shown = safe_text(done, limit=80)
        raise BackupError(
            f"backup VM {self.vm} did not confirm the backup dom0 sent ({self.name}); it answered: {shown}"
        )

    def abort(self) -> None:
        """End the stream without COMMIT and give the agent a moment to remove its partial file: killing it
        at once (as Channel.abort does) races its clean-up and leaves ``.qubes-backup-*.partial`` behind.

        A backup VM that does not get to the end of its input within ABORT_GRACE (one that reads slowly has
        up to a pipe buffer left) is asked to stop (SIGTERM), then killed: an interrupted backup ends
        within a few seconds, and whatever the agent leaves is never named like a backup.
        """
        with contextlib.suppress(Exception):
            self.channel.close_input()
        with contextlib.suppress(Exception):
            self.channel.wait(timeout=ABORT_GRACE)
        if self.channel.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.channel.proc.terminate()
            with contextlib.suppress(Exception):
                self.channel.wait(timeout=TERM_GRACE)
        self.channel.abort()


def check_location(location: str) -> None:
    """A location sent to a backup VM: UTF-8 text, bounded, one line (else a usage error, exit 2)."""
    try:
        raw = location.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("the location is not valid UTF-8 text") from None
    if len(raw) > MAX_LOCATION_LEN or "\n" in location or "\0" in location:
        raise UsageError("backup location is too long or contains a newline")


def _command_line(location: str) -> str | None:
    """What an honest agent answers for a hook command: its argv joined by spaces (agent storage.command)."""
    try:
        return " ".join(shlex.split(location))
    except ValueError:
        return None
