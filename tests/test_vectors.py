"""The committed test vectors (tests/vectors/, made by tools/make_vectors.py) against two readers.

Why both: the implementation must reproduce the known answers exactly (a format change is then a visible,
deliberate act), and the OpenSSL 3 command line must reproduce them too, which is what makes the format
implementable by a stranger and restorable with stock tools.  The complete backup (d) is verified and
restored with the implementation's functions and, separately, with openssl + GNU tar only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from qubes_backup_dom0.format import crypto, extractor, header, manifest, tarwriter

VECTORS = Path(__file__).resolve().parent / "vectors"
GENERATOR = Path(__file__).resolve().parent.parent / "tools" / "make_vectors.py"


@pytest.fixture(scope="module")
def vec() -> dict[str, Any]:
    return json.loads((VECTORS / "vectors.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def openssl() -> str:
    """A missing OpenSSL 3 CLI is a failure, not a skip: stock-tool restorability is a promise."""
    path = shutil.which("openssl")
    if path is None:
        pytest.fail("test vectors need the openssl command line (OpenSSL 3); .ci/run installs it")
    version = subprocess.run([path, "version"], capture_output=True, text=True, check=True).stdout
    if not version.startswith("OpenSSL 3"):
        pytest.fail(f"test vectors need OpenSSL 3, found {version.strip()}")
    return path


def ossl(openssl: str, *args: str, data: bytes = b"") -> bytes:
    return subprocess.run([openssl, *args], input=data, capture_output=True, check=True, timeout=60).stdout


def ossl_kdf_hex(openssl: str, *args: str) -> str:
    """``openssl kdf`` prints ``AB:CD:...``; the format uses lowercase hex without separators."""
    return ossl(openssl, "kdf", "-keylen", "32", *args).decode().strip().replace(":", "").lower()


def ossl_keys(openssl: str, passphrase: str, salt: str, n: int, r: int, p: int, backup_id: str) -> dict[str, str]:
    master = ossl_kdf_hex(
        openssl, "-kdfopt", f"hexpass:{passphrase.encode('utf-8').hex()}", "-kdfopt", f"hexsalt:{salt}",
        "-kdfopt", f"n:{n}", "-kdfopt", f"r:{r}", "-kdfopt", f"p:{p}", "-kdfopt", "maxmem_bytes:1100000000",
        "SCRYPT",
    )  # fmt: skip

    def hkdf(info: str) -> str:
        return ossl_kdf_hex(
            openssl, "-kdfopt", "digest:SHA256", "-kdfopt", f"hexkey:{master}", "-kdfopt", f"hexsalt:{backup_id}",
            "-kdfopt", f"info:{info}", "HKDF",
        )  # fmt: skip

    return {"master": master, "enc_key": hkdf("qubes-backup-v1/encrypt"), "mac_key": hkdf("qubes-backup-v1/mac")}


def ossl_mac(openssl: str, mac_key: str, backup_id: str, name: str, data: bytes) -> bytes:
    prefix = f"qubes-backup-v1\n{backup_id}\n{name}\n".encode()
    out = ossl(openssl, "dgst", "-sha256", "-mac", "HMAC", "-macopt", f"hexkey:{mac_key}", "-r", data=prefix + data)
    return out.split(b" ")[0] + b"\n"


def ossl_decrypt(openssl: str, enc_key: str, member: bytes) -> bytes:
    return ossl(openssl, "enc", "-d", "-aes-256-ctr", "-K", enc_key, "-iv", member[:16].hex(), data=member[16:])


def impl_keys(v: dict[str, Any]) -> crypto.Keys:
    kdf = crypto.KdfParams(bytes.fromhex(v["kdf_salt"]), v["kdf_n"], v["kdf_r"], v["kdf_p"])
    return crypto.keys_from_passphrase(v["passphrase"].encode("utf-8"), kdf, bytes.fromhex(v["backup_id"]))


# ------------------------------------------------------------------------------------------- (a) - (c)


def test_a_keys_implementation(vec: dict[str, Any]) -> None:
    v = vec["keys"]
    assert v["passphrase"].encode("utf-8").hex() == v["passphrase_utf8_hex"]
    kdf = crypto.KdfParams(bytes.fromhex(v["kdf_salt"]), v["kdf_n"], v["kdf_r"], v["kdf_p"])
    master = crypto.derive_master(v["passphrase"].encode("utf-8"), kdf)
    assert master.hex() == v["master"]
    keys = impl_keys(v)
    assert (keys.enc_key.hex(), keys.mac_key.hex()) == (v["enc_key"], v["mac_key"])
    assert keys.enc_key != keys.mac_key


def test_a_keys_openssl(vec: dict[str, Any], openssl: str) -> None:
    v = vec["keys"]
    got = ossl_keys(openssl, v["passphrase"], v["kdf_salt"], v["kdf_n"], v["kdf_r"], v["kdf_p"], v["backup_id"])
    assert got == {k: v[k] for k in ("master", "enc_key", "mac_key")}


def test_b_header(vec: dict[str, Any], openssl: str) -> None:
    v, k = vec["header"], vec["keys"]
    data = (VECTORS / v["header_file"]).read_bytes()
    assert data.decode("ascii") == v["header"]
    kdf = crypto.KdfParams(bytes.fromhex(k["kdf_salt"]), k["kdf_n"], k["kdf_r"], k["kdf_p"])
    rendered = header.Header(bytes.fromhex(v["backup_id"]), v["created"], kdf, v["compression"], v["chunk_size"])
    assert rendered.render() == data
    assert header.parse(data) == rendered
    mac = (VECTORS / v["hmac_file"]).read_bytes()
    assert mac.decode("ascii") == v["hmac"] and len(mac) == 65
    keys = impl_keys(k)
    assert crypto.mac_member(keys, "backup-header", data) == mac
    assert ossl_mac(openssl, k["mac_key"], v["backup_id"], "backup-header", data) == mac


def test_c_chunk(vec: dict[str, Any], openssl: str) -> None:
    v, k = vec["chunk"], vec["keys"]
    plaintext = (VECTORS / v["plaintext_file"]).read_bytes()
    member = (VECTORS / v["member_file"]).read_bytes()
    assert plaintext.hex() == v["plaintext_hex"] and member.hex() == v["member_hex"]
    assert member[:16].hex() == v["iv"] and len(member) == len(plaintext) + 16
    keys = impl_keys(k)
    assert bytes(crypto.encrypt(keys, plaintext, iv=bytes.fromhex(v["iv"]))) == member
    assert crypto.decrypt(keys, member) == plaintext
    assert crypto.mac_member(keys, v["name"], member).decode() == v["hmac"]
    # The name is bound into the MAC: the same bytes at another position have another MAC.
    assert crypto.mac_member(keys, "vm1/000001", member).decode() == v["hmac_if_named_vm1/000001"] != v["hmac"]
    assert crypto.verify_member(keys, v["name"], member, v["hmac"].encode())
    assert not crypto.verify_member(keys, "vm1/000001", member, v["hmac"].encode())
    assert ossl_decrypt(openssl, k["enc_key"], member) == plaintext
    assert ossl_mac(openssl, k["mac_key"], k["backup_id"], v["name"], member).decode() == v["hmac"]


def test_generator_reproduces_a_to_c_e_f(vec: dict[str, Any], tmp_path: Path) -> None:
    """The committed (a)-(c), (e), (f) are exactly what tools/make_vectors.py makes from its fixed inputs."""
    spec = importlib.util.spec_from_file_location("make_vectors", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("tiny-backup.tar", "vectors.json"):  # keep (d): it is a committed reference, not regenerated
        shutil.copy(VECTORS / name, tmp_path / name)
    assert module.main([str(tmp_path)]) == 0
    regenerated = json.loads((tmp_path / "vectors.json").read_text(encoding="utf-8"))
    assert regenerated == vec
    for name in ("backup-header", "backup-header.hmac", "chunk-plaintext.bin", "chunk-member.bin",
                 "inner-archive.tar", "manifest-plaintext.xml"):  # fmt: skip
        assert (tmp_path / name).read_bytes() == (VECTORS / name).read_bytes(), name


# ------------------------------------------------------------------------------------------- (d)


def tiny_members(vec: dict[str, Any]) -> list[tuple[str, bytes]]:
    path = VECTORS / vec["tiny_backup"]["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == vec["tiny_backup"]["sha256"], "vector file changed"
    with tarfile.open(path) as tf:
        out = []
        for info in tf.getmembers():
            assert info.isreg()
            f = tf.extractfile(info)
            assert f is not None
            out.append((info.name, f.read()))
        return out


def data_regions(path: Path) -> list[list[int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos, regions = os.fstat(fd).st_size, 0, []
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            regions.append([start, end - start])
            pos = end
        return regions
    finally:
        os.close(fd)


def check_restored(root: Path, expected_files: dict[str, Any]) -> None:
    for rel, want in expected_files.items():
        path = root / rel
        assert path.is_file(), rel
        assert path.stat().st_size == want["size"], rel
        assert hashlib.sha256(path.read_bytes()).hexdigest() == want["sha256"], rel
        if len(want["data_regions"]) > 1 or sum(n for _, n in want["data_regions"]) < want["size"]:
            assert data_regions(path) == want["data_regions"], f"{rel}: holes not restored where they were"


def test_d_tiny_backup_layout(vec: dict[str, Any]) -> None:
    names = [n for n, _ in tiny_members(vec)]
    chunks = sorted(n for n in names if n.startswith("vm1/0") and not n.endswith(".hmac"))
    assert len(chunks) >= 2, "the vector should exercise joining several chunks"
    assert names == ["backup-header", "backup-header.hmac", "manifest", "manifest.hmac"] + [
        x for c in chunks for x in (c, c + ".hmac")
    ] + ["vm1/trailer", "vm1/trailer.hmac"]


def test_d_tiny_backup_implementation(vec: dict[str, Any], tmp_path: Path) -> None:
    t = vec["tiny_backup"]
    members = dict(tiny_members(vec))
    hdr = header.parse(members["backup-header"])
    assert (hdr.backup_id.hex(), hdr.compression, hdr.chunk_size) == (t["backup_id"], "none", t["chunk_size"])
    keys = crypto.keys_from_passphrase(t["passphrase"].encode("utf-8"), hdr.kdf, hdr.backup_id)
    for name, data in members.items():
        if not name.endswith(".hmac"):
            assert crypto.verify_member(keys, name, data, members[name + ".hmac"]), name
    man = manifest.parse(crypto.decrypt(keys, members["manifest"]))
    assert {a.member: a.vm for a in man.archives} == t["archives"]
    trailer = members["vm1/trailer"].decode().splitlines()
    count = int(trailer[0].removeprefix("chunks="))
    stream = b"".join(crypto.decrypt(keys, members[f"vm1/{i:06d}"]) for i in range(count))
    assert trailer[1] == f"stored={len(stream)}"
    (archive,) = man.archives
    assert {f.path: f.size for f in archive.files} == {p: f["size"] for p, f in t["files"].items()}
    (tmp_path / "out").mkdir()
    ex = extractor.Extractor(tmp_path / "out", archive.files)
    ex.feed(stream)
    ex.finish()
    ex.close()
    check_restored(tmp_path / "out", t["files"])


def test_d_tiny_backup_openssl_and_tar(vec: dict[str, Any], openssl: str, tmp_path: Path) -> None:
    tar = shutil.which("tar")
    if tar is None:
        pytest.fail("the vector test needs GNU tar")
    t = vec["tiny_backup"]
    members = dict(tiny_members(vec))
    fields = dict(line.split("=", 1) for line in members["backup-header"].decode().splitlines())
    keys = ossl_keys(
        openssl, t["passphrase"], fields["kdf-salt"], int(fields["kdf-n"]), int(fields["kdf-r"]),
        int(fields["kdf-p"]), fields["backup-id"],
    )  # fmt: skip
    for name, data in members.items():
        if not name.endswith(".hmac"):
            assert ossl_mac(openssl, keys["mac_key"], fields["backup-id"], name, data) == members[name + ".hmac"]
    xml = ossl_decrypt(openssl, keys["enc_key"], members["manifest"])
    assert b'<archive member="vm1" vm="work"' in xml
    count = int(members["vm1/trailer"].split(b"\n")[0].removeprefix(b"chunks="))
    stream = b"".join(ossl_decrypt(openssl, keys["enc_key"], members[f"vm1/{i:06d}"]) for i in range(count))
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run([tar, "-xf", "-", "-C", str(out)], input=stream, check=True, timeout=60)
    check_restored(out, t["files"])


# ------------------------------------------------------------------------------------------- (e)


def _inner_expected(v: dict[str, Any]) -> list[tarwriter.InnerFile]:
    return [tarwriter.InnerFile(e["path"], None, e["type"], e["size"], e["data"]) for e in v["entries"]]


def _check_inner_restored(root: Path, v: dict[str, Any], modes: bool) -> None:
    for e in v["entries"]:
        path = root / e["path"]
        if e["type"] == "symlink":
            assert os.readlink(path) == e["link"]
            continue
        st = path.lstat()
        assert st.st_mtime == e["mtime"], e["path"]
        if modes:
            assert st.st_mode & 0o7777 == e["mode"] & 0o777, e["path"]  # set-id bits stored, not restored
        if e["type"] == "file":
            assert st.st_size == e["size"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == e["sha256"], e["path"]
            assert data_regions(path) == e["regions"], f"{e['path']}: holes not restored"


def test_e_inner_archive_fields(vec: dict[str, Any]) -> None:
    """The cases FORMAT.md section 8 spells out, seen in the committed bytes."""
    v = vec["inner_archive"]
    data = (VECTORS / v["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == v["sha256"]
    assert data.endswith(bytes(1024)) and len(data) % 512 == 0
    long_name = bytes.fromhex(v["sparse_ustar_name_hex"])
    assert len(long_name) == 100 and long_name[-1] == 0xC3  # cut inside a two-byte character
    with pytest.raises(UnicodeDecodeError):
        long_name.decode("utf-8")
    at = data.find(long_name + b"0000600\0")
    assert at > 0 and at % 512 == 0 and data[at + 156 : at + 157] == b"0"  # sparse: typeflag 0
    assert data[at + 345 : at + 500] == bytes(155)  # empty prefix
    assert b"GNU.sparse.name=" + v["entries"][1]["path"].encode() + b"\n" in data
    assert b"linkpath=" + v["entries"][3]["link"].encode() + b"\n" in data
    assert b" mtime=-1\n" in data  # a negative mtime goes to pax
    assert b"%d\n0\n" % v["entries"][2]["size"] in data  # the final zero-length region of a trailing hole
    assert b"0004755\0" in data  # mode keeps the set-uid bit


@pytest.mark.parametrize("mode", ["extract", "validate"])
def test_e_inner_archive_implementation(vec: dict[str, Any], tmp_path: Path, mode: str) -> None:
    v = vec["inner_archive"]
    dest = None if mode == "validate" else tmp_path / "out"
    if dest is not None:
        dest.mkdir()
    ex = extractor.Extractor(dest, _inner_expected(v))
    data = (VECTORS / v["file"]).read_bytes()
    for i in range(0, len(data), 333):  # odd-sized pieces
        ex.feed(data[i : i + 333])
    ex.finish()
    ex.close()
    if dest is not None:
        _check_inner_restored(dest, v, modes=True)


def test_e_inner_archive_gnu_tar(vec: dict[str, Any], tmp_path: Path) -> None:
    tar = shutil.which("tar")
    if tar is None:
        pytest.fail("the vector test needs GNU tar")
    v = vec["inner_archive"]
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run([tar, "-xf", str(VECTORS / v["file"]), "-C", str(out)], check=True, timeout=60)
    _check_inner_restored(out, v, modes=False)


# ------------------------------------------------------------------------------------------- (f)


def test_f_padded_manifest(vec: dict[str, Any]) -> None:
    v = vec["manifest"]
    data = (VECTORS / v["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == v["sha256"]
    assert len(data) == v["length"] == manifest.padded_size(v["unpadded_length"])
    body, pad = data[: v["unpadded_length"]], data[v["unpadded_length"] :]
    assert body.endswith(b"</qubes-backup-manifest>\n") and pad == b" " * len(pad) and pad
    m = manifest.parse(data)
    assert {a.member: a.vm for a in m.archives} == v["archives"]
    with pytest.raises(manifest.VerificationError):
        manifest.parse(body)
