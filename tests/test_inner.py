"""Tests for the inner archive: sparse tar writer and strict extractor (FORMAT.md sections 7-8).

Why these tests: the writer must produce what GNU tar restores with holes (the emergency recipe depends on
it), and the extractor is a second line of defence, so each structural violation must be refused and
nothing may land outside the restore area.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qubes_backup_dom0.errors import BackupError, VerificationError
from qubes_backup_dom0.format import tarspec, tarwriter
from qubes_backup_dom0.format.extractor import Extractor
from qubes_backup_dom0.format.sparse import scan
from qubes_backup_dom0.format.tarwriter import InnerFile, archive_size, write_archive

MiB = 1024 * 1024
GiB = 1024 * MiB
TAR = shutil.which("tar")


# ------------------------------------------------------------------------------------------ helpers


def make_file(path: Path, size: int, writes: list[tuple[int, bytes]], mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        for off, data in writes:
            os.pwrite(fd, data, off)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    os.chmod(path, mode)


def region_bytes(path: Path, regions: list[tuple[int, int]]) -> list[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return [os.pread(fd, n, off) for off, n in regions]
    finally:
        os.close(fd)


def assert_same_file(orig: Path, restored: Path) -> None:
    """Byte-exact (region map equal, region bytes equal, everything else a hole) and similarly allocated."""
    so, sr = orig.stat(), restored.stat()
    assert sr.st_size == so.st_size
    size_o, map_o = scan(orig)
    size_r, map_r = scan(restored)
    assert size_r == size_o == so.st_size
    assert map_r == map_o
    assert region_bytes(restored, map_r) == region_bytes(orig, map_o)
    if so.st_size <= 4 * MiB:
        assert restored.read_bytes() == orig.read_bytes()
    assert abs(sr.st_blocks - so.st_blocks) <= 16, (sr.st_blocks, so.st_blocks)


def extract(dest: Path | None, expected: list, stream: bytes, pieces: random.Random | None = None) -> None:
    ex = Extractor(dest, expected)
    try:
        if pieces is None:
            ex.feed(stream)
        else:
            i = 0
            while i < len(stream):
                n = pieces.choice([1, 7, 511, 512, 513, 4096, 65536]) if pieces.random() < 0.7 else len(stream)
                ex.feed(memoryview(stream)[i : i + n])
                i += n
        ex.finish()
    finally:
        ex.close()


def only_children(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


# crafting hostile archives by hand (the writer refuses to produce them)


def hdr(name: str, typeflag: bytes, size: int, mode: int = 0o644, mtime: int = 0, link: bytes = b"") -> bytes:
    return tarwriter._ustar(name.encode(), mode, size, mtime, typeflag, link)


def pax(records: list[tuple[str, bytes]]) -> bytes:
    """A pax header named as the writer names it (DIR/PaxHeaders.0/BASENAME of the real path)."""
    body = b"".join(tarwriter._pax_record(k, v) for k, v in records)
    real = dict(records).get("GNU.sparse.name", dict(records).get("path", b"x")).decode("utf-8", "replace")
    d, _, b = real.rpartition("/")
    return hdr(f"{d + '/' if d else ''}PaxHeaders.0/{b}", b"x", len(body)) + body + bytes(-len(body) % 512)


def regular(path: str, data: bytes) -> bytes:
    return pax([("path", path.encode())]) + hdr(path, b"0", len(data)) + data + bytes(-len(data) % 512)


def sparse(path: str, realsize: int, map_nums: list[int], data: bytes) -> bytes:
    text = b"".join(b"%d\n" % n for n in map_nums)
    text += bytes(-len(text) % 512)
    name = tarspec.sparse_name(path)
    recs = [
        ("path", name.encode()),
        ("GNU.sparse.major", b"1"),
        ("GNU.sparse.minor", b"0"),
        ("GNU.sparse.name", path.encode()),
        ("GNU.sparse.realsize", b"%d" % realsize),
    ]
    body = text + data
    return pax(recs) + hdr(name, b"0", len(body)) + body + bytes(-len(body) % 512)


END = bytes(1024)


@pytest.fixture
def area(tmp_path: Path) -> tuple[Path, Path]:
    """A restore area plus an 'outside' directory that must stay untouched."""
    dest = tmp_path / "dest"
    outside = tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    return dest, outside


@pytest.fixture(params=["extract", "validate"])
def target(request: pytest.FixtureRequest, area: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """``(dest, outside)`` for extract mode, ``(None, outside)`` for validate-only mode.  In validate-only
    mode the working directory is the (empty) 'outside' directory, so a stray relative write would show up
    there, and the restore area must stay empty too."""
    dest, outside = area
    if request.param == "extract":
        yield dest, outside
        return
    monkeypatch.chdir(outside)
    yield None, outside
    assert only_children(outside) == set()
    assert only_children(dest) == set()


def fresh(dest: Path | None) -> Path | None:
    """Empty the restore area between two rejections in one test (no-op in validate-only mode)."""
    if dest is not None:
        shutil.rmtree(dest)
        dest.mkdir()
    return dest


# ------------------------------------------------------------------------------------------ scan


def test_scan_shapes(tmp_path: Path) -> None:
    p = tmp_path / "f"
    make_file(p, 0, [])
    assert scan(p) == (0, [])
    make_file(p, 10000, [(0, b"x" * 10000)])
    assert scan(p) == (10000, [(0, 10000)])
    make_file(p, 1 * MiB, [])
    assert scan(p) == (MiB, [])
    # adjacent writes merge; trailing hole; data at an unaligned end
    make_file(p, 1 * MiB + 10, [(4096, b"a" * 4096), (8192, b"b" * 4096), (MiB, b"c" * 10)])
    size, regions = scan(p)
    assert size == MiB + 10
    assert regions == [(4096, 8192), (MiB, 10)]


# ------------------------------------------------------------------------------------------ round trip

file_spec = st.tuples(
    st.one_of(st.integers(0, 3 * MiB), st.just(GiB)),
    st.lists(st.tuples(st.sampled_from(["start", "end", "any"]), st.integers(1, 70000)), max_size=5),
    st.integers(0, 2**32),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(file_spec, min_size=1, max_size=3), seed=st.integers(0, 2**32))
def test_round_trip(specs: list, seed: int) -> None:
    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        files = []
        for i, (size, writes, fseed) in enumerate(specs):
            rnd = random.Random(fseed)
            ws = []
            for where, n in writes:
                n = min(n, size)
                if not n:
                    continue
                off = {"start": 0, "end": size - n, "any": rnd.randrange(0, size - n + 1)}[where]
                ws.append((off, rnd.randbytes(n)))
            src = root / "src" / f"vm{i}" / f"disk{i}.img"
            make_file(src, size, ws, mode=0o640)
            files.append(InnerFile.from_path(f"appvms/vm{i}/disk{i}.img", src))
        stream = b"".join(write_archive(files, read_size=64 * 1024))
        assert len(stream) == archive_size(files)
        assert len(stream) % 512 == 0
        dest = root / "dest"
        dest.mkdir()
        extract(dest, files, stream, random.Random(seed))
        for f in files:
            assert f.source is not None
            out = dest / f.path
            assert_same_file(f.source, out)
            assert out.stat().st_mode & 0o777 == 0o640
            assert int(out.stat().st_mtime) == f.mtime


def test_archive_is_deterministic_and_sized(tmp_path: Path) -> None:
    src = tmp_path / "a.img"
    make_file(src, 5 * MiB, [(MiB, b"z" * 5000)])
    files = [InnerFile.from_path("a.img", src)]
    one = b"".join(write_archive(files))
    two = b"".join(write_archive(files, read_size=512))
    assert one == two
    assert len(one) == archive_size(files)


def test_round_trip_home_tree(tmp_path: Path) -> None:
    """Dirs, symlinks (short and > 100 bytes targets), long and non-ASCII paths, read-only dirs."""
    home = tmp_path / "src"
    (home / "user" / "ro").mkdir(parents=True)
    (home / "user" / ".bashrc").write_text("export X=1\n")
    long_dir = "d" * 90 + "/" + "é" * 40
    (home / "user" / long_dir).mkdir(parents=True)
    (home / "user" / long_dir / "f.txt").write_bytes(b"long path\n")
    (home / "user" / "link").symlink_to(".bashrc")
    (home / "user" / "longlink").symlink_to("/nonexistent/" + "t" * 150)
    (home / "user" / "ro" / "x").write_bytes(b"x")
    (home / "user" / "ro").chmod(0o555)
    names = ["user", "user/.bashrc", "user/ro", "user/ro/x", "user/" + "d" * 90, "user/" + long_dir,
             "user/" + long_dir + "/f.txt", "user/link", "user/longlink"]
    files = [InnerFile.from_path("home/" + n, home / n) for n in names]
    stream = b"".join(write_archive(files))
    assert len(stream) == archive_size(files)
    dest = tmp_path / "dest"
    dest.mkdir()
    extract(dest, files, stream, random.Random(1))
    out = dest / "home" / "user"
    assert (out / ".bashrc").read_text() == "export X=1\n"
    assert (out / long_dir / "f.txt").read_bytes() == b"long path\n"
    assert os.readlink(out / "link") == ".bashrc"
    assert os.readlink(out / "longlink") == "/nonexistent/" + "t" * 150
    assert (out / "ro").stat().st_mode & 0o777 == 0o555
    assert (out / "ro" / "x").read_bytes() == b"x"
    (home / "user" / "ro").chmod(0o755)
    (out / "ro").chmod(0o755)


# ------------------------------------------------------------------------------------------ GNU tar


def gnu_tar_fixture(src: Path) -> list[InnerFile]:
    specs = {
        "appvms/work/private.img": (GiB, [(0, b"S" * 5000), (MiB, b"m" * 70000)]),  # trailing hole
        "appvms/work/end.img": (8 * MiB, [(2 * MiB, b"e" * 100), (8 * MiB - 4096, b"E" * 4096)]),
        "appvms/work/holes-only.img": (20 * GiB, []),  # realsize beyond the 8 GiB ustar limit
        "appvms/work/dense.bin": (300000, [(0, random.Random(3).randbytes(300000))]),
        "appvms/work/empty": (0, []),
        "appvms/" + "w" * 120 + "/volatile.img": (3 * MiB, [(MiB, b"v" * 9000)]),
    }
    files = [InnerFile.from_path("appvms/work", _mkdir(src / "appvms/work"))]
    for path, (size, writes) in specs.items():
        make_file(src / path, size, writes, mode=0o600)
        files.append(InnerFile.from_path(path, src / path))
    return files


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.mark.skipif(TAR is None, reason="GNU tar not installed")
@pytest.mark.parametrize("flags", ["-xf", "-xSf"])
def test_gnu_tar_restores_with_holes(tmp_path: Path, flags: str) -> None:
    src = tmp_path / "src"
    files = gnu_tar_fixture(src)
    archive = tmp_path / "a.tar"
    with archive.open("wb") as out:
        for piece in write_archive(files):
            out.write(piece)
    listing = subprocess.run([TAR, "-tvf", str(archive)], check=True, capture_output=True, text=True)
    assert listing.stderr == ""
    listed = [line.split()[-1] for line in listing.stdout.splitlines()]
    assert listed == [f.path for f in files]
    assert " 21474836480 " in listing.stdout  # realsize shown for the 20 GiB all-hole file
    dest = tmp_path / "dest"
    dest.mkdir()
    r = subprocess.run([TAR, flags, str(archive), "-C", str(dest)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    for f in files[1:]:
        assert f.source is not None
        assert_same_file(f.source, dest / f.path)
        assert (dest / f.path).stat().st_mode & 0o777 == 0o600
    # and our own extractor agrees on the very same bytes
    ours = tmp_path / "ours"
    ours.mkdir()
    extract(ours, files, archive.read_bytes(), random.Random(5))
    for f in files[1:]:
        assert f.source is not None
        assert_same_file(f.source, ours / f.path)


@pytest.mark.skipif(TAR is None, reason="GNU tar not installed")
def test_extractor_rejects_gnu_tar_archive_with_unexpected_entry(tmp_path: Path, area: tuple[Path, Path]) -> None:
    dest, outside = area
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"aaa")
    (src / "evil").write_bytes(b"unexpected")
    archive = tmp_path / "g.tar"
    subprocess.run([TAR, "--format=posix", "-cf", str(archive), "-C", str(src), "a", "evil"], check=True)
    expected = [InnerFile("a", None, "file", 3, 3)]
    with pytest.raises(VerificationError):
        extract(dest, expected, archive.read_bytes())
    if dest is not None:
        assert not (dest / "evil").exists()
    assert only_children(outside) == set()


# ------------------------------------------------------------------------------------------ strictness


@pytest.fixture
def baseline(tmp_path: Path) -> tuple[list[InnerFile], bytes]:
    src = tmp_path / "bsrc"
    files = [InnerFile.from_path("d", _mkdir(src / "d"))]
    make_file(src / "d/s.img", 4 * MiB, [(MiB, b"s" * 8192)])
    make_file(src / "d/f", 1000, [(0, b"f" * 1000)])
    files += [InnerFile.from_path("d/s.img", src / "d/s.img"), InnerFile.from_path("d/f", src / "d/f")]
    return files, b"".join(write_archive(files))


def test_baseline_extracts(baseline: tuple[list[InnerFile], bytes], target: tuple[Path | None, Path]) -> None:
    files, stream = baseline
    dest, _ = target
    extract(dest, files, stream, random.Random(2))
    if dest is not None:
        assert (dest / "d/f").read_bytes() == b"f" * 1000


def _reject(dest: Path | None, outside: Path, expected: list, stream: bytes, match: str | None = None) -> None:
    with pytest.raises(VerificationError, match=match) as exc:
        extract(dest, expected, stream, random.Random(0))
    assert "\n" not in str(exc.value)
    assert only_children(outside) == set()


def test_wrong_order(baseline: tuple[list[InnerFile], bytes], target: tuple[Path | None, Path]) -> None:
    files, stream = baseline
    _reject(*target, [files[0], files[2], files[1]], stream, "expected")


def test_extra_entry(baseline: tuple[list[InnerFile], bytes], target: tuple[Path | None, Path]) -> None:
    files, stream = baseline
    _reject(*target, files[:2], stream, "extra")


def test_missing_entry(baseline: tuple[list[InnerFile], bytes], target: tuple[Path | None, Path]) -> None:
    files, stream = baseline
    _reject(*target, [*files, InnerFile("d/g", None, "file", 1, 1)], stream, "missing")


@pytest.mark.parametrize("cut", [1024, 1025, 3000, 512 * 7 + 100])
def test_truncated(baseline: tuple[list[InnerFile], bytes], target: tuple[Path | None, Path], cut: int) -> None:
    files, stream = baseline
    _reject(*target, files, stream[:-cut], "truncated")


def test_trailing_garbage(baseline: tuple[list[InnerFile], bytes], target: tuple[Path | None, Path]) -> None:
    files, stream = baseline
    _reject(*target, files, stream + b"\0" * 512, "after the end")


def test_header_checksum(baseline: tuple[list[InnerFile], bytes], target: tuple[Path | None, Path]) -> None:
    files, stream = baseline
    broken = bytearray(stream)
    broken[1024 + 5] ^= 0x01  # name field of the directory's ustar header (after pax hdr + pax data)
    _reject(*target, files, bytes(broken), "checksum")


def test_size_mismatch(baseline: tuple[list[InnerFile], bytes], target: tuple[Path | None, Path]) -> None:
    files, stream = baseline
    d, s, f = files
    _reject(*target, [d, s, InnerFile("d/f", None, "file", 999, 999)], stream, "size")
    dest, outside = target
    _reject(fresh(dest), outside, [d, InnerFile("d/s.img", None, "file", 4 * MiB, 4096), f], stream, "data bytes")
    _reject(fresh(dest), outside, [d, InnerFile("d/s.img", None, "file", 5 * MiB, 8192), f], stream, "size")


@pytest.mark.parametrize("path", ["../evil", "/tmp/evil", "a/../../evil", "a//b", "./a", "a\0b"])
def test_bad_expected_paths_refused(target: tuple[Path | None, Path], path: str) -> None:
    dest, _ = target
    with pytest.raises(VerificationError):
        Extractor(dest, [InnerFile(path, None, "file", 1, 1)])


@pytest.mark.parametrize("path", ["../evil", "/tmp/evil", "x/../../evil"])
def test_bad_archive_paths_refused(target: tuple[Path | None, Path], path: str) -> None:
    dest, outside = target
    _reject(dest, outside, [InnerFile("evil", None, "file", 4, 4)], regular(path, b"evil") + END)
    assert not (outside.parent / "evil").exists()
    if dest is not None:
        assert list(dest.iterdir()) == []


def test_write_archive_refuses_bad_paths(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(BackupError, match="component"):
        InnerFile.from_path("../f", tmp_path / "f")


@pytest.mark.parametrize(
    ("nums", "match"),
    [
        ([3, 8192, 4096, 4096, 4096, 1 * MiB, 0], "overlap"),  # overlapping
        ([2, 65536, 4096, 8192, 4096], "overlap"),  # unsorted
        ([1, 0, 8192, 4096, 0], "junk"),  # more numbers than announced
        ([2, 0, 4096, 2 * MiB, 4096], "beyond"),  # region past realsize
        ([2, 0, 4096, 512 * 1024, 4096], "end at the file size"),  # trailing hole without marker
        ([3, 0, 0, 4096, 8192, MiB, 0], "empty"),  # zero-length region in the middle
        ([0], "regions"),
        ([2_000_000], "regions"),
    ],
)
def test_bad_sparse_maps(target: tuple[Path | None, Path], nums: list[int], match: str) -> None:
    data = b"q" * 8192
    expected = [InnerFile("s.img", None, "file", MiB, 8192)]
    _reject(*target, expected, sparse("s.img", MiB, nums, data) + END, match)


def test_good_crafted_sparse_map_accepted(target: tuple[Path | None, Path]) -> None:
    """The crafting helper is right, so the rejections above are about the maps themselves."""
    dest, _ = target
    expected = [InnerFile("s.img", None, "file", MiB, 8192)]
    extract(dest, expected, sparse("s.img", MiB, [3, 0, 4096, 65536, 4096, MiB, 0], b"q" * 8192) + END)
    if dest is not None:
        assert scan(dest / "s.img") == (MiB, [(0, 4096), (65536, 4096)])


def test_oversized_pax_header(target: tuple[Path | None, Path]) -> None:
    big = "p/" * 20000 + "f"
    stream = pax([("path", big.encode()), ("path2", b"y" * 30000)]) + hdr("f", b"0", 0) + END
    _reject(*target, [InnerFile("f", None, "file", 0, 0)], stream, "pax header size")


@pytest.mark.parametrize("key", ["uid", "atime", "GNU.sparse.map", "hdrcharset"])
def test_unknown_pax_keys(target: tuple[Path | None, Path], key: str) -> None:
    stream = pax([("path", b"f"), (key, b"0")]) + hdr("f", b"0", 0) + END
    _reject(*target, [InnerFile("f", None, "file", 0, 0)], stream, "not allowed")


def test_entry_without_pax_and_wrong_type(target: tuple[Path | None, Path]) -> None:
    dest, outside = target
    _reject(dest, outside, [InnerFile("f", None, "file", 0, 0)], hdr("f", b"0", 0) + END, "without pax")
    stream = pax([("path", b"f")]) + hdr("f", b"5", 0) + END
    _reject(dest, outside, [InnerFile("f", None, "file", 0, 0)], stream, "type")
    stream = pax([("path", b"f")]) + hdr("f", b"1", 0, link=b"/etc/passwd") + END  # hard link
    _reject(dest, outside, [InnerFile("f", None, "file", 0, 0)], stream, "type")


def test_symlink_component_in_dest(area: tuple[Path, Path]) -> None:
    dest, outside = area
    (dest / "d").symlink_to(outside)
    _reject(dest, outside, [InnerFile("d/f", None, "file", 4, 4)], regular("d/f", b"evil") + END, "symlink")


def test_archived_symlink_never_followed(target: tuple[Path | None, Path]) -> None:
    dest, outside = target
    stream = (
        pax([("path", b"l")])
        + hdr("l", b"2", 0, link=str(outside).encode())
        + regular("l/f", b"evil")
        + END
    )
    expected = [InnerFile("l", None, "symlink"), InnerFile("l/f", None, "file", 4, 4)]
    _reject(dest, outside, expected, stream, "symlink")
    if dest is not None:
        assert os.readlink(dest / "l") == str(outside)


def test_entry_conflicts_within_archive(target: tuple[Path | None, Path]) -> None:
    """Conflicts between the archive's own entries are found lexically, so validate-only mode sees them too:
    an entry below an earlier file, and a file or symlink where an earlier entry needed a directory."""
    dest, outside = target
    stream = regular("f", b"a") + regular("f/g", b"b") + END
    expected = [InnerFile("f", None, "file", 1, 1), InnerFile("f/g", None, "file", 1, 1)]
    _reject(dest, outside, expected, stream, "not a directory")
    stream = regular("a/b", b"x") + regular("a", b"y") + END
    expected = [InnerFile("a/b", None, "file", 1, 1), InnerFile("a", None, "file", 1, 1)]
    _reject(fresh(dest), outside, expected, stream, "already exists")
    stream = regular("a/b", b"x") + pax([("path", b"a")]) + hdr("a", b"2", 0, link=b"x") + END
    expected = [InnerFile("a/b", None, "file", 1, 1), InnerFile("a", None, "symlink")]
    _reject(fresh(dest), outside, expected, stream, "already exists")
    # a directory entry after its implicitly created parent, and a sibling below it, are fine
    stream = regular("a/b", b"x") + pax([("path", b"a")]) + hdr("a", b"5", 0) + regular("a/c/d", b"z") + END
    expected = [InnerFile("a/b", None, "file", 1, 1), InnerFile("a", None, "dir")]
    expected.append(InnerFile("a/c/d", None, "file", 1, 1))
    extract(fresh(dest), expected, stream)


def test_pax_mtime_out_of_range(target: tuple[Path | None, Path]) -> None:
    """An mtime utime() cannot take is refused by the parser (before: OverflowError, extract mode only)."""
    for value in (b"%d" % 2**63, b"%d" % -(2**63 + 1), b"99999999999999999999"):
        stream = pax([("path", b"f"), ("mtime", value)]) + hdr("f", b"0", 0) + END
        _reject(*target, [InnerFile("f", None, "file", 0, 0)], stream, "mtime out of range")
    stream = pax([("path", b"f"), ("mtime", b"%d" % (2**62))]) + hdr("f", b"0", 0) + END
    extract(target[0], [InnerFile("f", None, "file", 0, 0)], stream)


def test_existing_file_not_overwritten(area: tuple[Path, Path]) -> None:
    dest, outside = area
    (dest / "f").symlink_to(outside / "target")
    _reject(dest, outside, [InnerFile("f", None, "file", 4, 4)], regular("f", b"evil") + END, "exists")


def test_nonzero_padding_rejected(target: tuple[Path | None, Path]) -> None:
    stream = bytearray(regular("f", b"abc") + END)
    stream[1536 + 3 + 10] = 1  # pax hdr, pax data, ustar hdr, then "abc"
    _reject(*target, [InnerFile("f", None, "file", 3, 3)], bytes(stream), "padding")


def test_failed_extractor_stays_failed(target: tuple[Path | None, Path]) -> None:
    dest, _ = target
    ex = Extractor(dest, [InnerFile("f", None, "file", 3, 3)])
    with pytest.raises(VerificationError):
        ex.feed(b"\xff" * 512)
    with pytest.raises(VerificationError):
        ex.feed(b"")
    with pytest.raises(VerificationError):
        ex.finish()


# ------------------------------------------------------------------------------------------ changing files


def test_file_shrinks_before_read(tmp_path: Path) -> None:
    p = tmp_path / "vm.img"
    make_file(p, 64 * 1024, [(0, b"a" * 65536)])
    files = [InnerFile.from_path("vm.img", p)]
    os.truncate(p, 1000)
    with pytest.raises(BackupError, match=r"vm\.img.*changed"):
        b"".join(write_archive(files))


def test_file_shrinks_during_read(tmp_path: Path) -> None:
    p = tmp_path / "vm.img"
    make_file(p, 64 * 1024, [(0, b"a" * 65536)])
    files = [InnerFile.from_path("vm.img", p)]
    gen = write_archive(files, read_size=4096)
    next(gen)  # headers
    next(gen)  # first data piece
    os.truncate(p, 8192)
    with pytest.raises(BackupError, match=r"vm\.img.*changed"):
        for _ in gen:
            pass


def test_file_holes_move(tmp_path: Path) -> None:
    p = tmp_path / "vm.img"
    make_file(p, MiB, [(0, b"a" * 4096)])
    files = [InnerFile.from_path("vm.img", p)]
    make_file(p, MiB, [(0, b"a" * 4096), (65536, b"b" * 4096)])
    with pytest.raises(BackupError, match=r"vm\.img.*changed"):
        b"".join(write_archive(files))


# ------------------------------------------------------------------------------------------ odd metadata


def test_out_of_range_mtime_uses_pax(tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"old")
    f = InnerFile.from_path("f", src)
    f.mtime = -5
    stream = b"".join(write_archive([f]))
    assert b" mtime=-5\n" in stream
    dest = tmp_path / "dest"
    dest.mkdir()
    extract(dest, [f], stream)
    assert (dest / "f").stat().st_mtime == -5


def test_huge_stored_size_uses_pax_size(tmp_path: Path) -> None:
    """Entries of >= 8 GiB stored data need a pax size; check the header path without 8 GiB of data."""
    big = 9 * GiB
    f = InnerFile("vm.img", None, "file", big, big, [(0, big)])
    head, data = tarwriter._plan(f)
    assert data == big
    assert b" size=%d\n" % big in head
    assert archive_size([f]) == len(head) + big + 1024
    dest = tmp_path / "dest"
    dest.mkdir()
    ex = Extractor(dest, [f])
    ex.feed(head)
    ex.feed(b"x" * 4096)  # accepted as the first data bytes
    ex.close()
    assert (dest / "vm.img").exists()
    wrong = InnerFile("vm.img", None, "file", big + 1, big + 1, [(0, big + 1)])
    (dest / "vm.img").unlink()
    ex = Extractor(dest, [wrong])
    with pytest.raises(VerificationError, match="size"):
        ex.feed(head)


# ------------------------------------------------------------------------------------------ validate-only mode

_FS_CALLS = ("open", "mkdir", "symlink", "pwrite", "write", "ftruncate", "truncate", "fchmod", "chmod", "utime",
             "rename", "replace", "unlink", "link")


def tree(root: Path) -> list[tuple[str, int, int, int]]:
    """Everything under ``root`` (path, mode, size, mtime_ns; symlinks not followed), for "nothing changed"."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st_ = os.lstat(os.path.join(dirpath, name))
            out.append((os.path.join(dirpath, name), st_.st_mode, st_.st_size, st_.st_mtime_ns))
    return sorted(out)


def validate_without_fs(expected: list, stream: bytes, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``extract(None, ...)`` with every os call that could open or change something made to fail loudly."""

    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("validate-only mode touched the filesystem")

    with monkeypatch.context() as m:
        for name in _FS_CALLS:
            m.setattr(os, name, forbidden)
        extract(None, expected, stream, random.Random(seed))


def test_validate_only_round_trip_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Valid archives (sparse > 8 GiB realsize, trailing holes, dense, empty, dirs, symlinks, long paths) pass
    validate-only mode, and nothing anywhere is created or changed: cwd stays empty, the sources' tree is
    unchanged, and no file-creating os call is made at all."""
    src = tmp_path / "src"
    files = gnu_tar_fixture(src)
    (src / "home").mkdir()
    (src / "home" / "rc").write_text("x=1\n")
    (src / "home" / "link").symlink_to("/nonexistent/" + "t" * 150)
    files += [InnerFile.from_path(n, src / n) for n in ("home", "home/rc", "home/link")]
    stream = b"".join(write_archive(files))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = tree(tmp_path)
    for seed in range(3):
        validate_without_fs(files, stream, seed, monkeypatch)
        ex = Extractor(None, files)  # also with one big feed and no sabotage
        ex.feed(stream)
        ex.finish()
    assert tree(tmp_path) == before
    assert only_children(cwd) == set()


def test_validate_only_huge_entry_header(monkeypatch: pytest.MonkeyPatch) -> None:
    big = 9 * GiB
    f = InnerFile("vm.img", None, "file", big, big, [(0, big)])
    head, _ = tarwriter._plan(f)
    ex = Extractor(None, [f])
    ex.feed(head)
    ex.feed(b"x" * 4096)
    with pytest.raises(VerificationError, match="truncated"):
        ex.finish()
    ex = Extractor(None, [InnerFile("vm.img", None, "file", big + 1, big + 1)])
    with pytest.raises(VerificationError, match="size"):
        ex.feed(head)


def _outcome(dest: Path | None, expected: list, stream: bytes) -> str:
    try:
        extract(dest, expected, stream, random.Random(7))
    except VerificationError as e:
        return f"VerificationError: {e}"
    return "ok"


def test_mutations_same_verdict_in_both_modes(
    baseline: tuple[list[InnerFile], bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Differential mutation test: corrupted archives (bit flips anywhere, overwritten header bytes,
    truncations, inserted and deleted blocks) get exactly the same verdict, down to the message, in
    validate-only mode as in extract mode; and the structural corruptions do fail in validate-only mode."""
    files, stream = baseline
    rnd = random.Random(20240611)
    header_ends = [512, 1024, 1536, 2048, 2560, 3072]  # the dir entry's and s.img's pax/ustar headers
    mutants: list[bytes] = []
    for _ in range(150):
        b = bytearray(stream)
        pos = rnd.randrange(len(b)) if rnd.random() < 0.5 else rnd.randrange(max(header_ends))
        b[pos] ^= 1 << rnd.randrange(8)
        mutants.append(bytes(b))
    for _ in range(40):
        b = bytearray(stream)
        pos = rnd.randrange(max(header_ends))
        b[pos] = rnd.choice(b"\x000179 /\n\xff")
        mutants.append(bytes(b))
    for _ in range(20):
        mutants.append(stream[: rnd.randrange(len(stream))])
    for _ in range(10):
        k = rnd.randrange(len(stream) // 512)
        mutants.append(stream[: k * 512] + stream[(k + 1) * 512 :])
        mutants.append(stream[: k * 512] + bytes(512) + stream[k * 512 :])
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    failed = 0
    for i, m in enumerate(mutants):
        dest = tmp_path / f"dest{i}"
        dest.mkdir()
        real = _outcome(dest, files, m)
        validated = _outcome(None, files, m)
        assert validated == real, (i, real, validated)
        failed += real != "ok"
    assert only_children(cwd) == set()
    assert failed > len(mutants) // 2
    # a flip inside the sparse map or a header is never silently accepted by validate-only mode
    for pos in (600, 1536 + 520, 3072 + 3):
        b = bytearray(stream)
        b[pos] ^= 0x10
        with pytest.raises(VerificationError):
            extract(None, files, bytes(b))


def test_write_archive_reuse_gives_the_same_stream(tmp_path: Path) -> None:
    """reuse=True (pieces are views of one buffer) yields the same bytes when each piece is used at once."""
    from qubes_backup_dom0.format.tarwriter import InnerFile

    img = tmp_path / "v.img"
    with open(img, "wb") as f:
        f.truncate(9 << 20)
        f.seek(1 << 20)
        f.write(os.urandom(5 << 20) + b"tail")
    fd = os.open(img, os.O_RDONLY)
    try:
        f1 = InnerFile.from_fd("appvms/x/private.img", fd, os.fstat(fd).st_size, "x")
        f1.fd = fd
        plain = b"".join(write_archive([f1]))
        reused = bytearray()
        for piece in write_archive([f1], read_size=1 << 20, reuse=True):
            reused += piece  # used before the next piece is asked for
    finally:
        os.close(fd)
    assert bytes(reused) == plain
