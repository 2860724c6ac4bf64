"""The repository format (docs/REPOSITORY.md): vectors against the implementation and the OpenSSL/zstd command
lines, and the strict readers of verified bytes (objects, header, root, file list, segment, lineage)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from qubes_backup_dom0.errors import VerificationError
from qubes_backup_dom0.format import crypto, repo, repotree

VECTORS = Path(__file__).resolve().parent / "vectors" / "repository"
BS = 65536


@pytest.fixture(scope="module")
def vec() -> dict[str, Any]:
    return json.loads((VECTORS / "vectors.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def keys(vec: dict[str, Any]) -> repo.RepoKeys:
    header = repo.parse_header((VECTORS / "repo-header").read_bytes())
    return repo.keys_from_passphrase(vec["passphrase"].encode(), header)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"the repository vectors need the {name} command line (stock-tool restorability is a promise)")
    return path


def run(*argv: str, data: bytes = b"") -> bytes:
    return subprocess.run(list(argv), input=data, capture_output=True, check=True, timeout=60).stdout


# ------------------------------------------------------------------------------------------------ vectors

def test_vector_keys_and_header(vec: dict[str, Any], keys: repo.RepoKeys) -> None:
    raw = (VECTORS / "repo-header").read_bytes()
    header = repo.parse_header(raw)
    assert header.repo_id.hex() == vec["repo_id"] and header.block_size == vec["block_size"]
    assert header.render() == raw
    assert (keys.enc_key.hex(), keys.mac_key.hex(), keys.id_key.hex()) == (vec["enc_key"], vec["mac_key"],
                                                                           vec["id_key"])  # fmt: skip
    assert repo.verify_header(keys, raw, (VECTORS / "repo-header.hmac").read_bytes())


def test_vector_keys_with_openssl(vec: dict[str, Any]) -> None:
    openssl = tool("openssl")

    def kdf(*args: str) -> str:
        return run(openssl, "kdf", "-keylen", "32", *args).decode().strip().replace(":", "").lower()

    master = kdf("-kdfopt", f"hexpass:{vec['passphrase_hex']}", "-kdfopt", f"hexsalt:{vec['kdf_salt']}",
                 "-kdfopt", "n:1024", "-kdfopt", "r:8", "-kdfopt", "p:1", "SCRYPT")  # fmt: skip
    assert master == vec["master"]
    for which in ("encrypt", "mac", "id"):
        sub = kdf("-kdfopt", "digest:SHA256", "-kdfopt", f"hexkey:{master}", "-kdfopt", f"hexsalt:{vec['repo_id']}",
                  "-kdfopt", f"info:qubes-backup-repo-v1/{which}", "HKDF")  # fmt: skip
        assert sub == vec[{"encrypt": "enc_key", "mac": "mac_key", "id": "id_key"}[which]]
    header = (VECTORS / "repo-header").read_bytes()
    mac = run(openssl, "dgst", "-sha256", "-mac", "HMAC", "-macopt", f"hexkey:{vec['mac_key']}", "-r", data=header)
    assert mac.split()[0] + b"\n" == (VECTORS / "repo-header.hmac").read_bytes()


def test_vector_objects(vec: dict[str, Any], keys: repo.RepoKeys) -> None:
    for o in vec["objects"]:
        raw = (VECTORS / o["file"]).read_bytes()
        plain = (VECTORS / o["plaintext_file"]).read_bytes()
        opened = repo.open_object(keys, raw, o["type"], None if o["type"] == repo.ROOT else o["id"], BS)
        assert (opened.id, opened.plaintext, opened.refs) == (o["id"], plain, o["refs"])
        assert repo.object_id(keys, o["type"], plain) == o["id"]
        if not o["compressed"]:  # zstd's output may differ between library versions; stored objects do not
            again = repo.seal(keys, o["type"], plain, o["refs"], compress=True, iv=bytes.fromhex(o["iv"]))
            assert again == (o["id"], raw)
    assert any(o["compressed"] for o in vec["objects"]) and not all(o["compressed"] for o in vec["objects"])


def test_vector_objects_with_stock_tools(vec: dict[str, Any], tmp_path: Path) -> None:
    """What a stranger does with openssl, zstd and coreutils: check the MAC line, decrypt from the offset the
    header line gives, decompress, recompute the id."""
    openssl, zstd = tool("openssl"), tool("zstd")
    for o in vec["objects"]:
        raw = (VECTORS / o["file"]).read_bytes()
        body, mac = raw[:-65], raw[-65:]
        got = run(openssl, "dgst", "-sha256", "-mac", "HMAC", "-macopt", f"hexkey:{vec['mac_key']}", "-r", data=body)
        assert got.split()[0] + b"\n" == mac
        head = raw[:83].decode()
        nrefs = int(head.split()[4])
        start = 83 + 65 * nrefs
        iv = raw[start : start + 16].hex()
        assert iv == o["iv"]
        clear = run(openssl, "enc", "-d", "-aes-256-ctr", "-K", vec["enc_key"], "-iv", iv, data=body[start + 16 :])
        if head.split()[2] == "z":
            clear = run(zstd, "-dq", data=clear)
        assert clear == (VECTORS / o["plaintext_file"]).read_bytes()
        oid = run(openssl, "dgst", "-sha256", "-mac", "HMAC", "-macopt", f"hexkey:{vec['id_key']}", "-r",
                  data=o["type"].encode() + clear)  # fmt: skip
        assert oid.split()[0].decode() == o["id"] == head.split()[3]


def test_vector_snapshot_restores_the_image(vec: dict[str, Any], keys: repo.RepoKeys) -> None:
    """Root -> file list -> segment -> blocks: the image with its hole, byte-exact."""
    by_type: dict[str, list[dict[str, Any]]] = {}
    for o in vec["objects"]:
        by_type.setdefault(o["type"], []).append(o)

    def body(o: dict[str, Any]) -> bytes:
        return (VECTORS / o["plaintext_file"]).read_bytes()

    root = repotree.parse_root(body(by_type["r"][0]), by_type["r"][0]["refs"])
    assert (root.seq, root.block_size, root.history) == (1, BS, [])
    tree = repotree.parse_tree(body(by_type["t"][0]), BS, by_type["t"][0]["refs"])
    (f,) = tree.files
    assert root.archives[0].tree == by_type["t"][0]["id"] and f.path == vec["image"]["path"]
    seg = repotree.parse_segment(body(by_type["s"][0]), by_type["s"][0]["refs"])
    data = {o["id"]: body(o) for o in by_type["d"]}
    image = bytearray(f.size)
    for k, did in seg.blocks:
        image[k * BS : k * BS + len(data[did])] = data[did]
    assert len(image) == vec["image"]["size"] and hashlib.sha256(image).hexdigest() == vec["image"]["sha256"]


# ---------------------------------------------------------------------------------------- objects, refused

@pytest.fixture(scope="module")
def kk() -> tuple[repo.RepoKeys, repo.RepoKeys]:
    """Two repositories made with the same passphrase (other ids, so other keys)."""
    master = b"m" * 32
    return repo.derive_keys(master, b"A" * 16), repo.derive_keys(master, b"B" * 16)


def test_round_trip_every_type(kk: tuple[repo.RepoKeys, repo.RepoKeys]) -> None:
    k = kk[0]
    cases = [(repo.DATA, b"a" * BS, []), (repo.DATA, os.urandom(BS), []), (repo.SEGMENT, b"x" * 100, ["0" * 64]),
             (repo.QUBES, b"<qubes/>" * 1000, [])]  # fmt: skip
    for otype, plain, refs in cases:
        oid, raw = repo.seal(k, otype, plain, refs)
        if raw[7:8] == b"z":
            assert len(raw) % repo.PAD_ALIGN == 0  # compressed objects are padded
        opened = repo.open_object(k, raw, otype, oid, BS, len(plain) if otype == repo.DATA else None)
        assert opened.plaintext == plain and opened.refs == sorted(refs)


def test_every_byte_is_covered(kk: tuple[repo.RepoKeys, repo.RepoKeys]) -> None:
    k = kk[0]
    oid, raw = repo.seal(k, repo.SEGMENT, b"y" * 5000, ["1" * 64, "2" * 64])
    for pos in range(0, len(raw), max(1, len(raw) // 97)):
        bent = bytearray(raw)
        bent[pos] ^= 0x01
        with pytest.raises(VerificationError):
            repo.open_object(k, bent, repo.SEGMENT, oid, BS)


def test_refused_under_another_id_type_or_repository(kk: tuple[repo.RepoKeys, repo.RepoKeys]) -> None:
    a, b = kk
    oid, raw = repo.seal(a, repo.DATA, b"z" * 4096)
    other, _ = repo.seal(a, repo.DATA, b"w" * 4096)
    with pytest.raises(VerificationError, match="another object"):
        repo.open_object(a, raw, repo.DATA, other, BS, 4096)
    with pytest.raises(VerificationError, match="instead"):
        repo.open_object(a, raw, repo.SEGMENT, oid, BS)
    with pytest.raises(VerificationError, match="another repository"):
        repo.open_object(b, raw, repo.DATA, oid, BS, 4096)
    with pytest.raises(VerificationError, match="size"):  # the length the map implies for this block
        repo.open_object(a, raw, repo.DATA, oid, BS, 4095)
    with pytest.raises(VerificationError, match="wrong size"):
        repo.open_object(a, raw + bytes(repo.max_object_size(repo.DATA, BS)), repo.DATA, oid, BS)


def _forge(k: repo.RepoKeys, otype: str, oid: str, body: bytes, comp: str = "z",
           refs: list[str] | None = None) -> bytes:  # fmt: skip
    """An object as a holder of the keys could write it, with any header and body."""
    refs = refs or []
    head = b"qbr1 %s %s %s %08d\n" % (otype.encode(), comp.encode(), oid.encode(), len(refs))
    iv = b"\0" * 16
    pre = head + b"".join(r.encode() + b"\n" for r in refs) + iv + crypto.aes_ctr(k.enc_key, iv, body)
    return pre + crypto.hmac_sha256(k.mac_key, pre).hex().encode() + b"\n"


def test_authentic_but_wrong_content_is_refused(kk: tuple[repo.RepoKeys, repo.RepoKeys]) -> None:
    """Even a passphrase holder cannot make dom0 take content under another id, inflate a bomb or hide
    bytes after the frame."""
    k = kk[0]
    plain = b"q" * BS
    oid = repo.object_id(k, repo.DATA, plain)
    frame = zstandard.ZstdCompressor().compress(plain)
    with pytest.raises(VerificationError, match="does not match its id"):
        repo.open_object(k, _forge(k, repo.DATA, "e" * 64, frame), repo.DATA, "e" * 64, BS)
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    with pytest.raises(VerificationError, match="excessive size"):
        repo.open_object(k, _forge(k, repo.DATA, oid, bomb), repo.DATA, oid, BS)
    with pytest.raises(VerificationError, match="unexpected bytes"):
        repo.open_object(k, _forge(k, repo.DATA, oid, frame + b"junk"), repo.DATA, oid, BS)
    lying = bytearray(zstandard.ZstdCompressor().compress(bytes(BS)))  # says 64 KiB, holds 256 KiB
    big = zstandard.ZstdCompressor().compress(bytes(4 * BS))
    with pytest.raises(VerificationError):
        repo.open_object(k, _forge(k, repo.DATA, oid, bytes(lying[:6]) + big[6:]), repo.DATA, oid, BS)
    pad = struct.pack("<II", repo.SKIPPABLE, 8) + b"\1" * 8
    with pytest.raises(VerificationError, match="unexpected bytes"):
        repo.open_object(k, _forge(k, repo.DATA, oid, frame + pad), repo.DATA, oid, BS)
    padded = _forge(k, repo.DATA, oid, frame + pad[:8] + bytes(8))
    assert repo.open_object(k, padded, repo.DATA, oid, BS).plaintext == plain
    for at in (0, 1000, 2047):  # one byte other than zero anywhere in the padding
        bent = struct.pack("<II", repo.SKIPPABLE, 2048) + bytes(at) + b"\x80" + bytes(2047 - at)
        with pytest.raises(VerificationError, match="unexpected bytes"):
            repo.open_object(k, _forge(k, repo.DATA, oid, frame + bent), repo.DATA, oid, BS)
    with pytest.raises(VerificationError, match="references"):
        repo.open_object(k, _forge(k, repo.SEGMENT, oid, plain, "n", ["2" * 64, "1" * 64]), repo.SEGMENT, oid, BS)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=4096), pad=st.integers(0, 2 * repo.PAD_ALIGN - 8),
       after=st.sampled_from([b"", b"\0", b"x", b"\0" * 9]))  # fmt: skip
def test_padding_found_from_the_end(kk: tuple[repo.RepoKeys, repo.RepoKeys], data: bytes, pad: int,
                                    after: bytes) -> None:  # fmt: skip
    """The reader finds the padding from the end (so the frame is decompressed in one call that refuses
    anything after it): a frame alone, or followed by one skippable frame of zeros of any length up to the
    bound, opens; a byte after the padding (even a zero: the padding then says a length it does not have)
    is refused, as is anything after a frame without padding."""
    k = kk[0]
    plain = (data * (BS // len(data) + 1))[: BS // 2]
    oid = repo.object_id(k, repo.DATA, plain)
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(plain)
    for body in (frame + struct.pack("<II", repo.SKIPPABLE, pad) + bytes(pad), frame):
        obj = _forge(k, repo.DATA, oid, body + after)
        if after:
            with pytest.raises(VerificationError, match="unexpected bytes after the compressed content"):
                repo.open_object(k, obj, repo.DATA, oid, BS)
        else:
            assert repo.open_object(k, obj, repo.DATA, oid, BS).plaintext == plain
    too_long = 2 * repo.PAD_ALIGN  # REPOSITORY.md section 5: a padding's length is below 8,192
    obj = _forge(k, repo.DATA, oid, frame + struct.pack("<II", repo.SKIPPABLE, too_long) + bytes(too_long))
    with pytest.raises(VerificationError, match="unexpected bytes after the compressed content"):
        repo.open_object(k, obj, repo.DATA, oid, BS)


# ------------------------------------------------------------------------------------------------- header

def _header(**kw: Any) -> bytes:
    h = repo.RepoHeader(b"\1" * 16, "2026-01-01T00:00:00Z", crypto.KdfParams(b"\2" * 16, 1024, 8, 1), "zstd", BS)
    text = h.render().decode()
    for key, value in kw.items():
        name = key.replace("_", "-")
        lines = text.splitlines()
        text = "".join(f"{name}={value}\n" if line.startswith(name + "=") else line + "\n" for line in lines)
    return text.encode()


@pytest.mark.parametrize("kw", [{"kdf_n": 1 << 21}, {"kdf_n": 1000}, {"kdf_r": 64}, {"block_size": 4096},
                                {"block_size": 3 << 16}, {"block_size": 8 << 20}, {"compression": "gzip"},
                                {"version": 2}, {"created": "2026-13-01T00:00:00Z"}, {"id": "sha256"}])  # fmt: skip
def test_header_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(VerificationError):
        repo.parse_header(_header(**kw))


def test_header_strict_lines() -> None:
    good = _header()
    repo.parse_header(good)
    for bad in (good + b"extra=1\n", good[:-1], good.replace(b"\n", b"\r\n"), b"x" * 5000,
                good.replace(b"repo-id", b"repo-Id")):  # fmt: skip
        with pytest.raises(VerificationError):
            repo.parse_header(bad)


# ------------------------------------------------------------------------------------------- snapshot bodies

ID = "a" * 64
ID2 = "b" * 64
T = "2026-01-01T00:00:00Z"


def _root(seq: int = 2, **kw: Any) -> repotree.Root:
    history = [repotree.HistoryEntry(i, ID2, T) for i in range(1, seq)]
    args: dict[str, Any] = {"repo_id": "c" * 32, "seq": seq, "created": T, "block_size": BS, "qubes": ID,
                            "archives": [repotree.RootArchive("vm1", "vm", "work", ID2, T)], "history": history}
    args.update(kw)
    return repotree.Root(**args)


def test_root_round_trip_and_refs() -> None:
    r = _root(3)
    assert repotree.parse_root(r.render(), r.refs()) == r
    with pytest.raises(VerificationError, match="references"):
        repotree.parse_root(r.render(), [ID])


@pytest.mark.parametrize("edit", [
    lambda t: t.replace("history 2", "history 3"),  # history must be 1..seq-1
    lambda t: t.replace("seq 3", "seq 4"),
    lambda t: t.replace("archive vm1 vm work", "archive vm0 vm work"),
    lambda t: t.replace("archive vm1 vm work", "archive vm1 home dom0"),
    lambda t: t.replace("end\n", "end\nend\n"),
    lambda t: t.replace("block-size 65536", "block-size 1000"),
    lambda t: t.replace("qubes-backup-root 1", "qubes-backup-root 2"),
    lambda t: t.replace(f"archive vm1 vm work {ID2} {T}\n", ""),  # no archive
    lambda t: t.replace(f"archive vm1 vm work {ID2} {T}\n", f"archive vm1 vm work {ID2} {T}\n" * 2),
])  # fmt: skip
def test_root_refused(edit: Any) -> None:
    text = _root(3).render().decode()
    bent = edit(text)
    assert bent != text
    with pytest.raises(VerificationError):
        repotree.parse_root(bent.encode())


def test_tree_and_segment() -> None:
    t = repotree.Tree([
        repotree.TreeFile("home/user", "dir", 0, 0, 0o700, 5),
        repotree.TreeFile("home/user/\u00e9 x%", "file", 3 * BS, BS, 0o644, -1, None, [(0, ID)]),
        repotree.TreeFile("home/user/l", "symlink", 0, 0, 0o777, 0, "../t\u00e9"),
    ])  # fmt: skip
    data = t.render(BS)
    assert repotree.parse_tree(data, BS, t.refs()) == t
    for bad in (data.replace(b"seg 0", b"seg 5"), data.replace(b"%25", b"%"),
                data.replace(b"%c3%a9%20x", b"%C3%A9%20x"), data.replace(b"0644", b"644"),
                data.replace(b"link ", b"link  "), data.replace(b"file dir 0 0", b"file dir 1 0"),
                data.replace(b"%20x", b"%2fx")):  # fmt: skip
        assert bad != data
        with pytest.raises(VerificationError):
            repotree.parse_tree(bad, BS)
    s = repotree.Segment([(0, ID), (4095, ID2)])
    assert repotree.parse_segment(s.render(), s.refs()) == s
    for bad in (s.render().replace(b"4095", b"4096"), b"qubes-backup-segment 1\nend\n",
                s.render().replace(b"0 " + ID.encode(), b"4095 " + ID.encode())):  # fmt: skip
        with pytest.raises(VerificationError):
            repotree.parse_segment(bad)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_path_encoding_round_trips(text: str) -> None:
    encoded = repotree.encode_path(text)
    assert all(0x21 <= ord(c) <= 0x7E for c in encoded)
    assert repotree.decode_path(encoded, "x") == text


def test_lineage() -> None:
    head = _root(3)
    assert repotree.lineage_problem(ID, head, 3, ID) is None  # the very root dom0 knows
    assert repotree.lineage_problem(ID, head, 2, ID2) is None  # newer, and it records dom0's
    assert "older" in (repotree.lineage_problem(ID, head, 4, ID2) or "")  # rollback
    assert "not the one" in (repotree.lineage_problem(ID, head, 3, ID2) or "")  # fork at the same number
    assert "descend" in (repotree.lineage_problem(ID, head, 2, "d" * 64) or "")  # fork before
    assert repotree.lineage_problem(ID, head, None, ID2) is None  # a pinned id in its history
    assert repotree.lineage_problem(ID, head, None, "d" * 64) is not None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=64), st.data())
def test_gets_data_round_trips_and_any_changed_byte_is_refused_or_reads_another_id(
    raw_ids: list[bytes], data: st.DataObject
) -> None:
    """A GETS frame's data (docs/REPOSITORY.md section 9) names exactly the ids it was built from; a changed
    byte makes it malformed, or (a hex digit for a hex digit) names another id, never more or fewer."""
    from qubes_backup_protocol import repo as names

    ids = [r.hex() for r in raw_ids]
    body = names.encode_gets(ids)
    assert len(body) == 65 * len(ids) and names.parse_gets(body) == ids
    pos = data.draw(st.integers(0, len(body) - 1))
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != body[pos]))
    bent = body[:pos] + bytes([byte]) + body[pos + 1 :]
    try:
        got = names.parse_gets(bent)
    except ValueError:
        return
    assert len(got) == len(ids) and sum(a != b for a, b in zip(got, ids, strict=True)) == 1
    with pytest.raises(ValueError):
        names.parse_gets(body + body[:65] * (65 - len(ids)))  # more than 64
    with pytest.raises(ValueError):
        names.encode_gets([*ids, *ids] if len(ids) > 32 else [])
