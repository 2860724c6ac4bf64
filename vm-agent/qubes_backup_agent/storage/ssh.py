"""ssh storage: ``ssh://[user@]host[:port]/path`` through the backup VM's own OpenSSH client.

Nothing here uses a shell on our side: every ssh is a plain argv.  The command ssh runs on the remote host is
a short POSIX sh script built here, with every path quoted by ``shlex.quote`` (paths with control characters
are refused before that).  ``BatchMode=yes``: ssh never prompts (no passphrase, no password, no "accept this
host key?"); a host key that is not in the VM's known_hosts, or a key the server refuses, is an error.

Backup: one connection streams into ``DIR/.NAME.partial-RANDOM`` (created with noclobber before the first byte
is sent, so no VM disk is used and nothing is left to race with); after COMMIT a second connection checks the
size, syncs, and links it to ``DIR/NAME`` (never replacing an existing file), like the directory storage.
Any failure, end of stream or signal removes the temporary file.

Restore: a seekable reader over one connection to a small remote reader (a POSIX sh loop): it sends the file's
size, then answers each "OFFSET LENGTH" request with that byte range, produced on the server by
``tail -c +N | head -c LEN`` (tail seeks in a regular file).  So archives dom0 did not ask for are neither
read nor transferred: skipping a member costs one small request (its tar header), not its data, and not a
new connection.

Remote requirements: a POSIX shell for the account (sh, dash, bash, zsh, busybox ash) with cat, tail, head,
wc, ln, mv, rm, test, sync.

Which ssh configuration is used: in a real VM (QUBES_AGENT_ROOT unset, root ``/``) ssh's own — the VM user's
``~/.ssh/config``, keys, known_hosts, ``/etc/ssh/ssh_config`` — untouched, except that
``QUBES_AGENT_SSH_CONFIG`` (a path in the VM) replaces the config file.  In the simulation the agent runs on
the host, where ssh would read the *host* user's ``~/.ssh`` (it takes its home from the passwd entry, not
from $HOME), so the client is pointed at the simulated VM's files instead: ``-F`` the VM's
``~/.ssh/config`` (or QUBES_AGENT_SSH_CONFIG, confined to the VM root; none: ``/dev/null``), the VM's
``~/.ssh/known_hosts`` and its ``~/.ssh/id_*`` keys.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import shlex
import shutil
import subprocess
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .. import confine
from . import SeekableReader, StorageError

SCHEME = "ssh://"
CONFIG_ENV = "QUBES_AGENT_SSH_CONFIG"  # an ssh config file (a path inside the VM) instead of ~/.ssh/config
SSH_ENV = "QUBES_AGENT_SSH"  # the ssh client program (default: ssh from PATH)
DEFAULT_IDENTITIES = ("id_rsa", "id_ecdsa", "id_ecdsa_sk", "id_ed25519", "id_ed25519_sk")
# Always on our command line (they win over any config file): never prompt, never forward anything, no tty,
# give up on an unreachable host or a dead connection instead of hanging until dom0's stall timeout.
BASE_OPTIONS = (
    "-o", "BatchMode=yes",
    "-o", "ConnectTimeout=30",
    "-o", "ServerAliveInterval=15",
    "-o", "ServerAliveCountMax=4",
    "-o", "ClearAllForwardings=yes",
    "-o", "PermitLocalCommand=no",
    "-o", "LogLevel=ERROR",
    "-T", "-x", "-a",
)  # fmt: skip
STDERR_KEEP = 4096  # bytes of ssh's stderr kept for the error message
REASON_LIMIT = 200  # characters of ssh's reason quoted in an error line
AUX_TIMEOUT = 120.0  # seconds for the commit's rename and the abort's cleanup
MAX_AUX_OUTPUT = 4096  # bytes of such a script's stdout read (they print nothing)
READ_THROUGH = 256 << 10  # a forward gap up to this size inside a reply is read and dropped
DRAIN_LIMIT = 1 << 20  # an unwanted rest of a reply up to this size is read through; more: a new connection
# A request asks for what the read that needs it wants (at least FIRST_WINDOW) and, while reads stay
# sequential, for twice as much as the last one.  After a seek the next read is often just a tar header
# (then a seek again): a small first request keeps what is read through, or dropped, small.
FIRST_WINDOW = 16 << 10
MAX_WINDOW = 256 << 20
READ_BUFFER = 16 << 10

# Exit statuses of our remote scripts (ssh itself uses 255 for its own failures).
RC_NO_DIR = 20
RC_EXISTS = 21
RC_CREATE = 22
RC_SIZE = 23
RC_RENAME = 24
RC_NO_FILE = 25
RC_CHANGED = 26
SSH_FAILED = 255

_HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9._-]+)?\]")
_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Target:
    """A parsed ``ssh://[user@]host[:port]/path``; ``path`` is as the remote shell gets it (``~/`` -> relative)."""

    user: str
    host: str  # as ssh gets it (brackets of an IPv6 literal removed)
    port: int | None
    path: str

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port is not None else ""
        return f"{user}{host}{port}"

    def url(self, path: str | None = None) -> str:
        """The location as a user writes it (relative paths shown as ``/~/...``)."""
        path = self.path if path is None else path
        if path.startswith("/"):
            shown = path
        else:
            rel = "" if path == "." else path.removeprefix("./")
            shown = f"/~/{rel}" if rel else "/~"
        return f"{SCHEME}{self.authority}{shown}"

    def child(self, name: str) -> str:
        """The path of ``name`` inside this target's directory, as the remote shell gets it."""
        if self.path == "/":
            return "/" + name
        return f"{self.path}/{name}" if self.path != "." else f"./{name}"

    def destination(self) -> list[str]:
        """ssh's arguments that select the server: ``[-p PORT] [-l USER] -- HOST``."""
        argv: list[str] = []
        if self.port is not None:
            argv += ["-p", str(self.port)]
        if self.user:
            argv += ["-l", self.user]
        return [*argv, "--", self.host]


def parse_url(url: str) -> Target:
    """``ssh://[user@]host[:port]/path``.  The path is literal (no %-decoding); ``/~/x`` is ``x`` in the
    remote user's home, ``/x`` is absolute.  Anything that could become an ssh option is refused."""
    if not url.startswith(SCHEME):
        raise StorageError(f"not an ssh location: {url}")
    shown = _CONTROL_RE.sub("?", url)
    if _CONTROL_RE.search(url):
        raise StorageError(f"ssh location contains control characters: {shown}")
    rest = url[len(SCHEME) :]
    authority, slash, path = rest.partition("/")
    if not slash:
        raise StorageError(f"bad ssh location (want ssh://[user@]host[:port]/path): {shown}")
    user, at, hostport = authority.rpartition("@")
    if at and not _USER_RE.fullmatch(user):
        raise StorageError(f"bad user name in ssh location: {shown}")
    port: int | None = None
    host = hostport
    m = re.fullmatch(r"(.*?)(?::([0-9]{1,5}))?", hostport)
    if m and m.group(2) is not None and not hostport.endswith("]"):
        host, port = m.group(1), int(m.group(2))
        if not 0 < port < 65536:
            raise StorageError(f"bad port in ssh location: {shown}")
    if not _HOST_RE.fullmatch(host):
        raise StorageError(f"bad host in ssh location: {shown}")
    host = host.strip("[]")
    path = "/" + path
    if path == "/~" or path.startswith("/~/"):
        rel = path[3:].strip("/")
        path = f"./{rel}" if rel else "."
    elif path != "/":
        path = path.rstrip("/") or "/"
    return Target(user, host, port, path)


def _opt_path(path: Path | str) -> str:
    """A file name as the value of an ``ssh -o`` option: quoted, ``%`` escaped (ssh expands %-tokens)."""
    text = str(path)
    if '"' in text or _CONTROL_RE.search(text):
        raise StorageError(f"cannot pass this path to ssh: {_CONTROL_RE.sub('?', text)}")
    return '"' + text.replace("%", "%%") + '"'


def client_options(root: Path) -> list[str]:
    """Options that choose the ssh configuration: the VM's (see the module docstring)."""
    configured = os.environ.get(CONFIG_ENV) or None
    config: Path | None = None
    if configured:
        try:
            config = confine.resolve(configured, root)
        except confine.ConfinementError as exc:
            raise StorageError(f"{CONFIG_ENV}: {exc}") from None
        if not config.is_file():
            raise StorageError(f"{CONFIG_ENV}: no such file: {configured}")
    if str(root) == "/":
        return ["-F", str(config)] if config else []
    ssh_dir = confine.home_dir(root) / ".ssh"
    if config is None and (ssh_dir / "config").is_file():
        config = ssh_dir / "config"
    opts = ["-F", str(config) if config else os.devnull]
    opts += ["-o", f"UserKnownHostsFile={_opt_path(ssh_dir / 'known_hosts')}"]
    opts += ["-o", f"GlobalKnownHostsFile={_opt_path(root / 'etc/ssh/ssh_known_hosts')}"]
    keys = [ssh_dir / name for name in DEFAULT_IDENTITIES if (ssh_dir / name).is_file()]
    # At least one IdentityFile: without any, ssh would fall back to the host user's default keys.
    for key in keys or [ssh_dir / "id_ed25519"]:
        opts += ["-o", f"IdentityFile={_opt_path(key)}"]
    return opts


class _StderrTail:
    """Drains a pipe in a thread, keeping the last STDERR_KEEP bytes (ssh must never block on stderr)."""

    def __init__(self, pipe: BinaryIO) -> None:
        self.pipe = pipe
        self.pieces: deque[bytes] = deque()
        self.size = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        read = getattr(self.pipe, "read1", self.pipe.read)
        with contextlib.suppress(OSError, ValueError):
            while piece := read(1 << 12):
                self.pieces.append(piece)
                self.size += len(piece)
                while self.size > STDERR_KEEP and len(self.pieces) > 1:
                    self.size -= len(self.pieces.popleft())

    def text(self, timeout: float = 5.0) -> str:
        self.thread.join(timeout)
        return b"".join(self.pieces)[-STDERR_KEEP:].decode("utf-8", "replace")


def reason(stderr: str) -> str:
    """ssh's (or the remote shell's) last meaningful stderr line, printable and bounded."""
    lines = [_CONTROL_RE.sub("?", line).strip() for line in stderr.splitlines()]
    lines = [line for line in lines if line and not line.startswith(("Warning: Permanently added", "@@@"))]
    if not lines:
        return ""
    for line in reversed(lines):  # the line that says what went wrong, if ssh printed several
        if any(key in line for key in _KNOWN):
            return line[:REASON_LIMIT]
    return lines[-1][:REASON_LIMIT]


_KNOWN = (
    "Host key verification failed",
    "Permission denied",
    "Connection refused",
    "Could not resolve hostname",
    "Connection timed out",
    "No route to host",
    "Network is unreachable",
    "Connection closed",
    "Too many authentication failures",
)


def describe_failure(target: Target, rc: int, stderr: str, doing: str) -> str:
    """One line for an ssh that failed: what it means, then ssh's own reason in parentheses."""
    why = reason(stderr)
    suffix = f" ({why})" if why else ""
    where = target.authority
    if rc == SSH_FAILED or rc < 0:
        if "Host key verification failed" in why or "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
            return f"ssh: host key of {where} is not in the backup VM's known_hosts or has changed{suffix}"
        if "Permission denied" in why or "Too many authentication failures" in why:
            return f"ssh: {where} refused the backup VM's key{suffix}"
        if any(k in why for k in _KNOWN[2:7]):
            return f"ssh: cannot connect to {where}{suffix}"
        if rc < 0:
            return f"ssh to {where} was killed while {doing}{suffix}"
        return f"ssh to {where} failed while {doing}{suffix}"
    return f"ssh: remote command failed while {doing} (status {rc}){suffix}"


class _Client:
    """Runs remote scripts through ssh for one target: plain argv, stdin/stdout never the agent's own."""

    def __init__(self, target: Target, root: Path) -> None:
        self.target = target
        program = os.environ.get(SSH_ENV) or "ssh"
        found = shutil.which(program)
        if found is None:
            raise StorageError(f"ssh locations need an ssh client in the backup VM (not found: {program})")
        self.argv = [found, *client_options(root), *BASE_OPTIONS]

    def command(self, script: str) -> list[str]:
        return [*self.argv, *self.target.destination(), script]

    def spawn(self, script: str, *, stdin: bool, bufsize: int = -1) -> tuple[subprocess.Popen[bytes], _StderrTail]:
        try:
            proc = subprocess.Popen(
                self.command(script),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=bufsize,
                shell=False,
                close_fds=True,
            )
        except OSError as exc:
            raise StorageError(f"cannot run ssh: {exc.strerror or exc}") from None
        assert proc.stderr is not None
        return proc, _StderrTail(proc.stderr)  # type: ignore[arg-type]

    def run(self, script: str, doing: str, ok: tuple[int, ...] = (0,)) -> tuple[int, bytes, str]:
        """Run ``script``; returns (status, stdout, stderr).  ssh's own failures raise StorageError."""
        proc, tail = self.spawn(script, stdin=False)
        assert proc.stdout is not None
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            proc.kill()

        timer = threading.Timer(AUX_TIMEOUT, expire)  # stderr has its reader thread: no communicate()
        timer.start()
        try:
            out = proc.stdout.read(MAX_AUX_OUTPUT)
            proc.stdout.close()
            proc.wait()
        finally:
            timer.cancel()
        if expired.is_set():
            raise StorageError(f"ssh to {self.target.authority} timed out while {doing}")
        rc = proc.returncode
        err = tail.text()
        if rc in ok:
            return rc, out, err
        if rc == SSH_FAILED or rc < 0:
            raise StorageError(describe_failure(self.target, rc, err, doing))
        return rc, out, err


def _quote(path: str) -> str:
    return shlex.quote(path)


class SshSink:
    """Streams the backup into DIR/.NAME.partial-RANDOM on the remote; links it to DIR/NAME after COMMIT."""

    def __init__(self, url: str, name: str, root: Path) -> None:
        self.target = parse_url(url)
        self.client = _Client(self.target, root)
        self.name = name
        self.tmp = f".{name}.partial-{secrets.token_hex(6)}"
        self.final_url = self.target.url(self.target.child(name))
        self._dir = _quote(self.target.path)
        self._tmp = _quote(self.tmp)
        self._final = _quote(name)
        self.written = 0
        self.created = False  # the remote temporary file may exist: abort() must remove it
        # Created with noclobber before anything is sent, then "ready": the file exists before the first byte,
        # so an abort can always remove it, and every early failure (auth, no directory, existing backup) is
        # reported now, not after the first DATA frame.
        script = "\n".join(
            (
                f"cd {self._dir} || exit {RC_NO_DIR}",
                f"if test -e {self._final} || test -h {self._final}; then exit {RC_EXISTS}; fi",
                "umask 077",
                "set -C",
                f"true > {self._tmp} || exit {RC_CREATE}",
                "echo ready",
                f"exec cat >> {self._tmp}",
            )
        )
        self.proc, self.tail = self.client.spawn(script, stdin=True)
        self.created = True  # from here on the remote file may exist
        try:
            self._wait_ready()
        except BaseException:  # the caller never gets a sink to abort: clean up here (signals included)
            self.abort()
            raise

    def _wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline(len(b"ready\n"))  # bounded: a server cannot make us buffer more
        if line == b"ready\n":
            return
        if line:  # not our script's answer (it prints nothing else): do not read, or wait, any further
            self.proc.kill()
            self.proc.wait()
            raise StorageError(f"unexpected answer from {self.target.url()} when starting the upload")
        rc = self.proc.wait()
        err = self.tail.text()
        why = reason(err)
        suffix = f" ({why})" if why else ""
        if rc in (RC_EXISTS, RC_NO_DIR, SSH_FAILED):
            self.created = False  # refused before creating anything (or ssh never ran the script)
        if rc == RC_EXISTS:
            raise StorageError(f"backup already exists: {self.final_url}")
        if rc == RC_NO_DIR:
            raise StorageError(f"location does not exist: {self.target.url()}{suffix}")
        if rc == RC_CREATE:
            raise StorageError(f"cannot create a file in {self.target.url()}{suffix}")
        raise StorageError(describe_failure(self.target, rc, err, "starting the upload"))

    def _upload_failed(self) -> StorageError:
        rc = self.proc.wait()
        return StorageError(describe_failure(self.target, rc, self.tail.text(), f"writing {self.final_url}"))

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
        except (BrokenPipeError, ConnectionResetError):
            raise self._upload_failed() from None
        self.written += len(data)

    def commit(self) -> str:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            raise self._upload_failed() from None
        rc = self.proc.wait()
        if rc != 0:
            raise self._upload_failed()
        # A new connection: only an explicit COMMIT may rename (an upload that merely ended must never).
        # ln fails if the final name exists (never replaces); without hard links (vfat) check, then mv.
        script = "\n".join(
            (
                f"cd {self._dir} || exit {RC_NO_DIR}",
                f"n=$(wc -c < {self._tmp}) || exit {RC_SIZE}",
                f"test $n -eq {self.written} || exit {RC_SIZE}",
                f"sync {self._tmp} 2>/dev/null || sync",
                f"if ln {self._tmp} {self._final} 2>/dev/null; then rm -f {self._tmp}",
                f"elif test -e {self._final} || test -h {self._final}; then exit {RC_EXISTS}",
                f"else mv {self._tmp} {self._final} || exit {RC_RENAME}",
                "fi",
                "sync . 2>/dev/null || true",
            )
        )
        rc, _out, err = self.client.run(script, f"finishing {self.final_url}")
        if rc == RC_EXISTS:
            raise StorageError(f"backup already exists: {self.final_url}")
        if rc == RC_SIZE:
            raise StorageError(f"the remote file has the wrong size after the upload: {self.final_url}")
        if rc != 0:
            raise StorageError(describe_failure(self.target, rc, err, f"finishing {self.final_url}"))
        self.created = False
        return self.final_url

    def _stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        with contextlib.suppress(OSError):
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        self.proc.wait()

    def abort(self) -> None:
        self._stop()
        if self.created:
            self.created = False
            with contextlib.suppress(StorageError, OSError):
                self.client.run(f"cd {self._dir} && rm -f {self._tmp}", f"removing {self.tmp}")


class _Session:
    """One connection running a small remote reader: it prints the file's size, then serves requests.

    Request (one line on ssh's stdin): ``OFFSET+1 LENGTH``.  Reply: ``ok`` and exactly LENGTH bytes, produced by
    ``tail -c +OFFSET+1 FILE | head -c LENGTH`` (tail seeks in a regular file: skipped bytes are never read,
    let alone sent).  Before every reply the size is checked again: a file that changed length during the
    restore ends the session instead of shifting bytes.  Requests never reach past the announced size.
    """

    def __init__(self, client: _Client, quoted: str, doing: str) -> None:
        self.client = client
        self.doing = doing
        script = "\n".join(
            (
                f"f={quoted}",
                f'test -f "$f" || exit {RC_NO_FILE}',
                f's=$(wc -c < "$f") || exit {RC_NO_FILE}',
                "echo $s",
                "while read o l; do",
                f'  t=$(wc -c < "$f") || exit {RC_CHANGED}',
                f"  test $t -eq $s || exit {RC_CHANGED}",
                "  echo ok",
                '  tail -c +$o "$f" | head -c $l',
                "done",
            )
        )
        self.proc, self.tail = client.spawn(script, stdin=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin: Any = self.proc.stdin
        self.stdout: Any = self.proc.stdout
        line = self.stdout.readline(64).strip()
        if not line.isdigit():
            rc = self.finish()
            if rc == RC_NO_FILE:
                raise StorageError(f"location does not exist: {doing}")
            raise StorageError(describe_failure(client.target, rc, self.tail.text(), f"opening {doing}"))
        self.size = int(line)

    def request(self, start: int, length: int) -> None:
        try:
            self.stdin.write(f"{start + 1} {length}\n".encode("ascii"))
            self.stdin.flush()
        except (BrokenPipeError, ConnectionResetError):
            raise self.failed() from None
        if self.stdout.readline(16) != b"ok\n":
            raise self.failed()

    def readinto(self, view: memoryview) -> int:
        n: int = self.stdout.readinto(view)
        return n

    def discard(self, count: int) -> None:
        buf = bytearray(min(count, 1 << 16))
        while count:
            n = self.readinto(memoryview(buf)[: min(count, len(buf))])
            if not n:
                raise self.failed()
            count -= n

    def finish(self) -> int:
        """Stop the session (killing ssh if it still runs); returns its exit status."""
        with contextlib.suppress(OSError):
            self.stdin.close()
        if self.proc.poll() is None:
            try:
                self.proc.wait(0.5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        with contextlib.suppress(OSError):
            self.stdout.close()
        return self.proc.wait()

    def failed(self) -> OSError:
        rc = self.finish()
        if rc == RC_CHANGED:
            return OSError(f"{self.doing} changed on the server during the restore")
        if rc == 0:
            return OSError(f"{self.doing} ended before its announced size")
        return OSError(describe_failure(self.client.target, rc, self.tail.text(), f"reading {self.doing}"))


class RemoteReader(SeekableReader):
    """A seekable read-only file over ssh: reads are ranged requests to one remote reader (``_Session``).

    Each request asks for what the read that needs it wants (at least FIRST_WINDOW), twice the previous
    request's size while reads stay sequential.  A seek ahead of an unfinished reply reads the rest of it
    through when that is short (READ_THROUGH, DRAIN_LIMIT); otherwise the session is dropped and a new one
    opened, so a reply reaching far into archives nobody wants is never transferred.
    """

    def __init__(self, url: str, root: Path) -> None:
        super().__init__()
        self.target = parse_url(url)
        self.url = self.target.url()
        self.client = _Client(self.target, root)
        self.quoted = _quote(self.target.path)
        self.session: _Session | None = _Session(self.client, self.quoted, self.url)
        self.connections = 1  # for tests and diagnostics
        self.size = self.session.size
        self.pos = 0
        self.reply_pos = 0  # the next unread byte of the current reply ...
        self.reply_end = 0  # ... and where it ends (equal: no reply pending)
        self.last_window = 0


    def _session(self) -> _Session:
        if self.session is None:
            self.session = _Session(self.client, self.quoted, self.url)
            self.connections += 1
            if self.session.size != self.size:
                self.session.finish()
                self.session = None
                raise OSError(f"{self.url} changed on the server during the restore")
        return self.session

    def _position(self, pos: int, want: int) -> _Session:
        """A session whose next reply byte is ``pos``."""
        session = self._session()
        pending = self.reply_end - self.reply_pos
        if pending and self.reply_pos < pos < self.reply_end and pos - self.reply_pos <= READ_THROUGH:
            session.discard(pos - self.reply_pos)
            self.reply_pos = pos
        if pending and self.reply_pos == pos:
            return session
        sequential = pos == self.reply_end and not pending
        if pending:  # the reply is not wanted (any more)
            if pending <= DRAIN_LIMIT:
                session.discard(pending)
            else:
                session.finish()
                self.session = None
                session = self._session()
        window = max(want, FIRST_WINDOW)
        if sequential:
            window = max(window, min(self.last_window * 2, MAX_WINDOW))
        window = min(window, self.size - pos)
        session.request(pos, window)
        self.reply_pos, self.reply_end, self.last_window = pos, pos + window, window
        return session

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        if self.pos >= self.size or not len(view):
            return 0
        session = self._position(self.pos, len(view))
        n = session.readinto(view[: self.reply_end - self.pos])
        if not n:
            self.session = None
            raise session.failed()
        self.pos += n
        self.reply_pos = self.pos
        return n

    def close(self) -> None:
        if self.session is not None:
            self.session.finish()
            self.session = None
        super().close()


def open_remote(url: str, root: Path) -> BinaryIO:
    return io.BufferedReader(RemoteReader(url, root), buffer_size=READ_BUFFER)  # type: ignore[return-value]
