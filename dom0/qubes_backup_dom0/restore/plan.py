"""Planning a restore: what happens to each VM of the backup on this system (Qubes' semantics).

Input: the verified manifest and the names and defaults of this system (from qubesd).  Output: one
``VmAction`` per VM of the backup — restore (maybe under a new name, with replaced references) or skip, and
why — plus errors that stop the restore before anything is written.  Nothing here changes the system.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from qubes_backup_dom0.errors import BackupError, UsageError, VerificationError
from qubes_backup_dom0.format import header as header_mod
from qubes_backup_dom0.format import manifest as manifest_mod
from qubes_backup_dom0.qubes.policy import PolicyFacts
from qubes_backup_dom0.qubes.qubesxml import Collection, Domain
from qubes_backup_dom0.restore import risk

#: The properties of a VM that name another VM; ``template`` is given when the VM is created, the others
#: are set in the last pass, mapped through renames.
VM_REFERENCES = ("template", "netvm", "default_dispvm")
_DEFAULT_OF = {"template": "default_template", "netvm": "default_netvm", "default_dispvm": "default_dispvm"}


@dataclass(frozen=True)
class RestoreOptions:
    vms: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    verify_only: bool = False
    skip_broken: bool = False
    ignore_missing: bool = False
    skip_conflicting: bool = False
    rename_conflicting: bool = False
    skip_dom0_home: bool = False
    ignore_username_mismatch: bool = False  # restore dom0 home of another user (Qubes' option)
    backup_id: str | None = None  # refuse a backup with another id (rollback/substitution protection)
    restore_devices: bool = False  # device assignments (risk.DEVICES) without asking
    restore_risky_settings: bool = False  # the other settings that grant power (risk.RISKY) without asking


@dataclass
class VmAction:
    """What will happen to one VM of the backup; ``restore`` False means skipped (``reason`` says why)."""

    name: str
    klass: str
    template: str | None  # as shown: this system's name for it, "(default)" forms in brackets
    netvm: str | None
    size: int
    archive: manifest_mod.ArchiveEntry | None
    restore: bool = True
    new_name: str | None = None
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    replace_refs: dict[str, str | None] = field(default_factory=dict)  # property -> new value (None: default)

    @property
    def target_name(self) -> str:
        return self.new_name or self.name

    @property
    def action(self) -> str:
        if not self.restore:
            return f"skip: {self.reason}"
        text = f"restore as {self.new_name}" if self.new_name else "restore"
        return "; ".join([text, *self.notes])


@dataclass
class RestorePlan:
    header: header_mod.Header
    manifest: manifest_mod.Manifest
    backup: Collection
    vms: list[VmAction]
    home: manifest_mod.ArchiveEntry | None  # dom0 home, when it will be restored
    home_target: str | None
    errors: list[str]
    settings: risk.Settings = field(default_factory=risk.Settings)  # what grants power, and what is granted

    @property
    def wanted(self) -> list[manifest_mod.ArchiveEntry]:
        wanted = [v.archive for v in self.vms if v.restore and v.archive is not None]
        if self.home is not None:
            wanted.insert(0, self.home)
        return wanted

    @property
    def data(self) -> int:
        return sum(a.data for a in self.wanted)

    @property
    def renames(self) -> dict[str, str]:
        """backup name -> name on this system, for every restored VM that gets a new name (one map, applied
        at once: a reference is looked up once, never renamed twice)."""
        return {a.name: a.new_name for a in self.vms if a.restore and a.new_name}

    def reference(self, action: VmAction, prop: str) -> tuple[bool, str | None]:
        """(explicit, value) of a VM reference as it will be on this system: ``explicit`` False means the
        property stays default; value None means "none" (empty)."""
        if prop in action.replace_refs:
            value = action.replace_refs[prop]
            return value is not None, (self.renames.get(value, value) if value else None)
        dom = self.backup[action.name]
        if not dom.has_property(prop):
            return False, None
        raw = dom.raw_property(prop) or None
        return True, (self.renames.get(raw, raw) if raw else None)


@dataclass(frozen=True)
class TargetSystem:
    """What planning needs to know about this system."""

    names: frozenset[str]
    defaults: Mapping[str, str | None]  # default_template, default_netvm, default_dispvm
    user: str | None = None  # dom0's user (None: not checked, e.g. verify-only)
    policy: PolicyFacts | None = None  # what this system's qrexec policy trusts (None: not read)
    managers: tuple[str, ...] = ()  # VMs that could change VMs being restored (risk.restore_managers)


def _free_name(base: str, taken: Callable[[str], bool]) -> str:
    """Qubes' rename scheme: the name cut to 29 characters plus a number."""
    for i in range(1, 100):
        candidate = f"{base[:29]}{i}"
        if not taken(candidate):
            return candidate
    raise BackupError(f"no free name to rename {base} to")


def plan_restore(
    target: TargetSystem, hdr: header_mod.Header, manifest: manifest_mod.Manifest, options: RestoreOptions
) -> RestorePlan:
    """Decide, VM by VM, what the restore does (Qubes' semantics for conflicts and missing dependencies)."""
    backup = Collection.from_bytes(manifest.qubes)
    in_backup = {a.vm: a for a in manifest.archives if a.kind == "vm"}
    for name in [*options.vms, *options.exclude]:
        if name not in in_backup and name != "dom0" and backup.get(name) is None:
            raise UsageError(f"VM {name} is not in this backup")
    errors: list[str] = []
    actions = _decide(target, backup, manifest, options, errors)
    _check_dependencies(target, backup, actions, options, errors)
    renames = {a.name: a.new_name for a in actions if a.restore and a.new_name}
    for act in actions:  # the table shows the references as they will be here
        if act.restore:
            act.template = _shown_ref(backup, backup[act.name], "template", renames, act.replace_refs)
            act.netvm = _shown_ref(backup, backup[act.name], "netvm", renames, act.replace_refs)
    home_archive = next((a for a in manifest.archives if a.kind == "home"), None)
    home = home_target = None
    home_wanted = not options.skip_dom0_home and "dom0" not in options.exclude
    if home_archive is not None and home_wanted and (not options.vms or "dom0" in options.vms):
        home = home_archive
        home_target = datetime.now().strftime("home-restore-%Y-%m-%d-%H%M%S")
        _check_home_user(target, manifest, home_archive, options, errors)
    if not any(a.restore for a in actions) and home is None and not errors:
        errors.append("nothing to restore: every VM of the backup is skipped")
    settings = risk.Settings()
    if not options.verify_only:
        settings = _settings(target, backup, actions, options)
        if target.managers:
            errors.insert(0, risk.managers_error(list(target.managers)))
    return RestorePlan(hdr, manifest, backup, actions, home, home_target, errors, settings)


def _settings(target: TargetSystem, backup: Collection, actions: list[VmAction],
              options: RestoreOptions) -> risk.Settings:  # fmt: skip
    """The settings of the restored VMs that grant power; granted as far as the options say."""
    settings = risk.Settings(policy_problems=list(target.policy.problems) if target.policy else [])
    for act in actions:
        if act.restore and act.archive is not None:
            settings.items += risk.classify(backup[act.name], target.policy)
    if options.restore_devices:
        settings.granted.add(risk.DEVICES)
    if options.restore_risky_settings:
        settings.granted.add(risk.RISKY)
    return settings


def home_user(manifest: manifest_mod.Manifest) -> str | None:
    """Whose dom0 home the backup holds: its archive holds ``home/USER`` (manifest.parse checked that it
    agrees with ``dom0-home/USER`` of the embedded qubes.xml)."""
    home = next((a for a in manifest.archives if a.kind == "home"), None)
    if home is None or not home.files:
        return None
    parts = home.files[0].path.split("/")
    return parts[1] if len(parts) > 1 else None


def _check_home_user(target: TargetSystem, manifest: manifest_mod.Manifest, home: manifest_mod.ArchiveEntry,
                     options: RestoreOptions, errors: list[str]) -> None:  # fmt: skip
    """Qubes refuses a dom0 home of another user unless told to go on (--ignore-username-mismatch)."""
    user = home_user(manifest)
    if target.user is None or user is None or user == target.user or options.ignore_username_mismatch:
        return
    errors.append(
        f"the dom0 home in this backup is user {user}'s, this system's user is {target.user}: add "
        "--skip-dom0-home, or --ignore-username-mismatch to restore it anyway (into a new directory)"
    )


def _decide(target: TargetSystem, backup: Collection, manifest: manifest_mod.Manifest, options: RestoreOptions,
            errors: list[str]) -> list[VmAction]:  # fmt: skip
    """Selection, exclusion and name conflicts."""
    reserved: set[str] = set()
    actions: list[VmAction] = []

    def taken(name: str) -> bool:
        return name in target.names or name in reserved or name in backup.names()

    for archive in (a for a in manifest.archives if a.kind == "vm"):
        dom = backup.get(archive.vm)
        if dom is None:
            raise VerificationError(f"manifest: VM {archive.vm} has data but no entry in qubes.xml")
        act = VmAction(dom.name, dom.klass, _shown_ref(backup, dom, "template"), _shown_ref(backup, dom, "netvm"),
                       archive.size, archive)  # fmt: skip
        actions.append(act)
        if options.vms and dom.name not in options.vms:
            act.restore, act.reason = False, "not selected"
        elif dom.name in options.exclude:
            act.restore, act.reason = False, "excluded"
        elif dom.name in target.names:
            if options.verify_only:
                # Verifying writes nothing, so a VM that exists here is no conflict: its data is checked too
                # (the common case is verifying a backup on the system that made it).
                act.notes.append("exists here")
            elif options.rename_conflicting:
                act.new_name = _free_name(dom.name, taken)
                reserved.add(act.new_name)
            elif options.skip_conflicting:
                act.restore, act.reason = False, "already exists"
            else:
                act.restore, act.reason = False, "already exists (use --skip-conflicting or --rename-conflicting)"
                errors.append(
                    f"VM {dom.name} already exists on this system: use --skip-conflicting or --rename-conflicting"
                )
    return actions


def _check_dependencies(target: TargetSystem, backup: Collection, actions: list[VmAction],
                        options: RestoreOptions, errors: list[str]) -> None:  # fmt: skip
    """A template/netvm/dispvm must be restored with the VM or exist here."""
    will_restore = {a.name for a in actions if a.restore}
    renamed = {a.name for a in actions if a.restore and a.new_name}

    def here(name: str) -> bool:
        return name in will_restore or name in target.names

    for act in actions:
        if not act.restore:
            continue
        dom = backup[act.name]
        for prop in VM_REFERENCES:
            if dom.has_property(prop):
                ref = dom.raw_property(prop) or None
            elif prop == "template" and (ref := backup.effective_template(dom)) is not None:
                # The VM used the old system's default template; its disks belong to that template, so unless
                # this system has the same default it is pinned to it, not left to inherit another one.
                if here(ref):
                    if target.defaults.get("default_template") != ref or ref in renamed:
                        act.replace_refs[prop] = ref
                    continue
            else:
                continue  # netvm/default_dispvm follow this system's defaults, as a new VM's would
            if ref is None or here(ref):
                continue
            _missing(act, prop, ref, target, options, errors)
        if not act.restore:
            will_restore.discard(act.name)


def _missing(act: VmAction, prop: str, ref: str, target: TargetSystem, options: RestoreOptions,
             errors: list[str]) -> None:  # fmt: skip
    what = f"missing {prop} {ref}"
    if options.verify_only:  # nothing is registered, so nothing can be broken: verify it anyway
        act.notes.append(what)
        return
    if options.ignore_missing:
        default = target.defaults.get(_DEFAULT_OF[prop]) or None
        if prop == "template" and (default is None or default not in target.names):
            act.restore, act.reason = False, f"{what} and no default template"
            errors.append(f"VM {act.name}: {what}, and this system has no default template")
            return
        act.replace_refs[prop] = None
        act.notes.append(f"{what}: using the default ({default or 'none'})")
    elif options.skip_broken:
        act.restore, act.reason = False, what
    else:
        act.restore, act.reason = False, what
        errors.append(f"VM {act.name}: {what}; use --skip-broken or --ignore-missing")


def _shown_ref(backup: Collection, dom: Domain, prop: str, renames: Mapping[str, str] | None = None,
               replaced: Mapping[str, str | None] | None = None) -> str | None:  # fmt: skip
    """The template/netvm as the table shows it: explicit (renamed as it will be here), or the backed-up
    system's default in brackets."""
    renames = renames or {}
    if replaced and prop in replaced:
        value = replaced[prop]
        return renames.get(value, value) if value else "(default)"
    if dom.has_property(prop):
        raw = dom.raw_property(prop) or None
        return renames.get(raw, raw) if raw else None
    effective = backup.effective_template(dom) if prop == "template" else backup.effective_netvm(dom)
    return f"({renames.get(effective, effective)})" if effective else None
