"""The repository part of docs/EMERGENCY-RESTORE.md restores real repositories with stock tools only.

A simulated lvm_thin system is backed up three times with the real ``qvm-backup --repo`` (block size 64 KiB,
the test KDF): snapshot 1; then overwrites, a discard and growth of volumes and changes to dom0's home
(a new file with spaces, ``%`` and non-ASCII in its name, symlinks, a changed and a removed file), snapshot
2; then VM ``personal`` is deleted through qubesd (and left out with ``--forget``) and more blocks change,
snapshot 3.  What dom0 had at each snapshot is kept aside (hard links to the volumes, which are replaced,
never written in place; a copy of the home keeping its holes).

The test keeps no copy of the commands: it extracts the ```sh blocks of the document's repository part,
replaces only the settings lines, and runs them with dash on a copy of the repository with a PATH holding
nothing but symlinks to the tools the script's own check names (and zstd).  The latest snapshot and an
older one (with the deleted VM) restore byte-exact, holes exactly where the data is zero (4 KiB pages, by
SEEK_DATA/SEEK_HOLE), modes and home mtimes kept; a tampered object, swapped objects (another block's file,
another type's file, another snapshot's root), a rolled-back repository and a wrong passphrase are refused
with the script's message, and nothing of a refused file is left.  The known-answer vector repository
restores too.  About 1 MiB of data per snapshot (some 100-200 objects): a full restore costs about 2-3 s of
CPU (the script starts ~20 processes per object), the refusals well under a second; the module about 15 s of
CPU, the three backups included.  No long mode.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest
from conftest import KDF, PASSPHRASE, Sim, new_sim
from qubes_backup_dom0.backup.plan import plan_backup
from qubes_backup_dom0.format import repo, repotree
from qubes_backup_dom0.format.sparse import scan
from qubes_backup_dom0.qubes.interface import Qubes

DOC = Path(__file__).resolve().parent.parent / "docs" / "EMERGENCY-RESTORE.md"
PART = "\n# Emergency restore of a repository"
REPO = "/home/user/repo"
BS = 64 << 10
PAGE = 4096
LINE = re.compile(r"Snapshot (\d+) of repository ([0-9a-f]{32}): .*; root ([0-9a-f]{64})")
ODD_NAME = "a b%c\N{LATIN SMALL LETTER U WITH DIAERESIS}.txt"  # percent-encoded in the file list
SETTINGS = ("PASSPHRASE", "REPO", "WORK", "TARGET", "EXPECT_ROOT", "SNAPSHOT", "VMS")
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


# ------------------------------------------------------------------------------------------ the document

def part() -> str:
    text = DOC.read_text(encoding="utf-8")
    assert PART in text, "docs/EMERGENCY-RESTORE.md lost its repository part"
    return text.split(PART, 1)[1]


def script(settings: dict[str, str]) -> str:
    """The repository part's ```sh blocks as one script, each settings line replaced once."""
    blocks = re.findall(r"^```sh\n(.*?)^```\s*$", part(), re.S | re.M)
    assert len(blocks) >= 8, "the repository part lost its sh blocks"
    used = dict.fromkeys(settings, 0)

    def substitute(m: re.Match[str]) -> str:
        used[m.group(1)] += 1
        return f"{m.group(1)}={shlex.quote(settings[m.group(1)])}"

    pattern = re.compile(rf"^({'|'.join(settings)})=.*$", re.M)
    text = "\n".join(pattern.sub(substitute, block) for block in blocks)
    assert all(n == 1 for n in used.values()), f"each setting must be assigned once in the document: {used}"
    return text


def stock_tools() -> list[str]:
    """The tools the script checks for (its ``for tool in ...`` line), and zstd (checked after the header)."""
    m = re.search(r"^for tool in ([a-z0-9 ]+); do$", part(), re.M)
    assert m is not None, "the script no longer checks its tools"
    return [*m.group(1).split(), "zstd"]


def restricted_path(base: Path) -> Path:
    """A directory with a symlink to each stock tool and nothing else: the only PATH the script gets."""
    bin_dir = base / "stock-bin"
    if not bin_dir.exists():
        bin_dir.mkdir(parents=True)
        for tool in stock_tools():
            found = shutil.which(tool)
            if found is None:
                pytest.fail(f"the emergency restore test needs {tool} on PATH")
            (bin_dir / tool).symlink_to(found)
    return bin_dir


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    target: Path
    work: Path


def run_guide(tmp: Path, repo_dir: Path, snapshot: str = "", vms: str = "", expect: str = "",
              passphrase: str = PASSPHRASE, shell: str = "dash") -> Run:  # fmt: skip
    """Run the script with ``shell`` (dash by default: it catches bash-isms), PATH the stock tools only."""
    tmp.mkdir(parents=True, exist_ok=True)
    target, work = tmp / "target", tmp / "work"
    settings = {"PASSPHRASE": passphrase, "REPO": str(repo_dir), "WORK": str(work), "TARGET": str(target),
                "EXPECT_ROOT": expect, "SNAPSHOT": snapshot, "VMS": vms}  # fmt: skip
    (tmp / "restore-repo.sh").write_text(script(settings), encoding="utf-8")
    found = shutil.which(shell)
    if found is None:
        pytest.fail(f"the emergency restore test needs {shell}")
    env = {"PATH": str(restricted_path(tmp.parent)), "HOME": str(tmp)}
    proc = subprocess.run([found, str(tmp / "restore-repo.sh")], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    return Run(proc.returncode, proc.stdout, proc.stderr, target, work)


# --------------------------------------------------------------------------------- the system's history

def rewrite(path: Path, change: Callable[[BinaryIO], object]) -> None:
    """Change a volume as Qubes does: a new file (holes kept) renamed over the old one."""
    new = path.with_name(path.name + ".new")
    size, regions = scan(path)
    with open(path, "rb") as fi, open(new, "wb") as fo:
        fo.truncate(size)
        for off, length in regions:
            fo.seek(off)
            fi.seek(off)
            fo.write(fi.read(length))
    with open(new, "r+b") as f:
        change(f)
    os.rename(new, path)


def punch(f: BinaryIO, offset: int, length: int) -> None:
    f.flush()
    fd = f.fileno()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, ctypes.c_long(offset), ctypes.c_long(length)):
        os.pwrite(fd, bytes(length), offset)  # zeros: a hole to the backup all the same


def data_at(path: Path) -> list[tuple[int, int]]:
    return scan(path)[1]


def copy_keeping_holes(src: Path, dst: Path) -> None:
    size, regions = scan(src)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(size)
        for off, length in regions:
            fo.seek(off)
            fi.seek(off)
            fo.write(fi.read(length))
    os.chmod(dst, src.stat().st_mode & 0o777)
    os.utime(dst, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns))


Truth = dict[str, tuple[str, Path | bytes]]  # restored path -> (type, file kept aside, or the content)


def keep_truth(sim: Sim, vms: tuple[str, ...], dest: Path) -> Truth:
    """What the snapshot must restore, from the planner (the same file list the backup uses), kept aside."""
    system = sim.system
    plan = plan_backup(system, list(vms))
    out: Truth = {}
    try:
        for archive in plan.archives:
            for f in archive.files:
                keep = dest / f.path
                keep.parent.mkdir(parents=True, exist_ok=True)
                if archive.kind == "home":
                    src = system.dom0_root / f.path
                    if f.type == "dir":
                        keep.mkdir(exist_ok=True)
                        os.chmod(keep, src.stat().st_mode & 0o777)
                    elif f.type == "symlink":
                        keep.symlink_to(os.readlink(src))
                    else:
                        copy_keeping_holes(src, keep)
                    out[f.path] = (f.type, keep)
                elif f.content is not None:
                    out[f.path] = (f.type, bytes(f.content))
                else:
                    os.link(sim.volume_files(archive.vm)[Path(f.path).stem], keep)
                    out[f.path] = (f.type, keep)
    finally:
        plan.close()
    return out


def backup(sim: Sim, *vms: str) -> str:
    r = sim.run("qvm-backup", "-y", "-q", "-p", "/pw", *KDF, "-d", "backupvm", "--repo", REPO, "--block-size", "64K",
                *vms)  # fmt: skip
    assert r.returncode == 0, r.stderr
    m = LINE.search(r.stdout)
    assert m is not None, r.stdout
    return m.group(3)


@dataclass
class History:
    sim: Sim
    repo: Path  # a copy of the repository, as a stranger would have it
    roots: list[str]  # root id of snapshot 1, 2, 3
    truths: list[Truth]


def first_data(path: Path, skip: int = 0) -> int:
    """Offset of the 64 KiB block where the ``skip``-th data region starts."""
    return data_at(path)[skip][0] // BS * BS


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    base = tmp_path_factory.mktemp("emergency-repo")
    sim = new_sim(base / "sim")
    all_vms = ("work", "personal", "vault", "dom0")
    roots = [backup(sim, *all_vms)]
    truths = [keep_truth(sim, all_vms, base / "truth1")]

    work, vault = sim.volume_files("work")["private"], sim.volume_files("vault")["private"]
    over, gone = first_data(work, 3), first_data(work, 0)
    assert over != gone

    def change_work(f: BinaryIO) -> None:
        f.seek(over + 4096)
        f.write(os.urandom(3 * 4096))
        f.seek(7 * BS + 100)
        f.write(b"written into a hole" * 10)
        punch(f, gone, BS)  # a discard: the block becomes a hole

    def grow_vault(f: BinaryIO) -> None:
        size = os.fstat(f.fileno()).st_size
        f.truncate(size + (1 << 20) + 1000)
        f.seek(size + (1 << 20) - 2000)
        f.write(os.urandom(3000))  # data up to the short last block's end

    rewrite(work, change_work)
    rewrite(vault, grow_vault)
    docs = sim.home / "Documents"
    (docs / ODD_NAME).write_bytes(b"percent-encoded name\n")
    (docs / "link to keys").symlink_to("keys.txt")
    (docs / "up").symlink_to("../.bashrc")  # symlink targets may leave the directory, or be absolute
    (docs / "abs").symlink_to("/etc/hostname")
    with open(docs / "sparse.bin", "r+b") as f:
        f.seek(300000)
        f.write(b"changed in the middle of a hole")
    os.utime(docs / "sparse.bin", (1700000000, 1700000000))
    (docs / "latest.txt").unlink()
    roots.append(backup(sim, *all_vms))
    truths.append(keep_truth(sim, all_vms, base / "truth2"))

    Qubes(sim.system).remove_vm("personal")
    rewrite(work, lambda f: (f.seek(over), f.write(os.urandom(BS))))
    (docs / "keys.txt").write_bytes(b"new keys\n")
    os.chmod(docs, 0o700)
    # a deleted VM would be carried into the next snapshot unchanged (a backup of it): --forget leaves it out
    roots.append(backup(sim, "--forget", "personal", "work", "vault", "dom0"))
    truths.append(keep_truth(sim, ("work", "vault", "dom0"), base / "truth3"))

    # the history is what it claims: a discarded block, overwritten blocks, a grown volume, a deleted VM
    def kept(truth: Truth, path: str) -> Path:
        file = truth[path][1]
        assert isinstance(file, Path)
        return file

    def block(truth: Truth, off: int) -> bytes:
        with open(kept(truth, "appvms/work/private.img"), "rb") as f:
            return os.pread(f.fileno(), BS, off)

    assert any(block(truths[0], gone)) and not any(block(truths[1], gone)), "the discard"
    assert len({block(t, over) for t in truths}) == 3, "the overwrites"
    vault_sizes = [kept(t, "appvms/vault/private.img").stat().st_size for t in truths]
    assert vault_sizes[0] < vault_sizes[1] == vault_sizes[2], "the growth"
    assert any(p.startswith("appvms/personal/") for p in truths[1])
    assert not any(p.startswith("appvms/personal/") for p in truths[2])

    copy = base / "repo-copy"
    shutil.copytree(sim.vm_root("backupvm") / REPO.lstrip("/"), copy)
    return History(sim, copy, roots, truths)


# ------------------------------------------------------------------------------------------- comparing

def walk(root: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield (Path(dirpath) / name).relative_to(root).as_posix()


def holes_supported(directory: Path) -> bool:
    probe = directory / "hole-probe"
    with open(probe, "wb") as f:
        f.truncate(1 << 20)
        try:
            os.lseek(f.fileno(), 0, os.SEEK_DATA)
        except OSError as e:
            return e.errno == errno.ENXIO
        finally:
            probe.unlink()
    return False


def allocated_pages(path: Path) -> set[int]:
    return {i for off, n in data_at(path) for i in range(off // PAGE, (off + n - 1) // PAGE + 1)}


def nonzero_pages(path: Path) -> set[int]:
    data = path.read_bytes()
    zero = bytes(PAGE)
    return {i // PAGE for i in range(0, len(data), PAGE) if data[i : i + PAGE] != zero[: len(data) - i]}


def assert_restored(target: Path, truth: Truth) -> None:
    """Exactly the snapshot's entries; bytes equal; allocated 4 KiB pages exactly the non-zero ones; modes;
    the home's mtimes; the qubes.xml subset beside them."""
    expected = set(truth) | {q.as_posix() for p in truth for q in Path(p).parents if q != Path(".")}
    assert set(walk(target)) - {"qubes-backup.xml"} == expected
    exact_holes = holes_supported(target)
    sparse = 0
    for path, (kind, kept) in truth.items():
        got = target / path
        if isinstance(kept, bytes):
            assert got.read_bytes() == kept, path
            continue
        if kind == "symlink":
            assert got.is_symlink() and os.readlink(got) == os.readlink(kept), path
            continue
        assert not got.is_symlink(), path
        if path.startswith("home/"):  # (a VM's entries carry the mode the backup gave them, not the LV file's)
            assert got.stat().st_mode & 0o777 == kept.stat().st_mode & 0o777, path
        if kind == "dir":
            assert got.is_dir(), path
            continue
        assert got.stat().st_size == kept.stat().st_size and got.read_bytes() == kept.read_bytes(), path
        if path.startswith("home/"):
            assert got.stat().st_mtime == int(kept.stat().st_mtime), path
        pages = allocated_pages(got)
        if exact_holes:
            assert pages == nonzero_pages(kept), f"{path}: holes differ from the zeros of the original"
        else:
            assert pages >= nonzero_pages(kept), path
        sparse += len(pages) * PAGE < got.stat().st_size // 2
    assert sparse >= 2, "the images should be sparse, or the hole check proves nothing"
    xml = (target / "qubes-backup.xml").read_bytes()
    assert b"<qubes>" in xml and xml.rstrip().endswith(b"</qubes>")
    for vm in {p.split("/")[1] for p in truth if p.startswith("appvms/")}:
        assert f'<property name="name">{vm}</property>'.encode() in xml, vm


# ------------------------------------------------------------------------------------------------ tests

def test_restores_the_latest_snapshot(history: History, tmp_path: Path) -> None:
    """With the root of snapshot 1 as the one the user expects (the newest records it in its history)."""
    res = run_guide(tmp_path, history.repo, expect=history.roots[0])
    assert res.rc == 0, res.stderr
    for seq, root in enumerate(history.roots, 1):  # the list: every snapshot with its time and root id
        assert re.search(rf"^{seq} +\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ +{root} +present$", res.stdout, re.M), res.stdout
    assert "descends from, the root you expected" in res.stdout
    assert "done: snapshot 3 restored" in res.stdout
    assert not (res.target / "appvms" / "personal").exists()
    assert_restored(res.target, history.truths[2])
    assert not res.work.exists(), "the decrypted file lists are removed when done"


def test_lists_only(history: History, tmp_path: Path) -> None:
    res = run_guide(tmp_path, history.repo, snapshot="list")
    assert res.rc == 0, res.stderr
    assert all(root in res.stdout for root in history.roots) and "nothing restored" in res.stdout
    assert not any(walk(res.target)) and not res.work.exists()


def test_restores_an_older_snapshot(history: History, tmp_path: Path) -> None:
    """Snapshot 2 still holds the VM deleted before snapshot 3, the blocks overwritten since, the grown
    volume and the home as it was.  Run by bash (the other restores by dash): the script is POSIX sh."""
    res = run_guide(tmp_path, history.repo, snapshot="2", expect=history.roots[2], shell="bash")
    assert res.rc == 0, res.stderr
    assert re.search(r"^vm\d+ +personal +vm$", res.stdout, re.M)
    truth = history.truths[1]
    assert any(p.endswith(ODD_NAME) for p in truth) and any(k == "symlink" for k, _ in truth.values())
    assert_restored(res.target, truth)


def test_restores_the_vector_repository(tmp_path: Path) -> None:
    """The known-answer repository of tests/vectors/repository (REPOSITORY.md section 13; a non-ASCII
    passphrase, a compressed, a stored and a short last block, a hole) laid out as a directory: the image
    restores with the SHA-256 and the hole vectors.json states."""
    vectors = DOC.parent.parent / "tests" / "vectors" / "repository"
    vec = json.loads((vectors / "vectors.json").read_text(encoding="utf-8"))
    repo_dir = tmp_path / "vector-repo"
    (repo_dir / "roots").mkdir(parents=True)
    for name in ("repo-header", "repo-header.hmac"):
        shutil.copy(vectors / name, repo_dir / name)
    for o in vec["objects"]:
        if o["type"] == repo.ROOT:
            shutil.copy(vectors / o["file"], repo_dir / "roots" / o["file"].removeprefix("roots_"))
        else:
            obj(repo_dir, o["id"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(vectors / o["file"], obj(repo_dir, o["id"]))
    (root,) = [o["id"] for o in vec["objects"] if o["type"] == repo.ROOT]
    res = run_guide(tmp_path / "run", repo_dir, expect=root, passphrase=vec["passphrase"])
    assert res.rc == 0, res.stderr
    image = res.target / vec["image"]["path"]
    assert hashlib.sha256(image.read_bytes()).hexdigest() == vec["image"]["sha256"]
    assert image.stat().st_size == vec["image"]["size"]
    if holes_supported(tmp_path):
        holes = {i for off, n in vec["image"]["holes"] for i in range(off // PAGE, (off + n) // PAGE)}
        assert allocated_pages(image) == set(range(-(-vec["image"]["size"] // PAGE))) - holes


def objects_of(history: History, vm: str) -> tuple[list[str], list[str]]:
    """(segment ids, data ids) of ``vm`` in the newest snapshot, read with the library."""
    raw = (history.repo / "repo-header").read_bytes()
    keys = repo.keys_from_passphrase(PASSPHRASE.encode(), repo.parse_header(raw))
    newest = sorted((history.repo / "roots").iterdir())[-1]
    root = repotree.parse_root(repo.open_object(keys, newest.read_bytes(), repo.ROOT, None, BS).plaintext)
    (tree_id,) = [a.tree for a in root.archives if a.vm == vm]

    def body(otype: str, oid: str) -> bytes:
        return repo.open_object(keys, obj(history.repo, oid).read_bytes(), otype, oid, BS).plaintext

    tree = repotree.parse_tree(body(repo.TREE, tree_id), BS)
    segments = [sid for f in tree.files for _, sid in f.segments]
    data = [did for sid in segments for _, did in repotree.parse_segment(body(repo.SEGMENT, sid)).blocks]
    return segments, list(dict.fromkeys(data))


def obj(repo_dir: Path, oid: str) -> Path:
    return repo_dir / "objects" / oid[:2] / oid


def damaged_copy(history: History, tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(history.repo, copy)
    return copy


def assert_refused(res: Run, message: str, file: str | None = None) -> None:
    assert res.rc == 1, res.stderr
    assert message in res.stderr, res.stderr
    assert res.stderr.startswith("emergency-restore: ") and len(res.stderr.splitlines()) == 1, res.stderr
    assert "done:" not in res.stdout
    if file is not None:
        assert not (res.target / file).exists(), f"{file}: nothing of a refused file may be left"


def test_a_tampered_object_is_refused(history: History, tmp_path: Path) -> None:
    """One byte changed in the ciphertext of a data block: its MAC fails before it is decrypted."""
    _segments, data = objects_of(history, "work")
    copy = damaged_copy(history, tmp_path)
    victim = obj(copy, data[1])  # the second block of work's first file: the first one is written by then
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(raw)
    res = run_guide(tmp_path / "run", copy, vms="work")
    assert_refused(res, f"VERIFICATION FAILED for data block {victim.name}", "appvms/work/private.img")


@pytest.mark.parametrize("case", ["data-for-data", "segment-for-data", "root-for-root"])
def test_a_swapped_object_is_refused(case: str, history: History, tmp_path: Path) -> None:
    """A genuine object of this repository served under another's name: its MAC verifies, its clear header
    names another object (or type, or snapshot), and it is refused before it is decrypted."""
    segments, data = objects_of(history, "work")
    copy = damaged_copy(history, tmp_path)
    if case == "root-for-root":
        older, newest = sorted((copy / "roots").iterdir())[-2:]
        shutil.copy(older, newest)
        res = run_guide(tmp_path / "run", copy, vms="work")
        assert_refused(res, f"SWAPPED ROOT: roots/{newest.name} holds snapshot 2")
        assert not any(walk(res.target))
        return
    victim = data[1]
    source = data[2] if case == "data-for-data" else segments[0]
    shutil.copy(obj(copy, source), obj(copy, victim))
    res = run_guide(tmp_path / "run", copy, vms="work")
    message = (f"SWAPPED OBJECT: data block {victim} holds another object ({source})" if case == "data-for-data"
               else f"SWAPPED OBJECT: data block {victim} holds an object of another type (s ")  # fmt: skip
    assert_refused(res, message, "appvms/work/private.img")


def test_a_missing_object_or_pruned_snapshot_is_refused(history: History, tmp_path: Path) -> None:
    _segments, data = objects_of(history, "work")
    copy = damaged_copy(history, tmp_path)
    obj(copy, data[1]).unlink()
    res = run_guide(tmp_path / "run", copy, vms="work")
    assert_refused(res, f"data block {data[1]} is missing from the repository", "appvms/work/private.img")
    sorted((copy / "roots").iterdir())[0].unlink()  # what a prune of snapshot 1 does to its root
    res = run_guide(tmp_path / "run1", copy, snapshot="1")
    assert re.search(r"^1 +\S+ +[0-9a-f]{64} +pruned$", res.stdout, re.M), res.stdout
    assert_refused(res, "snapshot 1 was pruned")


def test_a_rolled_back_repository_is_refused(history: History, tmp_path: Path) -> None:
    """The newest snapshot withheld: the user's expected root (snapshot 3's) is not in what is left."""
    copy = damaged_copy(history, tmp_path)
    sorted((copy / "roots").iterdir())[-1].unlink()
    res = run_guide(tmp_path / "run", copy, expect=history.roots[2])
    assert_refused(res, "ROLLBACK OR FORK: the newest snapshot (2) is not root")
    assert not any(walk(res.target))


def test_a_wrong_passphrase_stops_at_the_header(history: History, tmp_path: Path) -> None:
    res = run_guide(tmp_path, history.repo, passphrase="not the passphrase")
    assert_refused(res, "VERIFICATION FAILED for repo-header: wrong passphrase")
    assert not (res.work / "plain").exists(), "nothing may be decrypted with a wrong key"


def test_the_tools_named_are_the_tools_checked() -> None:
    """The prose list of tools is the script's own check (which the restricted PATH holds to)."""
    intro = part().split("## R0.", 1)[0]
    named = set(re.findall(r"`([a-z0-9]+)[` ]", intro))
    assert set(stock_tools()) <= named, set(stock_tools()) - named


def test_the_documented_extraction_gives_the_script(tmp_path: Path) -> None:
    """The one-liner the document gives to save the script yields exactly the blocks this test runs."""
    m = re.search(r"^(sed -n '/\^# Emergency restore of a repository/.*?restore-repo\.sh)", part(), re.S | re.M)
    assert m is not None, "the document lost its extraction command"
    shutil.copy(DOC, tmp_path / DOC.name)
    subprocess.run(["sh", "-c", m.group(1)], cwd=tmp_path, check=True, timeout=30)
    settings = {s: "" for s in SETTINGS}
    extracted = (tmp_path / "restore-repo.sh").read_text(encoding="utf-8")
    ours = "".join(re.findall(r"^```sh\n(.*?)^```\s*$", part(), re.S | re.M))
    assert extracted.strip() == ours.strip()
    assert script(settings)  # and every setting is assigned exactly once
