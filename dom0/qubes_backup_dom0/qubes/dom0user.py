"""Whose home is dom0's home: the user found as Qubes finds it.

Qubes' own backup takes the first member of group ``qubes`` and that user's passwd home
(``grp.getgrnam("qubes").gr_mem[0]`` and ``pwd.getpwnam(user).pw_dir`` in qubes-core-admin ``qubes/backup.py``;
``qubesadmin/backup/restore.py`` does the same on restore, falling back to the current user without the group).
We do the same, except that a user who ran the command through ``sudo`` (``SUDO_USER``) or logged in as
someone other than root (``USER``/``LOGNAME``) is taken first.  So an unattended run -- a systemd service
has none of these variables, and runs as root -- backs up the same home as ``sudo qvm-backup`` typed by that
user, not a missing ``/home/root`` (issue 19 item 4).

On a real dom0 the group and passwd come from NSS (``grp``/``pwd``); in the simulation from the simulated dom0's
own ``/etc/group`` and ``/etc/passwd`` (simgen writes them), where the host's variables name host users: they
count only if the simulated passwd knows them.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

QUBES_GROUP = "qubes"
MAX_ETC_FILE = 1 << 20  # a simulated /etc/passwd or /etc/group is read up to this size


@dataclass(frozen=True)
class Dom0User:
    name: str
    home: str | None  # the passwd home (a dom0 path); None: not known (then /home/NAME)
    how: str  # where the name came from: "SUDO_USER", "USER", "LOGNAME", "group qubes", "uid", "default"


#: a name -> its passwd home, or None if there is no such user
HomeOf = Callable[[str], "str | None"]
#: a group name -> its member list, or None if there is no such group
MembersOf = Callable[[str], "list[str] | None"]


def find_user(env: Mapping[str, str], home_of: HomeOf, members_of: MembersOf,
              fallback: str | None) -> Dom0User:  # fmt: skip
    """The login/sudo user if one is set (not root, known to passwd), else the first member of group qubes,
    else ``fallback`` (the uid's name on a real system)."""
    for var in ("SUDO_USER", "USER", "LOGNAME"):
        name = env.get(var)
        if name and name != "root":
            home = home_of(name)
            if home is not None:
                return Dom0User(name, home, var)
    members = members_of(QUBES_GROUP) or []
    if members:
        return Dom0User(members[0], home_of(members[0]), f"group {QUBES_GROUP}")
    name = fallback or "user"
    return Dom0User(name, home_of(name), "uid" if fallback else "default")


def real_user(env: Mapping[str, str]) -> Dom0User:
    """On a real dom0: NSS's passwd and group."""

    def home_of(name: str) -> str | None:
        try:
            return pwd.getpwnam(name).pw_dir
        except KeyError:
            return None

    def members_of(group: str) -> list[str] | None:
        try:
            return list(grp.getgrnam(group).gr_mem)
        except KeyError:
            return None

    try:
        uid_name: str | None = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        uid_name = None
    return find_user(env, home_of, members_of, uid_name)


def _etc_table(path: Path) -> list[list[str]]:
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_ETC_FILE).decode("utf-8", "replace")
    except OSError:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def sim_user(env: Mapping[str, str], dom0_root: Path) -> Dom0User:
    """In the simulation: the simulated dom0's /etc/passwd and /etc/group (``QUBES_SIM_USER`` decides, if set)."""
    passwd = {f[0]: f[5] for f in _etc_table(dom0_root / "etc/passwd") if len(f) >= 7}
    groups = {f[0]: [m for m in f[3].split(",") if m] for f in _etc_table(dom0_root / "etc/group") if len(f) >= 4}
    forced = env.get("QUBES_SIM_USER")
    if forced:
        return Dom0User(forced, passwd.get(forced), "QUBES_SIM_USER")
    return find_user(env, passwd.get, groups.get, None)
