"""Frame-level attacks: a fake agent sends a real backup's members, bent, straight as frames.

Cases are named symbolically (member kinds such as ``vm5:last``) and resolved against the real backup at
run time, so the same list stays meaningful when the simulated system changes.  ``vm5`` and ``vm6`` are the
multi-chunk VM archives in the middle of the backup (the second template and the StandaloneVM, in the restore
order of FORMAT.md section 6; ``harness.build_world`` checks they have several chunks).
"""

from __future__ import annotations

import re
import struct

import pytest
from qubes_backup_protocol import frames
from qubes_backup_protocol.frames import FrameType

from .harness import Members, OrderGuard, World, encode_stream, refuse_stream

# Member kinds: every kind of the format, and chunks at the start, middle and end of a multi-chunk archive.
KINDS = [
    "backup-header", "backup-header.hmac", "manifest", "manifest.hmac",
    "vm0/000000", "vm1/000000", "vm5:mid", "vm5:last", "vm5:mid.hmac", "vm5/trailer", "vm5/trailer.hmac",
    "vm6:last.hmac",
]  # fmt: skip
WHERE = ["first", "middle", "last"]


def index_of(members: Members, kind: str) -> int:
    """Resolve a symbolic kind to a member index (``vmN:mid``/``vmN:last`` are chunk positions)."""
    m = re.fullmatch(r"(vm\d+):(mid|last)(\.hmac)?", kind)
    if m is None:
        return next(i for i, (n, _) in enumerate(members) if n == kind)
    chunks = [i for i, (n, _) in enumerate(members) if re.fullmatch(rf"{m.group(1)}/\d{{6}}", n)]
    assert len(chunks) >= 3, "the archive must have several chunks"
    i = chunks[len(chunks) // 2] if m.group(2) == "mid" else chunks[-1]
    return i + 1 if m.group(3) else i


def pos(data: bytes, where: str) -> int:
    return {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[where]


def refuse_members(world: World, members: Members, end: bool = True) -> str:
    return refuse_stream(world, encode_stream(members, end))


# --------------------------------------------------------------------------------------------- bit flips

@pytest.mark.parametrize("bit", [0x01, 0x80])
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("kind", KINDS)
def test_flip_bit(world: World, guard: OrderGuard, kind: str, where: str, bit: int) -> None:
    members = list(world.a)
    i = index_of(members, kind)
    name, data = members[i]
    raw = bytearray(data)
    raw[pos(data, where)] ^= bit
    members[i] = (name, bytes(raw))
    refuse_members(world, members)


# ------------------------------------------------------------------------------ frame header corruption

FIELDS = ["magic", "version", "type-unknown", "type-end", "type-error", "name_len+1", "name_len-1",
          "data_len+1", "data_len-1", "data_len-max", "name_len-max"]  # fmt: skip


def _frame_offset(members: Members, i: int) -> int:
    return len(encode_stream(members[:i], end=False))


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("kind", KINDS)
def test_frame_header(world: World, guard: OrderGuard, kind: str, field: str) -> None:
    members = world.a
    i = index_of(members, kind)
    stream = bytearray(encode_stream(members))
    at = _frame_offset(members, i)
    name_len, data_len = struct.unpack(">HI", stream[at + 4 : at + 10])
    if field == "magic":
        stream[at] ^= 0x20
    elif field == "version":
        stream[at + 2] = 2
    elif field.startswith("type"):
        stream[at + 3] = {"type-unknown": 99, "type-end": FrameType.END, "type-error": FrameType.ERROR}[field]
    elif field.startswith("name_len"):
        new = {"name_len+1": name_len + 1, "name_len-1": name_len - 1, "name_len-max": 0xFFFF}[field]
        stream[at + 4 : at + 6] = struct.pack(">H", new)
    else:
        new = {"data_len+1": data_len + 1, "data_len-1": data_len - 1, "data_len-max": 0xFFFFFFFF}[field]
        stream[at + 6 : at + 10] = struct.pack(">I", new)
    refuse_stream(world, bytes(stream))


# ----------------------------------------------------------------------------- drop, duplicate, reorder

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("op", ["drop", "duplicate", "swap-next", "move-to-end", "drop-with-mac"])
def test_structure(world: World, guard: OrderGuard, kind: str, op: str) -> None:
    members = list(world.a)
    i = index_of(members, kind)
    if op == "drop":
        del members[i]
    elif op == "duplicate":
        members.insert(i + 1, members[i])
    elif op == "swap-next":
        members[i], members[i + 1] = members[i + 1], members[i]
    elif op == "move-to-end":
        members.append(members.pop(i))
    else:  # a member together with its MAC (or a MAC with its member): a consistent-looking gap
        j = i if not members[i][0].endswith(".hmac") else i - 1
        del members[j : j + 2]
    refuse_members(world, members)


def _archive(members: Members, archive: str) -> list[int]:
    return [i for i, (n, _) in enumerate(members) if n.startswith(archive + "/")]


@pytest.mark.parametrize(
    "case",
    ["drop-archive-vm5", "drop-last-archive", "drop-home-archive", "archives-reordered", "archives-renamed",
     "no-end", "end-twice", "extra-member-after-end", "chunks-of-vm5-reversed", "pair-swap-vm5",
     "only-header", "empty", "end-only", "trailer-first"],
)  # fmt: skip
def test_archive_level(world: World, guard: OrderGuard, case: str) -> None:
    members = list(world.a)
    end = True
    extra = b""
    if case == "drop-archive-vm5":
        members = [m for m in members if not m[0].startswith("vm5/")]
    elif case == "drop-last-archive":
        last = members[-1][0].split("/")[0]
        members = [m for m in members if not m[0].startswith(last + "/")]
    elif case == "drop-home-archive":
        members = [m for m in members if not m[0].startswith("vm0/")]
    elif case == "archives-reordered":
        one, two = _archive(members, "vm1"), _archive(members, "vm5")
        members = members[: one[0]] + [members[i] for i in two] + [members[i] for i in one] + members[two[-1] + 1 :]
    elif case == "archives-renamed":  # vm1's members renamed vm5 and vice versa, MACs and all
        members = [(n.replace("vm1/", "vmX/").replace("vm5/", "vm1/").replace("vmX/", "vm5/"), d) for n, d in members]
    elif case == "no-end":
        end = False
    elif case == "end-twice":
        extra = frames.encode(FrameType.END)
    elif case == "extra-member-after-end":
        extra = frames.encode(FrameType.MEMBER, members[-2][0], members[-2][1])
    elif case == "chunks-of-vm5-reversed":
        idx = [i for i in _archive(members, "vm5") if not members[i][0].endswith(("trailer", "trailer.hmac"))]
        pairs = [(members[a], members[a + 1]) for a in idx[::2]][::-1]
        flat = [m for p in pairs for m in p]
        for k, i in enumerate(idx):
            members[i] = flat[k]
    elif case == "pair-swap-vm5":  # chunk 1 and 2 exchange positions, each with its own MAC
        a, b = index_of(members, "vm5/000001"), index_of(members, "vm5/000002")
        members[a : a + 2], members[b : b + 2] = members[b : b + 2], members[a : a + 2]
    elif case == "only-header":
        members = members[:2]
    elif case == "empty":
        members, end = [], False
    elif case == "end-only":
        members = []
    elif case == "trailer-first":
        t = index_of(members, "vm1/trailer")
        first = _archive(members, "vm1")[0]
        members[first:first] = members[t : t + 2]
        del members[t + 2 : t + 4]
    refuse_stream(world, encode_stream(members, end) + extra)


# ----------------------------------------------------------------------- swaps of contents, transplants

SWAPS = [
    ("vm5/000001", "vm5/000002", False), ("vm5/000001", "vm5/000002", True),
    ("vm1/000000", "vm5/000000", False), ("vm1/000000", "vm5/000000", True),
    ("backup-header.hmac", "manifest.hmac", False), ("vm1/trailer", "vm5/trailer", True),
    ("vm1/trailer", "vm6/trailer", False), ("vm0/000000", "vm6/000000", True),
]  # fmt: skip


@pytest.mark.parametrize(("x", "y", "with_mac"), SWAPS)
def test_swap_contents_keep_names(world: World, guard: OrderGuard, x: str, y: str, with_mac: bool) -> None:
    members = list(world.a)
    i, j = index_of(members, x), index_of(members, y)
    for a, b in [(i, j), (i + 1, j + 1)] if with_mac else [(i, j)]:
        members[a], members[b] = (members[a][0], members[b][1]), (members[b][0], members[a][1])
    refuse_members(world, members)


TRANSPLANTS = [*KINDS, "pair=vm1/000001", "pair=vm5/trailer", "pair=manifest", "pair=backup-header",
               "archive=vm5", "tail=manifest", "head=vm1"]  # fmt: skip


@pytest.mark.parametrize("what", TRANSPLANTS)
def test_transplant_from_other_backup(world: World, guard: OrderGuard, what: str) -> None:
    """Parts of backup B (same system, same passphrase) put into backup A under the same names."""
    a, b = list(world.a), dict(world.b)
    kind, _, rest = what.partition("=")
    if not rest:
        names_ = [a[index_of(a, kind)][0]]
    elif kind == "pair":
        i = index_of(a, rest)
        names_ = [a[i][0], a[i + 1][0]]
    elif kind == "archive":
        names_ = [n for n, _ in a if n.startswith(rest + "/")]
    elif kind == "tail":  # everything from the manifest on: B's manifest and data behind A's header
        names_ = [n for n, _ in a[index_of(a, rest) :]]
    else:  # "head": A's archives behind B's header and manifest
        names_ = [n for n, _ in a[: index_of(a, rest + "/000000")]]
    replaced = 0
    for k, (n, d) in enumerate(a):
        if n in names_ and n in b and b[n] != d:
            a[k] = (n, b[n])
            replaced += 1
    if not replaced:  # e.g. a trailer: same content in both backups, so transplanting it changes nothing
        pytest.skip("identical bytes in both backups")
    refuse_members(world, a)


# -------------------------------------------------------------------------------------------- truncation

N_TRUNC = 70


@pytest.mark.parametrize("k", range(N_TRUNC))
def test_truncate_evenly(world: World, guard: OrderGuard, k: int) -> None:
    stream = encode_stream(world.a)
    refuse_stream(world, stream[: len(stream) * k // N_TRUNC])


@pytest.mark.parametrize("kind", [*KINDS, "END"])
@pytest.mark.parametrize("cut", ["in-header", "after-header", "in-name", "in-data", "before-last-byte"])
def test_truncate_in_frame(world: World, guard: OrderGuard, kind: str, cut: str) -> None:
    members = world.a
    stream = encode_stream(members)
    if kind == "END":
        if cut not in ("in-header", "before-last-byte"):
            pytest.skip("an END frame has no name or data to cut into")
        at, name_len, data_len = len(stream) - frames.HEADER_SIZE, 0, 0
    else:
        i = index_of(members, kind)
        at, name_len, data_len = _frame_offset(members, i), len(members[i][0]), len(members[i][1])
    size = frames.HEADER_SIZE + name_len + data_len
    off = {"in-header": 5, "after-header": frames.HEADER_SIZE, "in-name": frames.HEADER_SIZE + name_len // 2,
           "in-data": frames.HEADER_SIZE + name_len + data_len // 2, "before-last-byte": size - 1}[cut]  # fmt: skip
    refuse_stream(world, stream[: at + off])
