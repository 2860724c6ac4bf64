"""simgen: the simulated Qubes system is realistic (R4 qubes.xml, sparse images) and reproducible."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from qubes_backup_dom0.qubes.qubesxml import Collection
from qubes_backup_dom0.qubes.system import System
from qubes_backup_sim import simgen

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sim")
    simgen.generate(d, "small", seed=7, pool="file")  # the legacy layout these tests read
    return d


def _data_extents(path: Path) -> list[tuple[int, int]]:
    """(start, end) of the data regions, found the way the backup reads them."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off = 0
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            off = end
    finally:
        os.close(fd)
    return out


def _tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            # hash the data extents and their positions (reading GiBs of holes would only add zeros)
            h = hashlib.sha256()
            with p.open("rb") as f:
                for start, end in _data_extents(p):
                    f.seek(start)
                    h.update(f"{start}-{end}:".encode() + f.read(end - start))
            out[rel] = f"{h.hexdigest()}:{p.stat().st_size}"
        else:
            out[rel] = "dir"
    return out


def test_qubes_xml_has_expected_domains(sim: Path) -> None:
    system = System.from_env({"QUBES_SIM": str(sim)})
    coll = Collection.load(system.qubes_xml)
    names = set(coll.names())
    assert {"dom0", "fedora-41", "sys-net", "sys-firewall", "work", "personal", "vault", "untrusted",
            "backupvm", "legacy-hvm", "fedora-41-dvm", "disp1234"} <= names  # fmt: skip
    assert coll["dom0"].klass == "AdminVM"
    assert coll["fedora-41"].klass == "TemplateVM"
    assert coll["legacy-hvm"].klass == "StandaloneVM"
    assert coll["disp1234"].klass == "DispVM"
    g = coll.global_properties
    assert g["default_netvm"] == "sys-firewall" and g["default_template"] == "fedora-41"
    assert g["default_dispvm"] == "fedora-41-dvm" and g["clockvm"] and g["updatevm"]
    pool = next(p for p in coll.pools.values() if p["driver"] == "file")
    assert pool["dir_path"] == "/var/lib/qubes"
    assert coll["sys-net"].provides_network and coll["sys-firewall"].provides_network
    assert coll["vault"].raw_property("netvm") == "" and coll.effective_netvm(coll["vault"]) is None
    assert coll.effective_netvm(coll["work"]) == "sys-firewall"
    assert coll.effective_template(coll["work"]) == "fedora-41"
    assert coll["fedora-41-dvm"].properties["template_for_dispvms"] == "True"
    assert not coll["backupvm"].include_in_backups and coll["work"].include_in_backups
    assert coll.vm_dir(coll["fedora-41"]) == "vm-templates/fedora-41"
    assert coll.vm_dir(coll["sys-net"]) == "appvms/sys-net"
    assert len({d.qid for d in coll.domains}) == len(coll.domains)
    assert len({d.uuid for d in coll.domains if d.uuid}) == len(coll.domains) - 1  # dom0 has none


def test_save_on_stop_volumes_exist_and_are_sparse(sim: Path) -> None:
    system = System.from_env({"QUBES_SIM": str(sim)})
    coll = Collection.load(system.qubes_xml)
    seen = 0
    total_apparent = total_alloc = 0
    for dom in coll.domains:
        for vol in dom.volumes:
            if not vol.save_on_stop:
                continue
            path = coll.volume_path(vol, system.qubes_root)
            assert path is not None and path.is_file(), (dom.name, vol.name)
            st = path.stat()
            assert st.st_size == vol.size, (dom.name, vol.name)
            assert st.st_size >= 8 * MiB
            assert st.st_blocks * 512 < st.st_size // 8, (dom.name, vol.name)  # mostly holes
            extents = _data_extents(path)
            assert len(extents) >= 2  # scattered, not one blob
            assert all(s % 4096 == 0 for s, _ in extents)
            seen += 1
            total_apparent += st.st_size
            total_alloc += st.st_blocks * 512
    assert seen >= 10
    assert total_alloc < 8 * MiB and total_apparent > 20 * total_alloc
    assert (system.qubes_root / "vm-templates/fedora-41/root.img").is_file()
    assert (system.qubes_root / "appvms/legacy-hvm/root.img").is_file()
    assert not (system.qubes_root / "appvms/work/root.img").exists()  # snapshot of the template


def test_images_end_in_data_and_in_holes(sim: Path) -> None:
    qroot = sim / "dom0/var/lib/qubes"
    work = qroot / "appvms/work/private.img"
    assert _data_extents(work)[-1][1] == work.stat().st_size
    vault = qroot / "appvms/vault/private.img"
    last_end = _data_extents(vault)[-1][1]
    assert last_end <= vault.stat().st_size * 0.86  # a fully-hole tail
    root = qroot / "vm-templates/fedora-41/root.img"
    assert _data_extents(root)[0][0] == 0


def test_data_mixes_random_and_compressible(sim: Path) -> None:
    import zlib

    img = sim / "dom0/var/lib/qubes/appvms/work/private.img"
    ratios = []
    with img.open("rb") as f:
        for start, end in _data_extents(img):
            f.seek(start)
            block = f.read(min(end - start, 64 * 1024))
            ratios.append(len(zlib.compress(block)) / len(block))
    assert min(ratios) < 0.5  # text-like extents compress
    assert max(ratios) > 0.95  # random extents do not


def test_small_files_home_and_backupvm(sim: Path) -> None:
    qroot = sim / "dom0/var/lib/qubes"
    for vm in ("work", "sys-net", "vault"):
        assert (qroot / f"appvms/{vm}/firewall.xml").read_text().startswith("<?xml")
        assert (qroot / f"appvms/{vm}/icon.png").read_bytes().startswith(b"\x89PNG")
        assert (qroot / f"appvms/{vm}/notes.txt").stat().st_size > 0
    home = sim / "dom0/home/user"
    assert (home / ".bashrc").is_file()
    assert (home / "Documents").is_dir()
    assert (home / "Documents/latest.txt").is_symlink()
    sparse = (home / "Documents/sparse.bin").stat()
    assert sparse.st_size == MiB and sparse.st_blocks * 512 < sparse.st_size
    backups = System.from_env({"QUBES_SIM": str(sim)}).vm_root("backupvm") / "home/user/backups"
    assert backups.is_dir() and not any(backups.iterdir())


def test_deterministic(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    simgen.generate(a, "small", seed=3)
    simgen.generate(b, "small", seed=3)
    simgen.generate(c, "small", seed=4)
    da, db, dc = _tree_digest(a), _tree_digest(b), _tree_digest(c)
    assert da == db
    assert da.keys() == dc.keys()
    assert da["dom0/dev/qubes_dom0/vm-work-private"] != dc["dom0/dev/qubes_dom0/vm-work-private"]


def test_generate_defaults_to_lvm_thin_like_the_command(tmp_path: Path) -> None:
    """generate() builds what a fresh R4.2 install has, as the command line does: VM volumes in lvm_thin."""
    simgen.generate(tmp_path / "d", "small", keep=("backupvm",))
    coll = Collection.load(tmp_path / "d/dom0/var/lib/qubes/qubes.xml")
    assert coll.global_properties["default_pool"] == "lvm"
    priv = coll["backupvm"].volume("private")
    assert priv is not None and (priv.pool, priv.vid) == ("lvm", "qubes_dom0/vm-backupvm-private")
    assert _lv(tmp_path / "d", "vm-backupvm-private").is_file()


def test_refuses_non_empty_dir_unless_forced(tmp_path: Path) -> None:
    d = tmp_path / "sim"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        simgen.generate(d, "small")
    assert simgen.main([str(d), "--scale", "small"]) == 2
    simgen.generate(d, "small", force=True)
    simgen.generate(d, "small", force=True)  # replaces an existing simulation
    assert (d / "keep.txt").read_text() == "mine"
    assert Collection.load(d / "dom0/var/lib/qubes/qubes.xml").get("work") is not None


def test_bench_scale_hits_totals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "b"
    assert simgen.main([str(d), "--scale", "bench", "--data-mib", "12", "--apparent-gib", "0.5"]) == 0
    s = simgen.summarize(d)
    assert 0.45 * 1024**3 <= s.apparent <= 0.55 * 1024**3
    assert 10 * MiB <= s.allocated <= 14 * MiB
    out = capsys.readouterr().out
    assert "apparent" in out and "allocated" in out


def _lv(sim: Path, name: str) -> Path:
    return sim / "dom0/dev/qubes_dom0" / name


def test_lvm_thin_like_a_fresh_install(tmp_path: Path) -> None:
    d = tmp_path / "lvm"
    assert simgen.main([str(d), "--scale", "small"]) == 0  # the command's defaults: lvm_thin, sys-firewall running
    coll = Collection.load(d / "dom0/var/lib/qubes/qubes.xml")
    pools = coll.pools
    assert pools["lvm"] == {"driver": "lvm_thin", "name": "lvm", "revisions_to_keep": "1",
                            "thin_pool": "vm-pool", "volume_group": "qubes_dom0"}  # fmt: skip
    assert pools["varlibqubes"]["driver"] == "file" and "linux-kernel" in pools
    assert coll.global_properties["default_pool"] == "lvm"
    priv = coll["work"].volume("private")
    root = coll["work"].volume("root")
    assert priv is not None and root is not None
    assert (priv.pool, priv.vid, priv.save_on_stop) == ("lvm", "qubes_dom0/vm-work-private", True)
    assert root.snap_on_start and root.source == "qubes_dom0/vm-fedora-41-root"
    lv = _lv(d, "vm-work-private")
    assert lv.stat().st_size == priv.size and lv.stat().st_blocks * 512 < lv.stat().st_size // 4
    assert (d / "dom0/dev/qubes_dom0/.lvm/vm-work-private.json").is_file()
    assert not (d / "dom0/var/lib/qubes/appvms/work/private.img").exists()
    assert (d / "dom0/var/lib/qubes/appvms/work/firewall.xml").is_file()
    # sys-firewall runs: its -snap differs from the committed LV, root-snap is the template's root
    assert _lv(d, "vm-sys-firewall-private-snap").read_bytes() != _lv(d, "vm-sys-firewall-private").read_bytes()
    assert _lv(d, "vm-sys-firewall-root-snap").read_bytes() == _lv(d, "vm-fedora-41-root").read_bytes()
    assert not _lv(d, "vm-work-private-snap").exists()
    state = (d / "dom0/var/run/qubes-sim/state.json").read_text()
    assert '"sys-firewall"' in state


def test_file_reflink_and_running(tmp_path: Path) -> None:
    d = tmp_path / "reflink"
    simgen.generate(d, "small", pool="file-reflink", running=["work", "fedora-41"])
    coll = Collection.load(d / "dom0/var/lib/qubes/qubes.xml")
    assert coll.pools["varlibqubes"]["driver"] == "file-reflink"
    appvms = d / "dom0/var/lib/qubes/appvms"
    assert (appvms / "work/private-dirty.img").read_bytes() != (appvms / "work/private.img").read_bytes()
    tpl = d / "dom0/var/lib/qubes/vm-templates/fedora-41"
    assert (tpl / "root-dirty.img").stat().st_size == (tpl / "root.img").stat().st_size
    assert not (appvms / "vault/private-dirty.img").exists()
    with pytest.raises(ValueError):
        simgen.generate(tmp_path / "x", "small", running=["disp1234"])
    with pytest.raises(ValueError):
        simgen.generate(tmp_path / "y", "small", pool="zfs")
