"""Zero detection, committed-state readers per pool driver, restore order, and the volume import runner."""

from __future__ import annotations

import itertools
import os
import random
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qubes_backup_dom0.backup.plan import restore_order
from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.format import extractor, sparse, tarwriter
from qubes_backup_dom0.qubes import pools
from qubes_backup_dom0.qubes.interface import VolumeImport
from qubes_backup_dom0.qubes.qubesxml import Collection
from qubes_backup_dom0.qubes.system import System

G = sparse.ZERO_GRANULE
FAKES = Path(__file__).resolve().parent / "fakes"


def _file(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces:
            f.seek(off)
            f.write(data)
    return path


def _scan(path: Path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return sparse.scan_zeros(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _archive_roundtrip(tmp: Path, src: Path) -> bytes:
    """Write src as a volume entry (zero runs as holes), extract it, return the extracted bytes."""
    fd = os.open(src, os.O_RDONLY)
    try:
        f = tarwriter.InnerFile.from_fd("appvms/x/private.img", fd, os.fstat(fd).st_size, "volume x")
        f.fd = fd
        stream = b"".join(tarwriter.write_archive([f]))
    finally:
        os.close(fd)
    dest = tmp / "out"
    dest.mkdir()
    with extractor.Extractor(dest, [f]) as ex:
        ex.feed(stream)
        ex.finish()
    return (dest / "appvms/x/private.img").read_bytes()


def test_zero_runs_inside_data_become_holes(tmp_path: Path) -> None:
    rnd = random.Random(1)
    a, b = rnd.randbytes(G + 100), rnd.randbytes(10)
    # written zeros (no hole in the file) from G+100 to 5G; data again at 5G+7 (mid-granule); real hole after
    src = _file(tmp_path / "img", 64 * G, [(0, a), (G + 100, bytes(4 * G - 100)), (5 * G + 7, b)])
    regions = _scan(src)
    assert regions[0] == (0, 2 * G) and len(regions) == 2
    off, n = regions[1]  # the SEEK_DATA region (a filesystem block or more) around b, within its granule
    assert off <= 5 * G + 7 and 5 * G + 17 <= off + n <= 6 * G
    assert _archive_roundtrip(tmp_path, src) == src.read_bytes()


def test_all_zero_and_empty_and_unaligned_tail(tmp_path: Path) -> None:
    assert _scan(_file(tmp_path / "z", 3 * G, [(0, bytes(3 * G))])) == []
    assert _scan(_file(tmp_path / "e", 0, [])) == []
    tail = _file(tmp_path / "t", 2 * G + 5, [(2 * G + 4, b"x")])
    (off, n), = _scan(tail)
    assert 2 * G <= off <= 2 * G + 4 and off + n == 2 * G + 5
    assert _archive_roundtrip(tmp_path, tail) == tail.read_bytes()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40 * G), st.binary(min_size=1, max_size=3 * G)), max_size=6))
def test_zero_detection_byte_exact(tmp_path_factory: pytest.TempPathFactory, pieces: list[tuple[int, bytes]]) -> None:
    tmp = tmp_path_factory.mktemp("z")
    src = _file(tmp / "img", 44 * G + 123, pieces)
    regions = _scan(src)
    data = src.read_bytes()
    for (o1, n1), (o2, _) in itertools.pairwise(regions):
        assert o1 + n1 < o2  # merged, sorted
    covered = bytearray(len(data))
    for off, n in regions:
        covered[off : off + n] = data[off : off + n]
    assert bytes(covered) == data  # everything outside the regions is zero
    assert _archive_roundtrip(tmp, src) == data


def test_from_bytes_entry(tmp_path: Path) -> None:
    f = tarwriter.InnerFile.from_bytes("appvms/x/notes.txt", b"hello\n")
    g = tarwriter.InnerFile.from_bytes("appvms/x/empty", b"")
    stream = b"".join(tarwriter.write_archive([f, g]))
    (tmp_path / "o").mkdir()
    with extractor.Extractor(tmp_path / "o", [f, g]) as ex:
        ex.feed(stream)
        ex.finish()
    assert (tmp_path / "o/appvms/x/notes.txt").read_bytes() == b"hello\n"
    assert (tmp_path / "o/appvms/x/empty").read_bytes() == b""


# -- readers ------------------------------------------------------------------------------------------

def _system(tmp: Path) -> System:
    return System(None, Path("/"), "user", lvm_override=f"{sys.executable} {FAKES / 'lvm.py'} {tmp / 'dev'}",
                  dev_dir_override=str(tmp / "dev"))  # fmt: skip


def _ref(driver: str, vid: str, state: str = "Running", **info: str) -> pools.VolumeRef:
    return pools.VolumeRef("vm1", state, "private", "p", vid, {"driver": driver, **info})


def test_reflink_reader_reads_clean_image_leaves_nothing(tmp_path: Path) -> None:
    d = tmp_path / "pool/appvms/vm1"
    d.mkdir(parents=True)
    _file(d / "private.img", 3 * G, [(0, b"clean")])
    _file(d / "private-dirty.img", 3 * G, [(0, b"dirty")])
    ref = _ref("file-reflink", "appvms/vm1/private", dir_path=str(tmp_path / "pool"))
    with pools.committed(_system(tmp_path), ref) as c:
        assert os.pread(c.fd, 5, 0) == b"clean" and c.size == 3 * G
    assert sorted(p.name for p in d.iterdir()) == ["private-dirty.img", "private.img"]  # no clone left


def test_reflink_identity_changes_when_image_replaced(tmp_path: Path) -> None:
    d = tmp_path / "pool/appvms/vm1"
    d.mkdir(parents=True)
    _file(d / "private.img", G, [(0, b"a")])
    ref = _ref("file-reflink", "appvms/vm1/private", dir_path=str(tmp_path / "pool"))
    with pools.committed(_system(tmp_path), ref) as c:
        first = c.identity
    _file(d / "new.img", G, [(0, b"b")])
    os.replace(d / "new.img", d / "private.img")  # what qubesd does when the VM stops
    with pools.committed(_system(tmp_path), ref) as c:
        assert c.identity != first


def test_file_pool_only_when_halted(tmp_path: Path) -> None:
    (tmp_path / "pool/appvms/vm1").mkdir(parents=True)
    _file(tmp_path / "pool/appvms/vm1/private.img", G, [(0, b"x")])
    with pytest.raises(BackupError, match=r"vm1: volume 'private' is in pool 'p' \(driver file\).*halted"):
        pools.committed(_system(tmp_path), _ref("file", "appvms/vm1/private", dir_path=str(tmp_path / "pool")))
    ref = _ref("file", "appvms/vm1/private", "Halted", dir_path=str(tmp_path / "pool"))
    with pools.committed(_system(tmp_path), ref) as c:
        assert os.pread(c.fd, 1, 0) == b"x"


@pytest.mark.parametrize("vid", ["../etc/passwd", "/abs/x", "a/../../b", ""])
def test_file_pool_unsafe_vid(tmp_path: Path, vid: str) -> None:
    with pytest.raises(BackupError), pools.committed(_system(tmp_path), _ref("file-reflink", vid, dir_path="/x")):
        pass


def test_lvm_snapshot_removed_on_exception(tmp_path: Path) -> None:
    vg = tmp_path / "dev/vg0"
    vg.mkdir(parents=True)
    _file(vg / "vm-vm1-private", 2 * G, [(G, b"data")])
    ref = _ref("lvm_thin", "vg0/vm-vm1-private", volume_group="vg0")
    with pytest.raises(RuntimeError), pools.committed(_system(tmp_path), ref) as c:
        assert os.pread(c.fd, 4, G) == b"data"
        assert len(list(vg.iterdir())) == 3  # origin, snapshot, .tags
        raise RuntimeError("boom")
    assert sorted(p.name for p in vg.iterdir() if p.is_file()) == ["vm-vm1-private"]


@pytest.mark.parametrize("vid", ["vg0", "vg0/", "other/vm-x-private", "vg0/-x", "vg0/a b"])
def test_lvm_bad_vid(tmp_path: Path, vid: str) -> None:
    with pytest.raises(BackupError), pools.committed(_system(tmp_path), _ref("lvm_thin", vid, volume_group="vg0")):
        pass


def test_lvm_argv_several_words_and_missing_command(tmp_path: Path) -> None:
    system = System(None, Path("/"), "user", lvm_override="/nonexistent/lvm --config x")
    assert system.lvm_argv == ["/nonexistent/lvm", "--config", "x"]
    with pytest.raises(BackupError, match="cannot run /nonexistent/lvm"):
        pools.remove_leftover_snapshots(system)


# -- restore order ------------------------------------------------------------------------------------

ORDER_XML = b"""<qubes><labels/><pools/><properties>
<property name="default_netvm">sys-firewall</property><property name="default_template">fedora</property>
<property name="default_dispvm">fedora-dvm</property></properties><domains>
<domain id="domain-1" class="AppVM"><properties><property name="name">aaa-work</property><property name="qid">1</property></properties></domain>
<domain id="domain-2" class="AppVM"><properties><property name="name">sys-firewall</property><property name="qid">2</property><property name="netvm">sys-net</property></properties></domain>
<domain id="domain-3" class="AppVM"><properties><property name="name">sys-net</property><property name="qid">3</property><property name="netvm"></property></properties></domain>
<domain id="domain-4" class="AppVM"><properties><property name="name">fedora-dvm</property><property name="qid">4</property><property name="template_for_dispvms">True</property></properties></domain>
<domain id="domain-5" class="TemplateVM"><properties><property name="name">fedora</property><property name="qid">5</property></properties></domain>
<domain id="domain-6" class="StandaloneVM"><properties><property name="name">alone</property><property name="qid">6</property><property name="netvm"></property><property name="default_dispvm"></property></properties></domain>
</domains></qubes>"""  # noqa: E501


def test_restore_order_counts_implied_defaults() -> None:
    col = Collection.from_bytes(ORDER_XML)
    order = [d.name for d in restore_order(col, [d for d in col.domains if d.name != "dom0"])]
    # fedora (template) first; its implied default_dispvm fedora-dvm is based on it (ignored);
    # fedora-dvm needs sys-firewall (implied netvm) which needs sys-net; their implied default_dispvm
    # fedora-dvm depends on them through netvm (ignored); aaa-work and alone last, by name
    assert order == ["fedora", "sys-net", "sys-firewall", "fedora-dvm", "aaa-work", "alone"]
    pos = {n: i for i, n in enumerate(order)}
    for d in col.domains:
        for dep in (col.effective_template(d), col.effective_netvm(d)):
            if dep:
                assert pos[dep] < pos[d.name]
        dvm = col.effective_default_dispvm(d)
        if d.name in ("aaa-work", "alone") and dvm:
            assert pos[dvm] < pos[d.name]


# -- volume import ------------------------------------------------------------------------------------

def _import_env(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> System:
    rpc = tmp / "rpc"
    rpc.mkdir()
    (rpc / "admin.vm.volume.ImportWithSize").write_text((FAKES / "import_service.py").read_text())
    monkeypatch.setenv("FAKE_IMPORT_DIR", str(tmp))
    return System(None, Path("/"), "user", rpc_dir_override=str(rpc))


def test_volume_import_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = _import_env(tmp_path, monkeypatch)
    imp = VolumeImport(system, "vm1", "private", 3 * G + 3, "/nonexistent.sock")
    imp.write(b"abc")
    imp.write_zeros(3 * G)
    imp.finish()
    assert (tmp_path / "vm1/private.img").read_bytes() == b"abc" + bytes(3 * G)
    assert (tmp_path / "import.log").read_text() == f"vm1 private {3 * G + 3}\n"
    imp.abort()  # idempotent


@pytest.mark.parametrize("mode", ["", ":stop"])
def test_volume_import_failure_names_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    system = _import_env(tmp_path, monkeypatch)
    monkeypatch.setenv("FAKE_IMPORT_FAIL", f"vm1/private{mode}")
    imp = VolumeImport(system, "vm1", "private", 64 * G, "/x.sock")
    with pytest.raises(BackupError, match="volume 'private' of vm1"):
        for _ in range(64):
            imp.write(bytes(G))
        imp.finish()
    imp.abort()


def test_volume_import_size_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = _import_env(tmp_path, monkeypatch)
    imp = VolumeImport(system, "vm1", "private", 10, "/x.sock")
    imp.write(b"12345")
    with pytest.raises(BackupError, match="5 of 10 bytes"):
        imp.finish()
    with pytest.raises(BackupError, match="more than"):
        VolumeImport(system, "vm1", "private", 1, "/x.sock").write(b"12")
    assert not (tmp_path / "vm1").exists()


def test_scan_zeros_parallel_matches_serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large regions are scanned by several threads; the runs (merged across the parts) are the serial ones."""
    rnd = random.Random(7)
    pieces = [(rnd.randrange(0, 40 << 20) // G * G + rnd.randrange(G), os.urandom(rnd.randrange(1, 3 * G)))
              for _ in range(60)]  # fmt: skip
    pieces.append(((20 << 20) - 5, os.urandom(4 * G)))  # data across a part boundary
    src = _file(tmp_path / "v.img", 48 << 20, pieces)
    with open(src, "r+b") as f:  # dense: written zeros between the data, no holes for SEEK_DATA to skip
        data = bytearray(f.read())
        f.seek(0)
        f.write(data)
    serial = _scan(src)
    monkeypatch.setattr(sparse, "SCAN_PARALLEL_MIN", 1 << 20)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert _scan(src) == serial
    assert sum(n for _, n in serial) < 48 << 20


def test_blockdev_model_reads_holes_as_zeros(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QUBES_SIM_BLOCKDEV=1 (simulation only) skips SEEK_DATA: holes are read and found zero, same result."""
    src = _file(tmp_path / "v.img", 16 << 20, [(3 * G + 5, b"x" * 100), ((8 << 20), os.urandom(G))])
    expected = _scan(src)
    calls: list[int] = []
    real = sparse.scan_fd
    monkeypatch.setattr(sparse, "scan_fd", lambda fd, size: calls.append(size) or real(fd, size))
    monkeypatch.setenv("QUBES_SIM_BLOCKDEV", "1")
    monkeypatch.delenv("QUBES_SIM", raising=False)
    assert _scan(src) == expected and calls  # not in simulation: the variable is ignored
    calls.clear()
    monkeypatch.setenv("QUBES_SIM", str(tmp_path))
    # every byte read: whole granules where the data is (SEEK_DATA's map is block-granular, finer)
    assert _scan(src) == [(3 * G, G), (8 << 20, G)] and not calls


def test_buffer_pool_and_chunker_copy_borrowed_input() -> None:
    """Without compression the chunks are pooled buffers filled by copying: a reused input buffer can be
    overwritten right after feed() without changing a chunk; buffers given back are handed out again."""
    from qubes_backup_dom0.format.chunking import BufferPool, Chunker

    pool = BufferPool(1 << 16, keep=2)
    chunker = Chunker("none", 1 << 16, pool=pool)
    buf = bytearray(40_000)
    chunks = []
    for i in range(5):
        buf[:] = bytes([i]) * len(buf)
        chunks += [bytes(c) for c in chunker.feed(memoryview(buf))]
    chunks += [bytes(c) for c in chunker.finish()]
    assert b"".join(chunks) == b"".join(bytes([i]) * 40_000 for i in range(5))
    assert [len(c) for c in chunks] == [1 << 16] * 3 + [200_000 - 3 * (1 << 16)]
    a = pool.get()
    pool.put(memoryview(a)[:10])
    assert pool.get() is a
    pool.put(bytearray(5))  # not one of its size: ignored
    pool.put(b"x" * (1 << 16))  # bytes: ignored
    assert len(pool.get()) == 1 << 16



def _zstd_frames(stream: bytes) -> list[bytes]:
    """The decoded content of each frame of a zstd stream, one by one."""
    import zstandard

    out = []
    while stream:
        d = zstandard.ZstdDecompressor().decompressobj()
        out.append(d.decompress(stream))
        stream = d.unused_data
    return out


def test_chunker_zstd_frames_in_order_and_read_in_place() -> None:
    """zstd: independent frames of fixed blocks, compressed on a thread pool, joined in order and cut into
    chunks of exactly chunk_size; the joined chunks decode as one stream (our reader and stock zstd -dc).
    Data read into space() and fed back is taken in place; other input is copied."""
    import io
    import random
    import shutil
    import subprocess

    from qubes_backup_dom0.format.chunking import BufferPool, Chunker, ZstdPool, decompressed_reader

    rnd = random.Random(7)
    text = b"".join(b"line %d of some text\n" % i for i in range(20_000))
    data = (rnd.randbytes(300_000) + text) * 3
    block, chunk = 1 << 16, 50_000
    with ZstdPool(threads=2, block=block) as zp:
        for in_place in (False, True):
            chunker = Chunker("zstd", chunk, pool=BufferPool(chunk, keep=4), zstd_pool=zp)
            chunks: list[bytes] = []
            pos = 0
            while pos < len(data):
                if in_place:
                    room = chunker.space()
                    n = min(len(room), 70_001, len(data) - pos)
                    room[:n] = data[pos : pos + n]
                    piece: bytes | memoryview = room[:n]
                else:
                    piece = data[pos : pos + 70_001]
                pos += len(piece)
                chunks += [bytes(c) for c in chunker.feed(piece)]
            chunks += [bytes(c) for c in chunker.finish()]
            assert all(len(c) == chunk for c in chunks[:-1]) and 0 < len(chunks[-1]) <= chunk
            stream = b"".join(chunks)
            frames = _zstd_frames(stream)
            assert [len(f) for f in frames[:-1]] == [block] * (len(frames) - 1)
            assert b"".join(frames) == data and len(frames) == -(-len(data) // block)
            reader = decompressed_reader("zstd", io.BytesIO(stream))
            got = b""
            while piece := reader.read(1 << 20):
                got += piece
            assert got == data
            if shutil.which("zstd"):
                out = subprocess.run(["zstd", "-dc"], input=stream, capture_output=True, check=True).stdout
                assert out == data


def test_chunker_none_reads_in_place() -> None:
    """Without compression, data read into space() becomes the chunk itself (no copy); headers fed in
    between are copied; chunks are exactly chunk_size."""
    from qubes_backup_dom0.format.chunking import BufferPool, Chunker

    pool = BufferPool(1000, keep=4)
    chunker = Chunker("none", 1000, pool=pool)
    expected = b""
    chunks: list[bytes] = []
    for i in range(7):
        room = chunker.space()
        first = room.obj
        n = min(len(room), 333)
        room[:n] = bytes([i]) * n
        out = list(chunker.feed(room[:n]))
        if out:
            assert out[0].obj is first  # the very buffer read into
        chunks += [bytes(c) for c in out]
        chunks += [bytes(c) for c in chunker.feed(b"hd")]
        expected += bytes([i]) * n + b"hd"
    chunks += [bytes(c) for c in chunker.finish()]
    assert b"".join(chunks) == expected
    assert all(len(c) == 1000 for c in chunks[:-1])
