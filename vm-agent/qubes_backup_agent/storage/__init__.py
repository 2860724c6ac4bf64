"""Where a backup stream goes to or comes from: a directory, a hook command, S3 or ssh.

``classify`` decides which, from the location string alone, without a shell.
"""

from __future__ import annotations

import io
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from .. import confine


class StorageError(Exception):
    """A one-line, user-facing storage failure (sent to dom0 as an ERROR frame)."""


class SeekableReader(io.RawIOBase):
    """A read-only file whose reads are ranged requests (S3, ssh): ``pos`` and ``size`` kept here; a
    subclass sets ``size`` and implements ``readinto`` at ``pos``."""

    pos = 0
    size = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self.pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise OSError("negative seek position")
        self.pos = pos
        return pos


class Sink(Protocol):
    """Receives a backup stream; nothing named like a finished backup exists before ``commit``."""

    def write(self, data: bytes) -> None: ...

    def commit(self) -> str:
        """Finish the backup; returns where it is stored (as seen inside the VM)."""
        ...

    def abort(self) -> None:
        """Undo everything; must not raise."""
        ...


@dataclass(frozen=True)
class Location:
    kind: Literal["path", "command", "s3", "ssh"]
    path: Path | None = None
    argv: tuple[str, ...] = ()
    url: str = ""


def _looks_like_path(token: str) -> bool:
    return token.startswith(("/", "./", "../", "~")) or "/" in token


def classify(location: str, root: Path, want_dir: bool) -> Location:
    """Directory/file path, S3 or ssh URL, or command.  ``want_dir``: backup (a directory) vs restore (a file).

    A single token that resolves to an existing directory (backup) or file (restore) is a path; a single
    token that looks like a path but does not exist is an error; everything else is a command line.
    """
    if location.startswith("s3://"):
        return Location("s3", url=location)
    if location.startswith("ssh://"):
        return Location("ssh", url=location)
    try:
        argv = shlex.split(location)
    except ValueError as exc:
        raise StorageError(f"cannot parse location ({exc}): {location}") from None
    if not argv:
        raise StorageError("empty location")
    if len(argv) == 1:
        token = argv[0]
        try:
            path = confine.resolve(token, root)
        except confine.ConfinementError as exc:
            raise StorageError(str(exc)) from None
        if want_dir and path.is_dir():
            return Location("path", path=path)
        if not want_dir and path.is_file():
            return Location("path", path=path)
        if not want_dir and path.exists():
            raise StorageError(f"not a regular file: {location}")
        if _looks_like_path(token) and not path.exists():
            raise StorageError(f"location does not exist: {location}")
    return Location("command", argv=tuple(argv))
