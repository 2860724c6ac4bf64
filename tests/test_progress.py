"""Progress a person can trust (issue 12 item 4): lines without a terminal, 100% at the end, real bytes,
one unit system, no wild first ETA, and dom0's home not counted as a VM."""

from __future__ import annotations

import io
import re

from conftest import KDF, PASSPHRASE, VM_BACKUPS, Sim
from qubes_backup_dom0.cli.progress import ETA_AFTER_SECONDS, Progress
from qubes_backup_dom0.restore.machine import Restore, RestoreOptions

MiB = 1 << 20
DECIMAL_UNITS = re.compile(r"\b[0-9.]+ ?[kMGT]B\b")  # kB, MB, GB: never (binary KiB/MiB/GiB only)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines_progress(total: int) -> tuple[Progress, io.StringIO, Clock]:
    out, clock = io.StringIO(), Clock()
    return Progress(total, "verify", stream=out, clock=clock), out, clock


def test_without_a_terminal_lines_at_steps_and_intervals_then_100_percent() -> None:
    bar, out, clock = lines_progress(100 * MiB)
    for i in range(1, 101):  # 1 MiB per 0.5 s: a step every 10 % (5 s apart)
        clock.now += 0.5
        bar(i * MiB, 100 * MiB)
    bar.close()
    lines = out.getvalue().splitlines()
    assert 9 <= len(lines) <= 11, lines
    assert all(line.startswith("verify: ") for line in lines)
    assert lines[-1].startswith("verify: 100%, 100.0 MiB of 100.0 MiB"), lines[-1]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_a_slow_stretch_still_gets_a_line_every_ten_seconds() -> None:
    bar, out, clock = lines_progress(100 * MiB)
    for i in range(30):  # 30 s within the first percent
        clock.now += 1
        bar(i * 1000, 100 * MiB)
    assert len(out.getvalue().splitlines()) == 3


def test_no_eta_before_seconds_and_percent_have_passed() -> None:
    bar, _out, clock = lines_progress(100 * MiB)
    clock.now += 0.2
    bar(10 * MiB, 100 * MiB)  # 10% after 0.2 s: far too early to extrapolate
    assert bar.eta(clock.now) is None and "ETA" not in bar.text(clock.now)
    clock.now += ETA_AFTER_SECONDS
    bar(11 * MiB, 100 * MiB)
    eta = bar.eta(clock.now)
    assert eta is not None and "ETA" in bar.text(clock.now)
    h, m, s = (int(x) for x in eta.split(":"))
    assert 20 <= h * 3600 + m * 60 + s <= 40  # 89 MiB left at ~3.4 MiB/s


def test_quiet_prints_nothing() -> None:
    out = io.StringIO()
    bar = Progress(10, "backup", enabled=False, stream=out)
    bar(10, 10)
    bar.close()
    assert out.getvalue() == ""


def _verify(sim: Sim, location: str, *extra: str) -> str:
    r = sim.restore("--verify-only", "-d", "backupvm", *extra, location)
    assert r.returncode == 0, r.stderr
    return r.stderr + r.stdout


def test_cli_without_terminal_prints_progress_lines_and_binary_units(sim: Sim) -> None:
    r = sim.run("qvm-backup", "-y", "-p", "/pw", *KDF, "-d", "backupvm", VM_BACKUPS)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^backup: 100%, ", r.stderr, re.M), r.stderr
    assert "10 VMs and dom0 home" in r.stderr, r.stderr
    (backup,) = sim.vm_backups.iterdir()
    text = _verify(sim, f"{VM_BACKUPS}/{backup.name}")
    assert re.search(r"^verify: 100%, ([0-9.]+ \w+) of \1", text, re.M), text
    assert "10 VMs and dom0 home" in text, text
    assert DECIMAL_UNITS.search(r.stderr + text) is None, r.stderr + text
    quiet = sim.restore("-q", "--verify-only", "-d", "backupvm", f"{VM_BACKUPS}/{backup.name}")
    assert "verify:" not in quiet.stderr, quiet.stderr


def test_restore_progress_counts_extracted_data_to_exactly_the_total(sim: Sim) -> None:
    """The callback sees data bytes extracted (not stored, compressed bytes): non-decreasing, ending at
    total == the plan's data, for a compressed backup whose stored size is far below its data."""
    r = sim.run("qvm-backup", "-y", "-p", "/pw", *KDF, "-d", "backupvm", VM_BACKUPS)
    assert r.returncode == 0, r.stderr
    (backup,) = sim.vm_backups.iterdir()
    calls: list[tuple[int, int]] = []
    job = Restore(sim.system, f"{VM_BACKUPS}/{backup.name}", PASSPHRASE.encode(), source_vm="backupvm",
                  options=RestoreOptions(verify_only=True), progress=lambda d, t: calls.append((d, t)))  # fmt: skip
    try:
        job.open()
        plan = job.plan()
        job.run()
    finally:
        job.close()
    assert backup.stat().st_size < plan.data  # compressed: counting stored bytes could never reach 100%
    assert calls and calls[-1] == (plan.data, plan.data)
    assert all(t == plan.data for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
