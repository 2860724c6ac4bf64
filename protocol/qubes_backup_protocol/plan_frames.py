"""The plan and volume frames of qubes.RestoreParanoid: everything dom0 accepts from the DisposableVM.

In paranoid mode (``qvm-backup-restore --paranoid-mode``) a DisposableVM decrypts, decompresses and parses the
backup; dom0 receives only what is defined here (docs/PROTOCOL.md section 8):

- one ``PLAN_VM`` frame per VM of the backup: a fixed binary record (``VmRecord`` below) of the VM's name,
  class, label, template, whether netvm / default_dispvm are "none", the allow-listed properties and features,
  and its volumes with their sizes;
- one ``PLAN_END`` frame: what the backup is (``InfoRecord``);
- per restored volume, in the plan's order, ``VOLUME_DATA`` / ``VOLUME_HOLE`` frames and a ``VOLUME_END``;
- ``VERIFIED`` when every wanted archive verified, or one ``ERROR`` line.

Every field has a fixed width or a one-byte length, every count a small bound, and every value a grammar that
``decode_*`` checks completely (unknown codes, trailing bytes, out-of-range numbers are refused): a record that
decodes is one dom0 can pass to qubesd as it is.  The DisposableVM side builds records with ``encode_*``,
which applies the same checks, so both sides hold the same grammar.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from construct import (
    Bytes,
    ConstructError,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    PascalString,
    PrefixedArray,
    Struct,
    Terminated,
)

from qubes_backup_protocol import names
from qubes_backup_protocol.frames import MAX_ERROR_LEN, FrameType, ProtocolError, safe_text

SERVICE = "qubes.RestoreParanoid"

MAX_PLAN_VMS = 254  # a Qubes system has at most 254 VMs besides dom0 (qid 1..254)
MAX_VM_RECORD = 4096  # PLAN_VM data; the largest valid record is well below (see docs/PROTOCOL.md)
INFO_SIZE = 16 + 20 + 1 + 4 + 8 + 2  # PLAN_END data: fixed
MAX_PASSPHRASE = 1024
MAX_VOLUME_PIECE = 1 << 22  # VOLUME_DATA data
HOLE_SIZE = 8  # VOLUME_HOLE data
MAX_VOLUME_SIZE = 1 << 44  # 16 TiB: a volume's declared size
MAX_FEATURES = 32
MAX_NAME = 31  # VM names (Qubes' limit)
MAX_LABEL = 32
MAX_FEATURE_VALUE = 64
# The backup header's chunk-size rule (docs/FORMAT.md): dom0 bounds the members it relays with it.
CHUNK_MIN, CHUNK_MAX, CHUNK_ALIGN = 64 << 10, 256 << 20, 64 << 10

CLASSES = {1: "AppVM", 2: "TemplateVM", 3: "StandaloneVM", 4: "DispVM"}
COMPRESSIONS = {0: "none", 1: "gzip", 2: "zstd"}
VOLUMES = {1: "root", 2: "private"}
#: The volumes a class may have restored: the save_on_stop ones of Qubes' defaults.
CLASS_VOLUMES = {"AppVM": ("private",), "DispVM": ("private",), "TemplateVM": ("root", "private"),
                 "StandaloneVM": ("root", "private")}  # fmt: skip
#: code -> (property, lowest, highest, texts): a number in [lowest, highest] on the wire; for qubesd the number
#: itself, or ``texts[number]`` where the property takes words (booleans, virt_mode, kernel).
PROPERTIES: dict[int, tuple[str, int, int, tuple[str, ...] | None]] = {
    1: ("memory", 1, 1 << 20, None),  # MiB
    2: ("maxmem", 0, 1 << 20, None),
    3: ("vcpus", 1, 256, None),
    4: ("qrexec_timeout", 1, 86400, None),
    5: ("shutdown_timeout", 1, 86400, None),
    6: ("include_in_backups", 0, 1, ("False", "True")),
    7: ("template_for_dispvms", 0, 1, ("False", "True")),
    8: ("virt_mode", 0, 1, ("hvm", "pvh")),  # never pv (weaker isolation: a risky setting)
    9: ("kernel", 0, 0, ("",)),  # only "none" (an HVM boots its own kernel); never a dom0 kernel by name
}
PROPERTY_CODES = {name: code for code, (name, *_rest) in PROPERTIES.items()}
#: Features restored in paranoid mode: what a template reports about itself, and in-VM services.
FEATURES = frozenset({"qrexec", "gui", "vmexec", "os", "os-distribution", "os-version", "os-eol"})
FEATURE_PREFIX = "service."

_NAME_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9_.-]{0,30}")
_LABEL_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_SERVICE_RE = re.compile(r"service\.[a-z0-9][a-z0-9_-]{0,47}")
_FEATURE_VALUE_RE = re.compile(r"[A-Za-z0-9._+-]{0,64}")
_CREATED_RE = re.compile(rb"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_VOLUME_FRAME_RE = re.compile(r"(vm(?:0|[1-9][0-9]{0,4}))/(root|private)")

_Str8 = PascalString(Int8ub, "ascii")
VmRecord = Struct(
    "name" / _Str8,
    "klass" / Int8ub,
    "label" / _Str8,
    "template" / _Str8,  # "" : this system's default (AppVM, DispVM) or none (TemplateVM, StandaloneVM)
    "netvm_none" / Int8ub,  # 1: netvm "none"; 0: this system's default
    "default_dispvm_none" / Int8ub,
    "properties" / PrefixedArray(Int8ub, Struct("code" / Int8ub, "value" / Int32ub)),
    "features" / PrefixedArray(Int8ub, Struct("key" / _Str8, "value" / _Str8)),
    "volumes" / PrefixedArray(Int8ub, Struct("code" / Int8ub, "size" / Int64ub, "data" / Int64ub)),
    Terminated,
)
InfoRecord = Struct(
    "backup_id" / Bytes(16),
    "created" / Bytes(20),
    "compression" / Int8ub,
    "chunk_size" / Int32ub,
    "home_size" / Int64ub,  # 0: no dom0 home in the backup
    "vms" / Int16ub,  # how many PLAN_VM frames came before
    Terminated,
)
HoleRecord = Struct("length" / Int64ub, Terminated)


class PlanError(ProtocolError):
    """A plan or volume frame outside the grammar."""


@dataclass(frozen=True)
class PlanVolume:
    name: str  # root | private
    size: int  # the volume's size (what ImportWithSize gets)
    data: int  # bytes of it that are not holes (progress)


@dataclass(frozen=True)
class PlanVm:
    archive: str  # vmN: which archive of the backup holds it
    name: str
    klass: str
    label: str
    template: str | None
    netvm_none: bool
    default_dispvm_none: bool
    properties: Mapping[str, int] = field(default_factory=dict)  # property -> its number (PROPERTIES)
    features: Mapping[str, str] = field(default_factory=dict)
    volumes: tuple[PlanVolume, ...] = ()

    def property_text(self, prop: str) -> str:
        """The value as qubesd takes it (``True``/``False`` for booleans, ``hvm`` ...)."""
        return property_text(prop, self.properties[prop])


@dataclass(frozen=True)
class PlanInfo:
    backup_id: bytes
    created: str
    compression: str
    chunk_size: int
    home_size: int
    vms: int


def property_text(prop: str, value: int) -> str:
    texts = PROPERTIES[PROPERTY_CODES[prop]][3]
    return texts[value] if texts is not None else str(value)


def property_number(prop: str, text: str) -> int | None:
    """The wire number of a property's value as qubes.xml has it; None when it is outside the grammar."""
    _name, low, high, texts = PROPERTIES[PROPERTY_CODES[prop]]
    if texts is not None:
        return texts.index(text) if text in texts else None
    value = int(text) if text.isascii() and text.isdigit() and len(text) <= 10 else None
    return value if value is not None and low <= value <= high else None


def is_vm_name(name: str) -> bool:
    return _NAME_RE.fullmatch(name) is not None and name not in ("dom0", ".", "..")


def feature_allowed(key: str) -> bool:
    return key in FEATURES or _SERVICE_RE.fullmatch(key) is not None


def valid_feature_value(value: str) -> bool:
    return _FEATURE_VALUE_RE.fullmatch(value) is not None


def valid_label(label: str) -> bool:
    return _LABEL_RE.fullmatch(label) is not None


def check_vm(vm: PlanVm) -> None:
    """Every rule of a VM record (both sides apply it); PlanError names what is wrong."""
    what = f"plan for {safe_text(vm.name, 40)!r}"
    if not names.is_archive_name(vm.archive) or vm.archive == "vm0":
        raise PlanError(f"plan names a bad archive {safe_text(vm.archive, 40)!r}")
    if not is_vm_name(vm.name):
        raise PlanError(f"plan names an invalid VM {safe_text(vm.name, 40)!r}")
    if vm.klass not in CLASS_VOLUMES:
        raise PlanError(f"{what}: class {safe_text(vm.klass, 20)!r} is not allowed")
    if not valid_label(vm.label):
        raise PlanError(f"{what}: invalid label")
    if vm.template is not None:
        if not is_vm_name(vm.template) or vm.template == vm.name:
            raise PlanError(f"{what}: invalid template")
        if vm.klass not in ("AppVM", "DispVM"):
            raise PlanError(f"{what}: a {vm.klass} has no template")
    for prop, value in vm.properties.items():
        code = PROPERTY_CODES.get(prop)
        if code is None:
            raise PlanError(f"{what}: property {safe_text(prop, 40)!r} is not allowed")
        _name, low, high, _texts = PROPERTIES[code]
        if not low <= value <= high:
            raise PlanError(f"{what}: {prop} {value} is out of range [{low}, {high}]")
    if "template_for_dispvms" in vm.properties and vm.klass != "AppVM":
        raise PlanError(f"{what}: template_for_dispvms on a {vm.klass}")
    if len(vm.features) > MAX_FEATURES:
        raise PlanError(f"{what}: more than {MAX_FEATURES} features")
    for key, text in vm.features.items():
        if not feature_allowed(key) or not valid_feature_value(text):
            raise PlanError(f"{what}: feature {safe_text(key, 40)!r} is not allowed")
    allowed = CLASS_VOLUMES[vm.klass]
    seen = [v.name for v in vm.volumes]
    if len(set(seen)) != len(seen) or any(n not in allowed for n in seen):
        raise PlanError(f"{what}: volumes {safe_text(','.join(seen), 40)} (a {vm.klass} may have {', '.join(allowed)})")
    for v in vm.volumes:
        if not 0 < v.size <= MAX_VOLUME_SIZE or not 0 <= v.data <= v.size:
            raise PlanError(f"{what}: volume {v.name}: size {v.size}, data {v.data} out of range")


def encode_vm(vm: PlanVm) -> bytes:
    check_vm(vm)
    return bytes(VmRecord.build({
        "name": vm.name, "klass": _code(CLASSES, vm.klass), "label": vm.label, "template": vm.template or "",
        "netvm_none": int(vm.netvm_none), "default_dispvm_none": int(vm.default_dispvm_none),
        "properties": [{"code": PROPERTY_CODES[k], "value": v} for k, v in vm.properties.items()],
        "features": [{"key": k, "value": v} for k, v in vm.features.items()],
        "volumes": [{"code": _code(VOLUMES, v.name), "size": v.size, "data": v.data} for v in vm.volumes],
    }))  # fmt: skip


def decode_vm(archive: str, data: bytes) -> PlanVm:
    """A PLAN_VM frame's record, completely checked (raises PlanError)."""
    if len(data) > MAX_VM_RECORD:
        raise PlanError(f"plan record of {len(data)} bytes (at most {MAX_VM_RECORD})")
    try:
        raw = VmRecord.parse(bytes(data))
    except (ConstructError, UnicodeDecodeError) as e:
        raise PlanError(f"malformed plan record for archive {safe_text(archive, 20)}: {type(e).__name__}") from None
    name = str(raw.name)
    if raw.klass not in CLASSES or raw.netvm_none > 1 or raw.default_dispvm_none > 1:
        raise PlanError(f"plan for {safe_text(name, 40)!r}: unknown class or flag")
    props: dict[str, int] = {}
    for item in raw.properties:
        if item.code not in PROPERTIES or PROPERTIES[item.code][0] in props:
            raise PlanError(f"plan for {safe_text(name, 40)!r}: unknown or repeated property code {item.code}")
        props[PROPERTIES[item.code][0]] = int(item.value)
    features: dict[str, str] = {}
    for item in raw.features:
        if str(item.key) in features:
            raise PlanError(f"plan for {safe_text(name, 40)!r}: repeated feature")
        features[str(item.key)] = str(item.value)
    volumes = []
    for item in raw.volumes:
        if item.code not in VOLUMES:
            raise PlanError(f"plan for {safe_text(name, 40)!r}: unknown volume code {item.code}")
        volumes.append(PlanVolume(VOLUMES[item.code], int(item.size), int(item.data)))
    vm = PlanVm(archive, name, CLASSES[raw.klass], str(raw.label), str(raw.template) or None, bool(raw.netvm_none),
                bool(raw.default_dispvm_none), props, features, tuple(volumes))  # fmt: skip
    check_vm(vm)
    return vm


def check_info(info: PlanInfo) -> None:
    if len(info.backup_id) != 16 or _CREATED_RE.fullmatch(info.created.encode("ascii", "replace")) is None:
        raise PlanError("plan end: malformed backup id or time")
    if info.compression not in COMPRESSIONS.values():
        raise PlanError("plan end: unknown compression")
    if not CHUNK_MIN <= info.chunk_size <= CHUNK_MAX or info.chunk_size % CHUNK_ALIGN:
        raise PlanError(f"plan end: chunk size {info.chunk_size} out of range")
    if not 0 <= info.home_size <= MAX_VOLUME_SIZE or not 0 <= info.vms <= MAX_PLAN_VMS:
        raise PlanError("plan end: dom0 home size or VM count out of range")


def encode_info(info: PlanInfo) -> bytes:
    check_info(info)
    return bytes(InfoRecord.build({
        "backup_id": info.backup_id, "created": info.created.encode("ascii"),
        "compression": _code(COMPRESSIONS, info.compression), "chunk_size": info.chunk_size,
        "home_size": info.home_size, "vms": info.vms,
    }))  # fmt: skip


def decode_info(data: bytes) -> PlanInfo:
    if len(data) != INFO_SIZE:
        raise PlanError(f"plan end of {len(data)} bytes (it has {INFO_SIZE})")
    raw = InfoRecord.parse(bytes(data))
    if raw.compression not in COMPRESSIONS or _CREATED_RE.fullmatch(raw.created) is None:
        raise PlanError("plan end: unknown compression or malformed time")
    info = PlanInfo(bytes(raw.backup_id), raw.created.decode("ascii"), COMPRESSIONS[raw.compression],
                    int(raw.chunk_size), int(raw.home_size), int(raw.vms))  # fmt: skip
    check_info(info)
    return info


def encode_hole(length: int) -> bytes:
    if not 0 < length <= MAX_VOLUME_SIZE:
        raise PlanError(f"hole of {length} bytes")
    return bytes(HoleRecord.build({"length": length}))


def decode_hole(data: bytes) -> int:
    if len(data) != HOLE_SIZE:
        raise PlanError(f"hole frame of {len(data)} bytes (it has {HOLE_SIZE})")
    length = int(HoleRecord.parse(bytes(data)).length)
    if not 0 < length <= MAX_VOLUME_SIZE:
        raise PlanError(f"hole of {length} bytes")
    return length


def volume_frame_name(archive: str, volume: str) -> str:
    name = f"{archive}/{volume}"
    if _VOLUME_FRAME_RE.fullmatch(name) is None:
        raise PlanError(f"bad volume frame name {safe_text(name, 40)!r}")
    return name


def is_volume_frame_name(name: str) -> bool:
    return len(name) <= names.MAX_NAME_LEN and _VOLUME_FRAME_RE.fullmatch(name) is not None


def is_plan_vm_name(name: str) -> bool:
    """A PLAN_VM frame's name: a VM archive (``vmN``, not ``vm0``, which is dom0's home)."""
    return names.is_archive_name(name) and name != "vm0"


#: What the DisposableVM may send dom0, per phase: {type: (max name, max data)}.
PLAN_LIMITS = {FrameType.PLAN_VM: (names.MAX_NAME_LEN, MAX_VM_RECORD), FrameType.PLAN_END: (0, INFO_SIZE),
               FrameType.ERROR: (0, MAX_ERROR_LEN)}  # fmt: skip
DATA_LIMITS = {FrameType.VOLUME_DATA: (names.MAX_NAME_LEN, MAX_VOLUME_PIECE),
               FrameType.VOLUME_HOLE: (names.MAX_NAME_LEN, HOLE_SIZE),
               FrameType.VOLUME_END: (names.MAX_NAME_LEN, 0), FrameType.VERIFIED: (0, 0),
               FrameType.ERROR: (0, MAX_ERROR_LEN)}  # fmt: skip


def _code(table: Mapping[int, str], value: str) -> int:
    for code, name in table.items():
        if name == value:
            return code
    raise PlanError(f"no code for {safe_text(value, 40)!r}")
