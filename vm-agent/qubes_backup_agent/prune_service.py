"""qubes.Backup asked to prune a repository (dom0's ``qvm-backup-prune``; docs/PROTOCOL.md section 5c).

    dom0:  LOCATION(name="prune", data=repository directory)     read by backup_service.serve
    dom0:  PRUNE(data=policy and dry-run flag)
    agent: FATE(name=roots/NAME, data=kept or deleted, why) ...  one per snapshot present before the prune
    agent: DAMAGED(data=one line) ...  what is missing or malformed in a retained snapshot (nothing deleted)
    agent: DONE(data=totals)   or   ERROR(one line)

No key is involved: the prune itself (lock, roots, reference walk, deletions) is ``prune.prune_location``;
this module only reads the request and reports the outcome in the grammar of ``prune_frames``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import BinaryIO

from qubes_backup_protocol import frames, prune_frames
from qubes_backup_protocol import repo as names
from qubes_backup_protocol.frames import FrameType

from .common import EXIT_FAILED, EXIT_OK, one_line, send_error, silence
from .prune import PruneReport, SnapshotFate, prune_location
from .storage import StorageError

_REQUEST = {FrameType.PRUNE: (0, prune_frames.POLICY_SIZE)}


def _root_name(snapshot: SnapshotFate) -> str:
    """``roots/NAME`` of a reported snapshot: its name, which must be the root grammar's."""
    if not names.is_root_name(snapshot.name) or names.root_seq(snapshot.name) != snapshot.seq:
        raise StorageError(f"prune reported a snapshot it cannot name: {snapshot.name[:80]!r}")
    return snapshot.name


def _fate(snapshot: SnapshotFate) -> prune_frames.Fate:
    reasons = tuple(r for r in prune_frames.REASONS if r in snapshot.reasons)
    if snapshot.kept and not reasons:
        raise StorageError(f"prune kept snapshot {snapshot.seq} for a reason the protocol cannot report: "
                           f"{', '.join(map(str, snapshot.reasons))}")  # fmt: skip
    return prune_frames.Fate(bool(snapshot.kept), reasons if snapshot.kept else ())


def report(out: BinaryIO, result: PruneReport) -> None:
    """The FATE frames and DONE of a ``prune.PruneReport``."""
    snapshots = sorted(result.snapshots, key=lambda s: s.seq)
    if len(snapshots) > names.MAX_ROOTS:
        raise StorageError(f"the repository holds more than {names.MAX_ROOTS} snapshots")
    encoded = [(_root_name(s), prune_frames.encode_fate(_fate(s))) for s in snapshots]
    damaged = [one_line(line) for line in result.damaged][: prune_frames.MAX_DAMAGE]
    count = max(result.damage_count, len(damaged))
    if count and not damaged:
        damaged = ["a retained snapshot is damaged"]
    totals = prune_frames.Totals(result.objects_deleted, result.bytes_freed, result.objects_kept, result.bytes_kept,
                                 result.dry_run, min(count, (1 << 32) - 1))  # fmt: skip
    done = prune_frames.encode_totals(totals)
    for name, data in encoded:
        frames.write_frame(out, FrameType.FATE, name, data)
    for line in damaged:
        frames.write_frame(out, FrameType.DAMAGED, "", line.encode("utf-8"))
    frames.write_frame(out, FrameType.DONE, "", done)
    out.flush()


def serve_prune(location: str, root: Path, stdin: BinaryIO, stdout: BinaryIO) -> int:
    """After LOCATION(prune): the PRUNE request, the prune, its report."""
    try:
        frame = frames.read_frame(stdin, _REQUEST)
        if frame is None:
            print("qubes-backup-agent: dom0 closed the stream before its prune request; nothing done",
                  file=sys.stderr)  # fmt: skip
            return EXIT_FAILED
        policy, dry_run = prune_frames.decode_policy(bytes(frame.data))
        result = prune_location(location, root, policy, dry_run)
        report(stdout, result)
    except StorageError as exc:
        send_error(stdout, str(exc))
        return EXIT_FAILED
    except frames.ProtocolError as exc:
        send_error(stdout, f"bad request: {exc}")
        return EXIT_FAILED
    except (BrokenPipeError, ConnectionResetError):
        silence(stdout)
        return EXIT_FAILED
    return EXIT_OK
