"""Which backups a location holds, from each one's header -- NOT authenticated (docs/PROTOCOL.md 5a).

The backup VM answers a listing request with one ENTRY frame per backup file (its name and the content of
its header member) and END.  dom0 bounds every frame, checks each name against the backup file name grammar
and parses each header with the strict header parser (``header.parse``: the same grammar and ceilings as a
restore).  No MAC can be checked without the passphrase and one KDF per backup, so everything shown is
labelled unverified: it helps a user notice a missing or an out-of-place newest backup, it proves nothing.
``--list`` / ``--verify-only`` of one backup authenticate it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from qubes_backup_protocol import names
from qubes_backup_protocol.frames import MAX_ERROR_LEN, Frame, FrameType, ProtocolError, safe_text

from qubes_backup_dom0.errors import BackupError, UsageError, VerificationError
from qubes_backup_dom0.format import header as header_mod
from qubes_backup_dom0.format.naming import name_time_mismatch
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.qubes.transport import MIN_RATE, Channel, LocalFileTransport, Transport, make_transport

_LIMITS = {
    FrameType.ENTRY: (names.MAX_NAME_LEN, names.MAX_LIST_HEADER),
    FrameType.END: (0, 0),
    FrameType.ERROR: (0, MAX_ERROR_LEN),
}
#: The most a whole listing may carry: every entry at its largest, the END or ERROR.
LIST_MAX_BYTES = (names.MAX_LIST_ENTRIES + 1) * (10 + names.MAX_NAME_LEN + max(names.MAX_LIST_HEADER, MAX_ERROR_LEN))


def list_deadline(timeout: float) -> float:
    """Seconds a whole listing may take: the stall timeout to start, the largest listing at MIN_RATE, and a
    timeout for the agent's end (however the frames are spread, not more)."""
    return 2 * timeout + LIST_MAX_BYTES / MIN_RATE


@dataclass(frozen=True)
class Listed:
    """One backup file of a listing; ``backup_id``/``created`` come from its unauthenticated header."""

    name: str
    backup_id: str | None = None
    created: str | None = None
    compression: str | None = None
    problem: str | None = None  # why no header could be read (not a backup, damaged, Qubes' own format)

    @property
    def name_mismatch(self) -> str | None:
        return name_time_mismatch(self.name, self.created) if self.created else None


def _parse_entry(name: str, data: bytes) -> Listed:
    if not data:
        return Listed(name, problem="no backup header (not a backup, or damaged)")
    try:
        hdr = header_mod.parse(data)
    except header_mod.QubesFormatBackup:
        return Listed(name, problem="a backup in Qubes OS' own format")
    except BackupError as exc:
        return Listed(name, problem=f"malformed header ({safe_text(str(exc), limit=120)})")
    return Listed(name, hdr.backup_id.hex(), hdr.created, hdr.compression)


def _open(system: System, location: str, source_vm: str | None, transport: Transport | None) -> Channel:
    if source_vm:
        channel = Channel((transport or make_transport(system)).start("qubes.Restore", source_vm), vm=source_vm)
        channel.send(FrameType.LOCATION, names.LIST_REQUEST, location.encode())
        return channel
    path = system.dom0_path(location)
    if not path.is_dir():
        raise UsageError(f"directory {location} does not exist in dom0")
    channel = Channel((transport or LocalFileTransport(path)).start("qubes.Restore", "dom0"), vm="dom0")
    channel.send(FrameType.LOCATION, names.LIST_REQUEST, shlex.quote("/").encode())
    return channel


def _recv(channel: Channel) -> Frame:
    try:
        frame = channel.recv(_LIMITS, names.is_backup_file_name)
    except ProtocolError as exc:
        raise VerificationError(f"backup VM sent a malformed listing: {exc}") from None
    if frame is None:
        tail = channel.stderr_tail()
        raise BackupError("the listing ends too early (the backup VM stopped)" + (f": {tail}" if tail else ""))
    if frame.type == FrameType.ERROR:
        raise BackupError(f"backup VM reports: {safe_text(frame.data)}")
    return frame


def list_backups(system: System, location: str, source_vm: str | None = None,
                 transport: Transport | None = None) -> list[Listed]:  # fmt: skip
    """The backups in directory LOCATION (in ``source_vm``, or in dom0), oldest first by name."""
    channel = _open(system, location, source_vm, transport)
    channel.set_deadline(list_deadline(channel.timeout))
    try:
        found: list[Listed] = []
        while True:
            frame = _recv(channel)
            if frame.type == FrameType.END:
                break
            if len(found) >= names.MAX_LIST_ENTRIES:
                raise VerificationError(f"backup VM lists more than {names.MAX_LIST_ENTRIES} backups")
            if frame.name in {f.name for f in found[-1:]} or (found and frame.name < found[-1].name):
                raise VerificationError("backup VM sent a listing out of order or with duplicates")
            found.append(_parse_entry(frame.name, bytes(frame.data)))
        if channel.read(1):
            raise VerificationError("backup VM sent data after the end of the listing")
        channel.wait()
        return found
    finally:
        channel.close()


def check_directory(system: System, location: str, source_vm: str, transport: Transport | None = None) -> None:
    """Before the passphrase is asked: the backup directory exists in the VM (its first answer to a listing
    request is an ENTRY or END, or the ERROR that says why not); the rest of the listing is not read."""
    channel = _open(system, location, source_vm, transport)
    try:
        _recv(channel)
    finally:
        channel.close()
