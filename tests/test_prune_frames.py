"""The prune records (protocol/qubes_backup_protocol/prune_frames.py, docs/PROTOCOL.md section 5c): what encodes
decodes to the same thing, and every record outside the grammar is refused.  Property runs: 200 examples by
default, 5,000 with QB_LONG=1."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qubes_backup_dom0.qubes.prune import expected_fates
from qubes_backup_protocol import frames
from qubes_backup_protocol import prune_frames as pf
from qubes_backup_protocol import repo as names
from qubes_backup_protocol.frames import FrameType
from qubes_backup_protocol.retention import MAX_KEEP, Policy, reasons

EXAMPLES = 5000 if os.environ.get("QB_LONG") == "1" else 200
counts = st.integers(min_value=0, max_value=MAX_KEEP)


@settings(max_examples=EXAMPLES, deadline=None)
@given(counts, counts, counts, counts, st.booleans())
def test_policy_round_trip(last: int, daily: int, weekly: int, monthly: int, dry: bool) -> None:
    if not any((last, daily, weekly, monthly)):
        with pytest.raises(ValueError):
            Policy(last, daily, weekly, monthly)
        raw = pf.PolicyRecord.build({"keep_last": 0, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0,
                                     "flags": int(dry)})  # fmt: skip
        with pytest.raises(pf.PruneFrameError, match="keeps nothing"):
            pf.decode_policy(raw)
        return
    policy = Policy(last, daily, weekly, monthly)
    data = pf.encode_policy(policy, dry)
    assert len(data) == pf.POLICY_SIZE
    assert pf.decode_policy(data) == (policy, dry)


def test_policy_refusals() -> None:
    good = pf.encode_policy(Policy(keep_last=1), False)
    for bad in (good[:-1], good + b"\0", good[:-1] + b"\x02", b"\x00\x0f\x42\x41" + good[4:]):
        with pytest.raises(pf.PruneFrameError):
            pf.decode_policy(bad)


@given(st.booleans(), st.sets(st.sampled_from(pf.REASONS)))
def test_fate_round_trip(kept: bool, why: set[str]) -> None:
    fate = pf.Fate(kept, tuple(r for r in pf.REASONS if r in why))
    if kept != bool(why):
        with pytest.raises(pf.PruneFrameError):
            pf.encode_fate(fate)
        return
    assert pf.decode_fate(pf.encode_fate(fate)) == fate


@pytest.mark.parametrize("raw", [b"", b"\x01", b"\x01\x01\x00", b"\x02\x01", b"\x01\x00", b"\x00\x01", b"\x01\x40",
                                 b"\x01\x80"])  # fmt: skip
def test_fate_refusals(raw: bytes) -> None:
    with pytest.raises(pf.PruneFrameError):
        pf.decode_fate(raw)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.integers(0, pf.MAX_COUNT), st.integers(1, pf.MAX_COUNT), st.integers(0, pf.MAX_COUNT),
       st.integers(1, pf.MAX_COUNT), st.booleans(), st.integers(0, (1 << 32) - 1))  # fmt: skip
def test_totals_round_trip(deleted: int, freed: int, kept: int, kept_bytes: int, dry: bool, damage: int) -> None:
    freed = freed if deleted else 0
    kept_bytes = kept_bytes if kept else 0
    deleted = 0 if damage else deleted
    freed = 0 if damage else freed
    totals = pf.Totals(deleted, freed, kept, kept_bytes, dry, damage)
    assert pf.decode_totals(pf.encode_totals(totals)) == totals


def test_totals_refusals() -> None:
    def raw(*values: int, damage: int = 0, dry: int = 0) -> bytes:
        keys = ("objects_deleted", "bytes_freed", "objects_kept", "bytes_kept")
        return bytes(pf.TotalsRecord.build({**dict(zip(keys, values, strict=True)), "damage": damage, "dry_run": dry}))

    for bad in (raw(1, 0, 0, 0), raw(0, 5, 0, 0), raw(0, 0, 0, 7), raw(pf.MAX_COUNT + 1, 1, 0, 0),
                raw(1, 1, 0, 0, damage=1), raw(0, 0, 0, 0, dry=2), raw(0, 0, 0, 0)[:-1]):  # fmt: skip
        with pytest.raises(pf.PruneFrameError):
            pf.decode_totals(bad)


def test_expected_fates_match_retention() -> None:
    """dom0's expectation is retention's over the names; a name with an impossible time is kept (bad-time) and,
    when it is the newest by number, it is the newest."""
    times = ["2026-11-01T10:00:00Z", "2026-11-02T10:00:00Z", "2026-11-02T11:00:00Z"]
    roots = [names.root_name(i, t) for i, t in enumerate(times, 1)]
    from qubes_backup_protocol.retention import parse_time

    policy = Policy(keep_daily=1)
    assert expected_fates(policy, roots) == reasons([(i, parse_time(t)) for i, t in enumerate(times, 1)], policy)
    bad = "roots/0000000004-20261399T000000Z"
    assert names.is_root_name(bad)
    assert expected_fates(policy, [*roots, bad]) == {3: ["daily"], 4: ["newest", "bad-time"]}


def _serve(tmp_path: Path, request: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[int, list[frames.Frame]]:
    """qubes.Backup's serve() on ``request`` (the agent's root: tmp_path), and the frames it answers."""
    from qubes_backup_agent import backup_service

    monkeypatch.setenv("QUBES_AGENT_ROOT", str(tmp_path))
    out = io.BytesIO()
    rc = backup_service.serve(io.BytesIO(request), out)  # type: ignore[arg-type]
    out.seek(0)
    got = []
    while (f := frames.read_frame(out, {t: (64, 4096) for t in FrameType})) is not None:
        got.append(f)
    return rc, got


def test_agent_refuses_bad_prune_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's side of a prune request: a policy that keeps nothing, another frame instead of PRUNE, a
    missing repository: one ERROR line each; dom0 gone before its request: nothing, exit 1."""
    (tmp_path / "home" / "user").mkdir(parents=True)
    location = frames.encode(FrameType.LOCATION, pf.REQUEST, b"/home/user/repo")
    zero = bytes(pf.PolicyRecord.build({"keep_last": 0, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0,
                                        "flags": 0}))  # fmt: skip
    cases = [
        (location + frames.encode(FrameType.PRUNE, "", zero), "bad request: the policy keeps nothing"),
        (location + frames.encode(FrameType.DATA, "", b"x"), "bad request: unexpected frame type DATA"),
        (location + frames.encode(FrameType.PRUNE, "", pf.encode_policy(Policy(keep_last=1), False)),
         "location does not exist: /home/user/repo"),
    ]  # fmt: skip
    for request, says in cases:
        rc, got = _serve(tmp_path, request, monkeypatch)
        assert rc == 1 and [f.type for f in got] == [FrameType.ERROR], got
        assert bytes(got[0].data).decode().startswith(says), got[0].data
    rc, got = _serve(tmp_path, location, monkeypatch)
    assert rc == 1 and got == []


@st.composite
def root_lists(draw: st.DrawFn) -> list[str]:
    """Root names of distinct numbers, ascending, with times in a few months (some impossible, month 13)."""
    seqs = sorted(draw(st.sets(st.integers(1, 400), min_size=0, max_size=40)))
    out = []
    for seq in seqs:
        month = draw(st.sampled_from([10, 11, 12, 13] if draw(st.integers(0, 20)) == 0 else [10, 11, 12]))
        day, hour = draw(st.integers(1, 28)), draw(st.integers(0, 23))
        out.append(f"roots/{seq:010d}-2026{month:02d}{day:02d}T{hour:02d}0000Z")
    return out


@settings(max_examples=EXAMPLES, deadline=None)
@given(root_lists(), st.integers(0, 5), st.integers(0, 5), st.integers(0, 3), st.integers(0, 2))
def test_dom0_expects_what_the_agent_decides(roots: list[str], last: int, daily: int, weekly: int,
                                             monthly: int) -> None:  # fmt: skip
    """dom0 refuses a report whose fates differ from its own expectation: for an honest agent they must agree,
    on every list of root names (impossible times included) and policy."""
    from qubes_backup_agent.prune import decide

    if not any((last, daily, weekly, monthly)):
        return
    policy = Policy(last, daily, weekly, monthly)
    agent = {f.seq: (f.kept, sorted(f.reasons)) for f in decide(roots, policy)}
    dom0 = expected_fates(policy, roots)
    assert agent == {names.root_seq(r): (names.root_seq(r) in dom0, sorted(dom0.get(names.root_seq(r), [])))
                     for r in roots}  # fmt: skip
