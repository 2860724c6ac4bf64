"""Builds real backups once, plays the attacker on them, and checks dom0's behaviour after each attack.

The attacker's tools: ``tarfile`` on the stored backup (the backup VM may parse tar), and a fake agent
that sends any bytes as frames.  dom0's required answer to every attack (BRIEF.md threat model): a
non-zero result with one clear error line, nothing changed in dom0 (snapshot before == after, no staging
left, no VM registered), within bounded time, and nothing decrypted/decompressed/parsed unverified
(``OrderGuard``).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qubes_backup_dom0 import crypto, inner, restore
from qubes_backup_dom0 import manifest as manifest_mod
from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.qubesxml import Collection
from qubes_backup_dom0.restore import Restore, RestoreOptions
from qubes_backup_dom0.system import System
from qubes_backup_protocol import frames
from qubes_backup_protocol.frames import FrameType
from qubes_backup_sim import simgen
from qubes_backup_sim.store import write_atomic

BIN = Path(sys.executable).parent
PASSPHRASE = b"tamper suite passphrase"
VM = "backupvm"
CHUNK = 65536
SMALL_FILE = 1 << 20
CASE_SECONDS = 20.0  # a generous bound per case; a hang would be killed long before pytest's patience
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


def build_world(base: Path) -> World:
    """One small simulated system, two backups with the same passphrase, one fresh dom0 to restore into."""
    src_dir, dst_dir = base / "src", base / "dst"
    simgen.generate(src_dir, "small", pool="file")
    src = System(src_dir.resolve(), src_dir.resolve() / "dom0", "user")
    (src.dom0_root / "pw").write_bytes(PASSPHRASE + b"\n")
    env = {**os.environ, "QUBES_SIM": str(src.sim_dir)}
    _backup(src, "/home/user/backups-a", env)
    _backup(src, "/home/user/backups-b", env)
    (a_src,) = (src.vm_root(VM) / "home/user/backups-a").glob("qubes-backup-*")
    (b_src,) = (src.vm_root(VM) / "home/user/backups-b").glob("qubes-backup-*")
    # A freshly installed dom0 (only dom0 and the backup VM), as in the demo's restore.
    target = System(dst_dir.resolve(), dst_dir.resolve() / "dom0", "user")
    fresh = Collection.load(src.qubes_xml)
    for dom in list(fresh.domains):
        if dom.name not in ("dom0", VM):
            dom.element.getparent().remove(dom.element)
    target.qubes_root.mkdir(parents=True)
    target.home_dir.mkdir(parents=True)
    write_atomic(fresh, target.qubes_xml)
    (target.dom0_root / "pw").write_bytes(PASSPHRASE + b"\n")
    backups = target.vm_root(VM) / "home/user/backups"
    backups.mkdir(parents=True)
    a_tar, b_tar = backups / a_src.name, backups / ("other-" + b_src.name)
    shutil.copyfile(a_src, a_tar)
    shutil.copyfile(b_src, b_tar)
    shutil.copytree(target.dom0_root, base / "pristine-dom0", symlinks=True)
    _PRISTINE[target.dom0_root] = base / "pristine-dom0"
    return World(base, src, target, a_tar, b_tar, read_members(a_tar), read_members(b_tar))


def clone_target(world: World, name: str) -> System:
    """A private copy of the target system (for runs that are allowed to change it)."""
    dst = world.base / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(world.target.sim_dir, dst, symlinks=True)  # type: ignore[arg-type]
    return System(dst.resolve(), dst.resolve() / "dom0", "user")


# ------------------------------------------------------------------------------------------ the snapshot

def snapshot(system: System) -> dict[str, tuple[Any, ...]]:
    """dom0 as files: path -> (kind, size, content hash for small files / allocated blocks for images)."""
    out: dict[str, tuple[Any, ...]] = {}
    root = system.dom0_root
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            elif st.st_size <= SMALL_FILE:
                out[rel] = ("file", st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = ("image", st.st_size, st.st_blocks)
    return out


def assert_unchanged(system: System, before: dict[str, tuple[Any, ...]]) -> None:
    after = snapshot(system)
    staging = [k for k in after if Path(k).name.startswith(restore.STAGING_PREFIX)]
    assert not staging, f"staging left behind: {staging}"
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    assert not (added or removed or changed), f"dom0 changed: +{added[:5]} -{removed[:5]} ~{changed[:5]}"
    assert set(Collection.load(system.qubes_xml).names()) == {"dom0", VM}


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
    pristine = _PRISTINE.get(system.dom0_root)
    if pristine is not None:
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


class OrderGuard:
    """Instruments decryption, decompression, XML parsing and extraction (in-process restores).

    Records the hash of every member whose MAC verified; then each later stage must only ever see the
    output of the stage before it: decrypt <- verified, chunk feed / manifest.parse <- decrypt output,
    decompressor <- the chunk feed only, Extractor.feed <- decompressor output, Collection.from_bytes <-
    a verified manifest's <qubes> (or dom0's own qubes.xml).  Violations are collected, not raised, since
    some stages run in the extraction thread whose exceptions the restore turns into error messages.
    """

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.verified: set[str] = set()
        self.decrypted: set[str] = set()
        self.decompressed: set[str] = set()
        self.qubes: set[str] = set()
        self.trusted: set[str] = set()
        self.calls: Counter[str] = Counter()
        self.violations: list[str] = []
        self._install(mp)

    def trust_file(self, path: Path) -> None:
        if path.is_file():
            self.trusted.add(_h(path.read_bytes()))

    def _bad(self, what: str) -> None:
        self.violations.append(what)

    def _install(self, mp: pytest.MonkeyPatch) -> None:
        guard = self
        orig_verify, orig_decrypt = crypto.verify_member, crypto.decrypt
        orig_parse, orig_reader = manifest_mod.parse, restore.decompressed_reader
        orig_feed, orig_put = inner.Extractor.feed, restore._ChunkFeed.put
        orig_from_bytes = Collection.from_bytes.__func__  # type: ignore[attr-defined]
        orig_derive = crypto.derive_master

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

        def put(self: restore._ChunkFeed, data: bytes | None) -> None:
            if data is not None:
                guard.calls["feed"] += 1
                if _h(data) not in guard.decrypted:
                    guard._bad("chunk feed got bytes that are not a verified decryption")
            orig_put(self, data)

        class Reader:
            def __init__(self, inner_reader: Any) -> None:
                self.inner = inner_reader

            def read(self, size: int = -1) -> bytes:
                out = self.inner.read(size)
                guard.decompressed.add(_h(out))
                return out

        def decompressed_reader(compression: str, raw: Any) -> Any:
            guard.calls["decompress"] += 1
            if not isinstance(raw, restore._ChunkFeed):
                guard._bad(f"decompressor reads from {type(raw).__name__}, not the verified chunk feed")
            return Reader(orig_reader(compression, raw))

        def feed(self: inner.Extractor, data: Any) -> None:
            guard.calls["extract"] += 1
            if _h(data) not in guard.decompressed:
                guard._bad("extractor got bytes that did not come out of the decompressor")
            orig_feed(self, data)

        def from_bytes(cls: type[Collection], data: bytes) -> Collection:
            guard.calls["qubes.xml"] += 1
            if _h(data) not in guard.qubes and _h(data) not in guard.trusted:
                guard._bad("qubes.xml parser got bytes that are neither verified nor dom0's own")
            return orig_from_bytes(cls, data)

        def derive_master(passphrase: bytes, kdf: crypto.KdfParams) -> bytes:
            guard.calls["kdf"] += 1
            from qubes_backup_dom0 import header

            try:
                header.check_kdf(kdf.n, kdf.r, kdf.p)
            except BackupError:
                guard._bad(f"the KDF ran with parameters above the ceiling (N={kdf.n}, r={kdf.r}, p={kdf.p})")
                raise
            return orig_derive(passphrase, kdf)

        mp.setattr(crypto, "verify_member", verify_member)
        mp.setattr(crypto, "decrypt", decrypt)
        mp.setattr(crypto, "derive_master", derive_master)
        mp.setattr(manifest_mod, "parse", parse)
        mp.setattr(restore, "decompressed_reader", decompressed_reader)
        mp.setattr(restore._ChunkFeed, "put", put)
        mp.setattr(inner.Extractor, "feed", feed)
        mp.setattr(Collection, "from_bytes", classmethod(from_bytes))

    def check(self) -> None:
        assert not self.violations, self.violations
