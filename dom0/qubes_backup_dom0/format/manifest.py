"""The manifest: what is in the backup (docs/FORMAT.md section 6).

It is parsed only after its MAC verified and it was decrypted, and even then it is checked as if hostile:
hardened XML parser, bounded counts, strict names and paths.  The restore plan is derived from it alone.

Its plaintext is padded with spaces to a size bucket (:func:`padded_size`), so that the length of the
encrypted member, which the backup VM sees, does not give away the number of files (one empty file adds
about 100 bytes): multiples of 4 KiB up to 64 KiB, then powers of two up to 16 MiB.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lxml import etree
from qubes_backup_protocol import names

from qubes_backup_dom0.errors import BackupError, VerificationError
from qubes_backup_dom0.text import has_unsafe_chars

MAX_MANIFEST_SIZE = 16 << 20
PAD_STEP = 4096  # buckets: multiples of PAD_STEP up to PAD_LINEAR_MAX, then powers of two
PAD_LINEAR_MAX = 65536
PAD_BYTE = b" "
DOC_END = b"</qubes-backup-manifest>\n"  # the document ends so; only PAD_BYTEs may follow
MAX_ARCHIVES = 10_000
MAX_FILES = 1_000_000
MAX_SIZE = 1 << 62
VM_PATH_PREFIXES = ("appvms/", "vm-templates/", "servicevms/")
_VM_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")
_PATH_COMPONENT_RE = re.compile(r"[^/\x00]{1,255}")
_BACKUP_ID_RE = re.compile(r"[0-9a-f]{32}")
_CREATED_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")  # a POSIX portable user name, not . or ..


@dataclass(frozen=True)
class FileEntry:
    path: str
    type: str  # file | dir | symlink
    size: int
    data: int


class _Sized(Protocol):
    @property
    def size(self) -> int: ...

    @property
    def data(self) -> int: ...


class ArchiveSizes:
    """An archive's apparent size and stored (non-hole) bytes: the sums over its files.  Shared by the
    manifest's entries and the backup plan's archives."""

    files: Sequence[_Sized]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def data(self) -> int:
        return sum(f.data for f in self.files)


@dataclass
class ArchiveEntry(ArchiveSizes):
    member: str  # vmN
    vm: str
    kind: str  # vm | home
    files: list[FileEntry] = field(default_factory=list)


@dataclass
class Manifest:
    backup_id: str
    created: str
    archives: list[ArchiveEntry]
    qubes: bytes  # the embedded <qubes> document, serialized

    def archive_for(self, vm: str) -> ArchiveEntry | None:
        return next((a for a in self.archives if a.vm == vm), None)

    def render(self) -> bytes:
        root = etree.Element("qubes-backup-manifest", version="1", created=self.created)
        root.set("backup-id", self.backup_id)
        archives = etree.SubElement(root, "archives")
        for a in self.archives:
            el = etree.SubElement(
                archives, "archive", member=a.member, vm=a.vm, kind=a.kind, size=str(a.size), data=str(a.data)
            )
            for f in a.files:
                etree.SubElement(el, "file", path=f.path, type=f.type, size=str(f.size), data=str(f.data))
        root.append(etree.fromstring(self.qubes, _parser()))
        doc = etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)
        assert doc.endswith(DOC_END)
        if len(doc) > MAX_MANIFEST_SIZE:
            raise BackupError(f"the manifest would be {len(doc)} bytes, more than a restore accepts: too many files")
        return doc + PAD_BYTE * (padded_size(len(doc)) - len(doc))


def check_header(m: Manifest, backup_id: str, created: str) -> None:
    """FORMAT.md section 6: the manifest's ``backup-id`` (hex) and ``created`` must be the header's."""
    if m.backup_id != backup_id:
        raise VerificationError("the manifest belongs to another backup")
    if m.created != created:
        raise VerificationError("the manifest's creation time differs from the header's")


def padded_size(n: int) -> int:
    """The size bucket of an ``n``-byte manifest: the smallest multiple of 4 KiB >= n (at least 4 KiB) up
    to 64 KiB, above that the smallest power of two >= n."""
    if n <= PAD_LINEAR_MAX:
        return max(PAD_STEP, -(-n // PAD_STEP) * PAD_STEP)
    return 1 << (n - 1).bit_length()


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_blank_text=True
    )


def valid_vm_name(name: str) -> bool:
    return _VM_NAME_RE.fullmatch(name) is not None and name not in (".", "..")


def valid_rel_path(path: str) -> bool:
    """A relative POSIX path without ``.``/``..`` components, empty components or control characters."""
    if not path or path.startswith("/") or len(path) > 4096 or has_unsafe_chars(path):
        return False
    return all(_PATH_COMPONENT_RE.fullmatch(c) and c not in (".", "..") for c in path.split("/"))


def _int(el: etree._Element, attr: str) -> int:
    raw = el.get(attr, "")
    if not re.fullmatch(r"0|[1-9][0-9]{0,18}", raw) or int(raw) > MAX_SIZE:
        raise VerificationError(f"manifest: bad {attr} value")
    return int(raw)


def parse(data: bytes) -> Manifest:
    """Parse a verified, decrypted manifest and check its structure."""
    if len(data) > MAX_MANIFEST_SIZE:
        raise VerificationError("manifest too large")
    body = data.rstrip(PAD_BYTE)
    if not body.endswith(DOC_END) or len(data) != padded_size(len(body)):
        raise VerificationError("manifest: not padded to its size bucket")
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as e:
        raise VerificationError(f"manifest is not well-formed XML: {e}") from None
    if root.getroottree().docinfo.doctype:  # type: ignore[union-attr]
        raise VerificationError("manifest must not have a DOCTYPE")
    if root.tag != "qubes-backup-manifest" or root.get("version") != "1":
        raise VerificationError("manifest: unsupported version")
    archives_el = root.find("archives")
    qubes_el = root.find("qubes")
    if archives_el is None or qubes_el is None:
        raise VerificationError("manifest: missing <archives> or <qubes>")
    archives: list[ArchiveEntry] = []
    seen_members: set[str] = set()
    seen_vms: set[str] = set()
    total_files = 0
    last_number = -1
    for el in archives_el:
        if el.tag != "archive" or len(archives) >= MAX_ARCHIVES:
            raise VerificationError("manifest: unexpected archive entry")
        member, vm, kind = el.get("member", ""), el.get("vm", ""), el.get("kind", "")
        if not names.is_archive_name(member) or member in seen_members:
            raise VerificationError("manifest: bad archive member name")
        number = int(member[2:])
        if number <= last_number:
            raise VerificationError("manifest: archives out of order")
        last_number = number
        if kind not in ("vm", "home") or (kind == "home") != (member == "vm0"):
            raise VerificationError(f"manifest: bad archive kind for {member}")
        if kind == "vm" and (not valid_vm_name(vm) or vm in seen_vms or vm == "dom0"):
            raise VerificationError("manifest: bad VM name")
        if kind == "home" and vm != "dom0":
            raise VerificationError("manifest: home archive must belong to dom0")
        seen_members.add(member)
        seen_vms.add(vm)
        archive = ArchiveEntry(member, vm, kind)
        seen_paths: set[str] = set()
        for fel in el:
            total_files += 1
            if fel.tag != "file" or total_files > MAX_FILES:
                raise VerificationError("manifest: unexpected file entry")
            path, ftype = fel.get("path", ""), fel.get("type", "")
            if not valid_rel_path(path) or path in seen_paths or ftype not in ("file", "dir", "symlink"):
                raise VerificationError(f"manifest: bad file entry in {member}")
            if kind == "vm" and (ftype != "file" or not path.startswith(VM_PATH_PREFIXES)):
                raise VerificationError(f"manifest: bad file path in {member}")
            if kind == "home" and not path.startswith("home/"):
                raise VerificationError("manifest: bad home path")
            size, stored = _int(fel, "size"), _int(fel, "data")
            if stored > size:
                raise VerificationError(f"manifest: stored bytes exceed the size in {member}")
            if ftype != "file" and (size or stored):
                raise VerificationError(f"manifest: a {ftype} with a size in {member}")
            seen_paths.add(path)
            archive.files.append(FileEntry(path, ftype, size, stored))
        if _int(el, "size") != archive.size or _int(el, "data") != archive.data:
            raise VerificationError(f"manifest: sizes of {member} do not add up")
        archives.append(archive)
    backup_id, created = root.get("backup-id", ""), root.get("created", "")
    if not _BACKUP_ID_RE.fullmatch(backup_id) or not _CREATED_RE.fullmatch(created):
        raise VerificationError("manifest: bad backup-id or created attribute")
    _check_qubes(qubes_el, archives)
    qubes = etree.tostring(qubes_el, encoding="UTF-8")
    return Manifest(backup_id, created, archives, qubes)


def _check_qubes(qubes_el: etree._Element, archives: list[ArchiveEntry]) -> None:
    """FORMAT.md section 6: the <qubes> domains agree with <archives>.  dom0 is the one domain of class
    AdminVM (R4 stores no name for it; if it has one, it is ``dom0``); a domain with an archive carries
    backup-content=True, backup-path (``dom0-home/USER`` for dom0, whose archive then holds exactly
    ``home/USER`` and entries below it) and backup-size = the archive's size; every other domain carries
    backup-content=False and neither backup-path nor backup-size."""
    by_vm = {a.vm: a for a in archives}
    seen: set[str] = set()
    admins = 0
    for dom in qubes_el.iterfind("domains/domain"):
        klass = dom.get("class", "")
        props = {p.get("name"): p.text or "" for p in dom.iterfind("properties/property")}
        name = props.get("name", "")
        if klass == "AdminVM":
            admins += 1
            if name not in ("", "dom0"):
                raise VerificationError("manifest: the AdminVM is not named dom0")
            name = "dom0"
        elif name == "dom0" or not name:
            raise VerificationError("manifest: a domain without a name, or a second dom0")
        if name in seen:
            raise VerificationError("manifest: a domain appears twice in <qubes>")
        seen.add(name)
        feats: dict[str, str] = {}
        for f in dom.iterfind("features/feature"):
            if f.get("name") in feats:
                raise VerificationError(f"manifest: feature {f.get('name')} twice")
            feats[f.get("name", "")] = f.text or ""
        archive = by_vm.get(name)
        shown = name[:40]
        if archive is None:
            if feats.get("backup-content") != "False" or "backup-path" in feats or "backup-size" in feats:
                raise VerificationError(f"manifest: {shown} has no archive but backup features say otherwise")
            continue
        if feats.get("backup-content") != "True" or feats.get("backup-size") != str(archive.size):
            raise VerificationError(f"manifest: backup-content/backup-size of {shown} disagree with its archive")
        path = feats.get("backup-path", "")
        if archive.kind == "home":
            user = path.removeprefix("dom0-home/")
            if not path.startswith("dom0-home/") or not _USER_RE.fullmatch(user):
                raise VerificationError("manifest: bad backup-path for dom0's home")
            home = f"home/{user}"
            files = archive.files
            if not files or (files[0].path, files[0].type) != (home, "dir") or not all(
                f.path.startswith(home + "/") for f in files[1:]
            ):
                raise VerificationError(f"manifest: the home archive must hold {home} and entries below it")
        elif not valid_rel_path(path) or not path.startswith(VM_PATH_PREFIXES):
            raise VerificationError(f"manifest: bad backup-path of {shown}")
    if admins != 1:
        raise VerificationError("manifest: <qubes> must have exactly one AdminVM (dom0)")
    missing = set(by_vm) - seen
    if missing:
        raise VerificationError(f"manifest: archive of {sorted(missing)[0][:40]} has no domain in <qubes>")
