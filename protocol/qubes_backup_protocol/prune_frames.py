"""The frames of a keyless prune (docs/PROTOCOL.md section 5c, docs/REPOSITORY.md section 11).

dom0 asks the backup VM's agent to prune a repository over qubes.Backup (prune deletes, so it goes through the
service that may write) without any key:

    dom0:  LOCATION(name="prune", data=repository directory)
    dom0:  PRUNE(data=PolicyRecord)           the retention policy and the dry-run flag
    agent: FATE(name=roots/NAME, data=FateRecord) ...   one per snapshot root present before the prune,
                                                        ascending sequence number, at most MAX_ROOTS
    agent: DAMAGED(data=one line) ...         at most MAX_DAMAGE: what is missing or malformed in a retained
                                              snapshot; then the prune deleted nothing at all
    agent: DONE(data=TotalsRecord)            what was (or, dry run, would be) deleted and kept
           or ERROR(one line) at any point

Every record has a fixed width and a grammar ``decode_*`` checks completely (unknown bits, trailing bytes,
counts out of range are refused); the agent builds them with ``encode_*``, which applies the same checks.
"""

from __future__ import annotations

from dataclasses import dataclass

from construct import ConstructError, Int8ub, Int32ub, Int64ub, Struct, Terminated

from qubes_backup_protocol.frames import ProtocolError
from qubes_backup_protocol.retention import MAX_KEEP, Policy

REQUEST = "prune"  # the LOCATION frame's name on qubes.Backup that asks for a prune
POLICY_SIZE = 4 * 4 + 1
FATE_SIZE = 2
TOTALS_SIZE = 4 * 8 + 4 + 1
MAX_DAMAGE = 50  # DAMAGED lines in a report (the totals count every finding)
MAX_COUNT = 1 << 53  # objects and bytes: any count above this is refused (and JSON-safe below it)
#: The reasons a snapshot is kept (retention.reasons' words, and ``bad-time``: its name states an impossible
#: time, so its age is unknown), one bit each on the wire.
REASONS = ("newest", "last", "daily", "weekly", "monthly", "bad-time")
_FLAG_DRY_RUN = 1

PolicyRecord = Struct(
    "keep_last" / Int32ub,
    "keep_daily" / Int32ub,
    "keep_weekly" / Int32ub,
    "keep_monthly" / Int32ub,
    "flags" / Int8ub,  # bit 0: dry run; every other bit 0
    Terminated,
)
FateRecord = Struct(
    "kept" / Int8ub,  # 1 kept, 0 deleted (dry run: would be deleted)
    "reasons" / Int8ub,  # bit i: REASONS[i]; nonzero exactly when kept
    Terminated,
)
TotalsRecord = Struct(
    "objects_deleted" / Int64ub,
    "bytes_freed" / Int64ub,
    "objects_kept" / Int64ub,
    "bytes_kept" / Int64ub,
    "damage" / Int32ub,  # findings in retained snapshots (nonzero: nothing was deleted)
    "dry_run" / Int8ub,
    Terminated,
)


class PruneFrameError(ProtocolError):
    """A prune record outside the grammar."""


@dataclass(frozen=True)
class Fate:
    kept: bool
    reasons: tuple[str, ...]  # in REASONS order; empty exactly when deleted


@dataclass(frozen=True)
class Totals:
    objects_deleted: int
    bytes_freed: int
    objects_kept: int
    bytes_kept: int
    dry_run: bool
    damage: int = 0


def _parse(struct: Struct, data: bytes, size: int, what: str) -> object:
    if len(data) != size:
        raise PruneFrameError(f"{what} of {len(data)} bytes (expected {size})")
    try:
        return struct.parse(bytes(data))
    except ConstructError as e:
        raise PruneFrameError(f"malformed {what}: {type(e).__name__}") from None


def encode_policy(policy: Policy, dry_run: bool) -> bytes:
    return bytes(PolicyRecord.build({**dict(policy.counts()), "flags": _FLAG_DRY_RUN if dry_run else 0}))


def decode_policy(data: bytes) -> tuple[Policy, bool]:
    """A PRUNE frame's record: the policy (retention's own checks apply) and the dry-run flag."""
    raw = _parse(PolicyRecord, data, POLICY_SIZE, "prune request")
    if raw.flags & ~_FLAG_DRY_RUN:  # type: ignore[attr-defined]
        raise PruneFrameError("prune request with unknown flags")
    counts = {k: int(getattr(raw, k)) for k in ("keep_last", "keep_daily", "keep_weekly", "keep_monthly")}
    if any(v > MAX_KEEP for v in counts.values()):
        raise PruneFrameError(f"prune request keeps more than {MAX_KEEP}")
    try:
        policy = Policy(**counts)
    except ValueError as e:
        raise PruneFrameError(str(e)) from None
    return policy, bool(raw.flags & _FLAG_DRY_RUN)  # type: ignore[attr-defined]


def encode_fate(fate: Fate) -> bytes:
    unknown = [r for r in fate.reasons if r not in REASONS]
    if unknown or fate.kept != bool(fate.reasons):
        raise PruneFrameError(f"a fate the protocol cannot carry: kept={fate.kept}, reasons={fate.reasons}")
    mask = sum(1 << i for i, r in enumerate(REASONS) if r in fate.reasons)
    return bytes(FateRecord.build({"kept": int(fate.kept), "reasons": mask}))


def decode_fate(data: bytes) -> Fate:
    raw = _parse(FateRecord, data, FATE_SIZE, "snapshot fate")
    kept, mask = int(raw.kept), int(raw.reasons)  # type: ignore[attr-defined]
    if kept > 1 or mask >> len(REASONS) or bool(kept) != bool(mask):
        raise PruneFrameError(f"snapshot fate outside the grammar (kept {kept}, reasons {mask:#x})")
    return Fate(bool(kept), tuple(r for i, r in enumerate(REASONS) if mask >> i & 1))


def encode_totals(totals: Totals) -> bytes:
    values = [totals.objects_deleted, totals.bytes_freed, totals.objects_kept, totals.bytes_kept]
    if not all(0 <= v <= MAX_COUNT for v in values) or not 0 <= totals.damage < 1 << 32:
        raise PruneFrameError("prune totals out of range")
    return bytes(TotalsRecord.build({"objects_deleted": values[0], "bytes_freed": values[1],
                                     "objects_kept": values[2], "bytes_kept": values[3], "damage": totals.damage,
                                     "dry_run": int(totals.dry_run)}))  # fmt: skip


def decode_totals(data: bytes) -> Totals:
    raw = _parse(TotalsRecord, data, TOTALS_SIZE, "prune totals")
    values = [int(getattr(raw, k)) for k in ("objects_deleted", "bytes_freed", "objects_kept", "bytes_kept")]
    dry = int(raw.dry_run)  # type: ignore[attr-defined]
    if dry > 1 or not all(v <= MAX_COUNT for v in values):
        raise PruneFrameError("prune totals out of range")
    if (values[0] == 0) != (values[1] == 0) or (values[2] == 0) != (values[3] == 0):
        raise PruneFrameError("prune totals: objects without bytes, or bytes without objects")
    damage = int(raw.damage)  # type: ignore[attr-defined]
    if damage and values[0]:
        raise PruneFrameError("prune totals: objects deleted although a retained snapshot is damaged")
    return Totals(values[0], values[1], values[2], values[3], dry_run=bool(dry), damage=damage)
