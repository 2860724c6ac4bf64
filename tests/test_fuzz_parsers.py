"""Hypothesis fuzzing of what dom0 parses from the backup VM: the frame reader and the header parser
(plus the manifest parser, which sees only verified bytes but is checked as if hostile).

The targets (tests/fuzz/targets.py) are shared with the coverage-guided harness run by ``make fuzz``.
"""

from __future__ import annotations

import io
import struct

from fuzz.targets import MEMBER_LIMITS, fuzz_frames, fuzz_header, fuzz_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qubes_backup_dom0.format import header as header_mod
from qubes_backup_dom0.format.crypto import KdfParams
from qubes_backup_protocol import frames
from qubes_backup_protocol.frames import FrameType

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID_HEADER = header_mod.Header(
    bytes(16), "2026-01-01T00:00:00Z", KdfParams(bytes(16), 1024, 8, 1), "zstd", 65536
).render()


def frame_bytes() -> st.SearchStrategy[bytes]:
    """Frames that are mostly well-formed, with any type byte and lengths near and beyond the limits."""
    head = st.tuples(
        st.sampled_from([b"QB", b"QC", b"\0\0"]),
        st.sampled_from([1, 1, 1, 0, 2]),
        st.one_of(st.sampled_from([int(t) for t in FrameType]), st.integers(0, 255)),
        st.one_of(st.integers(0, 70), st.just(0xFFFF)),
        st.one_of(st.integers(0, 70000), st.just(0xFFFFFFFF)),
        st.binary(max_size=200),
    )
    return head.map(lambda t: t[0] + bytes([t[1], t[2]]) + struct.pack(">HI", t[3], t[4]) + t[5])


@FAST
@given(st.lists(frame_bytes(), max_size=6).map(b"".join))
def test_frame_reader_structured(data: bytes) -> None:
    fuzz_frames(data)


@FAST
@given(st.binary(max_size=2000))
def test_frame_reader_random(data: bytes) -> None:
    fuzz_frames(data)


@FAST
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF))
def test_lengths_checked_before_reading(name_len: int, data_len: int) -> None:
    """Over-limit lengths are refused with nothing read beyond the 10-byte header."""
    head = frames.encode_header(FrameType.MEMBER, name_len, data_len)
    stream = io.BytesIO(head + b"v" * 100)
    max_name, max_data = MEMBER_LIMITS[FrameType.MEMBER]
    try:
        frames.read_frame(stream, MEMBER_LIMITS)
    except frames.ProtocolError:
        if name_len > max_name or data_len > max_data:
            assert stream.tell() == frames.HEADER_SIZE
        return


@FAST
@given(st.binary(max_size=600))
def test_header_random(data: bytes) -> None:
    fuzz_header(data)


@FAST
@given(st.integers(0, len(VALID_HEADER) - 1), st.integers(0, 255), st.integers(0, len(VALID_HEADER)))
def test_header_mutated(pos: int, byte: int, cut: int) -> None:
    raw = bytearray(VALID_HEADER)
    raw[pos] = byte
    fuzz_header(bytes(raw))
    fuzz_header(bytes(raw[:cut]))


@FAST
@given(st.sampled_from(["kdf-n", "kdf-r", "kdf-p", "chunk-size"]), st.integers(1, 10**12))
def test_header_numbers(key: str, value: int) -> None:
    lines = [
        f"{key}={value}" if line.startswith(key + "=") else line for line in VALID_HEADER.decode().splitlines()
    ]
    fuzz_header(("\n".join(lines) + "\n").encode())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=800))
def test_manifest_random(data: bytes) -> None:
    fuzz_manifest(b"<qubes-backup-manifest version='1'>" + data)
    fuzz_manifest(data)
