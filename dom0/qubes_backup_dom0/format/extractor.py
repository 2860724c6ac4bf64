"""Where inner-archive entries go on restore: files under a restore area (confined: directory fds, O_NOFOLLOW,
O_EXCL), file sinks (volume imports, memory buffers) chosen per entry, or nowhere (validate-only mode).

:class:`Extractor` is the strict reader of tarread.py driving a :class:`_Filesystem` destination.
Extracted modes are ``mode & 0o777`` (set-id and sticky bits are dropped: defence in depth); mtimes are
restored; ownership is never changed.  Directory modes/mtimes are applied in ``finish()`` so that read-only
directories can still be filled.  Parents that are not entries are created 0o755.

Validate-only mode (``Extractor(None, expected)``, used by ``qvm-backup-restore --verify-only``): the same
parser with the same checks and the same errors, but the filesystem is never touched (nothing opened,
created, written, chmod-ed or utime-d); entry data is consumed and dropped.  Checks that depend on what
already exists in a destination do not apply; the lexical ones (tarread.py) do.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.format.tarread import InnerReader, Refused

WRITEBACK_BYTES = 64 << 20  # start writeback of restored data every 64 MiB (_Filesystem._start_writeback)


class FileSink(Protocol):
    """Where a file entry's bytes go instead of a file under ``dest_root`` (e.g. a volume import).  Data
    comes in ascending, non-overlapping pieces; ``finish(size)`` ends the entry (the rest is a hole)."""

    def write_at(self, offset: int, data: memoryview) -> None: ...

    def finish(self, size: int) -> None: ...

    def abort(self) -> None: ...


SinkChooser = Callable[[Any], "FileSink | None"]


class Extractor:
    """Strict, bounded extraction of one inner archive into ``dest_root`` (or, if it is None, only
    validating: same checks and errors, nothing on disk is opened or written).  File entries for which
    ``sinks`` returns a sink are streamed there instead.  Any violation of the format raises
    :class:`VerificationError` (one line); I/O failures raise :class:`BackupError`."""

    def __init__(
        self,
        dest_root: Path | None,
        expected: Sequence[Any],
        *,
        max_entry_header: int = 64 * 1024,
        sinks: SinkChooser | None = None,
    ) -> None:
        self._dest = _Filesystem(sinks)
        self._reader = InnerReader(expected, self._dest, max_entry_header=max_entry_header)
        if dest_root is not None:
            self._dest.open_root(dest_root)

    @property
    def data_done(self) -> int:
        """Entry data bytes written (or validated) so far: what progress counts."""
        return self._reader.data_done

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Consume the next piece of the archive (any size)."""
        self._reader.feed(data)

    def finish(self) -> None:
        """Check the archive ended cleanly, apply directory modes/mtimes, release fds."""
        self._reader.finish()

    def close(self) -> None:
        """Release file descriptors after an error or when giving up (idempotent)."""
        self._reader.close()

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Filesystem:
    """The destination: confined to the directory fd of the restore area; without one, validate-only."""

    def __init__(self, sinks: SinkChooser | None) -> None:
        self._sinks = sinks
        self._sink: FileSink | None = None
        self._root_fd = -1
        self._fd = -1
        self._path = ""
        self._dirs: list[tuple[str, int, int]] = []
        # early writeback: the range of the current file written since the last hint, and how much
        self._wb_lo = self._wb_hi = self._wb_bytes = 0

    def open_root(self, dest_root: Path) -> None:
        try:
            self._root_fd = os.open(dest_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise BackupError(f"cannot open restore area {dest_root}: {e.strerror}") from e

    # ---- Destination

    def open_file(self, entry: Any) -> None:
        self._path = entry.path
        if self._sinks is not None:
            self._sink = self._sinks(entry)
            if self._sink is not None:
                return
        if self._root_fd < 0:
            return
        pfd, base = self._parent(entry.path)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            self._fd = os.open(base, flags, 0o600, dir_fd=pfd)
        except FileExistsError:
            raise Refused("already exists in the restore area") from None
        except OSError as e:
            raise BackupError(f"cannot create {entry.path}: {e.strerror}") from e
        finally:
            os.close(pfd)

    def write_at(self, offset: int, data: memoryview) -> None:
        if self._sink is not None:
            self._sink.write_at(offset, data)
            return
        if self._fd < 0:
            return
        piece = data
        pos = start = offset
        try:
            while len(piece):
                w = os.pwrite(self._fd, piece, pos)
                piece = piece[w:]
                pos += w
        except OSError as e:
            raise BackupError(f"cannot write {self._path}: {e.strerror}") from e
        if not self._wb_bytes:
            self._wb_lo, self._wb_hi = start, pos
        else:
            self._wb_lo, self._wb_hi = min(self._wb_lo, start), max(self._wb_hi, pos)
        self._wb_bytes += len(data)
        if self._wb_bytes >= WRITEBACK_BYTES:
            self._start_writeback()

    def end_file(self, entry: Any, mode: int, mtime: int) -> None:
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.finish(entry.size)
            return
        if self._fd < 0:
            return
        self._start_writeback()
        try:
            os.ftruncate(self._fd, entry.size)
            os.fchmod(self._fd, mode & 0o777)
            os.utime(self._fd, (mtime, mtime))
        except OSError as e:
            raise BackupError(f"cannot write {entry.path}: {e.strerror}") from e
        finally:
            os.close(self._fd)
            self._fd = -1

    def make_dir(self, path: str, mode: int, mtime: int) -> None:
        if self._root_fd < 0:
            return
        pfd, base = self._parent(path)
        try:
            try:
                os.mkdir(base, 0o700, dir_fd=pfd)
            except FileExistsError:
                try:
                    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                except OSError:
                    raise Refused("exists in the restore area and is not a directory") from None
                os.close(fd)
            except OSError as e:
                raise BackupError(f"cannot create directory {path}: {e.strerror}") from e
        finally:
            os.close(pfd)
        self._dirs.append((path, mode, mtime))

    def make_symlink(self, path: str, target: str, mtime: int) -> None:
        if self._root_fd < 0:
            return
        pfd, base = self._parent(path)
        try:
            os.symlink(target, base, dir_fd=pfd)
            os.utime(base, (mtime, mtime), dir_fd=pfd, follow_symlinks=False)
        except FileExistsError:
            raise Refused("already exists in the restore area") from None
        except OSError as e:
            raise BackupError(f"cannot create symlink {path}: {e.strerror}") from e
        finally:
            os.close(pfd)

    def finish(self) -> None:
        for path, mode, mtime in reversed(self._dirs):  # empty in validate-only mode
            fd = self._walk(path, create=False)
            try:
                os.utime(fd, (mtime, mtime))
                os.fchmod(fd, mode & 0o777)
            finally:
                os.close(fd)

    def close(self) -> None:
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.abort()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    # ---- confined to the restore area

    def _start_writeback(self) -> None:
        """Ask the kernel to start writing back what was just written (POSIX_FADV_DONTNEED starts
        asynchronous writeback of dirty pages without waiting for it), so that the restore's later fsync
        finds most of the data on disk already; restored images are not read back.  Best effort."""
        if self._wb_bytes and self._fd >= 0 and hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd, self._wb_lo, self._wb_hi - self._wb_lo, os.POSIX_FADV_DONTNEED)
        self._wb_bytes = 0

    def _walk(self, path: str, create: bool) -> int:
        """An fd for directory ``path`` under dest_root, creating missing components if ``create``.
        Symlinked components are refused (O_NOFOLLOW on every step; no path string is ever resolved)."""
        fd = os.dup(self._root_fd)
        try:
            for part in path.split("/") if path else []:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST):
                raise Refused(f"path component of {path!r} is a symlink or not a directory") from None
            raise BackupError(f"cannot create directory {path}: {e.strerror}") from e
        return fd

    def _parent(self, path: str) -> tuple[int, str]:
        d, _, b = path.rpartition("/")
        return self._walk(d, create=True), b
