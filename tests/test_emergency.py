"""The emergency recipe in docs/EMERGENCY-RESTORE.md restores real backups with stock tools only.

The test keeps no copy of the commands: it extracts the document's ```sh blocks, replaces only the settings
of step 0 (passphrase, backup file, work and target directories) and the VM selection of step 6, and runs
them with dash (or sh) against backups written by the real ``qvm-backup`` CLI in simulation.  A recipe that
drifts from the format, or a format change that breaks the recipe, fails here.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from qubes_backup_dom0.backup.plan import plan_backup
from qubes_backup_dom0.qubes.qubesxml import Collection
from qubes_backup_dom0.qubes.system import System
from qubes_backup_sim import simgen

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "EMERGENCY-RESTORE.md"
REPO_PART = "\n# Emergency restore of a repository"  # where the second part (test_emergency_repo.py) starts
QVM_BACKUP = Path(sys.executable).parent / "qvm-backup"
TOOLS = ("tar", "openssl", "zstd", "gzip", "od", "tail", "wc", "cut", "tr", "ls", "sort", "uniq", "stat", "sed", "grep")
# Spaces, quotes, a dollar sign, non-ASCII and a long run of one byte: the run makes `od` print "*" for
# repeated lines unless the recipe passes -v, which is exactly the kind of slip this should catch.
PASSPHRASE = "correct horse 'bätterÿ' $HOME " + "a" * 40
HOLE_MARGIN_BLOCKS = 64  # 512-byte blocks: file systems may round allocation up or down a little


@pytest.fixture(scope="module", autouse=True)
def stock_tools() -> None:
    """The issue demands the test pass, not skip: a missing tool is a failure with a clear message."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"emergency restore test needs {', '.join(missing)} on PATH (.ci/run installs them)")
    version = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=True).stdout
    if not version.startswith("OpenSSL 3"):
        pytest.fail(f"emergency restore test needs the OpenSSL 3 command line, found: {version.strip()}")
    if not QVM_BACKUP.exists():
        pytest.fail(f"qvm-backup not found at {QVM_BACKUP}: install the dom0 package into this venv")


def shell() -> str:
    """dash catches bash-isms that bash would silently accept; fall back to whatever sh is."""
    return shutil.which("dash") or "sh"


def recipe_blocks() -> list[str]:
    """The ```sh blocks of the document's first part (a backup file), in order (the document is the single
    source of the commands); the repository part is tests/test_emergency_repo.py's."""
    text = DOC.read_text(encoding="utf-8").split(REPO_PART, 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```\s*$", text, re.S | re.M)
    assert len(blocks) >= 5, "docs/EMERGENCY-RESTORE.md lost its sh blocks"
    return blocks


def recipe(settings: dict[str, str]) -> str:
    """The whole recipe as one script, with each ``VAR=...`` settings line replaced by the test's value."""
    used = dict.fromkeys(settings, 0)

    def substitute(m: re.Match[str]) -> str:
        used[m.group(1)] += 1
        return f"{m.group(1)}={shlex.quote(settings[m.group(1)])}"

    pattern = re.compile(rf"^({'|'.join(settings)})=.*$", re.M)
    script = "\n".join(pattern.sub(substitute, block) for block in recipe_blocks())
    assert all(n == 1 for n in used.values()), f"each setting must be assigned once in the document: {used}"
    return script


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    target: Path


def run_recipe(tmp: Path, backup: Path, vms: str = "", passphrase: str = PASSPHRASE) -> Result:
    tmp.mkdir(parents=True, exist_ok=True)
    target = tmp / "target"
    script = tmp / "recipe.sh"
    settings = {"PASSPHRASE": passphrase, "BACKUP": str(backup), "WORK": str(tmp / "work"), "VMS": vms}
    script.write_text(recipe({**settings, "TARGET": str(target)}), encoding="utf-8")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp)}
    proc = subprocess.run(
        [shell(), str(script)], cwd=tmp, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    return Result(proc.returncode, proc.stdout, proc.stderr, target)


def make_backup(sim: Path, name: str, *options: str, vms: tuple[str, ...] = ()) -> Path:
    """Run the real CLI in simulation; paths it is given are inside the simulated dom0."""
    (sim / "dom0" / name).mkdir()
    proc = subprocess.run(
        [str(QVM_BACKUP), "-y", "-q", "-p", "/pw", "--kdf-n", "1024", "--weak-kdf-ok", *options, f"/{name}", *vms],
        env={**os.environ, "QUBES_SIM": str(sim)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (backup,) = (sim / "dom0" / name).iterdir()
    return backup


def new_sim(root: Path, pool: str = "lvm_thin") -> Path:
    """The small system, by default on lvm_thin with sys-firewall running (its committed data is backed up)."""
    simgen.generate(root, "small", pool=pool, running=["sys-firewall"] if pool != "file" else [])
    (root / "dom0" / "pw").write_bytes(PASSPHRASE.encode() + b"\n")
    return root


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return new_sim(tmp_path_factory.mktemp("sim"))


@pytest.fixture(scope="module")
def backups(sim: Path) -> dict[str, Path]:
    return {
        "zstd": make_backup(sim, "b-zstd"),
        "gzip": make_backup(sim, "b-gzip", "-Z", "gzip"),
        "none": make_backup(sim, "b-none", "--no-compress"),
    }


def volume_file(coll: Collection, system: System, vm: str, volume: str) -> Path:
    """The host file with a volume's committed data: an LV file (lvm_thin) or the clean image (file pools)."""
    vol = coll[vm].volume(volume)
    assert vol is not None and vol.save_on_stop, (vm, volume)
    pool = coll.pools[vol.pool]
    if pool["driver"] == "lvm_thin":
        return system.dev_dir / vol.vid
    return system.dom0_path(pool["dir_path"]) / f"{vol.vid}.img"


def expected_entries(sim: Path, vms: list[str]) -> dict[str, tuple[str, Path | bytes]]:
    """What the backup holds, from the planner: restored path -> (type, original file or content).  A VM's
    ``DIR/VOL.img`` is the volume's committed data wherever its pool keeps it; its firewall.xml and notes.txt
    are generated from what qubesd answers (their content)."""
    system = System.from_env({"QUBES_SIM": str(sim)})
    plan = plan_backup(system, vms)
    coll = Collection.load(system.qubes_xml)
    out: dict[str, tuple[str, Path | bytes]] = {}
    for archive in plan.archives:
        for f in archive.files:
            if archive.kind == "home":
                out[f.path] = (f.type, system.dom0_root / f.path)
            elif f.content is not None:
                out[f.path] = (f.type, f.content)
            else:
                assert f.path.endswith(".img"), f.path
                out[f.path] = (f.type, volume_file(coll, system, archive.vm, Path(f.path).stem))
    return out


def walk(root: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield (Path(dirpath) / name).relative_to(root).as_posix()


def data_regions(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the allocated regions, by SEEK_DATA/SEEK_HOLE (the whole file if unsupported)."""
    regions: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            regions.append((start, end))
            pos = end
    except OSError:
        return [(0, size)]
    return regions


def same_bytes(a: Path, b: Path) -> bool:
    """Byte-for-byte equality, reading only where either file has data (holes read as zeros in both)."""
    with a.open("rb") as fa, b.open("rb") as fb:
        size = os.fstat(fa.fileno()).st_size
        if os.fstat(fb.fileno()).st_size != size:
            return False
        spans = sorted(data_regions(fa.fileno(), size) + data_regions(fb.fileno(), size))
        for start, end in spans:
            fa.seek(start)
            fb.seek(start)
            while start < end:
                n = min(4 << 20, end - start)
                if fa.read(n) != fb.read(n):
                    return False
                start += n
        return True


def assert_restored(target: Path, expected: dict[str, tuple[str, Path | bytes]]) -> None:
    """Every entry restored exactly (bytes, symlink targets), holes kept, and nothing else written."""
    restored = {p for p in walk(target) if p != "qubes-backup.xml"}
    ancestors = {q.as_posix() for p in expected for q in Path(p).parents if q != Path(".")}
    assert restored == set(expected) | ancestors, "restored entries differ from the backup's"
    sparse_seen = 0
    for path, (kind, original) in expected.items():
        got = target / path
        if isinstance(original, bytes):
            assert got.is_file() and not got.is_symlink() and got.read_bytes() == original, path
        elif kind == "dir":
            assert got.is_dir() and not got.is_symlink(), path
        elif kind == "symlink":
            assert got.is_symlink() and os.readlink(got) == os.readlink(original), path
        else:
            assert got.is_file() and not got.is_symlink(), path
            assert same_bytes(got, original), f"{path} differs from the original"
            o, r = original.stat(), got.stat()
            assert r.st_size == o.st_size, path
            assert abs(r.st_blocks - o.st_blocks) <= HOLE_MARGIN_BLOCKS + o.st_blocks // 50, (
                f"{path}: {r.st_blocks} blocks allocated, the original has {o.st_blocks} (holes lost?)"
            )
            if o.st_blocks * 512 < o.st_size // 2:
                sparse_seen += 1
    if any(k == "file" and p.endswith(".img") for p, (k, _) in expected.items()):
        assert sparse_seen, "the simulated images should be sparse, or the hole check proves nothing"
    assert (target / "qubes-backup.xml").read_bytes().lstrip().startswith(b"<qubes>")


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_restore_all_vms(compression: str, sim: Path, backups: dict[str, Path], tmp_path: Path) -> None:
    res = run_recipe(tmp_path, backups[compression])
    assert res.rc == 0, res.stderr
    assert f"compression {compression}" in res.stdout
    assert "all selected archives verified" in res.stdout
    assert_restored(res.target, expected_entries(sim, []))


def test_restore_one_vm(sim: Path, backups: dict[str, Path], tmp_path: Path) -> None:
    res = run_recipe(tmp_path, backups["zstd"], vms="work")
    assert res.rc == 0, res.stderr
    assert re.search(r"^vm\d+ +work +vm ", res.stdout, re.M), "the listing should name the VM"
    assert_restored(res.target, expected_entries(sim, ["work"]))


def test_unknown_vm_is_refused(backups: dict[str, Path], tmp_path: Path) -> None:
    res = run_recipe(tmp_path, backups["none"], vms="no-such-vm")
    assert res.rc != 0 and "no VM named no-such-vm" in res.stderr
    assert not any(walk(res.target))


def test_wrong_passphrase_stops_at_header(backups: dict[str, Path], tmp_path: Path) -> None:
    res = run_recipe(tmp_path, backups["none"], passphrase="not the passphrase")
    assert res.rc != 0
    assert "VERIFICATION FAILED for backup-header" in res.stderr
    assert not (tmp_path / "work" / "manifest.xml").exists(), "nothing may be decrypted with a wrong key"


def member_names(backup: Path) -> list[str]:
    with tarfile.open(backup) as tf:
        return tf.getnames()


def flip_bit(backup: Path, copy: Path, member: str, offset: int) -> None:
    """Flip one bit of ``member``'s data inside the outer tar (the tar framing stays valid)."""
    with tarfile.open(backup) as tf:
        info = tf.getmember(member)
        assert offset < info.size
        position = info.offset_data + offset
    data = bytearray(backup.read_bytes())
    data[position] ^= 0x10
    copy.write_bytes(bytes(data))


def test_flipped_bit_stops_before_restoring(sim: Path, backups: dict[str, Path], tmp_path: Path) -> None:
    entries = expected_entries(sim, [])
    member = next(m for m in member_names(backups["zstd"]) if re.fullmatch(r"vm\d+/000000", m))
    damaged = tmp_path / "damaged.tar"
    flip_bit(backups["zstd"], damaged, member, 100)  # inside the ciphertext, past the IV
    res = run_recipe(tmp_path / "run", damaged)
    assert res.rc != 0
    assert f"VERIFICATION FAILED for {member}" in res.stderr
    assert "restored" not in res.stdout
    images = [p for p, (kind, _) in entries.items() if kind == "file" and p.endswith(".img")]
    assert images and not any((res.target / p).exists() for p in images)
    assert not any(walk(res.target)), "nothing may be restored when a selected archive fails verification"


def test_more_than_1000_chunks(tmp_path: Path) -> None:
    """Chunk names must be joined in numeric order past 000999 (a naive glob or counter would break)."""
    sim = new_sim(tmp_path / "sim", pool="file")  # an image that can grow beyond its small-scale size
    image = sim / "dom0/var/lib/qubes/appvms/work/private.img"
    image.unlink()
    with image.open("wb") as f:  # a hole, 63 MiB of incompressible data, a hole at the end
        f.seek(1 << 20)
        for _ in range(63):
            f.write(os.urandom(1 << 20))
        f.truncate(200 << 20)
    backup = make_backup(sim, "b-big", "--no-compress", "--chunk-size", "65536", vms=("work",))
    chunks = [m for m in member_names(backup) if re.fullmatch(r"vm1/\d{6}", m)]
    assert len(chunks) > 1000
    res = run_recipe(tmp_path / "run", backup, vms="work")
    assert res.rc == 0, res.stderr
    assert f"verified vm1: {len(chunks)} chunk(s)" in res.stdout
    assert_restored(res.target, expected_entries(sim, ["work"]))


def test_duplicated_member_is_refused(backups: dict[str, Path], tmp_path: Path) -> None:
    """A hostile tar repeating a member (GNU tar would let the last copy win) is refused before unpacking."""
    damaged = tmp_path / "dup.tar"
    shutil.copy(backups["none"], damaged)
    with tarfile.open(backups["none"]) as tf:
        info = tf.getmember("vm1/000000")
        f = tf.extractfile(info)
        assert f is not None
        data = f.read()
    with tarfile.open(damaged, "a", format=tarfile.USTAR_FORMAT) as tf:
        tf.addfile(info, io.BytesIO(data))
    res = run_recipe(tmp_path / "run", damaged)
    assert res.rc != 0 and "duplicated members" in res.stderr
    assert not (tmp_path / "run" / "work" / "backup-header").exists(), "nothing may be unpacked"
