"""Applying a paranoid plan through qubesd: only the plan's settings, volumes straight into ImportWithSize.

Per restored VM, as a normal restore (apply.py) does it: ``admin.vm.Create.CLASS`` with the label and template
of the plan, at once the tags ``backup-restore-in-progress`` and our owner tag, then the allow-listed
properties and features, and ``netvm`` / ``default_dispvm`` set to none where the plan says so (otherwise
this system's defaults apply: never a VM the backup names).  No tags, devices, firewall rules, notes or dom0
home.  Volume bytes go into ``admin.vm.volume.ImportWithSize`` with the plan's checked size; the commit
removes the in-progress tags after the DisposableVM said VERIFIED and every import finished.  Any failure
before it removes every VM created here (``admin.vm.Remove``).
"""

from __future__ import annotations

import threading

from qubes_backup_protocol import plan_frames as pf

from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.qubes.interface import Qubes, VolumeImport
from qubes_backup_dom0.restore.apply import IN_PROGRESS, _remove_all, new_owner_tag, release_owner_tag
from qubes_backup_dom0.restore.paranoid_plan import ParanoidAction, ParanoidPlan


class ParanoidApplier:
    """Creates the plan's VMs, takes their volumes, commits -- or removes everything it created."""

    def __init__(self, qubes: Qubes, plan: ParanoidPlan) -> None:
        self.qubes = qubes
        self.plan = plan
        self.owner = new_owner_tag()
        self.created: list[str] = []
        self.committed = False
        self._imports: list[VolumeImport] = []
        self._lock = threading.Lock()

    def create_all(self) -> None:
        """Templates first, then templates for disposables, then the rest (a template before its VMs)."""

        def rank(act: ParanoidAction) -> int:
            if act.vm.klass == "TemplateVM":
                return 0
            return 1 if act.vm.properties.get("template_for_dispvms") else 2

        for act in sorted(self.plan.wanted, key=rank):
            self._create(act)

    def _create(self, act: ParanoidAction) -> None:
        vm, name = act.vm, act.target_name
        try:  # qubesd's error names dom0 (the call's destination), not the VM
            self.qubes.create_vm(vm.klass, name, act.label, act.template if vm.klass in ("AppVM", "DispVM") else None)
        except BackupError as e:
            raise BackupError(f"restoring VM {name}: cannot create it: {e}") from None
        self.created.append(name)
        self.qubes.set_tag(name, IN_PROGRESS)  # before any other write to the new VM
        self.qubes.set_tag(name, self.owner)
        try:
            for prop in sorted(vm.properties, key=lambda p: p != "template_for_dispvms"):
                self.qubes.set_property(name, prop, vm.property_text(prop))
            for feature, value in vm.features.items():
                self.qubes.set_feature(name, feature, value)
            if vm.netvm_none:
                self.qubes.set_property(name, "netvm", "")
            if vm.default_dispvm_none:
                self.qubes.set_property(name, "default_dispvm", "")
        except BackupError as e:
            raise BackupError(f"restoring VM {name}: {e}") from None

    def begin_volume(self, act: ParanoidAction, volume: pf.PlanVolume) -> VolumeImport:
        imp = self.qubes.import_volume(act.target_name, volume.name, volume.size)
        with self._lock:
            self._imports.append(imp)
        return imp

    def abort_imports(self) -> None:
        """From any thread: stop the running imports (their processes are killed)."""
        with self._lock:
            imports = list(self._imports)
        for imp in imports:
            imp.abort()

    def commit(self) -> None:
        for name in self.created:  # the commit: from here on the restore is finished, even if killed
            self.qubes.remove_tag(name, IN_PROGRESS)
        self.committed = True
        for name in self.created:
            self.qubes.remove_tag(name, self.owner)
        release_owner_tag(self.owner)

    def rollback(self) -> None:
        """Remove every VM this restore created (before the commit)."""
        self.abort_imports()
        if not self.committed and self.created:
            left = _remove_all(self.qubes, self.created)
            if left:
                release_owner_tag(self.owner)  # the next restore cleans them up
                raise BackupError(f"could not remove VM(s) {', '.join(left)} created by this restore; "
                                  "remove them with qvm-remove")  # fmt: skip
        release_owner_tag(self.owner)
