"""The DisposableVM of a paranoid restore: created for it through qubesd, removed afterwards, whatever happens.

``admin.vm.CreateDisposable`` (R4.2 and R4.3 alike: no argument, empty payload, the reply is the new VM's
name) with the system's ``management_dispvm`` as destination -- as Qubes' own paranoid restore uses -- or,
when that is not set, its ``default_dispvm``.  Before anything is given to it, the DisposableVM gets our tag
``qubes-backup-disp-PID-START-NONCE`` (which restore it serves) and ``netvm`` none: it never has network while
it holds the backup.  It is started explicitly (``admin.vm.Start``; on R4.3 the disposable may be a preloaded
one that already runs).  Removal: ``admin.vm.Kill`` (qubesd removes an ``auto_cleanup`` disposable when it
stops), then ``admin.vm.Remove`` if it is still listed.  A disposable left by a killed restore (its owner
process is gone) is removed by the next paranoid restore (``cleanup_disposables``).
"""

from __future__ import annotations

import os
import time

from qubes_backup_protocol import plan_frames as pf

from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.qubes.adminapi import QubesdError
from qubes_backup_dom0.qubes.interface import Qubes

TAG_PREFIX = "qubes-backup-disp-"
REMOVE_WAIT = 10.0  # seconds qubesd's auto-cleanup gets after the kill before admin.vm.Remove


def _proc_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(4096)
    except OSError:
        return None
    return stat.rsplit(b")", 1)[-1].split()[19].decode()


def new_tag() -> str:
    return f"{TAG_PREFIX}{os.getpid()}-{_proc_start(os.getpid()) or '0'}-{os.urandom(4).hex()}"


def _owner_dead(tag: str) -> bool:
    """True only for a tag of exactly our form whose process is provably gone."""
    parts = tag[len(TAG_PREFIX) :].split("-")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or len(parts[2]) != 8:
        return False
    pid = int(parts[0])
    return pid != os.getpid() and _proc_start(pid) != parts[1]


class Disposable:
    """One DisposableVM for one paranoid restore."""

    def __init__(self, qubes: Qubes) -> None:
        self.qubes = qubes
        self.name: str | None = None  # while it exists
        self.created: str | None = None  # the name it had (also after its removal)
        self.tag = new_tag()

    @property
    def label(self) -> str:
        return f"DisposableVM {self.created}" if self.created else "the DisposableVM"

    def base(self) -> str:
        for prop in ("management_dispvm", "default_dispvm"):
            value = self.qubes.global_property(prop)
            if value:
                return value
        raise BackupError("paranoid mode needs a DisposableVM template: set management_dispvm or default_dispvm "
                          "(qubes-prefs) to an AppVM with template_for_dispvms")  # fmt: skip

    def create(self) -> str:
        base = self.base()
        try:
            reply = self.qubes.api.call("admin.vm.CreateDisposable", base)
        except BackupError as e:
            raise BackupError(f"cannot create a DisposableVM from {base}: {e}") from None
        name = reply.decode("ascii", "replace")
        if not pf.is_vm_name(name) or self.qubes.vm_list().get(name, ("",))[0] != "DispVM":
            raise BackupError(f"cannot create a DisposableVM from {base}: qubesd answered {name[:40]!r}")
        self.name = self.created = name
        try:
            self.qubes.set_tag(name, self.tag)
            self.qubes.set_property(name, "netvm", "")  # no network, before it gets anything of the backup
            try:
                self.qubes.api.call("admin.vm.Start", name)
            except QubesdError as e:
                if e.exc_type != "QubesVMNotHaltedError":  # R4.3: a preloaded disposable already runs
                    raise
        except BackupError as e:
            raise BackupError(f"cannot prepare {self.label}: {e}") from None
        return name

    def remove(self) -> None:
        """Kill and remove it (idempotent); raises BackupError only if it is still there afterwards."""
        name = self.name
        if name is None:
            return
        running = True
        try:
            self.qubes.api.call("admin.vm.Kill", name)
        except QubesdError as e:
            if e.exc_type == "QubesVMNotFoundError":
                self.name = None
                return
            if e.exc_type != "QubesVMNotStartedError":
                raise BackupError(f"could not stop DisposableVM {name}: {e}; remove it with qvm-kill {name}") from None
            running = False
        deadline = time.monotonic() + (REMOVE_WAIT if running else 0)
        while name in self.qubes.vm_list():
            if time.monotonic() < deadline:  # qubesd's auto-cleanup of the stopped disposable
                time.sleep(0.1)
                continue
            try:
                self.qubes.remove_vm(name)
            except QubesdError as e:
                if e.exc_type != "QubesVMNotFoundError":
                    raise BackupError(f"could not remove DisposableVM {name}: {e}; remove it with qvm-remove "
                                      f"{name}") from None  # fmt: skip
            break
        self.name = None


def cleanup_disposables(qubes: Qubes) -> list[str]:
    """Remove the DisposableVMs of paranoid restores that were killed (their owner process is gone)."""
    removed = []
    for name, (klass, _state) in qubes.vm_list().items():
        if klass != "DispVM":
            continue
        tags = qubes.tags(name)
        # qubesd's own mark of a disposable dom0 made (a restore never brings it back) and our owner tag
        if "disp-created-by-dom0" in tags and any(t.startswith(TAG_PREFIX) and _owner_dead(t) for t in tags):
            disp = Disposable(qubes)
            disp.name = name
            disp.remove()
            removed.append(name)
    return removed
