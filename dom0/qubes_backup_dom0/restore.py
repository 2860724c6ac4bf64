"""The restore state machine: the one place where bytes from the backup VM enter dom0.

States, in order (any failure jumps to FAILED, which removes the staging area and leaves dom0 untouched)::

    CONNECTED -> HEADER (parse <= 4 KiB, check KDF ceilings, run KDF, verify header MAC)
              -> MANIFEST (<= 16 MiB, verify MAC, then decrypt, then parse XML)
              -> PLANNED (show the table; tell the agent which archives to send)
              -> RECEIVING (per chunk: bounded read, verify MAC, then decrypt -> decompress -> extract)
              -> VERIFIED (END seen, every wanted archive complete)
              -> COMMITTED (move VM directories into place, then write qubes.xml atomically)

Nothing is decrypted, decompressed or parsed before its MAC verified; the only thing read before that is
the frame layer (qubes_backup_protocol.frames) with lengths bounded per state.
"""

from __future__ import annotations

import contextlib
import enum
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from qubes_backup_protocol import names
from qubes_backup_protocol.frames import (
    MAX_ERROR_LEN,
    MAX_LOCATION_LEN,
    Frame,
    FrameType,
    ProtocolError,
    safe_text,
)

from . import crypto, inner
from . import header as header_mod
from . import manifest as manifest_mod
from .chunking import decompressed_reader
from .errors import BackupError, Cancelled, UsageError, VerificationError
from .qubesxml import Collection, Domain
from .system import System
from .transport import Channel, Transport, make_transport

ProgressCallback = Callable[[int, int], None]
STAGING_PREFIX = ".qubes-backup-restore-"
JOURNAL = "moved-into-place"
MAX_TRAILER = 256


class State(enum.Enum):
    CONNECTED = "connected"
    HEADER = "header verified"
    MANIFEST = "manifest verified"
    PLANNED = "planned"
    RECEIVING = "receiving"
    VERIFIED = "verified"
    COMMITTED = "committed"
    FAILED = "failed"


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


@dataclass
class VmAction:
    """What will happen to one VM of the backup; ``restore`` False means skipped (``reason`` says why)."""

    name: str
    klass: str
    template: str | None
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

    @property
    def wanted(self) -> list[manifest_mod.ArchiveEntry]:
        wanted = [v.archive for v in self.vms if v.restore and v.archive is not None]
        if self.home is not None:
            wanted.insert(0, self.home)
        return wanted

    @property
    def data(self) -> int:
        return sum(a.data for a in self.wanted)


# ------------------------------------------------------------------------------------------------ helpers

def _member_limits(max_data: int) -> dict[FrameType, tuple[int, int]]:
    return {
        FrameType.MEMBER: (names.MAX_NAME_LEN, max_data),
        FrameType.ERROR: (0, MAX_ERROR_LEN),
        FrameType.END: (0, 0),
    }


class _ChunkFeed:
    """A blocking reader over verified, decrypted chunks, consumed by the extraction thread."""

    def __init__(self, depth: int = 2) -> None:
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._buf = memoryview(b"")
        self._eof = False

    def put(self, data: bytes | None) -> None:
        self._q.put(data)

    def read(self, size: int = -1) -> bytes:
        while not self._buf and not self._eof:
            item = self._q.get()
            if item is None:
                self._eof = True
            else:
                self._buf = memoryview(item)
        if size < 0 or size >= len(self._buf):
            out, self._buf = bytes(self._buf), memoryview(b"")
            return out
        out, self._buf = bytes(self._buf[:size]), self._buf[size:]
        return out

    def drain(self) -> None:
        """Unblock a producer after the consumer failed."""
        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass


class _Extraction(threading.Thread):
    """Decompress and extract one archive's verified plaintext into the staging area."""

    def __init__(self, compression: str, dest: Path | None, archive: manifest_mod.ArchiveEntry) -> None:
        super().__init__(name=f"extract-{archive.member}", daemon=True)
        self.feed = _ChunkFeed()
        self.compression = compression
        self.dest = dest
        self.archive = archive
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.dest is not None:
                self.dest.mkdir(mode=0o700)
            extractor = inner.Extractor(self.dest, self.archive.files)
            reader = decompressed_reader(self.compression, self.feed)
            while True:
                piece = reader.read(1 << 22)
                if not piece:
                    break
                extractor.feed(piece)
            extractor.finish()
            if self.feed.read(1):
                raise VerificationError(f"archive {self.archive.member}: data after the end of the archive")
        except BaseException as e:  # reported by the receiving thread
            self.error = e
            self.feed.drain()


def _err_text(e: BaseException) -> str:
    return str(e) if isinstance(e, BackupError) else f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------- the machine

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
        options: RestoreOptions = RestoreOptions(),
        progress: ProgressCallback | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.system = system
        self.location = location
        self.passphrase = passphrase
        self.source_vm = source_vm
        self.options = options
        self.progress = progress
        self.transport = transport
        self.state = State.CONNECTED
        self.channel: Channel | None = None
        self.header: header_mod.Header | None = None
        self.keys: crypto.Keys | None = None
        self.manifest: manifest_mod.Manifest | None = None
        self.restore_plan: RestorePlan | None = None
        self.staging: Path | None = None
        self._cancel = threading.Event()
        self.restored: list[str] = []
        self.home_restored_to: Path | None = None

    # -- connection ----------------------------------------------------------------------------------

    def _connect(self) -> Channel:
        if len(self.location.encode()) > MAX_LOCATION_LEN or "\n" in self.location or "\0" in self.location:
            raise UsageError("backup location is too long or contains a newline")
        if self.source_vm:
            transport = self.transport or make_transport(self.system)
            channel = Channel(transport.start("qubes.Restore", self.source_vm))
            channel.send(FrameType.LOCATION, "", self.location.encode())
        else:
            # A backup file in dom0 is just as untrusted: a confined agent process reads the tar, dom0
            # still only sees frames.
            path = self.system.dom0_path(self.location)
            if not path.is_file():
                raise UsageError(f"backup file {self.location} does not exist in dom0")
            from .transport import LocalFileTransport

            transport = self.transport or LocalFileTransport(path.parent)
            channel = Channel(transport.start("qubes.Restore", "dom0"))
            channel.send(FrameType.LOCATION, "", ("/" + path.name).encode())
        return channel

    def _recv(self, max_data: int) -> Frame:
        """The next frame: a MEMBER within ``max_data``, an END, or the agent's error (raised)."""
        assert self.channel is not None
        if self._cancel.is_set():
            raise Cancelled("restore cancelled")
        try:
            frame = self.channel.recv(_member_limits(max_data), names.is_member_name)
        except ProtocolError as e:
            raise VerificationError(f"backup VM sent a malformed stream: {e}") from None
        if frame is None:
            raise VerificationError("the backup ends too early (truncated, or the backup VM stopped)")
        if frame.type == FrameType.ERROR:
            raise BackupError(f"backup VM reports: {safe_text(frame.data)}")
        return frame

    def _expect(self, name: str, max_data: int) -> bytes:
        frame = self._recv(max_data)
        if frame.type != FrameType.MEMBER or frame.name != name:
            got = frame.name if frame.type == FrameType.MEMBER else frame.type.name
            raise VerificationError(f"backup is damaged or tampered with: expected {name}, got {safe_text(got)}")
        return frame.data

    # -- header and manifest -------------------------------------------------------------------------

    def open(self) -> manifest_mod.Manifest:
        """Connect, verify the header and the manifest; returns the manifest."""
        try:
            # An interrupted earlier restore may have left staging (and unregistered files moved into place):
            # undo it first, so that it is neither restored over nor mistaken for existing VMs.
            cleanup_stale_staging(self.system)
            self.channel = self._connect()
            raw_header = self._expect(names.HEADER, header_mod.MAX_HEADER_SIZE)
            hdr = header_mod.parse(raw_header)  # strict grammar and ceilings, before the KDF
            keys = crypto.keys_from_passphrase(self.passphrase, hdr.kdf, hdr.backup_id)
            mac = self._expect(names.mac_name(names.HEADER), crypto.MAC_HEX_SIZE)
            if not crypto.verify_member(keys, names.HEADER, raw_header, mac):
                raise VerificationError("wrong passphrase, or the backup header was tampered with")
            self.header, self.keys = hdr, keys
            self.state = State.HEADER
            sealed = self._expect(names.MANIFEST, manifest_mod.MAX_MANIFEST_SIZE + crypto.IV_SIZE)
            mac = self._expect(names.mac_name(names.MANIFEST), crypto.MAC_HEX_SIZE)
            if not crypto.verify_member(keys, names.MANIFEST, sealed, mac):
                raise VerificationError("the backup manifest failed verification (tampered with or damaged)")
            self.manifest = manifest_mod.parse(crypto.decrypt(keys, sealed))
            if self.manifest.backup_id != hdr.backup_id.hex():
                raise VerificationError("the manifest belongs to another backup")
            self.state = State.MANIFEST
            return self.manifest
        except BaseException:
            self._fail()
            raise

    # -- planning ------------------------------------------------------------------------------------

    def plan(self) -> RestorePlan:
        assert self.manifest is not None and self.header is not None
        try:
            self.restore_plan = plan_restore(self.system, self.header, self.manifest, self.options)
            self.state = State.PLANNED
            return self.restore_plan
        except BaseException:
            self._fail()
            raise

    # -- receiving -----------------------------------------------------------------------------------

    def run(self) -> None:
        """Receive and verify everything planned, then commit (or, with verify_only, write nothing)."""
        plan = self.restore_plan
        assert plan is not None and self.channel is not None and self.header is not None
        try:
            if plan.errors:
                raise BackupError(plan.errors[0])
            for archive in plan.wanted:
                self.channel.send(FrameType.WANT, archive.member)
            self.channel.send(FrameType.WANT_END)
            self.channel.close_input()
            if not self.options.verify_only:
                self.staging = _make_staging(self.system)
            self.state = State.RECEIVING
            total, done = plan.data, 0
            for archive in plan.wanted:
                done = self._receive_archive(archive, done, total)
            frame = self._recv(0)
            if frame.type != FrameType.END:
                raise VerificationError(f"backup has unexpected extra member {safe_text(frame.name)}")
            # END is the last thing the agent may send: anything after it (a second END, a member) means the
            # stream is not what a well-behaved agent produces, so it is refused like any other tampering.
            if self.channel.read(1):
                raise VerificationError("backup VM sent data after the end of the backup")
            self.channel.wait()
            self.state = State.VERIFIED
            if self.options.verify_only:
                self.state = State.COMMITTED
                return
            self._commit(plan)
            self.state = State.COMMITTED
        except BaseException:
            self._fail()
            raise
        finally:
            if self.channel is not None:
                self.channel.abort()

    def _receive_archive(self, archive: manifest_mod.ArchiveEntry, done: int, total: int) -> int:
        assert self.header is not None and self.keys is not None
        keys, chunk_size = self.keys, self.header.chunk_size
        dest = None if self.staging is None else self.staging / archive.member
        worker = _Extraction(self.header.compression, dest, archive)
        worker.start()
        index = 0
        stored = 0
        last_len = chunk_size
        try:
            while True:
                expected_chunk = names.chunk_name(archive.member, index) if index < names.MAX_CHUNKS else None
                trailer = names.trailer_name(archive.member)
                frame = self._recv(chunk_size + crypto.IV_SIZE)
                if frame.type != FrameType.MEMBER or frame.name not in (expected_chunk, trailer):
                    got = frame.name if frame.type == FrameType.MEMBER else frame.type.name
                    raise VerificationError(
                        f"backup is damaged or tampered with: VM {archive.vm}: expected "
                        f"{expected_chunk} or {trailer}, got {safe_text(got)}"
                    )
                mac = self._expect(names.mac_name(frame.name), crypto.MAC_HEX_SIZE)
                if not crypto.verify_member(keys, frame.name, frame.data, mac):
                    raise VerificationError(
                        f"backup is damaged or tampered with: {frame.name} (VM {archive.vm}) failed verification"
                    )
                # Verified. Only now is anything of it interpreted.
                if frame.name == trailer:
                    count, total_stored = _parse_trailer(frame.data, archive)
                    if count != index or total_stored != stored or index == 0:
                        raise VerificationError(
                            f"backup is damaged or tampered with: VM {archive.vm} has {index} chunk(s), "
                            f"its trailer says {count}"
                        )
                    break
                if last_len != chunk_size:
                    raise VerificationError(f"backup is damaged: VM {archive.vm}: short chunk before the last")
                plain = crypto.decrypt(keys, frame.data)
                if not plain:
                    raise VerificationError(f"backup is damaged: VM {archive.vm}: empty chunk")
                last_len = len(plain)
                stored += last_len
                index += 1
                worker.feed.put(plain)
                if worker.error is not None:
                    break
                if self.progress is not None:  # compressed bytes against data bytes: an estimate
                    self.progress(min(done + min(stored, archive.data), total), total)
        finally:
            worker.feed.put(None)
            worker.join()
        done += archive.data
        if worker.error is not None:
            err = worker.error
            if isinstance(err, BackupError):
                raise err
            raise VerificationError(f"VM {archive.vm}: the archive could not be extracted: {_err_text(err)}")
        return done

    # -- commit --------------------------------------------------------------------------------------

    def _commit(self, plan: RestorePlan) -> None:
        """Move verified VMs into place and register them; qubes.xml's rename is the commit point."""
        assert self.staging is not None
        root = self.system.qubes_root
        current = Collection.load(self.system.qubes_xml)
        moves: list[tuple[str, Path, Path]] = []
        for action in plan.vms:
            if not action.restore or action.archive is None:
                continue
            old = plan.backup.get(action.name)
            assert old is not None
            new_dom = current.add_domain(old, new_name=action.target_name)
            for prop, value in action.replace_refs.items():
                if value is None:
                    new_dom.remove_property(prop)
                else:
                    new_dom.set_property(prop, value)
            _fix_label_and_pools(current, new_dom)
            for f in _file_moves(plan.backup, old, new_dom, current, action.archive):
                src = self.staging / action.archive.member / f[0]
                moves.append((action.target_name, src, root / f[1]))
        # Renamed VMs: dependants restored with them follow the new names.
        renames = {a.name: a.new_name for a in plan.vms if a.restore and a.new_name}
        restored_names = [a.target_name for a in plan.vms if a.restore and a.archive is not None]
        for old_name, new_name in renames.items():
            assert new_name is not None
            current.rename_references(old_name, new_name, restored_names)
        for name in restored_names:
            _root_follows_template(current, name)
        home_move = None
        if plan.home is not None and plan.home_target is not None:
            user_dir = next(f.path for f in plan.home.files)
            home_move = (self.staging / plan.home.member / user_dir, self.system.home_dir / plan.home_target)
        if home_move is not None and os.path.lexists(home_move[1]):
            # Two restores within the same second, or a directory the user made: never restore over it.
            home_move = (home_move[0], _free_path(home_move[1]))
        for _vm, _src, dst in moves:
            if dst.exists():
                raise BackupError(f"cannot restore: {dst} appeared during the restore; nothing was changed")
        journal = self.staging / JOURNAL
        with open(journal, "w", encoding="utf-8") as j:
            for vm, _src, dst in moves:
                j.write(f"{vm}\t{os.fspath(dst)}\n")
            j.flush()
            os.fsync(j.fileno())
        for _vm, src, dst in moves:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dst)
        current.write_atomic(self.system.qubes_xml)  # the commit point
        journal.unlink()
        if home_move is not None:
            home_move[1].parent.mkdir(parents=True, exist_ok=True)
            os.rename(*home_move)
            self.home_restored_to = home_move[1]
        self.restored = restored_names
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging = None

    # -- failure and cancellation ----------------------------------------------------------------------

    def cancel(self) -> None:
        self._cancel.set()
        if self.channel is not None:
            self.channel.abort()

    def _fail(self) -> None:
        self.state = State.FAILED
        if self.channel is not None:
            self.channel.abort()
        if self.staging is not None:
            _remove_staging(self.staging, self.system)
            self.staging = None

    def close(self) -> None:
        if self.channel is not None:
            self.channel.abort()
        if self.staging is not None:
            _remove_staging(self.staging, self.system)
            self.staging = None


# ------------------------------------------------------------------------------------------- plan helpers

def _parse_trailer(data: bytes, archive: manifest_mod.ArchiveEntry) -> tuple[int, int]:
    import re

    m = re.fullmatch(rb"chunks=(0|[1-9][0-9]{0,6})\nstored=(0|[1-9][0-9]{0,18})\n", data)
    if m is None or len(data) > MAX_TRAILER:
        raise VerificationError(f"backup is damaged: VM {archive.vm}: malformed trailer")
    return int(m.group(1)), int(m.group(2))


def _free_path(path: Path) -> Path:
    for i in range(1, 1000):
        candidate = path.with_name(f"{path.name}-{i}")
        if not os.path.lexists(candidate):
            return candidate
    raise BackupError(f"no free name to restore dom0's home beside {path}")


def _free_name(base: str, taken: Callable[[str], bool]) -> str:
    for i in range(1, 1000):
        candidate = f"{base[:28]}{i}"
        if not taken(candidate):
            return candidate
    raise BackupError(f"no free name to rename {base} to")


def plan_restore(
    system: System, hdr: header_mod.Header, manifest: manifest_mod.Manifest, options: RestoreOptions
) -> RestorePlan:
    """Decide, VM by VM, what the restore does (Qubes' semantics for conflicts and missing dependencies)."""
    backup = Collection.from_bytes(manifest.qubes)
    current = Collection.load(system.qubes_xml) if system.qubes_xml.is_file() else None
    if current is None:
        raise BackupError(f"no Qubes collection at {system.qubes_xml}: cannot register restored VMs")
    in_backup = {a.vm: a for a in manifest.archives if a.kind == "vm"}
    for name in [*options.vms, *options.exclude]:
        if name not in in_backup and name != "dom0" and backup.get(name) is None:
            raise UsageError(f"VM {name} is not in this backup")
    selected = set(options.vms) if options.vms else None
    errors: list[str] = []
    actions: list[VmAction] = []
    root = system.qubes_root
    reserved: set[str] = set()

    def exists(name: str) -> bool:
        dom = current.get(name)
        if dom is not None or name in reserved:
            return True
        return any((root / d / name).exists() for d in ("appvms", "vm-templates", "servicevms"))

    for archive in (a for a in manifest.archives if a.kind == "vm"):
        dom = backup.get(archive.vm)
        if dom is None:
            raise VerificationError(f"manifest: VM {archive.vm} has data but no entry in qubes.xml")
        act = VmAction(dom.name, dom.klass, _shown_ref(backup, dom, "template"), _shown_ref(backup, dom, "netvm"),
                       archive.size, archive)  # fmt: skip
        actions.append(act)
        if selected is not None and dom.name not in selected:
            act.restore, act.reason = False, "not selected"
        elif dom.name in options.exclude:
            act.restore, act.reason = False, "excluded"
        elif exists(dom.name):
            if options.verify_only:
                # Verifying writes nothing, so a VM that exists here is no conflict: its data is checked too
                # (the common case is verifying a backup on the system that made it).
                act.notes.append("exists here")
            elif options.rename_conflicting:
                act.new_name = _free_name(dom.name, exists)
                reserved.add(act.new_name)
            elif options.skip_conflicting:
                act.restore, act.reason = False, "already exists"
            else:
                act.restore, act.reason = False, "already exists (use --skip-conflicting or --rename-conflicting)"
                errors.append(
                    f"VM {dom.name} already exists on this system: use --skip-conflicting or --rename-conflicting"
                )
        if act.restore:
            reserved.add(act.target_name)

    # Dependencies: a template/netvm/dispvm must be restored with the VM or exist here.
    will_restore = {a.name for a in actions if a.restore}
    for act in actions:
        if not act.restore:
            continue
        dom = backup.get(act.name)
        assert dom is not None
        for prop in ("template", "netvm", "default_dispvm"):
            if prop in dom.properties:
                ref = dom.properties.get(prop) or None
            elif prop == "template" and (ref := backup.effective_template(dom)) is not None:
                # The VM used the old system's default template; its disks belong to that template, so unless
                # this system has the same default it is pinned to it, not left to inherit another one.
                if ref in will_restore or current.get(ref) is not None:
                    if current.global_properties.get("default_template") != ref:
                        act.replace_refs[prop] = ref
                    continue
            else:
                continue  # netvm/default_dispvm follow this system's defaults, as a new VM's would
            if ref is None or ref in will_restore or current.get(ref) is not None:
                continue
            what = f"missing {prop} {ref}"
            if options.verify_only:  # nothing is registered, so nothing can be broken: verify it anyway
                act.notes.append(what)
                continue
            if options.ignore_missing:
                default = current.global_properties.get(_DEFAULT_OF[prop]) or None
                if prop == "template" and (default is None or current.get(default) is None):
                    act.restore, act.reason = False, f"{what} and no default template"
                    errors.append(f"VM {act.name}: {what}, and this system has no default template")
                    continue
                act.replace_refs[prop] = None
                act.notes.append(f"{what}: using the default ({default or 'none'})")
            elif options.skip_broken:
                act.restore, act.reason = False, what
            else:
                act.restore, act.reason = False, what
                errors.append(f"VM {act.name}: {what}; use --skip-broken or --ignore-missing")
        if not act.restore:
            will_restore.discard(act.name)

    home_archive = next((a for a in manifest.archives if a.kind == "home"), None)
    home = None
    home_target = None
    home_wanted = not options.skip_dom0_home and "dom0" not in options.exclude
    if home_archive is not None and home_wanted and (selected is None or "dom0" in selected):
        home = home_archive
        home_target = datetime.now().strftime("home-restore-%Y-%m-%d-%H%M%S")
    if not any(a.restore for a in actions) and home is None and not errors:
        errors.append("nothing to restore: every VM of the backup is skipped")
    return RestorePlan(hdr, manifest, backup, actions, home, home_target, errors)


def _shown_ref(backup: Collection, dom: Domain, prop: str) -> str | None:
    """The template/netvm as the table shows it: explicit, or the backed-up system's default in brackets."""
    if dom.has_property(prop):
        return dom.raw_property(prop) or None
    effective = backup.effective_template(dom) if prop == "template" else backup.effective_netvm(dom)
    return f"({effective})" if effective else None


_DEFAULT_OF = {"template": "default_template", "netvm": "default_netvm", "default_dispvm": "default_dispvm"}


def _fix_label_and_pools(current: Collection, dom: Domain) -> None:
    """Labels and pools are looked up in this system, not the one the backup came from."""
    fix = getattr(current, "adapt_foreign_domain", None)
    if fix is not None:
        fix(dom)


def _root_follows_template(current: Collection, name: str) -> None:
    """An AppVM's root volume is a snapshot of its template's root.  After renames, --ignore-missing and this
    system's defaults the template may differ from the one in the backup (a VM inheriting the default
    template keeps inheriting it), so point the snapshot source at the template the VM really has here;
    otherwise it would start from another template's image (e.g. a renamed copy's)."""
    dom = current.get(name)
    if dom is None or dom.klass != "AppVM":
        return
    template = current.get(current.effective_template(dom) or "")
    root = next((v for v in template.volumes if v.name == "root"), None) if template is not None else None
    if root is None or not root.vid:
        return
    for vel in dom.element.iterfind("volume-config/volume"):
        if vel.get("name") == "root" and vel.get("source"):
            vel.set("source", root.vid)


def _file_moves(
    backup: Collection, old: Domain, new: Domain, current: Collection, archive: manifest_mod.ArchiveEntry
) -> Iterable[tuple[str, str]]:
    """(path in the archive, path under the Qubes root) for each restored file."""
    old_dir = old.features.get("backup-path") or backup.vm_dir(old)
    new_dir = current.vm_dir(new)
    new_vids = {v.name: v.vid for v in new.volumes}
    by_file = {f"{v.vid}.img": new_vids.get(v.name) for v in old.volumes if v.save_on_stop}
    for f in archive.files:
        if by_file.get(f.path):
            yield f.path, f"{by_file[f.path]}.img"
        elif f.path.startswith(old_dir.rstrip("/") + "/"):
            yield f.path, new_dir + f.path[len(old_dir.rstrip("/")) :]
        else:
            raise VerificationError(f"manifest: file {f.path} of VM {old.name} has no place on this system")


# ------------------------------------------------------------------------------------------ staging area

def _make_staging(system: System) -> Path:
    root = system.qubes_root
    cleanup_stale_staging(system)
    stamp = f"{os.getpid()}-{os.urandom(4).hex()}"
    path = root / f"{STAGING_PREFIX}{stamp}"
    path.mkdir(mode=0o700)
    return path


def _remove_staging(staging: Path, system: System) -> None:
    """Undo a partial commit (directories moved in before qubes.xml was written), then delete staging."""
    journal = staging / JOURNAL
    if journal.is_file():
        # Interrupted between moving files into place and writing qubes.xml: files of VMs that did not get
        # registered are removed again (their names did not exist before the restore).
        registered = set(Collection.load(system.qubes_xml).names()) if system.qubes_xml.is_file() else set()
        root = system.qubes_root
        for line in journal.read_text(encoding="utf-8").splitlines():
            vm, _, raw = line.partition("\t")
            dst = Path(raw)
            if vm in registered or root not in dst.parents:
                continue
            dst.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                dst.parent.rmdir()  # only if empty: it was created by the restore
    shutil.rmtree(staging, ignore_errors=True)


def cleanup_stale_staging(system: System) -> list[Path]:
    """Remove what an interrupted restore left behind (run at the start of every restore)."""
    removed = []
    root = system.qubes_root
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        if entry.name.startswith(STAGING_PREFIX) and entry.is_dir() and not entry.is_symlink():
            pid = entry.name[len(STAGING_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
                continue  # another restore is running right now
            _remove_staging(entry, system)
            removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
