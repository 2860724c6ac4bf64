"""Paranoid mode's plan: what the DisposableVM says the backup holds, checked, and what happens here.

dom0 reads the plan frames (``qubes_backup_protocol.plan_frames``: every record decoded and checked against
the grammar, every count bounded) and decides per VM with Qubes' semantics, as ``plan.py`` does for a normal
restore: selection and exclusion, conflicts (refused, ``--skip-conflicting`` or ``--rename-conflicting``),
a template that must be restored with the VM or exist here (``--skip-broken``, ``--ignore-missing``).  The
settings of a restored VM are only the plan's: class, label (if it exists here, else red), template, netvm and
default_dispvm "none" or this system's default, the allow-listed properties and features.  dom0's home is
never restored in this mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from qubes_backup_protocol import plan_frames as pf
from qubes_backup_protocol.frames import FrameType, ProtocolError, safe_text

from qubes_backup_dom0.errors import BackupError, UsageError, VerificationError
from qubes_backup_dom0.qubes.qubesxml import QubesXmlError, validate_name
from qubes_backup_dom0.qubes.transport import Channel
from qubes_backup_dom0.restore.plan import RestoreOptions

#: What a paranoid restore never takes from a backup (shown once, so nobody looks for them).
NOT_RESTORED = ("dom0 home", "tags", "devices", "firewall rules", "notes", "VM references other than the template",
                "properties and features outside the allow-list")  # fmt: skip


@dataclass
class ParanoidAction:
    """One VM of the plan and what happens to it here."""

    vm: pf.PlanVm
    restore: bool = True
    new_name: str | None = None
    reason: str = ""
    template: str | None = None  # the template it gets here (None: no template, or this system's default)
    label: str = "red"
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.vm.name

    @property
    def target_name(self) -> str:
        return self.new_name or self.vm.name

    @property
    def size(self) -> int:
        return sum(v.size for v in self.vm.volumes)

    @property
    def data(self) -> int:
        return sum(v.data for v in self.vm.volumes)

    @property
    def netvm(self) -> str:
        return "none" if self.vm.netvm_none else "(default)"

    @property
    def action(self) -> str:
        if not self.restore:
            return f"skip: {self.reason}"
        text = f"restore as {self.new_name}" if self.new_name else "restore"
        return "; ".join([text, *self.notes])


@dataclass
class ParanoidPlan:
    info: pf.PlanInfo
    vms: list[ParanoidAction]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def wanted(self) -> list[ParanoidAction]:
        return [a for a in self.vms if a.restore]

    @property
    def data(self) -> int:
        return sum(a.data for a in self.wanted)

    @property
    def renames(self) -> dict[str, str]:
        return {a.name: a.new_name for a in self.vms if a.restore and a.new_name}


def read_plan(channel: Channel, vm_label: str) -> tuple[list[pf.PlanVm], pf.PlanInfo]:
    """The DisposableVM's PLAN_VM frames and its PLAN_END, strictly: at most MAX_PLAN_VMS, each record
    decoded and checked, archives and names unique; anything else (its ERROR line included) raises."""
    try:
        return _read_plan(channel, vm_label)
    except ProtocolError as e:  # the frame layer's or the grammar's refusal (PlanError)
        raise VerificationError(f"{vm_label} sent a plan outside the grammar: {e}") from None


def _read_plan(channel: Channel, vm_label: str) -> tuple[list[pf.PlanVm], pf.PlanInfo]:
    vms: list[pf.PlanVm] = []
    while True:
        frame = channel.recv(pf.PLAN_LIMITS, pf.is_plan_vm_name)
        if frame is None:
            raise VerificationError(f"{vm_label} ended before its plan was complete")
        ftype, name, data = frame.type, frame.name, bytes(frame.data)
        if ftype == FrameType.ERROR:
            raise VerificationError(f"{vm_label} reports: {safe_text(data)}")
        if ftype == FrameType.PLAN_END:
            info = pf.decode_info(data)
            if info.vms != len(vms):
                raise VerificationError(f"{vm_label}: the plan ends after {len(vms)} VMs, its end says {info.vms}")
            return vms, info
        if len(vms) >= pf.MAX_PLAN_VMS:
            raise VerificationError(f"{vm_label}: the plan has more than {pf.MAX_PLAN_VMS} VMs")
        vm = pf.decode_vm(name, data)
        try:
            validate_name(vm.name)
        except QubesXmlError:
            raise VerificationError(f"{vm_label}: the plan names an invalid VM {safe_text(vm.name, 40)!r}") from None
        if any(v.archive == vm.archive or v.name == vm.name for v in vms):
            raise VerificationError(f"{vm_label}: the plan repeats VM {vm.name} or archive {vm.archive}")
        vms.append(vm)


@dataclass(frozen=True)
class Here:
    """What planning needs of this system."""

    vms: Mapping[str, str]  # name -> class
    labels: frozenset[str]
    defaults: Mapping[str, str | None]  # default_template, default_dispvm


def _free_name(base: str, taken: Callable[[str], bool]) -> str:
    for i in range(1, 100):  # Qubes' rename scheme: the name cut to 29 characters plus a number
        candidate = f"{base[:29]}{i}"
        if not taken(candidate):
            return candidate
    raise BackupError(f"no free name to rename {base} to")


def plan_paranoid(here: Here, vms: list[pf.PlanVm], info: pf.PlanInfo, options: RestoreOptions) -> ParanoidPlan:
    names = {vm.name for vm in vms}
    for name in [*options.vms, *options.exclude]:
        if name not in names and name != "dom0":
            raise UsageError(f"VM {name} is not in this backup")
    plan = ParanoidPlan(info, [ParanoidAction(vm) for vm in vms])
    reserved: set[str] = set()

    def taken(name: str) -> bool:
        return name in here.vms or name in reserved or name in names

    for act in plan.vms:
        if options.vms and act.name not in options.vms:
            act.restore, act.reason = False, "not selected"
        elif act.name in options.exclude:
            act.restore, act.reason = False, "excluded"
        elif act.name in here.vms:
            if options.verify_only:
                act.notes.append("exists here")
            elif options.rename_conflicting:
                act.new_name = _free_name(act.name, taken)
                reserved.add(act.new_name)
            elif options.skip_conflicting:
                act.restore, act.reason = False, "already exists"
            else:
                act.restore, act.reason = False, "already exists (use --skip-conflicting or --rename-conflicting)"
                plan.errors.append(
                    f"VM {act.name} already exists on this system: use --skip-conflicting or --rename-conflicting"
                )
        act.label = act.vm.label
        if act.restore and act.label not in here.labels:
            plan.warnings.append(f"VM {act.target_name}: label {act.label} does not exist here; using red")
            act.label = "red"
    _templates(here, plan, options)
    if not plan.wanted and not plan.errors:
        plan.errors.append("nothing to restore: every VM of the backup is skipped")
    return plan


def _templates(here: Here, plan: ParanoidPlan, options: RestoreOptions) -> None:
    """Each restored AppVM/DispVM's template: restored with it (renamed as it will be), existing here, or
    missing (Qubes' options).  Netvm and default_dispvm need nothing: "none" or this system's default."""
    while True:  # skipping a template skips the VMs based on it: repeat until nothing changes
        restored = {a.name: a for a in plan.vms if a.restore}
        broken = [a for a in plan.wanted if _template(a, restored, here, options) is None]
        for act in broken:
            what = f"missing template {act.vm.template or '(none)'}"
            act.restore, act.reason = False, what
            if not options.skip_broken:
                plan.errors.append(f"VM {act.name}: {what}; use --skip-broken or --ignore-missing")
        if not broken:
            break
    restored = {a.name: a for a in plan.vms if a.restore}
    for act in plan.wanted:
        found = _template(act, restored, here, options)
        if found is not None:
            act.template, note = found
            if note:
                act.notes.append(note)


def _template(act: ParanoidAction, restored: Mapping[str, ParanoidAction], here: Here,
              options: RestoreOptions) -> tuple[str | None, str] | None:  # fmt: skip
    """(template here, note), or None when it is missing and may not be replaced."""
    vm = act.vm
    if vm.klass not in ("AppVM", "DispVM"):
        return None, ""
    default = here.defaults.get("default_dispvm" if vm.klass == "DispVM" else "default_template")
    wanted = vm.template or default
    if wanted is not None and wanted in restored:
        return restored[wanted].target_name, ""
    if wanted is not None and wanted in here.vms:
        return wanted, ""
    if options.verify_only:
        return wanted, f"missing template {wanted or '(none)'}"
    if options.ignore_missing and default is not None and default in here.vms:
        return default, f"missing template {wanted or '(none)'}: using the default ({default})"
    return None
