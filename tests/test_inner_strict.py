"""FORMAT.md section 8 decided field by field: the extractor accepts the canonical entry headers only
(issue 10 item 9).  Each case starts from what the writer emits and changes one thing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from qubes_backup_dom0.errors import VerificationError
from qubes_backup_dom0.format import tarread, tarwriter
from qubes_backup_dom0.format.extractor import Extractor
from qubes_backup_dom0.format.tarwriter import InnerFile

END = bytes(1024)


def _hdr(name: bytes, mode: int, size: int, mtime: int, typeflag: bytes, link: bytes = b"") -> bytes:
    return tarwriter._ustar(name, mode, size, mtime, typeflag, link)


def _fix(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _entry(path: str, typeflag: bytes, data: bytes = b"", *, records: list[tuple[str, bytes]] | None = None,
           pax_name: bytes | None = None, name: bytes | None = None, mode: int = 0o644, mtime: int = 0,
           pax_mtime: int | None = None, link: bytes = b"", ustar_size: int | None = None) -> bytes:  # fmt: skip
    recs = records if records is not None else [("path", path.encode())]
    body = b"".join(tarwriter._pax_record(k, v) for k, v in recs)
    d, _, b = path.rpartition("/")
    pname = pax_name if pax_name is not None else f"{d + '/' if d else ''}PaxHeaders.0/{b}".encode()
    out = _hdr(pname, 0o644, len(body), mtime if pax_mtime is None else pax_mtime, b"x") + body
    out += bytes(-len(body) % 512)
    size = len(data) if ustar_size is None else ustar_size
    out += _hdr(name if name is not None else path.encode(), mode, size, mtime, typeflag, link)
    return out + data + bytes(-len(data) % 512)


def run(dest: Path | None, expected: list[InnerFile], stream: bytes) -> None:
    ex = Extractor(dest, expected)
    try:
        ex.feed(stream)
        ex.finish()
    finally:
        ex.close()


@pytest.fixture(params=["extract", "validate"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> Path | None:
    if request.param == "validate":
        return None
    d = tmp_path / "dest"
    d.mkdir()
    return d


F = [InnerFile("d/f", None, "file", 3, 3, mode=0o644)]


def test_canonical_entry_accepted(dest: Path | None) -> None:
    run(dest, F, _entry("d/f", b"0", b"abc") + END)


CASES = {
    "ustar-name-not-path": dict(name=b"d/g"),
    "pax-name-informal": dict(pax_name=b"PaxHeaders.0/f"),
    "pax-mtime-differs": dict(mtime=5, pax_mtime=0),
    "mtime-in-pax-though-it-fits": dict(records=[("path", b"d/f"), ("mtime", b"7")]),
    "size-in-pax-though-it-fits": dict(records=[("path", b"d/f"), ("size", b"3")], ustar_size=0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_non_canonical_headers_refused(dest: Path | None, case: str) -> None:
    with pytest.raises(VerificationError):
        run(dest, F, _entry("d/f", b"0", b"abc", **CASES[case]) + END)  # type: ignore[arg-type]


@pytest.mark.parametrize(("offset", "value"), [(345, b"pre"), (265, b"root"), (297, b"root"), (329, b"0000000\0"),
                                                (156, b"\0"), (100, b"0644\0\0\0\0"), (100, b"0100644\0"),
                                                (500, b"x")])  # fmt: skip
def test_ustar_field_changes_refused(dest: Path | None, offset: int, value: bytes) -> None:
    """prefix, uname, gname, devmajor, the typeflag of a regular file ('\\0'), the number format of mode,
    file-type bits in mode and the unused tail of the block must be exactly as written (checksum fixed)."""
    stream = bytearray(_entry("d/f", b"0", b"abc"))
    block = bytearray(stream[1024:1536])
    block[offset : offset + len(value)] = value
    stream[1024:1536] = _fix(block)
    with pytest.raises(VerificationError):
        run(dest, F, bytes(stream) + END)


def test_directory_name_has_no_trailing_slash(dest: Path | None) -> None:
    expected = [InnerFile("home/u", None, "dir", mode=0o700)]
    run(dest, expected, _entry("home/u", b"5", mode=0o700) + END)
    with pytest.raises(VerificationError):
        run(dest, expected, _entry("home/u", b"5", mode=0o700, name=b"home/u/") + END)


def test_short_symlink_target_not_in_pax(dest: Path | None) -> None:
    expected = [InnerFile("l", None, "symlink")]
    run(dest, expected, _entry("l", b"2", link=b"t") + END)
    with pytest.raises(VerificationError, match="canonical"):
        run(dest, expected, _entry("l", b"2", records=[("path", b"l"), ("linkpath", b"t")]) + END)


def test_setuid_bit_stored_but_not_restored(tmp_path: Path) -> None:
    """mode keeps set-id and sticky bits in the archive; the extractor restores mode & 0o777."""
    src = tmp_path / "src"
    src.write_bytes(b"abc")
    os.chmod(src, 0o4755)
    f = InnerFile.from_path("f", src)
    stream = b"".join(tarwriter.write_archive([f]))
    assert stream[1024 + 100 : 1024 + 108] == b"0004755\0"
    out = tmp_path / "out"
    out.mkdir()
    run(out, [InnerFile("f", None, "file", 3, 3)], stream)
    assert (out / "f").stat().st_mode & 0o7777 == 0o755


def test_sparse_records_in_writer_order_only(dest: Path | None) -> None:
    size, data = 1 << 20, b"q" * 4096
    mapped = b"2\n0\n4096\n%d\n0\n" % size
    body = mapped + bytes(-len(mapped) % 512) + data
    recs = [("path", b"GNUSparseFile.0/s"), ("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.name", b"s"), ("GNU.sparse.realsize", b"%d" % size)]  # fmt: skip
    expected = [InnerFile("s", None, "file", size, 4096)]
    run(dest, expected, _entry("s", b"0", body, records=recs, name=b"GNUSparseFile.0/s") + END)
    swapped = [recs[0], recs[3], recs[1], recs[2], recs[4]]
    with pytest.raises(VerificationError, match="canonical"):
        run(dest, expected, _entry("s", b"0", body, records=swapped, name=b"GNUSparseFile.0/s") + END)
    with pytest.raises(VerificationError, match="canonical"):  # the ustar name is the GNUSparseFile.0 path
        run(dest, expected, _entry("s", b"0", body, records=recs, name=b"s") + END)


def test_zero_padding_after_end_marker_refused(dest: Path | None) -> None:
    with pytest.raises(VerificationError, match="after the end"):
        run(dest, F, _entry("d/f", b"0", b"abc") + END + bytes(512))


@pytest.mark.parametrize("seed", range(3))
def test_reader_canonical_form_is_the_writers(seed: int) -> None:
    """The reader's statement of the header format and the writer's agree (names with multibyte UTF-8
    cut at byte 100, big modes, every typeflag)."""
    import random

    rng = random.Random(seed)
    for _ in range(200):
        name = "".join(rng.choice(["a", "é", "€", "𝄞", "/"]) for _ in range(rng.randint(1, 80))).encode()
        args = (name, rng.choice([0o644, 0o4755, 0o7777, 0]), rng.randrange(8**11), rng.randrange(8**11),
                rng.choice([b"0", b"5", b"2", b"x"]), rng.choice([b"", b"t" * 100, "é".encode() * 50]))  # fmt: skip
        assert tarread._canonical_ustar(*args) == tarwriter._ustar(*args)


def test_touching_sparse_regions_refused(dest: Path | None) -> None:
    """Adjacent data is one region (FORMAT.md section 8): a map that splits it is not the canonical one."""
    size, data = 1 << 20, b"q" * 8192
    for nums, ok in (([2, 0, 8192, size, 0], True), ([3, 0, 4096, 4096, 4096, size, 0], False),
                     ([3, 0, 8192, size, 0, size, 0], False)):  # fmt: skip
        mapped = b"".join(b"%d\n" % n for n in nums)
        body = mapped + bytes(-len(mapped) % 512) + data
        recs = [("path", b"GNUSparseFile.0/s"), ("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0"),
                ("GNU.sparse.name", b"s"), ("GNU.sparse.realsize", b"%d" % size)]  # fmt: skip
        stream = _entry("s", b"0", body, records=recs, name=b"GNUSparseFile.0/s") + END
        expected = [InnerFile("s", None, "file", size, 8192)]
        if ok:
            run(None, expected, stream)
        else:
            with pytest.raises(VerificationError):
                run(dest, expected, stream)
