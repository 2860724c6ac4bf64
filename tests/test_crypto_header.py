"""Crypto and header: round trips, strictness, ceilings before the KDF, and OpenSSL interoperability."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qubes_backup_dom0.errors import VerificationError
from qubes_backup_dom0.format import crypto, header

KDF = crypto.KdfParams(bytes(range(16)), 1 << 10, 8, 1)
BACKUP_ID = bytes.fromhex("00112233445566778899aabbccddeeff")


def make_header(**kw: object) -> header.Header:
    values: dict[str, object] = dict(
        backup_id=BACKUP_ID, created="2026-11-27T09:00:00Z", kdf=KDF, compression="zstd", chunk_size=1 << 20
    )
    values.update(kw)
    return header.Header(**values)  # type: ignore[arg-type]


def test_header_round_trip() -> None:
    h = make_header()
    assert header.parse(h.render()) == h


@pytest.mark.parametrize(
    "n,r,p",
    [(1 << 21, 8, 1), (3 << 10, 8, 1), (1 << 9, 8, 1), (1 << 20, 16, 1), (1 << 17, 8, 200), (1 << 17, 64, 1)],
)
def test_kdf_ceiling_refused_before_kdf_runs(n: int, r: int, p: int, monkeypatch: pytest.MonkeyPatch) -> None:
    text = make_header().render().decode()
    text = text.replace("kdf-n=1024", f"kdf-n={n}").replace("kdf-r=8", f"kdf-r={r}")
    text = text.replace("kdf-p=1\n", f"kdf-p={p}\n")
    ran = []
    monkeypatch.setattr(crypto, "derive_master", lambda *a: ran.append(a))
    with pytest.raises(VerificationError):
        header.parse(text.encode())
    assert not ran


@pytest.mark.parametrize("size", [0, 1 << 15, (1 << 20) + 1, 512 << 20])
def test_chunk_size_ceiling(size: int) -> None:
    text = make_header().render().decode().replace("chunk-size=1048576", f"chunk-size={size}")
    with pytest.raises(VerificationError):
        header.parse(text.encode())


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_header_mutations_never_crash(data: st.DataObject) -> None:
    raw = bytearray(make_header().render())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and raw:
            del raw[pos]
        else:
            del raw[pos:]
    try:
        parsed = header.parse(bytes(raw))
    except VerificationError:
        return
    # If a mutation still parses, it re-renders to exactly the same bytes: the grammar is canonical.
    assert parsed.render() == bytes(raw)


def test_header_too_large_refused() -> None:
    with pytest.raises(VerificationError):
        header.parse(make_header().render() + b"x" * 5000)


def test_mac_binds_name_backup_and_content() -> None:
    keys = crypto.derive_keys(b"m" * 32, BACKUP_ID)
    other_backup = crypto.derive_keys(b"m" * 32, b"\x01" * 16)
    sealed = bytes(crypto.encrypt(keys, b"hello"))
    mac = crypto.mac_member(keys, "vm1/000000", sealed)
    assert crypto.verify_member(keys, "vm1/000000", sealed, mac)
    assert not crypto.verify_member(keys, "vm1/000001", sealed, mac)
    assert not crypto.verify_member(keys, "vm2/000000", sealed, mac)
    assert not crypto.verify_member(other_backup, "vm1/000000", sealed, mac)
    assert not crypto.verify_member(keys, "vm1/000000", sealed[:-1] + bytes([sealed[-1] ^ 1]), mac)
    assert not crypto.verify_member(keys, "vm1/000000", sealed, mac[:-1])
    assert crypto.decrypt(keys, sealed) == b"hello"


def test_keys_depend_on_backup_id_and_salt() -> None:
    k1 = crypto.keys_from_passphrase(b"pw", KDF, BACKUP_ID)
    k2 = crypto.keys_from_passphrase(b"pw", KDF, b"\x02" * 16)
    k3 = crypto.keys_from_passphrase(b"pw", crypto.KdfParams(b"\x09" * 16, 1 << 10, 8, 1), BACKUP_ID)
    assert len({k1.enc_key, k2.enc_key, k3.enc_key, k1.mac_key}) == 4


def test_openssl_cli_derives_the_same_keys_and_decrypts() -> None:
    """The stock-tool path: openssl kdf / dgst / enc agree with the implementation."""
    keys = crypto.keys_from_passphrase(b"pass word", KDF, BACKUP_ID)

    def kdf(*opts: str, alg: str) -> str:
        cmd = ["openssl", "kdf", "-keylen", "32"]
        for o in opts:
            cmd += ["-kdfopt", o]
        out = subprocess.run([*cmd, alg], check=True, capture_output=True, text=True).stdout
        return out.strip().replace(":", "").lower()

    master = kdf("pass:pass word", f"hexsalt:{KDF.salt.hex()}", "n:1024", "r:8", "p:1", alg="SCRYPT")
    enc = kdf("digest:SHA256", f"hexkey:{master}", f"hexsalt:{BACKUP_ID.hex()}", "info:qubes-backup-v1/encrypt",
              alg="HKDF")  # fmt: skip
    mac = kdf("digest:SHA256", f"hexkey:{master}", f"hexsalt:{BACKUP_ID.hex()}", "info:qubes-backup-v1/mac",
              alg="HKDF")  # fmt: skip
    assert (enc, mac) == (keys.enc_key.hex(), keys.mac_key.hex())
    sealed = bytes(crypto.encrypt(keys, b"secret data" * 1000))
    plain = subprocess.run(
        ["openssl", "enc", "-d", "-aes-256-ctr", "-K", enc, "-iv", sealed[:16].hex()],
        input=sealed[16:], check=True, capture_output=True,
    ).stdout  # fmt: skip
    assert plain == b"secret data" * 1000
    mac_input = b"qubes-backup-v1\n" + BACKUP_ID.hex().encode() + b"\nvm1/000000\n" + sealed
    digest = subprocess.run(
        ["openssl", "dgst", "-sha256", "-mac", "HMAC", "-macopt", f"hexkey:{mac}", "-r"],
        input=mac_input, check=True, capture_output=True,
    ).stdout.split()[0]  # fmt: skip
    assert digest + b"\n" == crypto.mac_member(keys, "vm1/000000", sealed)
