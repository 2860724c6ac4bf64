#!/usr/bin/env python3
"""A hostile backup VM for ``qvm-backup-prune``: installed as qubes.Backup in a test's QUBES_BACKUP_RPC_DIR, it
answers a prune request by QUBES_AGENT_FAKE_PRUNE (any other request is refused):

- ``many``: MAX_ROOTS + 1 FATE frames (QUBES_AGENT_FAKE_COUNT + 1 if set);
- ``badname``: a FATE frame named ``roots/../../x``;
- ``bigerror``: an ERROR frame of 100 KB;  ``escape``: an ERROR line with terminal escapes;
- ``bigfate``: a FATE record of 3 bytes;  ``badbits``: a fate kept with no reason;
- ``lie-fates``: honest frames but the oldest snapshot reported kept by ``last``;
- ``lie-deleted``: a real prune, then the oldest snapshot it reported kept deleted as well;
- ``dry-deletes``: asked for a dry run, prunes for real and reports a dry run;
- ``after``: an honest report followed by an extra FATE frame after DONE;
- ``manydamage``: 51 DAMAGED lines;  ``damagecount``: one DAMAGED line, totals counting none.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

from qubes_backup_agent import confine, prune_service
from qubes_backup_protocol import frames, prune_frames
from qubes_backup_protocol import repo as names
from qubes_backup_protocol.frames import FrameType


def _honest(location: str, policy: object, dry_run: bool) -> tuple[bytes, object]:
    """The real prune's report (frames, as bytes) and the report itself."""
    from qubes_backup_agent.prune import prune_location

    result = prune_location(location, confine.agent_root(), policy, dry_run)  # type: ignore[arg-type]
    buf = io.BytesIO()
    prune_service.report(buf, result)
    return buf.getvalue(), result


def main() -> int:
    mode = os.environ.get("QUBES_AGENT_FAKE_PRUNE", "")
    stdin, out = sys.stdin.buffer, sys.stdout.buffer
    first = frames.read_frame(stdin, {FrameType.LOCATION: (64, frames.MAX_LOCATION_LEN)})
    assert first is not None
    if first.name != prune_frames.REQUEST:
        out.write(frames.encode(FrameType.ERROR, "", b"this fake qubes.Backup only prunes"))
        return 1
    location = bytes(first.data).decode()
    request = frames.read_frame(stdin, {FrameType.PRUNE: (0, prune_frames.POLICY_SIZE)})
    assert request is not None
    policy, dry_run = prune_frames.decode_policy(bytes(request.data))
    fate = prune_frames.encode_fate(prune_frames.Fate(True, ("newest",)))
    totals = prune_frames.encode_totals(prune_frames.Totals(0, 0, 0, 0, dry_run))
    if mode == "many":
        for seq in range(1, int(os.environ.get("QUBES_AGENT_FAKE_COUNT", names.MAX_ROOTS)) + 2):
            out.write(frames.encode(FrameType.FATE, names.root_name(seq, "2026-01-01T00:00:00Z"), fate))
        out.write(frames.encode(FrameType.DONE, "", totals))
    elif mode == "badname":
        out.write(frames.encode(FrameType.FATE, "roots/../../x", fate))
    elif mode == "bigerror":
        out.write(frames.encode(FrameType.ERROR, "", b"x" * 100_000))
    elif mode == "escape":
        out.write(frames.encode(FrameType.ERROR, "", b"all fine\x1b[2J\x1b]0;owned\x07\rgone"))
    elif mode == "bigfate":
        out.write(frames.encode(FrameType.FATE, names.root_name(1, "2026-01-01T00:00:00Z"), fate + b"\x00"))
    elif mode == "badbits":
        out.write(frames.encode(FrameType.FATE, names.root_name(1, "2026-01-01T00:00:00Z"), b"\x01\x00"))
    elif mode == "lie-fates":
        data, result = _honest(location, policy, True)
        oldest = min(result.snapshots, key=lambda s: s.seq)  # type: ignore[attr-defined]
        lie = prune_frames.encode_fate(prune_frames.Fate(True, ("last",)))
        honest = prune_frames.encode_fate(prune_service._fate(oldest))
        out.write(data.replace(frames.encode(FrameType.FATE, oldest.name, honest),
                               frames.encode(FrameType.FATE, oldest.name, lie)))  # fmt: skip
    elif mode == "lie-deleted":
        data, result = _honest(location, policy, dry_run)
        kept = [s for s in result.snapshots if s.kept]  # type: ignore[attr-defined]
        repo = confine.resolve(location, confine.agent_root())
        (Path(repo) / kept[0].name).unlink()
        out.write(data)
    elif mode == "dry-deletes":
        data, _result = _honest(location, policy, False)
        out.write(data[:-1] + b"\x01")  # DONE comes last; its record's last byte is the dry-run flag
    elif mode == "after":
        data, _result = _honest(location, policy, dry_run)
        out.write(data + frames.encode(FrameType.FATE, names.root_name(99, "2026-01-01T00:00:00Z"), fate))
    elif mode in ("manydamage", "damagecount"):
        lines = 51 if mode == "manydamage" else 1
        for i in range(lines):
            out.write(frames.encode(FrameType.DAMAGED, "", f"finding {i}".encode()))
        out.write(frames.encode(FrameType.DONE, "", prune_frames.encode_totals(
            prune_frames.Totals(0, 0, 0, 0, dry_run, 51 if mode == "manydamage" else 0))))  # fmt: skip
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
