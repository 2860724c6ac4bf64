"""What this system's qrexec policy trusts, read conservatively from ``/etc/qubes/policy.d``.

A restore must not hand a VM from a backup a tag that a policy grants rights to (docs/SECURITY.md, "Backups
from a compromised machine").  This module reads the policy files as far as they can be read and answers
two questions, erring on the side of "trusted":

- ``granting_tags``: every tag named in a rule that is not plainly ``deny`` (``allow``, ``ask``, and every
  line this reader does not understand), as source or target, in ``@tag:T``, ``@dispvm:@tag:T`` or the old
  ``$tag:T`` forms -- wherever it appears on the line;
- ``in_progress_grants``: the rules that let some VM act on VMs tagged ``backup-restore-in-progress`` (the tag
  a restore puts on each VM it creates; Qubes' own ``85-admin-backup-restore.policy`` gives VMs tagged
  ``backup-restore-mgmt`` that right).

The grammar is qubes-core-qrexec's (``qrexec/policy/parser.py``, release 4.3; docs multifile-policy): files
``*.policy`` of ``policy.d`` named ``[0-9a-z_.-]+`` and not starting with a dot, in C-locale order; comment
lines start with ``#``; a rule is ``SERVICE ARGUMENT SOURCE TARGET ACTION [PARAM=VALUE ...]``; directives
``!include FILE``, ``!include-dir DIR``, ``!include-service SERVICE ARGUMENT FILE`` (a file in the old
syntax ``SOURCE TARGET ACTION[,PARAM=VALUE...]`` with ``$`` for ``@`` and ``$include:FILE``), and
``!compat-4.0`` (the old files of ``/etc/qubes-rpc/policy``).  Relative paths are relative to ``policy.d``.
Nothing here evaluates a request; a file that cannot be read makes ``complete`` false (the caller then
trusts no tag of the backup).  Every read is bounded: file size, number of files, include depth.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.text import printable

POLICY_DIR = "/etc/qubes/policy.d"
COMPAT_DIR = "/etc/qubes-rpc/policy"
IN_PROGRESS = "backup-restore-in-progress"
MGMT = "backup-restore-mgmt"
MAX_FILE = 1 << 20  # bytes of one policy file
MAX_FILES = 2000  # files read in all (includes counted)
MAX_DEPTH = 8  # include depth
_FILE_NAME = re.compile(r"[0-9a-z_.-]+")
_TAG = re.compile(r"[@$]tag:([^\s,=]+)")
_ACTIONS = ("allow", "deny", "ask")


@dataclass(frozen=True)
class Grant:
    """A rule that lets ``source`` act on VMs being restored (``target`` names the in-progress tag)."""

    where: str  # FILE:LINE
    service: str
    source: str  # the rule's source token (@tag:T, a VM name, @anyvm, @type:C, @dispvm:...)


@dataclass
class PolicyFacts:
    granting_tags: set[str] = field(default_factory=set)
    deny_tags: set[str] = field(default_factory=set)
    in_progress_grants: list[Grant] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what could not be read (one line each)
    files: int = 0

    @property
    def complete(self) -> bool:
        return not self.problems


class _Reader:
    def __init__(self, system: System) -> None:
        self.system = system
        self.base = system.dom0_path(POLICY_DIR)
        self.facts = PolicyFacts()

    # -- files ---------------------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        p = PurePosixPath(name)
        return self.system.dom0_path(p) if p.is_absolute() else self.base / p

    def _shown(self, path: Path) -> str:
        try:
            return "/" + str(path.relative_to(self.system.dom0_root))
        except ValueError:
            return str(path)

    def _problem(self, text: str) -> None:
        if len(self.facts.problems) < 20:
            self.facts.problems.append(printable(text))

    def _read(self, path: Path) -> list[str] | None:
        if self.facts.files >= MAX_FILES:
            self._problem(f"more than {MAX_FILES} policy files: the rest is not read")
            return None
        self.facts.files += 1
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE + 1)
        except OSError as exc:
            self._problem(f"cannot read {self._shown(path)}: {exc.strerror or exc}")
            return None
        if len(data) > MAX_FILE:
            self._problem(f"{self._shown(path)} is larger than {MAX_FILE >> 10} KiB")
            return None
        return data.decode("utf-8", "replace").splitlines()

    def _dir_files(self, path: Path, suffix: str | None) -> list[Path] | None:
        try:
            names = sorted(os.listdir(path))
        except FileNotFoundError:
            return []
        except OSError as exc:
            self._problem(f"cannot read {self._shown(path)}: {exc.strerror or exc}")
            return None
        out = []
        for name in names:
            if name.startswith(".") or (suffix is not None and not name.endswith(suffix)):
                continue
            if suffix is not None and not _FILE_NAME.fullmatch(name):
                # qrexec rejects every call then; we cannot tell what it would mean: not trusted
                self._problem(f"invalid policy file name {self._shown(path / name)}")
                continue
            if (path / name).is_file():
                out.append(path / name)
        return out

    # -- the new syntax ------------------------------------------------------------------------------
    def read_all(self) -> PolicyFacts:
        files = self._dir_files(self.base, ".policy")
        for path in files or []:
            self.read_file(path, 0)
        return self.facts

    def read_file(self, path: Path, depth: int) -> None:
        if depth > MAX_DEPTH:
            self._problem(f"policy includes nested deeper than {MAX_DEPTH} at {self._shown(path)}")
            return
        lines = self._read(path)
        for lineno, raw in enumerate(lines or [], start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{self._shown(path)}:{lineno}"
            if line.startswith("!"):
                self._directive(line.split(), where, depth)
                continue
            words = line.split()
            if len(words) >= 5:
                self._rule(words[0], words[2], words[3], words[4], line, where)
            else:  # not understood: whatever it names is trusted
                self._rule("", "", "", "", line, where)

    def _directive(self, words: list[str], where: str, depth: int) -> None:
        name, params = words[0], words[1:]
        if name == "!include" and len(params) == 1:
            self.read_file(self._path(params[0]), depth + 1)
        elif name == "!include-dir" and len(params) == 1:
            for path in self._dir_files(self._path(params[0]), None) or []:
                self.read_file(path, depth + 1)
        elif name == "!include-service" and len(params) == 3:
            self.read_old(self._path(params[2]), params[0], depth + 1)
        elif name == "!compat-4.0" and not params:
            for path in self._dir_files(self.system.dom0_path(COMPAT_DIR), None) or []:
                self.read_old(path, path.name.split("+", 1)[0], depth + 1)
        else:
            self._problem(f"{where}: policy directive {' '.join(words)[:60]!r} not understood")

    # -- the old syntax (per-service files) ----------------------------------------------------------
    def read_old(self, path: Path, service: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            self._problem(f"policy includes nested deeper than {MAX_DEPTH} at {self._shown(path)}")
            return
        for lineno, raw in enumerate(self._read(path) or [], start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{self._shown(path)}:{lineno}"
            line = line.replace("$include:", "!include ")
            if line.startswith("!include"):
                words = line.split()
                if len(words) == 2:
                    self.read_old(self._path(words[1]), service, depth + 1)
                else:
                    self._problem(f"{where}: policy directive not understood")
                continue
            words = line.replace(",", " ").split()
            if len(words) >= 3:
                self._rule(service, words[0], words[1], words[2], line, where)
            else:
                self._rule("", "", "", "", line, where)

    # -- one rule --------------------------------------------------------------------------------------
    def _rule(self, service: str, source: str, target: str, action: str, line: str, where: str) -> None:
        tags = set(_TAG.findall(line))
        if action == "deny":
            self.facts.deny_tags |= tags
            return
        self.facts.granting_tags |= tags
        source, target = source.replace("$", "@"), target.replace("$", "@")
        acts_on_restored = target == f"@tag:{IN_PROGRESS}" or action not in _ACTIONS
        if acts_on_restored and IN_PROGRESS in tags and (service == "*" or service.startswith("admin.")):
            self.facts.in_progress_grants.append(Grant(where, service, source))


def read_policy(system: System) -> PolicyFacts:
    """What this system's qrexec policy trusts (as far as its files can be read)."""
    return _Reader(system).read_all()
