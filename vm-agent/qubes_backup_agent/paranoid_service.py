"""qubes.RestoreParanoid: the DisposableVM side of ``qvm-backup-restore --paranoid-mode``.

dom0 creates a DisposableVM for one restore and runs this service in it.  Here, and only here, the backup is
verified, decrypted, decompressed and parsed -- with the very code a normal restore runs in dom0
(``qubes_backup_dom0.restore.receive.Receiver`` for the MACs and decryption, ``restore.extract.Extraction``
and the strict inner-tar extractor, the hardened manifest and qubes.xml parsers).  What goes back to dom0
is only the plan and volume frames of ``qubes_backup_protocol.plan_frames`` (docs/PROTOCOL.md section 8):

    dom0 -> here:  PASSPHRASE, then the backup VM's MEMBER frames relayed as they came (backup-header,
                   backup-header.hmac, manifest, manifest.hmac)
    here -> dom0:  PLAN_VM per VM of the backup, PLAN_END
    dom0 -> here:  WANT(vmN)... WANT_END (the archives to restore), then their MEMBER frames relayed, END
    here -> dom0:  per wanted archive, per volume of its plan: VOLUME_DATA / VOLUME_HOLE ..., VOLUME_END;
                   then VERIFIED (every chunk's MAC, every trailer, END checked)
    or, at any point, one ERROR line and a non-zero exit.

Everything else the backup holds (tags, devices, firewall rules, notes, other properties and features,
dom0's home) is parsed and verified here but never sent.  The backup is assumed to come from a compromised
machine: this process may be taken over by it, which is why dom0 checks every frame against the grammar,
and why this VM is disposable, has no network and gets nothing but the passphrase and the stream.

The service needs, in the DisposableVM's template, the ``qubes_backup_protocol`` and ``qubes_backup_agent``
packages (the agent package) and the ``qubes_backup_dom0`` package's ``format``, ``qubes/qubesxml.py`` and
``restore`` modules with their Python dependencies (cryptography, lxml, construct, zstandard): docs/INSTALL.md.
"""

from __future__ import annotations

import sys
import threading
from typing import BinaryIO, cast

from qubes_backup_dom0.errors import BackupError, VerificationError
from qubes_backup_dom0.format import manifest as manifest_mod
from qubes_backup_dom0.qubes.qubesxml import FILE_DRIVERS, Collection, Domain
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.restore.extract import ArchiveTarget, Extraction
from qubes_backup_dom0.restore.receive import Opened, Receiver
from qubes_backup_protocol import frames, names
from qubes_backup_protocol import plan_frames as pf
from qubes_backup_protocol.frames import FrameType

from .common import EXIT_FAILED, EXIT_OK, install_signal_handlers, send_error, silence

_PASSPHRASE = {FrameType.PASSPHRASE: (0, pf.MAX_PASSPHRASE)}
_WANT = {FrameType.WANT: (names.MAX_NAME_LEN, 0), FrameType.WANT_END: (0, 0)}


class PeerGone(Exception):
    """dom0 closed its side (the user said no, or cancelled)."""


class StdinChannel:
    """What ``Receiver`` reads frames through: here the frames dom0 relays on stdin."""

    def __init__(self, stdin: BinaryIO) -> None:
        self.stdin = stdin

    def recv(self, allowed: dict[FrameType, tuple[int, int]], name_ok: frames.NameCheck | None = None,
             into: frames.BufferFor | None = None) -> frames.Frame | None:  # fmt: skip
        return frames.read_frame(self.stdin, allowed, name_ok, into)

    def read(self, size: int = -1) -> bytes:
        return self.stdin.read(size) or b""

    def wait(self, timeout: float | None = None) -> int:
        return 0


class Output:
    """Frames to dom0, one at a time (the extraction thread sends volume frames, this one the rest)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.lock = threading.Lock()

    def frame(self, ftype: FrameType, name: str = "", data: bytes | memoryview = b"") -> None:
        with self.lock:
            frames.write_frame(self.out, ftype, name, data)
            self.out.flush()


class VolumeSink:
    """One volume entry of the inner tar, streamed to dom0: data in pieces, holes as their length."""

    def __init__(self, out: Output, frame_name: str, size: int) -> None:
        self.out, self.name, self.size, self.pos = out, frame_name, size, 0

    def write_at(self, offset: int, data: memoryview) -> None:
        if offset > self.pos:
            self.out.frame(FrameType.VOLUME_HOLE, self.name, pf.encode_hole(offset - self.pos))
        view = memoryview(data).cast("B")
        for at in range(0, len(view), pf.MAX_VOLUME_PIECE):
            self.out.frame(FrameType.VOLUME_DATA, self.name, view[at : at + pf.MAX_VOLUME_PIECE])
        self.pos = offset + len(view)

    def finish(self, size: int) -> None:
        if size > self.pos:
            self.out.frame(FrameType.VOLUME_HOLE, self.name, pf.encode_hole(size - self.pos))
        self.pos = size
        self.out.frame(FrameType.VOLUME_END, self.name)

    def abort(self) -> None:
        """Nothing to undo here: dom0 removes what it created when the ERROR (or the end) comes."""


# ------------------------------------------------------------------------------------------------ the plan

def volume_paths(coll: Collection, dom: Domain) -> dict[str, str]:
    """Path in the VM's archive -> volume name, as a normal restore maps them (restore/apply.py _vm_files)."""
    base = (dom.features.get("backup-path") or coll.vm_dir(dom) or "").rstrip("/")
    out: dict[str, str] = {}
    for vol in dom.volumes:
        if not vol.save_on_stop or vol.name not in pf.VOLUMES.values():
            continue
        out.setdefault(f"{base}/{vol.name}.img", vol.name)
        driver = coll.pools.get(vol.pool, {}).get("driver")
        if vol.vid and "/" in vol.vid and driver in FILE_DRIVERS:
            out.setdefault(f"{vol.vid}.img", vol.name)
    return out


def _property(dom: Domain, prop: str) -> int | None:
    """An allow-listed property the backup sets explicitly, if its value is in the grammar (else dropped)."""
    raw = dom.raw_property(prop) if dom.has_property(prop) else None
    return None if raw is None else pf.property_number(prop, raw)


def vm_plan(coll: Collection, archive: manifest_mod.ArchiveEntry) -> tuple[pf.PlanVm, dict[str, str]]:
    """The plan record of one VM archive, and where its volumes are in the archive (path -> frame name)."""
    dom = coll.get(archive.vm)
    if dom is None:
        raise VerificationError(f"manifest: VM {archive.vm} has data but no entry in qubes.xml")
    klass = dom.klass
    if klass not in pf.CLASS_VOLUMES:
        raise BackupError(f"VM {archive.vm}: a {klass} cannot be restored in paranoid mode")
    label = dom.label or "red"
    template = coll.effective_template(dom) if klass in ("AppVM", "DispVM") else None
    props = {p: v for p in pf.PROPERTY_CODES if (v := _property(dom, p)) is not None}
    if klass != "AppVM":
        props.pop("template_for_dispvms", None)
    features = {k: v for k, v in dom.features.items() if pf.feature_allowed(k) and pf.valid_feature_value(v)}
    features = dict(list(features.items())[: pf.MAX_FEATURES])
    paths = volume_paths(coll, dom)
    volumes: list[pf.PlanVolume] = []
    frame_names: dict[str, str] = {}
    for f in archive.files:
        vol = paths.get(f.path)
        if vol is None or f.type != "file" or f.size == 0 or vol not in pf.CLASS_VOLUMES[klass]:
            continue
        if any(v.name == vol for v in volumes):
            continue
        volumes.append(pf.PlanVolume(vol, f.size, f.data))
        frame_names[f.path] = pf.volume_frame_name(archive.member, vol)
    vm = pf.PlanVm(archive.member, dom.name, klass, label if pf.valid_label(label) else "red",
                   template if template and pf.is_vm_name(template) and template != dom.name else None,
                   coll.effective_netvm(dom) is None, coll.effective_default_dispvm(dom) is None,
                   props, features, tuple(volumes))  # fmt: skip
    pf.check_vm(vm)
    return vm, frame_names


def send_plan(out: Output, opened: Opened) -> dict[str, tuple[manifest_mod.ArchiveEntry, dict[str, str]]]:
    """PLAN_VM per VM archive, then PLAN_END; returns archive member -> (archive, its volume frame names)."""
    manifest = opened.manifest
    coll = Collection.from_bytes(manifest.qubes)
    vm_archives = [a for a in manifest.archives if a.kind == "vm"]
    if len(vm_archives) > pf.MAX_PLAN_VMS:
        raise BackupError(f"the backup holds {len(vm_archives)} VMs, more than {pf.MAX_PLAN_VMS}")
    plan: dict[str, tuple[manifest_mod.ArchiveEntry, dict[str, str]]] = {}
    records = []
    for archive in vm_archives:
        vm, paths = vm_plan(coll, archive)
        records.append((archive.member, pf.encode_vm(vm)))
        plan[archive.member] = (archive, paths)
    home = next((a for a in manifest.archives if a.kind == "home"), None)
    hdr = opened.header
    info = pf.PlanInfo(hdr.backup_id, hdr.created, hdr.compression, hdr.chunk_size,
                       home.size if home is not None else 0, len(records))  # fmt: skip
    for member, record in records:
        out.frame(FrameType.PLAN_VM, member, record)
    out.frame(FrameType.PLAN_END, "", pf.encode_info(info))
    return plan


def read_wants(stdin: BinaryIO, order: list[str]) -> list[str]:
    """The archives dom0 restores: a subsequence of the plan's, in its order."""
    wanted: list[str] = []
    while True:
        frame = frames.read_frame(stdin, _WANT, pf.is_plan_vm_name)
        if frame is None:
            raise PeerGone
        if frame.type == FrameType.WANT_END:
            return wanted
        if frame.name not in order or (wanted and order.index(frame.name) <= order.index(wanted[-1])):
            raise frames.ProtocolError(f"WANT {frame.name}: not in the plan, or out of order")
        if len(wanted) >= pf.MAX_PLAN_VMS:
            raise frames.ProtocolError("too many WANT frames")
        wanted.append(frame.name)


# ----------------------------------------------------------------------------------------------- restore

def restore(stdin: BinaryIO, out: Output) -> None:
    passphrase = frames.read_frame(stdin, _PASSPHRASE)
    if passphrase is None:
        raise PeerGone
    receiver = Receiver(cast(System, None), "", None, None, threading.Event())
    receiver.channel = StdinChannel(stdin)  # type: ignore[assignment]
    opened = receiver.open(bytes(passphrase.data))
    plan = send_plan(out, opened)
    wanted = read_wants(stdin, list(plan))
    worker = Extraction(opened.header.compression)
    worker.start()
    try:
        for member in wanted:
            archive, paths = plan[member]

            def sinks(entry: object, paths: dict[str, str] = paths) -> VolumeSink | None:
                path, size = getattr(entry, "path", None), getattr(entry, "size", 0)
                name = paths.get(path) if isinstance(path, str) else None
                return VolumeSink(out, name, int(size)) if name is not None else None

            receiver.receive_archive(opened, archive, ArchiveTarget(sinks=sinks), worker, None)
        worker.finish_input()
        receiver.finish()
        worker.join()
        if worker.error is not None:
            raise worker.failure()
    except BaseException:
        worker.abort()  # its volume frames stop before the ERROR line goes out
        if worker.is_alive():
            worker.join()
        raise
    out.frame(FrameType.VERIFIED)


def serve(stdin: BinaryIO, stdout: BinaryIO) -> int:
    out = Output(stdout)
    try:
        restore(stdin, out)
        return EXIT_OK
    except (PeerGone, BrokenPipeError, ConnectionResetError):
        silence(stdout)
        return EXIT_OK
    except BackupError as exc:
        send_error(stdout, str(exc))
    except frames.ProtocolError as exc:
        send_error(stdout, f"bad request: {exc}")
    except MemoryError:
        send_error(stdout, "out of memory in the DisposableVM")
    except Exception as exc:  # the backup may be hostile: whatever it breaks is one line for dom0
        send_error(stdout, f"the backup could not be processed: {type(exc).__name__}: {exc}")
    return EXIT_FAILED


def main(stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    """Entry point of the qubes.RestoreParanoid service (binary stdin/stdout carry frames)."""
    install_signal_handlers()
    return serve(stdin or sys.stdin.buffer, stdout or sys.stdout.buffer)
