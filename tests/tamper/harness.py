"""Builds real backups once, plays the attacker on them, and checks dom0's behaviour after each attack.

The attacker's tools: ``tarfile`` on the stored backup (the backup VM may parse tar), and a fake agent
that sends any bytes as frames.  dom0's required answer to every attack (BRIEF.md threat model): a
non-zero result with one clear error line, nothing changed in dom0 (snapshot before == after, no staging
left, no VM registered), within bounded time, and nothing decrypted/decompressed/parsed unverified
(``OrderGuard``).

"dom0 unchanged" is what the (simulated) qubesd and its storage say: the VM list (through the Admin API), the
content of qubes.xml (as a canonical document, see ``_xml_digest``), every volume (LV file, LV metadata, image)
and every other file under ``DIR/dom0``, with no file added and no dom0-home staging left.  Only the simulated
qubesd's own runtime files (its socket, locks, pid file and log: ``SIM_RUNTIME``) are not compared.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.format import crypto, extractor
from qubes_backup_dom0.format import header as header_mod
from qubes_backup_dom0.format import manifest as manifest_mod
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.qubes.qubesxml import Collection
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.restore import apply, extract
from qubes_backup_dom0.restore.machine import Restore, RestoreOptions
from qubes_backup_protocol import frames
from qubes_backup_protocol.frames import FrameType
from qubes_backup_sim import simgen
from qubes_backup_sim.launch import stop_qubesd

BIN = Path(sys.executable).parent
PASSPHRASE = b"tamper suite passphrase"
VM = "backupvm"
CHUNK = 65536
SMALL_FILE = 1 << 20
CASE_SECONDS = 20.0  # a generous bound per case; a hang would be killed long before pytest's patience
POOL = "lvm_thin"  # as a fresh R4.2 install: volumes are (simulated) thin LVs under DIR/dom0/dev/qubes_dom0
QUBES_XML = "var/lib/qubes/qubes.xml"
#: The simulated qubesd's own runtime files (relative to DIR/dom0): created when it starts, written while it
#: runs, never part of dom0's state.  Its run state (var/run/qubes-sim/state.json) is not among them: it is
#: compared like every other file (the sim may rewrite it, but its content must stay the same).
SIM_RUNTIME = frozenset({"var/run/qubesd.sock", "var/run/qubesd.lock", "var/run/qubesd-sim.pid",
                         "var/log/qubesd-sim.log"})  # fmt: skip
#: The lvm stand-in's lock file (DIR/dom0/dev/VG/.lvm/lock), created by the first LV operation; ignored only
#: while it is empty (a lock, not data).
LVM_LOCK = ".lvm/lock"
MULTI_CHUNK = ("vm5", "vm6")  # VM archives the cases need with several chunks (test_frames, test_tar_agent)
Members = list[tuple[str, bytes]]
_PRISTINE: dict[Path, Path] = {}  # dom0 root -> a copy, to reset a shared target after a failed case


@dataclass
class World:
    """Everything built once per session: the source system, a fresh target dom0, two backups (A, B)."""

    base: Path
    src: System
    target: System
    a_tar: Path  # the backup the attacks are made on (inside the target's backup VM)
    b_tar: Path  # another backup of the same system with the same passphrase (for transplants)
    a: Members
    b: Members

    @property
    def a_location(self) -> str:
        return "/home/user/backups/" + self.a_tar.name

    def env(self, system: System | None = None, **extra: str) -> dict[str, str]:
        sim = (system or self.target).sim_dir
        return {**os.environ, "QUBES_SIM": str(sim), **extra}


def read_members(path: Path) -> Members:
    with tarfile.open(path) as tar:
        out = []
        for m in tar:
            f = tar.extractfile(m)
            assert f is not None
            out.append((m.name, f.read()))
        return out


def write_tar(members: Members, path: Path) -> None:
    """The attacker rewrites the outer tar (plain ustar members, like the real writer)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))


def _backup(src: System, location: str, env: dict[str, str]) -> None:
    (src.vm_root(VM) / location.lstrip("/")).mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "qvm-backup"), "-q", "-y", "-d", VM, "-p", "/pw", "--kdf-n", "1024", "--weak-kdf-ok",
           "--chunk-size", str(CHUNK), location]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)


def fresh_target(path: Path, keep: tuple[str, ...] = (VM,)) -> System:
    """A freshly installed dom0 (dom0 and the backup VM only) to restore into, with the passphrase file."""
    simgen.generate(path, "small", pool=POOL, keep=keep)
    system = System(path.resolve(), path.resolve() / "dom0", "user")
    # A real install has both VM directories from the start (the template RPMs fill vm-templates); the
    # simulated qubesd creates a missing one for a new VM and, like qubesd, leaves it when the VM goes.
    for d in ("appvms", "vm-templates"):
        (system.qubes_root / d).mkdir(exist_ok=True)
    (system.dom0_root / "pw").write_bytes(PASSPHRASE + b"\n")
    return system


def build_world(base: Path) -> World:
    """One small simulated system, two backups with the same passphrase, one fresh dom0 to restore into."""
    src_dir, dst_dir = base / "src", base / "dst"
    # Small volumes (0.1 GiB apparent in all, the data of the "small" scale): every restore that gets past the
    # manifest imports them whole, holes as zeros, through the import service.
    simgen.generate(src_dir, "small", pool=POOL, running=["sys-firewall"], apparent_gib=0.1)
    src = System(src_dir.resolve(), src_dir.resolve() / "dom0", "user")
    (src.dom0_root / "pw").write_bytes(PASSPHRASE + b"\n")
    env = {**os.environ, "QUBES_SIM": str(src.sim_dir)}
    _backup(src, "/home/user/backups-a", env)
    _backup(src, "/home/user/backups-b", env)
    (a_src,) = (src.vm_root(VM) / "home/user/backups-a").glob("qubes-backup-*")
    (b_src,) = (src.vm_root(VM) / "home/user/backups-b").glob("qubes-backup-*")
    target = fresh_target(dst_dir)
    backups = target.vm_root(VM) / "home/user/backups"
    backups.mkdir(parents=True, exist_ok=True)
    a_tar, b_tar = backups / a_src.name, backups / ("other-" + b_src.name)
    shutil.copyfile(a_src, a_tar)
    shutil.copyfile(b_src, b_tar)
    stop_qubesd(target.sim_dir)  # type: ignore[arg-type]  # (none should run yet; the copy needs it stopped)
    shutil.copytree(target.dom0_root, base / "pristine-dom0", symlinks=True, ignore=ignore_sim_runtime)
    _PRISTINE[target.dom0_root] = base / "pristine-dom0"
    world = World(base, src, target, a_tar, b_tar, read_members(a_tar), read_members(b_tar))
    for archive in MULTI_CHUNK:  # the cases on chunks in the middle and at the end of an archive need them
        chunks = [n for n, _ in world.a if n.startswith(archive + "/") and n[-1].isdigit()]
        assert len(chunks) >= 4, f"archive {archive} of the tamper backup has {len(chunks)} chunk(s), not >= 4"
    return world


def ignore_sim_runtime(dirpath: str, names: list[str]) -> set[str]:
    """For shutil.copytree: never copy a (running) qubesd's socket (a live UNIX socket cannot be copied:
    ENXIO), its lock, pid file or log; nor any other socket."""
    out = set()
    for name in names:
        p = os.path.join(dirpath, name)
        if name in {Path(r).name for r in SIM_RUNTIME} or stat.S_ISSOCK(os.lstat(p).st_mode):
            out.add(name)
    return out


def clone_target(world: World, name: str) -> System:
    """A private copy of the target system (for runs that are allowed to change it).  The copy gets its own
    simulated qubesd on first use; qubes.xml is consistent on disk while the original's runs (it saves
    atomically after every change)."""
    dst = world.base / name
    if dst.exists():
        stop_qubesd(dst)
        shutil.rmtree(dst)
    shutil.copytree(world.target.sim_dir, dst, symlinks=True, ignore=ignore_sim_runtime)  # type: ignore[arg-type]
    return System(dst.resolve(), dst.resolve() / "dom0", "user")


def backup_vm_names(world: World) -> set[str]:
    """The VMs backup A holds (read with the passphrase, outside any OrderGuard)."""
    members = dict(world.a)
    hdr = header_mod.parse(members["backup-header"])
    keys = crypto.keys_from_passphrase(PASSPHRASE, hdr.kdf, hdr.backup_id)
    m = manifest_mod.parse(bytes(crypto.decrypt(keys, members["manifest"])))
    return {a.vm for a in m.archives if a.kind == "vm"}


# ------------------------------------------------------------------------------------------ the snapshot

def _sparse_digest(path: Path) -> str:
    """Hash of a (sparse) file's content: its data regions and where they are (a thin LV of many GiB that
    holds a few MiB costs a few MiB to hash)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        size, off = os.fstat(fd).st_size, 0
        h.update(b"%d\n" % size)
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            h.update(b"@%d\n" % start)
            os.lseek(fd, start, os.SEEK_SET)
            left = end - start
            while left:
                piece = f.read(min(left, 1 << 20))
                if not piece:
                    break
                h.update(piece)
                left -= len(piece)
            off = end
    return h.hexdigest()


def _xml_digest(path: Path) -> str:
    """qubes.xml as a canonical document (C14N).  The simulated qubesd owns the file and rewrites it from its
    model after every change, so a VM created and removed again (a rollback) leaves the same document in
    other bytes: an empty element the generator wrote as ``<property name="netvm"></property>`` comes back
    as ``<property name="netvm"/>``.  Canonical XML makes those equal and everything else (elements,
    attributes, text, order) count; byte-equal files are canonically equal too."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    root = etree.fromstring(path.read_bytes(), parser)
    return hashlib.sha256(etree.tostring(root, method="c14n")).hexdigest()


def vm_state(system: System) -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """The VM list as qubesd reports it: name -> (class, state, tags)."""
    q = Qubes(system)
    return {name: (klass, state, tuple(sorted(q.tags(name))) if klass != "AdminVM" else ())
            for name, (klass, state) in q.vm_list().items()}  # fmt: skip


def snapshot(system: System) -> dict[str, tuple[Any, ...]]:
    """dom0 as qubesd and the files show it: the VM list (key ``qubesd:vms``), then path -> (kind, mode,
    content digest) for every file, volume and directory under DIR/dom0 except the sim qubesd's runtime."""
    out: dict[str, tuple[Any, ...]] = {"qubesd:vms": ("vms", tuple(sorted(vm_state(system).items())))}
    root = system.dom0_root
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if rel in SIM_RUNTIME or (rel.endswith("/" + LVM_LOCK) and stat.S_ISREG(st.st_mode) and not st.st_size):
                continue
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            elif rel == QUBES_XML:
                out[rel] = ("xml", stat.S_IMODE(st.st_mode), _xml_digest(p))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", stat.S_IMODE(st.st_mode), _sparse_digest(p))
            else:
                out[rel] = ("special", stat.S_IFMT(st.st_mode))
    return out


def home_staging(system: System) -> list[Path]:
    home = system.home_dir
    return sorted(p for p in home.iterdir() if p.name.startswith(apply.STAGING_PREFIX)) if home.is_dir() else []


def assert_unchanged(system: System, before: dict[str, tuple[Any, ...]]) -> None:
    assert not home_staging(system), f"staging left behind: {home_staging(system)}"
    after = snapshot(system)
    assert after["qubesd:vms"] == before["qubesd:vms"], f"VMs changed: {before['qubesd:vms']} -> {after['qubesd:vms']}"
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    assert not (added or removed or changed), f"dom0 changed: +{added[:5]} -{removed[:5]} ~{changed[:5]}"
    assert set(vm_state(system)) == {"dom0", VM}


def assert_one_line(message: str) -> None:
    """One clear line: non-empty, no newline, no traceback, printable."""
    assert message and "\n" not in message and "Traceback" not in message, repr(message)
    assert all(32 <= ord(c) < 127 or ord(c) > 159 for c in message), repr(message)
    assert "internal error" not in message, message


# ------------------------------------------------------------------------------------ the fake agent

def encode_stream(members: Members, end: bool = True) -> bytes:
    """What an honest agent sends for a full restore: every member as a MEMBER frame, then END."""
    out = bytearray()
    for name, data in members:
        raw = name.encode("latin-1")
        out += frames.encode_header(FrameType.MEMBER, len(raw), len(data)) + raw + data
    if end:
        out += frames.encode(FrameType.END)
    return bytes(out)


class StreamTransport:
    """A fake qubes.Restore: a process that sends a prepared byte stream, then drains, stalls or floods.

    ``after``: "drain" (read dom0's frames until it closes, then exit 0), "stall" (sleep), "zeros" (an
    endless stream of zero bytes).  A real process with real pipes, so the Channel's poll/timeout code runs.
    """

    confined = False

    def __init__(self, stream_file: Path, after: str = "drain") -> None:
        self.stream_file = stream_file
        self.after = after

    def start(self, service: str, vm: str) -> subprocess.Popen[bytes]:
        tail = {"drain": "exec cat >/dev/null", "stall": "exec sleep 60", "zeros": "exec cat /dev/zero"}[self.after]
        return subprocess.Popen(
            ["sh", "-c", f'cat "$0"; {tail}', str(self.stream_file)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
            start_new_session=True,
        )  # fmt: skip


def run_restore(system: System, location: str, transport: Any = None, options: RestoreOptions | None = None) -> Restore:
    """The CLI's sequence through the Python API (open, plan, refuse plan errors, run, close)."""
    job = Restore(system, location, PASSPHRASE, source_vm=VM, options=options or RestoreOptions(),
                  transport=transport)  # fmt: skip
    try:
        job.open()
        plan = job.plan()
        if plan.errors:
            raise BackupError(plan.errors[0])
        job.run()
    finally:
        job.close()
    return job


def expect_refused(system: System, location: str, transport: Any = None, seconds: float = CASE_SECONDS) -> str:
    """Run a restore that must fail: returns its error line after checking every promise of the brief."""
    before = snapshot(system)
    start = time.monotonic()
    try:
        try:
            run_restore(system, location, transport)
        except BackupError as e:
            message = str(e)
        except Exception as e:  # any other exception reaches the CLI as an internal error: a finding
            pytest.fail(f"restore leaked {type(e).__name__}: {e}")
        else:
            pytest.fail("the tampered backup was restored")
        elapsed = time.monotonic() - start
        assert elapsed < seconds, f"took {elapsed:.1f} s"
        assert_one_line(message)
        assert_unchanged(system, before)
    except BaseException:
        reset(system)  # one failing case must not make every later case fail too
        raise
    return message


def reset(system: System) -> None:
    """Put a shared target back as built (its qubesd stopped first: it would keep its own model)."""
    pristine = _PRISTINE.get(system.dom0_root)
    if pristine is not None:
        stop_qubesd(system.sim_dir)  # type: ignore[arg-type]
        shutil.rmtree(system.dom0_root)
        shutil.copytree(pristine, system.dom0_root, symlinks=True)


def refuse_stream(world: World, stream: bytes, after: str = "drain", seconds: float = CASE_SECONDS) -> str:
    path = world.base / "stream.bin"
    path.write_bytes(stream)
    return expect_refused(world.target, world.a_location, StreamTransport(path, after), seconds)


def refuse_tar(world: World, members: Members | None = None, raw: bytes | None = None) -> str:
    """Store a bent tar in the backup VM and restore it through the real (sandboxed) agent."""
    path = world.target.vm_root(VM) / "home/user/backups/bent.tar"
    if raw is not None:
        path.write_bytes(raw)
    else:
        assert members is not None
        write_tar(members, path)
    try:
        return expect_refused(world.target, "/home/user/backups/bent.tar")
    finally:
        path.unlink()


# -------------------------------------------------------------------------------------- proof of order

def _h(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _base(data: Any) -> Any:
    """The object a memoryview (or a view of a view) shows: slices of one buffer share it."""
    return data.obj if isinstance(data, memoryview) else data


class OrderGuard:
    """Instruments decryption, decompression, XML parsing, extraction and the sinks (in-process restores).

    Records the hash of every member whose MAC verified; then each later stage must only ever see the
    output of the stage before it: decrypt (receive.py) <- verified, chunk feed / manifest.parse <- decrypt
    output, decompressor (extract.py) <- the chunk feed only, Extractor.feed <- decompressor output, a volume
    import or in-memory file (firewall rules, notes) <- a piece of what the extractor is being fed right then,
    Collection.from_bytes <- a verified manifest's <qubes> (dom0 parses no qubes.xml of its own any more: it
    asks qubesd).  The names are patched where the restore looks them up: module attributes of crypto and
    manifest, ``extract.decompressed_reader`` (imported there), methods of extract.ChunkFeed, extractor.Extractor,
    apply.ImportSink and extract.MemorySink.  Violations are collected, not raised, since some stages run in
    the extraction thread whose exceptions the restore turns into error messages.
    """

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.verified: set[str] = set()
        self.decrypted: set[str] = set()
        self.decompressed: set[str] = set()
        self.qubes: set[str] = set()
        self.trusted: set[str] = set()
        self.calls: Counter[str] = Counter()
        self.violations: list[str] = []
        self._feeding = threading.local()  # per thread: the object the extractor is being fed, if any
        self._install(mp)

    def trust_file(self, path: Path) -> None:
        if path.is_file():
            self.trusted.add(_h(path.read_bytes()))

    def _bad(self, what: str) -> None:
        self.violations.append(what)

    def _install(self, mp: pytest.MonkeyPatch) -> None:
        self._install_crypto(mp)
        self._install_unpack(mp)
        self._install_sinks(mp)

    def _install_crypto(self, mp: pytest.MonkeyPatch) -> None:
        guard = self
        orig_verify, orig_decrypt = crypto.verify_member, crypto.decrypt
        orig_parse, orig_derive = manifest_mod.parse, crypto.derive_master
        orig_from_bytes = Collection.from_bytes.__func__  # type: ignore[attr-defined]

        def verify_member(keys: crypto.Keys, name: str, data: Any, mac: bytes) -> bool:
            ok = orig_verify(keys, name, data, mac)
            guard.calls["verify"] += 1
            if ok:
                guard.verified.add(_h(data))
            return ok

        def decrypt(keys: crypto.Keys, member: Any, out: Any = None) -> Any:
            guard.calls["decrypt"] += 1
            if _h(member) not in guard.verified:
                guard._bad("decrypt got unverified bytes")
            out = orig_decrypt(keys, member, out=out)
            guard.decrypted.add(_h(out))
            return out

        def parse(data: bytes) -> manifest_mod.Manifest:
            guard.calls["manifest.parse"] += 1
            if _h(data) not in guard.decrypted:
                guard._bad("manifest.parse got bytes that are not a verified decryption")
            m = orig_parse(data)
            guard.qubes.add(_h(m.qubes))
            return m

        def from_bytes(cls: type[Collection], data: bytes) -> Collection:
            guard.calls["qubes.xml"] += 1
            if _h(data) not in guard.qubes and _h(data) not in guard.trusted:
                guard._bad("qubes.xml parser got bytes that are neither verified nor trusted")
            return orig_from_bytes(cls, data)

        def derive_master(passphrase: bytes, kdf: crypto.KdfParams) -> bytes:
            guard.calls["kdf"] += 1
            try:
                header_mod.check_kdf(kdf.n, kdf.r, kdf.p)
            except BackupError:
                guard._bad(f"the KDF ran with parameters above the ceiling (N={kdf.n}, r={kdf.r}, p={kdf.p})")
                raise
            return orig_derive(passphrase, kdf)

        mp.setattr(crypto, "verify_member", verify_member)
        mp.setattr(crypto, "decrypt", decrypt)
        mp.setattr(crypto, "derive_master", derive_master)
        mp.setattr(manifest_mod, "parse", parse)
        mp.setattr(Collection, "from_bytes", classmethod(from_bytes))

    def _install_unpack(self, mp: pytest.MonkeyPatch) -> None:
        guard = self
        orig_reader, orig_put, orig_feed = extract.decompressed_reader, extract.ChunkFeed.put, extractor.Extractor.feed

        def put(self: extract.ChunkFeed, data: bytes | memoryview | None) -> None:
            if data is not None:
                guard.calls["feed"] += 1
                if _h(data) not in guard.decrypted:
                    guard._bad("chunk feed got bytes that are not a verified decryption")
            orig_put(self, data)

        class Reader:
            def __init__(self, inner_reader: Any) -> None:
                self.inner = inner_reader

            def read(self, size: int = -1) -> Any:
                out = self.inner.read(size)
                guard.decompressed.add(_h(out))
                return out

        def decompressed_reader(compression: str, raw: Any) -> Any:
            guard.calls["decompress"] += 1
            if not isinstance(raw, extract.ChunkFeed):
                guard._bad(f"decompressor reads from {type(raw).__name__}, not the verified chunk feed")
            return Reader(orig_reader(compression, raw))

        def feed(self: extractor.Extractor, data: Any) -> None:
            guard.calls["extract"] += 1
            if _h(data) not in guard.decompressed:
                guard._bad("extractor got bytes that did not come out of the decompressor")
            guard._feeding.obj = _base(data)
            try:
                orig_feed(self, data)
            finally:
                guard._feeding.obj = None

        mp.setattr(extract, "decompressed_reader", decompressed_reader)
        mp.setattr(extract.ChunkFeed, "put", put)
        mp.setattr(extractor.Extractor, "feed", feed)

    def _install_sinks(self, mp: pytest.MonkeyPatch) -> None:
        for cls, what in ((apply.ImportSink, "volume import"), (extract.MemorySink, "in-memory file")):
            mp.setattr(cls, "write_at", self._guarded_write(cls.write_at, what))

    def _guarded_write(self, orig: Callable[[Any, int, memoryview], None], what: str) -> Callable[..., None]:
        guard = self

        def write_at(sink: Any, offset: int, data: memoryview) -> None:
            guard.calls[what] += 1
            fed = getattr(guard._feeding, "obj", None)
            if fed is None or _base(data) is not fed:
                guard._bad(f"{what} got bytes that are not a piece of the extractor's verified input")
            orig(sink, offset, data)

        return write_at

    def check(self) -> None:
        assert not self.violations, self.violations
