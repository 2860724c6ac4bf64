"""Crafted input a real backup never contains: absurd headers, oversized lengths, bad names, unknown
frame types, hostile error text, stalls and endless streams."""

from __future__ import annotations

import pytest
from qubes_backup_dom0.format import crypto
from qubes_backup_protocol import frames, names
from qubes_backup_protocol.frames import FrameType

from .harness import Members, OrderGuard, World, encode_stream, refuse_stream


def with_header_values(members: Members, **values: str) -> Members:
    """The header member with some values replaced (the attacker cannot fix its MAC, nor needs to)."""
    lines = members[0][1].decode().splitlines()
    out = []
    for line in lines:
        key = line.split("=", 1)[0]
        out.append(f"{key}={values[key.replace('-', '_')]}" if key.replace("-", "_") in values else line)
    return [(members[0][0], ("\n".join(out) + "\n").encode()), *members[1:]]


ABSURD = [
    {"kdf_n": str(1 << 21)}, {"kdf_n": str(1 << 30)}, {"kdf_n": str(1 << 40)}, {"kdf_n": "999999999999"},
    {"kdf_n": "1023"}, {"kdf_n": "3000"}, {"kdf_n": "512"}, {"kdf_r": "33"}, {"kdf_r": "1000000"},
    {"kdf_p": "17"}, {"kdf_p": "100000000"}, {"kdf_n": str(1 << 20), "kdf_r": "16"},
    {"kdf_n": str(1 << 20), "kdf_r": "8", "kdf_p": "4"}, {"chunk_size": str(1 << 40)},
    {"chunk_size": str(1 << 29)}, {"chunk_size": "65537"}, {"chunk_size": "1000"}, {"chunk_size": "0"},
    {"kdf_n": "0131072"}, {"kdf_n": "-1024"}, {"compression": "xz"}, {"version": "2"}, {"kdf": "argon2"},
    {"backup_id": "0" * 31}, {"created": "2026-13-45T99:99:99Z"}, {"cipher": "aes-128-cbc"},
]  # fmt: skip


@pytest.mark.parametrize("values", ABSURD, ids=lambda v: ",".join(f"{k}={x[:12]}" for k, x in v.items()))
def test_absurd_header_refused_before_kdf(
    world: World, guard: OrderGuard, monkeypatch: pytest.MonkeyPatch, values: dict[str, str]
) -> None:
    """Bounds as tests: the KDF must not even start for parameters above the ceilings."""

    def no_kdf(*_: object) -> bytes:
        raise AssertionError("the KDF ran for a header that breaks the ceilings")

    monkeypatch.setattr(crypto, "derive_master", no_kdf)
    message = refuse_stream(world, encode_stream(with_header_values(world.a, **values)))
    assert "KDF ran" not in message


@pytest.mark.parametrize(
    "raw",
    [b"", b"\n", b"format=qubes-backup\r\n", b"x" * 4096, b"format=qubes-backup\n" * 200, b"\0" * 300],
    ids=["empty", "newline", "crlf", "4096-x", "repeated", "nul"],
)
def test_garbage_header(world: World, guard: OrderGuard, raw: bytes) -> None:
    refuse_stream(world, encode_stream([(names.HEADER, raw), *world.a[1:]]))


def test_header_with_extra_line(world: World, guard: OrderGuard) -> None:
    refuse_stream(world, encode_stream([(names.HEADER, world.a[0][1] + b"extra=1\n"), *world.a[1:]]))


# Declared lengths one above each bound; no data follows: dom0 must refuse on the header alone.
OVERSIZE = [
    ("backup-header", 4097), ("backup-header", 0xFFFFFFFF), ("backup-header.hmac", 66),
    ("manifest", (16 << 20) + 17), ("manifest.hmac", 1 << 20), ("vm1/000000", 65536 + 17),
    ("vm1/000000", (256 << 20) + 17), ("vm1/000000.hmac", 66), ("vm1/trailer", 65536 + 17),
]  # fmt: skip


@pytest.mark.parametrize(("name", "size"), OVERSIZE)
def test_oversized_length(world: World, guard: OrderGuard, name: str, size: int) -> None:
    before = next(i for i, (n, _) in enumerate(world.a) if n == name)
    head = encode_stream(world.a[:before], end=False)
    raw = name.encode()
    refuse_stream(world, head + frames.encode_header(FrameType.MEMBER, len(raw), size) + raw, after="stall",
                  seconds=1.9)  # fmt: skip


BAD_NAMES = [
    b"../vm1/000000", b"vm1/../000000", b"/vm1/000000", b"vm1/000000\0", b"vm1/00000\xc3\xa9", b"vm1//000000",
    b"VM1/000000", b"vm01/000000", b"vm1/0000000", b"vm1/000000.HMAC", b" vm1/000000", b"vm1/000000/",
    b"vm1/" + b"0" * 61, b"\xff" * 10, b"vm1\\000000", b"vm1/trailer\n",
]  # fmt: skip


@pytest.mark.parametrize("at", ["backup-header", "vm1/000000", "vm1/000000.hmac"])
@pytest.mark.parametrize("bad", BAD_NAMES, ids=lambda b: b.decode("latin-1").encode("unicode_escape").decode())
def test_bad_member_name(world: World, guard: OrderGuard, bad: bytes, at: str) -> None:
    members = [(n if n != at else bad.decode("latin-1"), d) for n, d in world.a]
    refuse_stream(world, encode_stream(members))


TYPES = [0, 6, 15, 20, 255, FrameType.LOCATION, FrameType.WANT, FrameType.WANT_END, FrameType.DATA,
         FrameType.COMMIT, FrameType.DONE]  # fmt: skip


@pytest.mark.parametrize("where", ["start", "after-manifest", "mid-archive"])
@pytest.mark.parametrize("ftype", TYPES, ids=str)
def test_wrong_frame_type(world: World, guard: OrderGuard, ftype: int, where: str) -> None:
    at = {"start": 0, "after-manifest": 4, "mid-archive": 12}[where]
    odd = frames.MAGIC + bytes([frames.VERSION, int(ftype)]) + (0).to_bytes(2, "big") + (3).to_bytes(4, "big") + b"abc"
    stream = encode_stream(world.a[:at], end=False) + odd + encode_stream(world.a[at:])
    refuse_stream(world, stream)


@pytest.mark.parametrize(
    "text",
    [b"disk on fire", b"\x1b[31mred\x1b[0m\nsecond line\r\x07", b"\xff\xfe not utf-8", b"x" * 512],
    ids=["plain", "escapes", "binary", "512"],
)
@pytest.mark.parametrize("at", [0, 4, 12])
def test_agent_error_text_is_one_safe_line(world: World, guard: OrderGuard, text: bytes, at: int) -> None:
    stream = encode_stream(world.a[:at], end=False) + frames.encode(FrameType.ERROR, "", text)
    message = refuse_stream(world, stream)
    assert "\x1b" not in message and "backup VM reports" in message


def test_agent_error_too_long(world: World, guard: OrderGuard) -> None:
    refuse_stream(world, frames.encode_header(FrameType.ERROR, 0, 513) + b"x" * 513)


def test_error_frame_with_name(world: World, guard: OrderGuard) -> None:
    refuse_stream(world, frames.encode_header(FrameType.ERROR, 3, 1) + b"abcx")


# Stalls: QUBES_BACKUP_TIMEOUT=2 (conftest); each must end in the timeout error well within 10 s.
STALLS = ["nothing", "after-header", "after-manifest", "inside-chunk", "inside-frame-header", "before-end"]


@pytest.mark.parametrize("where", STALLS)
def test_stall(world: World, guard: OrderGuard, where: str) -> None:
    full = encode_stream(world.a, end=False)
    cut = {"nothing": 0, "after-header": len(encode_stream(world.a[:2], end=False)),
           "after-manifest": len(encode_stream(world.a[:4], end=False)),
           "inside-chunk": len(encode_stream(world.a[:13], end=False)) + 30000,
           "inside-frame-header": len(encode_stream(world.a[:13], end=False)) + 4,
           "before-end": len(full)}[where]  # fmt: skip
    message = refuse_stream(world, full[:cut], after="stall", seconds=10)
    # the stall's timeout; on a loaded machine the per-frame rate bound may fire first (a frame's budget runs
    # while dom0 is still busy with the data before it): both are the bounded refusal of a stalling VM
    assert "did not answer for 2 s" in message or "sends too slowly" in message, message


@pytest.mark.parametrize("where", ["start", "after-manifest", "before-end"])
def test_endless_stream(world: World, guard: OrderGuard, where: str) -> None:
    at = {"start": 0, "after-manifest": 4, "before-end": len(world.a)}[where]
    refuse_stream(world, encode_stream(world.a[:at], end=False), after="zeros", seconds=10)


def test_endless_repeated_frames(world: World, guard: OrderGuard) -> None:
    """A stream that repeats a valid chunk forever is refused at the first repetition, not read on."""
    chunk = encode_stream(world.a[12:14], end=False)
    refuse_stream(world, encode_stream(world.a[:14], end=False) + chunk * 50)
