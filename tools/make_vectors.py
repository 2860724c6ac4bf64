#!/usr/bin/env python3
"""Generate the test vectors in tests/vectors/ (docs/FORMAT.md, "Test vectors").

Why: a stranger implementing a reader needs known answers for each layer (KDF, header, MAC, encryption,
a whole backup) to debug against, and the test suite needs them to notice when the implementation drifts
from the committed format.  Every input is fixed here, so (a)-(c) and (e) regenerate byte for byte ((e) on
a filesystem that keeps 64 KiB-aligned holes) and (f) as long as lxml serializes the same way.

(d), the tiny complete backup, is made by the real backup pipeline (``pipeline.write_backup``) with its
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

from qubes_backup_dom0.backup import pipeline
from qubes_backup_dom0.backup import plan as backup_plan
from qubes_backup_dom0.format import crypto
from qubes_backup_dom0.format.header import Header
from qubes_backup_dom0.qubes.system import System
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


def _deterministic_write(plan: backup_plan.BackupPlan, sink: Any) -> Header:
    """Run the real pipeline with fixed salt/id, clock and IVs (IV = a hash of the plaintext, never reused
    here because every plaintext differs)."""
    fixed = [SALT, BACKUP_ID]
    real_random, real_encrypt, real_now = crypto.random_bytes, crypto.encrypt, pipeline.now_utc

    def fake_random(n: int) -> bytes:
        value = fixed.pop(0)
        assert len(value) == n
        return value

    def fake_encrypt(k: crypto.Keys, plaintext: bytes | memoryview, iv: bytes | None = None) -> memoryview:
        iv = hashlib.sha256(b"qubes-backup vector iv\n" + bytes(plaintext)).digest()[:16] if iv is None else iv
        return real_encrypt(k, plaintext, iv=iv)

    crypto.random_bytes, crypto.encrypt, pipeline.now_utc = fake_random, fake_encrypt, lambda: CREATED
    try:
        options = backup_plan.BackupOptions(
            compression="none", chunk_size=TINY_CHUNK_SIZE, kdf_n=KDF_N, kdf_r=KDF_R, kdf_p=KDF_P, workers=1
        )
        return pipeline.write_backup(plan, PASSPHRASE.encode("utf-8"), sink, options)
    finally:
        crypto.random_bytes, crypto.encrypt, pipeline.now_utc = real_random, real_encrypt, real_now


def vector_tiny(out: Path) -> dict[str, Any]:
    """(d) a complete one-VM backup, compression none, with what restoring it must give."""
    with tempfile.TemporaryDirectory() as tmp:
        system = _make_tiny_sim(Path(tmp) / "sim")
        plan = backup_plan.plan_backup(system, [TINY_VM])
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


# (e) an inner archive with the entries that are easy to get wrong (FORMAT.md section 8)
INNER_MTIME = 1767225600
INNER_LONG = "home/user/x" + "\u00e9" * 40  # its GNUSparseFile.0 name is cut at byte 100 inside an e-acute
INNER_TARGET = "../" * 10 + "t" * 120  # a symlink target > 100 bytes: pax linkpath
INNER_SPECS: list[dict[str, Any]] = [
    {"path": "home/user", "type": "dir", "mode": 0o700},
    {"path": INNER_LONG, "type": "file", "mode": 0o600, "size": 262144, "regions": [[65536, 65536], [196608, 65536]]},
    {"path": "home/user/tail-hole.img", "type": "file", "mode": 0o644, "size": 1 << 20, "regions": [[0, 65536]]},
    {"path": "home/user/link", "type": "symlink", "link": INNER_TARGET},
    {"path": "home/user/suid", "type": "file", "mode": 0o4755, "size": 5, "regions": [[0, 5]], "mtime": -1},
]


def _inner_bytes(path: str, offset: int, length: int) -> bytes:
    seed = hashlib.sha256(f"inner:{path}:{offset}".encode()).digest()
    return (seed * (length // 32 + 1))[:length]


def _make_inner_files(root: Path) -> list[Any]:
    from qubes_backup_dom0.format import tarwriter

    files = []
    for spec in INNER_SPECS:
        src = root / spec["path"]
        src.parent.mkdir(parents=True, exist_ok=True)
        if spec["type"] == "dir":
            src.mkdir(exist_ok=True)
        elif spec["type"] == "symlink":
            src.symlink_to(spec["link"])
        else:
            with src.open("wb") as f:
                for offset, length in spec["regions"]:
                    f.seek(offset)
                    f.write(_inner_bytes(spec["path"], offset, length))
                f.truncate(spec["size"])
    for spec in reversed(INNER_SPECS):  # contents first: creating a file changes its directory's mtime
        src = root / spec["path"]
        if spec["type"] != "symlink":
            os.chmod(src, spec["mode"])
        mtime = spec.get("mtime", INNER_MTIME)
        os.utime(src, (mtime, mtime), follow_symlinks=False)
    for spec in INNER_SPECS:
        f = tarwriter.InnerFile.from_path(spec["path"], root / spec["path"])
        if f.type == "file" and [list(r) for r in f.regions] != spec["regions"]:
            raise RuntimeError(f"this filesystem does not keep the holes of {spec['path']}")
        files.append(f)
    return files


def vector_inner(out: Path) -> dict[str, Any]:
    """(e) an inner archive (uncompressed tar) and what extracting it must give."""
    from qubes_backup_dom0.format import tarspec, tarwriter

    with tempfile.TemporaryDirectory() as tmp:
        files = _make_inner_files(Path(tmp))
        data = b"".join(tarwriter.write_archive(files))
    (out / "inner-archive.tar").write_bytes(data)
    entries = []
    for spec, f in zip(INNER_SPECS, files, strict=True):
        e: dict[str, Any] = {"path": f.path, "type": f.type, "size": f.size, "data": f.data}
        if f.type == "symlink":
            e["link"] = f.link
        else:
            e["mode"] = f.mode
            e["mtime"] = f.mtime
        if f.type == "file":
            content = bytearray(f.size)
            for offset, length in spec["regions"]:
                content[offset : offset + length] = _inner_bytes(f.path, offset, length)
            e["regions"] = spec["regions"]
            e["sha256"] = hashlib.sha256(content).hexdigest()
        entries.append(e)
    return {
        "file": "inner-archive.tar",
        "sha256": hashlib.sha256(data).hexdigest(),
        "entries": entries,
        "sparse_ustar_name_hex": tarspec.sparse_name(INNER_LONG).encode("utf-8")[:100].hex(),
    }


def vector_manifest(out: Path) -> dict[str, Any]:
    """(f) a manifest plaintext with its padding (FORMAT.md section 6)."""
    from qubes_backup_dom0.format.manifest import ArchiveEntry, FileEntry, Manifest

    qubes = (
        b"<qubes><labels><label color=\"0x000000\" id=\"label-8\">black</label></labels><pools/><properties/>"
        b'<domains><domain id="domain-0" class="AdminVM"><properties/><features>'
        b'<feature name="backup-content">True</feature><feature name="backup-path">dom0-home/user</feature>'
        b'<feature name="backup-size">4</feature></features></domain>'
        b'<domain id="domain-1" class="AppVM"><properties><property name="name">work</property></properties>'
        b'<features><feature name="backup-content">True</feature>'
        b'<feature name="backup-path">appvms/work</feature><feature name="backup-size">2147483959</feature>'
        b"</features></domain></domains></qubes>"
    )
    archives = [
        ArchiveEntry("vm0", "dom0", "home", [FileEntry("home/user", "dir", 0, 0),
                                            FileEntry("home/user/a & <b>", "file", 4, 4)]),
        ArchiveEntry("vm1", "work", "vm", [FileEntry("appvms/work/private.img", "file", 2147483648, 52428800),
                                           FileEntry("appvms/work/firewall.xml", "file", 311, 311)]),
    ]  # fmt: skip
    data = Manifest(BACKUP_ID.hex(), CREATED, archives, qubes).render()
    (out / "manifest-plaintext.xml").write_bytes(data)
    return {
        "file": "manifest-plaintext.xml",
        "sha256": hashlib.sha256(data).hexdigest(),
        "length": len(data),
        "unpadded_length": len(data.rstrip(b" ")),
        "archives": {a.member: a.vm for a in archives},
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
        "inner_archive": vector_inner(out),
        "manifest": vector_manifest(out),
    }
    old = out / "vectors.json"
    if args.tiny or not (out / "tiny-backup.tar").exists():
        vectors["tiny_backup"] = vector_tiny(out)  # written last: (d) after (e), (f) as before
    elif old.exists():
        vectors["tiny_backup"] = json.loads(old.read_text())["tiny_backup"]
    old.write_text(json.dumps(vectors, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
