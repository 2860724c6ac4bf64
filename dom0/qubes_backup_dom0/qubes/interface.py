"""The Qubes system interface: everything backup and restore ask of or change in Qubes, through qubesd.

Reading (backup, planning): the VM list, properties, features, tags, devices, firewall, notes, volumes,
pools, labels -- and ``collection()``, an R4 qubes.xml document built from those answers, which is what a
backup's manifest embeds.  Writing (restore): one Admin API call per change, plus ``import_volume``, which
runs ``admin.vm.volume.ImportWithSize`` in dom0 exactly as Qubes' own restore does.  No module of ours
writes qubes.xml or a volume file itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO

from lxml import etree

from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.qubes import adminapi
from qubes_backup_dom0.qubes.adminapi import AdminAPI, AdminAPIError, PolicyDenied, Property, QubesdError
from qubes_backup_dom0.qubes.qubesxml import Collection
from qubes_backup_dom0.qubes.system import System

#: Pool Info keys that are runtime statistics, not configuration (qubes.xml does not store them).
POOL_STATS = frozenset({"size", "usage", "usage_details"})
VOLUME_ATTRS = ("pool", "vid", "size", "revisions_to_keep", "source")
VOLUME_BOOLS = ("rw", "snap_on_start", "save_on_stop", "ephemeral")
_DEVCLASS_RE = re.compile(r"^[a-z0-9_-]{1,32}$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_COLOR_RE = re.compile(r"^0x[0-9a-fA-F]{6}$")
#: The two Admin APIs (Qubes.release): R4.3's is also that of later releases (qubes-core-admin main).
RELEASE_42 = "4.2"
RELEASE_43 = "4.3"
_NOTES_UNSUPPORTED = frozenset({"QubesDaemonNoResponseError", "ProtocolError", "QubesNotImplementedError"})
MAX_NOTES = 256 * 1024
IMPORT_SERVICE = "admin.vm.volume.ImportWithSize"
IMPORT_REPLY_MAX = 64 * 1024
IMPORT_TIMEOUT = 600.0
#: An aborted import: how long its service may take to end the import itself once its input ended, then
#: after SIGTERM (QUBES_BACKUP_IMPORT_GRACE: the first, for tests).
def _grace(default: float) -> float:
    try:
        value = float(os.environ.get("QUBES_BACKUP_IMPORT_GRACE", default))
    except ValueError:
        return default
    return value if 0 <= value <= 600 else default


ABORT_GRACE = _grace(10.0)
TERM_GRACE = 5.0
_ZEROS = bytes(1 << 20)
_ZERO_FD: int | None = None  # /dev/zero, opened on first use; -1 when it cannot be spliced from
PIPE_SIZE = 1 << 20


def _service_argv(system: System, script: Path, volume: str) -> list[str]:
    """How to run the import service: executed as it is (a real dom0's is a script of Qubes' own), except the
    simulation's own (a standard-library Python script), which runs in this interpreter without site-packages
    (``-S``): not through whatever ``python3`` is first on PATH (a pyenv shim costs ~0.1 s per volume)."""
    if system.simulated and not system.rpc_dir_override:
        return [sys.executable, "-S", str(script), volume]
    return [str(script), volume] if os.access(script, os.X_OK) else [sys.executable, str(script), volume]


def _zero_fd() -> int | None:
    global _ZERO_FD
    if _ZERO_FD is None:
        try:
            _ZERO_FD = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC) if hasattr(os, "splice") else -1
        except OSError:
            _ZERO_FD = -1
    return _ZERO_FD if _ZERO_FD >= 0 else None


def _enlarge_pipe(pipe: IO[bytes] | None) -> None:
    """A 1 MiB pipe into the import service: 16 times fewer wake-ups per MiB (best effort)."""
    if pipe is None:
        return
    with contextlib.suppress(OSError, ValueError):
        fcntl.fcntl(pipe.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)


class Qubes:
    def __init__(self, system: System, api: AdminAPI | None = None) -> None:
        self.system = system
        if api is None:
            restart = system.admin_socket if system.simulated and not system.admin_socket_override else None
            api = AdminAPI(system.admin_socket(), restart=restart)
        self.api = api
        self._release: str | None = None
        self._has_notes: bool | None = None  # None: not asked yet

    # ------------------------------------------------------------------------------------------- reading
    def vm_list(self) -> dict[str, tuple[str, str]]:
        listing = adminapi.parse_vm_list_full(self.api.call("admin.vm.List"))
        self._release = RELEASE_43 if listing.uuids else RELEASE_42
        return listing.vms

    @property
    def release(self) -> str:
        """Which Admin API this qubesd has, told from its own VM list (R4.3's lines carry ``uuid=``):
        ``4.3`` (device assignments with modes, notes) or ``4.2``.  Nothing else decides it."""
        if self._release is None:
            self.vm_list()
        assert self._release is not None
        return self._release

    def global_property(self, name: str) -> str | None:
        prop = adminapi.parse_property(self.api.call("admin.property.Get", "dom0", name), name)
        return prop.value or None

    def labels(self) -> list[str]:
        return adminapi.parse_names(self.api.call("admin.label.List"), "label list")

    def properties(self, vm: str) -> dict[str, Property]:
        return adminapi.parse_properties(self.api.call("admin.vm.property.GetAll", vm))

    def features(self, vm: str) -> dict[str, str]:
        names = adminapi.parse_names(self.api.call("admin.vm.feature.List", vm), "feature list")
        return {n: self._text(self.api.call("admin.vm.feature.Get", vm, n), f"feature {n}") for n in names}

    def tags(self, vm: str) -> list[str]:
        return adminapi.parse_names(self.api.call("admin.vm.tag.List", vm), "tag list")

    def device_classes(self) -> list[str]:
        classes = adminapi.parse_names(self.api.call("admin.deviceclass.List"), "device class list")
        for c in classes:
            if not _DEVCLASS_RE.match(c):
                raise AdminAPIError(f"qubesd: bad device class {c[:40]!r}")
        return classes

    def devices(self, vm: str, devclass: str) -> list[adminapi.DeviceAssignment]:
        """The VM's device assignments of one class (what qubes.xml holds: R4.2's persistent ones, R4.3's
        ``…Assigned``), not live attachments."""
        if self.release == RELEASE_42:
            assigned = adminapi.parse_devices(self.api.call(f"admin.vm.device.{devclass}.List", vm))
            return [d for d in assigned if d.persistent]
        return adminapi.parse_assigned(self.api.call(f"admin.vm.device.{devclass}.Assigned", vm), devclass)

    def firewall_rules(self, vm: str) -> list[str]:
        return adminapi.parse_lines(self.api.call("admin.vm.firewall.Get", vm), "firewall rules")

    def notes(self, vm: str) -> str | None:
        """The VM's notes ('' when empty); None where the release has no notes (R4.2: not asked at all) or
        qubesd refuses them (asked once per run: the answer is remembered)."""
        if self.release == RELEASE_42 or self._has_notes is False:
            return None
        try:
            data = self.api.call("admin.vm.notes.Get", vm)
        except PolicyDenied:
            self._has_notes = False
            return None
        except QubesdError as exc:
            if exc.exc_type in _NOTES_UNSUPPORTED or "unknown method" in exc.message.lower():
                self._has_notes = False
                return None
            raise
        self._has_notes = True
        if len(data) > MAX_NOTES:
            raise AdminAPIError(f"qubesd: notes of {vm} exceed {MAX_NOTES >> 10} KiB")
        return self._text(data, f"notes of {vm}")

    def volumes(self, vm: str) -> dict[str, dict[str, str]]:
        names = adminapi.parse_names(self.api.call("admin.vm.volume.List", vm), "volume list")
        return {
            n: adminapi.parse_kv(self.api.call("admin.vm.volume.Info", vm, n), f"volume {n} info") for n in names
        }

    def pools(self) -> list[str]:
        return adminapi.parse_names(self.api.call("admin.pool.List"), "pool list")

    def pool_info(self, pool: str) -> dict[str, str]:
        return adminapi.parse_kv(self.api.call("admin.pool.Info", "dom0", pool), f"pool {pool} info")

    @staticmethod
    def _text(data: bytes, what: str) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise AdminAPIError(f"qubesd: {what} is not valid UTF-8") from None

    # ------------------------------------------------------------------------------------ the collection
    def collection(self, names: Iterable[str] | None = None) -> Collection:
        """An R4 qubes.xml document of dom0 and ``names`` (default: every VM), built from qubesd's answers.

        Only non-default properties are stored (as qubes.xml does); ``name`` and ``qid`` always.
        """
        vms = self.vm_list()
        wanted = list(vms) if names is None else list(dict.fromkeys(names))
        for n in wanted:
            if n not in vms:
                raise BackupError(f"no such VM: {n}")
        admin = [n for n, (klass, _) in vms.items() if klass == "AdminVM"]
        order = [n for n in vms if n in set(wanted) | set(admin)]
        root = etree.Element("qubes")
        label_ids = self._labels_xml(etree.SubElement(root, "labels"))
        pools_el = etree.SubElement(root, "pools")
        for pool in self.pools():
            info = {k: v for k, v in self.pool_info(pool).items() if k not in POOL_STATS}
            etree.SubElement(pools_el, "pool", attrib={"name": pool, **info})
        props_el = etree.SubElement(root, "properties")
        for pname, prop in adminapi.parse_properties(self.api.call("admin.property.GetAll")).items():
            if not prop.default:
                etree.SubElement(props_el, "property", name=pname).text = _xml_value(prop, label_ids)
        domains = etree.SubElement(root, "domains")
        classes = self.device_classes()
        for name in order:
            domains.append(self._domain_xml(name, vms[name][0], label_ids, classes))
        try:
            return Collection(root)
        except BackupError as exc:
            raise AdminAPIError(f"qubesd's answers do not form a valid collection: {exc}") from None

    def _labels_xml(self, labels_el: etree._Element) -> dict[str, str]:
        ids: dict[str, str] = {}
        for label in self.labels():
            color = self._text(self.api.call("admin.label.Get", "dom0", label), f"label {label}").strip()
            index = self._text(self.api.call("admin.label.Index", "dom0", label), f"label {label}").strip()
            if not re.fullmatch(r"[0-9]{1,4}", index) or not re.fullmatch(r"0x[0-9a-fA-F]{6}", color):
                raise AdminAPIError(f"qubesd: malformed label {label[:40]!r}")
            ids[label] = f"label-{int(index)}"
            etree.SubElement(labels_el, "label", color=color, id=ids[label]).text = label
        return ids

    def _domain_xml(
        self, name: str, klass: str, label_ids: Mapping[str, str], classes: Sequence[str]
    ) -> etree._Element:
        props = self.properties(name)
        qid = props["qid"].value if "qid" in props else ("0" if klass == "AdminVM" else "")
        el = etree.Element("domain", attrib={"id": f"domain-{qid}", "class": klass})
        props_el = etree.SubElement(el, "properties")
        for pname, prop in props.items():
            if not prop.default or (pname in ("name", "qid") and klass != "AdminVM"):
                etree.SubElement(props_el, "property", name=pname).text = _xml_value(prop, label_ids)
        feats = etree.SubElement(el, "features")
        for fname, value in self.features(name).items():
            etree.SubElement(feats, "feature", name=fname).text = value
        for devclass in classes:
            dev_el = etree.SubElement(el, "devices", attrib={"class": devclass})
            for dev in self.devices(name, devclass):
                # as this release's qubes.xml has it: R4.3 adds the mode and the device's identity
                d = etree.SubElement(dev_el, "device", attrib={"backend-domain": dev.backend, "id": dev.port})
                if self.release != RELEASE_42:
                    d.set("mode", dev.mode)
                    d.set("identity", dev.device_id)
                for key, value in dev.options.items():
                    etree.SubElement(d, "option", name=key).text = value
        tags = etree.SubElement(el, "tags")
        for tag in self.tags(name):
            etree.SubElement(tags, "tag", name=tag)
        if klass != "AdminVM":
            el.append(self._volumes_xml(name))
        return el

    def _volumes_xml(self, vm: str) -> etree._Element:
        vc = etree.Element("volume-config")
        for vname, info in self.volumes(vm).items():
            attrs = {"name": vname}
            attrs.update({k: info[k] for k in VOLUME_ATTRS if info.get(k)})
            for key in VOLUME_BOOLS:
                if info.get(key) not in (None, "True", "False"):
                    raise AdminAPIError(f"qubesd: volume {vname} of {vm}: {key}={info[key][:20]!r}")
                if info.get(key) == "True":
                    attrs[key] = "True"
            etree.SubElement(vc, "volume", attrib=attrs)
        return vc

    # ------------------------------------------------------------------------- the one write of a backup
    def set_backup_timestamp(self, vm: str, when: int) -> None:
        self.api.call("admin.vm.property.Set", vm, "backup_timestamp", str(int(when)).encode())

    # ------------------------------------------------------------------------------------ restore writes
    def create_vm(self, klass: str, name: str, label: str, template: str | None, pool: str | None = None) -> None:
        payload = f"name={name} label={label}"
        if pool:
            self.api.call(f"admin.vm.CreateInPool.{klass}", "dom0", template or "", f"{payload} pool={pool}".encode())
        else:
            self.api.call(f"admin.vm.Create.{klass}", "dom0", template or "", payload.encode())

    def set_property(self, vm: str, prop: str, value: str) -> None:
        self.api.call("admin.vm.property.Set", vm, prop, value.encode())

    def reset_property(self, vm: str, prop: str) -> None:
        self.api.call("admin.vm.property.Reset", vm, prop)

    def set_feature(self, vm: str, name: str, value: str) -> None:
        self.api.call("admin.vm.feature.Set", vm, name, value.encode())

    def set_tag(self, vm: str, tag: str) -> None:
        self.api.call("admin.vm.tag.Set", vm, tag)

    def remove_tag(self, vm: str, tag: str) -> None:
        self.api.call("admin.vm.tag.Remove", vm, tag)

    def assign_device(self, vm: str, devclass: str, assignment: adminapi.DeviceAssignment) -> None:
        """A persistent assignment, as this release makes one: R4.2 ``…Attach`` with ``persistent=True``
        and the options (port only, no mode); R4.3 ``…Assign`` with Qubes' serialization (device identity,
        mode, options).  Checked first (``adminapi.check_assignment``): nothing can add or override a field."""
        adminapi.check_assignment(devclass, assignment)
        arg = adminapi.assignment_arg(assignment)
        if self.release == RELEASE_42:
            if assignment.port == adminapi.ANY:
                raise AdminAPIError("R4.2 assigns devices by port only")
            self.api.call(f"admin.vm.device.{devclass}.Attach", vm, arg, adminapi.attach_payload(assignment))
        else:
            payload = adminapi.serialize_assignment(devclass, assignment, vm)
            self.api.call(f"admin.vm.device.{devclass}.Assign", vm, arg, payload)

    def label_color(self, label: str) -> str:
        return self._text(self.api.call("admin.label.Get", "dom0", label), f"label {label}").strip()

    def create_label(self, label: str, color: str) -> None:
        """``admin.label.Create``: a label NAME (``[A-Za-z0-9_.-]``, not all digits) of colour ``0xRRGGBB``."""
        if not _LABEL_RE.match(label) or label.isdigit() or not _COLOR_RE.match(color):
            raise AdminAPIError(f"not a label name and colour: {label[:40]!r} {color[:20]!r}")
        self.api.call("admin.label.Create", "dom0", label, color.encode("ascii"))

    def remove_label(self, label: str) -> None:
        self.api.call("admin.label.Remove", "dom0", label)

    def set_firewall(self, vm: str, rules: Sequence[str]) -> None:
        self.api.call("admin.vm.firewall.Set", vm, "", "".join(f"{r}\n" for r in rules).encode())

    def set_notes(self, vm: str, text: str) -> bool:
        """False (nothing written) where the release has no notes (R4.2: no call is made).  A refusal (qubesd
        closes the connection: e.g. notes over its 256000 bytes, or its sanitiser library missing) is a
        BackupError for the caller to report; the VM is fine without its notes."""
        if self.release == RELEASE_42 or self._has_notes is False:
            return False
        try:
            self.api.call("admin.vm.notes.Set", vm, "", text.encode())
        except QubesdError as exc:
            if exc.exc_type in _NOTES_UNSUPPORTED or "unknown method" in exc.message.lower():
                self._has_notes = False
                return False
            raise
        return True

    def remove_vm(self, vm: str) -> None:
        self.api.call("admin.vm.Remove", vm)

    def vms_tagged(self, tag: str) -> list[str]:
        return [n for n, (klass, _) in self.vm_list().items() if klass != "AdminVM" and tag in self.tags(n)]

    def import_volume(self, vm: str, volume: str, size: int) -> VolumeImport:
        return VolumeImport(self.system, vm, volume, size, self.api.socket_path)


def _xml_value(prop: Property, label_ids: Mapping[str, str]) -> str:
    """A property value as qubes.xml stores it: labels by id (``label-N``), everything else as text."""
    if prop.type != "label":
        return prop.value
    if prop.value not in label_ids:
        raise AdminAPIError(f"qubesd: unknown label {prop.value[:40]!r}")
    return label_ids[prop.value]


class VolumeImport:
    """One running ``admin.vm.volume.ImportWithSize VOLUME`` (env QREXEC_REMOTE_DOMAIN=dom0
    QREXEC_REQUESTED_TARGET=VM), fed ``SIZE\\n`` and then exactly SIZE bytes.  The service exits 0 even when
    the import failed: its stdout (a qubesd reply) decides.

    Aborted as Qubes' own restore aborts one (it stops feeding it): the input ends (``hang_up``), the service
    sees a short import, ends it with ``ImportEnd fail`` (qubesd removes the half-written volume) and its EXIT
    trap removes its temporary file from /tmp.  Only a service still running ABORT_GRACE seconds later gets
    SIGTERM (the trap still runs), and SIGKILL TERM_GRACE seconds after that."""

    def __init__(self, system: System, vm: str, volume: str, size: int, socket_path: str) -> None:
        self.vm, self.volume, self.size = vm, volume, size
        self.written = 0
        self._done = False
        self._hung_up = False
        self._abort_lock = threading.Lock()
        self._stdin_lock = threading.Lock()  # closing stdin vs. hang_up from another thread
        script = system.rpc_dir / IMPORT_SERVICE
        if not script.is_file():
            raise BackupError(f"cannot restore {vm}: {script} is missing")
        argv = _service_argv(system, script, volume)
        env = dict(os.environ, QREXEC_REMOTE_DOMAIN="dom0", QREXEC_REQUESTED_TARGET=vm)
        env["QUBES_ADMIN_SOCKET"] = socket_path
        self._out: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in finish/abort
        self._err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=self._out, stderr=self._err, env=env, start_new_session=True
            )
        except OSError as exc:
            self._close_files()
            raise BackupError(f"cannot restore {vm}: cannot start {script}: {exc.strerror or exc}") from None
        _enlarge_pipe(self.proc.stdin)
        self._send(f"{size}\n".encode())
        self.written = 0

    def _what(self) -> str:
        return f"volume '{self.volume}' of {self.vm}"

    def _send(self, data: bytes | memoryview) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
        except (BrokenPipeError, ConnectionResetError):
            reason = self._reason()
            self.abort()
            raise BackupError(f"import of {self._what()} failed: the service stopped reading{reason}") from None

    def write(self, data: bytes | memoryview) -> None:
        if self._hung_up:
            raise BackupError(f"import of {self._what()} was aborted")
        if self.written + len(data) > self.size:
            self.abort()
            raise BackupError(f"import of {self._what()}: more than {self.size} bytes")
        self._send(data)
        self.written += len(data)

    def write_zeros(self, n: int) -> None:
        """``n`` zero bytes (a hole): spliced from /dev/zero where the kernel allows it (no copy through
        this process: a restore sends every hole of every volume this way), else written from a buffer."""
        if self.written + n > self.size:
            self.abort()
            raise BackupError(f"import of {self._what()}: more than {self.size} bytes")
        n -= self._splice_zeros(n)
        view = memoryview(_ZEROS)
        while n > 0:
            piece = min(n, len(_ZEROS))
            self.write(view[:piece])
            n -= piece

    def _splice_zeros(self, n: int) -> int:
        """Splice up to ``n`` zeros into the service's stdin; how many went (0: splice is not possible)."""
        zero = _zero_fd()
        if zero is None or self.proc.stdin is None or not n:
            return 0
        done = 0
        try:
            self.proc.stdin.flush()
            fd = self.proc.stdin.fileno()
            while done < n:
                got = os.splice(zero, fd, min(n - done, 1 << 20))
                if got <= 0:
                    break
                done += got
                self.written += got
        except (BrokenPipeError, ConnectionResetError):
            reason = self._reason()
            self.abort()
            raise BackupError(f"import of {self._what()} failed: the service stopped reading{reason}") from None
        except OSError as exc:
            if self._hung_up:  # stdin is /dev/null now (hang_up): not a pipe, so splice refuses it
                raise BackupError(f"import of {self._what()} was aborted") from None
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise BackupError(f"import of {self._what()} failed: {exc.strerror or exc}") from None
            global _ZERO_FD
            _ZERO_FD = -1  # not spliceable here: write zeros from now on
        return done

    def finish(self) -> None:
        if self.written != self.size:
            self.abort()
            raise BackupError(f"import of {self._what()}: {self.written} of {self.size} bytes written")
        assert self.proc.stdin is not None
        try:
            self._close_stdin()
            try:
                self.proc.wait(IMPORT_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise BackupError(f"import of {self._what()} did not finish in {IMPORT_TIMEOUT:g} s") from None
            self._out.seek(0)
            reply = self._out.read(IMPORT_REPLY_MAX + 1)
            if len(reply) > IMPORT_REPLY_MAX:
                raise BackupError(f"import of {self._what()}: oversized reply")
            try:
                adminapi.parse_reply(reply, IMPORT_SERVICE, self.vm)
            except BackupError as exc:
                raise BackupError(f"import of {self._what()} failed: {exc}{self._reason()}") from None
        finally:
            self.abort()

    def _reason(self) -> str:
        try:
            self._err.seek(0)
            tail = self._err.read()[-400:].decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        text = " ".join(tail.split())
        return f" ({text})" if text else ""

    def hang_up(self) -> None:
        """End the service's input now, from any thread, without waiting.  The pipe is not closed under a
        writer on another thread (its descriptor could be reused by then): /dev/null takes its place (dup2),
        so the service sees the end of its input as soon as a write in progress returns."""
        with self._stdin_lock:
            if self._hung_up:
                return
            self._hung_up = True
            stdin = self.proc.stdin
            if stdin is None or stdin.closed:
                return
            devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.dup2(devnull, stdin.fileno(), inheritable=False)
            finally:
                os.close(devnull)

    def abort(self) -> None:
        """Stop the service (if still running) the way its script expects, reap it, release everything;
        idempotent, from any thread (an import finishing in the background may be aborted by a cancelled
        restore).  ``hang_up`` every import first to let them all end at once."""
        with self._abort_lock:
            if self._done:
                return
            self._done = True
        self.hang_up()
        if self.proc.poll() is None:
            self._stop()
        self._close_stdin()
        self._close_files()

    def _stop(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(ABORT_GRACE)  # it ends the import itself (ImportEnd fail) and cleans up
            return
        for sig, grace in ((signal.SIGTERM, TERM_GRACE), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
                return

    def _close_stdin(self) -> None:
        with self._stdin_lock:
            if self.proc.stdin is not None:
                with contextlib.suppress(OSError, ValueError):
                    self.proc.stdin.close()

    def _close_files(self) -> None:
        self._out.close()
        self._err.close()


def vm_dir(name: str, klass: str) -> str:
    """Qubes' backup-path of a VM's files (relative to /var/lib/qubes)."""
    return Collection.default_vm_dir(name, klass)

