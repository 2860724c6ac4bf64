"""Fuzz targets shared by the atheris harness (``make fuzz``) and the hypothesis tests (``make test``).

Each target feeds arbitrary bytes to one parser dom0 applies to data that came from the backup VM and
asserts the only possible outcomes: a parsed value within the documented bounds, or the parser's one
"this input is bad" exception.  Any other exception (IndexError, UnicodeError, a construct error, ...)
would reach the CLI as an "internal error" instead of a clear message, so it is a finding.
"""

from __future__ import annotations

import collections
import io

from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.format import header as header_mod
from qubes_backup_dom0.format import manifest as manifest_mod
from qubes_backup_protocol import frames, names
from qubes_backup_protocol.frames import FrameType, ProtocolError

# The limits restore.py uses while receiving members, with a small data bound so a fuzzer that claims
# 4 GiB in a length field is refused up front (what the test checks) instead of being waited for.
MEMBER_LIMITS: dict[FrameType, tuple[int, int]] = {
    FrameType.MEMBER: (names.MAX_NAME_LEN, 1 << 16),
    FrameType.ERROR: (0, frames.MAX_ERROR_LEN),
    FrameType.END: (0, 0),
}


class CountingReader(io.BytesIO):
    """A stream that records the largest single read request: proves no read exceeds the bounds."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.largest = 0

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            raise AssertionError("the frame reader must never read an unbounded amount")
        self.largest = max(self.largest, size)
        return super().read(size)


#: Inputs each target has been run on in this process (printed at the end of ``make test``).
RUNS: collections.Counter[str] = collections.Counter()


def fuzz_frames(data: bytes) -> int:
    """Read frames until the stream ends or is refused; returns how many frames were accepted."""
    RUNS["frames"] += 1
    stream = CountingReader(data)
    count = 0
    bound = frames.HEADER_SIZE + max(n + d for n, d in MEMBER_LIMITS.values())
    try:
        while True:
            frame = frames.read_frame(stream, MEMBER_LIMITS, names.is_member_name)
            if frame is None:
                break
            max_name, max_data = MEMBER_LIMITS[frame.type]
            assert len(frame.name) <= max_name and len(frame.data) <= max_data
            assert frame.name == "" or names.is_member_name(frame.name)
            count += 1
    except ProtocolError as e:
        assert "\n" not in str(e)
    assert stream.largest <= bound
    return count


def fuzz_header(data: bytes) -> None:
    """header.parse either returns a header within the ceilings or raises VerificationError."""
    RUNS["header"] += 1
    try:
        hdr = header_mod.parse(data)
    except BackupError:
        return
    assert len(data) <= header_mod.MAX_HEADER_SIZE
    header_mod.check_kdf(hdr.kdf.n, hdr.kdf.r, hdr.kdf.p)
    header_mod.check_chunk_size(hdr.chunk_size)
    assert header_mod.parse(hdr.render()) == hdr


def fuzz_manifest(data: bytes) -> None:
    """manifest.parse either returns a structurally checked manifest or raises a BackupError."""
    RUNS["manifest"] += 1
    body = data.rstrip(manifest_mod.PAD_BYTE)
    if not body.endswith(manifest_mod.DOC_END):
        body += manifest_mod.DOC_END
    padded = body + manifest_mod.PAD_BYTE * (manifest_mod.padded_size(len(body)) - len(body))
    for candidate in (data, padded):  # padded as the writer pads, or the parser stops at the padding check
        _fuzz_manifest_one(candidate)


def _fuzz_manifest_one(data: bytes) -> None:
    try:
        m = manifest_mod.parse(data)
    except BackupError:
        return
    for a in m.archives:
        assert names.is_archive_name(a.member)
        for f in a.files:
            assert manifest_mod.valid_rel_path(f.path) and 0 <= f.data <= f.size


def fuzz_all(data: bytes) -> None:
    """One input, all three parsers (the first byte picks nothing: every parser sees every input)."""
    fuzz_frames(data)
    fuzz_header(data)
    fuzz_manifest(data)
