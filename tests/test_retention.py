"""The retention policy (protocol/retention.py): restic's forget rules, checked as properties."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qubes_backup_protocol.retention import Policy, keep, parse_time, reasons

START = datetime(2026, 1, 1, tzinfo=UTC)


def history(gaps: list[int]) -> list[tuple[int, datetime]]:
    """Snapshots 1..n, each ``gap`` minutes after the previous one."""
    out, when = [], START
    for seq, gap in enumerate(gaps, 1):
        when += timedelta(minutes=gap)
        out.append((seq, when))
    return out


gaps = st.lists(st.integers(min_value=0, max_value=60 * 24 * 20), min_size=1, max_size=80)


@st.composite
def policy(draw: st.DrawFn) -> Policy:
    counts = [draw(st.integers(0, 12)) for _ in range(4)]
    if not any(counts):
        counts[draw(st.integers(0, 3))] = 1
    return Policy(*counts)


@settings(max_examples=300, deadline=None)
@given(gaps, policy())
def test_the_rules(g: list[int], p: Policy) -> None:
    snaps = history(g)
    kept = keep(snaps, p)
    newest_first = sorted(snaps, key=lambda s: (s[1], s[0]), reverse=True)
    assert len(snaps) in kept  # the newest by number, always
    assert {seq for seq, _ in newest_first[: p.keep_last]} <= kept
    for count, key in ((p.keep_daily, lambda t: t.date()), (p.keep_weekly, lambda t: t.isocalendar()[:2]),
                       (p.keep_monthly, lambda t: (t.year, t.month))):  # fmt: skip
        buckets: dict[object, list[tuple[int, datetime]]] = {}
        for s in newest_first:
            buckets.setdefault(key(s[1]), []).append(s)
        newest_buckets = list(buckets)[:count]  # dicts keep insertion order: newest bucket first
        for b in newest_buckets:
            assert buckets[b][0][0] in kept  # the newest of each of the COUNT newest buckets
    # nothing else: every kept snapshot has a reason that holds
    why = reasons(snaps, p)
    assert set(why) == kept
    assert len(kept) <= 1 + p.keep_last + p.keep_daily + p.keep_weekly + p.keep_monthly


def test_daily_keeps_the_newest_of_each_day() -> None:
    t = parse_time
    snaps = [(1, t("2026-03-01T01:00:00Z")), (2, t("2026-03-01T23:00:00Z")), (3, t("2026-03-02T05:00:00Z")),
             (4, t("2026-03-03T05:00:00Z")), (5, t("2026-03-03T06:00:00Z"))]  # fmt: skip
    assert keep(snaps, Policy(keep_daily=2)) == {5, 3}
    assert keep(snaps, Policy(keep_daily=3)) == {5, 3, 2}
    assert reasons(snaps, Policy(keep_last=1, keep_daily=1))[5] == ["newest", "last", "daily"]


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="keeps nothing"):
        Policy()
    with pytest.raises(ValueError, match="keep-daily"):
        Policy(keep_daily=-1)
    with pytest.raises(ValueError, match="twice"):
        keep([(1, START), (1, START)], Policy(keep_last=1))
    with pytest.raises(ValueError):
        parse_time("2026-03-01 01:00:00")
