"""The Qubes collection: qubes.xml in the current R4 schema, read and written with lxml.

The same code reads dom0's own qubes.xml and the ``<qubes>`` embedded in a backup manifest, so parsing is
hardened (no DTD, no entities, no network, libxml2 size limits) and VM names and volume ids are checked before
anyone turns them into paths.  Unknown elements and attributes are kept untouched, so a round trip through
this module never loses what a newer Qubes wrote.
"""

from __future__ import annotations

import copy
import os
import re
import uuid as uuidlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from lxml import etree

from qubes_backup_dom0.errors import BackupError

#: Upper bound for a qubes.xml we accept (a real one is tens of KiB; the manifest is bounded at 16 MiB).
MAX_XML_BYTES = 16 * 1024 * 1024
#: Qubes' own limit on qids (qubes.config.max_qid).
MAX_QID = 254
#: dom0's Qubes root on a real system; pool dir_paths under it are remapped into a simulated root.
REAL_QUBES_ROOT = PurePosixPath("/var/lib/qubes")
FILE_DRIVERS = frozenset({"file", "file-reflink"})
#: Properties that name another domain; absent means "the system default", empty text means None.
VM_REFERENCES = ("template", "netvm", "default_dispvm")

BACKUP_FEATURES = ("backup-content", "backup-path", "backup-size")

_NAME_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9_.-]*$")
_VID_PART_RE = re.compile(r"^[a-zA-Z0-9_.+-]+$")


class QubesXmlError(BackupError):
    """qubes.xml (or a manifest's <qubes>) is malformed or unsafe."""


def validate_name(name: str) -> str:
    """Check a VM name like Qubes does; names become directory names, so this also blocks path tricks."""
    if not isinstance(name, str) or len(name) > 31 or not _NAME_RE.match(name) or name in (".", ".."):
        raise QubesXmlError(f"invalid VM name {name!r}")
    return name


def _check_vid(vid: str) -> PurePosixPath:
    """A file-pool vid is a relative path of plain components; anything else could escape the pool."""
    p = PurePosixPath(vid)
    bad = any(part in (".", "..") or not _VID_PART_RE.match(part) for part in p.parts)
    if not vid or p.is_absolute() or bad:
        raise QubesXmlError(f"unsafe volume id {vid!r}")
    return p


def _make_parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_blank_text=True
    )


def parse_xml(data: bytes, max_bytes: int = MAX_XML_BYTES) -> etree._Element:
    """Parse untrusted-shaped XML: bounded, no DOCTYPE (so no entities), no network."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("parse_xml takes bytes")
    data = bytes(data)
    if len(data) > max_bytes:
        raise QubesXmlError(f"XML document too large ({len(data)} bytes > {max_bytes})")
    try:
        root = etree.fromstring(data, _make_parser())
    except etree.XMLSyntaxError as e:
        raise QubesXmlError(f"malformed XML: {e}") from None
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:  # type: ignore[union-attr]
        raise QubesXmlError("XML with a DOCTYPE is refused")
    for node in root.iter():
        if isinstance(node, etree._Entity | etree._ProcessingInstruction):
            raise QubesXmlError("XML entities and processing instructions are refused")
    return root


def _bool(text: str | None) -> bool:
    return (text or "").strip().lower() in ("true", "1", "yes", "on")


def _to_text(value: object) -> str:
    """Qubes' textual form of a property value: None -> '' (explicit None), bools as True/False."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


@dataclass
class Volume:
    """A snapshot of one ``<volume>`` of a domain's volume-config (edit through the domain, not this)."""

    name: str
    pool: str
    vid: str
    size: int | None
    save_on_stop: bool
    snap_on_start: bool
    rw: bool
    source: str | None
    attrib: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_element(cls, el: etree._Element) -> Volume:
        a: dict[str, str] = {str(k): str(v) for k, v in el.attrib.items()}
        size_text = a.get("size")
        try:
            size = int(size_text) if size_text not in (None, "") else None
        except ValueError:
            raise QubesXmlError(f"volume {a.get('name')!r}: bad size {size_text!r}") from None
        if size is not None and size < 0:
            raise QubesXmlError(f"volume {a.get('name')!r}: negative size")
        return cls(
            name=a.get("name", ""),
            pool=a.get("pool", ""),
            vid=a.get("vid", ""),
            size=size,
            save_on_stop=_bool(a.get("save_on_stop")),
            snap_on_start=_bool(a.get("snap_on_start")),
            rw=_bool(a.get("rw")),
            source=a.get("source") or None,
            attrib=a,
        )


class Domain:
    """A live view of one ``<domain>`` element; setters edit the document in place."""

    def __init__(self, element: etree._Element, collection: Collection | None = None) -> None:
        self.element = element
        self.collection = collection

    def __repr__(self) -> str:
        return f"<Domain {self.name} {self.klass} qid={self.qid}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Domain) and other.element is self.element

    def __hash__(self) -> int:
        return id(self.element)

    # -- raw access --------------------------------------------------------------------------------------
    def _section(self, tag: str, create: bool = False) -> etree._Element | None:
        el = self.element.find(tag)
        if el is None and create:
            el = etree.SubElement(self.element, tag)
        return el

    def _prop_el(self, name: str) -> etree._Element | None:
        props = self._section("properties")
        if props is None:
            return None
        for p in props.findall("property"):
            if p.get("name") == name:
                return p
        return None

    def raw_property(self, name: str) -> str | None:
        """The property's text: None when absent (system default), '' when explicitly None."""
        el = self._prop_el(name)
        return None if el is None else (el.text or "")

    def has_property(self, name: str) -> bool:
        return self._prop_el(name) is not None

    @property
    def properties(self) -> dict[str, str]:
        props = self._section("properties")
        if props is None:
            return {}
        return {p.get("name", ""): p.text or "" for p in props.findall("property")}

    @property
    def features(self) -> dict[str, str]:
        feats = self._section("features")
        if feats is None:
            return {}
        return {f.get("name", ""): f.text or "" for f in feats.findall("feature")}

    def feature_bool(self, name: str, default: bool = False) -> bool:
        """Qubes feature truthiness: '' , '0' and 'False' are false."""
        value = self.features.get(name)
        if value is None:
            return default
        return value.strip().lower() not in ("", "0", "false", "no", "off")

    @property
    def tags(self) -> list[str]:
        tags = self._section("tags")
        return [] if tags is None else [t.get("name", "") for t in tags.findall("tag")]

    def set_property(self, name: str, value: object) -> None:
        """Set a property; ``None`` stores an explicit None (empty text), bools as True/False."""
        el = self._prop_el(name)
        if el is None:
            props = self._section("properties", create=True)
            assert props is not None
            el = etree.SubElement(props, "property", name=name)
        el.text = _to_text(value)

    def remove_property(self, name: str) -> None:
        """Drop a property so it falls back to the system default."""
        el = self._prop_el(name)
        if el is not None:
            parent = el.getparent()
            if parent is not None:
                parent.remove(el)

    def set_feature(self, name: str, value: object) -> None:
        feats = self._section("features", create=True)
        assert feats is not None
        for f in feats.findall("feature"):
            if f.get("name") == name:
                f.text = _to_text(value)
                return
        etree.SubElement(feats, "feature", name=name).text = _to_text(value)

    def remove_feature(self, name: str) -> None:
        feats = self._section("features")
        if feats is not None:
            for f in feats.findall("feature"):
                if f.get("name") == name:
                    feats.remove(f)

    # -- typed properties --------------------------------------------------------------------------------
    @property
    def klass(self) -> str:
        return self.element.get("class", "")

    @property
    def is_admin(self) -> bool:
        return self.klass == "AdminVM"

    @property
    def name(self) -> str:
        name = self.raw_property("name")
        if not name and self.is_admin:
            return "dom0"  # R4 stores no name for dom0
        return name or ""

    @property
    def qid(self) -> int:
        text = self.raw_property("qid")
        if not text:
            if self.is_admin:
                return 0
            raise QubesXmlError(f"domain {self.name!r} has no qid")
        try:
            return int(text)
        except ValueError:
            raise QubesXmlError(f"domain {self.name!r}: bad qid {text!r}") from None

    @property
    def uuid(self) -> str | None:
        return self.raw_property("uuid") or None

    @property
    def label_id(self) -> str | None:
        return self.raw_property("label") or None

    @property
    def label(self) -> str | None:
        """The label's name (red, blue, ...), resolved from its ``label-N`` id."""
        lid = self.label_id
        if lid is None:
            return None
        if self.collection is not None:
            return self.collection.labels.get(lid, lid)
        return lid

    def _ref(self, name: str) -> str | None:
        return self.raw_property(name) or None

    @property
    def template(self) -> str | None:
        """Explicit template, None if absent or empty (see ``Collection.effective_template``)."""
        return self._ref("template")

    @property
    def netvm(self) -> str | None:
        """Explicit netvm, None if absent (default) or empty (no network); see ``effective_netvm``."""
        return self._ref("netvm")

    @property
    def default_dispvm(self) -> str | None:
        return self._ref("default_dispvm")

    @property
    def include_in_backups(self) -> bool:
        raw = self.raw_property("include_in_backups")
        return True if raw is None else _bool(raw)

    @property
    def provides_network(self) -> bool:
        return _bool(self.raw_property("provides_network"))

    def dependency_names(self) -> set[str]:
        """Names this domain refers to explicitly (template, netvm, default_dispvm)."""
        return {v for v in (self._ref(n) for n in VM_REFERENCES) if v}

    # -- volumes -----------------------------------------------------------------------------------------
    def _volume_elements(self) -> list[etree._Element]:
        vc = self._section("volume-config")
        return [] if vc is None else vc.findall("volume")

    @property
    def volumes(self) -> list[Volume]:
        return [Volume.from_element(v) for v in self._volume_elements()]

    def volume(self, name: str) -> Volume | None:
        return next((v for v in self.volumes if v.name == name), None)


class Collection:
    """A whole qubes.xml document: labels, pools, global properties, domains."""

    def __init__(self, root: etree._Element) -> None:
        if root.tag != "qubes":
            raise QubesXmlError(f"root element is <{root.tag}>, expected <qubes>")
        self.root = root
        for sec in ("labels", "pools", "properties", "domains"):
            if root.find(sec) is None:
                etree.SubElement(root, sec)
        self._validate()

    def _validate(self) -> None:
        """Refuse documents whose names would be ambiguous or unsafe as paths."""
        seen: set[str] = set()
        for dom in self.domains:
            if not dom.klass:
                raise QubesXmlError("domain without a class")
            name = dom.name
            validate_name(name)
            if name in seen:
                raise QubesXmlError(f"duplicate VM name {name!r}")
            seen.add(name)
            dom.qid  # noqa: B018 - raises on a malformed qid
            dom.volumes  # noqa: B018 - raises on a malformed size

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, data: bytes) -> Collection:
        return cls(parse_xml(data))

    @classmethod
    def from_element(cls, element: etree._Element) -> Collection:
        """Wrap a deep copy of an already-parsed ``<qubes>`` element (e.g. the one inside a manifest)."""
        return cls(copy.deepcopy(element))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Collection:
        with open(path, "rb") as f:
            data = f.read(MAX_XML_BYTES + 1)
        try:
            return cls.from_bytes(data)
        except QubesXmlError as e:
            raise QubesXmlError(f"{path}: {e}") from None

    @classmethod
    def empty(cls) -> Collection:
        return cls(etree.Element("qubes"))

    def copy(self) -> Collection:
        return Collection(copy.deepcopy(self.root))

    def to_bytes(self) -> bytes:
        return etree.tostring(self.root, pretty_print=True, encoding="UTF-8", xml_declaration=True)

    # -- reading -----------------------------------------------------------------------------------------
    def _child(self, tag: str) -> etree._Element:
        """A top-level section; ``__init__`` creates every missing one, so it always exists."""
        el = self.root.find(tag)
        if el is None:
            raise QubesXmlError(f"qubes.xml has no <{tag}>")
        return el

    @property
    def _domains_el(self) -> etree._Element:
        return self._child("domains")

    @property
    def domains(self) -> list[Domain]:
        return [Domain(el, self) for el in self._domains_el.findall("domain")]

    def __iter__(self) -> Iterator[Domain]:
        return iter(self.domains)

    def __contains__(self, name: object) -> bool:
        return self.get(name) is not None  # type: ignore[arg-type]

    def __getitem__(self, name: str) -> Domain:
        dom = self.get(name)
        if dom is None:
            raise KeyError(name)
        return dom

    def get(self, name: str) -> Domain | None:
        return next((d for d in self.domains if d.name == name), None)

    def names(self) -> list[str]:
        return [d.name for d in self.domains]

    @property
    def labels(self) -> dict[str, str]:
        """label id (``label-N``) -> label name."""
        return {el.get("id", ""): el.text or "" for el in self._child("labels").findall("label")}

    def label_id(self, name: str) -> str | None:
        return next((lid for lid, lname in self.labels.items() if lname == name), None)

    @property
    def pools(self) -> dict[str, dict[str, str]]:
        pools = self._child("pools").findall("pool")
        return {el.get("name", ""): {str(k): str(v) for k, v in el.attrib.items()} for el in pools}

    @property
    def global_properties(self) -> dict[str, str]:
        props = self._child("properties")
        return {p.get("name", ""): p.text or "" for p in props.findall("property")}

    def set_global_property(self, name: str, value: object) -> None:
        props = self._child("properties")
        for p in props.findall("property"):
            if p.get("name") == name:
                p.text = _to_text(value)
                return
        etree.SubElement(props, "property", name=name).text = _to_text(value)

    # -- paths -------------------------------------------------------------------------------------------
    def volume_path(self, volume: Volume, qubes_root: Path) -> Path | None:
        """Where a file-pool volume's image lives, mapped into ``qubes_root`` (None for lvm/kernel pools)."""
        pool = self.pools.get(volume.pool)
        if pool is None or pool.get("driver") not in FILE_DRIVERS or not volume.vid:
            return None
        rel = _check_vid(volume.vid)
        dir_path = PurePosixPath(pool.get("dir_path") or str(REAL_QUBES_ROOT))
        if not dir_path.is_absolute():
            raise QubesXmlError(f"pool {volume.pool!r}: dir_path must be absolute")
        qubes_root = Path(qubes_root)
        if dir_path == REAL_QUBES_ROOT or REAL_QUBES_ROOT in dir_path.parents:
            base = qubes_root / dir_path.relative_to(REAL_QUBES_ROOT)
        elif qubes_root.parts[-3:] == ("var", "lib", "qubes"):
            # qubes_root is DIR/var/lib/qubes: put other absolute pool dirs under the same (simulated) root.
            base = qubes_root.parents[2] / dir_path.relative_to("/")
        else:
            base = Path(dir_path)
        return base / rel.parent / f"{rel.name}.img"

    def _is_file_pool(self, pool_name: str) -> bool:
        return self.pools.get(pool_name, {}).get("driver") in FILE_DRIVERS

    @staticmethod
    def default_vm_dir(name: str, klass: str) -> str:
        return f"vm-templates/{name}" if klass == "TemplateVM" else f"appvms/{name}"

    def vm_dir(self, domain: Domain) -> str | None:
        """The VM's directory relative to the Qubes root (``appvms/work``); None for dom0.

        Taken from the private (else root, else any) file-pool volume's vid, since a renamed or migrated VM
        keeps its old directory; falls back to where Qubes would put a VM of this class.
        """
        if domain.is_admin:
            return None
        vols = sorted(domain.volumes, key=lambda v: {"private": 0, "root": 1}.get(v.name, 2))
        for v in vols:
            if self._is_file_pool(v.pool) and v.vid:
                parent = _check_vid(v.vid).parent
                if len(parent.parts) >= 2:
                    return str(parent)
        return self.default_vm_dir(domain.name, domain.klass)

    # -- defaults ----------------------------------------------------------------------------------------
    def _resolve(self, domain: Domain, prop: str, default: str | None) -> str | None:
        raw = domain.raw_property(prop)
        value = default if raw is None else (raw or None)
        return None if value == domain.name else value

    def effective_netvm(self, domain: Domain) -> str | None:
        """netvm as Qubes would see it: explicit, else default_netvm (templates and dom0: no network)."""
        default = None
        if domain.klass not in ("AdminVM", "TemplateVM"):
            default = self.global_properties.get("default_netvm") or None
        return None if domain.is_admin else self._resolve(domain, "netvm", default)

    def effective_template(self, domain: Domain) -> str | None:
        """template as Qubes would see it: explicit, else default_template (DispVM: default_dispvm)."""
        g = self.global_properties
        if domain.klass in ("AppVM",):
            default = g.get("default_template") or None
        elif domain.klass == "DispVM":
            default = g.get("default_dispvm") or None
        else:
            return None  # templates, standalones and dom0 have no template
        return self._resolve(domain, "template", default)

    def effective_default_dispvm(self, domain: Domain) -> str | None:
        if domain.is_admin:
            return None
        return self._resolve(domain, "default_dispvm", self.global_properties.get("default_dispvm") or None)

    def effective_dependencies(self, domain: Domain) -> list[str]:
        out = [
            self.effective_template(domain),
            self.effective_netvm(domain),
            self.effective_default_dispvm(domain),
        ]
        return [n for n in out if n]

    def dependencies(self, names: Iterable[str]) -> list[str]:
        """VMs the given ones need on another system (template, netvm, default_dispvm, recursively).

        Excludes the given names and dom0; names that are not in the collection are skipped.  The result is
        ordered so that every VM comes after what it depends on (templates before their VMs).
        """
        start = set(names)
        closure: set[str] = set()
        todo = list(start)
        while todo:
            dom = self.get(todo.pop())
            if dom is None:
                continue
            for dep in self.effective_dependencies(dom):
                if dep != "dom0" and dep not in start and dep not in closure and self.get(dep) is not None:
                    closure.add(dep)
                    todo.append(dep)
        # Order by template and netvm edges only: those never form cycles in Qubes, while default_dispvm
        # does (fedora-41 -> fedora-41-dvm -> fedora-41) and is set after creation anyway.
        order: list[str] = []
        done: set[str] = set()

        def visit(name: str) -> None:
            if name in done:
                return
            done.add(name)
            dom = self[name]
            for dep in (self.effective_template(dom), self.effective_netvm(dom)):
                if dep in closure:
                    visit(dep)
            order.append(name)

        for name in self.names():
            if name in closure:
                visit(name)
        return order

    # -- editing -----------------------------------------------------------------------------------------
    def subset(
        self, backed_up: Mapping[str, tuple[str, int]], dependencies: Iterable[str] | None = None
    ) -> Collection:
        """The collection to store in a backup: backed-up VMs (marked with backup-path/size), their
        dependencies (backup-content=False) and dom0; labels, pools and global properties as they are."""
        if dependencies is None:
            dependencies = self.dependencies(backed_up)
        deps = set(dependencies) - set(backed_up)
        for n in [*backed_up, *deps]:
            if self.get(n) is None:
                raise QubesXmlError(f"no VM named {n!r}")
        new = self.copy()
        for dom in new.domains:
            name = dom.name
            if name in backed_up:
                path, size = backed_up[name]
                dom.set_feature("backup-content", True)
                dom.set_feature("backup-path", path)
                dom.set_feature("backup-size", int(size))
            elif name in deps or dom.is_admin:
                dom.set_feature("backup-content", False)
                dom.remove_feature("backup-path")
                dom.remove_feature("backup-size")
            else:
                new._domains_el.remove(dom.element)
        return new

    def _used_qids(self) -> set[int]:
        return {d.qid for d in self.domains}

    def next_qid(self) -> int:
        """The lowest free qid, as Qubes allocates them."""
        used = self._used_qids()
        for q in range(1, MAX_QID + 1):
            if q not in used:
                return q
        raise QubesXmlError("no free qid left")

    def add_domain(self, source: etree._Element | Domain, new_name: str | None = None) -> Domain:
        """Add a copy of a domain (e.g. from a backup's collection) with a fresh qid, uuid and id.

        File-pool volume ids move to the VM's new directory, so a renamed copy never shares image files with
        the original.  A label is mapped by name when the source comes from another collection.  The
        backup-content/backup-path/backup-size markers of a backup's collection are dropped.
        """
        src_el = source.element if isinstance(source, Domain) else source
        src_dom = source if isinstance(source, Domain) else Domain(source)
        el = copy.deepcopy(src_el)
        dom = Domain(el, self)
        if dom.is_admin:
            raise QubesXmlError("refusing to add a second AdminVM")
        name = validate_name(new_name or dom.name)
        if self.get(name) is not None:
            raise QubesXmlError(f"a VM named {name!r} already exists")
        qid = self.next_qid()
        dom.set_property("name", name)
        dom.set_property("qid", qid)
        dom.set_property("uuid", str(uuidlib.uuid4()))
        ids = {d.element.get("id") for d in self.domains}
        n = qid
        while f"domain-{n}" in ids:
            n += 1
        el.set("id", f"domain-{n}")
        for feat in BACKUP_FEATURES:  # they describe a backup's copy, not the VM
            dom.remove_feature(feat)
        if src_dom.collection is not None and src_dom.collection is not self and src_dom.label is not None:
            lid = self.label_id(src_dom.label)
            if lid is not None:
                dom.set_property("label", lid)
        new_dir = PurePosixPath(self.default_vm_dir(name, dom.klass))
        for vel in dom._volume_elements():
            vid = vel.get("vid") or ""
            if self._is_file_pool(vel.get("pool", "")) and "/" in vid:
                vel.set("vid", str(new_dir / _check_vid(vid).name))
        self._domains_el.append(el)
        return dom

    def remove_domain(self, name: str) -> None:
        self._domains_el.remove(self[name].element)

    def rename_references(self, old: str, new: str, names: Iterable[str] | None = None) -> None:
        """Point template/netvm/default_dispvm and snapshot sources of ``names`` (default: all) at ``new``."""
        targets = set(self.names() if names is None else names)
        new_dom = self.get(new)
        for dom in self.domains:
            if dom.name not in targets:
                continue
            for prop in VM_REFERENCES:
                if dom.raw_property(prop) == old:
                    dom.set_property(prop, new)
            for vel in dom._volume_elements():
                src = vel.get("source")
                if not src or "/" not in src:
                    continue
                sp = _check_vid(src)
                if len(sp.parts) >= 2 and sp.parts[-2] == old:
                    new_dir = self.vm_dir(new_dom) if new_dom is not None else str(sp.parent.parent / new)
                    vel.set("source", f"{new_dir}/{sp.name}")

    def global_defaults_refer_to(self, name: str) -> list[str]:
        """Which global properties name ``name`` (a restore must not leave them dangling)."""
        return [k for k, v in self.global_properties.items() if v == name]
