"""dom0's memory of each repository (docs/REPOSITORY.md section 8): the newest snapshot it wrote or verified.

``/var/lib/qubes-backup/repositories/<repo-id>.json``, one small file per repository, written atomically
(temporary file, fsync, rename, directory fsync): the repository id, the newest sequence number and root id
with its creation time, and where dom0 met the repository (``VM:LOCATION``).  The backup VM cannot touch it,
so it is what an older root, a fork or another repository at the same place is measured against.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.qubes.system import System

STATE_DIR = "/var/lib/qubes-backup/repositories"
MAX_STATE = 1 << 20
_ID_RE = re.compile(r"[0-9a-f]{32}")


@dataclass
class RepoState:
    repo_id: str
    seq: int
    root: str
    created: str
    locations: list[str] = field(default_factory=list)


def state_dir(system: System) -> Path:
    return system.dom0_path(STATE_DIR)


def _path(system: System, repo_id: str) -> Path:
    if not _ID_RE.fullmatch(repo_id):
        raise ValueError(f"bad repository id {repo_id!r}")
    return state_dir(system) / f"{repo_id}.json"


def record_path(system: System, repo_id: str) -> Path:
    """The record's file (the cache of the newest snapshot's maps, ``repocache``, lies beside it)."""
    return _path(system, repo_id)


def _parse(raw: bytes, where: Path) -> RepoState:
    try:
        doc = json.loads(raw)
        state = RepoState(str(doc["repo-id"]), int(doc["seq"]), str(doc["root"]), str(doc["created"]),
                          [str(x) for x in doc["locations"]])  # fmt: skip
    except (ValueError, KeyError, TypeError):
        raise BackupError(f"dom0's record of a repository is damaged: {where} (move it away to start afresh)") from None
    if not _ID_RE.fullmatch(state.repo_id) or not re.fullmatch(r"[0-9a-f]{64}", state.root) or state.seq < 1:
        raise BackupError(f"dom0's record of a repository is damaged: {where} (move it away to start afresh)")
    return state


def load(system: System, repo_id: str) -> RepoState | None:
    path = _path(system, repo_id)
    try:
        raw = path.read_bytes()[:MAX_STATE]
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BackupError(f"cannot read dom0's record of repository {repo_id}: {e.strerror}") from None
    state = _parse(raw, path)
    if state.repo_id != repo_id:
        raise BackupError(f"dom0's record of a repository is damaged: {path} (move it away to start afresh)")
    return state


def owners(system: System, location: str) -> list[str]:
    """The repositories dom0 recorded at ``location`` (``VM:PATH``)."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(state_dir(system).iterdir()):
            if entry.suffix == ".json" and _ID_RE.fullmatch(entry.stem):
                with contextlib.suppress(OSError, BackupError):
                    if location in _parse(entry.read_bytes()[:MAX_STATE], entry).locations:
                        found.append(entry.stem)
    return found


def check_writable(system: System) -> None:
    """Before a backup starts: its record can be kept (else the backup would be useless against rollback)."""
    directory = state_dir(system)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise BackupError(f"cannot create {STATE_DIR} for dom0's record of the repository: {e.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise BackupError(f"{STATE_DIR} is not writable: dom0 could not record this backup (run as its owner)")


def save(system: System, state: RepoState) -> None:
    directory = state_dir(system)
    path = _path(system, state.repo_id)
    doc = {"repo-id": state.repo_id, "seq": state.seq, "root": state.root, "created": state.created,
           "locations": sorted(set(state.locations))}  # fmt: skip
    data = (json.dumps(doc, indent=1) + "\n").encode()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = directory / f".{state.repo_id}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise BackupError(f"cannot record repository {state.repo_id} in {directory}: {e.strerror}") from None
