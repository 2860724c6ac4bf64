"""Talking to a VM's qubes.Backup / qubes.Restore service: start it, then exchange frames over its pipes.

``SimTransport`` runs the agent's real entry point (rpc-policy/qubes.*) as a separate process on this
machine, inside bubblewrap when available (no network, nothing of dom0's files visible), so the
simulation exercises the same trust boundary as Qubes.  ``QrexecTransport`` uses ``qvm-run --service``.

``Channel`` is what dom0 code talks through: bounded frame reads (frames.read_frame) over a poll()-based
reader with a stall timeout, so a hostile or dead VM cannot hang dom0; the agent's stderr is kept as a
bounded tail for error messages.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from qubes_backup_protocol import frames
from qubes_backup_protocol.frames import Frame, FrameType, NameCheck, safe_text

from qubes_backup_dom0.errors import BackupError, Cancelled, UsageError
from qubes_backup_dom0.qubes.system import System

PIPE_SIZE = 1 << 20
DEFAULT_TIMEOUT = 300.0
STDERR_TAIL = 4096
READ_PIECE = 1 << 20
# A small read (a frame's header and name) takes at least this much from the pipe: the frames that follow,
# or the start of this one's data (copied once more from the buffer; reading 64 KiB here would copy 64 KiB
# of every 256 KiB repository object twice more, on the thread that receives)
SMALL_READ = 4096
MIN_RATE = 256 << 10  # bytes/s: a frame (either direction) gets the stall timeout plus its size at this rate
MAX_TIMEOUT = 86400.0  # QUBES_BACKUP_TIMEOUT above one day is refused (and inf, nan, 0, negative)
SANDBOX_RO_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc")
# The first line Qubes' own services (qubes-core-agent, /etc/qubes-rpc) write, before they read anything: a VM whose
# template lacks qubes-backup-agent answers with them.  qubes.Backup writes it on stdout, qubes.Restore on stderr
# (where a login shell or qrexec may have written something before it: a line within the first GREETING_HEAD bytes).
QUBES_GREETINGS = {b"Starting Backupcopy": "qubes.Backup", b"Starting Restorecopy": "qubes.Restore"}
GREETING_HEAD = 1024
# Environment variables passed to a simulated agent: nothing of dom0's environment beyond these.
PASS_ENV = ("PATH", "LANG", "LC_ALL", "TZ")
PASS_ENV_PREFIXES = ("AWS_", "QUBES_AGENT_")
# The source trees a simulated VM's service sees (read-only), as a template would have them installed: the agent
# package; the paranoid restore's DisposableVM service also the dom0 package's parsing code (docs/INSTALL.md).
AGENT_PACKAGES = ("protocol", "vm-agent")
SERVICE_PACKAGES = {"qubes.RestoreParanoid": ("protocol", "vm-agent", "dom0")}


class Transport(Protocol):
    """Starts a qrexec service in a VM; the returned process has binary stdin/stdout/stderr pipes."""

    confined: bool

    def start(self, service: str, vm: str) -> subprocess.Popen[bytes]: ...


def repo_dir() -> Path:
    """The source tree this package was loaded from (dom0/qubes_backup_dom0/qubes/transport.py -> repo)."""
    return Path(__file__).resolve().parents[3]


def rpc_dir() -> Path:
    override = os.environ.get("QUBES_BACKUP_RPC_DIR")
    return Path(override) if override else repo_dir() / "rpc-policy"


def _enlarge_pipes(proc: subprocess.Popen[bytes]) -> None:
    """Fewer wake-ups per MiB; best effort (the limit in /proc/sys/fs/pipe-max-size may refuse it)."""
    setsz = getattr(fcntl, "F_SETPIPE_SZ", 1031)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is None:
            continue
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe.fileno(), setsz, PIPE_SIZE)


def _popen(argv: list[str], env: dict[str, str] | None, cwd: Path | None) -> subprocess.Popen[bytes]:
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            env=env,
            cwd=cwd,
            start_new_session=True,  # a Ctrl-C in dom0's terminal is handled by dom0, not the agent
        )
    except OSError as exc:
        raise BackupError(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
    _enlarge_pipes(proc)
    return proc


class SimTransport:
    """Runs the agent as a separate process with QUBES_AGENT_ROOT = the simulated VM's root."""

    def __init__(self, system: System, rpc: Path | None = None, sandbox: bool | None = None) -> None:
        if system.sim_dir is None:
            raise BackupError("SimTransport needs a simulated system (QUBES_SIM)")
        self.system = system
        self.rpc = rpc or rpc_dir()
        # Services a simulated VM offers besides the agent's (qubes.BackupPassphrase): the simulation's endpoint.
        vm_rpc = system.vm_rpc_dir
        self.vm_rpc: Path | None = vm_rpc if vm_rpc is not None and vm_rpc.is_dir() else None
        self.bwrap = shutil.which("bwrap")
        if sandbox is None:
            sandbox = os.environ.get("QUBES_SIM_SANDBOX", "1") != "0"
        self.confined = bool(sandbox and self.bwrap)

    def agent_env(self, root: Path, packages: tuple[str, ...] = AGENT_PACKAGES) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k in PASS_ENV or k.startswith(PASS_ENV_PREFIXES)}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        repo = repo_dir()
        env["PYTHONPATH"] = os.pathsep.join(str(repo / d) for d in packages)
        env["QUBES_AGENT_ROOT"] = str(root)
        home = root / "home" / "user"
        env["HOME"] = str(home if home.is_dir() else root)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env

    def sandbox_argv(self, root: Path, writable: bool = True, packages: tuple[str, ...] = AGENT_PACKAGES) -> list[str]:
        """bubblewrap: system dirs and the Python/agent sources read-only, the VM root read-write, no net."""
        assert self.bwrap is not None
        # --die-with-parent: the sandboxed agent lives exactly as long as the process dom0 started, like a
        # qrexec service. (If dom0 itself is SIGKILLed, the agent's hidden .partial file may stay behind; it is
        # never named like a backup.)
        argv = [self.bwrap, "--unshare-all", "--die-with-parent", "--new-session"]
        for d in SANDBOX_RO_DIRS:
            if os.path.islink(d):
                argv += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                argv += ["--ro-bind", d, d]
        argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        repo = repo_dir()
        ro = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
        ro += [str(repo / d) for d in packages] + [str(self.rpc)]
        if self.vm_rpc is not None:
            ro.append(str(self.vm_rpc))
        ro.append(str(Path(sys.executable).resolve().parent))
        seen: set[str] = set()
        for path in ro:
            real = os.path.realpath(path)
            if real in seen or not os.path.exists(real) or real.startswith(SANDBOX_RO_DIRS):
                continue
            seen.add(real)
            argv += ["--ro-bind", real, real]
            if path != real and os.path.isabs(path) and path not in seen:
                seen.add(path)
                argv += ["--ro-bind", real, path]
        argv += ["--bind" if writable else "--ro-bind", str(root), str(root), "--chdir", str(root)]
        return [*argv, "--"]

    def start(self, service: str, vm: str) -> subprocess.Popen[bytes]:
        root = self.system.vm_root(vm)
        if not vm or "/" in vm or vm.startswith(".") or not root.is_dir():
            raise BackupError(f"no such VM: {vm} (the backup VM to run {service} in does not exist)")
        return self.launch(service, root.resolve(), writable=True)

    def launch(self, service: str, root: Path, writable: bool) -> subprocess.Popen[bytes]:
        """Run rpc-policy/SERVICE with ``root`` as the agent's filesystem root."""
        script, argument = self._script(service)
        argv = [sys.executable, str(script)]
        packages = SERVICE_PACKAGES.get(service.partition("+")[0], AGENT_PACKAGES)
        if self.confined:
            argv = self.sandbox_argv(root, writable, packages) + argv
        env = self.agent_env(root, packages)
        if argument:
            env["QREXEC_SERVICE_ARGUMENT"] = argument
        return _popen(argv, env, root)

    def _script(self, service: str) -> tuple[Path, str]:
        """As qrexec looks a service up: ``NAME+ARG`` first, then ``NAME`` (with the argument in
        QREXEC_SERVICE_ARGUMENT); in the agent's directory, then among the simulated VM's own services."""
        base, _, argument = service.partition("+")
        dirs = [self.rpc] + ([self.vm_rpc] if self.vm_rpc is not None else [])
        for directory in dirs:
            for name in dict.fromkeys((service, base)):
                if (directory / name).is_file():
                    return directory / name, argument
        raise BackupError(f"service {service} is not installed (looked in {self.rpc})")


class LocalFileTransport(SimTransport):
    """Restore from a backup file in dom0: the same agent, its root = the file's directory, read-only.

    The tar is parsed by the (confined, when bubblewrap exists) agent process, never by dom0 itself.
    """

    def __init__(self, directory: Path, rpc: Path | None = None, sandbox: bool | None = None) -> None:
        self.directory = Path(directory).resolve()
        self.rpc = rpc or rpc_dir()
        self.vm_rpc = None
        self.bwrap = shutil.which("bwrap")
        if sandbox is None:
            sandbox = os.environ.get("QUBES_SIM_SANDBOX", "1") != "0"
        self.confined = bool(sandbox and self.bwrap)

    def start(self, service: str, vm: str = "dom0") -> subprocess.Popen[bytes]:
        if not self.directory.is_dir():
            raise BackupError(f"no such directory: {self.directory}")
        return self.launch(service, self.directory, writable=False)


class QrexecTransport:
    """A real Qubes dom0: ``qvm-run --pass-io --no-gui --service -- VM SERVICE``.

    The VM side is confined by Qubes itself (it is a separate VM), hence ``confined`` is True.
    """

    confined = True

    def start(self, service: str, vm: str) -> subprocess.Popen[bytes]:
        qvm_run = shutil.which("qvm-run")
        if qvm_run is None:
            raise BackupError("qvm-run not found on PATH (needed to reach the backup VM)")
        return _popen([qvm_run, "--pass-io", "--no-gui", "--service", "--", vm, service], None, None)


def make_transport(system: System) -> Transport:
    return SimTransport(system) if system.simulated else QrexecTransport()


def stall_timeout() -> float:
    """``QUBES_BACKUP_TIMEOUT`` in seconds (default 300): a finite number in (0, 86400], else a usage error."""
    raw = os.environ.get("QUBES_BACKUP_TIMEOUT")
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (0 < value <= MAX_TIMEOUT):  # also false for nan
        shown = safe_text(raw, limit=40)
        raise UsageError(
            f"QUBES_BACKUP_TIMEOUT must be a number of seconds above 0 and at most {MAX_TIMEOUT:g}: {shown}"
        )
    return value


def frame_budget(timeout: float, frame_bytes: int) -> float:
    """Seconds one frame may take, in either direction, from the moment dom0 starts reading or writing it:
    the stall timeout plus the frame's (largest allowed) size at MIN_RATE."""
    return timeout + frame_bytes / MIN_RATE


class ChannelInterrupted(Cancelled):
    """``Channel.interrupt()`` was called (from another thread) while this one waited on the agent."""


class ChannelClosed(BackupError, BrokenPipeError):
    """The agent stopped reading (it failed or exited); ``recv`` may still deliver its ERROR frame.

    Also a BrokenPipeError, so callers written against plain pipes keep working.
    """


class QubesOwnService(BackupError):
    """Qubes' own qubes.Backup / qubes.Restore answered, not qubes-backup's agent (its greeting, at once)."""

    def __init__(self, qube: str, service: str) -> None:
        super().__init__(
            f"{qube} answered with Qubes' own {service} service, not qubes-backup's agent: install the "
            f"qubes-backup-agent package in the template of {qube}, then restart {qube} (docs/INSTALL.md)"
        )


class Channel:
    """Frames over a started service's pipes, with bounded reads and stall detection, no threads.

    Every wait (reading stdout, writing stdin, waiting for exit) polls stderr too, so an agent that writes
    a lot of diagnostics cannot deadlock us; only the last STDERR_TAIL bytes are kept.
    """

    def __init__(self, proc: subprocess.Popen[bytes], timeout: float | None = None, vm: str = "",
                 qube: str = "") -> None:  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.vm = vm or "backup VM"
        self.qube = qube or vm or "the backup VM"  # the VM's name, for the message of QubesOwnService
        # The first bytes the service wrote on stdout and stderr: Qubes' own services greet first (QUBES_GREETINGS).
        self._out_head = bytearray()
        self._err_head = bytearray()
        self.timeout = stall_timeout() if timeout is None else timeout
        self._in_fd: int | None = proc.stdin.fileno()
        self._out_fd: int | None = proc.stdout.fileno()
        self._err_fd: int | None = proc.stderr.fileno() if proc.stderr is not None else None
        for fd in (self._in_fd, self._out_fd, self._err_fd):
            if fd is not None:
                os.set_blocking(fd, False)
        self._buf = bytearray()
        self._frame_deadline: float | None = None  # when the frame being read must be complete
        self._too_slow = False
        self._writing = False  # what the last wait was for (the wording of a stall error)
        self._eof = False
        self._err = bytearray()
        # interrupt(): another thread wakes a wait at once through this pipe (a backup's SIGTERM, cancel()).
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._interrupted = False
        # set_deadline(): when the whole exchange must be over, whatever each frame's own budget says
        self._deadline: float | None = None
        self._deadline_seconds = 0.0
        self._past_deadline = False

    def set_deadline(self, seconds: float) -> None:
        """Every later wait on the agent fails once ``seconds`` from now have passed: an answer that must
        be short (a listing, a passphrase) cannot be dragged out frame by frame, byte by byte."""
        self._deadline_seconds = seconds
        self._deadline = time.monotonic() + seconds

    # -- waiting -------------------------------------------------------------------------------------
    def _stalled(self) -> BackupError:
        if self._past_deadline:
            return BackupError(f"{self.vm} did not finish answering within {self._deadline_seconds:g} s"
                               f"{self._tail_suffix()}")  # fmt: skip
        if self._too_slow:
            verb = "accepts the backup" if self._writing else "sends"
            return BackupError(
                f"{self.vm} {verb} too slowly (under {MIN_RATE >> 10} KiB/s for a whole frame){self._tail_suffix()}"
            )
        secs = f"{self.timeout:g}"
        return BackupError(f"{self.vm} did not answer for {secs} s{self._tail_suffix()}")

    def interrupt(self) -> None:
        """Make the current and every later wait on the agent raise ChannelInterrupted at once.

        Safe to call from another thread (only a flag and one byte into a pipe): this is how a backup's
        writer thread, blocked on a backup VM that reads slowly, is stopped within moments.
        """
        self._interrupted = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _check_interrupted(self) -> None:
        if self._interrupted:
            raise ChannelInterrupted(f"{self.vm}: interrupted")

    def _tail_suffix(self) -> str:
        tail = self.stderr_tail()
        return f" (agent said: {tail})" if tail else ""

    def _drain_stderr(self) -> None:
        if self._err_fd is None:
            return
        while True:
            try:
                piece = os.read(self._err_fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                piece = b""
            if not piece:
                self._close_err()
                return
            if len(self._err_head) < GREETING_HEAD:
                self._err_head += piece[: GREETING_HEAD - len(self._err_head)]
            self._err += piece
            if len(self._err) > STDERR_TAIL:
                del self._err[: len(self._err) - STDERR_TAIL]

    def _close_err(self) -> None:
        if self._err_fd is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self._err_fd = None

    def _note_stdout(self, data: bytes | memoryview) -> None:
        if len(self._out_head) < GREETING_HEAD:
            self._out_head += data[: GREETING_HEAD - len(self._out_head)]
            self._check_greeting()

    def qubes_own_service(self) -> str | None:
        """The service, if what answered is Qubes' own: its greeting is a line among the first bytes on stderr,
        or on stdout unless that starts with a frame (ours always does)."""
        heads = [self._err_head]
        if not self._out_head.startswith(frames.MAGIC[: len(self._out_head)]):
            heads.append(self._out_head)
        for head in heads:
            lines = bytes(head).split(b"\n")[:-1]  # complete lines only
            for greeting, service in QUBES_GREETINGS.items():
                if greeting in lines:
                    return service
        return None

    def _check_greeting(self) -> None:
        """Qubes' own service answered: say so at once (it would wait for a line that never comes)."""
        service = self.qubes_own_service()
        if service is not None:
            raise QubesOwnService(self.qube, service)

    def _wait_for(self, fd: int, event: int, deadline: float | None = None) -> None:
        """Block until ``fd`` is ready for ``event``, draining stderr meanwhile; raise on a stall, when the
        frame's ``deadline`` passed, or when interrupt() was called."""
        self._writing = event == select.POLLOUT
        limit = time.monotonic() + self.timeout  # no progress for the stall timeout: stalled
        self._too_slow = deadline is not None and deadline < limit
        if deadline is not None and self._too_slow:
            limit = deadline  # the frame as a whole is due earlier: too slow
        self._past_deadline = self._deadline is not None and self._deadline < limit
        if self._deadline is not None and self._past_deadline:
            limit = self._deadline  # the whole exchange is due earlier still
            self._too_slow = False
        while True:
            self._check_interrupted()
            poller = select.poll()
            poller.register(fd, event)
            poller.register(self._wake_r, select.POLLIN)
            if self._err_fd is not None:
                poller.register(self._err_fd, select.POLLIN)
            left = limit - time.monotonic()
            if left <= 0:
                raise self._stalled()
            ready = poller.poll(math.ceil(left * 1000))
            if not ready and time.monotonic() >= limit:
                raise self._stalled()
            for ready_fd, ev in ready:
                if ready_fd == self._wake_r:
                    self._check_interrupted()
                if ready_fd == fd and ev:
                    self._drain_stderr()
                    self._check_greeting()
                    return
                if ready_fd == self._err_fd:
                    self._drain_stderr()
                    self._check_greeting()

    # -- reading -------------------------------------------------------------------------------------
    def read(self, size: int = -1) -> bytes:
        """File-like read for frames.read_frame: at least one byte unless at end of stream."""
        return self._read(size)

    def _read(self, size: int) -> bytes:
        if size == 0:
            return b""
        if not self._buf:
            if self._eof:
                return b""
            piece = self._read_piece(size if size > 0 else READ_PIECE)
            if size < 0 or size >= len(piece):
                return piece  # no copy through the buffer
            self._buf += memoryview(piece)[size:]
            return piece[:size]
        if size < 0 or size >= len(self._buf):
            out = bytes(self._buf)
            self._buf.clear()
            return out
        out = bytes(self._buf[:size])
        del self._buf[:size]
        return out

    def readinto(self, view: memoryview) -> int:
        """File-like readinto for frames.readinto_exact: the pipe is read straight into ``view`` (no
        intermediate copies); at least one byte unless at end of stream or ``view`` is empty."""
        return self._readinto(view)

    def _readinto(self, view: memoryview) -> int:
        want = len(view)
        if want == 0:
            return 0
        if self._buf:
            n = min(want, len(self._buf))
            view[:n] = self._buf[:n]
            del self._buf[:n]
            return n
        if self._eof:
            return 0
        assert self._out_fd is not None
        while True:
            try:
                n = os.readv(self._out_fd, [view])
            except BlockingIOError:
                self._wait_for(self._out_fd, select.POLLIN, self._frame_deadline)
                continue
            if not n:
                self._eof = True
            elif len(self._out_head) < GREETING_HEAD:
                self._note_stdout(view[:n])
            return n

    def _read_piece(self, want: int) -> bytes:
        assert self._out_fd is not None
        while True:
            try:
                piece = os.read(self._out_fd, min(max(want, SMALL_READ), READ_PIECE))
            except BlockingIOError:
                self._wait_for(self._out_fd, select.POLLIN, self._frame_deadline)
                continue
            if not piece:
                self._eof = True
            elif len(self._out_head) < GREETING_HEAD:
                self._note_stdout(piece)
            return piece

    def recv(
        self,
        allowed: dict[FrameType, tuple[int, int]],
        name_ok: NameCheck | None = None,
        into: frames.BufferFor | None = None,
    ) -> Frame | None:
        """One bounded frame from the agent, None at a clean end of stream.

        A malformed frame raises frames.ProtocolError (with the agent's stderr tail appended); a stall
        raises BackupError after ``timeout`` seconds.  ``into``: see frames.read_frame (data read straight
        into a caller's buffer).
        """
        # The whole frame, from this call on, must arrive within the stall timeout plus its largest allowed
        # size at MIN_RATE (frame_budget): a VM that sends a byte now and then cannot keep dom0 waiting
        # without end.  The clock starts here, not at the frame's first byte, so one frame costs at most one
        # timeout (docs/SECURITY.md section 5 states the worst case per chunk).
        largest = frames.HEADER_SIZE + max(n + d for n, d in allowed.values())
        self._frame_deadline = time.monotonic() + frame_budget(self.timeout, largest)
        try:
            return frames.read_frame(self, allowed, name_ok, into)  # type: ignore[arg-type]
        except frames.ProtocolError as exc:
            raise frames.ProtocolError(f"{exc}{self._tail_suffix()}") from None
        finally:
            self._frame_deadline = None

    # -- writing -------------------------------------------------------------------------------------
    def send(
        self, ftype: FrameType, name: str = "", data: bytes | memoryview = b"", deadline: float | None = None
    ) -> None:
        """One frame.  It must be accepted within frame_budget() of its size (or by ``deadline``, which a
        caller sending several frames as one unit gives them all): a VM that reads a few bytes now and then
        cannot keep dom0 (and the user's backup) waiting without end."""
        self.send_parts(ftype, name, (data,), deadline)

    def send_parts(
        self,
        ftype: FrameType,
        name: str,
        parts: tuple[bytes | bytearray | memoryview, ...],
        deadline: float | None = None,
    ) -> None:
        """One frame whose data is the concatenation of ``parts`` (written one after another, not copied)."""
        if not self._out_head:
            self._sniff_stdout()  # Qubes' own qubes.Backup greets on stdout, and may take the whole stream
        raw_name = name.encode("ascii")
        size = sum(len(p) for p in parts)
        head = frames.encode_header(ftype, len(raw_name), size) + raw_name
        if deadline is None:
            deadline = self.send_deadline(len(head) + size)
        self._write(head, deadline)
        for part in parts:
            if len(part):
                self._write(part, deadline)

    def send_deadline(self, nbytes: int) -> float:
        """When ``nbytes`` that dom0 starts writing now must have been accepted by the agent."""
        return time.monotonic() + frame_budget(self.timeout, nbytes)

    def _write(self, data: bytes | bytearray | memoryview, deadline: float | None = None) -> None:
        if self._in_fd is None:
            raise ChannelClosed(f"{self.vm}: input already closed")
        view = memoryview(data).cast("B")
        while view:
            self._check_interrupted()
            try:
                written = os.write(self._in_fd, view)
            except BlockingIOError:
                self._wait_for(self._in_fd, select.POLLOUT, deadline)
                continue
            except (BrokenPipeError, ConnectionResetError):
                self._sniff_stdout()
                raise ChannelClosed(f"{self.vm} stopped reading{self._tail_suffix()}") from None
            view = view[written:]

    def _sniff_stdout(self) -> None:
        """Before dom0 has read anything (it is sending, or the service stopped reading): is it Qubes' own
        service?  One non-blocking read; what it returns stays for the frame reader."""
        self._drain_stderr()
        if not self._out_head and not self._buf and self._out_fd is not None and not self._eof:
            with contextlib.suppress(BlockingIOError, OSError):
                piece = os.read(self._out_fd, GREETING_HEAD)
                if piece:
                    self._buf += piece
                    self._out_head += piece
                else:
                    self._eof = True
        self._check_greeting()

    def close_input(self) -> None:
        """End of what dom0 sends (the agent sees EOF)."""
        if self._in_fd is not None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError as exc:
                if exc.errno != errno.EPIPE:
                    raise
            self._in_fd = None

    # -- ending --------------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> int:
        """Wait for the agent to exit (draining stderr); kill it and raise if it takes too long."""
        limit = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._past_deadline = self._deadline is not None and self._deadline < limit
        if self._deadline is not None and self._past_deadline:
            limit = self._deadline
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self._drain_stderr()
                return rc
            left = limit - time.monotonic()
            if left <= 0:
                self.kill()
                raise self._stalled()
            if self._err_fd is not None:
                poller = select.poll()
                poller.register(self._err_fd, select.POLLIN)
                if poller.poll(min(left, 0.05) * 1000):
                    self._drain_stderr()
            else:
                time.sleep(min(left, 0.01))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stderr_tail(self) -> str:
        """The last few KiB the agent wrote to stderr, as one printable line (for error messages)."""
        self._drain_stderr()
        text = frames.safe_text(" ".join(self._err.decode("utf-8", "replace").split()), limit=STDERR_TAIL)
        return text[-400:] if len(text) > 400 else text

    def close(self) -> None:
        """Release everything; kills an agent that is still running."""
        self.close_input()
        self.kill()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        self._out_fd = None
        self._err_fd = None
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    abort = close

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
