"""The backup header: the one structure dom0 parses before anything is authenticated.

So it is tiny, plain ``key=value`` lines in a fixed order, and every value that costs dom0 something (the
KDF parameters, the chunk size) is checked against a documented ceiling *before* the KDF runs
(docs/FORMAT.md section 2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from qubes_backup_dom0.errors import UsageError, VerificationError
from qubes_backup_dom0.format.crypto import KdfParams

FORMAT_NAME = "qubes-backup"
VERSION = 1
MAX_HEADER_SIZE = 4096
COMPRESSIONS = ("zstd", "gzip", "none")

DEFAULT_KDF_N = 1 << 17
DEFAULT_KDF_R = 8
DEFAULT_KDF_P = 1
DEFAULT_CHUNK_SIZE = 16 << 20  # below glibc's mmap ceiling: chunk buffers are reused, not faulted in

# Ceilings on what the *unauthenticated* header may make dom0 spend before the passphrase is checked
# (docs/FORMAT.md section 2, docs/SECURITY.md section 3): any backup VM can hand dom0 such a header.
# Memory 128*N*r at most 256 MiB (2x the default's 128 MiB); work N*r*p at most 2^22 (4x the default's
# 2^20: the default costs ~0.4 s, so a hostile header costs a restore attempt at most ~2 s and 256 MiB).
KDF_N_MIN, KDF_N_MAX = 1 << 10, 1 << 20
KDF_R_MAX = 32
KDF_P_MAX = 16
KDF_MEMORY_MAX = 256 << 20  # 128 * N * r bytes
KDF_WORK_MAX = 1 << 22  # N * r * p
CHUNK_MIN, CHUNK_MAX, CHUNK_ALIGN = 1 << 16, 256 << 20, 1 << 16

_KEYS = (
    "format", "version", "backup-id", "created", "kdf", "kdf-salt", "kdf-n", "kdf-r", "kdf-p",
    "cipher", "mac", "compression", "chunk-size",
)  # fmt: skip
_INT = r"[1-9][0-9]{0,11}"
_VALUE_RE = {
    "format": re.escape(FORMAT_NAME),
    "version": str(VERSION),
    "backup-id": r"[0-9a-f]{32}",
    "created": r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z",
    "kdf": "scrypt",
    "kdf-salt": r"[0-9a-f]{32}",
    "kdf-n": _INT,
    "kdf-r": _INT,
    "kdf-p": _INT,
    "cipher": "aes-256-ctr",
    "mac": "hmac-sha256",
    "compression": "|".join(COMPRESSIONS),
    "chunk-size": _INT,
}
_LINE_RE = re.compile(rb"([a-z-]{1,16})=([ -~]{1,64})")

# Qubes OS' own backup-header (qubesadmin/backup/restore.py, BackupHeader): ``version=N`` first, then known
# keys, values [A-Za-z0-9-].  Recognised only to say which tool restores the backup: it is unauthenticated.
_QUBES_KEYS = frozenset(
    ("version", "encrypted", "compressed", "compression-filter", "crypto-algorithm", "hmac-algorithm", "backup-id")
)
_QUBES_LINE_RE = re.compile(rb"([a-z-]{1,32})=([A-Za-z0-9-]{1,64})")


class QubesFormatBackup(UsageError):
    """The backup was made by Qubes OS' own qvm-backup (its format, not ours): Qubes' tool restores it."""

    def __init__(self, version: int) -> None:
        super().__init__(f"this is a backup in Qubes OS' own format (version {version}), not a qubes-backup one")
        self.version = version


def qubes_format_version(data: bytes) -> int | None:
    """The format version if ``data`` is, strictly, a Qubes v2-v4 backup-header; else None."""
    if len(data) > MAX_HEADER_SIZE or not data.startswith(b"version=") or not data.endswith(b"\n"):
        return None
    lines = data[:-1].split(b"\n")
    if len(lines) > len(_QUBES_KEYS):
        return None
    seen: set[bytes] = set()
    for line in lines:
        m = _QUBES_LINE_RE.fullmatch(line)
        if m is None or m.group(1).decode() not in _QUBES_KEYS or m.group(1) in seen:
            return None
        seen.add(m.group(1))
    version = lines[0].removeprefix(b"version=")
    if version not in (b"2", b"3", b"4") or b"hmac-algorithm" not in seen:
        return None
    return int(version)


@dataclass(frozen=True)
class Header:
    backup_id: bytes
    created: str
    kdf: KdfParams
    compression: str
    chunk_size: int

    def render(self) -> bytes:
        values = {
            "format": FORMAT_NAME,
            "version": str(VERSION),
            "backup-id": self.backup_id.hex(),
            "created": self.created,
            "kdf": "scrypt",
            "kdf-salt": self.kdf.salt.hex(),
            "kdf-n": str(self.kdf.n),
            "kdf-r": str(self.kdf.r),
            "kdf-p": str(self.kdf.p),
            "cipher": "aes-256-ctr",
            "mac": "hmac-sha256",
            "compression": self.compression,
            "chunk-size": str(self.chunk_size),
        }
        data = "".join(f"{k}={values[k]}\n" for k in _KEYS).encode("ascii")
        # Rendering goes through the same checks a restorer applies: we never write what we would refuse.
        parse(data)
        return data

    @property
    def created_datetime(self) -> datetime:
        return datetime.strptime(self.created, CREATED_FORMAT).replace(tzinfo=UTC)


CREATED_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def format_created(when: datetime) -> str:
    """The header's ``created`` value for an aware datetime (converted to UTC)."""
    return when.astimezone(UTC).strftime(CREATED_FORMAT)


def now_utc() -> str:
    return format_created(datetime.now(UTC))


def check_kdf(n: int, r: int, p: int) -> None:
    """Refuse KDF parameters outside the documented ceilings (before running anything)."""
    if n & (n - 1) or not KDF_N_MIN <= n <= KDF_N_MAX:
        raise VerificationError(f"backup header asks for scrypt N={n}: must be a power of two in [2^10, 2^20]")
    if not 1 <= r <= KDF_R_MAX or not 1 <= p <= KDF_P_MAX:
        raise VerificationError(f"backup header asks for scrypt r={r}, p={p}: above the allowed ceiling")
    if 128 * n * r > KDF_MEMORY_MAX or n * r * p > KDF_WORK_MAX:
        raise VerificationError(f"backup header asks for an scrypt cost (N={n}, r={r}, p={p}) above the ceiling")


def check_chunk_size(size: int) -> None:
    if not CHUNK_MIN <= size <= CHUNK_MAX or size % CHUNK_ALIGN:
        raise VerificationError(f"backup header asks for chunk size {size}: allowed 64 KiB to 256 MiB")


def parse(data: bytes) -> Header:
    """Strictly parse an unauthenticated header; any deviation from the grammar is an error."""
    bad = "the backup header is malformed (not a qubes-backup v1 backup, or damaged)"
    qubes_version = qubes_format_version(data)
    if qubes_version is not None:
        raise QubesFormatBackup(qubes_version)
    if len(data) > MAX_HEADER_SIZE or not data.endswith(b"\n"):
        raise VerificationError(bad)
    lines = data[:-1].split(b"\n")
    if len(lines) != len(_KEYS):
        raise VerificationError(bad)
    values: dict[str, str] = {}
    for key, line in zip(_KEYS, lines, strict=True):
        m = _LINE_RE.fullmatch(line)
        if m is None or m.group(1).decode() != key:
            raise VerificationError(bad)
        value = m.group(2).decode("ascii")
        if re.fullmatch(_VALUE_RE[key], value) is None:
            raise VerificationError(f"{bad}: bad value for {key}")
        values[key] = value
    n, r, p = int(values["kdf-n"]), int(values["kdf-r"]), int(values["kdf-p"])
    check_kdf(n, r, p)
    chunk_size = int(values["chunk-size"])
    check_chunk_size(chunk_size)
    try:
        datetime.strptime(values["created"], "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise VerificationError(f"{bad}: bad creation time") from None
    return Header(
        backup_id=bytes.fromhex(values["backup-id"]),
        created=values["created"],
        kdf=KdfParams(bytes.fromhex(values["kdf-salt"]), n, r, p),
        compression=values["compression"],
        chunk_size=chunk_size,
    )
