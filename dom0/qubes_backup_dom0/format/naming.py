"""Backup file names and what they may be checked against.

dom0 names a backup ``qubes-backup-YYYY-MM-DDTHHMMSS`` after the very instant (UTC) that the backup's
authenticated header records as ``created`` (api.run_backup picks one instant for both).  The name itself
is not authenticated: a backup VM can store an older backup under a newer name.  The restore cannot stop
that (the older backup is valid), but it can say so: ``name_time_mismatch``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

NAME_FORMAT = "qubes-backup-%Y-%m-%dT%H%M%S"
# The timestamp in a location's last component, wherever it is in it (``old-qubes-backup-…`` too).
_NAME_TIME_RE = re.compile(r"qubes-backup-([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{6})(?![0-9])")
NAME_TIME_SLACK = 2  # seconds; names made before names were UTC (local time) differ by hours


def file_name(when: datetime | None = None) -> str:
    """The backup file name for ``when`` (an aware datetime; default now), in UTC."""
    return (when or datetime.now(UTC)).astimezone(UTC).strftime(NAME_FORMAT)


def name_time(location: str) -> datetime | None:
    """The UTC time a location's file name carries, or None when it carries none (renamed, a command)."""
    last = location.rstrip("/").rsplit("/", 1)[-1]
    m = _NAME_TIME_RE.search(last)
    if m is None:
        return None
    try:
        return datetime.strptime(m.group(1), "%Y-%m-%dT%H%M%S").replace(tzinfo=UTC)
    except ValueError:  # 2026-13-45T256199: not a time at all
        return None


def name_time_mismatch(location: str, created: str) -> str | None:
    """One warning line when ``location``'s file name carries a time other than ``created`` (the header's
    authenticated ``YYYY-MM-DDTHH:MM:SSZ``), else None.  Print it as ``warning: TEXT``.

    A mismatch means the file is not the backup its name announces, typically an older backup stored under
    a newer name (a rollback by the backup VM), or a file renamed by hand.
    """
    named = name_time(location)
    if named is None:
        return None
    try:
        made = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    if abs((made - named).total_seconds()) <= NAME_TIME_SLACK:
        return None
    age = "older than" if made < named else "newer than"
    return (
        f"the file name says {named:%Y-%m-%d %H:%M:%S} UTC but this backup was created {made:%Y-%m-%d %H:%M:%S} "
        f"UTC ({age} its name): it is not the backup the name announces"
    )
