"""Hand a request in Qubes' own backup protocol over to Qubes' own qubes.Backup / qubes.Restore.

Installed, our services shadow Qubes' (package qubes-backup-agent: links in /run/qubes-rpc, where R4.3's qrexec
looks first, and R4.2's through /etc/profile.d/qubes-backup-agent.sh; `make install-vm`: /usr/local/etc/qubes-rpc;
Qubes' own are /etc/qubes-rpc/qubes.Backup and qubes.Restore of qubes-core-agent in both releases), so every call
of qubes.Backup / qubes.Restore in that VM reaches us, also the ones from Qubes' own tools:

- Qubes' backup (qubesd, qubes/backup.py) writes the location as one line of text, then the tar stream;
- Qubes' qvm-backup-restore (qubesadmin/backup/restore.py) writes the location line, then the file list line.

Ours always begin with a LOCATION frame, whose first four bytes are fixed: ``QB``, version 1, type 1
(docs/PROTOCOL.md).  We read stdin one byte at a time only until a byte differs from that prefix, so never
more than four bytes, and never a byte Qubes' client would not send anyway (its line ends in ``\\n``, which
is not in the prefix).  Then either our service goes on (the bytes already read are given back to it), or
Qubes' own service is exec'd in this process with those bytes replayed on its stdin: a forwarder child
writes them into a pipe, then copies the rest of our stdin after them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import signal
import sys
from typing import BinaryIO

from qubes_backup_protocol import frames

OUR_PREFIX = frames.MAGIC + bytes([frames.VERSION, frames.FrameType.LOCATION])
QUBES_RPC_DIR = "/etc/qubes-rpc"  # where Qubes' packages (qubes-core-agent) install their services
ENV_QUBES_RPC_DIR = "QUBES_AGENT_QUBES_RPC_DIR"  # override, for tests
COPY_PIECE = 1 << 20
EXIT_FAILED = 1


def read_prefix(fd: int = 0) -> bytes:
    """Read from ``fd`` until the bytes stop matching OUR_PREFIX, it is complete, or the stream ends."""
    got = b""
    while len(got) < len(OUR_PREFIX):
        byte = os.read(fd, 1)
        if not byte:
            break
        got += byte
        if not OUR_PREFIX.startswith(got):
            break
    return got


def is_qubes_request(prefix: bytes) -> bool:
    """A byte differs from our frame prefix: not ours.  (An empty or cut-short prefix stays ours: our
    service reports the truncated request.)"""
    return bool(prefix) and not OUR_PREFIX.startswith(prefix)


class _Replayed(io.RawIOBase):
    """``prefix`` first, then the rest of ``fd`` (read straight into the caller's buffer)."""

    def __init__(self, prefix: bytes, fd: int) -> None:
        super().__init__()
        self._prefix = prefix
        self._fd = fd

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        view = memoryview(buf).cast("B")
        if self._prefix:
            n = min(len(view), len(self._prefix))
            view[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return os.readv(self._fd, [view])

    def spliceable_fd(self) -> int | None:
        """The descriptor to splice(2) the rest from, once the replayed prefix is used up (else None)."""
        return None if self._prefix else self._fd


def stdin_for(service: str, entry_point: str) -> BinaryIO:
    """Our request: a binary stdin carrying it whole.  Qubes' request: exec Qubes' ``service`` (no return)."""
    prefix = read_prefix(0)
    if is_qubes_request(prefix):
        hand_over(service, prefix, entry_point)
    return io.BufferedReader(_Replayed(prefix, 0), buffer_size=1 << 16)  # type: ignore[return-value]


def qubes_service(service: str) -> str:
    return os.path.join(os.environ.get(ENV_QUBES_RPC_DIR) or QUBES_RPC_DIR, service)


def _fail(message: str) -> None:
    print(f"qubes-backup-agent: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_FAILED)


def hand_over(service: str, prefix: bytes, entry_point: str) -> None:
    """Exec Qubes' own ``service`` with ``prefix`` + the rest of stdin on its stdin; does not return."""
    target = qubes_service(service)
    ours = {os.path.realpath(p) for p in (sys.argv[0], entry_point) if p}
    if not os.access(target, os.X_OK) or os.path.isdir(target):
        _fail(f"a request in Qubes' own {service} protocol, but Qubes' own {target} is not installed")
    if os.path.realpath(target) in ours:
        _fail(f"a request in Qubes' own {service} protocol, but {target} is this service, not Qubes' own")
    read_end, write_end = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the forwarder: prefix, then the rest of our stdin, into the pipe
        code = 0
        try:
            os.close(read_end)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 1)  # must not keep the caller's stdout open: Qubes' service's EOF is its EOF
            os.dup2(devnull, 2)
            _die_with(parent)
            _write_all(write_end, prefix)
            _copy(0, write_end)
        except OSError:  # Qubes' service stopped reading: nothing left to do
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    os.dup2(read_end, 0)
    os.close(read_end)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # Python ignores it; an exec'd shell script must not
    try:
        os.execv(target, [target, *sys.argv[1:]])
    except OSError as exc:
        _fail(f"cannot run Qubes' own {target}: {exc.strerror or exc}")


def _die_with(parent: int) -> None:
    """Best effort: the forwarder ends when the service it feeds ends (Linux PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:
        os._exit(0)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy(src: int, dst: int) -> None:
    """Copy until EOF; splice(2) (no copy through user space) when the kernel allows it for ``src``."""
    splice = getattr(os, "splice", None)
    while splice is not None:
        try:
            if not splice(src, dst, COPY_PIECE):
                return
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):  # not spliceable: copy by hand
                raise
            break
    while True:
        piece = os.read(src, COPY_PIECE)
        if not piece:
            return
        _write_all(dst, piece)
