"""Backup profiles: ``/etc/qubes/backup/NAME.conf`` in the YAML format of Qubes' own qvm-backup.

Keys (as qubes-core-admin's ``_load_backup_profile`` reads them): ``include`` (required; a list of VM names,
``@tag:NAME``, ``@type:CLASS``, or null for every VM with include_in_backups), ``exclude`` (same forms),
``destination_vm`` (``dom0`` for a dom0 directory), ``destination_path``, ``compression`` (true/false or a
filter name) and ``passphrase_text`` or ``passphrase_vm`` (the passphrase is then the one line the
``qubes.BackupPassphrase+NAME`` service of that VM prints).  Old ``$tag:``/``$type:`` forms are read as
``@``, as Qubes does.  The file is read with ``yaml.safe_load`` only (no object construction), bounded.

One key of our own: ``repository`` (a directory in ``destination_vm``), in place of ``destination_path``: the
profile then describes ``qvm-backup --repo`` (docs/REPOSITORY.md), and ``qvm-backup-restore --profile NAME``
restores, verifies or lists its snapshots.  Such a profile has no ``destination_path``, so Qubes' own
``qvm-backup --profile`` refuses it ("missing destination_path") instead of writing a single-file backup
into the repository's directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qubes_backup_dom0.cli.passphrase import MAX_PASSPHRASE
from qubes_backup_dom0.errors import BackupError, UsageError
from qubes_backup_dom0.qubes.interface import Qubes
from qubes_backup_dom0.qubes.system import System

PROFILE_DIR = "/etc/qubes/backup"
MAX_PROFILE = 64 * 1024
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
COMPRESSIONS = {"zstd": "zstd", "gzip": "gzip", "none": "none"}
# Qubes Manager's words (qubes-manager ui/backupdlg.ui), with our file location.
PLAINTEXT_WARNING = "Passphrase will be saved in dom0 in plain text."  # Qubes' words (it adds "WARNING: ")


@dataclass(frozen=True)
class Profile:
    name: str
    include: list[str] | None  # None: every VM with include_in_backups
    exclude: list[str]
    destination_vm: str | None  # None: dom0
    destination_path: str
    compression: str
    passphrase_text: str | None = None
    passphrase_vm: str | None = None
    repository: str | None = None  # qvm-backup --repo: a repository directory in destination_vm
    keep: dict[str, int] | None = None  # qvm-backup-prune's retention policy (``keep: {last: 7, daily: 14}``)


def profile_path(system: System, name: str) -> Path:
    if _NAME_RE.fullmatch(name) is None:
        raise UsageError(f"bad profile name {name[:64]!r}: letters, digits, '_', '.', '-' (not first), at most 64")
    return system.dom0_path(f"{PROFILE_DIR}/{name}.conf")


def _names(value: object, key: str, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise UsageError(f"backup profile {name}: {key} must be a list of VM names")
    return [v.replace("$", "@", 1) if v.startswith("$") else v for v in value]


def _compression(value: object, name: str) -> str:
    if value is True:
        return "zstd"
    if value is False:
        return "none"
    if isinstance(value, str) and value in COMPRESSIONS:
        return COMPRESSIONS[value]
    raise UsageError(f"backup profile {name}: compression {str(value)[:40]!r} is not supported here "
                     "(true, false, zstd, gzip or none)")  # fmt: skip


def _text(data: Mapping[str, Any], key: str, name: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise UsageError(f"backup profile {name}: {key} must be text")
    return str(value)


KEEP_RULES = ("last", "daily", "weekly", "monthly")
MAX_KEEP = 1_000_000


def _keep(value: object, name: str) -> dict[str, int] | None:
    """The optional ``keep:`` mapping of a repository's profile: qvm-backup-prune's ``--keep-RULE`` counts."""
    if value is None:
        return None
    if not isinstance(value, dict) or not value or not set(value) <= set(KEEP_RULES) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_KEEP for v in value.values()):
        raise UsageError(f"backup profile {name}: keep must map some of {', '.join(KEEP_RULES)} to counts "
                         f"(0-{MAX_KEEP})")  # fmt: skip
    return {rule: int(value.get(rule, 0)) for rule in KEEP_RULES}


def _safe_load(text: str, name: str) -> Any:
    """``yaml.safe_load``, but a document with an anchor or alias is refused before it is built: a few
    hundred bytes of nested aliases expand to gigabytes (Qubes' profiles never use them)."""
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, yaml.AliasToken | yaml.AnchorToken):
            raise UsageError(f"backup profile {name}: YAML anchors and aliases (& and *) are not accepted")
    return yaml.safe_load(text)


def repository_profile(system: System, name: str, given: Mapping[str, object], not_a_repository: str) -> Profile:
    """``--profile NAME`` of a repository command: the profile, which must describe a repository, and none of
    the options it replaces (``given``: option -> its value) given as well; ``not_a_repository``: what to do
    instead with a single-file profile."""
    profile = load_profile(system, name)
    if profile.repository is None:
        raise UsageError(f"backup profile {name} describes single-file backups, not a repository: "
                         f"{not_a_repository}")  # fmt: skip
    clash = [opt for opt, value in given.items() if value]
    if clash:
        raise UsageError(f"{clash[0]} cannot be used together with --profile (the profile says it)")
    return profile


def load_profile(system: System, name: str) -> Profile:
    path = profile_path(system, name)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PROFILE + 1)
    except FileNotFoundError:
        raise UsageError(f"backup profile does not exist: {name} ({PROFILE_DIR}/{name}.conf)") from None
    except OSError as exc:
        raise UsageError(f"cannot read backup profile {name}: {exc.strerror}") from None
    if len(raw) > MAX_PROFILE:
        raise UsageError(f"backup profile {name} is larger than {MAX_PROFILE} bytes")
    try:
        data = _safe_load(raw.decode("utf-8"), name)
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"backup profile {name} is not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise UsageError(f"backup profile {name}: not a mapping of keys to values")
    repository = _text(data, "repository", name)
    for key in ("destination_vm", "include") if repository is not None else ("destination_vm", "destination_path",
                                                                               "include"):  # fmt: skip
        if key not in data:
            raise UsageError(f"invalid backup profile {name}: missing {key}")
    dest_vm, dest_path = _text(data, "destination_vm", name), _text(data, "destination_path", name)
    if repository is not None:
        if dest_path is not None:
            raise UsageError(f"invalid backup profile {name}: repository and destination_path exclude each other")
        if not repository or not dest_vm or dest_vm == "dom0":
            raise UsageError(f"invalid backup profile {name}: a repository is a directory in destination_vm (a VM, "
                             "not dom0)")  # fmt: skip
        dest_path = repository
    if not dest_vm or not dest_path:
        raise UsageError(f"invalid backup profile {name}: destination_vm and destination_path must be set")
    include = None if data["include"] is None else _names(data["include"], "include", name)
    exclude = _names(data.get("exclude") or [], "exclude", name)
    text, vm = _text(data, "passphrase_text", name), _text(data, "passphrase_vm", name)
    if text is None and vm is None:
        raise UsageError(f"invalid backup profile {name}: you need to specify passphrase_text or passphrase_vm")
    if vm is not None and vm == dest_vm:
        raise UsageError(f"invalid backup profile {name}: passphrase_vm is the backup VM ({vm}): the VM that "
                         "stores the backups must not hold their passphrase; name another VM")  # fmt: skip
    keep = _keep(data.get("keep"), name)
    if keep is not None and repository is None:
        raise UsageError(f"invalid backup profile {name}: keep (a retention policy) needs a repository")
    return Profile(name, include, exclude, None if dest_vm == "dom0" else dest_vm, dest_path,
                   _compression(data.get("compression", True), name), text, vm, repository, keep)  # fmt: skip


def render_profile(profile: Profile) -> str:
    """The YAML Qubes' qvm-backup writes (``write_backup_profile``), keys in its order."""
    data: dict[str, Any] = {"include": profile.include or None}
    if profile.exclude:
        data["exclude"] = profile.exclude
    if profile.passphrase_text:
        data["passphrase_text"] = profile.passphrase_text
    if profile.passphrase_vm:
        data["passphrase_vm"] = profile.passphrase_vm
    data["compression"] = {"zstd": True, "none": False}.get(profile.compression, profile.compression)
    data["destination_vm"] = profile.destination_vm or "dom0"
    if profile.repository is not None:
        data["repository"] = profile.repository
        if profile.keep:
            data["keep"] = {rule: n for rule, n in profile.keep.items() if n}
    else:
        data["destination_path"] = profile.destination_path
    return yaml.safe_dump(data, sort_keys=False)


def save_profile(system: System, profile: Profile) -> Path:
    """Write the profile atomically, readable by root only (it may hold the passphrase)."""
    path = profile_path(system, profile.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{profile.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(render_profile(profile))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise BackupError(f"cannot save backup profile {profile.name}: {exc.strerror}") from None
    return path


# ------------------------------------------------------------------------------------ @tag: and @type:

def is_special(name: str) -> bool:
    return name.startswith("@")


def resolve(qubes: Qubes, patterns: Iterable[str]) -> list[str]:
    """VM names for names, ``@tag:NAME`` and ``@type:CLASS`` (qubes-core-admin's match_vm_name_with_special):
    plain names are kept as given (checked later), specials expanded through qubesd (vm_list, tags)."""
    patterns = list(patterns)
    if not any(is_special(p) for p in patterns):
        return patterns
    vms = qubes.vm_list()
    tags: dict[str, list[str]] = {}
    out: list[str] = []
    for p in patterns:
        if not is_special(p):
            out.append(p)
        elif p.startswith("@type:"):
            out += [n for n, (klass, _state) in vms.items() if klass == p[len("@type:"):]]
        elif p.startswith("@tag:"):
            tag = p[len("@tag:"):]
            for n in vms:
                if n not in tags:
                    tags[n] = qubes.tags(n)
                if tag in tags[n]:
                    out.append(n)
        else:
            raise UsageError(f"unknown VM selector {p[:40]!r}: use a VM name, @tag:NAME or @type:CLASS")
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------------ passphrase_vm

def profile_passphrase(system: System, prof: Profile) -> bytes:
    """The profile's passphrase: ``passphrase_text``, or what its ``passphrase_vm`` prints."""
    if prof.passphrase_text is not None:
        phrase = prof.passphrase_text.encode("utf-8")
        if not phrase or len(phrase) > MAX_PASSPHRASE or b"\n" in phrase:
            raise UsageError(f"backup profile {prof.name}: passphrase_text must be one line, 1-{MAX_PASSPHRASE} bytes")
        return phrase
    assert prof.passphrase_vm is not None
    return passphrase_from_vm(system, prof.passphrase_vm, prof.name)


def passphrase_from_vm(system: System, vm: str, profile: str, transport: Any = None) -> bytes:
    """The one line ``qubes.BackupPassphrase+PROFILE`` prints in ``vm`` (bounded; the service's exit status
    must be 0).  Surrounding white space is stripped, as Qubes does; a second line is refused."""
    from qubes_backup_dom0.qubes.transport import Channel, make_transport

    service = f"qubes.BackupPassphrase+{profile}"
    channel = Channel((transport or make_transport(system)).start(service, vm), vm=vm)
    what = f"failed to retrieve the passphrase from VM {vm} ({service})"
    try:
        # One timeout for the VM to start and one for its answer, whole: never byte by byte without end.
        channel.set_deadline(2 * channel.timeout)
        channel.close_input()
        raw = bytearray()
        while len(raw) <= MAX_PASSPHRASE + 2:
            piece = channel.read(MAX_PASSPHRASE + 3 - len(raw))
            if not piece:
                break
            raw += piece
        if len(raw) > MAX_PASSPHRASE + 2:
            raise BackupError(f"{what}: more than {MAX_PASSPHRASE} bytes")
        rc = channel.wait()
        if rc != 0:
            tail = channel.stderr_tail()
            raise BackupError(f"{what}: exit status {rc}" + (f" ({tail})" if tail else ""))
    finally:
        channel.close()
    phrase = bytes(raw).strip()
    if b"\n" in phrase or b"\r" in phrase:
        raise BackupError(f"{what}: the passphrase must be one line")
    if not phrase:
        raise BackupError(f"{what}: it printed nothing")
    return phrase
