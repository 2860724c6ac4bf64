"""Device assignments as the qubesd of each release serves them (``admin.vm.device.CLASS.*``).

Taken from qubes-core-admin: ``release4.2`` ``qubes/api/admin.py`` (``vm_device_list``, ``vm_device_attach``
…), ``qubes/devices.py``, ``qubes/ext/{pci,block}.py``; ``release4.3`` the same plus
``qubes/device_protocol.py`` (``DeviceSerializer``, ``DeviceAssignment.serialize/deserialize``) and
``qubes/vm/__init__.py`` (the ``<device>`` element of qubes.xml).  A refusal qubesd answers by closing the
connection (PermissionDenied, ProtocolError, an exception that is no QubesException) is an ``ApiError`` of
type ProtocolError here, which the server also answers with an empty reply.

No device exists in the simulation (no VM really runs, nothing is attached): ``Available`` and R4.3's
``Attached`` list nothing, R4.3's ``Attach`` of a halted VM is refused as qubesd refuses it and of a running
one as for an unknown device.  What is stored is what qubes.xml stores: per class ``<devices class=C>``
with ``<device backend-domain=B id=PORT>`` and ``<option name=K>V</option>``; R4.3 adds ``mode`` and
``identity`` (the device id, ``*`` for any device in that port).

R4.2 (``persistent`` assignments are the only kind qubes.xml holds)::

    admin.vm.device.CLASS.List [B+PORT]      ->  B+PORT K=V ... persistent=yes        (sorted by B+PORT)
    admin.vm.device.CLASS.Attach B+PORT      <-  persistent=True K=V ...               (halted VM: persistent only)
    admin.vm.device.CLASS.Detach B+PORT

R4.3 (assignments have a mode: required, auto-attach, ask-to-attach; ``manual`` is for live attachments)::

    admin.vm.device.CLASS.Assigned [B+PORT]  ->  B+PORT:DEVID device_id='DEVID' port_id='PORT'
                                                 devclass='CLASS' backend_domain='B' mode='M'
                                                 frontend_domain='VM' _K='V' ...        (sorted by B+PORT:DEVID)
    admin.vm.device.CLASS.Assign B+PORT[+DEVID]  <-  the same serialization (every key optional but mode)
    admin.vm.device.CLASS.Unassign B+PORT[+DEVID]
"""

from __future__ import annotations

import re
import string
from typing import TYPE_CHECKING

from lxml import etree
from qubes_backup_dom0.qubes.qubesxml import Collection, Domain

from . import props
from .exc import ApiError, protocol_error

if TYPE_CHECKING:
    from .handlers import Api

MODES = ("required", "auto-attach", "ask-to-attach")  # assignable (R4.3); "manual" is refused
ANY = "*"
# R4.2 Attach: option names and values
_KEY_CHARS_42 = set(string.digits + string.ascii_letters + "-_.")
_VALUE_CHARS_42 = _KEY_CHARS_42 | set(",+:")
# R4.3 DeviceSerializer
_KEY_CHARS_43 = set(string.digits + string.ascii_letters + r"!#$%&()*+,-./:;<>?@[\]^_{|}~")
_VALUE_CHARS_43 = _KEY_CHARS_43 | set(string.punctuation + " ")
_PCI_PORT = re.compile(r"^([0-9a-f]{4}_)?[0-9a-f]{2}_[0-9a-f]{2}\.[0-9a-f](-[0-9a-f]{2}_[0-9a-f]{2}\.[0-9a-f])*$")
_BOOL = {"0": False, "no": False, "false": False, "off": False, "1": True, "yes": True, "true": True, "on": True}

#: (release, operation) -> (argument: True required / None optional, payload allowed, changes qubes.xml)
OPERATIONS: dict[tuple[str, str], tuple[bool | None, bool, bool]] = {
    ("4.2", "Available"): (None, False, False),
    ("4.2", "List"): (None, False, False),
    ("4.2", "Attach"): (True, True, True),
    ("4.2", "Detach"): (True, False, True),
    ("4.2", "Set.persistent"): (True, True, True),
    ("4.3", "Available"): (None, False, False),
    ("4.3", "Assigned"): (None, False, False),
    ("4.3", "Attached"): (None, False, False),
    ("4.3", "Assign"): (True, True, True),
    ("4.3", "Unassign"): (True, False, True),
    ("4.3", "Attach"): (True, True, False),
    ("4.3", "Detach"): (True, False, False),
    ("4.3", "Set.assignment"): (True, True, True),
}


def refused(why: str) -> ApiError:
    """What qubesd answers with a closed connection (the reason goes to its log only)."""
    return protocol_error(why)


class Assignment:
    """One ``<device>`` element of a VM's ``<devices class=C>``."""

    def __init__(self, el: etree._Element, devclass: str) -> None:
        self.el = el
        self.devclass = devclass

    @property
    def backend(self) -> str:
        return self.el.get("backend-domain", "")

    @property
    def port(self) -> str:
        return self.el.get("id", ANY)

    @property
    def identity(self) -> str:
        return self.el.get("identity", ANY)

    @property
    def mode(self) -> str:
        legacy = self.el.get("required")
        if legacy is not None:
            return "required" if _BOOL.get(legacy.lower(), True) else "auto-attach"
        return self.el.get("mode", "required")  # R4.3 loads an R4.2 assignment (no mode) as required

    @property
    def options(self) -> dict[str, str]:
        return {o.get("name", ""): o.text or "" for o in self.el.iterfind("option")}

    def key42(self) -> str:
        return f"{self.backend}+{self.port}"

    def key43(self) -> str:
        return f"{self.backend}+{self.port}:{self.identity}"


def devices_el(dom: Domain, devclass: str) -> etree._Element:
    el = dom.element.find(f"devices[@class='{devclass}']")
    if el is None:
        el = etree.SubElement(dom.element, "devices")
        el.set("class", devclass)
    return el


def assignments(dom: Domain, devclass: str) -> list[Assignment]:
    return [Assignment(d, devclass) for d in devices_el(dom, devclass).iterfind("device")]


def normalize(dom: Domain, release: str) -> None:
    """qubes.xml's ``<device>`` elements as this release writes them (qubesd rewrites qubes.xml whole)."""
    for devs in dom.element.iterfind("devices"):
        for dev in devs.iterfind("device"):
            a = Assignment(dev, devs.get("class", ""))
            mode, identity = a.mode, a.identity
            for attr in ("mode", "identity", "required"):
                if attr in dev.attrib:
                    del dev.attrib[attr]
            if release == "4.3":
                dev.set("mode", mode)
                dev.set("identity", identity)


def _new(dom: Domain, devclass: str, backend: str, port: str, options: dict[str, str],
         mode: str | None, identity: str | None) -> None:  # fmt: skip
    el = etree.SubElement(devices_el(dom, devclass), "device", id=port)
    el.set("backend-domain", backend)
    if mode is not None:
        el.set("mode", mode)
        el.set("identity", identity or ANY)
    for k, v in options.items():
        etree.SubElement(el, "option", name=k).text = v


# ------------------------------------------------------------------------------------------------- R4.2

def list_42(dom: Domain, devclass: str, arg: str) -> str:
    found = assignments(dom, devclass)
    if arg:
        backend, sep, port = arg.partition("+")
        if not sep:
            raise refused("List: argument without '+'")
        found = [a for a in found if (a.backend, a.port) == (backend, port)]
    lines = {a.key42(): " ".join([*(f"{k}={v}" for k, v in a.options.items()), "persistent=yes"]) for a in found}
    return "".join(f"{k} {lines[k]}\n" for k in sorted(lines))


def attach_42(api: Api, dom: Domain, devclass: str, arg: str, payload: bytes) -> str:
    coll = api.coll
    try:
        words = payload.decode("ascii").split()
    except UnicodeDecodeError:
        raise refused("Attach: payload is not ASCII") from None
    options: dict[str, str] = {}
    persistent = False
    for w in words:
        key, sep, value = w.partition("=")
        if not sep:
            raise refused("Invalid options format")
        if key == "persistent":
            if value.lower() not in _BOOL:
                raise ApiError("QubesValueError", f"Invalid literal for boolean property: {value!r}")
            persistent = _BOOL[value.lower()]
            continue
        if set(key) - _KEY_CHARS_42:
            raise refused("Invalid chars in option name")
        if set(value) - _VALUE_CHARS_42:
            raise refused("Invalid chars in option value")
        options[key] = value
    backend, sep, port = arg.partition("+")
    if not sep:
        raise refused("Attach: argument without '+'")
    back = coll.get(backend)
    if back is None:
        raise refused(f"KeyError: {backend!r}")  # an unhandled KeyError in qubesd: connection closed
    if devclass == "pci" and not _PCI_PORT.match(port):
        raise refused(f"ValueError: Invalid device identifier: {port!r}")
    if not persistent and not api.running(dom):
        raise ApiError("QubesVMNotRunningError", "VM not running, can only attach device with persistent flag")
    if any(a.key42() == arg for a in assignments(dom, devclass)):
        raise ApiError("DeviceAlreadyAttached",
                       f"'device {backend}:{port} of class {devclass} already attached to {dom.name}'")  # fmt: skip
    if devclass == "pci":
        if dom.is_admin:
            raise ApiError("QubesException", "Can't attach PCI device to dom0")
        if props.value_text(coll, dom, "virt_mode") == "pvh":
            raise ApiError("QubesException", "Can't attach PCI device to VM in pvh mode")
    if devclass == "block":
        _block_options_42(options, api.running(back))
    if persistent:
        _new(dom, devclass, backend, port, options, None, None)
    return ""


def _block_options_42(options: dict[str, str], backend_running: bool) -> None:
    """R4.2's ``device-pre-attach:block``: options checked, ``read-only`` made yes/no (and added)."""
    for key, value in options.items():
        if key == "frontend-dev":
            if not value.startswith(("xvd", "sd")):
                raise ApiError("QubesValueError", "Invalid frontend-dev option value: " + value)
        elif key == "read-only":
            if value.lower() not in _BOOL:
                raise ApiError("QubesValueError", f"Invalid literal for boolean property: {value!r}")
            options[key] = "yes" if _BOOL[value.lower()] else "no"
        elif key == "devtype":
            if value not in ("disk", "cdrom"):
                raise ApiError("QubesValueError", "devtype option can only have 'disk' or 'cdrom' value")
        else:
            raise ApiError("QubesValueError", f"Unsupported option {key}")
    if options.get("read-only", "no") == "no" and not backend_running:
        # qubesd asks the device whether it is read-only: a halted backend's is an UnknownDevice, which has no
        # mode (AttributeError: connection closed); only read-only=yes skips the question
        raise refused("AttributeError: 'UnknownDevice' object has no attribute 'mode'")
    options.setdefault("read-only", "no")  # a running backend's device (writable, in the simulation)


def detach_42(api: Api, dom: Domain, devclass: str, arg: str) -> str:
    found = [a for a in assignments(dom, devclass) if a.key42() == arg]
    port = arg.partition("+")[2]
    if found and api.running(dom):
        raise ApiError("QubesVMNotHaltedError", "Can not remove a persistent attachment from a non halted vm")
    if not found:
        raise ApiError("DeviceNotAttached", f"'device {port} of class {devclass} not attached to {dom.name}'")
    for a in found:
        a.el.getparent().remove(a.el)  # type: ignore[union-attr]
    return ""


# ------------------------------------------------------------------------------------------------- R4.3

def _quote(value: str) -> str:
    return "'" + value.replace("'", r"\'") + "'"


def serialize_43(dom: Domain, a: Assignment) -> str:
    """``DeviceAssignment.serialize()``: the assignment's VirtualDevice, its mode, frontend, options."""
    fields = [("device_id", a.identity), ("port_id", a.port), ("devclass", a.devclass),
              ("backend_domain", a.backend), ("mode", a.mode), ("frontend_domain", dom.name),
              *((f"_{k}", v) for k, v in a.options.items())]  # fmt: skip
    return " ".join(f"{k}={_quote(v)}" for k, v in fields)


def list_43(dom: Domain, devclass: str, arg: str) -> str:
    found = assignments(dom, devclass)
    if arg:
        backend, sep, port = arg.partition("+")
        if not sep:
            raise refused("Assigned: argument without '+'")
        found = [a for a in found if (a.backend, a.port) == (backend, port)]
        if len(found) > 1:
            raise refused("Assigned: more than one assignment of that port")  # qubesd's enforce()
    lines = {a.key43(): serialize_43(dom, a) for a in found}
    return "".join(f"{k} {lines[k]}\n" for k in sorted(lines))


def unpack_43(payload: bytes) -> tuple[dict[str, str], dict[str, str]]:
    """``DeviceSerializer.unpack_properties``: (properties, options) of ``key='value' …`` (ProtocolError as
    qubesd raises it: any error here closes the connection)."""
    try:
        text = payload.decode("ascii").strip()
    except UnicodeDecodeError:
        raise refused("serialization is not ASCII") from None
    properties: dict[str, str] = {}
    options: dict[str, str] = {}
    if not text:
        return properties, options
    keys, values = [], []
    key, _, rest = text.partition("='")
    keys.append(_sanitize(key.strip(), _KEY_CHARS_43, "property name"))
    while "='" in rest:
        value_key, _, rest = rest.partition("='")
        value, _, key = value_key.rpartition("' ")
        values.append(_sanitize(value.replace(r"\'", "'"), _VALUE_CHARS_43, "property value"))
        keys.append(_sanitize(key.strip(), _KEY_CHARS_43, "property name"))
    values.append(_sanitize(rest[:-1].replace(r"\'", "'"), _VALUE_CHARS_43, "property value"))
    for k, v in zip(keys, values, strict=True):
        if k.startswith("_"):
            options[k[1:]] = v
        else:
            properties[k] = v
    return properties, options


def _sanitize(value: str, allowed: set[str], what: str) -> str:
    if set(value) - allowed:
        raise refused(f"Invalid chars in {what}: {sorted(set(value) - allowed)!r}")
    return value


def _from_qarg(coll: Collection, arg: str) -> tuple[str, str, str]:
    """``VirtualDevice.from_qarg``: ``B+PORT[+DEVID]`` -> (backend, port, device id); ``_`` stands for ``*``."""
    backend, sep, identity = arg.partition("+")
    if not sep:
        raise refused("argument without '+'")
    if backend in ("_", ANY) or coll.get(backend) is None:
        raise refused(f"KeyError: {backend!r}")
    port, _, devid = identity.replace("+", ":").partition(":")
    port = ANY if port == "_" else port
    devid = ANY if devid in ("_", "") else devid
    return backend, port, devid


def assign_43(api: Api, dom: Domain, devclass: str, arg: str, payload: bytes) -> str:
    coll = api.coll
    backend, port, devid = _from_qarg(coll, arg)
    properties, options = unpack_43(payload)
    if properties.pop("backend_domain", backend) != backend:
        raise refused("UnexpectedDeviceProperty: backend_domain")
    if properties.pop("port_id", port) != port:
        raise refused("UnexpectedDeviceProperty: port_id")
    if properties.pop("devclass", devclass) != devclass:
        raise refused("UnexpectedDeviceProperty: devclass")
    given = properties.pop("device_id", devid)
    if devid != ANY and given != devid:
        raise refused("UnexpectedDeviceProperty: device_id")
    mode = properties.pop("mode", "manual")
    if mode not in (*MODES, "manual"):
        raise refused(f"ValueError: {mode!r} is not a valid AssignmentMode")
    frontend = properties.pop("frontend_domain", None)
    if frontend is not None and coll.get(frontend) is None:
        raise refused(f"KeyError: {frontend!r}")
    if properties:
        raise refused(f"TypeError: unexpected keyword argument {sorted(properties)[0]!r}")
    if any((a.backend, a.port, a.identity) == (backend, port, given) for a in assignments(dom, devclass)):
        raise ApiError("DeviceAlreadyAssigned",
                       f"'{devclass} device {backend}:{port}:{given} already assigned to {dom.name}'")  # fmt: skip
    if mode == "manual":
        raise refused("ValueError: Only auto-attachable devices can be assigned.")
    _new(dom, devclass, backend, port, options, mode, given)
    return ""


def unassign_43(api: Api, dom: Domain, devclass: str, arg: str) -> str:
    backend, port, devid = _from_qarg(api.coll, arg)
    found = [a for a in assignments(dom, devclass) if (a.backend, a.port, a.identity) == (backend, port, devid)]
    if not found:
        raise ApiError("DeviceNotAssigned", f"'{devclass} device {backend}:{port}:{devid} not assigned to {dom.name}'")
    for a in found:
        a.el.getparent().remove(a.el)  # type: ignore[union-attr]
    return ""


def attach_43(api: Api, dom: Domain, devclass: str, arg: str, payload: bytes) -> str:
    _from_qarg(api.coll, arg)
    unpack_43(payload)
    if not api.running(dom):
        raise ApiError("QubesVMNotRunningError", "VM not running, cannot attach device, do you mean `assign`?")
    raise refused(f"{devclass} device not recognized")  # no device exists in the simulation


def set_assignment_43(api: Api, dom: Domain, devclass: str, arg: str, payload: bytes) -> str:
    modes = {b"required": "required", b"ask-to-attach": "ask-to-attach", b"auto-attach": "auto-attach"}
    if payload not in modes:
        raise refused("PermissionDenied: mode")
    backend, port, devid = _from_qarg(api.coll, arg)
    found = [a for a in assignments(dom, devclass) if (a.backend, a.port, a.identity) == (backend, port, devid)]
    if not found:
        raise ApiError("QubesValueError", f"Device {backend}:{port}:{devid} not assigned to {dom.name}")
    found[0].el.set("mode", modes[payload])
    return ""


# --------------------------------------------------------------------------------------------- dispatch

def handle(api: Api, release: str, dom: Domain, devclass: str, op: str, arg: str, payload: bytes) -> str:
    if op == "Available" or (release, op) == ("4.3", "Attached"):
        return ""
    if release == "4.2":
        if op == "List":
            return list_42(dom, devclass, arg)
        if op == "Attach":
            return attach_42(api, dom, devclass, arg, payload)
        if op == "Detach":
            return detach_42(api, dom, devclass, arg)
        raise ApiError("QubesVMNotStartedError", "VM must be running to modify device persistence flag")
    if op == "Assigned":
        return list_43(dom, devclass, arg)
    if op == "Assign":
        return assign_43(api, dom, devclass, arg, payload)
    if op == "Unassign":
        return unassign_43(api, dom, devclass, arg)
    if op == "Attach":
        return attach_43(api, dom, devclass, arg, payload)
    if op == "Set.assignment":
        return set_assignment_43(api, dom, devclass, arg, payload)
    _from_qarg(api.coll, arg)  # Detach: nothing is attached
    raise ApiError("DeviceNotAssigned", f"{devclass} device {arg} not attached to {dom.name}")
