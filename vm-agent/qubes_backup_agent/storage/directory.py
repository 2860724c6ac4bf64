"""Backups as files in a directory of the VM: written under a temporary name, renamed only when complete."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import BinaryIO

from .. import confine
from . import StorageError


def describe_oserror(exc: OSError, action: str, where: str) -> str:
    """One line such as ``No space left on device writing /home/user/backups/x``."""
    reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "") or type(exc).__name__
    return f"{reason} {action} {where}"


WRITEBACK_WINDOW = 64 << 20


class DirectorySink:
    """Writes DIR/.NAME.partial-RANDOM, fsyncs, then renames it to DIR/NAME on commit.

    The temporary name never starts with ``qubes-backup-``, so an interrupted backup never looks finished.
    """

    def __init__(self, directory: Path, name: str, root: Path) -> None:
        self.directory = directory
        self.name = name
        self.root = root
        self.final = directory / name
        self.tmp = directory / f".{name}.partial-{secrets.token_hex(6)}"
        self.final_view = confine.vm_view(self.final, root)
        if self.final.exists() or self.final.is_symlink():
            raise StorageError(f"backup already exists: {self.final_view}")
        try:
            self.fd: int | None = os.open(
                self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            where = confine.vm_view(directory, root)
            raise StorageError(describe_oserror(exc, "creating a file in", where)) from None
        self.created = True
        self._written = 0
        self._flushed = 0
        self._splice = hasattr(os, "splice")

    def write(self, data: bytes | memoryview) -> None:
        assert self.fd is not None
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
                self._written += written
            self._writeback()
        except OSError as exc:
            raise StorageError(describe_oserror(exc, "writing", self.final_view)) from None

    def splice_from(self, src: int, n: int) -> int:
        """Move ``n`` bytes from the pipe ``src`` into the file with splice(2) (no copy through this
        process); fewer only at the end of ``src``.  Falls back to read/write where splice is refused."""
        assert self.fd is not None
        moved = 0
        try:
            while moved < n:
                try:
                    got = os.splice(src, self.fd, n - moved) if self._splice else 0
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    self._splice = False
                    continue
                if not self._splice:
                    piece = os.read(src, min(n - moved, 1 << 20))
                    if not piece:
                        break
                    self.write(piece)
                    moved += len(piece)
                    continue
                if not got:
                    break
                moved += got
                self._written += got
            self._writeback()
        except OSError as exc:
            raise StorageError(describe_oserror(exc, "writing", self.final_view)) from None
        return moved

    def _writeback(self) -> None:
        if self._written - self._flushed >= WRITEBACK_WINDOW:
            # Start writing back what we have so far instead of letting GiBs of dirty pages pile up for the
            # final fsync: the disk works while dom0 is still compressing and encrypting.
            assert self.fd is not None
            os.posix_fadvise(self.fd, self._flushed, self._written - self._flushed, os.POSIX_FADV_DONTNEED)
            self._flushed = self._written

    def commit(self) -> str:
        assert self.fd is not None
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            # link + unlink instead of rename: fails if a file of that name appeared meanwhile (never replaces).
            # Filesystems without hard links (vfat/exfat USB sticks) fall back to check-then-rename.
            try:
                os.link(self.tmp, self.final, follow_symlinks=False)
            except FileExistsError:
                raise StorageError(f"backup already exists: {self.final_view}") from None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                    raise
                if self.final.exists() or self.final.is_symlink():
                    raise StorageError(f"backup already exists: {self.final_view}") from None
                os.rename(self.tmp, self.final)
            else:
                os.unlink(self.tmp)
            self.created = False
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StorageError(describe_oserror(exc, "finishing", self.final_view)) from None
        return self.final_view

    def abort(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        if self.created:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.created = False


def open_file(path: Path, root: Path) -> BinaryIO:
    """Open a stored backup for reading (seekable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise StorageError(describe_oserror(exc, "opening", confine.vm_view(path, root))) from None
    return os.fdopen(fd, "rb", buffering=1 << 16)
