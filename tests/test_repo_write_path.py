"""The repository backup's write path, piece by piece: the ustar headers dom0 writes are the ones the agent
accepts, the batched block reader gives exactly the blocks the old one-block reader did (zeros where no data
region reaches, holes left out), and the probe that skips compressing random-looking plaintexts never skips
one that compresses well."""

from __future__ import annotations

import itertools
import os
import tarfile
from pathlib import Path

import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from qubes_backup_agent.outer_tar import member_header as agent_member_header
from qubes_backup_dom0.backup import repository as backup_repo
from qubes_backup_dom0.format import repo
from qubes_backup_dom0.format.outer import member_header
from qubes_backup_dom0.format.tarwriter import InnerFile


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uid, info.gid = size, 0o600, 0, 0, 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii", errors="strict")


@given(st.text(alphabet="abcdef0123456789-./_", min_size=1, max_size=100), st.integers(0, 8**11 - 1))
@settings(max_examples=200)
def test_member_header_is_tarfiles_and_the_agents(name: str, size: int) -> None:
    assert member_header(name, size) == _tarfile_header(name, size) == agent_member_header(name, size)


def _blocks_one_by_one(data: bytes, regions: list[tuple[int, int]], bs: int) -> dict[int, bytes]:
    """The reference: every block a region touches, the rest of it zeros."""
    out: dict[int, bytearray] = {}
    for off, length in regions:
        for pos in range(off, off + length):
            i = pos // bs
            block = out.setdefault(i, bytearray(min(bs, len(data) - i * bs)))
            block[pos - i * bs] = data[pos]
    return {i: bytes(b) for i, b in out.items()}


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_batches_read_what_the_regions_say(tmp_path_factory: object, data: st.DataObject) -> None:
    bs = 64 << 10
    size = data.draw(st.integers(1, 9 * bs + 1000))
    content = os.urandom(size)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, size), max_size=12))))
    regions = [(a, b - a) for a, b in zip(cuts[::2], cuts[1::2], strict=False) if b > a]
    path = Path(tmp_path_factory.mktemp("vol")) / "vol.img"  # type: ignore[attr-defined]
    path.write_bytes(content)
    f = InnerFile("vol.img", path, "file", size, sum(n for _, n in regions), regions)
    read, close = backup_repo._reader(f)
    got: dict[int, bytes] = {}
    try:
        old_batch = backup_repo.BATCH_BYTES
        backup_repo.BATCH_BYTES = data.draw(st.sampled_from([bs, 3 * bs, 4 << 20]))
        for batch in backup_repo.file_batches(f, bs):
            view = backup_repo.read_batch(read, batch)
            pos = 0
            for index, length, _reads in batch:
                got[index] = bytes(view[pos : pos + length])
                pos += length
    finally:
        backup_repo.BATCH_BYTES = old_batch
        close()
    assert got == _blocks_one_by_one(content, regions, bs)


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_readahead_advice_covers_exactly_what_a_batch_reads(data: st.DataObject) -> None:
    """The ranges dom0 asks the kernel to read ahead (POSIX_FADV_WILLNEED) are the batch's data runs, merged
    where they touch: every byte the batch reads, nothing else."""
    bs = 64 << 10
    size = data.draw(st.integers(1, 9 * bs + 1000))
    cuts = sorted(set(data.draw(st.lists(st.integers(0, size), max_size=12))))
    regions = [(a, b - a) for a, b in zip(cuts[::2], cuts[1::2], strict=False) if b > a]
    f = InnerFile("vol.img", None, "file", size, sum(n for _, n in regions), regions, fd=-1)
    advised: list[tuple[int, int]] = []
    original = os.posix_fadvise

    def record(fd: int, off: int, n: int, advice: int) -> None:
        assert fd == -1 and advice == os.POSIX_FADV_WILLNEED
        advised.append((off, n))

    old_batch = backup_repo.BATCH_BYTES
    try:
        os.posix_fadvise = record
        backup_repo.BATCH_BYTES = data.draw(st.sampled_from([bs, 3 * bs, 4 << 20]))
        for batch in backup_repo.file_batches(f, bs):
            advised.clear()
            backup_repo._advise(f, batch)
            wanted = {pos for _i, _l, reads in batch for off, _b, n in reads for pos in range(off, off + n)}
            got = [pos for off, n in advised for pos in range(off, off + n)]
            assert len(got) == len(set(got)) and set(got) == wanted
            assert all(a + n < b for (a, n), (b, _m) in itertools.pairwise(advised))  # merged, in order
    finally:
        os.posix_fadvise = original
        backup_repo.BATCH_BYTES = old_batch


def test_incompressible_probe_only_skips_what_does_not_compress() -> None:
    cctx = zstandard.ZstdCompressor(level=1)
    text = b"".join(b"line %d of a log file, nothing random in it\n" % i for i in range(8000))[: 256 << 10]
    assert not repo._incompressible(text)
    assert repo._incompressible(os.urandom(256 << 10))
    mixed = bytearray(text)
    mixed[10_000:74_000] = os.urandom(64_000)  # a random write into a text block: at most one sample hit
    assert not repo._incompressible(mixed)
    assert not repo._incompressible(os.urandom(64 << 10))  # small plaintexts are always tried
    # a skipped plaintext is stored as it is ("n"), one that compresses is stored compressed ("z")
    k = repo.RepoKeys(os.urandom(32), os.urandom(32), os.urandom(32), os.urandom(16))
    assert repo.seal(k, repo.DATA, os.urandom(256 << 10))[1][5:7] == b"d "
    assert repo.seal(k, repo.DATA, os.urandom(256 << 10))[1][7:8] == b"n"
    assert repo.seal(k, repo.DATA, text)[1][7:8] == b"z"
    assert len(cctx.compress(text)) < len(text) // 4
