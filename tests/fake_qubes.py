"""An in-memory stand-in for the ``Qubes`` system interface, as strict as qubesd where the restore relies on
it, recording every call: for unit tests of the apply step (tests/test_apply.py).  The socket-level fakes
(tests/fakes/) and the simulated qubesd test the same code end to end."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.qubes.adminapi import QubesdError, check_assignment

REFS = ("template", "netvm", "default_dispvm")


class FakeQubesdError(BackupError):
    pass


@dataclass
class FakeVm:
    klass: str
    label: str
    props: dict[str, str] = field(default_factory=dict)
    features: dict[str, str] = field(default_factory=dict)
    tags: set[str] = field(default_factory=set)
    devices: list[tuple[str, str, str, dict[str, str]]] = field(default_factory=list)
    firewall: list[str] = field(default_factory=list)
    notes: str = ""
    volumes: dict[str, bytes] = field(default_factory=dict)


class FakeImport:
    def __init__(self, owner: FakeQubes, vm: str, volume: str, size: int) -> None:
        self.owner, self.vm, self.volume, self.size = owner, vm, volume, size
        self.data = bytearray()
        self.aborted = False

    def write(self, data: bytes | memoryview) -> None:
        self.data += data

    def write_zeros(self, n: int) -> None:
        self.data += bytes(n)

    def finish(self) -> None:
        if len(self.data) != self.size:
            raise FakeQubesdError(f"import of {self.vm}:{self.volume}: {len(self.data)} of {self.size} bytes")
        self.owner._call("import-end", self.vm, self.volume)
        self.owner.vms[self.vm].volumes[self.volume] = bytes(self.data)

    def hang_up(self) -> None:
        self.aborted = True

    def abort(self) -> None:
        self.aborted = True


LABELS = {"red": "0xcc0000", "orange": "0xf57900", "yellow": "0xedd400", "green": "0x73d216", "gray": "0x555753",
          "blue": "0x3465a4", "purple": "0x75507b", "black": "0x000000"}  # fmt: skip
#: Properties only R4.3 has (an R4.2 qubesd: QubesNoSuchPropertyError).
R43_PROPERTIES = frozenset({"bootmode", "devices_denied", "appvm_default_bootmode"})


class FakeQubes:
    """``release``: what Qubes.release says (4.3 or 4.2: notes, device calls, properties)."""

    def __init__(self, vms: Mapping[str, FakeVm], defaults: Mapping[str, str] | None = None,
                 release: str = "4.3") -> None:  # fmt: skip
        self.release = release
        self.label_colors = dict(LABELS)
        self.vms: dict[str, FakeVm] = {"dom0": FakeVm("AdminVM", "black"), **vms}
        self.defaults = dict(defaults or {})
        self.calls: list[tuple[str, ...]] = []
        self.fail_on: tuple[str, ...] | None = None  # a call prefix that raises
        self.imports: list[FakeImport] = []
        self.created: set[str] = set()
        self.assignments: list[tuple[str, str, object]] = []

    def _call(self, *call: str) -> None:
        self.calls.append(call)
        if self.fail_on is not None and call[: len(self.fail_on)] == self.fail_on:
            raise FakeQubesdError(f"injected failure at {' '.join(call)}")

    def _vm(self, name: str) -> FakeVm:
        if name not in self.vms:
            raise FakeQubesdError(f"No such domain: {name!r}")
        return self.vms[name]

    def _write(self, name: str, *call: str) -> FakeVm:
        """A write to a VM: a VM this restore created must carry the in-progress tag first."""
        vm = self._vm(name)
        if name in self.created and "backup-restore-in-progress" not in vm.tags:
            raise AssertionError(f"write {call} to {name} before it was tagged backup-restore-in-progress")
        self._call(*call, name)
        return vm

    # reading
    def vm_list(self) -> dict[str, tuple[str, str]]:
        return {n: (v.klass, "Halted") for n, v in self.vms.items()}

    def global_property(self, name: str) -> str | None:
        return self.defaults.get(name)

    def labels(self) -> list[str]:
        return list(self.label_colors)

    def tags(self, vm: str) -> list[str]:
        return sorted(self._vm(vm).tags)

    # writes
    def create_vm(self, klass: str, name: str, label: str, template: str | None, pool: str | None = None) -> None:
        self._call("create", klass, name, template or "")
        if name in self.vms:
            raise FakeQubesdError(f"VM {name} already exists")
        if template is not None and template not in self.vms:
            raise FakeQubesdError(f"No such domain: {template!r}")
        vm = FakeVm(klass, label, tags={"created-by-dom0"})
        if template:
            vm.props["template"] = template
        self.vms[name] = vm
        self.created.add(name)

    def set_property(self, vm: str, prop: str, value: str) -> None:
        v = self._write(vm, "property", prop, value)
        if prop in REFS and value and value not in self.vms:
            raise FakeQubesdError(f"No such domain: {value!r}")
        if self.release == "4.2" and prop in R43_PROPERTIES:
            raise QubesdError("admin.vm.property.Set", vm, "QubesNoSuchPropertyError", f"Invalid property {prop!r}")
        if prop == "label":
            if value not in self.label_colors:
                raise FakeQubesdError(f"Label does not exist: {value!r}")
            v.label = value
            return
        v.props[prop] = value

    def reset_property(self, vm: str, prop: str) -> None:
        self._write(vm, "reset", prop).props.pop(prop, None)

    def set_feature(self, vm: str, name: str, value: str) -> None:
        self._write(vm, "feature", name, value).features[name] = value

    def set_tag(self, vm: str, tag: str) -> None:
        if tag.startswith("created-by-"):
            raise FakeQubesdError("created-by-* tags are set by qubesd")
        if tag == "backup-restore-in-progress":
            self._call("tag", tag, vm)
            self._vm(vm).tags.add(tag)
            return
        self._write(vm, "tag", tag).tags.add(tag)

    def remove_tag(self, vm: str, tag: str) -> None:
        self._call("untag", tag, vm)
        self._vm(vm).tags.discard(tag)

    def assign_device(self, vm: str, devclass: str, a: object) -> None:
        from qubes_backup_dom0.qubes.adminapi import DeviceAssignment

        assert isinstance(a, DeviceAssignment)
        check_assignment(devclass, a)
        if self.release == "4.2":  # R4.2: a persistent attachment of a port, no identity, no mode
            assert a.device_id == "*" and a.mode == "required" and a.port != "*", a
            self._write(vm, "attach", devclass, f"{a.backend}+{a.port}").devices.append(
                (devclass, a.backend, a.port, dict(a.options)))
        else:
            self._write(vm, "assign", devclass, f"{a.backend}+{a.port}", a.device_id, a.mode).devices.append(
                (devclass, a.backend, a.port, dict(a.options)))
        self.assignments.append((vm, devclass, a))

    def create_label(self, label: str, color: str) -> None:
        self._call("label-create", label, color)
        if label in self.label_colors:
            raise FakeQubesdError("label already exists")
        self.label_colors[label] = color

    def remove_label(self, label: str) -> None:
        self._call("label-remove", label)
        if any(v.label == label for v in self.vms.values()):
            raise FakeQubesdError("label still in use")
        del self.label_colors[label]

    def firewall_rules(self, vm: str) -> list[str]:
        return list(self._vm(vm).firewall) or ["action=accept"]  # qubesd's default for a new VM

    def set_firewall(self, vm: str, rules: Sequence[str]) -> None:
        self._write(vm, "firewall").firewall = list(rules)

    def set_notes(self, vm: str, text: str) -> bool:
        if self.release == "4.2":
            return False
        self._write(vm, "notes").notes = text
        return True

    def import_volume(self, vm: str, volume: str, size: int) -> FakeImport:
        self._write(vm, "import", volume, str(size))
        imp = FakeImport(self, vm, volume, size)
        self.imports.append(imp)
        return imp

    def remove_vm(self, vm: str) -> None:
        self._call("remove", vm)
        self._vm(vm)
        for other, v in self.vms.items():
            if other != vm and vm in (v.props.get(r) for r in REFS):
                raise FakeQubesdError(f"VM {vm} is used by {other}")
        del self.vms[vm]
