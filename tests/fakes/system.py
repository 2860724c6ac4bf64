"""A described Qubes system served by a FakeQubesd: every read call a backup makes, answered as R4.2 or R4.3
does (``install(..., release=)``).  A call the release does not have is not registered: making it shows up
in ``fq.unexpected``."""

from __future__ import annotations

from dataclasses import dataclass, field

from .qubesd import FakeQubesd, error, ok

LABELS = {"red": ("0xcc0000", 1), "orange": ("0xf57900", 2), "green": ("0x73d216", 4), "gray": ("0x555753", 5),
          "blue": ("0x3465a4", 6), "black": ("0x000000", 8)}  # fmt: skip
DEVICE_CLASSES = ("pci", "usb", "block", "mic")


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


@dataclass
class FakeVM:
    name: str
    klass: str = "AppVM"
    state: str = "Halted"
    label: str = "red"
    qid: int = 1
    props: dict[str, tuple[bool, str, str]] = field(default_factory=dict)  # name -> (default, type, value)
    features: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=lambda: ["created-by-dom0"])
    devices: dict[str, list[str]] = field(default_factory=dict)  # class -> List (R4.2) / Assigned (R4.3) lines
    firewall: list[str] = field(default_factory=lambda: ["action=accept"])
    notes: str | None = None  # R4.3's notes ('' when empty); never asked on R4.2
    volumes: dict[str, dict[str, str]] = field(default_factory=dict)

    def all_props(self) -> dict[str, tuple[bool, str, str]]:
        base: dict[str, tuple[bool, str, str]] = {
            "name": (False, "str", self.name),
            "label": (False, "label", self.label),
            "include_in_backups": (True, "bool", "True"),
            "netvm": (True, "vm", ""),
            "backup_timestamp": (True, "int", ""),
            "xid": (True, "int", "-1"),
        }
        if self.klass != "AdminVM":
            base["qid"] = (False, "int", str(self.qid))
            base["uuid"] = (False, "str", f"00000000-0000-0000-0000-{self.qid:012d}")
        base.update(self.props)
        return base


def getall(props: dict[str, tuple[bool, str, str]]) -> bytes:
    return "".join(f"{n} default={d} type={t} {escape(v)}\n" for n, (d, t, v) in props.items()).encode()


def names(items: list[str] | tuple[str, ...]) -> bytes:
    return "".join(f"{n}\n" for n in items).encode()


def kv(info: dict[str, str]) -> bytes:
    return "".join(f"{k}={v}\n" for k, v in info.items()).encode()


def install(
    fq: FakeQubesd,
    vms: list[FakeVM],
    pools: dict[str, dict[str, str]],
    global_props: dict[str, tuple[bool, str, str]] | None = None,
    dom0: FakeVM | None = None,
    release: str = "4.2",
) -> None:
    """Register replies for every read a backup makes on ``release``, and accept backup_timestamp writes."""
    dom0 = dom0 or FakeVM("dom0", "AdminVM", "Running", "black", 0, tags=[], firewall=[])
    everything = [dom0, *vms]
    fq.add("admin.vm.List", reply=ok("".join(vm_line(v, release) for v in everything)))
    fq.add("admin.label.List", reply=ok(names(list(LABELS))))
    for label, (color, index) in LABELS.items():
        fq.add("admin.label.Get", "dom0", label, reply=ok(color))
        fq.add("admin.label.Index", "dom0", label, reply=ok(str(index)))
    fq.add("admin.pool.List", reply=ok(names(list(pools))))
    for pool, info in pools.items():
        fq.add("admin.pool.Info", "dom0", pool, reply=ok(kv({**info, "size": "1000000", "usage": "10"})))
    gprops = {"default_netvm": (True, "vm", ""), "default_template": (False, "vm", vms[0].name)}
    gprops.update(global_props or {})
    fq.add("admin.property.GetAll", reply=ok(getall(gprops)))
    fq.add("admin.deviceclass.List", reply=ok(names(DEVICE_CLASSES)))
    for vm in everything:
        _install_vm(fq, vm, release)


def vm_line(vm: FakeVM, release: str) -> str:
    """An admin.vm.List line: R4.3 adds the uuid (dom0's is all zeros)."""
    line = f"{vm.name} class={vm.klass} state={vm.state}"
    if release == "4.3":
        line += f" uuid=00000000-0000-0000-0000-{vm.qid:012d}"
    return line + "\n"


def _install_vm(fq: FakeQubesd, vm: FakeVM, release: str) -> None:
    n = vm.name
    if vm.klass != "AdminVM":  # admin.vm.List on dom0 lists every VM
        fq.add("admin.vm.List", n, reply=ok(vm_line(vm, release)))
    fq.add("admin.vm.property.GetAll", n, reply=ok(getall(vm.all_props())))
    fq.add("admin.vm.feature.List", n, reply=ok(names(list(vm.features))))
    for f, value in vm.features.items():
        fq.add("admin.vm.feature.Get", n, f, reply=ok(value))
    fq.add("admin.vm.tag.List", n, reply=ok(names(vm.tags)))
    listing = "List" if release == "4.2" else "Assigned"
    for cls in DEVICE_CLASSES:
        fq.add(f"admin.vm.device.{cls}.{listing}", n, reply=ok("".join(f"{x}\n" for x in vm.devices.get(cls, []))))
    fq.add("admin.vm.firewall.Get", n, reply=ok("".join(f"{r}\n" for r in vm.firewall)))
    if release == "4.3" and vm.klass != "AdminVM":
        fq.add("admin.vm.notes.Get", n, reply=ok(vm.notes or ""))
    fq.add("admin.vm.volume.List", n, reply=ok(names(list(vm.volumes))))
    for vol, info in vm.volumes.items():
        fq.add("admin.vm.volume.Info", n, vol, reply=ok(kv(info)))
    fq.add("admin.vm.property.Set", n, "backup_timestamp", None, reply=ok())
    fq.add("admin.vm.property.Get", n, "nonexistent", reply=error("QubesNoSuchPropertyError", "Invalid property"))


def volume_info(pool: str, vid: str, size: int, save_on_stop: bool, path: str = "", **extra: str) -> dict[str, str]:
    info = {
        "pool": pool, "vid": vid, "size": str(size), "usage": "0", "rw": "True", "source": "",
        "path": path, "save_on_stop": str(save_on_stop), "snap_on_start": str(not save_on_stop),
        "revisions_to_keep": "1", "ephemeral": "False", "is_outdated": "False",
    }  # fmt: skip
    info.update(extra)
    return info
