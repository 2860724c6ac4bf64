"""The Admin API calls of the simulated qubesd, with qubesd's argument checks and refusals.

Each handler gets the destination domain, the argument and the payload and returns the reply data (text).
Every change is saved to qubes.xml (atomically) before the reply is sent, as qubesd does.
"""

from __future__ import annotations

import re
import string
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass

from lxml import etree
from qubes_backup_dom0.qubes.qubesxml import Collection, Domain, QubesXmlError, validate_name

from . import devices, firewall, policy, props
from .exc import ApiError, protocol_error, value_error, vm_not_found
from .release import DEFAULT as DEFAULT_RELEASE
from .release import check as check_release
from .storage import Storage, write_volume_config
from .store import Store

IN_PROGRESS_TAG = "backup-restore-in-progress"
ADMIN_UUID = "00000000-0000-0000-0000-000000000000"
DYNAMIC = ("admin.vm.device.", "admin.vm.Create.", "admin.vm.CreateInPool.")
#: Methods a release does not have (its qubesd closes the connection: "no such method").
RELEASE_ONLY = {"4.2": frozenset({"admin.vm.notes.Get", "admin.vm.notes.Set"})}
DEVICE_CLASSES = ("pci", "usb", "block", "mic")
MAX_IMPORT = 1 << 44  # 16 TiB
_TAG_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_FEATURE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

Handler = Callable[["Api", Domain, str, bytes], str]


@dataclass(frozen=True)
class Spec:
    func: Handler
    arg: bool | None  # True: required, False: none allowed, None: optional
    payload: bool
    admin_dest: bool | None  # True: dest must be dom0, False: must not be, None: either
    write: bool


HANDLERS: dict[str, Spec] = {}


def api(method: str, *, arg: bool | None = False, payload: bool = False, admin_dest: bool | None = None,
        write: bool = False) -> Callable[[Handler], Handler]:  # fmt: skip
    def deco(func: Handler) -> Handler:
        HANDLERS[method] = Spec(func, arg, payload, admin_dest, write)
        return func

    return deco


def _text(payload: bytes, what: str = "payload") -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise protocol_error(f"{what} is not UTF-8") from None


def _lines(items: list[str]) -> str:
    return "".join(f"{i}\n" for i in items)


class Api:
    def __init__(self, store: Store, *, host_paths: bool = False, release: str = DEFAULT_RELEASE) -> None:
        self.store = store
        self.storage = Storage(store, host_paths)
        self.release = check_release(release)
        props.set_release(self.release)
        for dom in self.coll.domains:  # qubes.xml's <device> elements as this release's qubesd writes them
            devices.normalize(dom, self.release)
            if not dom.is_admin and not dom.raw_property("uuid"):  # qubesd gives every VM one when it loads
                dom.set_property("uuid", str(uuidlib.uuid4()))
        self.current_method = ""
        self.current_src = "dom0"
        # (vm, volume) between ImportBegin and ImportEnd: while one is open the server does not idle out (an
        # import service writes for as long as the data takes, without talking to qubesd)
        self.imports_open: set[tuple[str, str]] = set()

    @property
    def coll(self) -> Collection:
        return self.store.coll

    def call(self, method: str, arg: str, src: str, dest: str, payload: bytes) -> bytes:
        spec = self._dynamic(method) if method.startswith(DYNAMIC) else HANDLERS.get(method)
        if spec is None or method in RELEASE_ONLY.get(self.release, ()):
            raise protocol_error(f"no such method: {method!r}")
        self.current_method = method
        self.current_src = src
        dom = self.coll.get(dest)
        if src != "dom0":  # a VM's call: only what the qrexec policy allows it (policy.py)
            if self.coll.get(src) is None or dom is None:
                raise ApiError("PermissionDenied", f"calls from {src!r} to {dest!r} are not allowed")
            policy.check(self.store.dom0, self.coll, method, arg, src, dest)
        if dom is None:
            raise vm_not_found(dest)
        if spec.admin_dest is True and not dom.is_admin:
            raise protocol_error("expected destination to be AdminVM")
        if spec.admin_dest is False and dom.is_admin:
            raise protocol_error("expected destination to not be AdminVM")
        if spec.arg is True and not arg:
            raise protocol_error("expected an argument")
        if spec.arg is False and arg:
            raise protocol_error("unexpected argument")
        if not spec.payload and payload:
            raise protocol_error("unexpected payload")
        if spec.write:
            before = self.coll.to_bytes()
            try:
                out = spec.func(self, dom, arg, payload if spec.payload else b"")
            except BaseException:
                # a refused change leaves nothing behind, in memory or on disk
                self.store.coll = Collection.from_bytes(before)
                raise
            self.store.save()
        else:
            out = spec.func(self, dom, arg, payload)
        return out.encode("utf-8")

    def _dynamic(self, method: str) -> Spec | None:
        """``admin.vm.device.CLASS.OP`` (this release's OPs), ``admin.vm.Create.CLASS``,
        ``admin.vm.CreateInPool.CLASS``."""
        parts = method.split(".")
        if method.startswith("admin.vm.device.") and len(parts) >= 5 and parts[3] in DEVICE_CLASSES:
            op = ".".join(parts[4:])
            found = devices.OPERATIONS.get((self.release, op))
            if found is None:
                return None
            arg, payload, write = found
            return Spec(_device_handler(op), arg, payload, None, write)
        if len(parts) == 4 and parts[2] in ("Create", "CreateInPool"):
            return HANDLERS.get(f"admin.vm.{parts[2]}.*")
        return None

    # -- helpers ------------------------------------------------------------------------------------------
    def running(self, dom: Domain) -> bool:
        return dom.is_admin or dom.name in self.store.running

    def require_halted(self, dom: Domain) -> None:
        if self.running(dom):
            raise ApiError("QubesVMNotHaltedError", f"Domain is not powered off: {dom.name!r}")

    def referrers(self, name: str) -> list[str]:
        """What refers to ``name``: other VMs' template/netvm/default_dispvm (effective), global properties."""
        out = []
        for dom in self.coll.domains:
            if dom.name == name:
                continue
            for prop in ("template", "netvm", "default_dispvm", "management_dispvm"):
                try:
                    if props.value_text(self.coll, dom, prop) == name:
                        out.append(f"{dom.name}.{prop}")
                except ApiError:
                    pass
        for gname, value in self.coll.global_properties.items():
            if value == name:
                out.append(gname)
        return out


# -- domains ----------------------------------------------------------------------------------------------------
@api("admin.vm.List")
def vm_list(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    doms = self.coll.domains if dom.is_admin else [dom]
    lines = []
    for d in sorted(doms, key=lambda d: (not d.is_admin, d.name)):  # qubesd sorts dom0 first, then by name
        line = f"{d.name} class={d.klass} state={'Running' if self.running(d) else 'Halted'}"
        if self.release != "4.2":  # R4.3 adds the VM's uuid (dom0's is all zeros)
            line += f" uuid={ADMIN_UUID if d.is_admin else d.raw_property('uuid')}"
        lines.append(line)
    return _lines(lines)


@api("admin.vm.property.GetAll")
def vm_property_get_all(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    ps = sorted(props.vm_props(dom), key=lambda p: p.name)
    return _lines([f"{p.name} {props.escape(props.serialize(self.coll, dom, p.name))}" for p in ps])


@api("admin.vm.property.Get", arg=True)
def vm_property_get(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    return props.serialize(self.coll, dom, arg)


@api("admin.vm.property.GetDefault", arg=True)
def vm_property_get_default(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    p = props.vm_prop(dom, arg)
    if p.default is None:
        return ""
    return f"type={p.type} {p.default(self.coll, dom) or ''}"


@api("admin.vm.property.Set", arg=True, payload=True, write=True)
def vm_property_set(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    p = props.vm_prop(dom, arg)
    if p.readonly:
        raise ApiError("QubesPropertyAccessError", f"Failed to set property {arg!r}: read-only")
    text = props.parse_value(self.coll, p, payload)
    if p.type == "vm" and not text and arg == "template":
        raise props.prop_value_error("template: cannot be None")
    props.check_vm_value(self.coll, dom, p, text, self.store.running,
                         self.store.dom0 / "var/lib/qubes/vm-kernels")  # fmt: skip
    dom.set_property(arg, text)
    return ""


@api("admin.vm.property.Reset", arg=True, write=True)
def vm_property_reset(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    p = props.vm_prop(dom, arg)
    if p.readonly or p.default is None:
        raise ApiError("QubesPropertyAccessError", f"Failed to reset property {arg!r}: no default")
    if arg == "template" and self.running(dom):
        self.require_halted(dom)
    dom.remove_property(arg)
    return ""


@api("admin.property.GetAll", admin_dest=True)
def global_get_all(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    return _lines([f"{p.name} {props.escape(props.serialize_global(self.coll, p.name))}" for p in props.GLOBAL_PROPS])


@api("admin.property.Get", arg=True, admin_dest=True)
def global_get(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    return props.serialize_global(self.coll, arg)


@api("admin.property.Set", arg=True, payload=True, admin_dest=True, write=True)
def global_set(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    p = props.global_prop(arg)
    text = props.parse_value(self.coll, p, payload)
    target = self.coll.get(text) if p.type == "vm" and text else None
    provides = target is not None and props.value_text(self.coll, target, "provides_network") == "True"
    if arg == "default_netvm" and target is not None and not provides:
        raise props.prop_value_error(f"default_netvm: {text!r} does not provide network")
    if arg.startswith("default_pool") and text and text not in self.coll.pools:
        raise props.prop_value_error(f"{arg}: no such pool {text!r}")
    self.coll.set_global_property(arg, text)
    return ""


@api("admin.property.Reset", arg=True, admin_dest=True, write=True)
def global_reset(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    props.global_prop(arg)
    el = self.coll.root.find("properties")
    for p in [] if el is None else el.findall("property"):
        if p.get("name") == arg:
            el.remove(p)  # type: ignore[union-attr]
    return ""


# -- labels, features, tags -----------------------------------------------------------------------------------
@api("admin.label.List", admin_dest=True)
def label_list(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    return _lines(list(self.coll.labels.values()))


def _label_el(self: Api, name: str) -> etree._Element:
    labels = self.coll.root.find("labels")
    for el in [] if labels is None else labels.findall("label"):
        if el.text == name:
            return el
    raise ApiError("QubesLabelNotFoundError", f"Label does not exist: {name!r}")


@api("admin.label.Get", arg=True, admin_dest=True)
def label_get(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    return _label_el(self, arg).get("color", "")


@api("admin.label.Index", arg=True, admin_dest=True)
def label_index(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    return _label_el(self, arg).get("id", "").removeprefix("label-")


MAX_DEFAULT_LABEL = 8  # qubes.config.max_default_label: labels 1..8 are Qubes' own
_LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@api("admin.label.Create", arg=True, payload=True, admin_dest=True, write=True)
def label_create(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    """A new label (name = ARG, colour = payload ``0xRRGGBB``) with the next index above Qubes' own."""
    if arg.isdigit() or not _LABEL_NAME_RE.match(arg):
        raise ApiError("PermissionDenied", "label name")
    if self.coll.label_id(arg) is not None:
        raise ApiError("QubesValueError", "label already exists")
    try:
        color = payload.decode("ascii").strip()
    except UnicodeDecodeError:
        raise protocol_error("label colour is not ASCII") from None
    if len(color) != 8 or not color.startswith("0x") or not all(c in string.hexdigits for c in color[2:]):
        raise ApiError("PermissionDenied", "label colour")
    labels = self.coll.root.find("labels")
    assert labels is not None
    index = max([MAX_DEFAULT_LABEL, *(int(el.get("id", "label-0").removeprefix("label-"))
                                      for el in labels.findall("label"))]) + 1  # fmt: skip
    etree.SubElement(labels, "label", color=color, id=f"label-{index}").text = arg
    return ""


@api("admin.label.Remove", arg=True, admin_dest=True, write=True)
def label_remove(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    try:
        el = _label_el(self, arg)
    except ApiError:
        raise ApiError("QubesValueError", "") from None
    lid = el.get("id", "")
    if int(lid.removeprefix("label-") or 0) <= MAX_DEFAULT_LABEL:
        raise ApiError("PermissionDenied", "a default label")
    if any(d.raw_property("label") == lid for d in self.coll.domains):
        raise ApiError("QubesException", "label still in use")
    el.getparent().remove(el)  # type: ignore[union-attr]
    return ""


@api("admin.vm.feature.List")
def feature_list(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    return _lines(list(dom.features))


@api("admin.vm.feature.Get", arg=True)
def feature_get(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    feats = dom.features
    if arg not in feats:
        raise ApiError("QubesFeatureNotFoundError", f"Feature not set for domain {dom.name}: {arg}")
    return feats[arg]


@api("admin.vm.feature.Set", arg=True, payload=True, write=True)
def feature_set(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    if not _FEATURE_RE.match(arg):
        raise protocol_error(f"invalid feature name {arg!r}")
    value = _text(payload)
    if "\0" in value:
        raise protocol_error("feature value contains NUL")
    dom.set_feature(arg, value)
    return ""


@api("admin.vm.feature.Remove", arg=True, write=True)
def feature_remove(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    if arg not in dom.features:
        raise ApiError("QubesFeatureNotFoundError", f"Feature not set for domain {dom.name}: {arg}")
    dom.remove_feature(arg)
    return ""


@api("admin.vm.tag.List")
def tag_list(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    return _lines(dom.tags)


def _tags_el(dom: Domain) -> etree._Element:
    el = dom.element.find("tags")
    return etree.SubElement(dom.element, "tags") if el is None else el


def _check_created_by(self: Api, arg: str) -> None:
    """created-by-* tags: qubes/ext/admin.py refuses changing them to callers other than dom0 (an AdminVM)."""
    _check_tag(arg)
    if arg.startswith("created-by-") and self.current_src != "dom0":
        raise ApiError("PermissionDenied", f"changing tag {arg!r} is not allowed")


def _check_tag(arg: str) -> None:
    if not _TAG_RE.match(arg):
        raise ApiError("QubesInvalidTagError", "disallowed characters" if arg else "tag cannot be empty")


@api("admin.vm.tag.Get", arg=True)
def tag_get(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    _check_tag(arg)
    return "1" if arg in dom.tags else "0"


@api("admin.vm.tag.Set", arg=True, write=True)
def tag_set(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    _check_created_by(self, arg)
    if arg not in dom.tags:
        etree.SubElement(_tags_el(dom), "tag", name=arg)
    return ""


@api("admin.vm.tag.Remove", arg=True, write=True)
def tag_remove(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    _check_created_by(self, arg)
    el = _tags_el(dom)
    found = [t for t in el.findall("tag") if t.get("name") == arg]
    if not found:
        raise ApiError("QubesTagNotFoundError", f"Tag not set for domain {dom.name}: {arg}")
    for t in found:
        el.remove(t)
    return ""


# -- devices --------------------------------------------------------------------------------------------------
@api("admin.deviceclass.List", admin_dest=True)
def deviceclass_list(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    return _lines(list(DEVICE_CLASSES))


def _device_handler(op: str) -> Handler:
    def handler(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
        devclass = self.current_method.split(".")[3]
        return devices.handle(self, self.release, dom, devclass, op, arg, payload)

    return handler


# -- firewall, notes --------------------------------------------------------------------------------------------
def _vm_dir(self: Api, dom: Domain) -> str:
    return self.coll.vm_dir(dom) or ""


@api("admin.vm.firewall.Get", admin_dest=False)
def firewall_get(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    return _lines(firewall.load(self.store.dom0 / "var/lib/qubes" / _vm_dir(self, dom) / "firewall.xml"))


@api("admin.vm.firewall.Set", payload=True, admin_dest=False, write=True)
def firewall_set(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    rules = firewall.parse_rules(_text(payload))
    firewall.save(self.store.dom0 / "var/lib/qubes" / _vm_dir(self, dom) / "firewall.xml", rules)
    return ""


@api("admin.vm.notes.Get", admin_dest=False)
def notes_get(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    path = self.store.dom0 / "var/lib/qubes" / _vm_dir(self, dom) / "notes.txt"
    return path.read_text("utf-8", "replace") if path.is_file() else ""


@api("admin.vm.notes.Set", payload=True, admin_dest=False, write=True)
def notes_set(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    from .store import write_bytes_atomic

    text = _text(payload)
    if len(payload) > 256_000 or any(not (c.isprintable() or c in "\n\t") for c in text):
        raise value_error("notes: too long or with control characters")
    path = self.store.dom0 / "var/lib/qubes" / _vm_dir(self, dom) / "notes.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(payload, path)
    return ""


# -- volumes, pools -------------------------------------------------------------------------------------------
@api("admin.vm.volume.List")
def volume_list(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    return _lines(sorted(v.name for v in dom.volumes))


@api("admin.vm.volume.Info", arg=True, admin_dest=False)
def volume_info(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    vol = dom.volume(arg)
    if vol is None:
        raise ApiError("PermissionDenied", f"Argument not in volumes of {dom.name}: {arg!r}")
    return self.storage.volume_info(dom, vol)


@api("admin.pool.List", admin_dest=True)
def pool_list(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    return _lines(list(self.coll.pools))


@api("admin.pool.Info", arg=True, admin_dest=True)
def pool_info(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    return "".join(f"{k}={v}\n" for k, v in sorted(self.storage.pool_info(arg).items()))


@api("internal.vm.volume.ImportBegin", arg=True, payload=True, admin_dest=False)
def import_begin(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    """Replies ``SIZE PATH`` like qubesd; PATH is a host path (the sim import service writes there)."""
    vol = dom.volume(arg)
    if vol is None:
        raise protocol_error(f"Argument not in volumes of {dom.name}: {arg!r}")
    self.require_halted(dom)
    text = payload.decode("ascii", "replace")
    if not re.fullmatch(r"[0-9]{1,20}", text) or int(text) > MAX_IMPORT:
        raise protocol_error(f"invalid size of new data: {text!r}")
    if not vol.save_on_stop:
        raise ApiError("StoragePoolException", f"Can not import into save_on_stop=False volume {dom.name}:{arg}")
    path = self.storage.import_begin(dom, vol, int(text))
    self.imports_open.add((dom.name, arg))
    return f"{int(text)} {path}"


@api("internal.vm.volume.ImportEnd", arg=True, payload=True, admin_dest=False, write=True)
def import_end(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    vol = dom.volume(arg)
    if vol is None:
        raise protocol_error(f"Argument not in volumes of {dom.name}: {arg!r}")
    ok = payload == b"ok"
    if not ok and not (payload == b"fail" or payload.startswith(b"fail\n")):
        raise protocol_error("ImportEnd payload must be ok or fail")
    self.imports_open.discard((dom.name, arg))
    self.storage.import_end(dom, vol, ok)
    if not ok:
        self.store.save()
        msg = payload.decode("utf-8", "replace").partition("\n")[2]
        raise ApiError("QubesException", f"Data import failed: {msg}")
    return ""


# -- life cycle -------------------------------------------------------------------------------------------------
CREATE_CLASSES = ("AppVM", "TemplateVM", "StandaloneVM", "DispVM")


def _create(self: Api, klass: str, tpl_name: str, payload: bytes, in_pool: bool) -> str:
    if klass not in CREATE_CLASSES:
        raise protocol_error(f"invalid VM class {klass!r}")
    fields: dict[str, str] = {}
    pools: dict[str, str] = {}
    for word in _text(payload).split(" "):
        k, eq, v = word.partition("=")
        if not eq:
            raise protocol_error(f"invalid create parameter {word!r}")
        if in_pool and (k == "pool" or k.startswith("pool:")):
            if v not in self.coll.pools:
                raise ApiError("QubesException", f"No such pool: {v!r}")
            pools[k] = v
        elif k in ("name", "label") and k not in fields:
            fields[k] = v
        else:
            raise protocol_error(f"invalid create parameter {word!r}")
    if "name" not in fields or "label" not in fields:
        raise protocol_error("name and label are required")
    name = fields["name"]
    try:
        validate_name(name)
    except QubesXmlError as e:
        raise value_error(str(e)) from None
    if name in self.coll or name == "dom0":
        raise value_error(f"VM {name} already exists")
    lid = self.coll.label_id(fields["label"])
    if lid is None:
        raise ApiError("QubesLabelNotFoundError", f"Label does not exist: {fields['label']!r}")
    template = _create_template(self, klass, tpl_name)
    vol_pools = _create_pools(self, pools)
    qid = self.coll.next_qid()
    el = etree.SubElement(self.coll.root.find("domains"), "domain", id=f"domain-{qid}")  # type: ignore[arg-type]
    el.set("class", klass)
    dom = Domain(el, self.coll)
    for k, v in (("label", lid), ("name", name), ("qid", str(qid)), ("uuid", str(uuidlib.uuid4()))):
        dom.set_property(k, v)
    if template is not None and klass in ("AppVM", "DispVM"):
        dom.set_property("template", template.name)
    etree.SubElement(el, "features")
    for cls in ("pci", "block", "usb"):
        etree.SubElement(el, "devices").set("class", cls)
    etree.SubElement(etree.SubElement(el, "tags"), "tag", name="created-by-dom0")
    vols = self.storage.volume_config(name, klass, template, vol_pools)
    kernel = props.value_text(self.coll, dom, "kernel")
    write_volume_config(dom, vols, kernel)
    (self.store.dom0 / "var/lib/qubes" / Collection.default_vm_dir(name, klass)).mkdir(parents=True, exist_ok=True)
    try:
        self.storage.create_data(dom, template if klass in ("TemplateVM", "StandaloneVM") else None)
    except BaseException:
        self.storage.remove_data(dom)
        raise
    return ""


def _create_template(self: Api, klass: str, tpl_name: str) -> Domain | None:
    if not tpl_name:
        if klass == "AppVM":
            tpl_name = props.global_value(self.coll, "default_template") or ""
        elif klass == "DispVM":
            tpl_name = props.global_value(self.coll, "default_dispvm") or ""
        if not tpl_name and klass in ("AppVM", "DispVM"):
            raise ApiError("QubesValueError", f"{klass} needs a template")
        if not tpl_name:
            return None
    tpl = self.coll.get(tpl_name)
    if tpl is None:
        raise vm_not_found(tpl_name)
    want = "AppVM" if klass == "DispVM" else "TemplateVM"
    if tpl.klass != want:
        raise ApiError("QubesValueError", f"template {tpl_name!r} is not a {want}")
    if klass == "DispVM" and props.value_text(self.coll, tpl, "template_for_dispvms") != "True":
        raise ApiError("QubesValueError", f"template {tpl_name!r} has template_for_dispvms=False")
    return tpl


def _create_pools(self: Api, given: dict[str, str]) -> dict[str, str]:
    out = {}
    for vol in ("root", "private", "volatile"):
        pool = given.get(f"pool:{vol}") or given.get("pool")
        out[vol] = pool or props.global_value(self.coll, f"default_pool_{vol}") or ""
        if out[vol] not in self.coll.pools:
            raise ApiError("QubesException", f"No such pool: {out[vol]!r}")
    return out


@api("admin.vm.Create.*", arg=None, payload=True, admin_dest=True, write=True)
def vm_create(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    return _create(self, self.current_method.split(".")[3], arg, payload, False)


@api("admin.vm.CreateInPool.*", arg=None, payload=True, admin_dest=True, write=True)
def vm_create_in_pool(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    return _create(self, self.current_method.split(".")[3], arg, payload, True)


@api("admin.vm.Remove", admin_dest=False, write=True)
def vm_remove(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    self.require_halted(dom)
    users = self.referrers(dom.name)
    if users:
        raise ApiError("QubesVMInUseError", f"VM {dom.name} is in use: {', '.join(users)}")
    self.storage.remove_data(dom)
    self.coll.remove_domain(dom.name)
    return ""


@api("admin.vm.Start", admin_dest=False, write=True)
def vm_start(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    _start(self, dom, set())
    self.store.save_run_state()
    return ""


def _start(self: Api, dom: Domain, seen: set[str]) -> None:
    if self.running(dom):
        if not seen:
            raise ApiError("QubesVMNotHaltedError", f"Domain is already running: {dom.name!r}")
        return
    if IN_PROGRESS_TAG in dom.tags:
        raise ApiError("QubesException", f"VM {dom.name} is being restored (tagged {IN_PROGRESS_TAG}): not starting")
    if dom.klass == "AppVM" and dom.volume("root") is None:
        raise ApiError("QubesException", f"VM {dom.name} has no root volume")
    seen.add(dom.name)
    netvm = props.value_text(self.coll, dom, "netvm")
    nd = self.coll.get(netvm) if netvm else None
    if nd is not None and nd.name not in seen:
        _start(self, nd, seen)  # qubesd starts the netvm first
    self.storage.start(dom)
    self.store.running.add(dom.name)


@api("admin.vm.Shutdown", admin_dest=False, write=True)
def vm_shutdown(self: Api, dom: Domain, arg: str, payload: bytes) -> str:
    if not self.running(dom):
        raise ApiError("QubesVMNotStartedError", f"Domain is powered off: {dom.name!r}")
    self.storage.shutdown(dom)
    self.store.running.discard(dom.name)
    self.store.save_run_state()
    return ""


HANDLERS["admin.vm.Kill"] = HANDLERS["admin.vm.Shutdown"]


from . import disposable  # noqa: E402, F401 - registers admin.vm.CreateDisposable, auto-cleanup of DispVMs
