"""A hostile backup VM against a repository, second set (issue 20: at least 40 cases besides
test_repo_hostile.py's): rollback, forks, wrong and renamed roots, a bent opening, GET answers out of order,
repeated, renamed, dropped or replaced by ERROR/END, dropped/duplicated/swapped/mixed objects, objects of
another repository made with the same passphrase, oversize objects, decompression bombs, references that do
not match the body, wrong type letters, history tampering, a prune that deleted a needed object.

Every case is one row of ``CASES``: what the attacker does to the repository's files (``setup``), and/or how
the backup VM bends the agent's answers (a proxy between dom0 and the real agent, tests/repo_proxy_agent.py,
which starts the agent through its real service entry point).  Then a restore (or ``--verify-only``, an older
snapshot, or a backup onto the hostile repository) must fail with exactly one line and the exit code of
docs/EXIT-CODES.md (3: failed verification), dom0 unchanged (conftest ``Unchanged``), and a backup must not
have written a root.

Some attacks need objects that verify: written by someone who holds the passphrase (a compromised machine
that once made backups, docs/SECURITY.md); the test forges them with the repository's keys (``Forge``) and
adds a snapshot 4 whose history lists dom0's snapshot 3, so only the later checks can catch them.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import zstandard
from conftest import Unchanged, one_error_line
from qubes_backup_dom0.backup.plan import plan_backup
from qubes_backup_dom0.backup.repository import RepoBackup, RepoOptions
from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.format import crypto, repo, repotree
from qubes_backup_dom0.format.repotree import HistoryEntry, Root, Tree
from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.restore.plan import RestoreOptions
from qubes_backup_dom0.restore.repository import RepoRestore
from test_repo_hostile import World, world  # noqa: F401  (the module-scoped fixture: three snapshots)
from test_repo_roundtrip import PASS, REPO

BS = 64 << 10
PROXY = Path(__file__).with_name("repo_proxy_agent.py")
NEW_ROOT = "roots/0000000004-20990101T000000Z"


class ProxyTransport:
    """Starts the hostile backup VM: the proxy, which starts the real agent."""

    confined = False

    def __init__(self, system: System, spec: dict[str, object]) -> None:
        self.system = system
        self.spec = spec

    def start(self, service: str, vm: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, str(PROXY), json.dumps(self.spec), str(self.system.sim_dir), service, vm]
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                bufsize=0, start_new_session=True)


# ------------------------------------------------------------------------------------ the attacker's tools

def keys(w: World) -> repo.RepoKeys:
    return repo.keys_from_passphrase(PASS, repo.parse_header((w.repo / "repo-header").read_bytes()))


def obj_path(w: World, oid: str) -> Path:
    return w.repo / "objects" / oid[:2] / oid


def put(w: World, oid: str, raw: bytes) -> None:
    obj_path(w, oid).parent.mkdir(exist_ok=True)
    obj_path(w, oid).write_bytes(raw)


def open_file(w: World, path: Path, otype: str) -> repo.Opened:
    return repo.open_object(keys(w), path.read_bytes(), otype, None if otype == repo.ROOT else path.name, BS)


def forge_raw(k: repo.RepoKeys, otype: str, oid: str, body: bytes, refs: list[str] = [],  # noqa: B006
              comp: str = "n", head_type: str | None = None) -> bytes:
    """An object that verifies (MAC of this repository), with whatever header, references and body."""
    head = b"qbr1 %s %s %s %08d\n" % ((head_type or otype).encode(), comp.encode(), oid.encode(), len(refs))
    iv = os.urandom(16)
    pre = head + b"".join(r.encode() + b"\n" for r in refs) + iv + crypto.aes_ctr(k.enc_key, iv, body)
    return pre + crypto.hmac_sha256(k.mac_key, pre).hex().encode() + b"\n"


def clear_refs(raw: bytes) -> list[str]:
    n = int(raw[75:83])
    return [raw[83 + 65 * i : 83 + 65 * i + 64].decode() for i in range(n)]


def reachable(w: World, root_file: Path) -> set[str]:
    """Every object a root references, following the references in clear (as a keyless prune does)."""
    seen: set[str] = set()
    todo = clear_refs(root_file.read_bytes())
    while todo:
        oid = todo.pop()
        if oid not in seen:
            seen.add(oid)
            todo += clear_refs(obj_path(w, oid).read_bytes())
    return seen


def render_root(r: Root) -> bytes:
    lines = ["qubes-backup-root 1", f"repository {r.repo_id}", f"seq {r.seq}", f"created {r.created}",
             f"block-size {r.block_size}", f"qubes {r.qubes}"]
    lines += [f"archive {a.member} {a.kind} {a.vm} {a.tree} {a.captured}" for a in r.archives]
    lines += [f"history {h.seq} {h.root} {h.created}" for h in r.history]
    return ("\n".join([*lines, "end"]) + "\n").encode()


def render_tree(t: Tree) -> bytes:
    lines = ["qubes-backup-tree 1"]
    for f in t.files:
        lines.append(f"file {f.type} {f.size} {f.data} {f.mode:04o} {f.mtime} {repotree.encode_path(f.path)}")
        lines += [f"seg {n} {sid}" for n, sid in f.segments]
        if f.link is not None:
            lines.append(f"link {repotree.encode_path(f.link)}")
    return ("\n".join([*lines, "end"]) + "\n").encode()


@dataclass
class Forge:
    """Snapshot 3 as its writer saw it, to be bent and written back as an authentic snapshot 4."""

    w: World
    k: repo.RepoKeys
    root_id: str
    root: Root
    trees: dict[str, Tree]
    tree_refs: dict[str, list[str]] = field(default_factory=dict)  # member -> references shown (default: true ones)
    history: list[HistoryEntry] | None = None  # the new root's history (default: snapshot 3's + snapshot 3)
    drop_qubes_ref: bool = False  # the root's clear references leave out its qubes.xml object

    @classmethod
    def load(cls, w: World) -> Forge:
        k = keys(w)
        opened = open_file(w, w.roots()[-1], repo.ROOT)
        root = repotree.parse_root(opened.plaintext, opened.refs)
        trees = {}
        for a in root.archives:
            t = open_file(w, obj_path(w, a.tree), repo.TREE)
            trees[a.member] = repotree.parse_tree(t.plaintext, BS, t.refs)
        return cls(w, k, opened.id, root, trees)

    def put(self, otype: str, plain: bytes, refs: list[str] | None = None, oid: str | None = None) -> str:
        oid = oid or repo.object_id(self.k, otype, plain)
        put(self.w, oid, forge_raw(self.k, otype, oid, plain, sorted(set(refs or []))))
        return oid

    def segment(self, sid: str) -> repotree.Segment:
        s = open_file(self.w, obj_path(self.w, sid), repo.SEGMENT)
        return repotree.parse_segment(s.plaintext, s.refs)

    def file(self, vm: str, suffix: str = "private.img") -> repotree.TreeFile:
        member = next(a.member for a in self.root.archives if a.vm == vm)
        return next(f for f in self.trees[member].files if f.path.endswith(suffix))

    def write(self, seq: int = 4, name: str = NEW_ROOT) -> None:
        archives = []
        for a in self.root.archives:
            t = self.trees[a.member]
            refs = self.tree_refs.get(a.member, t.refs())
            tid = self.put(repo.TREE, render_tree(t), refs)
            archives.append(repotree.RootArchive(a.member, a.kind, a.vm, tid, "2099-01-01T00:00:00Z"))
        history = self.history
        if history is None:
            history = [*self.root.history, HistoryEntry(self.root.seq, self.root_id, self.root.created)]
        new = Root(self.root.repo_id, seq, "2099-01-01T00:00:00Z", self.root.block_size, self.root.qubes, archives,
                   history)
        plain = render_root(new)
        refs = sorted({*([] if self.drop_qubes_ref else [new.qubes]), *(a.tree for a in archives)})
        rid = repo.object_id(self.k, repo.ROOT, plain)
        (self.w.repo / name).write_bytes(forge_raw(self.k, repo.ROOT, rid, plain, refs))


@dataclass(frozen=True)
class forged:  # lowercase: used like the other setup makers
    """Setup: snapshot 3 bent by ``edit``, written back as an authentic snapshot 4.  dom0 verifies that root
    (it descends from its record) and may record it as the newest: the one change to dom0 allowed."""

    edit: Callable[[Forge], None]

    def __call__(self, w: World) -> None:
        f = Forge.load(w)
        self.edit(f)
        f.write()


def newest_ids(w: World, otype: str) -> list[Path]:
    """The objects of type ``otype`` the newest snapshot references (so the restore asks for them)."""
    live = reachable(w, w.roots()[-1])
    return [p for p in w.objects(otype) if p.name in live]


def for_newest(otype: str, make: Callable[[World, Path], bytes | None]) -> Callable[[World], None]:
    """``make`` applied to one object of the newest snapshot (a restore reads them all)."""

    def setup(w: World) -> None:
        for p in newest_ids(w, otype)[:1]:
            raw = make(w, p)
            if raw is None:
                p.unlink()
            else:
                p.write_bytes(raw)

    return setup


# -------------------------------------------------------------------------------------- bombs and bodies

def bomb_lying_size(stated: int, produced: int) -> bytes:
    """A zstd frame (64 KiB window) whose header states ``stated`` bytes but whose blocks produce ``produced``."""
    params = zstandard.ZstdCompressionParameters(window_log=16, write_content_size=True)
    frame = bytearray(zstandard.ZstdCompressor(compression_params=params).compress(bytes(produced)))
    desc = frame[4]
    assert desc >> 6 == 2 and not desc & 0x20, hex(desc)  # a 4-byte content size after a window descriptor
    frame[6:10] = struct.pack("<I", stated)
    return bytes(frame)


def bomb(w: World, p: Path, body: bytes) -> bytes:
    return forge_raw(keys(w), repo.DATA, p.name, body, comp="z")


def other_block(w: World, p: Path) -> bytes:
    """Another data block's plaintext of the same length, sealed under this block's id."""
    k = keys(w)
    mine = open_file(w, p, repo.DATA).plaintext
    for q in w.objects("d"):
        plain = open_file(w, q, repo.DATA).plaintext
        if q != p and len(plain) == len(mine) and plain != mine:
            return forge_raw(k, repo.DATA, p.name, plain)
    raise AssertionError("no other block of that length")


# -------------------------------------------------------------------------------------------- edits (Forge)

def block_past_end(f: Forge) -> None:
    """A one-block file (firewall rules or notes) whose map names a second block."""
    tf = next(t for t in f.trees.values() for t in t.files if t.segments and 0 < t.size < BS)
    (n, sid), = tf.segments
    seg = f.segment(sid)
    blocks = [*seg.blocks, (1, seg.blocks[0][1])]
    body = "qubes-backup-segment 1\n" + "".join(f"{b} {d}\n" for b, d in blocks) + "end\n"
    tf.segments = [(n, f.put(repo.SEGMENT, body.encode(), [d for _, d in blocks]))]


def data_mismatch(f: Forge) -> None:
    f.file("work").data += BS


def short_block_mid_file(f: Forge) -> None:
    """A map naming, at a full-size position, a data object whose plaintext is shorter."""
    short = f.put(repo.DATA, b"short block")
    tf = f.file("vault")
    n, sid = tf.segments[0]
    seg = f.segment(sid)
    blocks = [(seg.blocks[0][0], short), *seg.blocks[1:]]
    body = "qubes-backup-segment 1\n" + "".join(f"{b} {d}\n" for b, d in blocks) + "end\n"
    tf.segments[0] = (n, f.put(repo.SEGMENT, body.encode(), [d for _, d in blocks]))


def tree_refs_missing(f: Forge) -> None:
    member = next(a.member for a in f.root.archives if a.vm == "work")
    f.tree_refs[member] = f.trees[member].refs()[1:]


def segment_refs_extra(f: Forge) -> None:
    tf = f.file("work")
    n, sid = tf.segments[0]
    seg = f.segment(sid)
    extra = f.put(repo.DATA, b"x" * 100)
    body = "qubes-backup-segment 1\n" + "".join(f"{b} {d}\n" for b, d in seg.blocks) + "end\n"
    tf.segments[0] = (n, f.put(repo.SEGMENT, body.encode(), [*seg.refs(), extra]))


def root_refs_missing_qubes(f: Forge) -> None:
    f.drop_qubes_ref = True


def other_repo_id(f: Forge) -> None:
    f.root.repo_id = "0" * 32


def other_block_size(f: Forge) -> None:
    f.root.block_size = 2 * BS


def history_changed(f: Forge) -> None:
    f.history = [*f.root.history, HistoryEntry(3, "f" * 64, f.root.created)]


def history_gap(f: Forge) -> None:
    f.history = [f.root.history[0], HistoryEntry(3, f.root_id, f.root.created)]


def history_first_changed(f: Forge) -> None:
    """The history's entry for snapshot 1 names another root (asked: snapshot 1)."""
    h = f.root.history
    f.history = [HistoryEntry(1, "e" * 64, h[0].created), *h[1:], HistoryEntry(3, f.root_id, f.root.created)]


def no_archives(f: Forge) -> None:
    f.root.archives = []


def path_traversal(f: Forge) -> None:
    f.file("work").path = "appvms/work/../../../../etc/private.img"


def bad_qubes_xml(f: Forge) -> None:
    f.root.qubes = f.put(repo.QUBES, b"<qubes><domains><domain")


def vm_archive_as_home(f: Forge) -> None:
    f.root.archives = [replace(a, kind="home") if a.vm == "work" else a for a in f.root.archives]


def segment_number_past_the_file(f: Forge) -> None:
    """A map segment numbered beyond the file's size (its blocks would land past the end)."""
    tf = f.file("work")
    tf.segments = [*tf.segments, (tf.segments[-1][0] + 100, tf.segments[-1][1])]


def file_size_above_the_bound(f: Forge) -> None:
    tf = f.file("work")
    tf.size = 1 << 62


def volume_file_missing(f: Forge) -> None:
    """work's file list without its private volume (qubes.xml still lists it)."""
    member = next(a.member for a in f.root.archives if a.vm == "work")
    f.trees[member].files = [t for t in f.trees[member].files if not t.path.endswith("private.img")]


def same_vm_twice(f: Forge) -> None:
    work = next(a for a in f.root.archives if a.vm == "work")
    f.root.archives = [*f.root.archives, replace(work, member="vm9")]
    f.trees["vm9"] = f.trees[work.member]


def segment_of_other_file(f: Forge) -> None:
    """work's map made of vault's segments (sizes kept): the map's lengths no longer add up."""
    work, vault = f.file("work"), f.file("vault")
    work.segments = list(vault.segments)


# ---------------------------------------------------------------------------------------- file-level edits

def delete_roots(*which: int) -> Callable[[World], None]:
    def setup(w: World) -> None:
        roots = w.roots()
        for i in which:
            roots[i].unlink()

    return setup


def rename_newest(name: str) -> Callable[[World], None]:
    def setup(w: World) -> None:
        newest = w.roots()[-1]
        newest.rename(newest.with_name(name))

    return setup


def newest_holds(i: int) -> Callable[[World], None]:
    def setup(w: World) -> None:
        roots = w.roots()
        roots[-1].write_bytes(roots[i].read_bytes())

    return setup


def fork(w: World) -> None:
    """Roots 3' and 4' written from snapshot 2 by a machine without dom0's record (dom0 recorded 3)."""
    from test_repo_roundtrip import backup as rt_backup

    state_file = next(w.state_dir.glob("*.json"))
    saved = state_file.read_bytes()
    w.roots()[-1].unlink()
    state_file.unlink()
    try:
        rt_backup(w.sim, ("vault",))
        rt_backup(w.sim, ("vault",))
    finally:
        state_file.write_bytes(saved)


def prune_deleted_needed(w: World) -> None:
    """A prune that deleted what snapshot 1 still needs (only objects the newest does not use)."""
    old = reachable(w, w.roots()[0]) - reachable(w, w.roots()[-1])
    assert old
    for oid in old:
        obj_path(w, oid).unlink()


def drop_type(otype: str, index: int = 0) -> Callable[[World], None]:
    def setup(w: World) -> None:
        newest_ids(w, otype)[index].unlink()

    return setup


def duplicate_tree(w: World) -> None:
    trees = newest_ids(w, "t")
    trees[1].write_bytes(trees[0].read_bytes())


def segment_from_older_snapshot(w: World) -> None:
    """Every segment of the newest snapshot answered by a segment only snapshot 1 has."""
    old = [p for p in w.objects("s") if p.name in reachable(w, w.roots()[0]) - reachable(w, w.roots()[-1])]
    assert old
    for p in newest_ids(w, "s"):
        p.write_bytes(old[0].read_bytes())


def other_repository(otype: str) -> Callable[[World], None]:
    def setup(w: World) -> None:
        theirs = w.objects(otype, w.other)[0].read_bytes()
        for p in newest_ids(w, otype):
            p.write_bytes(theirs)

    return setup


def other_repository_everything(w: World) -> None:
    shutil.rmtree(w.repo)
    shutil.copytree(w.other, w.repo)


def oversize(otype: str) -> Callable[[World], None]:
    def setup(w: World) -> None:
        for p in newest_ids(w, otype):
            with open(p, "r+b") as f:
                f.truncate(repo.max_object_size(otype, BS) + 1)

    return setup


def edit_header(change: Callable[[bytes], bytes]) -> Callable[[World], None]:
    def setup(w: World) -> None:
        h = w.repo / "repo-header"
        h.write_bytes(change(h.read_bytes()))

    return setup


def wipe_and_new_repository(w: World) -> None:
    """The repository replaced by a new, empty one (the next backup would create a header)."""
    shutil.rmtree(w.repo)
    w.repo.mkdir()


# --------------------------------------------------------------------------------------------- the table

Setup = Callable[[World], None] | None


@dataclass(frozen=True)
class Case:
    name: str
    setup: Setup = None
    agent: dict[str, object] = field(default_factory=dict)  # the proxy's attack (repo_proxy_agent.py)
    mode: str = "restore"  # restore (newest), old (snapshot 1), verify (--verify-only), backup
    match: str = ""
    code: int = 3
    timeout: str | None = None  # QUBES_BACKUP_TIMEOUT for dom0 (a stalling VM)
    pinned: bool = False  # a fresh dom0 (no record of the repository) pinning snapshot 3 with --expect-root


def _d(w: World, p: Path) -> bytes:
    return b""


# fmt: off
CASES = [
    # rollback, fork, wrong root
    Case("rollback_to_snapshot_1", delete_roots(1, 2), match="older than snapshot 3"),
    Case("rollback_every_root_withheld", delete_roots(0, 1, 2), match="holds no snapshot"),
    Case("backup_onto_emptied_repository", delete_roots(0, 1, 2), mode="backup", match="holds no snapshot"),
    Case("fork_newer_than_the_record", fork, match="does not descend from snapshot 3"),
    Case("backup_onto_a_fork", fork, mode="backup", match="does not descend from snapshot 3"),
    Case("fresh_dom0_pinned_newest_withheld", delete_roots(2), pinned=True, match="does not descend from root"),
    Case("fresh_dom0_pinned_fork", fork, pinned=True, match="does not descend from root"),
    Case("fresh_dom0_backup_pinned_rollback", delete_roots(2), pinned=True, mode="backup",
         match="does not descend from root"),
    Case("newest_name_holds_older_root", newest_holds(1), match="asked for snapshot 3"),
    Case("root_name_with_another_time", rename_newest("0000000003-20990101T000000Z"), match="asked for snapshot 3"),
    Case("root_name_with_another_seq", rename_newest("0000000005-20990101T000000Z"), match="asked for snapshot 5"),
    Case("backup_root_name_with_another_time", rename_newest("0000000003-20990101T000000Z"), mode="backup",
         match="asked for snapshot 3"),
    # the opening, bent by the VM
    Case("too_many_roots", agent={"opening": "extra_roots", "n": 100_000}, match="excess"),
    Case("roots_in_descending_order", agent={"opening": "reverse"}, match="out of order"),
    Case("root_number_zero", agent={"opening": "bad_root", "name": "roots/0000000000-20990101T000000Z"}),
    Case("root_name_traversal", agent={"opening": "bad_root", "name": "roots/../../../etc/passwd"}),
    Case("header_sent_twice", agent={"opening": "header_twice"}, match="out of place"),
    Case("header_without_mac", agent={"opening": "no_mac"}, match="without its MAC"),
    Case("mac_before_header", agent={"opening": "mac_first"}, match="out of place"),
    Case("error_instead_of_the_opening", agent={"opening": "error"}, code=1, match="cannot list the roots"),
    Case("header_after_the_roots", agent={"opening": "member_after_roots"}, match="out of place"),
    # GET answers
    Case("answers_out_of_order", agent={"op": "swap", "at": 2}, match="when asked for"),
    Case("answer_repeated", agent={"op": "repeat", "at": 1}, match="when asked for"),
    Case("answer_under_the_next_name", agent={"op": "rename", "at": 2}, match="when asked for"),
    Case("answer_under_a_bad_name", agent={"op": "rename", "at": 1, "name": "../../../etc/shadow"},
         match="malformed"),
    Case("answer_dropped", agent={"op": "drop", "at": 2}, match="when asked for"),
    Case("error_mid_session", agent={"op": "error", "at_type": "d"}, match="disk on fire"),
    Case("end_instead_of_an_answer", agent={"op": "end", "at": 2}, match="malformed"),
    Case("stops_answering_mid_session", agent={"op": "stop", "at_type": "d"}, match="stopped answering"),
    Case("stalls_mid_session", agent={"op": "stall", "at_type": "d"}, timeout="2", code=1, match="did not answer"),
    Case("backup_answer_repeated", agent={"op": "repeat", "at": 0}, mode="backup", match="when asked for"),
    Case("backup_stops_answering", agent={"op": "stop", "at": 1}, mode="backup", match="stopped answering"),
    Case("backup_error_mid_session", agent={"op": "error", "at": 1}, mode="backup", match="disk on fire"),
    Case("backup_answer_under_another_name", agent={"op": "rename", "at": 1}, mode="backup", match="when asked for"),
    Case("backup_answers_out_of_order", agent={"op": "swap", "at": 1}, mode="backup", match="when asked for"),
    # dropped, duplicated, swapped, mixed objects
    Case("dropped_segment", drop_type("s"), mode="verify", match="missing"),
    Case("dropped_file_list", drop_type("t"), match="missing"),
    Case("dropped_qubes_xml", drop_type("x"), match="missing"),
    Case("prune_deleted_an_object_snapshot_1_needs", prune_deleted_needed, mode="old", match="missing"),
    Case("file_list_duplicated_over_another", duplicate_tree, match="another object"),
    Case("segment_from_an_older_snapshot", segment_from_older_snapshot, mode="verify", match="another object"),
    Case("backup_parent_segment_from_older_snapshot", segment_from_older_snapshot, mode="backup",
         match="another object"),
    Case("backup_parent_file_list_dropped", drop_type("t"), mode="backup", match="missing"),
    Case("block_content_under_another_id", for_newest("d", other_block), match="does not match its id"),
    # another repository, same passphrase
    Case("file_list_of_another_repository", other_repository("t"), match="failed verification"),
    Case("segment_of_another_repository", other_repository("s"), mode="verify", match="failed verification"),
    Case("qubes_xml_of_another_repository", other_repository("x"), match="failed verification"),
    Case("backup_onto_another_repository", other_repository_everything, mode="backup", match="held repository"),
    Case("backup_onto_a_wiped_location", wipe_and_new_repository, mode="backup", match="held repository"),
    # sizes
    Case("oversize_file_list", oversize("t"), match="too long"),
    Case("oversize_data_block", oversize("d"), match="too long"),
    Case("oversize_qubes_xml", oversize("x"), match="too long"),
    Case("oversize_header", edit_header(lambda h: h + b"#" * 5000), match="too long"),
    Case("truncated_to_nothing", for_newest("d", _d), match="wrong size"),
    Case("extended_by_one_byte", for_newest("d", lambda w, p: p.read_bytes() + b"\n"), match="failed verification"),
    Case("truncated_root", lambda w: w.roots()[-1].write_bytes(w.roots()[-1].read_bytes()[:-1]),
         match="failed verification"),
    # the header
    Case("header_block_size_changed", edit_header(lambda h: h.replace(b"block-size=65536", b"block-size=131072")),
         match="tampered"),
    Case("header_kdf_above_ceiling", edit_header(lambda h: h.replace(b"kdf-n=1024", b"kdf-n=1073741824")),
         match="scrypt"),
    # decompression bombs (authentic: MAC and header right, the id is checked only after decompression)
    Case("bomb_states_more_than_a_block",
         for_newest("d", lambda w, p: bomb(w, p, zstandard.ZstdCompressor(write_content_size=True).compress(
             bytes(2 * BS)))), match="excessive"),
    Case("bomb_states_a_block_produces_1_gib", for_newest("d", lambda w, p: bomb(w, p, bomb_lying_size(
        len(open_file(w, p, repo.DATA).plaintext), 1 << 30))), match="does not decompress"),
    Case("bomb_without_content_size",
         for_newest("d", lambda w, p: bomb(w, p, zstandard.ZstdCompressor(write_content_size=False).compress(
             bytes(1000)))), match="unknown"),
    Case("bomb_padding_not_zero",
         for_newest("d", lambda w, p: bomb(w, p, zstandard.ZstdCompressor(write_content_size=True).compress(
             open_file(w, p, repo.DATA).plaintext) + struct.pack("<II", repo.SKIPPABLE, 4) + b"evil")),
         match="after the compressed content"),
    Case("bomb_file_list_states_17_mib",
         for_newest("t", lambda w, p: forge_raw(keys(w), repo.TREE, p.name, zstandard.ZstdCompressor(
             write_content_size=True).compress(bytes(17 << 20)), comp="z")), match="excessive"),
    # wrong type letter, references not matching the body
    Case("wrong_type_letter", for_newest("d", lambda w, p: forge_raw(
        keys(w), repo.DATA, p.name, open_file(w, p, repo.DATA).plaintext, head_type="x")), match="instead"),
    Case("data_block_with_a_reference", for_newest("d", lambda w, p: forge_raw(
        keys(w), repo.DATA, p.name, open_file(w, p, repo.DATA).plaintext, ["a" * 64])), match="too many references"),
    Case("references_out_of_order", for_newest("t", lambda w, p: forge_raw(
        keys(w), repo.TREE, p.name, open_file(w, p, repo.TREE).plaintext,
        sorted([*open_file(w, p, repo.TREE).refs, "0" * 64], reverse=True))), match="out of order"),
    Case("file_list_refs_not_its_segments", forged(tree_refs_missing), match="not the ones it uses"),
    Case("segment_refs_not_its_blocks", forged(segment_refs_extra), mode="verify", match="not the ones it uses"),
    Case("root_refs_not_its_body", forged(root_refs_missing_qubes), match="not the ones it uses"),
    # authentic but inconsistent snapshots (a compromised writer)
    Case("map_names_a_block_past_the_end", forged(block_past_end), mode="verify", match="past the end"),
    Case("map_data_not_the_file_lists", forged(data_mismatch), mode="verify", match="its file list says"),
    Case("short_block_in_mid_file", forged(short_block_mid_file), mode="verify", match="expected"),
    Case("map_made_of_another_files_segments", forged(segment_of_other_file), mode="verify", match="its file list"),
    Case("root_of_another_repository_id", forged(other_repo_id), match="another repository"),
    Case("root_with_another_block_size", forged(other_block_size), match="another repository"),
    Case("root_without_archives", forged(no_archives), match="malformed"),
    Case("file_path_traversal", forged(path_traversal), match="bad file entry"),
    Case("vm_archive_claims_to_be_dom0_home", forged(vm_archive_as_home), match="malformed snapshot root"),
    Case("map_segment_numbered_past_the_file", forged(segment_number_past_the_file), match="malformed"),
    Case("file_size_above_the_bound", forged(file_size_above_the_bound), match="bad size"),
    Case("volume_left_out_of_the_file_list", forged(volume_file_missing), match="disagree"),
    Case("same_vm_archived_twice", forged(same_vm_twice), match="malformed snapshot root"),
    Case("qubes_xml_malformed", forged(bad_qubes_xml), match="qubes.xml is malformed"),
    # history tampering
    Case("history_entry_of_the_record_changed", forged(history_changed), match="does not descend"),
    Case("history_with_a_gap", forged(history_gap), match="malformed"),
    Case("history_entry_1_changed_old_snapshot", forged(history_first_changed), mode="old",
         match="not the one the newest"),
    Case("backup_onto_history_tampering", forged(history_changed), mode="backup", match="does not descend"),
]
# fmt: on


@pytest.fixture
def w(world: World) -> Iterator[World]:  # noqa: F811
    records = {p: p.read_bytes() for p in world.state_dir.iterdir()}
    yield world
    world.reset()
    for p in world.state_dir.iterdir():
        if p not in records:
            p.unlink()
    for p, data in records.items():
        p.write_bytes(data)


def unchanged(before: Unchanged, record_may_advance: bool) -> None:
    """conftest's ``Unchanged.check``; dom0's record of the repository may name the forged (authentic) snapshot
    4 it verified, nothing else may change."""
    sim = before.sim
    assert sorted(sim.collection().names()) == before.names
    after = sim.snapshot()
    changed = {k for k in before.before.keys() | after.keys() if before.before.get(k) != after.get(k)}
    if record_may_advance:
        records = {k for k in changed if k.startswith("var/lib/qubes-backup/repositories/")}
        for k in records:
            assert json.loads((sim.dom0 / k).read_text())["seq"] == 4
        changed -= records
    assert not changed, sorted(changed)
    assert sim.staging_dirs() == []


def _restore(w: World, transport: ProxyTransport, snapshot: int | None, verify: bool, pin: str | None) -> None:
    opts = RestoreOptions(vms=("work", "vault"), rename_conflicting=True, verify_only=verify)
    job = RepoRestore(w.sim.system, REPO, "backupvm", PASS, opts, snapshot=snapshot, transport=transport,
                      expect_root=pin)  # fmt: skip
    try:
        job.open()
        plan = job.plan()
        if plan.errors:
            raise BackupError(plan.errors[0])
        job.run()
    finally:
        job.close()


def _backup(w: World, transport: ProxyTransport, pin: str | None) -> None:
    plan = plan_backup(w.sim.system, ["vault"])
    # without dom0's cache of the parent's maps: the backup then fetches the parent's segments from the backup
    # VM, which is what these cases attack (with the cache dom0 does not ask for them: tests/test_repo_carry.py)
    options = RepoOptions(kdf_n=1024, block_size=BS, expect_root=pin, cache=False)
    job = RepoBackup(w.sim.system, plan, "backupvm", REPO, options, transport=transport)
    try:
        job.connect()
        job.run(PASS)
    finally:
        job.close()
        plan.close()


def test_enough_distinct_cases() -> None:
    assert len({c.name for c in CASES}) == len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile(w: World, case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    if case.timeout is not None:
        monkeypatch.setenv("QUBES_BACKUP_TIMEOUT", case.timeout)
    pin = None
    if case.pinned:
        pin = open_file(w, w.roots()[-1], repo.ROOT).id
    if case.setup is not None:
        case.setup(w)
    if case.pinned:
        for record in w.state_dir.iterdir():  # put back by the fixture
            record.unlink()
    roots = sorted(p.name for p in (w.repo / "roots").iterdir()) if (w.repo / "roots").is_dir() else []
    transport = ProxyTransport(w.sim.system, case.agent)
    before = Unchanged(w.sim)
    with pytest.raises(BackupError) as info:
        if case.mode == "backup":
            _backup(w, transport, pin)
        else:
            _restore(w, transport, 1 if case.mode == "old" else None, case.mode == "verify", pin)
    err = info.value
    message = str(err)
    print(f"{case.name}: exit {err.exit_code}: {message}")
    assert err.exit_code == case.code, f"exit {err.exit_code}, {type(err).__name__}: {message}"
    assert message and "\n" not in message and "internal error" not in message, message
    assert case.match in message, message
    unchanged(before, isinstance(case.setup, forged))
    if case.mode == "backup":  # refused without writing a root
        after = sorted(p.name for p in (w.repo / "roots").iterdir()) if (w.repo / "roots").is_dir() else []
        assert after == roots


CLI_NAMES = ("bomb_states_a_block_produces_1_gib", "qubes_xml_malformed", "prune_deleted_an_object_snapshot_1_needs",
             "file_list_refs_not_its_segments")
CLI_CASES = [c for c in CASES if c.name in CLI_NAMES]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.name for c in CLI_CASES])
def test_hostile_through_the_cli(w: World, case: Case) -> None:
    """A few of the cases through ``qvm-backup-restore`` itself (and its real agent): one error line, exit 3."""
    assert case.setup is not None and not case.agent
    case.setup(w)
    before = Unchanged(w.sim)
    snapshot = ("--snapshot", "1") if case.mode == "old" else ()
    r = w.sim.restore("-d", "backupvm", "--repo", REPO, *snapshot, "--rename-conflicting", "work", "vault")
    assert r.returncode == case.code, r.stderr
    assert case.match in one_error_line(r.stderr), r.stderr
    unchanged(before, isinstance(case.setup, forged))
