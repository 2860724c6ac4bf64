"""A small client for qubesd's Admin API socket (no dependency on qubesadmin, which exists only in dom0).

Wire protocol: connect to the UNIX socket, send ``METHOD+ARG dom0 name DEST\\0`` and the payload, shut down
the write side, read the reply to EOF.  ``0\\0DATA`` is success, ``2\\0EXCTYPE\\0TRACEBACK\\0MESSAGE\\0`` an
error, an empty reply a refusal by policy.  qubesd is trusted, but every reply is bounded and parsed
strictly: a reply of the wrong shape is one clear error line, never a traceback.

The parsers at the bottom turn the R4.2 text formats into Python values: property lines (``GetAll``, with
``\\\\`` and ``\\n`` unescaped), ``key=value`` lines (volume and pool Info), name lists, the VM list and
device assignment lines.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qubes_backup_protocol.frames import safe_text

from qubes_backup_dom0.errors import BackupError

MAX_REPLY = 16 * 1024 * 1024
MAX_REQUEST = 64 * 1024
DEFAULT_TIMEOUT = 120.0
#: What may appear in METHOD, ARG and DEST (qubesd splits the header on spaces; no NUL, no control chars).
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_.:+@-]*$")
_PROP_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
_KEY_RE = re.compile(r"^[a-z_][a-z0-9_-]*$")
_TYPE_RE = re.compile(r"^[a-z_]+$")
PROPERTY_TYPES = frozenset({"str", "int", "bool", "vm", "label"})


class AdminAPIError(BackupError):
    """qubesd could not be reached, or its reply had the wrong shape."""


class QubesdError(BackupError):
    """qubesd answered with an error (``2\\0...``): ``exc_type`` is its exception class, ``message`` its text."""

    def __init__(self, method: str, dest: str, exc_type: str, message: str) -> None:
        self.method = method
        self.dest = dest
        self.exc_type = exc_type
        self.message = message
        super().__init__(f"qubesd: {method} on {dest} failed: {message}")


class PolicyDenied(BackupError):
    """qubesd closed the connection without a reply: refused by policy (or the call failed inside qubesd)."""

    def __init__(self, method: str, dest: str) -> None:
        self.method = method
        self.dest = dest
        super().__init__(f"qubesd: {method} on {dest} was refused (empty reply: denied by policy or failed)")


def _check_token(what: str, value: str) -> None:
    if not _TOKEN_RE.match(value) or (what != "argument" and not value):
        raise AdminAPIError(f"qubesd request: invalid {what} {safe_text(value)!r}")


def parse_reply(data: bytes, method: str, dest: str) -> bytes:
    """The DATA of a success reply; QubesdError / PolicyDenied / AdminAPIError for everything else."""
    if not data:
        raise PolicyDenied(method, dest)
    if data.startswith(b"0\0"):
        return data[2:]
    if data.startswith(b"2\0"):
        fields = data[2:].split(b"\0")
        # EXCTYPE \0 TRACEBACK \0 MESSAGE \0  -> four fields, the last one empty
        if len(fields) == 4 and fields[3] == b"" and re.fullmatch(rb"[A-Za-z_][A-Za-z0-9_.]{0,127}", fields[0]):
            exc_type = fields[0].decode("ascii")
            message = " ".join(safe_text(fields[2], limit=500).split())
            raise QubesdError(method, dest, exc_type, message or exc_type)
    raise AdminAPIError(f"qubesd: malformed reply to {method} on {dest}")


class AdminAPI:
    """One connection per call, as qubesadmin does; ``timeout`` bounds connecting and each read."""

    def __init__(self, socket_path: str | Path, timeout: float = DEFAULT_TIMEOUT,
                 restart: Callable[[], Path] | None = None) -> None:  # fmt: skip
        self.socket_path = str(socket_path)
        self.timeout = timeout
        # In simulation only: qubesd is started on demand and exits when idle, so a refused connection starts
        # it again (a real qubesd is a system service: there a refused connection is an error).
        self._restart = restart

    def call(self, method: str, dest: str = "dom0", arg: str = "", payload: bytes = b"") -> bytes:
        """Send one request; the reply's DATA on success."""
        _check_token("method", method)
        _check_token("destination", dest)
        _check_token("argument", arg)
        header = f"{method}+{arg} dom0 name {dest}\0".encode("ascii")
        if len(header) + len(payload) > MAX_REQUEST:
            raise AdminAPIError(f"qubesd request {method} on {dest} too large ({len(payload)} bytes of payload)")
        raw = self._exchange(header + bytes(payload), method, dest)
        return parse_reply(raw, method, dest)

    def _exchange(self, request: bytes, method: str, dest: str) -> bytes:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            try:
                try:
                    sock.connect(self.socket_path)
                except (FileNotFoundError, ConnectionRefusedError):
                    if self._restart is None:
                        raise
                    self.socket_path = str(self._restart())
                    sock.connect(self.socket_path)
            except OSError as exc:
                raise AdminAPIError(
                    f"cannot reach qubesd at {self.socket_path}: {exc.strerror or exc}"
                ) from None
            try:
                sock.sendall(request)
                sock.shutdown(socket.SHUT_WR)
                return self._read_reply(sock, method, dest)
            except TimeoutError:
                raise AdminAPIError(f"qubesd did not answer {method} on {dest} within {self.timeout:g} s") from None
            except OSError as exc:
                reason = exc.strerror or exc
                raise AdminAPIError(f"qubesd connection failed during {method} on {dest}: {reason}") from None
        finally:
            sock.close()

    def _read_reply(self, sock: socket.socket, method: str, dest: str) -> bytes:
        buf = bytearray()
        deadline = time.monotonic() + max(self.timeout, 1.0) * 4  # also bounds a slow drip
        while True:
            piece = sock.recv(1 << 20)
            if not piece:
                return bytes(buf)
            buf += piece
            if len(buf) > MAX_REPLY:
                raise AdminAPIError(f"qubesd reply to {method} on {dest} exceeds {MAX_REPLY >> 20} MiB")
            if time.monotonic() > deadline:
                raise AdminAPIError(f"qubesd reply to {method} on {dest} took too long")


# --------------------------------------------------------------------------------------------- parsers


@dataclass(frozen=True)
class Property:
    default: bool
    type: str
    value: str


def _text(data: bytes, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AdminAPIError(f"qubesd: {what} is not valid UTF-8") from None
    return text


def _lines(data: bytes, what: str) -> list[str]:
    """Reply lines, each terminated by a newline (an empty reply is no line)."""
    text = _text(data, what)
    if not text:
        return []
    if not text.endswith("\n"):
        raise AdminAPIError(f"qubesd: {what}: reply does not end with a newline")
    lines = text[:-1].split("\n")
    if any(not line for line in lines):
        raise AdminAPIError(f"qubesd: {what}: empty line in reply")
    return lines


def parse_lines(data: bytes, what: str = "reply") -> list[str]:
    """Newline-terminated, non-empty text lines (firewall rules)."""
    return _lines(data, what)


def unescape(value: str, what: str = "property value") -> str:
    """GetAll's escaping: ``\\\\`` -> ``\\``, ``\\n`` -> newline; anything else after a backslash is an error."""
    if "\\" not in value:
        return value
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = value[i + 1 : i + 2]
        if nxt == "\\":
            out.append("\\")
        elif nxt == "n":
            out.append("\n")
        else:
            raise AdminAPIError(f"qubesd: bad escape in {what}")
        i += 2
    return "".join(out)


def _property_fields(text: str, what: str) -> Property:
    """``default=B type=T VALUE`` (VALUE may be empty and may contain spaces)."""
    parts = text.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("default=") or not parts[1].startswith("type="):
        raise AdminAPIError(f"qubesd: malformed {what}")
    default_s = parts[0][len("default=") :]
    ptype = parts[1][len("type=") :]
    value = parts[2] if len(parts) == 3 else ""
    if default_s not in ("True", "False") or not _TYPE_RE.match(ptype):
        raise AdminAPIError(f"qubesd: malformed {what}")
    if ptype == "bool" and value not in ("True", "False"):
        raise AdminAPIError(f"qubesd: {what}: bool value {safe_text(value)!r}")
    if ptype == "int" and value and not re.fullmatch(r"-?[0-9]{1,20}", value):  # empty: None
        raise AdminAPIError(f"qubesd: {what}: int value {safe_text(value)!r}")
    return Property(default_s == "True", ptype, value)


def parse_property(data: bytes, name: str = "property") -> Property:
    """The reply of ``admin.vm.property.Get`` / ``admin.property.Get`` (not escaped, one line)."""
    text = _text(data, name)
    if "\n" in text.rstrip("\n"):
        raise AdminAPIError(f"qubesd: malformed property {name}")
    return _property_fields(text, f"property {name}")


def parse_properties(data: bytes) -> dict[str, Property]:
    """``admin.vm.property.GetAll`` / ``admin.property.GetAll``: ``NAME default=B type=T VALUE`` lines."""
    out: dict[str, Property] = {}
    for line in _lines(data, "property list"):
        name, sep, rest = line.partition(" ")
        if not sep or not _PROP_NAME_RE.match(name) or name in out:
            raise AdminAPIError(f"qubesd: malformed property line {safe_text(line)!r}")
        prop = _property_fields(rest, f"property {name}")
        out[name] = Property(prop.default, prop.type, unescape(prop.value, f"property {name}"))
    return out


def parse_kv(data: bytes, what: str = "info") -> dict[str, str]:
    """``key=value`` lines (volume Info, pool Info); keys unique."""
    out: dict[str, str] = {}
    for line in _lines(data, what):
        key, sep, value = line.partition("=")
        if not sep or not _KEY_RE.match(key) or key in out:
            raise AdminAPIError(f"qubesd: malformed {what} line {safe_text(line)!r}")
        out[key] = value
    return out


def parse_names(data: bytes, what: str = "list") -> list[str]:
    """One name per line (labels, features, tags, volumes, pools, device classes); no spaces, unique."""
    names = _lines(data, what)
    for n in names:
        if " " in n or "\0" in n:
            raise AdminAPIError(f"qubesd: malformed {what} entry {safe_text(n)!r}")
    if len(set(names)) != len(names):
        raise AdminAPIError(f"qubesd: duplicate entry in {what}")
    return names


def parse_vm_list(data: bytes) -> dict[str, tuple[str, str]]:
    """``admin.vm.List``: ``NAME class=CLASS state=STATE`` lines -> name -> (class, state)."""
    out: dict[str, tuple[str, str]] = {}
    for line in _lines(data, "VM list"):
        parts = line.split(" ")
        ok = len(parts) == 3 and parts[1].startswith("class=") and parts[2].startswith("state=")
        if not ok or parts[0] in out or not parts[0]:
            raise AdminAPIError(f"qubesd: malformed VM list line {safe_text(line)!r}")
        klass, state = parts[1][len("class=") :], parts[2][len("state=") :]
        if not klass or not state:
            raise AdminAPIError(f"qubesd: malformed VM list line {safe_text(line)!r}")
        out[parts[0]] = (klass, state)
    return out


@dataclass(frozen=True)
class DeviceAssignment:
    backend: str
    ident: str
    persistent: bool
    options: dict[str, str]


def parse_devices(data: bytes) -> list[DeviceAssignment]:
    """``admin.vm.device.CLASS.List``: ``BACKEND+IDENT persistent=yes|no [KEY=VALUE ...]`` lines."""
    out: list[DeviceAssignment] = []
    for line in _lines(data, "device list"):
        parts = line.split(" ")
        backend, sep, ident = parts[0].partition("+")
        if not sep or not backend or not ident:
            raise AdminAPIError(f"qubesd: malformed device line {safe_text(line)!r}")
        options: dict[str, str] = {}
        for tok in parts[1:]:
            key, eq, value = tok.partition("=")
            if not eq or not _KEY_RE.match(key) or key in options:
                raise AdminAPIError(f"qubesd: malformed device line {safe_text(line)!r}")
            options[key] = value
        persistent = options.pop("persistent", "no")
        if persistent not in ("yes", "no", "True", "False"):
            raise AdminAPIError(f"qubesd: malformed device line {safe_text(line)!r}")
        out.append(DeviceAssignment(backend, ident, persistent in ("yes", "True"), options))
    return out
