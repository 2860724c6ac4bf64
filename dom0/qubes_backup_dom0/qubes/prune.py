"""Asking the backup VM to prune a repository without any key (docs/PROTOCOL.md section 5c), and checking what
it answers as far as dom0 can without the passphrase.

The request goes over qubes.Backup (prune deletes; the service that may write): LOCATION ``prune``, then
PRUNE with the policy.  The answer is bounded frame by frame (at most ``MAX_ROOTS`` FATE frames, each a root
name of the grammar and a 2-byte record; DONE a 33-byte record) and then checked:

- the roots are listed once each, in ascending order; the agent applied the policy dom0 sent: dom0 recomputes
  ``retention.reasons`` over the listed roots (numbers and times from their names) and refuses any other fate
  or reason, and a dry run that says it was not (or the reverse);
- after the prune, a listing of the repository (qubes.Restore's opening, no key) must hold every snapshot
  reported kept (all of them after a dry run) and none reported deleted; a later root (a backup that ran just
  after) is allowed.

This catches an agent that misreports, not one that lies consistently: the listing is the backup VM's word
too.  ``qvm-backup-prune --audit`` (passphrase) checks the retained snapshots against the authenticated
history instead (restore/audit.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qubes_backup_protocol import prune_frames, retention
from qubes_backup_protocol import repo as names
from qubes_backup_protocol.frames import MAX_ERROR_LEN, FrameType, ProtocolError, safe_text
from qubes_backup_protocol.retention import Policy

from qubes_backup_dom0.errors import BackupError, VerificationError
from qubes_backup_dom0.qubes.repoclient import RepoSession
from qubes_backup_dom0.qubes.transport import Channel, ChannelClosed, Transport

SERVICE = "qubes.Backup"
MAX_FATES = names.MAX_ROOTS  # FATE frames in one answer (a repository lists at most this many roots)


class PruneDamaged(VerificationError):
    """The agent found a retained snapshot damaged (an object missing or malformed) and deleted nothing."""

    def __init__(self, message: str, lines: list[str]) -> None:
        super().__init__(message)
        self.lines = lines


@dataclass(frozen=True)
class SnapshotFate:
    seq: int
    created: str  # from the root's name (not authenticated)
    name: str  # roots/NAME
    kept: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class PruneResult:
    vm: str
    location: str
    policy: Policy
    dry_run: bool
    snapshots: list[SnapshotFate]
    totals: prune_frames.Totals
    warnings: list[str] = field(default_factory=list)

    @property
    def deleted(self) -> list[SnapshotFate]:
        return [s for s in self.snapshots if not s.kept]


def _recv(channel: Channel, vm: str, limits: dict[FrameType, tuple[int, int]],
          what: str) -> tuple[FrameType, str, bytes] | None:  # fmt: skip
    limits = {**limits, FrameType.ERROR: (0, MAX_ERROR_LEN)}
    try:
        frame = channel.recv(limits, names.is_root_name)
    except ProtocolError as e:
        raise VerificationError(f"backup VM {vm} sent a malformed prune answer ({what}): {e}") from None
    if frame is None:
        return None
    if frame.type == FrameType.ERROR:
        raise BackupError(f"backup VM {vm} reports: {safe_text(frame.data)}")
    return frame.type, frame.name, bytes(frame.data)


@dataclass
class Answer:
    fates: list[tuple[str, prune_frames.Fate]]
    damaged: list[str]
    totals: prune_frames.Totals


def read_answer(channel: Channel, vm: str) -> Answer:
    """FATE frames (bounded in number, names, order), DAMAGED lines (bounded), DONE, then the end of the stream."""
    fates: list[tuple[str, prune_frames.Fate]] = []
    damaged: list[str] = []
    limits = {FrameType.FATE: (64, prune_frames.FATE_SIZE), FrameType.DAMAGED: (0, MAX_ERROR_LEN),
              FrameType.DONE: (0, prune_frames.TOTALS_SIZE)}  # fmt: skip
    while True:
        got = _recv(channel, vm, limits, "the snapshots")
        if got is None:
            tail = channel.stderr_tail()
            raise BackupError(f"backup VM {vm} stopped answering before the prune finished"
                              f"{f' (agent said: {tail})' if tail else ''}")  # fmt: skip
        ftype, name, data = got
        try:
            if ftype == FrameType.DONE:
                totals = prune_frames.decode_totals(data)
                break
            if ftype == FrameType.DAMAGED:
                if len(damaged) >= prune_frames.MAX_DAMAGE:
                    raise VerificationError(f"backup VM {vm} reports more than {prune_frames.MAX_DAMAGE} findings")
                damaged.append(safe_text(data))
                limits.pop(FrameType.FATE, None)  # the fates came first
                continue
            if len(fates) >= MAX_FATES:
                raise VerificationError(f"backup VM {vm} reports more than {MAX_FATES} snapshots")
            if not names.is_root_name(name):
                raise VerificationError(f"backup VM {vm} reports a bad snapshot name {safe_text(name, 80)}")
            if fates and names.root_seq(name) <= names.root_seq(fates[-1][0]):
                raise VerificationError(f"backup VM {vm} reports snapshot {names.root_seq(name)} twice or out of "
                                        "order")  # fmt: skip
            fates.append((name, prune_frames.decode_fate(data)))
        except prune_frames.PruneFrameError as e:
            raise VerificationError(f"backup VM {vm} sent a malformed prune answer: {e}") from None
    if bool(damaged) != bool(totals.damage) or len(damaged) > totals.damage:
        raise VerificationError(f"backup VM {vm} sent a malformed prune answer: {len(damaged)} findings listed, "
                                f"{totals.damage} counted")  # fmt: skip
    if _recv(channel, vm, {}, "after its report") is not None:  # any frame but ERROR is refused by recv already
        raise VerificationError(f"backup VM {vm} sent more after its prune report")
    return Answer(fates, damaged, totals)


def expected_fates(policy: Policy, roots: list[str]) -> dict[int, list[str]]:
    """What the policy keeps of ``roots`` and why, as the agent's prune decides it: on the times in the names;
    a root whose name states an impossible time (``bad-time``) is kept, its age unknown."""
    timed, bad = [], set()
    for name in roots:
        try:
            timed.append((names.root_seq(name), retention.parse_time(names.root_created(name))))
        except ValueError:
            bad.add(names.root_seq(name))
    why = retention.reasons(timed, policy)
    newest = max((names.root_seq(n) for n in roots), default=0)
    if newest in bad:  # the newest of the dated ones is not the newest
        why = {seq: [r for r in rs if r != "newest"] for seq, rs in why.items()}
        why = {seq: rs for seq, rs in why.items() if rs}
    for seq in bad:
        why[seq] = ["newest", "bad-time"] if seq == newest else ["bad-time"]
    return why


def check_fates(vm: str, policy: Policy, dry_run: bool, answer: Answer) -> list[SnapshotFate]:
    """The agent's fates must be the policy's over the roots it listed."""
    if answer.totals.dry_run != dry_run:
        said = "a dry run" if answer.totals.dry_run else "a prune"
        raise VerificationError(f"backup VM {vm} reports {said} when asked for {'a dry run' if dry_run else 'a prune'}")
    snapshots = [SnapshotFate(names.root_seq(n), names.root_created(n), n, f.kept, f.reasons) for n, f in answer.fates]
    why = expected_fates(policy, [n for n, _ in answer.fates])
    for s in snapshots:
        expected = why.get(s.seq)
        if (expected is not None) != s.kept or set(expected or ()) != set(s.reasons):
            told = f"kept ({', '.join(s.reasons)})" if s.kept else "deleted"
            meant = f"keeps it ({', '.join(expected)})" if expected else "deletes it"
            raise VerificationError(f"backup VM {vm} reports snapshot {s.seq} {told}, but the policy "
                                    f"{policy.describe()} {meant}: it did not prune as asked")  # fmt: skip
    return snapshots


def check_listing(vm: str, snapshots: list[SnapshotFate], dry_run: bool, roots: list[str]) -> None:
    """After the prune, the repository lists what the agent reported kept, and nothing it reported deleted
    (``dry_run``: nothing was deleted, after a dry run or a damage report)."""
    listed = {names.root_seq(r): r for r in roots}
    newest = snapshots[-1].seq if snapshots else 0
    for s in snapshots:
        there = listed.get(s.seq) == s.name
        if (s.kept or dry_run) and not there:
            said = f"snapshot {s.seq} kept" if s.kept else "that nothing was deleted"
            raise VerificationError(f"backup VM {vm} reported {said}, but no longer lists snapshot {s.seq}")
        if not (s.kept or dry_run) and s.seq in listed:
            raise VerificationError(f"backup VM {vm} reported snapshot {s.seq} deleted, but still lists it")
    reported = {s.seq for s in snapshots}
    stray = sorted(seq for seq in listed if seq not in reported and seq <= newest)
    if stray:
        raise VerificationError(f"backup VM {vm} lists snapshot {stray[0]}, which its prune report did not mention")


def prune(transport: Transport, vm: str, location: str, policy: Policy, dry_run: bool) -> PruneResult:
    """Ask ``vm`` to prune the repository ``location`` (a directory in it) by ``policy``; check its report."""
    channel = Channel(transport.start(SERVICE, vm), vm=f"backup VM {vm}")
    try:
        try:
            channel.send(FrameType.LOCATION, prune_frames.REQUEST, location.encode("utf-8"))
            channel.send(FrameType.PRUNE, "", prune_frames.encode_policy(policy, dry_run))
            channel.close_input()
        except ChannelClosed:
            pass  # the agent refused early (a bad location): its ERROR frame says why
        answer = read_answer(channel, vm)
    finally:
        channel.close()
    snapshots = check_fates(vm, policy, dry_run, answer)
    warnings: list[str] = []
    try:
        session = RepoSession(transport, "qubes.Restore", vm, location)
        try:
            roots: list[str] | None = session.read_opening().roots
        finally:
            session.close()
    except VerificationError:
        raise
    except BackupError as e:  # e.g. a backup took the lock the moment the prune released it
        roots = None
        warnings.append(f"could not list the repository after the prune, so its report is unchecked: {e}")
    if roots is not None:
        check_listing(vm, snapshots, dry_run or bool(answer.damaged), roots)
    if answer.damaged:
        n = answer.totals.damage
        raise PruneDamaged(f"repository {vm}:{location} is damaged ({n} finding{'' if n == 1 else 's'} in the "
                           f"snapshots to keep, first: {answer.damaged[0]}): nothing was deleted; check it with "
                           "qvm-backup-prune --audit", answer.damaged)  # fmt: skip
    return PruneResult(vm, location, policy, dry_run, snapshots, answer.totals, warnings)
