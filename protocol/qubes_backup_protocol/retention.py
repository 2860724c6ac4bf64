"""Which snapshots a retention policy keeps (docs/REPOSITORY.md section 11): one pure function, shared by the
agent's keyless prune (which deletes what it does not keep) and dom0's ``qvm-backup-prune --audit`` (which
checks, from the authenticated times in the newest root's history, that the retained snapshots are exactly
the policy's).

The rules are restic's ``forget`` rules, on the snapshots' creation times (UTC):

- ``keep_last`` N: the N newest snapshots;
- ``keep_daily`` D: for each of the D newest calendar days (UTC) that have a snapshot, the newest snapshot of
  that day; ``keep_weekly`` W the same per ISO week, ``keep_monthly`` M per calendar month;
- a snapshot kept by any rule is kept; the newest snapshot is always kept (dom0 dedups against it).

A policy that keeps nothing by any rule is refused: it would keep only the newest, which is rarely meant.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

MAX_KEEP = 1_000_000  # any count above this is refused (it keeps everything anyway)
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class Policy:
    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0

    def __post_init__(self) -> None:
        for name, value in self.counts():
            if not 0 <= value <= MAX_KEEP:
                raise ValueError(f"--{name.replace('_', '-')} must be between 0 and {MAX_KEEP}")
        if not any(value for _, value in self.counts()):
            raise ValueError("the policy keeps nothing: give at least one of --keep-last, --keep-daily, "
                             "--keep-weekly, --keep-monthly")  # fmt: skip

    def counts(self) -> list[tuple[str, int]]:
        return [("keep_last", self.keep_last), ("keep_daily", self.keep_daily),
                ("keep_weekly", self.keep_weekly), ("keep_monthly", self.keep_monthly)]  # fmt: skip

    def describe(self) -> str:
        """``last=7 daily=14 ...``: the nonzero counts, for reports and the prune request."""
        return " ".join(f"{name[5:]}={value}" for name, value in self.counts() if value)


def parse_time(created: str) -> datetime:
    """``YYYY-MM-DDTHH:MM:SSZ`` (a root's creation time) as an aware datetime; ValueError otherwise."""
    return datetime.strptime(created, TIME_FORMAT).replace(tzinfo=UTC)


def _buckets(key: Callable[[datetime], object], count: int, newest_first: list[tuple[int, datetime]]) -> set[int]:
    kept: set[int] = set()
    seen: set[object] = set()
    for seq, when in newest_first:
        if len(seen) >= count:
            break
        bucket = key(when)
        if bucket not in seen:
            seen.add(bucket)
            kept.add(seq)  # the newest snapshot of a bucket not seen yet
    return kept


def reasons(snapshots: Iterable[tuple[int, datetime]], policy: Policy) -> dict[int, list[str]]:
    """For each snapshot kept, why (``last``, ``daily``, ``weekly``, ``monthly``, ``newest``); snapshots that
    are not keys are the ones to delete.  ``snapshots`` are (sequence number, creation time); the order of
    time ties is by sequence number (higher is newer)."""
    newest_first = sorted(snapshots, key=lambda s: (s[1], s[0]), reverse=True)
    if len({seq for seq, _ in newest_first}) != len(newest_first):
        raise ValueError("a sequence number is listed twice")
    why: dict[int, list[str]] = {}
    rules: list[tuple[str, int, Callable[[datetime], object]]] = [
        ("daily", policy.keep_daily, lambda t: t.date()),
        ("weekly", policy.keep_weekly, lambda t: t.isocalendar()[:2]),
        ("monthly", policy.keep_monthly, lambda t: (t.year, t.month)),
    ]
    for seq, _ in newest_first[: policy.keep_last]:
        why.setdefault(seq, []).append("last")
    for name, count, key in rules:
        for seq in _buckets(key, count, newest_first):
            why.setdefault(seq, []).append(name)
    if newest_first:
        newest = max(seq for seq, _ in newest_first)  # the newest by number: the one dom0 builds on
        why.setdefault(newest, []).insert(0, "newest")
    return why


def keep(snapshots: Iterable[tuple[int, datetime]], policy: Policy) -> set[int]:
    """The sequence numbers the policy keeps."""
    return set(reasons(snapshots, policy))
