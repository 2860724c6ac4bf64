"""What a snapshot says, object by object (docs/REPOSITORY.md section 6): root, file lists, map segments.

Plain text, one record per line, parsed strictly (exact grammar, bounded counts, ascending order, no
duplicates) and only ever from a verified, decrypted object (``repo.open_object``).  The references an object
carries in clear must be exactly the ids its body names: what the backup VM's keyless prune follows is what
dom0 wrote.

- **root** (``r``): the snapshot: repository, sequence number, time, block size, the qubes.xml object, one
  file list per archive (VM or dom0 home) and the history of every earlier root of its lineage;
- **tree** (``t``): one archive's files in restore order, each regular file's map as segment ids;
- **segment** (``s``): up to 4096 ``(block, data id)`` pairs of one stretch of a file; absent blocks are
  holes (zero blocks are never stored).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from qubes_backup_dom0.errors import VerificationError
from qubes_backup_dom0.format import repo
from qubes_backup_dom0.format.manifest import MAX_ARCHIVES, MAX_FILES, MAX_SIZE

MAX_HISTORY = 150_000
_ID = r"[0-9a-f]{64}"
_TIME = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z"
_NUM = r"0|[1-9][0-9]{0,18}"
_SNUM = r"0|-?[1-9][0-9]{0,18}"
_ROOT_LINES = {
    "repository": re.compile(r"repository ([0-9a-f]{32})"),
    "seq": re.compile(r"seq ([1-9][0-9]{0,9})"),
    "created": re.compile(rf"created ({_TIME})"),
    "block-size": re.compile(r"block-size ([1-9][0-9]{0,8})"),
    "qubes": re.compile(rf"qubes ({_ID})"),
}
_VM = r"[A-Za-z][A-Za-z0-9_.-]{0,30}"
_ARCHIVE_RE = re.compile(rf"archive (vm0|vm[1-9][0-9]{{0,4}}) (vm|home) ({_VM}) ({_ID}) ({_TIME})")
_HISTORY_RE = re.compile(rf"history ([1-9][0-9]{{0,9}}) ({_ID}) ({_TIME})")
_FILE_RE = re.compile(rf"file (file|dir|symlink) ({_NUM}) ({_NUM}) ([0-7]{{4}}) ({_SNUM}) ([!-~]{{1,12288}})")
_SEG_RE = re.compile(rf"seg ({_NUM}) ({_ID})")
_LINK_RE = re.compile(r"link ([!-~]{1,12288})")
_BLOCK_RE = re.compile(rf"({_NUM}) ({_ID})")
_PCT_RE = re.compile(r"%[0-9a-f]{2}")


def _bad(what: str) -> VerificationError:
    return VerificationError(f"malformed {what} (verified, so written by a holder of the passphrase)")


def _lines(data: bytes, magic: str, what: str) -> list[str]:
    """The body's lines between its first (``magic``) and last (``end``) line."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise _bad(what) from None
    if not text.endswith("\nend\n"):
        raise _bad(what)
    lines = text[:-1].split("\n")
    if lines[0] != magic:
        raise _bad(what)
    return lines[1:-1]


def _check_refs(refs: list[str], named: set[str], what: str) -> None:
    if refs != sorted(named):
        raise VerificationError(f"{what}: the references it shows the backup VM are not the ones it uses")


# --------------------------------------------------------------------------------------- percent-encoding

def encode_path(text: str) -> str:
    """UTF-8, every byte outside ``!``..``~`` and ``%`` itself as ``%xx`` (lowercase hex)."""
    return "".join(chr(b) if 0x21 <= b <= 0x7E and b != 0x25 else f"%{b:02x}" for b in text.encode("utf-8"))


def decode_path(text: str, what: str) -> str:
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "%":
            if not _PCT_RE.fullmatch(text[i : i + 3]):
                raise _bad(what)
            raw.append(int(text[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(text[i]))
            i += 1
    try:
        out = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(what) from None
    if encode_path(out) != text:  # one spelling only
        raise _bad(what)
    return out


# ---------------------------------------------------------------------------------------------------- root

@dataclass(frozen=True)
class HistoryEntry:
    seq: int
    root: str  # the root's id
    created: str


@dataclass(frozen=True)
class RootArchive:
    member: str  # vmN (vm0: dom0's home)
    kind: str  # vm | home
    vm: str
    tree: str
    captured: str  # when this archive's data was read


@dataclass
class Root:
    repo_id: str
    seq: int
    created: str
    block_size: int
    qubes: str
    archives: list[RootArchive] = field(default_factory=list)
    history: list[HistoryEntry] = field(default_factory=list)

    def render(self) -> bytes:
        lines = ["qubes-backup-root 1", f"repository {self.repo_id}", f"seq {self.seq}", f"created {self.created}",
                 f"block-size {self.block_size}", f"qubes {self.qubes}"]  # fmt: skip
        lines += [f"archive {a.member} {a.kind} {a.vm} {a.tree} {a.captured}" for a in self.archives]
        lines += [f"history {h.seq} {h.root} {h.created}" for h in self.history]
        data = ("\n".join([*lines, "end"]) + "\n").encode("ascii")
        parse_root(data)
        return data

    def refs(self) -> list[str]:
        return sorted({self.qubes, *(a.tree for a in self.archives)})

    def entry(self, root_id: str) -> HistoryEntry:
        return HistoryEntry(self.seq, root_id, self.created)


def parse_root(data: bytes, refs: list[str] | None = None) -> Root:
    """A root body; ``refs`` (the object's clear references) must be exactly the ids it names."""
    what = "snapshot root"
    lines = _lines(data, "qubes-backup-root 1", what)
    if len(lines) < 5 or len(lines) > 5 + MAX_ARCHIVES + MAX_HISTORY:
        raise _bad(what)
    values = []
    for key, line in zip(_ROOT_LINES, lines[:5], strict=True):
        m = _ROOT_LINES[key].fullmatch(line)
        if m is None:
            raise _bad(what)
        values.append(m.group(1))
    repo.check_time(values[2], what)
    root = Root(values[0], int(values[1]), values[2], int(values[3]), values[4])
    repo.check_block_size(root.block_size)
    members: set[str] = set()
    vms: set[str] = set()
    last_number = -1
    rest = lines[5:]
    i = 0
    while i < len(rest) and rest[i].startswith("archive "):
        m = _ARCHIVE_RE.fullmatch(rest[i])
        if m is None or len(root.archives) >= MAX_ARCHIVES:
            raise _bad(what)
        member, kind, vm, tree, captured = m.groups()
        number = int(member[2:])
        if number <= last_number or (kind == "home") != (member == "vm0") or (kind == "home") != (vm == "dom0") \
                or vm in vms:  # fmt: skip
            raise _bad(what)
        repo.check_time(captured, what)
        last_number = number
        members.add(member)
        vms.add(vm)
        root.archives.append(RootArchive(member, kind, vm, tree, captured))
        i += 1
    if not root.archives:
        raise _bad(what)
    for line in rest[i:]:
        m = _HISTORY_RE.fullmatch(line)
        if m is None:
            raise _bad(what)
        entry = HistoryEntry(int(m.group(1)), m.group(2), m.group(3))
        repo.check_time(entry.created, what)
        if entry.seq != len(root.history) + 1:  # the whole lineage: 1, 2, ..., seq - 1
            raise _bad(what)
        root.history.append(entry)
    if len(root.history) != root.seq - 1:
        raise _bad(what)
    if refs is not None:
        _check_refs(refs, set(root.refs()), what)
    return root


# ---------------------------------------------------------------------------------------------------- tree

@dataclass
class TreeFile:
    path: str
    type: str  # file | dir | symlink
    size: int
    data: int  # bytes in stored (non-hole) blocks
    mode: int
    mtime: int
    link: str | None = None
    segments: list[tuple[int, str]] = field(default_factory=list)  # (segment number, segment id)


@dataclass
class Tree:
    files: list[TreeFile] = field(default_factory=list)

    def render(self, block_size: int) -> bytes:
        lines = ["qubes-backup-tree 1"]
        for f in self.files:
            lines.append(f"file {f.type} {f.size} {f.data} {f.mode:04o} {f.mtime} {encode_path(f.path)}")
            lines += [f"seg {n} {sid}" for n, sid in f.segments]
            if f.link is not None:
                lines.append(f"link {encode_path(f.link)}")
        data = ("\n".join([*lines, "end"]) + "\n").encode("ascii")
        parse_tree(data, block_size)
        return data

    def refs(self) -> list[str]:
        return sorted({sid for f in self.files for _, sid in f.segments})


def segment_count(size: int, block_size: int) -> int:
    span = block_size * repo.SEGMENT_BLOCKS
    return -(-size // span)


def parse_tree(data: bytes, block_size: int, refs: list[str] | None = None) -> Tree:
    what = "file list"
    lines = _lines(data, "qubes-backup-tree 1", what)
    tree = Tree()
    paths: set[str] = set()
    current: TreeFile | None = None
    for line in lines:
        if line.startswith("file "):
            m = _FILE_RE.fullmatch(line)
            if m is None or len(tree.files) >= MAX_FILES:
                raise _bad(what)
            ftype, size, stored, mode, mtime, path = m.groups()
            current = TreeFile(decode_path(path, what), ftype, int(size), int(stored), int(mode, 8), int(mtime))
            if current.path in paths or current.size > MAX_SIZE or current.data > current.size or (
                    ftype != "file" and (current.size or current.data)) or abs(current.mtime) >= 1 << 62:  # fmt: skip
                raise _bad(what)
            paths.add(current.path)
            tree.files.append(current)
        elif line.startswith("seg "):
            m = _SEG_RE.fullmatch(line)
            if m is None or current is None or current.type != "file":
                raise _bad(what)
            n = int(m.group(1))
            if (current.segments and n <= current.segments[-1][0]) or n >= segment_count(current.size, block_size):
                raise _bad(what)
            current.segments.append((n, m.group(2)))
        elif line.startswith("link "):
            m = _LINK_RE.fullmatch(line)
            if m is None or current is None or current.type != "symlink" or current.link is not None:
                raise _bad(what)
            current.link = decode_path(m.group(1), what)
        else:
            raise _bad(what)
    for f in tree.files:
        if (f.type == "symlink") != (f.link is not None) or (f.data == 0) != (not f.segments):
            raise _bad(what)
    if refs is not None:
        _check_refs(refs, set(tree.refs()), what)
    return tree


# ------------------------------------------------------------------------------------------------- segment

@dataclass
class Segment:
    blocks: list[tuple[int, str]] = field(default_factory=list)  # (block number within the segment, data id)

    def render(self) -> bytes:
        lines = ["qubes-backup-segment 1", *(f"{k} {did}" for k, did in self.blocks), "end"]
        data = ("\n".join(lines) + "\n").encode("ascii")
        parse_segment(data)
        return data

    def refs(self) -> list[str]:
        return sorted({did for _, did in self.blocks})


def parse_segment(data: bytes, refs: list[str] | None = None) -> Segment:
    what = "map segment"
    lines = _lines(data, "qubes-backup-segment 1", what)
    if not lines or len(lines) > repo.SEGMENT_BLOCKS:
        raise _bad(what)
    seg = Segment()
    last = -1
    for line in lines:
        m = _BLOCK_RE.fullmatch(line)
        if m is None:
            raise _bad(what)
        k = int(m.group(1))
        if k <= last or k >= repo.SEGMENT_BLOCKS:
            raise _bad(what)
        last = k
        seg.blocks.append((k, m.group(2)))
    if refs is not None:
        _check_refs(refs, set(seg.refs()), what)
    return seg


# ------------------------------------------------------------------------------------------------- lineage

def lineage_problem(newest_id: str, newest: Root, known_seq: int | None, known_root: str) -> str | None:
    """Why the newest root a backup VM offers is not acceptable against a root dom0 knows (its record, or an
    id the user pinned: ``known_seq`` None), or None.  The newest root must be that root, or a later one whose
    authenticated history lists it: an older one is a rollback, another one of the same number or one whose
    history lacks it a fork (or another repository)."""
    if known_seq is not None and newest.seq < known_seq:
        return (f"its newest snapshot is {newest.seq}, older than snapshot {known_seq} that dom0 recorded "
                "(rolled back, or snapshots withheld)")  # fmt: skip
    if newest_id == known_root:
        return None
    if known_seq is not None and newest.seq == known_seq:
        return f"its snapshot {newest.seq} is not the one dom0 recorded (replaced, or a fork)"
    if any(h.root == known_root and (known_seq is None or h.seq == known_seq) for h in newest.history):
        return None
    if known_seq is None:  # a pinned root: its number is not known, so an older newest root may be a rollback
        return (f"its newest snapshot {newest.seq} does not descend from root {known_root[:16]} (rolled back to "
                "before that root, snapshots withheld, a fork, or another repository)")  # fmt: skip
    return (f"its newest snapshot {newest.seq} does not descend from snapshot {known_seq} (a fork, or another "
            "repository)")  # fmt: skip
