#!/usr/bin/env python3
"""Generate the test vectors in tests/vectors/ (docs/FORMAT.md, "Test vectors").

Why: a stranger implementing a reader needs known answers for each layer (KDF, header, MAC, encryption,
a whole backup) to debug against, and the test suite needs them to notice when the implementation drifts
from the committed format.  Every input is fixed here, so (a)-(c) regenerate byte for byte.

(d), the tiny complete backup, is made by the real backup pipeline (``backup.write_backup``) with its
randomness (salt, backup id, IVs) and clock replaced by fixed values.  Its bytes also depend on the
simulated system and on lxml's XML serialization, so the committed ``tiny-backup.tar`` is the reference:
tests verify and restore it rather than regenerate it.  Run with ``--tiny`` to rewrite it (only when the
format itself changes).

Usage: .venv/bin/python tools/make_vectors.py [--tiny] [OUTDIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qubes_backup_dom0 import backup, crypto
from qubes_backup_dom0.header import Header
from qubes_backup_dom0.system import System
from qubes_backup_sim import simgen

OUT = Path(__file__).resolve().parent.parent / "tests" / "vectors"

PASSPHRASE = "correct horse battery staple \u00fcn\u00efc\u00f8d\u00e9"  # non-ASCII: the KDF takes UTF-8
SALT = bytes(range(16))
BACKUP_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
KDF_N, KDF_R, KDF_P = 1024, 8, 1
CREATED = "2026-01-01T00:00:00Z"
HEADER_COMPRESSION, HEADER_CHUNK_SIZE = "zstd", 33554432
CHUNK_NAME = "vm1/000000"
CHUNK_IV = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")  # also tests the CTR counter carry
CHUNK_PLAINTEXT = b"qubes-backup test vector chunk\n" + bytes(range(256)) * 2

TINY_VM = "work"
TINY_IMAGE = "appvms/work/private.img"
TINY_IMAGE_SIZE = 1 << 20
TINY_REGIONS = ((0, 65536), (262144, 40960))  # block-aligned data regions; the file ends in a hole
TINY_MTIME = 1767225600  # CREATED, as a Unix time
TINY_CHUNK_SIZE = 65536


def kdf() -> crypto.KdfParams:
    return crypto.KdfParams(SALT, KDF_N, KDF_R, KDF_P)


def keys() -> crypto.Keys:
    return crypto.keys_from_passphrase(PASSPHRASE.encode("utf-8"), kdf(), BACKUP_ID)


def vector_keys() -> dict[str, Any]:
    """(a) passphrase and KDF parameters -> master, enc_key, mac_key."""
    master = crypto.derive_master(PASSPHRASE.encode("utf-8"), kdf())
    k = crypto.derive_keys(master, BACKUP_ID)
    return {
        "passphrase": PASSPHRASE,
        "passphrase_utf8_hex": PASSPHRASE.encode("utf-8").hex(),
        "kdf_salt": SALT.hex(),
        "kdf_n": KDF_N,
        "kdf_r": KDF_R,
        "kdf_p": KDF_P,
        "backup_id": BACKUP_ID.hex(),
        "master": master.hex(),
        "enc_key": k.enc_key.hex(),
        "mac_key": k.mac_key.hex(),
    }


def vector_header(out: Path) -> dict[str, Any]:
    """(b) a header's exact bytes and the content of its .hmac member."""
    data = Header(BACKUP_ID, CREATED, kdf(), HEADER_COMPRESSION, HEADER_CHUNK_SIZE).render()
    (out / "backup-header").write_bytes(data)
    mac = crypto.mac_member(keys(), "backup-header", data)
    (out / "backup-header.hmac").write_bytes(mac)
    return {
        "backup_id": BACKUP_ID.hex(),
        "created": CREATED,
        "compression": HEADER_COMPRESSION,
        "chunk_size": HEADER_CHUNK_SIZE,
        "header_file": "backup-header",
        "header": data.decode("ascii"),
        "hmac_file": "backup-header.hmac",
        "hmac": mac.decode("ascii"),
    }


def vector_chunk(out: Path) -> dict[str, Any]:
    """(c) one chunk: plaintext, IV, the encrypted member, its MAC (and the MAC under another name)."""
    k = keys()
    member = bytes(crypto.encrypt(k, CHUNK_PLAINTEXT, iv=CHUNK_IV))
    (out / "chunk-plaintext.bin").write_bytes(CHUNK_PLAINTEXT)
    (out / "chunk-member.bin").write_bytes(member)
    return {
        "name": CHUNK_NAME,
        "plaintext_file": "chunk-plaintext.bin",
        "plaintext_hex": CHUNK_PLAINTEXT.hex(),
        "iv": CHUNK_IV.hex(),
        "member_file": "chunk-member.bin",
        "member_hex": member.hex(),
        "hmac": crypto.mac_member(k, CHUNK_NAME, member).decode("ascii"),
        "hmac_if_named_vm1/000001": crypto.mac_member(k, "vm1/000001", member).decode("ascii"),
    }


def _tiny_image_bytes() -> Iterator[tuple[int, bytes]]:
    for offset, length in TINY_REGIONS:
        block = b"".join(hashlib.sha256(f"tiny:{offset}:{i}".encode()).digest() for i in range(length // 32))
        yield offset, block


def _make_tiny_sim(root: Path) -> System:
    """The simulated system, with the one backed-up VM shrunk to a tiny sparse image and fixed mtimes."""
    simgen.generate(root, "small", pool="file")
    system = System.from_env({"QUBES_SIM": str(root)})
    image = system.qubes_root / TINY_IMAGE
    image.unlink()
    with image.open("wb") as f:
        for offset, block in _tiny_image_bytes():
            f.seek(offset)
            f.write(block)
        f.truncate(TINY_IMAGE_SIZE)
    for path in (system.qubes_root / "appvms" / TINY_VM).iterdir():
        os.utime(path, (TINY_MTIME, TINY_MTIME))
    return system


def _deterministic_write(plan: backup.BackupPlan, sink: Any) -> Header:
    """Run the real pipeline with fixed salt/id, clock and IVs (IV = a hash of the plaintext, never reused
    here because every plaintext differs)."""
    fixed = [SALT, BACKUP_ID]
    real_random, real_encrypt, real_now = crypto.random_bytes, crypto.encrypt, backup.now_utc

    def fake_random(n: int) -> bytes:
        value = fixed.pop(0)
        assert len(value) == n
        return value

    def fake_encrypt(k: crypto.Keys, plaintext: bytes | memoryview, iv: bytes | None = None) -> memoryview:
        iv = hashlib.sha256(b"qubes-backup vector iv\n" + bytes(plaintext)).digest()[:16] if iv is None else iv
        return real_encrypt(k, plaintext, iv=iv)

    crypto.random_bytes, crypto.encrypt, backup.now_utc = fake_random, fake_encrypt, lambda: CREATED
    try:
        options = backup.BackupOptions(
            compression="none", chunk_size=TINY_CHUNK_SIZE, kdf_n=KDF_N, kdf_r=KDF_R, kdf_p=KDF_P, workers=1
        )
        return backup.write_backup(plan, PASSPHRASE.encode("utf-8"), sink, options)
    finally:
        crypto.random_bytes, crypto.encrypt, backup.now_utc = real_random, real_encrypt, real_now


def vector_tiny(out: Path) -> dict[str, Any]:
    """(d) a complete one-VM backup, compression none, with what restoring it must give."""
    with tempfile.TemporaryDirectory() as tmp:
        system = _make_tiny_sim(Path(tmp) / "sim")
        plan = backup.plan_backup(system, [TINY_VM])
        with (out / "tiny-backup.tar").open("wb") as sink:
            _deterministic_write(plan, sink)
        files = {}
        for archive in plan.archives:
            for f in archive.files:
                source = system.qubes_root / f.path
                files[f.path] = {
                    "size": f.size,
                    "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
                    "data_regions": [[o, n] for o, n in f.regions],
                }
    image = bytearray(TINY_IMAGE_SIZE)
    for offset, block in _tiny_image_bytes():
        image[offset : offset + len(block)] = block
    assert files[TINY_IMAGE]["sha256"] == hashlib.sha256(image).hexdigest()
    assert files[TINY_IMAGE]["data_regions"] == [list(r) for r in TINY_REGIONS]
    return {
        "file": "tiny-backup.tar",
        "sha256": hashlib.sha256((out / "tiny-backup.tar").read_bytes()).hexdigest(),
        "passphrase": PASSPHRASE,
        "backup_id": BACKUP_ID.hex(),
        "compression": "none",
        "chunk_size": TINY_CHUNK_SIZE,
        "archives": {"vm1": TINY_VM},
        "files": files,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="also rewrite the complete-backup vector (d)")
    p.add_argument("outdir", nargs="?", type=Path, default=OUT)
    args = p.parse_args(argv)
    out: Path = args.outdir
    out.mkdir(parents=True, exist_ok=True)
    vectors: dict[str, Any] = {
        "format": "qubes-backup v1 test vectors (docs/FORMAT.md); hex is lowercase; files are in this directory",
        "keys": vector_keys(),
        "header": vector_header(out),
        "chunk": vector_chunk(out),
    }
    old = out / "vectors.json"
    if args.tiny or not (out / "tiny-backup.tar").exists():
        vectors["tiny_backup"] = vector_tiny(out)
    elif old.exists():
        vectors["tiny_backup"] = json.loads(old.read_text())["tiny_backup"]
    old.write_text(json.dumps(vectors, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
