"""Paranoid mode: restoring a backup made on a compromised machine, parsed in a DisposableVM.

The same steps as a normal restore (machine.py), but dom0 runs none of the backup's parsers: no header,
MAC, decryption, decompression, manifest, qubes.xml or tar code runs here.  dom0

1. starts the backup VM's agent (qubes.Restore, as always) and a DisposableVM made for this restore
   (dispvm.py), runs ``qubes.RestoreParanoid`` in it and sends it the passphrase;
2. relays the agent's frames to it unchanged: only the bounded frame layer is read here (type, lengths
   against the per-phase limits, member-name grammar, the names expected at this point);
3. reads the DisposableVM's plan (plan_frames grammar, checked in ``paranoid_plan.read_plan``) and plans with
   Qubes' semantics (``paranoid_plan.plan_paranoid``); the caller shows it and asks;
4. creates the VMs through qubesd with the plan's allowed settings (paranoid_apply.py), tells the agent and
   the DisposableVM which archives, relays them on a second thread, and on this one takes the volume frames
   straight into ``admin.vm.volume.ImportWithSize``, never more bytes than the plan declared;
5. commits after VERIFIED (the DisposableVM checked every MAC and trailer), or removes what it created.

The DisposableVM is removed at the end, also on failure, cancellation or Ctrl-C.  It gets nothing but the
passphrase and the backup's frames, and no network.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable

from qubes_backup_protocol import names
from qubes_backup_protocol import plan_frames as pf
from qubes_backup_protocol.frames import MAX_ERROR_LEN, Frame, FrameType, ProtocolError, safe_text

from qubes_backup_dom0.errors import BackupError, Cancelled, VerificationError
from qubes_backup_dom0.format.crypto import IV_SIZE, MAC_HEX_SIZE
from qubes_backup_dom0.format.header import MAX_HEADER_SIZE
from qubes_backup_dom0.format.manifest import MAX_MANIFEST_SIZE
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.qubes.policy import read_policy
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.qubes.transport import Channel, ChannelClosed, Transport, make_transport
from qubes_backup_dom0.restore import risk
from qubes_backup_dom0.restore.apply import Leftovers, clean_leftovers, find_leftovers
from qubes_backup_dom0.restore.dispvm import Disposable, cleanup_disposables
from qubes_backup_dom0.restore.machine import State
from qubes_backup_dom0.restore.paranoid_apply import ParanoidApplier
from qubes_backup_dom0.restore.paranoid_plan import Here, ParanoidAction, ParanoidPlan, plan_paranoid, read_plan
from qubes_backup_dom0.restore.plan import RestoreOptions
from qubes_backup_dom0.restore.receive import Receiver
from qubes_backup_dom0.restore.relay import FrameWriter

ProgressCallback = Callable[[int, int], None]
#: The members before the plan, in order, with their largest size (FORMAT.md section 9).
OPENING = ((names.HEADER, MAX_HEADER_SIZE), (names.mac_name(names.HEADER), MAC_HEX_SIZE),
           (names.MANIFEST, MAX_MANIFEST_SIZE + IV_SIZE), (names.mac_name(names.MANIFEST), MAC_HEX_SIZE))  # fmt: skip
ERROR_GRACE = 2.0  # seconds to wait for the DisposableVM's reason after the stream to it broke


class ParanoidRestore:
    """A paranoid restore, driven like ``machine.Restore``: connect, open, plan, run, cancel, close."""

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
        disp_transport: Transport | None = None,
    ) -> None:
        self.system = system
        self.passphrase = passphrase
        self.options = options
        self.progress = progress
        self.state = State.CONNECTED
        self._cancel = threading.Event()
        self.receiver = Receiver(system, location, source_vm, transport, self._cancel)  # the agent's channel
        self._qubes = qubes
        self._disp_transport = disp_transport
        self.disposable: Disposable | None = None
        self.disp: Channel | None = None
        self.writer: FrameWriter | None = None
        self.vms: list[pf.PlanVm] = []
        self.info: pf.PlanInfo | None = None
        self.paranoid_plan: ParanoidPlan | None = None
        self.applier: ParanoidApplier | None = None
        self._relay: threading.Thread | None = None
        self._relay_error: BaseException | None = None
        self._agent_waiting = False  # the relay thread waits for the backup VM's next frame
        self.restored: list[str] = []
        self.warnings: list[str] = []
        self.leftovers = Leftovers()  # what killed restores left (found by plan(), cleaned by run())
        self.cleaned: list[str] = []
        self.extracted = 0

    @property
    def qubes(self) -> Qubes:
        if self._qubes is None:
            self._qubes = Qubes(self.system)
        return self._qubes

    @property
    def confined(self) -> bool:
        return self.receiver.confined

    @property
    def disp_label(self) -> str:
        return self.disposable.label if self.disposable is not None else "the DisposableVM"

    # -- connecting: the agent, the DisposableVM ------------------------------------------------------

    def connect(self) -> None:
        """Start the agent and the DisposableVM's service (before the passphrase is asked: both take time)."""
        try:
            if self.receiver.channel is None:
                self.receiver.connect()
            cleanup_disposables(self.qubes)
            self.disposable = Disposable(self.qubes)
            name = self.disposable.create()
            transport = self._disp_transport or make_transport(self.system)
            proc = transport.start(pf.SERVICE, name)
            assert proc.stdin is not None
            self.disp = Channel(proc, vm=self.disp_label)
            self.writer = FrameWriter(proc.stdin, self.disp.timeout, self.disp_label)
        except BaseException:
            self._fail()
            raise

    def open(self) -> list[pf.PlanVm]:
        """Passphrase and the backup's opening members to the DisposableVM; its plan back, checked."""
        try:
            if self.disp is None:
                self.connect()
            assert self.disp is not None and self.writer is not None
            self._to_disp(FrameType.PASSPHRASE, "", self.passphrase)
            for i, (name, limit) in enumerate(OPENING):
                try:
                    frame = self._agent_frame(limit)
                    if frame.type != FrameType.MEMBER or frame.name != name:
                        got = frame.name if frame.type == FrameType.MEMBER else frame.type.name
                        raise VerificationError(f"backup is damaged or tampered with: expected {name}, got "
                                                f"{safe_text(got)}")  # fmt: skip
                except BackupError as e:  # once it has the header, the DisposableVM may know better (not ours?)
                    raise (self._disp_reason(e) if i else e) from None
                self._to_disp(FrameType.MEMBER, frame.name, frame.data)
            self.vms, self.info = read_plan(self.disp, self.disp_label)
            self.state = State.MANIFEST
            return self.vms
        except BaseException:
            self._fail()
            raise

    def _to_disp(self, ftype: FrameType, name: str, data: bytes | memoryview) -> None:
        assert self.writer is not None
        try:
            self.writer.send(ftype, name, data)
        except BackupError as e:  # it stopped reading (or stalled): its own ERROR line, if any, says why
            raise self._disp_reason(e) from None

    def _agent_frame(self, limit: int, into: Callable[[FrameType, int], memoryview | None] | None = None) -> Frame:
        """The agent's next frame (MEMBER within ``limit``, END), its ERROR raised: only the frame layer."""
        channel = self.receiver.channel
        assert channel is not None
        limits = {FrameType.MEMBER: (names.MAX_NAME_LEN, limit), FrameType.END: (0, 0),
                  FrameType.ERROR: (0, MAX_ERROR_LEN), FrameType.DAMAGED: (0, MAX_ERROR_LEN)}  # fmt: skip
        try:
            frame = channel.recv(limits, names.is_member_name, into)
        except ProtocolError as e:
            raise VerificationError(f"backup VM sent a malformed stream: {e}") from None
        if frame is None:
            raise VerificationError("the backup ends too early (truncated, or the backup VM stopped)")
        if frame.type == FrameType.ERROR:
            raise BackupError(f"backup VM reports: {safe_text(frame.data)}")
        if frame.type == FrameType.DAMAGED:  # its reader found the file malformed (as receive.py: exit 3)
            raise VerificationError(f"the backup is damaged: backup VM reports: {safe_text(frame.data)}")
        return frame

    def _disp_reason(self, error: BackupError) -> BackupError:
        """When the stream to the DisposableVM broke, its own ERROR line (if it sent one) says why."""
        disp = self.disp
        if disp is None or self._cancel.is_set():
            return error
        timeout, disp.timeout = disp.timeout, ERROR_GRACE
        try:
            frame = disp.recv({FrameType.ERROR: (0, MAX_ERROR_LEN)})
        except (BackupError, ProtocolError, OSError):
            return error
        finally:
            disp.timeout = timeout
        if frame is not None and frame.type == FrameType.ERROR:
            return VerificationError(f"{self.disp_label} reports: {safe_text(frame.data)}")
        return error

    # -- planning ------------------------------------------------------------------------------------

    def plan(self) -> ParanoidPlan:
        assert self.info is not None
        try:
            if not self.options.verify_only:
                self.leftovers = find_leftovers(self.qubes, self.system.home_dir)
            gone = self.leftovers.removed_names  # their names are free for this restore
            vms = {n: klass for n, (klass, _state) in self.qubes.vm_list().items() if n not in gone}
            here = Here(vms, frozenset(self.qubes.labels()),
                        {p: self.qubes.global_property(p) for p in ("default_template", "default_dispvm")})  # fmt: skip
            plan = plan_paranoid(here, self.vms, self.info, self.options)
            if not self.options.verify_only and (managers := self._managers()):
                plan.errors.insert(0, risk.managers_error(managers))
            self.paranoid_plan = plan
            self.state = State.PLANNED
            return plan
        except BaseException:
            self._fail()
            raise

    def _managers(self) -> list[str]:
        """VMs that could change this restore's VMs while they are in progress (risk.restore_managers), this
        restore's DisposableVM included (a policy rule for @type:DispVM or @dispvm:... would cover it)."""
        gone = self.leftovers.removed_names
        vms = {n: klass for n, (klass, _state) in self.qubes.vm_list().items() if klass != "AdminVM" and n not in gone}
        return risk.restore_managers(vms, {n: self.qubes.tags(n) for n in vms}, read_policy(self.system))

    # -- receiving and applying ----------------------------------------------------------------------

    def run(self) -> None:
        plan, info, disp, writer = self.paranoid_plan, self.info, self.disp, self.writer
        assert plan is not None and info is not None and disp is not None and writer is not None
        agent = self.receiver.channel
        assert agent is not None
        try:
            if plan.errors:
                raise BackupError(plan.errors[0])
            wanted = [a.vm.archive for a in plan.wanted]
            for channel in (agent, writer):  # first, as a normal restore: the agent starts reading meanwhile
                for archive in wanted:
                    channel.send(FrameType.WANT, archive)
                channel.send(FrameType.WANT_END)
            agent.close_input()
            if not self.options.verify_only:
                if self.leftovers:  # the user chose to run: now, not earlier
                    self.cleaned = clean_leftovers(self.qubes, self.leftovers, self.system.home_dir)
                    self.leftovers = Leftovers()
                managers = self._managers()  # again, just before the first VM tagged in progress exists
                if managers:
                    raise BackupError(risk.managers_error(managers))
                self.applier = ParanoidApplier(self.qubes, plan)
                self.applier.create_all()
            self._relay = threading.Thread(target=self._relay_archives, args=(set(wanted), info.chunk_size),
                                           name="paranoid-relay", daemon=True)  # fmt: skip
            self._relay.start()
            self.state = State.RECEIVING
            try:
                for act in plan.wanted:
                    for volume in act.vm.volumes:
                        self._receive_volume(act, volume, plan.data)
                self._expect_verified()
            except BackupError as e:
                raise self._relay_reason(e) from None
            self._relay.join()
            if self._relay_error is not None:
                raise self._relay_error
            self.state = State.VERIFIED
            if self.applier is not None:
                self.applier.commit()
                self.restored = [a.target_name for a in plan.wanted]
            self.warnings += plan.warnings
            self.state = State.COMMITTED
        except BaseException as e:
            self._fail()
            if self._cancel.is_set() and isinstance(e, BackupError) and not isinstance(e, Cancelled):
                raise Cancelled("restore cancelled") from None  # what broke was what cancel() stopped
            raise
        finally:
            self.close()

    def _relay_archives(self, wanted: set[str], chunk_size: int) -> None:
        """The second thread: the agent's wanted archives and END, frame by frame, to the DisposableVM."""
        writer, agent = self.writer, self.receiver.channel
        assert writer is not None and agent is not None
        buf = bytearray(chunk_size + IV_SIZE)
        try:
            while True:
                self._agent_waiting = True
                frame = self._agent_frame(len(buf), lambda t, n: memoryview(buf)[:n] if t == FrameType.MEMBER else None)
                self._agent_waiting = False
                if frame.type == FrameType.MEMBER and names.archive_of(frame.name) not in wanted:
                    raise VerificationError(f"backup VM sent a member that was not asked for: {safe_text(frame.name)}")
                try:
                    writer.send(frame.type, frame.name, frame.data)
                except ChannelClosed as e:  # it stopped reading: its ERROR line (or its end) is what the main
                    self._relay_error = e  # thread reads next, and the better reason
                    return
                if frame.type == FrameType.END:
                    break
            if agent.read(1):
                raise VerificationError("backup VM sent data after the end of the backup")
            agent.wait()
            writer.close_input()
        except BaseException as e:
            self._relay_error = Cancelled("restore cancelled") if self._cancel.is_set() else e
            if self.disp is not None:
                self.disp.interrupt()  # the main thread waits for the DisposableVM: wake it

    def _relay_reason(self, error: BackupError) -> BaseException:
        """Which failure to report when the main thread's wait on the DisposableVM failed: the relay's, if it
        failed first and woke us, or if it is waiting on a silent backup VM (the DisposableVM has nothing to
        answer then: the backup VM is the one that stalls, and the relay says so within its own deadline)."""
        relay = self._relay
        if self._relay_error is None and relay is not None and self._agent_waiting and not self._cancel.is_set():
            relay.join((self.disp.timeout if self.disp is not None else 0) + 1)
        if self._relay_error is not None and not isinstance(self._relay_error, ChannelClosed):
            return self._relay_error
        return error

    def _disp_frame(self, what: str) -> Frame:
        assert self.disp is not None
        if self._cancel.is_set():
            raise Cancelled("restore cancelled")
        try:
            frame = self.disp.recv(pf.DATA_LIMITS, pf.is_volume_frame_name)
        except ProtocolError as e:
            raise VerificationError(f"{self.disp_label} sent a malformed stream: {e}") from None
        if frame is None:
            raise VerificationError(f"{self.disp_label} ended before {what}")
        if frame.type == FrameType.ERROR:
            raise VerificationError(f"{self.disp_label} reports: {safe_text(frame.data)}")
        return frame

    def _receive_volume(self, act: ParanoidAction, volume: pf.PlanVolume, total: int) -> None:
        """One volume's frames into its import: exactly the declared size, never a byte more."""
        name = pf.volume_frame_name(act.vm.archive, volume.name)
        what = f"volume {volume.name} of VM {act.name}"
        imp = self.applier.begin_volume(act, volume) if self.applier is not None else None
        pos = 0
        while True:
            frame = self._disp_frame(f"the end of {what}")
            if frame.type == FrameType.VERIFIED or frame.name != name:
                got = frame.name or frame.type.name
                raise VerificationError(f"{self.disp_label} sent {safe_text(got)} where {what} ({name}) was due")
            if frame.type == FrameType.VOLUME_END:
                if pos != volume.size:
                    raise VerificationError(f"{self.disp_label} ended {what} after {pos} of {volume.size} bytes")
                if imp is not None:
                    imp.finish()
                return
            try:
                n = len(frame.data) if frame.type == FrameType.VOLUME_DATA else pf.decode_hole(bytes(frame.data))
            except pf.PlanError as e:
                raise VerificationError(f"{self.disp_label}: {what}: {e}") from None
            if pos + n > volume.size:
                raise VerificationError(f"{self.disp_label} sent more than the {volume.size} bytes declared for {what}")
            if imp is not None:
                if frame.type == FrameType.VOLUME_DATA:
                    imp.write(frame.data)
                else:
                    imp.write_zeros(n)
            pos += n
            if frame.type == FrameType.VOLUME_DATA:
                self.extracted += n
                if self.progress is not None:
                    self.progress(min(self.extracted, total), total)

    def _expect_verified(self) -> None:
        frame = self._disp_frame("saying that the backup verified")
        if frame.type != FrameType.VERIFIED:
            raise VerificationError(f"{self.disp_label} sent {safe_text(frame.name or frame.type.name)} after the "
                                    "last volume")  # fmt: skip
        assert self.disp is not None
        if self.disp.read(1):
            raise VerificationError(f"{self.disp_label} sent data after VERIFIED")
        rc = self.disp.wait()
        if rc != 0:
            raise VerificationError(f"{self.disp_label} failed (exit status {rc}) after VERIFIED")

    # -- failure, cancellation, the end ---------------------------------------------------------------

    def cancel(self) -> None:
        """From any thread: stop; the restore then fails with Cancelled and dom0 is as it was."""
        self._cancel.set()
        self.receiver.kill()
        for channel in (self.disp, self.writer):
            if channel is not None:
                channel.interrupt()
        if self.applier is not None:
            self.applier.abort_imports()

    def _stop_streams(self) -> None:
        """Kill the agent and the DisposableVM's service; wait for the relay thread."""
        self.receiver.kill()
        if self.disp is not None:
            with contextlib.suppress(OSError):
                self.disp.proc.kill()
            if self.writer is not None:
                self.writer.interrupt()
        if self._relay is not None and self._relay is not threading.current_thread():
            self._relay.join()

    def _fail(self) -> None:
        original = sys.exc_info()[1]
        self.state = State.FAILED
        self._stop_streams()
        errors = []
        if self.applier is not None and not self.applier.committed:
            applier, self.applier = self.applier, None
            try:
                applier.rollback()
            except BackupError as e:
                errors.append(str(e))
        try:
            self.close()
        except BackupError as e:
            errors.append(str(e))
        if errors:
            raise BackupError("; ".join(([str(original)] if original is not None else []) + errors)) from None

    def close(self) -> None:
        """Release everything; the DisposableVM is removed (raises only if it could not be)."""
        self._stop_streams()
        self.receiver.abort()
        if self.disp is not None:
            self.disp.close()
            self.disp = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.applier is not None and not self.applier.committed:
            applier, self.applier = self.applier, None
            applier.rollback()
        if self.disposable is not None:
            self.disposable.remove()
