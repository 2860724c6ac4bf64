"""The thin LV allocation map (dom0/qubes_backup_dom0/qubes/thinmap.py): the parser against the real ``thin_dump``'s
XML, strict fallbacks, the metadata snapshot always released, and a backup under ``QUBES_SIM_BLOCKDEV=1`` that
reads only the provisioned part of a mostly unallocated LV and restores byte-exact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BIN, KDF, VM_BACKUPS, Sim, new_sim
from qubes_backup_dom0.backup import plan as backup_plan
from qubes_backup_dom0.format import sparse
from qubes_backup_dom0.qubes import thinmap
from qubes_backup_dom0.qubes.qubesxml import Collection
from qubes_backup_dom0.qubes.system import System
from qubes_backup_sim import thintools
from qubes_backup_sim.lvstore import LvStore
from qubes_backup_sim.storage import set_volume_attr
from qubes_backup_sim.store import write_atomic

THIN_DUMP = shutil.which("thin_dump") or ("/usr/sbin/thin_dump" if os.path.exists("/usr/sbin/thin_dump") else None)
THIN_RESTORE = shutil.which("thin_restore") or "/usr/sbin/thin_restore"
needs_tools = pytest.mark.skipif(
    THIN_DUMP is None and not os.environ.get("CI"),
    reason="thin-provisioning-tools not installed (.ci/run installs it; in CI this test must run)",
)
BS = 128 * 512  # data_block_size="128" sectors: 64 KiB, Qubes' default chunk

SOURCE_XML = """<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="4096">
  <device dev_id="1" mapped_blocks="6" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="3" time="0"/>
    <single_mapping origin_block="3" data_block="40" time="1"/>
    <single_mapping origin_block="10" data_block="7" time="1"/>
    <single_mapping origin_block="4095" data_block="9" time="1"/>
  </device>
  <device dev_id="7" mapped_blocks="1" transaction="0" creation_time="0" snap_time="1">
    <single_mapping origin_block="1" data_block="20" time="1"/>
  </device>
</superblock>
"""


@needs_tools
def test_parser_reads_the_real_thin_dump(tmp_path: Path) -> None:
    (tmp_path / "in.xml").write_text(SOURCE_XML)
    meta = tmp_path / "meta.bin"
    meta.write_bytes(bytes(8 << 20))
    subprocess.run([THIN_RESTORE, "-i", str(tmp_path / "in.xml"), "-o", str(meta)], check=True, capture_output=True)
    assert THIN_DUMP is not None

    def dump(dev_id: int) -> bytes:
        argv = [THIN_DUMP, "--dev-id", str(dev_id), "--format", "xml", str(meta)]
        return subprocess.run(argv, check=True, capture_output=True).stdout

    size = 4096 * BS
    # adjacent range and single mappings merge; the last block is the LV's last
    assert thinmap.parse(dump(1), 1, size) == [(0, 4 * BS), (10 * BS, BS), (4095 * BS, BS)]
    assert thinmap.parse(dump(7), 7, size) == [(BS, BS)]
    assert thinmap.parse(dump(1), 1, 4095 * BS + 100) == [(0, 4 * BS), (10 * BS, BS), (4095 * BS, 100)]
    assert thinmap.parse(dump(1), 1, 4095 * BS) is None  # a block beyond the LV: not this LV's map
    assert thinmap.parse(dump(99), 99, size) is None  # thin_dump prints no device: never "all unallocated"
    assert thinmap.parse(dump(1), 7, size) is None


GOOD = (b'<superblock data_block_size="128"><device dev_id="3" mapped_blocks="2">'
        b'<range_mapping origin_begin="2" data_begin="0" length="2" time="0"/></device></superblock>')  # fmt: skip


@pytest.mark.parametrize(
    "xml",
    [
        GOOD.replace(b'mapped_blocks="2"', b'mapped_blocks="3"'),  # mapped_blocks not the sum
        GOOD.replace(b'data_block_size="128"', b'data_block_size="3"'),  # not a multiple of 4 KiB
        GOOD.replace(b'data_block_size="128"', b""),  # unknown block size
        GOOD.replace(b'length="2"', b'length="0"'),
        GOOD.replace(b'length="2"', b'length="-2"'),
        GOOD.replace(b'origin_begin="2"', b'origin_begin="99"'),  # beyond the LV
        GOOD.replace(b"</device>", b'<single_mapping origin_block="3" data_block="1" time="0"/></device>'),
        GOOD.replace(b"<range_mapping", b"<weird_mapping"),
        GOOD.replace(b"</device>", b'<single_mapping origin_block="0" data_block="1" time="0"/></device>'),  # order
        GOOD.replace(b"time=\"0\"/>", b'time="0"><single_mapping origin_block="9" data_block="1" time="0"/>'
                     b"</range_mapping>"),  # nested
        GOOD.replace(b"<superblock", b"<superblock><superblock").replace(b"</superblock>", b"</superblock>" * 2),
        GOOD.replace(b'dev_id="3"', b'dev_id="4"'),  # device missing
        GOOD.replace(b"</superblock>", b'<device dev_id="3" mapped_blocks="0"></device></superblock>'),  # twice
        b'<!DOCTYPE x [<!ENTITY a "1">]>' + GOOD,
        GOOD[:-5],  # truncated
        b"",
    ],
)
def test_malformed_or_mismatched_dumps_give_no_map(xml: bytes) -> None:
    assert thinmap.parse(GOOD, 3, 10 * BS) == [(2 * BS, 2 * BS)]
    assert thinmap.parse(xml, 3, 10 * BS) is None


def test_parser_fed_in_pieces() -> None:
    """The dump is streamed: any cut of the XML gives the same map (a comment split across pieces too)."""
    xml = SOURCE_XML.encode()
    whole = thinmap.parse(xml, 1, 4096 * BS)
    assert whole == [(0, 4 * BS), (10 * BS, BS), (4095 * BS, BS)]
    for step in (1, 7, 64):
        parser = thinmap.MapParser(1, 4096 * BS)
        assert all(parser.feed(xml[i : i + step]) for i in range(0, len(xml), step))
        assert parser.finish() == whole
    sneaky = xml.replace(b"</device>", b"<!-- x --></device>", 1)
    parser = thinmap.MapParser(1, 4096 * BS)
    for i in range(0, len(sneaky), 1):
        parser.feed(sneaky[i : i + 1])
    assert parser.finish() is None


def test_dm_names_double_dashes() -> None:
    assert thinmap.dm_name("qubes_dom0", "pool00") == "qubes_dom0-pool00"
    assert thinmap.dm_name("my-vg", "vm-pool") == "my--vg-vm--pool"
    assert thintools._undm("my--vg-vm--pool-tpool") == ["my-vg", "vm-pool", "tpool"]


# -- the sim stand-ins and the metadata snapshot ------------------------------------------------------------


@pytest.fixture
def lvs(tmp_path: Path) -> tuple[System, LvStore]:
    sim = new_sim(tmp_path / "sim", keep=["work"])
    store = LvStore(sim.dom0 / "dev")
    return sim.system, store


def _snap_reserved(store: LvStore) -> bool:
    return (store.devdir / "qubes_dom0/.lvm/vm-pool.metasnap").exists()


def _write_lv(store: LvStore, name: str, size: int, pieces: list[tuple[int, bytes]]) -> None:
    path = store.path("qubes_dom0", name)
    tmp = path.with_name(name + ".new")
    with open(tmp, "wb") as f:
        f.truncate(size)
        for off, data in pieces:
            f.seek(off)
            f.write(data)
    os.replace(tmp, path)


def test_sim_map_of_an_lv(lvs: tuple[System, LvStore]) -> None:
    system, store = lvs
    _write_lv(store, "vm-work-private", 64 * BS, [(5, b"x"), (10 * BS + 7, os.urandom(2 * BS))])
    # the map of a sim LV is its data blocks in 64 KiB chunks; the reservation is gone afterwards
    assert thinmap.provisioned(system, "qubes_dom0", "vm-work-private", 64 * BS) == [(0, BS), (10 * BS, 3 * BS)]
    assert not _snap_reserved(store)


@pytest.mark.parametrize("fail", ["reserve", "dump", "mismatch", "busy"])
def test_map_failures_fall_back_and_release(
    lvs: tuple[System, LvStore], monkeypatch: pytest.MonkeyPatch, fail: str
) -> None:
    system, store = lvs
    log = store.devdir / "thintools.log"
    if fail == "busy":  # another tool holds the pool's metadata snapshot: EBUSY, and it stays theirs
        (store.devdir / "qubes_dom0/.lvm/vm-pool.metasnap").touch()
    else:
        monkeypatch.setenv("QUBES_SIM_THIN_FAIL", fail)
    assert thinmap.provisioned(system, "qubes_dom0", "vm-work-private", 16 << 20) is None
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert _snap_reserved(store) == (fail == "busy")
    words = [c[-1] for c in calls if c[0] == "dmsetup"]
    # released whenever it was reserved, also when the dump failed
    assert words == (["reserve_metadata_snap"] if fail in ("reserve", "busy") else
                     ["reserve_metadata_snap", "release_metadata_snap"])  # fmt: skip


def test_release_failure_is_a_warning(lvs: tuple[System, LvStore], monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    system, store = lvs
    monkeypatch.setenv("QUBES_SIM_THIN_FAIL", "release")
    assert thinmap.provisioned(system, "qubes_dom0", "vm-work-private", 16 << 20) is not None
    assert "warning: cannot release the metadata snapshot of thin pool qubes_dom0/vm-pool" in capsys.readouterr().err
    assert _snap_reserved(store)  # what the warning is about: the pool still holds it


def test_missing_tools_or_old_lvm_fall_back(lvs: tuple[System, LvStore]) -> None:
    system, _ = lvs
    missing = System(system.sim_dir, system.dom0_root, "user", dmsetup_override="/nonexistent/dmsetup")
    assert thinmap.provisioned(missing, "qubes_dom0", "vm-work-private", 16 << 20) is None
    old_lvm = System(system.sim_dir, system.dom0_root, "user", lvm_override=f"{sys.executable} -c exit(3)")
    assert thinmap.provisioned(old_lvm, "qubes_dom0", "vm-work-private", 16 << 20) is None


# -- a backup of a mostly unallocated LV read as a block device -----------------------------------------------


def _big_sparse_work(tmp_path: Path) -> tuple[Sim, bytes]:
    sim = new_sim(tmp_path / "sim", keep=["work", "fedora-41", "backupvm"])
    store = LvStore(sim.dom0 / "dev")
    size = 512 << 20
    _write_lv(store, "vm-work-private", size, [(3 * BS + 11, os.urandom(3 * BS)), (300 << 20, os.urandom(BS)),
                                               (size - 100, b"end" * 33)])  # fmt: skip
    coll = Collection.load(sim.qubes_xml)
    dom = coll.get("work")
    assert dom is not None
    set_volume_attr(dom, "private", "size", str(size))
    write_atomic(coll, sim.qubes_xml)
    return sim, store.path("qubes_dom0", "vm-work-private").read_bytes()


@pytest.mark.parametrize("mapped", [True, False])
def test_blockdev_backup_reads_only_the_mapped_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mapped: bool
) -> None:
    sim, original = _big_sparse_work(tmp_path)
    monkeypatch.setenv("QUBES_SIM", str(sim.dir))
    monkeypatch.setenv("QUBES_SIM_BLOCKDEV", "1")
    if not mapped:
        monkeypatch.setenv("QUBES_SIM_THIN_FAIL", "dump")
    before = sparse.SCANNED[0]
    plan = backup_plan.plan_backup(sim.system, ["work"])
    try:
        scanned = sparse.SCANNED[0] - before
        (vol,) = [pv for a in plan.archives for pv in a.volumes if pv.ref.volume == "private"]
        # provisioned: 4 + 1 + 1 chunks of 64 KiB out of 512 MiB; the fallback reads everything
        assert vol.file.data <= 6 * BS
        assert (scanned < 32 << 20) if mapped else (scanned >= 512 << 20)
    finally:
        plan.close()
    assert not any(p.name.startswith("qbackup-") for p in (sim.dom0 / "dev/qubes_dom0").iterdir())

    env = dict(sim.env(), QUBES_SIM_BLOCKDEV="1", **({} if mapped else {"QUBES_SIM_THIN_FAIL": "dump"}))
    r = subprocess.run([str(BIN / "qvm-backup"), "-y", "-p", "/pw", *KDF, "-d", "backupvm", VM_BACKUPS, "work"],
                       env=env, text=True, capture_output=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    (location,) = sim.vm_backups.glob("qubes-backup-*")
    r = sim.restore("-d", "backupvm", "--rename-conflicting", f"{VM_BACKUPS}/{location.name}", "work")
    assert r.returncode == 0, r.stderr
    assert (sim.dom0 / "dev/qubes_dom0/vm-work1-private").read_bytes() == original
    log = (sim.dom0 / "dev/thintools.log").read_text().splitlines()
    words = [json.loads(line)[-1] for line in log if json.loads(line)[0] == "dmsetup"]
    assert words.count("reserve_metadata_snap") == words.count("release_metadata_snap") >= 2
    assert not (sim.dom0 / "dev/qubes_dom0/.lvm/vm-pool.metasnap").exists()


# -- fewer lvm processes: one lvremove per archive ------------------------------------------------------------


def _record_lvm(monkeypatch: pytest.MonkeyPatch, fail_create: int = 0) -> list[list[str]]:
    from qubes_backup_dom0.errors import BackupError
    from qubes_backup_dom0.qubes import pools

    calls: list[list[str]] = []
    real = pools.run_lvm

    def run(system: System, args: list[str], what: str) -> str:
        calls.append(list(args))
        if args[0] == "lvcreate" and sum(c[0] == "lvcreate" for c in calls) == fail_create:
            raise BackupError(f"{what}: injected")
        return real(system, args, what)

    monkeypatch.setattr(pools, "run_lvm", run)
    return calls


def _snapshots(sim: Sim) -> list[str]:
    return [p.name for p in (sim.dom0 / "dev/qubes_dom0").iterdir() if p.name.startswith("qbackup-")]


def test_snapshots_of_an_archive_removed_by_one_lvremove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sim = new_sim(tmp_path / "sim")
    monkeypatch.setenv("QUBES_SIM", str(sim.dir))
    calls = _record_lvm(monkeypatch)
    plan = backup_plan.plan_backup(sim.system, ["legacy-hvm"])  # a StandaloneVM: root and private
    assert len(_snapshots(sim)) == 2
    plan.close()
    creates = [c[-1] for c in calls if c[0] == "lvcreate"]
    (remove,) = [c for c in calls if c[0] == "lvremove"]
    assert sorted(creates) == ["qubes_dom0/vm-legacy-hvm-private", "qubes_dom0/vm-legacy-hvm-root"]
    assert remove[:2] == ["lvremove", "-f"] and len(remove) == 4 and _snapshots(sim) == []


def test_a_failed_plan_still_removes_its_snapshots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qubes_backup_dom0.errors import BackupError

    sim = new_sim(tmp_path / "sim")
    monkeypatch.setenv("QUBES_SIM", str(sim.dir))
    calls = _record_lvm(monkeypatch, fail_create=2)  # the second volume's snapshot fails
    with pytest.raises(BackupError, match="injected"):
        backup_plan.plan_backup(sim.system, ["legacy-hvm"])
    assert _snapshots(sim) == []
    assert [len(c) for c in calls if c[0] == "lvremove"] == [3]  # the first volume's, once


def test_leftovers_of_a_killed_run_go_in_one_lvremove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qubes_backup_dom0.qubes import pools

    sim = new_sim(tmp_path / "sim")
    monkeypatch.setenv("QUBES_SIM", str(sim.dir))
    store = LvStore(sim.dom0 / "dev")
    dead = [f"qbackup-999999-0000000{i}-{i}" for i in (1, 2)]
    for name in dead:
        store.snapshot("qubes_dom0", "vm-work-private", name, tags=(pools.SNAPSHOT_TAG,), readonly=True)
    calls = _record_lvm(monkeypatch)
    assert sorted(pools.remove_leftover_snapshots(sim.system)) == [f"qubes_dom0/{n}" for n in dead]
    assert [c for c in calls if c[0] == "lvremove"] == [["lvremove", "-f", *(f"qubes_dom0/{n}" for n in dead)]]
    assert _snapshots(sim) == []


def test_metadata_snapshot_released_when_the_backup_is_killed(lvs: tuple[System, LvStore], tmp_path: Path) -> None:
    """The reserve/dump/release child runs in its own session: killing qvm-backup's whole process group while
    the dump runs (Ctrl-C, kill -9) still ends in a release."""
    import shlex
    import signal
    import time

    system, store = lvs
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    gated = ["sh", "-c", f'cat {shlex.quote(str(fifo))} >/dev/null; exec "$0" "$@"', *system.thin_dump_argv]
    env = dict(os.environ, QUBES_SIM=str(system.sim_dir), QUBES_THIN_DUMP=shlex.join(gated))
    code = ("from qubes_backup_dom0.qubes import thinmap; from qubes_backup_dom0.qubes.system import System; "
            "thinmap.provisioned(System.from_env(), 'qubes_dom0', 'vm-work-private', 16 << 20)")  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    log = store.devdir / "thintools.log"

    def wait_for(cond: object) -> None:
        deadline = time.monotonic() + 60  # a bound on a hang, not a measurement
        while not cond():  # type: ignore[operator]
            assert time.monotonic() < deadline
            time.sleep(0.02)

    wait_for(lambda: _snap_reserved(store))
    os.killpg(parent.pid, signal.SIGKILL)
    parent.wait()
    with open(fifo, "w"):  # let the dump go on: it writes to a pipe nobody reads any more
        pass
    wait_for(lambda: not _snap_reserved(store))
    words = [json.loads(line)[-1] for line in log.read_text().splitlines() if json.loads(line)[0] == "dmsetup"]
    assert words == ["reserve_metadata_snap", "release_metadata_snap"]


def test_several_tools_on_one_reservation(lvs: tuple[System, LvStore], tmp_path: Path) -> None:
    """on_metadata_snapshot_many: one reserve and one release around every tool; each tool's own output (any
    bytes, newlines included) comes back to it, a failing tool gives None for itself only; a failed reserve gives
    None for all."""
    system, store = lvs
    log = store.devdir / "thintools.log"
    outputs = [b"first\n", b"", b"3 4\nnot a header\n" * 1000, b"\x00\xff"]
    tools = [[sys.executable, "-c", f"import sys; sys.stdout.buffer.write({o!r})"] for o in outputs]
    tools.insert(2, [sys.executable, "-c", "import sys; print('partial'); sys.exit(1)"])
    before = len(log.read_text().splitlines()) if log.exists() else 0
    got = thinmap.on_metadata_snapshot_many(system, "qubes_dom0", "vm-pool", tools)
    assert got == [outputs[0], outputs[1], None, outputs[2], outputs[3]]
    words = [c[-1] for c in map(json.loads, log.read_text().splitlines()[before:]) if c[0] == "dmsetup"]
    assert words == ["reserve_metadata_snap", "release_metadata_snap"] and not _snap_reserved(store)
    (store.devdir / "qubes_dom0/.lvm/vm-pool.metasnap").touch()  # another tool's reservation: EBUSY
    assert thinmap.on_metadata_snapshot_many(system, "qubes_dom0", "vm-pool", tools) == [None] * len(tools)
    assert _snap_reserved(store)  # and it stays theirs


@pytest.mark.parametrize("version", ["0.9.0", "1.1.0"])
def test_parser_reads_recorded_dumps_of_both_versions(version: str) -> None:
    """thin_dump --dev-id 2 of tests/data/thin_delta/metadata-ranges.xml by 0.9.0 and by 1.1.0 (the Rust rewrite
    in Qubes R4.3's dom0: superblock version 2, no flags attribute, no final newline): the same map."""
    xml = (Path(__file__).parent / "data/thin_delta" / f"dump-ranges-{version}-2.xml").read_bytes()
    chunk = 128 * 512
    assert thinmap.parse(xml, 2, 400 * chunk) == [(0, 100 * chunk), (200 * chunk, 10 * chunk),
                                                  (300 * chunk, 32 * chunk)]  # fmt: skip
