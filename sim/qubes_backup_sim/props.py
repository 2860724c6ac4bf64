"""The property catalog of an R4.2 / R4.3 qubesd: per class which properties exist, their type and default
(``bootmode``, ``devices_denied``, ``stubdom_uuid`` and templates' ``appvm_default_bootmode`` are R4.3's).

qubes.xml stores only non-default values; a property absent from ``<properties>`` is default and its value is
computed here (from the globals, the template, or a constant), as qubesd does.  Stored text: ``''`` means
None for vm-typed properties, labels are stored as their ``label-N`` id and shown by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qubes_backup_dom0.qubes.qubesxml import Collection, Domain

from .exc import ApiError, no_such_property, prop_value_error

QUBES_VMS = frozenset({"AppVM", "TemplateVM", "StandaloneVM", "DispVM"})
ALL = QUBES_VMS | {"AdminVM"}
TRUE_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
              "off": False, "": False}  # fmt: skip
VIRT_MODES = ("pv", "pvh", "hvm")
_INT_RE = re.compile(r"^-?[0-9]{1,19}$")

Default = Callable[[Collection, Domain], "str | None"]
R43 = frozenset({"4.3"})
_release = "4.3"  # the simulated qubesd's release (set_release): which properties exist


def set_release(release: str) -> None:
    global _release
    _release = release


@dataclass(frozen=True)
class Prop:
    name: str
    type: str  # str int bool vm label (the API's type names)
    default: Default | None  # None: no default (a value must be stored)
    classes: frozenset[str] = QUBES_VMS
    readonly: bool = False
    releases: frozenset[str] = frozenset({"4.2", "4.3"})


def _const(value: str | None) -> Default:
    return lambda coll, dom: value


def _global(name: str) -> Default:
    return lambda coll, dom: global_value(coll, name)


def template_of(coll: Collection, dom: Domain) -> Domain | None:
    if dom.klass not in ("AppVM", "DispVM"):
        return None
    name = value_text(coll, dom, "template")
    return coll.get(name) if name else None


def _from_template(name: str, fallback: Default) -> Default:
    def default(coll: Collection, dom: Domain, depth: int = 0) -> str | None:
        tpl = template_of(coll, dom)
        if tpl is not None and depth < 4:
            return value_text(coll, tpl, name)
        return fallback(coll, dom)

    return default


def _netvm(coll: Collection, dom: Domain) -> str | None:
    if dom.klass in ("AdminVM", "TemplateVM"):
        return None
    value = global_value(coll, "default_netvm")
    return None if value == dom.name else value


def _default_dispvm(coll: Collection, dom: Domain) -> str | None:
    value = global_value(coll, "default_dispvm")
    return None if value == dom.name and dom.klass == "DispVM" else value


def _template(coll: Collection, dom: Domain) -> str | None:
    return global_value(coll, "default_dispvm" if dom.klass == "DispVM" else "default_template")


def _virt_mode(coll: Collection, dom: Domain) -> str | None:
    pci = dom.element.find("devices[@class='pci']")
    return "hvm" if pci is not None and len(pci) else "pvh"


def _icon(coll: Collection, dom: Domain) -> str | None:
    kind = {"TemplateVM": "templatevm", "StandaloneVM": "standalonevm", "DispVM": "dispvm"}.get(dom.klass, "appvm")
    return f"{kind}-{dom.label or 'red'}"


def _kernel(coll: Collection, dom: Domain) -> str | None:
    return global_value(coll, "default_kernel")


DVM_CLASSES = frozenset({"AppVM", "StandaloneVM", "TemplateVM"})
VM_PROPS: tuple[Prop, ...] = (
    Prop("audiovm", "vm", _const("dom0")),
    Prop("auto_cleanup", "bool", _const("False"), frozenset({"DispVM"})),
    Prop("autostart", "bool", _const("False")),
    Prop("backup_timestamp", "int", _const(None)),
    Prop("appvm_default_bootmode", "str", _const("default"), frozenset({"TemplateVM"}), releases=R43),
    Prop("bootmode", "str", _const("default"), releases=R43),
    Prop("debug", "bool", _const("False")),
    Prop("default_dispvm", "vm", _default_dispvm, ALL),
    Prop("default_user", "str", _from_template("default_user", _const("user"))),
    Prop("devices_denied", "str", _const(""), releases=R43),
    Prop("dispid", "int", None, frozenset({"DispVM"}), readonly=True),
    Prop("guivm", "vm", _const("dom0")),
    Prop("icon", "str", _icon, ALL, readonly=True),
    Prop("include_in_backups", "bool", _const("True"), ALL),
    Prop("installed_by_rpm", "bool", _const("False")),
    Prop("kernel", "str", _from_template("kernel", _kernel)),
    Prop("kernelopts", "str", _from_template("kernelopts", _const(""))),
    Prop("keyboard_layout", "str", _const("us++"), ALL),
    Prop("klass", "str", lambda coll, dom: dom.klass, ALL, readonly=True),
    Prop("label", "label", None, ALL),
    Prop("mac", "str", _const("00:16:3e:5e:6c:00")),
    Prop("management_dispvm", "vm", _global("management_dispvm")),
    Prop("maxmem", "int", _const("4000")),
    Prop("memory", "int", _from_template("memory", _const("400"))),
    Prop("name", "str", None, ALL, readonly=True),
    Prop("netvm", "vm", _netvm),
    Prop("provides_network", "bool", _const("False")),
    Prop("qid", "int", None, ALL, readonly=True),
    Prop("qrexec_timeout", "int", _from_template("qrexec_timeout", _global("default_qrexec_timeout"))),
    Prop("shutdown_timeout", "int", _from_template("shutdown_timeout", _global("default_shutdown_timeout"))),
    Prop("start_time", "str", _const(""), readonly=True),
    Prop("stubdom_mem", "int", _const(None)),
    Prop("stubdom_uuid", "str", _const(""), readonly=True, releases=R43),
    Prop("stubdom_xid", "int", _const("-1"), readonly=True),
    Prop("template", "vm", _template, frozenset({"AppVM", "DispVM"})),
    Prop("template_for_dispvms", "bool", _const("False"), DVM_CLASSES),
    Prop("updateable", "bool", lambda coll, dom: str(dom.klass in ("TemplateVM", "StandaloneVM", "AdminVM")),
         ALL, readonly=True),
    Prop("uuid", "str", None, ALL, readonly=True),
    Prop("vcpus", "int", _from_template("vcpus", _const("2"))),
    Prop("virt_mode", "str", _virt_mode),
    Prop("xid", "int", lambda coll, dom: "0" if dom.is_admin else "-1", ALL, readonly=True),
)  # fmt: skip


def _default_pool(coll: Collection, dom: Domain | None = None) -> str | None:
    pools = coll.pools
    for name, attrs in pools.items():
        if attrs.get("driver") == "lvm_thin":
            return name
    for name in ("varlibqubes", "default"):
        if name in pools:
            return name
    return next((n for n, a in pools.items() if a.get("driver") != "linux-kernel"), None)


def _pool_default(coll: Collection, dom: Domain) -> str | None:
    return global_value(coll, "default_pool")


GLOBAL_PROPS: tuple[Prop, ...] = (
    Prop("check_updates_vm", "bool", _const("True"), ALL),
    Prop("clockvm", "vm", _const(None), ALL),
    Prop("default_audiovm", "vm", _const("dom0"), ALL),
    Prop("default_dispvm", "vm", _const(None), ALL),
    Prop("default_guivm", "vm", _const("dom0"), ALL),
    Prop("default_kernel", "str", _const(""), ALL),
    Prop("default_netvm", "vm", _const(None), ALL),
    Prop("default_pool", "str", _default_pool, ALL),
    Prop("default_pool_kernel", "str", _const("linux-kernel"), ALL),
    Prop("default_pool_private", "str", _pool_default, ALL),
    Prop("default_pool_root", "str", _pool_default, ALL),
    Prop("default_pool_volatile", "str", _pool_default, ALL),
    Prop("default_qrexec_timeout", "int", _const("60"), ALL),
    Prop("default_shutdown_timeout", "int", _const("60"), ALL),
    Prop("default_template", "vm", _const(None), ALL),
    Prop("management_dispvm", "vm", _const(None), ALL),
    Prop("stats_interval", "int", _const("3"), ALL),
    Prop("updatevm", "vm", _const(None), ALL),
)  # fmt: skip
_VM_BY_NAME = {p.name: p for p in VM_PROPS}
_GLOBAL_BY_NAME = {p.name: p for p in GLOBAL_PROPS}
_ADMIN_PROPS = frozenset({"default_dispvm", "icon", "include_in_backups", "keyboard_layout", "klass", "label",
                          "name", "qid", "updateable", "uuid", "xid"})  # fmt: skip


def vm_props(dom: Domain) -> list[Prop]:
    if dom.is_admin:
        return [p for p in VM_PROPS if p.name in _ADMIN_PROPS and _release in p.releases]
    return [p for p in VM_PROPS if dom.klass in p.classes and _release in p.releases]


def vm_prop(dom: Domain, name: str) -> Prop:
    p = _VM_BY_NAME.get(name)
    if p is None or p not in vm_props(dom):
        raise no_such_property(name)
    return p


def global_prop(name: str) -> Prop:
    p = _GLOBAL_BY_NAME.get(name)
    if p is None:
        raise no_such_property(name)
    return p


def _shown(coll: Collection, prop: Prop, raw: str | None) -> str | None:
    if raw is None:
        return None
    if prop.type == "label":
        return coll.labels.get(raw, raw)
    if prop.type == "vm" or prop.type == "int":
        return raw or None
    if prop.type == "bool":
        return "True" if TRUE_WORDS.get(raw.strip().lower(), False) else "False"
    return raw


def global_value(coll: Collection, name: str) -> str | None:
    prop = global_prop(name)
    raw = coll.global_properties.get(name)
    if raw is not None:
        return _shown(coll, prop, raw)
    return prop.default(coll, coll["dom0"] if "dom0" in coll else Domain(coll.root)) if prop.default else None


def _stored(dom: Domain, name: str) -> str | None:
    if dom.is_admin and name == "name":
        return "dom0"
    if dom.is_admin and name == "qid":
        return "0"
    return dom.raw_property(name)


def value_text(coll: Collection, dom: Domain, name: str) -> str | None:
    """The effective value as the API shows it (None for a None value or no value)."""
    prop = vm_prop(dom, name)
    raw = _stored(dom, name)
    if raw is not None:
        return _shown(coll, prop, raw)
    return prop.default(coll, dom) if prop.default else None


def is_default(dom: Domain, name: str) -> bool:
    return _stored(dom, name) is None


def serialize(coll: Collection, dom: Domain, name: str) -> str:
    """``default=B type=T VALUE`` of one VM property (admin.vm.property.Get)."""
    prop = vm_prop(dom, name)
    value = value_text(coll, dom, name)
    return f"default={is_default(dom, name)} type={prop.type} {value or ''}"


def serialize_global(coll: Collection, name: str) -> str:
    prop = global_prop(name)
    value = global_value(coll, name)
    return f"default={name not in coll.global_properties} type={prop.type} {value or ''}"


def escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


# -- setting -------------------------------------------------------------------------------------------------
def parse_value(coll: Collection, prop: Prop, payload: bytes) -> str:
    """Check a Set payload against the property's type; returns the text to store."""
    try:
        text = payload.decode("ascii") if prop.type != "str" else payload.decode("utf-8")
    except UnicodeDecodeError:
        raise prop_value_error(f"{prop.name}: value is not valid text") from None
    if prop.type == "int":
        if not _INT_RE.match(text) or int(text) < 0:
            raise prop_value_error(f"{prop.name}: invalid integer {text!r}")
        return str(int(text))
    if prop.type == "bool":
        b = TRUE_WORDS.get(text.strip().lower())
        if b is None or not text:
            raise prop_value_error(f"{prop.name}: invalid boolean value {text!r}")
        return "True" if b else "False"
    if prop.type == "label":
        lid = coll.label_id(text)
        if lid is None:
            raise ApiError("QubesLabelNotFoundError", f"Label does not exist: {text!r}")
        return lid
    if prop.type == "vm":
        if text and text not in coll:
            raise prop_value_error(f"{prop.name}: no such domain: {text!r}")
        return text
    if "\n" in text or "\0" in text:
        raise prop_value_error(f"{prop.name}: newlines are not allowed")
    return text


def check_vm_value(coll: Collection, dom: Domain, prop: Prop, text: str, running: set[str],
                   kernels_dir: Path) -> None:  # fmt: skip
    """qubesd's property-pre-set checks for a VM (type already checked by parse_value)."""
    if prop.readonly:
        raise ApiError("QubesPropertyAccessError", f"Failed to set property {prop.name!r}: read-only")
    name = prop.name
    target = coll.get(text) if prop.type == "vm" and text else None
    if name == "netvm" and target is not None:
        if target.name == dom.name:
            raise prop_value_error("netvm: a VM cannot be its own netvm")
        if value_text(coll, target, "provides_network") != "True":
            raise prop_value_error(f"netvm: {text!r} does not provide network")
        seen: set[str] = {dom.name}
        cur: Domain | None = target
        while cur is not None and not cur.is_admin:
            if cur.name in seen:
                raise prop_value_error("netvm: loop in netvm chain")
            seen.add(cur.name)
            nxt = value_text(coll, cur, "netvm")
            cur = coll.get(nxt) if nxt else None
    elif name == "template":
        want = "TemplateVM" if dom.klass == "AppVM" else "AppVM"
        if target is None or target.klass != want:
            raise prop_value_error(f"template: {text!r} is not a {want}")
        if dom.klass == "DispVM" and value_text(coll, target, "template_for_dispvms") != "True":
            raise prop_value_error(f"template: {text!r} is not a template for disposables")
        if dom.name in running:
            raise ApiError("QubesVMNotHaltedError", f"Domain is not powered off: {dom.name!r}")
    elif name == "default_dispvm" and target is not None:
        if value_text(coll, target, "template_for_dispvms") != "True":
            raise ApiError("QubesValueError", f"default_dispvm: {text!r} has template_for_dispvms=False")
    elif name == "virt_mode":
        if text not in VIRT_MODES:
            raise prop_value_error(f"virt_mode: invalid value {text!r}")
        pci = dom.element.find("devices[@class='pci']")
        if text == "pvh" and pci is not None and len(pci):
            raise ApiError("QubesException", "pvh mode can't be set if PCI devices are attached")
    elif name == "kernel" and text and not (kernels_dir / text).is_dir():
        raise prop_value_error(f"kernel: no such kernel {text!r}")
    elif prop.type in ("vm",) and target is not None and target.name == dom.name and name != "default_dispvm":
        raise prop_value_error(f"{name}: a VM cannot refer to itself")
