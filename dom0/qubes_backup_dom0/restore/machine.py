"""The restore state machine: stream -> verify (receive.py) -> plan (restore_plan.py) -> apply (apply.py).

States, in order (any failure jumps to FAILED: the VMs this restore created are removed, dom0 is as it was)::

    CONNECTED -> HEADER+MANIFEST (verified: receive.py)  -> PLANNED (the table; nothing written yet)
              -> RECEIVING (VMs created and tagged in progress; per chunk: bounded read, verify MAC,
                 then decrypt -> decompress -> extract -> volume import)
              -> VERIFIED (END seen, every wanted archive complete)
              -> COMMITTED (last pass of VM references, in-progress tags removed, dom0 home moved in)

Nothing is decrypted, decompressed or parsed before its MAC verified; the only thing read before that is
the frame layer (qubes_backup_protocol.frames) with lengths bounded per state.
"""

from __future__ import annotations

import enum
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from qubes_backup_dom0.errors import BackupError, VerificationError
from qubes_backup_dom0.format import manifest as manifest_mod
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.qubes.policy import PolicyFacts, read_policy
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.qubes.transport import Transport
from qubes_backup_dom0.restore import risk
from qubes_backup_dom0.restore.apply import Applier, Leftovers, clean_leftovers, find_leftovers
from qubes_backup_dom0.restore.extract import ArchiveTarget, Extraction
from qubes_backup_dom0.restore.plan import RestoreOptions, RestorePlan, TargetSystem, VmAction, plan_restore
from qubes_backup_dom0.restore.receive import Opened, Receiver

__all__ = ["Restore", "RestoreOptions", "RestorePlan", "State", "VmAction"]

ProgressCallback = Callable[[int, int], None]


class State(enum.Enum):
    CONNECTED = "connected"
    HEADER = "header verified"
    MANIFEST = "manifest verified"
    PLANNED = "planned"
    RECEIVING = "receiving"
    VERIFIED = "verified"
    COMMITTED = "committed"
    FAILED = "failed"


class Restore:
    """A restore, driven step by step by the CLI or a GUI.

    ``open()`` connects and verifies header and manifest, ``plan()`` decides per VM, ``run()`` receives,
    verifies and commits.  ``cancel()`` may be called from another thread; a cancelled or failed restore
    leaves dom0 as it was.
    """

    def __init__(
        self,
        system: System,
        location: str,
        passphrase: bytes,
        source_vm: str | None = None,
        options: RestoreOptions = RestoreOptions(),  # noqa: B008 - frozen dataclass
        progress: ProgressCallback | None = None,
        transport: Transport | None = None,
        qubes: Qubes | None = None,
    ) -> None:
        self.system = system
        self.location = location
        self.passphrase = passphrase
        self.options = options
        self.progress = progress
        self.state = State.CONNECTED
        self._cancel = threading.Event()
        self.receiver = Receiver(system, location, source_vm, transport, self._cancel)
        self._qubes = qubes
        self.opened: Opened | None = None
        self.restore_plan: RestorePlan | None = None
        self.applier: Applier | None = None
        self._worker: Extraction | None = None
        self.restored: list[str] = []
        self.warnings: list[str] = []
        self.home_restored_to: Path | None = None
        self.leftovers = Leftovers()  # what killed restores left (found by plan(), cleaned by run())
        self.cleaned: list[str] = []  # what run() did about them, one line each
        self._policy: PolicyFacts | None = None

    @property
    def qubes(self) -> Qubes:
        if self._qubes is None:
            self._qubes = Qubes(self.system)
        return self._qubes

    @property
    def confined(self) -> bool:
        return self.receiver.confined

    @property
    def header(self) -> object:
        return self.opened.header if self.opened is not None else None

    @property
    def manifest(self) -> manifest_mod.Manifest | None:
        return self.opened.manifest if self.opened is not None else None

    # -- header and manifest -------------------------------------------------------------------------

    def connect(self) -> None:
        """Start the agent and read the (not yet authenticated) header: what can fail before the passphrase
        is needed -- no such location, the backup VM failing, not a backup, a backup in Qubes' own format."""
        try:
            if self.receiver.channel is None:
                self.receiver.connect()
            self.receiver.read_header()
        except BaseException:
            self._fail()
            raise

    def open(self) -> manifest_mod.Manifest:
        """Connect, verify the header and the manifest; returns the manifest."""
        try:
            # What killed restores left is found by plan() and cleaned by run(): only once this backup has
            # verified under the passphrase and the user agreed (a wrong passphrase changes nothing).
            if self.receiver.channel is None:
                self.receiver.connect()
            self.opened = self.receiver.open(self.passphrase)
            self.state = State.MANIFEST
            pinned = self.options.backup_id
            if pinned is not None and pinned.lower() != self.opened.header.backup_id.hex():
                raise VerificationError(
                    f"this is backup {self.opened.header.backup_id.hex()} (made {self.opened.header.created}), "
                    f"not the expected {pinned}: refusing it (replaced or older backup?)"
                )
            return self.opened.manifest
        except BaseException:
            self._fail()
            raise

    # -- planning ------------------------------------------------------------------------------------

    def _target(self) -> TargetSystem:
        if self.options.verify_only:  # verifying needs nothing of this system (and asks qubesd nothing)
            return TargetSystem(frozenset(), {})
        self.leftovers = find_leftovers(self.qubes, self.system.home_dir)
        # The leftovers' VMs go before anything is created: their names are free for this restore.
        names = frozenset(self.qubes.vm_list()) - self.leftovers.removed_names
        defaults = {p: self.qubes.global_property(p) or None for p in ("default_template", "default_netvm",
                                                                      "default_dispvm")}  # fmt: skip
        self._policy = read_policy(self.system)
        return TargetSystem(names, defaults, self.system.user, self._policy, tuple(self._managers()))

    def _managers(self) -> list[str]:
        """VMs that could change this restore's VMs while they are in progress (risk.restore_managers)."""
        vms = {n: klass for n, (klass, _state) in self.qubes.vm_list().items()
               if klass != "AdminVM" and n not in self.leftovers.removed_names}  # fmt: skip
        tags = {n: self.qubes.tags(n) for n in vms}
        return risk.restore_managers(vms, tags, self._policy)

    def plan(self) -> RestorePlan:
        assert self.opened is not None
        try:
            opened = self.opened
            self.restore_plan = plan_restore(self._target(), opened.header, opened.manifest, self.options)
            self.state = State.PLANNED
            return self.restore_plan
        except BaseException:
            self._fail()
            raise

    # -- receiving and applying ----------------------------------------------------------------------

    def run(self) -> None:
        """Receive and verify everything planned, then commit (or, with verify_only, write nothing)."""
        plan, opened = self.restore_plan, self.opened
        assert plan is not None and opened is not None
        try:
            if plan.errors:
                raise BackupError(plan.errors[0])
            self.receiver.want(plan.wanted)
            if not self.options.verify_only:
                if self.leftovers:  # the backup verified and the caller chose to run: now, not earlier
                    self.cleaned = clean_leftovers(self.qubes, self.leftovers, self.system.home_dir)
                    self.leftovers = Leftovers()
                managers = self._managers()  # again, just before the first VM tagged in progress exists
                if managers:
                    raise BackupError(risk.managers_error(managers))
                self.applier = Applier(self.qubes, plan, self.system.home_dir)
                self.applier.create_all()
            self._worker = Extraction(opened.header.compression)
            self._worker.start()
            self.state = State.RECEIVING
            progress = self._progress(plan.data)
            for archive in plan.wanted:
                target = self.applier.target_for(archive) if self.applier is not None else ArchiveTarget()
                self.receiver.receive_archive(opened, archive, target, self._worker, progress)
            self._worker.finish_input()
            self.receiver.finish()
            self._worker.join()  # the last archive(s) may still be extracting
            if self._worker.error is not None:
                raise self._worker.failure()
            if self.progress is not None:
                self.progress(min(self._worker.extracted, plan.data), plan.data)
            self.state = State.VERIFIED
            if self.applier is not None:
                self.applier.commit()
                self.restored = [a.target_name for a in plan.vms if a.restore and a.archive is not None]
                self.home_restored_to = self.applier.home_restored_to
                self.warnings = list(self.applier.warnings)
            self.state = State.COMMITTED
        except BaseException:
            self._fail()
            raise
        finally:
            self.receiver.abort()

    def _progress(self, total: int) -> Callable[[int], None] | None:
        """Per received chunk (on this thread): the data bytes the extraction thread has extracted so far,
        the unit of ``plan.data`` (decompressed entry data, holes excluded), so the bar ends at 100%."""
        progress, worker = self.progress, self._worker
        if progress is None or worker is None:
            return None
        return lambda _stored: progress(min(worker.extracted, total), total)

    # -- failure and cancellation ----------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask a running restore to stop (from any thread); it then fails with Cancelled, dom0 unchanged.

        Only signals are sent from here: closing the channel's descriptors under the thread that is reading
        them could make it read a recycled descriptor.  Killing the agent (and the imports) wakes that thread.
        """
        self._cancel.set()
        self.receiver.kill()
        if self.applier is not None:
            self.applier.abort_imports()

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.abort()
            if self.applier is not None:
                self.applier.abort_imports()  # a worker blocked writing into an import wakes up
            if self._worker.is_alive() and self._worker is not threading.current_thread():
                self._worker.join()

    def _fail(self) -> None:
        """Undo everything after a failure (called while its exception is being handled, which is re-raised;
        if the rollback itself fails, the error says both)."""
        original = sys.exc_info()[1]
        self.state = State.FAILED
        self.receiver.abort()
        self._stop_worker()
        if self.applier is not None and not self.applier.committed:
            applier, self.applier = self.applier, None
            try:
                applier.rollback()
            except BackupError as e:
                raise BackupError(f"{original}; {e}" if original is not None else str(e)) from None

    def close(self) -> None:
        self.receiver.abort()
        self._stop_worker()
        if self.applier is not None and not self.applier.committed:
            applier, self.applier = self.applier, None
            applier.rollback()
