"""All cryptography of the format, in one place (docs/FORMAT.md sections 3-5).

Primitives were chosen so that the OpenSSL 3 command line alone can verify and decrypt a backup:
scrypt (``openssl kdf SCRYPT``), HKDF-SHA256 (``openssl kdf HKDF``), HMAC-SHA256 (``openssl dgst -mac
HMAC``) and AES-256-CTR (``openssl enc``).  Encrypt-then-MAC: nothing is decrypted before its MAC verified.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from qubes_backup_dom0.errors import BackupError

IV_SIZE = 16
MAC_HEX_SIZE = 65  # 64 hex digits and "\n"
MAC_PREFIX = b"qubes-backup-v1\n"
INFO_ENCRYPT = b"qubes-backup-v1/encrypt"
INFO_MAC = b"qubes-backup-v1/mac"


@dataclass(frozen=True)
class KdfParams:
    salt: bytes
    n: int
    r: int
    p: int


@dataclass(frozen=True)
class Keys:
    """The two subkeys of one backup; ``backup_id`` is bound into every MAC."""

    enc_key: bytes
    mac_key: bytes
    backup_id: bytes

    @property
    def backup_id_hex(self) -> str:
        return self.backup_id.hex()


def derive_master(passphrase: bytes, kdf: KdfParams) -> bytes:
    """Run scrypt once; the caller must have checked the parameters against the ceilings.

    A dom0 short of memory gets one clear line (BackupError), not a MemoryError from deep inside.
    """
    try:
        return Scrypt(salt=kdf.salt, length=32, n=kdf.n, r=kdf.r, p=kdf.p).derive(passphrase)
    except MemoryError:
        need = (128 * kdf.n * kdf.r) >> 20
        raise BackupError(
            f"not enough memory for the key derivation (scrypt N={kdf.n}, r={kdf.r}, p={kdf.p} needs about "
            f"{max(need, 1)} MiB): free some memory and try again"
        ) from None


def derive_keys(master: bytes, backup_id: bytes) -> Keys:
    def hkdf(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=backup_id, info=info).derive(master)

    return Keys(hkdf(INFO_ENCRYPT), hkdf(INFO_MAC), backup_id)


def keys_from_passphrase(passphrase: bytes, kdf: KdfParams, backup_id: bytes) -> Keys:
    return derive_keys(derive_master(passphrase, kdf), backup_id)


class MemberMac:
    """Incremental HMAC of one member: feed the data as it arrives, then verify or produce the digest.

    Python's OpenSSL-backed ``hmac`` releases the GIL on large updates, so chunks are MACed on all cores.
    """

    def __init__(self, keys: Keys, name: str) -> None:
        self._h = hmac.new(keys.mac_key, digestmod="sha256")
        self._h.update(MAC_PREFIX + keys.backup_id_hex.encode() + b"\n" + name.encode("ascii") + b"\n")

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    def hexdigest_line(self) -> bytes:
        """The content of the ``NAME.hmac`` member."""
        return self._h.hexdigest().encode() + b"\n"


def mac_member(keys: Keys, name: str, data: bytes | memoryview) -> bytes:
    m = MemberMac(keys, name)
    m.update(data)
    return m.hexdigest_line()


def verify_member(keys: Keys, name: str, data: bytes | memoryview, mac_line: bytes) -> bool:
    """Constant-time check of a ``.hmac`` member against the data (a malformed line never verifies)."""
    return len(mac_line) == MAC_HEX_SIZE and hmac.compare_digest(mac_member(keys, name, data), mac_line)


def _sealed_buffer(iv: bytes, n: int, out: bytearray | None) -> bytearray:
    """``out`` (or a new buffer) checked for ``IV || n bytes`` plus the 15 bytes of slack ``update_into``
    wants, the IV written in front."""
    if out is None:
        out = bytearray(IV_SIZE + n + 15)
    elif len(out) < IV_SIZE + n + 15:
        raise ValueError("encrypt: output buffer too small")
    out[:IV_SIZE] = iv
    return out


def encrypt(
    keys: Keys, plaintext: bytes | bytearray | memoryview, iv: bytes | None = None, out: bytearray | None = None
) -> memoryview:
    """``IV || AES-256-CTR(plaintext)`` with a fresh random IV (the full 16-byte initial counter).

    Encrypts straight into one buffer: ``out`` when given (at least ``IV_SIZE + len(plaintext) + 15`` bytes,
    the slack ``update_into`` wants; the backup reuses a few), else a new one.  Chunks are tens of MiB and
    this is the hot path.
    """
    iv = os.urandom(IV_SIZE) if iv is None else iv
    n = len(plaintext)
    out = _sealed_buffer(iv, n, out)
    enc = Cipher(algorithms.AES(keys.enc_key), modes.CTR(iv)).encryptor()
    written = enc.update_into(plaintext, memoryview(out)[IV_SIZE:])
    if written != n:
        raise AssertionError("CTR mode must encrypt every byte")
    enc.finalize()
    return memoryview(out)[: IV_SIZE + n]


SEAL_PIECE = 256 << 10  # encrypted and MACed piece by piece while it is still in the CPU's cache


def seal_member(
    keys: Keys, name: str, plaintext: bytes | bytearray | memoryview, out: bytearray | None = None
) -> tuple[memoryview, bytes]:
    """``encrypt`` and ``mac_member`` of the result in one pass: each piece of ciphertext is MACed right
    after it is written, while it is in cache, instead of reading the whole chunk back from memory.  The
    same bytes as ``encrypt`` then ``mac_member``."""
    iv = os.urandom(IV_SIZE)
    src = memoryview(plaintext).cast("B")
    n = len(src)
    dst = memoryview(_sealed_buffer(iv, n, out))
    mac = MemberMac(keys, name)
    mac.update(dst[:IV_SIZE])
    enc = Cipher(algorithms.AES(keys.enc_key), modes.CTR(iv)).encryptor()
    pos = 0
    while pos < n:
        end = min(pos + SEAL_PIECE, n)
        if enc.update_into(src[pos:end], dst[IV_SIZE + pos :]) != end - pos:
            raise AssertionError("CTR mode must encrypt every byte")
        mac.update(dst[IV_SIZE + pos : IV_SIZE + end])
        pos = end
    enc.finalize()
    return dst[: IV_SIZE + n], mac.hexdigest_line()


def decrypt(
    keys: Keys, member: bytes | memoryview, out: bytearray | memoryview | None = None
) -> bytes | memoryview:
    """Decrypt a member whose MAC has already verified.

    With ``out`` (a writable buffer of at least ``len(member) - IV_SIZE + 15`` bytes, the slack
    ``update_into`` wants), the plaintext is written into it and a memoryview of exactly the plaintext is
    returned: the restore reuses a few such buffers instead of faulting in fresh memory for every chunk.
    """
    if len(member) < IV_SIZE:
        raise ValueError("encrypted member shorter than its IV")
    view = memoryview(member).cast("B")
    dec = Cipher(algorithms.AES(keys.enc_key), modes.CTR(bytes(view[:IV_SIZE]))).decryptor()
    if out is None:
        plain = dec.update(view[IV_SIZE:])
        dec.finalize()  # CTR: nothing is held back
        return plain
    n = len(view) - IV_SIZE
    target = memoryview(out).cast("B")
    if len(target) < n + 15:
        raise ValueError("decrypt: output buffer too small")
    written = dec.update_into(view[IV_SIZE:], target)
    dec.finalize()
    if written != n:
        raise AssertionError("CTR mode must decrypt every byte")
    return target[:n]


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


# -- the same primitives with explicit keys, for the repository format (docs/REPOSITORY.md section 3) --------

def hkdf_sha256(master: bytes, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869), 32 bytes: the subkeys of a repository."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(master)


def hmac_sha256(key: bytes, *parts: bytes | bytearray | memoryview) -> bytes:
    """HMAC-SHA256 of the concatenation of ``parts`` (not copied together)."""
    if len(parts) == 1:  # one call into OpenSSL, which leaves the interpreter to the other threads meanwhile
        return hmac.digest(key, parts[0], "sha256")
    h = hmac.new(key, digestmod="sha256")
    for part in parts:
        h.update(part)
    return h.digest()


def macs_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def aes_ctr_encryptor(key: bytes, iv: bytes) -> CipherContext:
    """AES-256-CTR with the full 16-byte initial counter ``iv``, for ``update_into`` a buffer of one's own."""
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()


def aes_ctr(key: bytes, iv: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """AES-256-CTR of ``data`` with the full 16-byte initial counter ``iv`` (encrypts and decrypts)."""
    ctx = aes_ctr_encryptor(key, iv)
    out = ctx.update(data)
    ctx.finalize()
    return out


def aes_ctr_into(key: bytes, iv: bytes, data: bytes | bytearray | memoryview, out: bytearray) -> memoryview:
    """``aes_ctr`` written into ``out`` (at least ``len(data) + 15`` bytes, the slack ``update_into`` wants):
    a view of exactly the result.  For a transient result (a compressed body about to be decompressed): a
    reused buffer instead of fresh memory faulted in for every object."""
    n = len(data)
    if len(out) < n + 15:
        raise ValueError("aes_ctr_into: output buffer too small")
    ctx = aes_ctr_encryptor(key, iv)
    if ctx.update_into(data, out) != n:
        raise AssertionError("CTR mode must process every byte")
    ctx.finalize()
    return memoryview(out)[:n]
