"""A small client for qubesd's Admin API socket (no dependency on qubesadmin, which exists only in dom0).

Wire protocol: connect to the UNIX socket, send ``METHOD+ARG dom0 name DEST\\0`` and the payload, shut down
the write side, read the reply to EOF.  ``0\\0DATA`` is success, ``2\\0EXCTYPE\\0TRACEBACK\\0MESSAGE\\0`` an
error, an empty reply a refusal (by policy, or of a call qubesd does not have or finds malformed: it closes
the connection without a word).  qubesd is trusted, but every reply is bounded and parsed
strictly: a reply of the wrong shape is one clear error line, never a traceback.

The parsers at the bottom turn qubesd's text formats into Python values: property lines (``GetAll``, with
``\\\\`` and ``\\n`` unescaped), ``key=value`` lines (volume and pool Info), name lists, the VM list (R4.3
adds ``uuid=``) and device assignments (R4.2's ``…List`` lines, R4.3's ``…Assigned`` lines with Qubes'
serialization), and ``serialize_assignment`` writes R4.3's serialization for ``…Assign``.
"""

from __future__ import annotations

import re
import socket
import string
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


#: R4.3 assignment modes that qubesd stores (``manual`` is a live attachment's, never an assignment's).
ASSIGNMENT_MODES = ("required", "auto-attach", "ask-to-attach")
ANY = "*"
_SERIAL_KEY = frozenset(string.digits + string.ascii_letters + r"!#$%&()*+,-./:;<>?@[\]^_{|}~")
_SERIAL_VALUE = _SERIAL_KEY | frozenset(string.punctuation + " ")
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True)
class DeviceAssignment:
    """A device assignment as either release lists it: the device in port ``port`` of VM ``backend``,
    ``device_id`` the identity of the device itself (R4.3; ``*``: whatever is in that port, and always on
    R4.2), ``mode`` R4.3's (``required``, ``auto-attach``, ``ask-to-attach``; R4.2's persistent assignments
    are ``required``, its live attachments ``manual``), ``options`` without R4.3's ``_`` prefix."""

    backend: str
    port: str
    device_id: str
    mode: str
    options: dict[str, str]

    @property
    def persistent(self) -> bool:
        return self.mode != "manual"


@dataclass(frozen=True)
class VmList:
    """``admin.vm.List``: name -> (class, state); ``uuids`` (R4.3 lists them; empty on R4.2)."""

    vms: dict[str, tuple[str, str]]
    uuids: dict[str, str]


def parse_vm_list_full(data: bytes) -> VmList:
    """``NAME class=CLASS state=STATE`` (R4.2) or ``… uuid=UUID`` (R4.3) lines; every line the same kind."""
    vms: dict[str, tuple[str, str]] = {}
    uuids: dict[str, str] = {}
    for line in _lines(data, "VM list"):
        parts = line.split(" ")
        ok = len(parts) in (3, 4) and parts[1].startswith("class=") and parts[2].startswith("state=")
        if len(parts) == 4:
            ok = ok and parts[3].startswith("uuid=") and bool(_UUID_RE.match(parts[3][len("uuid="):]))
        if not ok or parts[0] in vms or not parts[0]:
            raise AdminAPIError(f"qubesd: malformed VM list line {safe_text(line)!r}")
        klass, state = parts[1][len("class="):], parts[2][len("state="):]
        if not klass or not state:
            raise AdminAPIError(f"qubesd: malformed VM list line {safe_text(line)!r}")
        vms[parts[0]] = (klass, state)
        if len(parts) == 4:
            uuids[parts[0]] = parts[3][len("uuid="):]
    if uuids and len(uuids) != len(vms):
        raise AdminAPIError("qubesd: VM list with and without uuids")
    return VmList(vms, uuids)


def parse_vm_list(data: bytes) -> dict[str, tuple[str, str]]:
    return parse_vm_list_full(data).vms


def parse_devices(data: bytes) -> list[DeviceAssignment]:
    """R4.2's ``admin.vm.device.CLASS.List``: ``BACKEND+PORT [KEY=VALUE ...] persistent=yes|no`` lines (a
    persistent one is an assignment, ``required`` in R4.3's words; the others are live attachments)."""
    out: list[DeviceAssignment] = []
    for line in _lines(data, "device list"):
        parts = line.split(" ")
        backend, sep, port = parts[0].partition("+")
        if not sep or not backend or not port:
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
        mode = "required" if persistent in ("yes", "True") else "manual"
        out.append(DeviceAssignment(backend, port, ANY, mode, options))
    return out


def unpack_serialized(text: str, what: str) -> tuple[dict[str, str], dict[str, str]]:
    """R4.3's serialization (qubes/device_protocol.py ``DeviceSerializer``): ``key='value' …`` with ``'``
    inside a value as ``\\'``; keys starting with ``_`` are options.  Split as qubesd splits it; duplicate
    keys and characters qubesd would not send are errors."""
    text = text.strip()
    props: dict[str, str] = {}
    options: dict[str, str] = {}
    if not text:
        return props, options
    keys: list[str] = []
    values: list[str] = []
    key, sep, rest = text.partition("='")
    if not sep or not rest.endswith("'"):
        raise AdminAPIError(f"qubesd: malformed {what}")
    keys.append(key)
    while "='" in rest:
        value_key, _, rest = rest.partition("='")
        value, sep, key = value_key.rpartition("' ")
        if not sep:
            raise AdminAPIError(f"qubesd: malformed {what}")
        values.append(value.replace("\\'", "'"))
        keys.append(key)
    values.append(rest[:-1].replace("\\'", "'"))
    for key, value in zip(keys, values, strict=True):
        if not key or set(key) - _SERIAL_KEY or set(value) - _SERIAL_VALUE:
            raise AdminAPIError(f"qubesd: malformed {what}")
        target = options if key.startswith("_") else props
        name = key[1:] if key.startswith("_") else key
        if name in target or not name:
            raise AdminAPIError(f"qubesd: malformed {what}")
        target[name] = value
    return props, options


def parse_assigned(data: bytes, devclass: str) -> list[DeviceAssignment]:
    """R4.3's ``admin.vm.device.CLASS.Assigned``: ``BACKEND+PORT:DEVID SERIALIZATION`` lines, the
    serialization ``device_id='…' port_id='…' devclass='…' backend_domain='…' mode='…'
    [frontend_domain='…'] [_OPTION='…' …]``."""
    out: list[DeviceAssignment] = []
    for line in _lines(data, "device assignment list"):
        head, sep, rest = line.partition(" ")
        what = f"device assignment line {safe_text(line)!r}"
        props, options = unpack_serialized(rest, what) if sep else ({}, {})
        needed = ("device_id", "port_id", "devclass", "backend_domain", "mode")
        if any(k not in props for k in needed) or set(props) - {*needed, "frontend_domain"}:
            raise AdminAPIError(f"qubesd: malformed {what}")
        backend, port, devid = props["backend_domain"], props["port_id"], props["device_id"]
        if head != f"{backend}+{port}:{devid}" or props["devclass"] != devclass or not backend or not port:
            raise AdminAPIError(f"qubesd: malformed {what}")
        if props["mode"] not in ASSIGNMENT_MODES:
            raise AdminAPIError(f"qubesd: {what}: unknown mode")
        if any(not _KEY_RE.match(k) for k in options):
            raise AdminAPIError(f"qubesd: malformed {what}")
        out.append(DeviceAssignment(backend, port, devid or ANY, props["mode"], options))
    return out


#: What a device assignment we send may hold (an authentic backup may still be an attacker's): one word per
#: value, none of the characters that delimit R4.2's options (space, ``=``) or R4.3's serialization (``'``,
#: ``\\``, space), so nothing can add, end or override a field.  Names are R4.2's option names.
_DEV_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_DEV_VALUE_RE = re.compile(r"^[A-Za-z0-9_.,+:-]{0,256}$")
_DEV_ID_RE = re.compile(r"^[A-Za-z0-9_.,+:*?@-]{1,256}$")  # device ids: VENDOR:PRODUCT:SERIAL:INTERFACES
_PORT_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_BACKEND_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_DEVCLASS_RE = re.compile(r"^[a-z0-9_-]{1,32}$")  # one word of the method name


def check_assignment(devclass: str, a: DeviceAssignment) -> None:
    """AdminAPIError (one line) for an assignment that cannot be sent as it is."""
    what = f"{devclass} device {a.backend}:{a.port}"[:120]
    if not _DEVCLASS_RE.match(devclass) or not _BACKEND_RE.match(a.backend):
        raise AdminAPIError(f"{what}: not a device class and VM name")
    if a.port != ANY and not _PORT_RE.match(a.port):
        raise AdminAPIError(f"{what}: not a port")
    if a.device_id != ANY and not _DEV_ID_RE.match(a.device_id):
        raise AdminAPIError(f"{what}: not a device identity")
    if a.mode not in ASSIGNMENT_MODES:
        raise AdminAPIError(f"{what}: mode {safe_text(a.mode, limit=40)!r}")
    for key, value in a.options.items():
        if not _DEV_NAME_RE.match(key) or not _DEV_VALUE_RE.match(value):
            raise AdminAPIError(f"{what}: option {safe_text(key, limit=40)!r}")


def assignment_arg(a: DeviceAssignment) -> str:
    """The call's argument: ``BACKEND+PORT`` (``_`` for any port, as qrexec arguments spell ``*``); the device
    identity goes in the payload (an argument with one makes qubesd look the device up first)."""
    return f"{a.backend}+{'_' if a.port == ANY else a.port}"


def attach_payload(a: DeviceAssignment) -> bytes:
    """R4.2's ``admin.vm.device.CLASS.Attach`` payload of a persistent assignment: ``persistent=True K=V ...``."""
    return " ".join(["persistent=True", *(f"{k}={v}" for k, v in a.options.items())]).encode()


def serialize_assignment(devclass: str, a: DeviceAssignment, frontend: str) -> bytes:
    """R4.3's serialization of an assignment for ``admin.vm.device.CLASS.Assign``, as Qubes' own client
    sends it (qubesadmin ``DeviceAssignment.serialize``): device, port, class, backend, mode, frontend, then
    each option as ``_NAME``.  Every value was checked by ``check_assignment``: no quoting is needed."""
    fields = [("device_id", a.device_id), ("port_id", a.port), ("devclass", devclass),
              ("backend_domain", a.backend), ("mode", a.mode), ("frontend_domain", frontend),
              *((f"_{k}", v) for k, v in a.options.items())]  # fmt: skip
    return " ".join(f"{k}='{v}'" for k, v in fields).encode("ascii")
