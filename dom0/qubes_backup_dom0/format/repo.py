"""The repository format: header, keys and objects (docs/REPOSITORY.md sections 2-5).

A repository holds complete snapshots that share what did not change.  Everything in it but the header is an
*object*: one file, named by its keyed id, that says in clear what it is and which objects it references (the
backup VM's keyless prune needs that), then its content encrypted, then a MAC over all of it::

    qbr1 T C <64 hex id> NNNNNNNN\\n       83 bytes: type, compression, id, number of references
    <64 hex>\\n  x N                        the references, ascending
    IV (16) || AES-256-CTR(enc_key, IV, BODY)
    <64 hex>\\n                             HMAC-SHA256(mac_key, everything above)

``id = HMAC-SHA256(id_key, T || plaintext)``: the backup VM can neither read a block nor test a guess of
it.  ``open_object`` is the only way into an object: MAC first (bound to this repository by its keys), then
the clear header (type and id as asked for), then decryption, bounded decompression and the id recomputed
from the plaintext.  Nothing else of the object is looked at before.
"""

from __future__ import annotations

import re
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import zstandard

from qubes_backup_dom0.errors import VerificationError
from qubes_backup_dom0.format import crypto
from qubes_backup_dom0.format.chunking import ZSTD_LEVEL
from qubes_backup_dom0.format.header import check_kdf

FORMAT_NAME = "qubes-backup-repository"
VERSION = 1
MAX_HEADER_SIZE = 4096
COMPRESSIONS = ("zstd", "none")
DEFAULT_BLOCK_SIZE = 256 << 10
BLOCK_MIN, BLOCK_MAX = 64 << 10, 4 << 20
SEGMENT_BLOCKS = 4096  # blocks per map segment: 1 GiB of a volume at the default block size

ROOT, TREE, SEGMENT, DATA, QUBES = "r", "t", "s", "d", "x"
TYPES = (ROOT, TREE, SEGMENT, DATA, QUBES)
TYPE_NAMES = {ROOT: "snapshot root", TREE: "file list", SEGMENT: "map segment", DATA: "data block",
              QUBES: "qubes.xml"}  # fmt: skip
#: plaintext bounds per type (data blocks: the repository's block size)
MAX_PLAIN = {ROOT: 16 << 20, TREE: 16 << 20, SEGMENT: 1 << 20, QUBES: 16 << 20}
#: reference bounds per type
MAX_REFS = {ROOT: 10_001, TREE: 262_144, SEGMENT: SEGMENT_BLOCKS, DATA: 0, QUBES: 0}

MAGIC = b"qbr1"
HEAD_LEN = 83
REF_LEN = 65
MAC_LEN = 65  # 64 hex digits and "\n"
IV_LEN = crypto.IV_SIZE
PAD_ALIGN = 4096  # a compressed object's file is padded to a multiple of this
SKIPPABLE = 0x184D2A50  # zstd skippable frame magic: the padding
_PAD_MAGIC = struct.pack("<I", SKIPPABLE)
_HEAD_RE = re.compile(rb"qbr1 ([rtsdx]) ([zn]) ([0-9a-f]{64}) ([0-9]{8})\n")
_REF_RE = re.compile(rb"[0-9a-f]{64}\n")

INFO_ENCRYPT = b"qubes-backup-repo-v1/encrypt"
INFO_MAC = b"qubes-backup-repo-v1/mac"
INFO_ID = b"qubes-backup-repo-v1/id"


# ------------------------------------------------------------------------------------------------- header

_KEYS = ("format", "version", "repo-id", "created", "kdf", "kdf-salt", "kdf-n", "kdf-r", "kdf-p", "cipher",
         "mac", "id", "compression", "block-size")  # fmt: skip
_INT = r"[1-9][0-9]{0,11}"
_VALUE_RE = {
    "format": re.escape(FORMAT_NAME), "version": str(VERSION), "repo-id": r"[0-9a-f]{32}",
    "created": r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z", "kdf": "scrypt",
    "kdf-salt": r"[0-9a-f]{32}", "kdf-n": _INT, "kdf-r": _INT, "kdf-p": _INT, "cipher": "aes-256-ctr",
    "mac": "hmac-sha256", "id": "hmac-sha256", "compression": "zstd|none", "block-size": _INT,
}  # fmt: skip
_LINE_RE = re.compile(rb"([a-z-]{1,16})=([ -~]{1,64})")


@dataclass(frozen=True)
class RepoHeader:
    repo_id: bytes
    created: str
    kdf: crypto.KdfParams
    compression: str
    block_size: int

    @property
    def repo_id_hex(self) -> str:
        return self.repo_id.hex()

    def render(self) -> bytes:
        values = {
            "format": FORMAT_NAME, "version": str(VERSION), "repo-id": self.repo_id.hex(), "created": self.created,
            "kdf": "scrypt", "kdf-salt": self.kdf.salt.hex(), "kdf-n": str(self.kdf.n), "kdf-r": str(self.kdf.r),
            "kdf-p": str(self.kdf.p), "cipher": "aes-256-ctr", "mac": "hmac-sha256", "id": "hmac-sha256",
            "compression": self.compression, "block-size": str(self.block_size),
        }  # fmt: skip
        data = "".join(f"{k}={values[k]}\n" for k in _KEYS).encode("ascii")
        parse_header(data)  # never write what a reader refuses
        return data


def check_block_size(size: int) -> None:
    if not BLOCK_MIN <= size <= BLOCK_MAX or size & (size - 1):
        raise VerificationError(f"repository header asks for block size {size}: allowed powers of two from "
                                "64 KiB to 4 MiB")  # fmt: skip


def parse_header(data: bytes) -> RepoHeader:
    """Strictly parse the (unauthenticated) repository header and check its ceilings, before any KDF runs."""
    bad = "the repository header is malformed (not a qubes-backup repository, or damaged)"
    if len(data) > MAX_HEADER_SIZE or not data.endswith(b"\n"):
        raise VerificationError(bad)
    lines = data[:-1].split(b"\n")
    if len(lines) != len(_KEYS):
        raise VerificationError(bad)
    values: dict[str, str] = {}
    for key, line in zip(_KEYS, lines, strict=True):
        m = _LINE_RE.fullmatch(line)
        if m is None or m.group(1).decode() != key or re.fullmatch(_VALUE_RE[key], m.group(2).decode()) is None:
            raise VerificationError(f"{bad}: line {key}")
        values[key] = m.group(2).decode("ascii")
    n, r, p = int(values["kdf-n"]), int(values["kdf-r"]), int(values["kdf-p"])
    check_kdf(n, r, p)
    block_size = int(values["block-size"])
    check_block_size(block_size)
    check_time(values["created"], bad)
    return RepoHeader(bytes.fromhex(values["repo-id"]), values["created"],
                      crypto.KdfParams(bytes.fromhex(values["kdf-salt"]), n, r, p), values["compression"],
                      block_size)  # fmt: skip


def check_time(value: str, what: str) -> None:
    try:
        datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise VerificationError(f"{what}: bad time {value[:32]!r}") from None


# --------------------------------------------------------------------------------------------------- keys

@dataclass(frozen=True)
class RepoKeys:
    """The three subkeys of a repository; every snapshot of it uses them."""

    enc_key: bytes
    mac_key: bytes
    id_key: bytes
    repo_id: bytes


def derive_keys(master: bytes, repo_id: bytes) -> RepoKeys:
    return RepoKeys(crypto.hkdf_sha256(master, repo_id, INFO_ENCRYPT), crypto.hkdf_sha256(master, repo_id, INFO_MAC),
                    crypto.hkdf_sha256(master, repo_id, INFO_ID), repo_id)  # fmt: skip


def keys_from_passphrase(passphrase: bytes, header: RepoHeader) -> RepoKeys:
    return derive_keys(crypto.derive_master(passphrase, header.kdf), header.repo_id)


def _mac_line(key: bytes, *parts: bytes | bytearray | memoryview) -> bytes:
    return crypto.hmac_sha256(key, *parts).hex().encode() + b"\n"


def header_mac(keys: RepoKeys, header: bytes) -> bytes:
    """The content of ``repo-header.hmac``."""
    return _mac_line(keys.mac_key, header)


def verify_header(keys: RepoKeys, header: bytes, mac: bytes) -> bool:
    return len(mac) == MAC_LEN and crypto.macs_equal(header_mac(keys, header), mac)


# ------------------------------------------------------------------------------------------------ objects

def object_id(keys: RepoKeys, otype: str, plaintext: bytes | bytearray | memoryview) -> str:
    """The keyed id of a plaintext of type ``otype``, as 64 hex digits."""
    return crypto.hmac_sha256(keys.id_key, otype.encode("ascii"), plaintext).hex()


def max_plain(otype: str, block_size: int) -> int:
    return block_size if otype == DATA else MAX_PLAIN[otype]


def max_object_size(otype: str, block_size: int) -> int:
    """The largest file an object of this type can be: what dom0 allows a MEMBER frame to carry for it."""
    return HEAD_LEN + REF_LEN * MAX_REFS[otype] + IV_LEN + max_plain(otype, block_size) + 2 * PAD_ALIGN + MAC_LEN


_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    cctx = getattr(_local, "cctx", None)
    if cctx is None:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return cctx


def _decompressor(window: int) -> zstandard.ZstdDecompressor:
    """This thread's decompressor whose window is at most ``window`` (kept: a restore opens one object per
    block, and making a decompression context is a good part of decompressing 256 KiB)."""
    cache: dict[int, zstandard.ZstdDecompressor] | None = getattr(_local, "dctx", None)
    if cache is None:
        cache = _local.dctx = {}
    dctx = cache.get(window)
    if dctx is None:
        if len(cache) >= 8:  # data blocks use a few lengths; file lists, segments and roots each their bound
            cache.clear()
        dctx = cache[window] = zstandard.ZstdDecompressor(max_window_size=window)
    return dctx


SAMPLES, SAMPLE_LEN = 4, 2048  # the probe of a large plaintext before it is compressed


def _incompressible(plaintext: bytes | bytearray | memoryview) -> bool:
    """True when a large plaintext (over 64 KiB) looks like random bytes: four 2 KiB samples spread over it,
    compressed together, do not shrink by 3%.  zstd spends about as long finding that out on a whole block of
    random bytes (encrypted or compressed data) as on compressing text; it is then stored as it is (``n``),
    which the whole block would almost always have been.  A block with any compressible sample is
    compressed in full."""
    n = len(plaintext)
    if n <= 64 << 10:
        return False
    view = memoryview(plaintext)
    sample = b"".join(view[i * n // SAMPLES : i * n // SAMPLES + SAMPLE_LEN] for i in range(SAMPLES))
    return len(_compressor().compress(sample)) > len(sample) * 97 // 100


def _padding(n: int) -> bytes:
    """A zstd skippable frame of ``n`` zero bytes (8 + n bytes): ``zstd -d`` skips it."""
    return struct.pack("<II", SKIPPABLE, n) + bytes(n)


def seal(keys: RepoKeys, otype: str, plaintext: bytes | bytearray | memoryview, refs: Iterable[str] = (),
         compress: bool = True, oid: str | None = None, iv: bytes | None = None) -> tuple[str, bytearray]:  # fmt: skip
    """(id, object file) of ``plaintext``; ``oid`` when the caller computed the id already; ``iv`` only for
    test vectors (else a fresh random one).

    The object is built in one buffer: the clear header and references, the IV, the ciphertext encrypted in
    place (the compressed frame and its padding, never joined first), then the MAC over all of it."""
    oid = oid or object_id(keys, otype, plaintext)
    ordered = sorted(set(refs))
    if len(ordered) > MAX_REFS[otype]:
        raise ValueError(f"too many references for a {TYPE_NAMES[otype]}: {len(ordered)}")
    parts: tuple[bytes | bytearray | memoryview, ...] = (plaintext,)
    comp = "n"
    clear = HEAD_LEN + REF_LEN * len(ordered)
    if compress and len(plaintext) and not _incompressible(plaintext):
        frame = _compressor().compress(plaintext)
        pad = -(clear + IV_LEN + len(frame) + 8 + MAC_LEN) % PAD_ALIGN
        if len(frame) + 8 + pad < len(plaintext):
            parts, comp = (frame, _padding(pad)), "z"
    body = sum(len(p) for p in parts)
    out = bytearray(clear + IV_LEN + body + MAC_LEN)
    view = memoryview(out)
    out[:HEAD_LEN] = b"qbr1 %s %s %s %08d\n" % (otype.encode(), comp.encode(), oid.encode(), len(ordered))
    if ordered:
        out[HEAD_LEN:clear] = "".join(f"{r}\n" for r in ordered).encode()
    iv = crypto.random_bytes(IV_LEN) if iv is None else iv
    out[clear : clear + IV_LEN] = iv
    pos = clear + IV_LEN
    enc = crypto.aes_ctr_encryptor(keys.enc_key, iv)
    for part in parts:  # CTR writes exactly len(part); update_into wants 15 bytes of room more (the MAC's)
        pos += enc.update_into(part, view[pos : pos + len(part) + IV_LEN - 1])
    view[pos:] = _mac_line(keys.mac_key, view[:pos])
    return oid, out


@dataclass(frozen=True)
class Opened:
    id: str
    type: str
    refs: list[str]
    plaintext: bytes


def open_object(keys: RepoKeys, raw: bytes | bytearray | memoryview, otype: str, oid: str | None, block_size: int,
                length: int | None = None) -> Opened:  # fmt: skip
    """Verify and open an object that was asked for as type ``otype`` (and id ``oid``, when known; a root is
    asked for by name).  ``length``: the exact plaintext length expected (data blocks).

    Order: size bound, MAC (a wrong repository or any change fails here), the clear header against what was
    asked, then decryption, decompression bounded by the expected length, and the id recomputed from the
    plaintext.  Raises VerificationError (one line) on anything unexpected."""
    view = memoryview(raw).cast("B")
    what = f"{TYPE_NAMES[otype]} {oid[:16]}" if oid else TYPE_NAMES[otype]
    if not HEAD_LEN + IV_LEN + MAC_LEN <= len(view) <= max_object_size(otype, block_size):
        raise VerificationError(f"{what}: wrong size ({len(view)} bytes)")
    body_end = len(view) - MAC_LEN
    mac = bytes(view[body_end:])
    if not crypto.macs_equal(_mac_line(keys.mac_key, view[:body_end]), mac):
        raise VerificationError(f"{what} failed verification (tampered with, damaged or from another repository)")
    # Authentic (written by a holder of this repository's keys); still checked as if hostile.
    m = _HEAD_RE.fullmatch(bytes(view[:HEAD_LEN]))
    if m is None:
        raise VerificationError(f"{what}: malformed object header")
    got_type, comp, got_id, nrefs = m.group(1).decode(), m.group(2).decode(), m.group(3).decode(), int(m.group(4))
    if got_type != otype:
        raise VerificationError(f"{what}: the backup VM sent a {TYPE_NAMES.get(got_type, '?')} instead")
    if oid is not None and got_id != oid:
        raise VerificationError(f"{what}: the backup VM sent another object ({got_id[:16]}) instead")
    if nrefs > MAX_REFS[otype]:
        raise VerificationError(f"{what}: too many references")
    pos = HEAD_LEN
    refs: list[str] = []
    for _ in range(nrefs):
        line = bytes(view[pos : pos + REF_LEN])
        if _REF_RE.fullmatch(line) is None:
            raise VerificationError(f"{what}: malformed reference list")
        ref = line[:64].decode()
        if refs and ref <= refs[-1]:
            raise VerificationError(f"{what}: references out of order")
        refs.append(ref)
        pos += REF_LEN
    if body_end - pos < IV_LEN:
        raise VerificationError(f"{what}: truncated")
    iv = bytes(view[pos : pos + IV_LEN])
    cipher = view[pos + IV_LEN : body_end]
    limit = max_plain(otype, block_size) if length is None else length
    if comp == "n":  # the plaintext itself: bytes of its own
        plain = crypto.aes_ctr(keys.enc_key, iv, cipher)
    else:  # a compressed frame, decompressed into new bytes right away
        plain = _decompress(crypto.aes_ctr_into(keys.enc_key, iv, cipher, _scratch(len(cipher) + 15)), limit, what)
    if len(plain) > limit or (length is not None and len(plain) != length):
        raise VerificationError(f"{what}: {len(plain)} bytes, expected {limit if length is None else length}")
    if object_id(keys, otype, plain) != got_id:
        raise VerificationError(f"{what}: content does not match its id")
    return Opened(got_id, got_type, refs, plain)


SCRATCH_MAX = BLOCK_MAX + 2 * PAD_ALIGN + 16  # a data block's body at the largest block size, and its slack


def _scratch(n: int) -> bytearray:
    """This thread's buffer of at least ``n`` bytes, for transient results: kept (grown as needed) up to a data
    block's size, so every opening thread holds at most one such buffer; a larger body (a file list's, a
    root's: a few per restore) gets a buffer of its own, freed with it."""
    if n > SCRATCH_MAX:
        return bytearray(n)
    buf: bytearray | None = getattr(_local, "scratch", None)
    if buf is None or len(buf) < n:
        buf = _local.scratch = bytearray(max(n, 1 << 20))
    return buf


def _padding_start(body: bytes | memoryview) -> int:
    """Where the trailing skippable frame of zeros starts (the padding ``seal`` writes), or ``len(body)`` when
    the body does not end with one: the last skippable-frame magic in the last 8 KiB (a writer pads to a
    multiple of 4 KiB; an object's size bound allows 8 KiB), followed by its length ``n`` (below 8 KiB) and
    then only ``n`` zeros up to the end.  There is no other place for it: a header further back would have to
    lie inside those zeros."""
    n_body = len(body)
    tail = bytes(body[max(0, n_body - (2 * PAD_ALIGN + 16)) :])
    at = tail.rfind(_PAD_MAGIC)
    if at < 0 or len(tail) - at < 8:
        return n_body
    n = len(tail) - at - 8
    if n >= 2 * PAD_ALIGN or tail[at + 4 : at + 8] != struct.pack("<I", n) or tail.count(0, at + 8) != n:
        return n_body
    return n_body - n - 8


def _decompress(body: bytes | memoryview, limit: int, what: str) -> bytes:
    """One zstd frame that states its content size (at most ``limit``), optionally followed by one skippable
    frame of zeros; the decompressor cannot produce more than the stated size.

    The frame is decompressed in one call that leaves the interpreter free for the other threads while it
    runs, and that refuses any byte after the frame: so the padding is found first, from the end, and the
    frame must be exactly what precedes it (or, without padding, the whole body)."""
    try:
        size = zstandard.frame_content_size(body)
    except zstandard.ZstdError:
        size = -1
    if not 0 < size <= limit:
        raise VerificationError(f"{what}: compressed content of unknown or excessive size")
    dctx = _decompressor(max(limit, 1 << 10))
    view = memoryview(body)
    ends = dict.fromkeys((_padding_start(view), len(view)))  # the frame before the padding, else all of it
    for end in ends:
        try:
            out = dctx.decompress(view[:end], max_output_size=size, allow_extra_data=False)
        except zstandard.ZstdError:
            continue
        if len(out) == size:
            return out
    raise VerificationError(f"{what}: does not decompress to one frame of {size} bytes (damaged, or unexpected "
                            "bytes after the compressed content)")
