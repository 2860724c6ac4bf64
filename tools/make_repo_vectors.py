#!/usr/bin/env python3
"""Generate the repository test vectors in tests/vectors/repository/ (docs/REPOSITORY.md section 11).

A tiny complete repository with one snapshot, every input fixed (passphrase, salt, repository id, IVs,
times): the header and its MAC, and one object of every type -- three data blocks (one compressed, one
stored as is, one the short last block of the file), the map segment naming them (block 1 is a hole), the
file list of VM ``work`` (its ``private.img``), a qubes.xml and the root.  ``vectors.json`` gives the keys,
each object's id, type, IV, plaintext (as a file or hex) and object file, and the restored image's size and
SHA-256.  Compressed objects depend on the zstd library's output, so the committed files are the reference:
tests open them rather than regenerate them (stored ones regenerate byte for byte).

Usage: .venv/bin/python tools/make_repo_vectors.py [OUTDIR]
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from qubes_backup_dom0.format import crypto, repo, repotree

OUT = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "repository"
PASSPHRASE = "correct horse battery staple \u00fcn\u00efc\u00f8d\u00e9"
SALT = bytes(range(16))
REPO_ID = bytes(range(0xA0, 0xB0))
CREATED = "2026-11-27T09:00:00Z"
BLOCK = 65536
QUBES_XML = b"<qubes><labels/><pools/><properties/><domains/></qubes>"


def _stream(seed: bytes, n: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:n])


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    out.mkdir(parents=True, exist_ok=True)
    kdf = crypto.KdfParams(SALT, 1024, 8, 1)
    header = repo.RepoHeader(REPO_ID, CREATED, kdf, "zstd", BLOCK)
    raw_header = header.render()
    master = crypto.derive_master(PASSPHRASE.encode(), kdf)
    keys = repo.derive_keys(master, REPO_ID)
    (out / "repo-header").write_bytes(raw_header)
    (out / "repo-header.hmac").write_bytes(repo.header_mac(keys, raw_header))

    objects: list[dict[str, Any]] = []

    def add(otype: str, plaintext: bytes, refs: list[str], compress: bool, note: str, name: str | None = None) -> str:
        iv = bytes([len(objects) + 1]) * 15 + b"\xff"  # the low byte carries on the first counter increment
        oid, data = repo.seal(keys, otype, plaintext, refs, compress, iv=iv)
        fname = name or oid
        (out / fname.replace("/", "_")).write_bytes(data)
        (out / f"{fname.replace('/', '_')}.plain").write_bytes(plaintext)
        objects.append({"type": otype, "id": oid, "iv": iv.hex(), "note": note, "file": fname.replace("/", "_"),
                        "plaintext_file": f"{fname.replace('/', '_')}.plain", "compressed": data[7:8] == b"z",
                        "refs": sorted(set(refs))})  # fmt: skip
        return oid

    text = b"".join(b"block 0 line %06d of a compressible data block\n" % i for i in range(2000))[:BLOCK]
    d0 = add(repo.DATA, text, [], True, "block 0: compressible, stored compressed")
    d2 = add(repo.DATA, _stream(b"block 2", BLOCK), [], True, "block 2: random, stored as is")
    d3 = add(repo.DATA, _stream(b"block 3", 1000), [], True, "block 3: the file's short last block")
    seg = repotree.Segment([(0, d0), (2, d2), (3, d3)])
    sid = add(repo.SEGMENT, seg.render(), seg.refs(), True, "segment 0 of private.img (block 1 is a hole)")
    size = 3 * BLOCK + 1000
    tree = repotree.Tree([repotree.TreeFile("appvms/work/private.img", "file", size, 2 * BLOCK + 1000, 0o600, 0,
                                            None, [(0, sid)])])  # fmt: skip
    tid = add(repo.TREE, tree.render(BLOCK), tree.refs(), True, "file list of VM work")
    xid = add(repo.QUBES, QUBES_XML, [], True, "qubes.xml (a placeholder document)")
    root = repotree.Root(REPO_ID.hex(), 1, CREATED, BLOCK, xid, [repotree.RootArchive("vm1", "vm", "work", tid,
                                                                                    CREATED)])  # fmt: skip
    add(repo.ROOT, root.render(), root.refs(), True, "snapshot 1", name=f"roots/{'0' * 9}1-20261127T090000Z")
    image = text + bytes(BLOCK) + _stream(b"block 2", BLOCK) + _stream(b"block 3", 1000)
    doc = {
        "passphrase": PASSPHRASE, "passphrase_hex": PASSPHRASE.encode().hex(), "kdf_salt": SALT.hex(),
        "kdf_n": 1024, "kdf_r": 8, "kdf_p": 1, "repo_id": REPO_ID.hex(), "master": master.hex(),
        "enc_key": keys.enc_key.hex(), "mac_key": keys.mac_key.hex(), "id_key": keys.id_key.hex(),
        "block_size": BLOCK, "objects": objects,
        "image": {"path": "appvms/work/private.img", "size": len(image), "sha256": hashlib.sha256(image).hexdigest(),
                  "holes": [[BLOCK, BLOCK]]},
    }  # fmt: skip
    (out / "vectors.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
