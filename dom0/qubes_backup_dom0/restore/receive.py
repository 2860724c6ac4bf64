"""Receiving and verifying the stream: the one place where bytes from the backup VM enter dom0.

Order, for every member: a bounded frame (qubes_backup_protocol.frames, lengths limited per state), then its
MAC verified, and only then is it decrypted or parsed.  The header (<= 4 KiB) is parsed strictly and its KDF
cost checked against the ceilings before the KDF runs; the manifest (<= 16 MiB) is decrypted and parsed only
after its MAC verified; each chunk is verified, then decrypted into a pooled buffer and handed to the
extraction thread (extract.py); each archive's trailer (chunk count, stored bytes) is checked last.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import threading
from collections.abc import Callable
from dataclasses import dataclass

from qubes_backup_protocol import names
from qubes_backup_protocol.frames import MAX_ERROR_LEN, MAX_LOCATION_LEN, Frame, FrameType, ProtocolError, safe_text

from qubes_backup_dom0.errors import BackupError, Cancelled, UsageError, VerificationError
from qubes_backup_dom0.format import crypto
from qubes_backup_dom0.format import header as header_mod
from qubes_backup_dom0.format import manifest as manifest_mod
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.qubes.transport import Channel, Transport, make_transport
from qubes_backup_dom0.restore.extract import ArchiveTarget, Extraction, Stopped

ProgressCallback = Callable[[int, int], None]
MAX_TRAILER = 256


def _member_limits(max_data: int) -> dict[FrameType, tuple[int, int]]:
    return {
        FrameType.MEMBER: (names.MAX_NAME_LEN, max_data),
        FrameType.ERROR: (0, MAX_ERROR_LEN),
        FrameType.END: (0, 0),
    }


@dataclass(frozen=True)
class Opened:
    """What ``Receiver.open`` verified: the header, the keys it gave, the manifest."""

    header: header_mod.Header
    keys: crypto.Keys
    manifest: manifest_mod.Manifest


class Receiver:
    """The channel to the agent that reads the backup, and everything that is read from it."""

    def __init__(self, system: System, location: str, source_vm: str | None, transport: Transport | None,
                 cancel: threading.Event) -> None:  # fmt: skip
        self.system = system
        self.location = location
        self.source_vm = source_vm
        self.transport = transport
        self.cancel = cancel
        self.channel: Channel | None = None
        self.confined = True  # False: the process reading the backup's tar runs without a sandbox
        self._sealed = bytearray()  # reused for every chunk frame (read into, verified, decrypted out of)
        self._raw_header: bytes | None = None
        self._header: header_mod.Header | None = None

    # -- connection ----------------------------------------------------------------------------------

    def connect(self) -> None:
        if len(self.location.encode()) > MAX_LOCATION_LEN or "\n" in self.location or "\0" in self.location:
            raise UsageError("backup location is too long or contains a newline")
        if self.source_vm:
            transport = self.transport or make_transport(self.system)
            self.confined = getattr(transport, "confined", True)
            self.channel = Channel(transport.start("qubes.Restore", self.source_vm))
            self.channel.send(FrameType.LOCATION, "", self.location.encode())
            return
        # A backup file in dom0 is just as untrusted: a confined agent process reads the tar, dom0 still
        # only sees frames.
        path = self.system.dom0_path(self.location)
        if not path.is_file():
            raise UsageError(f"backup file {self.location} does not exist in dom0")
        from qubes_backup_dom0.qubes.transport import LocalFileTransport

        transport = self.transport or LocalFileTransport(path.parent)
        self.confined = getattr(transport, "confined", True)
        self.channel = Channel(transport.start("qubes.Restore", "dom0"))
        self.channel.send(FrameType.LOCATION, "", shlex.quote("/" + path.name).encode())  # one word, spaces too

    def abort(self) -> None:
        if self.channel is not None:
            self.channel.abort()

    def kill(self) -> None:
        """From another thread (cancel): only a signal, never closing descriptors under the reader."""
        channel = self.channel
        if channel is not None and channel.proc.poll() is None:
            with contextlib.suppress(OSError):
                channel.proc.kill()

    def _recv(self, max_data: int, into: Callable[[FrameType, int], memoryview | None] | None = None) -> Frame:
        """The next frame: a MEMBER within ``max_data``, an END, or the agent's error (raised)."""
        assert self.channel is not None
        if self.cancel.is_set():
            raise Cancelled("restore cancelled")
        try:
            frame = self.channel.recv(_member_limits(max_data), names.is_member_name, into)
        except (ProtocolError, BackupError, OSError) as e:
            if self.cancel.is_set():  # the agent was killed by cancel(): that is why the stream broke
                raise Cancelled("restore cancelled") from None
            if isinstance(e, ProtocolError):
                raise VerificationError(f"backup VM sent a malformed stream: {e}") from None
            raise
        if self.cancel.is_set():
            raise Cancelled("restore cancelled")
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
        return bytes(frame.data)  # no copy: without ``into`` frame data is already bytes

    # -- header and manifest -------------------------------------------------------------------------

    def read_header(self) -> header_mod.Header:
        """The first member, parsed strictly (grammar and KDF/chunk ceilings) but NOT yet authenticated: its
        MAC needs the passphrase.  Read before the passphrase is asked, so that a wrong location, a backup VM
        that fails or a backup in Qubes' own format is reported first; nothing of it is shown or used before
        ``open`` verified it."""
        if self._header is None:
            self._raw_header = self._expect(names.HEADER, header_mod.MAX_HEADER_SIZE)
            self._header = header_mod.parse(self._raw_header)
        return self._header

    def open(self, passphrase: bytes) -> Opened:
        """Verify the header, derive the keys, verify, decrypt and parse the manifest."""
        hdr = self.read_header()  # strict grammar and ceilings, before the KDF
        raw_header = self._raw_header
        assert raw_header is not None
        keys = crypto.keys_from_passphrase(passphrase, hdr.kdf, hdr.backup_id)
        mac = self._expect(names.mac_name(names.HEADER), crypto.MAC_HEX_SIZE)
        if not crypto.verify_member(keys, names.HEADER, raw_header, mac):
            raise VerificationError("wrong passphrase, or the backup header was tampered with")
        sealed = self._expect(names.MANIFEST, manifest_mod.MAX_MANIFEST_SIZE + crypto.IV_SIZE)
        mac = self._expect(names.mac_name(names.MANIFEST), crypto.MAC_HEX_SIZE)
        if not crypto.verify_member(keys, names.MANIFEST, sealed, mac):
            raise VerificationError("the backup manifest failed verification (tampered with or damaged)")
        manifest = manifest_mod.parse(bytes(crypto.decrypt(keys, sealed)))  # bytes already: no copy
        manifest_mod.check_header(manifest, hdr.backup_id.hex(), hdr.created)  # same backup id and time
        return Opened(hdr, keys, manifest)

    def want(self, archives: list[manifest_mod.ArchiveEntry]) -> None:
        """Tell the agent which archives to send; it skips the others at the source."""
        assert self.channel is not None
        for archive in archives:
            self.channel.send(FrameType.WANT, archive.member)
        self.channel.send(FrameType.WANT_END)
        self.channel.close_input()

    # -- chunks --------------------------------------------------------------------------------------

    def _sealed_buffer(self, ftype: FrameType, size: int) -> memoryview | None:
        """Where a chunk frame's data is read to (called only after its length passed the limit)."""
        if ftype != FrameType.MEMBER:
            return None
        if len(self._sealed) < size:
            self._sealed = bytearray(size)
        return memoryview(self._sealed)[:size]

    def receive_archive(self, opened: Opened, archive: manifest_mod.ArchiveEntry, target: ArchiveTarget,
                        worker: Extraction, progress: Callable[[int], None] | None) -> None:  # fmt: skip
        """Receive and verify one archive; its plaintext goes to the extraction thread, which may still be
        extracting it (or an earlier one) when this returns.  ``progress`` gets the archive's bytes so far."""
        if worker.error is not None:
            raise worker.failure()
        keys, chunk_size = opened.keys, opened.header.chunk_size
        feed = worker.start_archive(target, archive)
        index = stored = 0
        last_len = chunk_size
        trailer = names.trailer_name(archive.member)
        try:
            while True:
                expected_chunk = names.chunk_name(archive.member, index) if index < names.MAX_CHUNKS else None
                # Read straight into the reused buffer: the frame layer checked the length first.
                frame = self._recv(chunk_size + crypto.IV_SIZE, self._sealed_buffer)
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
                    _check_trailer(bytes(frame.data), archive, index, stored)
                    break
                if last_len != chunk_size:
                    raise VerificationError(f"backup is damaged: VM {archive.vm}: short chunk before the last")
                # A pooled buffer (blocks while the extraction thread holds them all: the memory bound).
                out = worker.pool.get(len(frame.data) - crypto.IV_SIZE + 15)
                plain = crypto.decrypt(keys, frame.data, out=out)
                if not plain:
                    raise VerificationError(f"backup is damaged: VM {archive.vm}: empty chunk")
                last_len = len(plain)
                stored += last_len
                index += 1
                feed.put(plain)
                if worker.error is not None:
                    raise worker.failure()
                if progress is not None:
                    progress(stored)
            feed.put(None)
        except Stopped:  # the extraction thread failed while we waited for it
            raise worker.failure() from None

    def finish(self) -> None:
        """END, and nothing after it: the last thing a well-behaved agent sends."""
        assert self.channel is not None
        frame = self._recv(0)
        if frame.type != FrameType.END:
            raise VerificationError(f"backup has unexpected extra member {safe_text(frame.name)}")
        if self.channel.read(1):
            raise VerificationError("backup VM sent data after the end of the backup")
        self.channel.wait()


def _check_trailer(data: bytes, archive: manifest_mod.ArchiveEntry, chunks: int, stored: int) -> None:
    m = re.fullmatch(rb"chunks=(0|[1-9][0-9]{0,6})\nstored=(0|[1-9][0-9]{0,18})\n", data)
    if m is None or len(data) > MAX_TRAILER:
        raise VerificationError(f"backup is damaged: VM {archive.vm}: malformed trailer")
    if int(m.group(1)) != chunks or int(m.group(2)) != stored or chunks == 0:
        raise VerificationError(
            f"backup is damaged or tampered with: VM {archive.vm} has {chunks} chunk(s), "
            f"its trailer says {int(m.group(1))}"
        )
