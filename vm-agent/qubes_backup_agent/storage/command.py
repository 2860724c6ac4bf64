"""Hook commands (ssh, rclone, a NAS script, ...): argv from shlex, run without a shell, never ``eval``."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from . import StorageError

DRAIN_LIMIT = 16 << 20  # bytes of trailing output read after the tar's end before giving up


def _spawn(argv: Sequence[str], cwd: Path, env: dict[str, str], *, reading: bool) -> subprocess.Popen[bytes]:
    # The agent's stdout carries frames: a hook's own stdout (backup) goes to our stderr instead.
    try:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL if reading else subprocess.PIPE,
            stdout=subprocess.PIPE if reading else 2,
            cwd=cwd,
            env=env,
            shell=False,
        )
    except FileNotFoundError:
        raise StorageError(f"command not found: {argv[0]}") from None
    except PermissionError:
        raise StorageError(f"command not executable: {argv[0]}") from None
    except OSError as exc:
        raise StorageError(f"cannot run {argv[0]}: {exc.strerror}") from None


def describe(argv: Sequence[str]) -> str:
    return " ".join(argv)


class CommandSink:
    """Feeds the backup stream into a hook's stdin; success means: COMMIT seen, stdin closed, exit 0."""

    def __init__(self, argv: Sequence[str], cwd: Path, name: str) -> None:
        self.argv = list(argv)
        env = dict(os.environ)
        env["QUBES_BACKUP_NAME"] = name
        self.proc = _spawn(self.argv, cwd, env, reading=False)

    def _failed(self) -> StorageError:
        rc = self.proc.wait()
        return StorageError(f"command exited early with status {rc}: {self.argv[0]}")

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
        except (BrokenPipeError, ConnectionResetError):
            raise self._failed() from None

    def commit(self) -> str:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            raise self._failed() from None
        rc = self.proc.wait()
        if rc != 0:
            raise StorageError(f"command failed with exit status {rc}: {self.argv[0]}")
        return describe(self.argv)

    def abort(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait()


class CommandSource:
    """A hook whose stdout is the backup (a stream: no seeking)."""

    def __init__(self, argv: Sequence[str], cwd: Path) -> None:
        self.argv = list(argv)
        self.proc = _spawn(self.argv, cwd, dict(os.environ), reading=True)
        assert self.proc.stdout is not None
        self.stdout: BinaryIO = self.proc.stdout  # type: ignore[assignment]  # Popen's pipe is binary

    def finish(self) -> None:
        """Drain what follows the tar's end (bounded), then require exit status 0."""
        drained = 0
        while drained < DRAIN_LIMIT:
            piece = self.stdout.read(1 << 16)
            if not piece:
                break
            drained += len(piece)
        else:
            self.proc.kill()
        self.stdout.close()
        rc = self.proc.wait()
        if rc != 0:
            raise StorageError(f"command failed with exit status {rc}: {self.argv[0]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(OSError):
            self.stdout.close()
        self.proc.wait()
