"""Stand-in for the ``lvm`` command over simulated LVs: ``python -m qubes_backup_sim.lvm DEVDIR SUBCOMMAND ...``.

DEVDIR is e.g. ``DIR/dom0/dev``; LV ``VG/LV`` is the file ``DEVDIR/VG/LV`` (see lvstore).  Subcommands, parsed
like lvm (``--opt=value`` and ``--opt value``, ``--`` ends options):

- ``lvcreate --snapshot --type=thin [--setactivationskip=n] [--activate=y] [--permission=r] [--addtag=TAG]
  --name=NEW -- VG/ORIGIN``
- ``lvremove -f VG/LV [VG/LV ...]``
- ``lvs --noheadings --separator=SEP -o FIELD,... [VG | VG/LV ...]`` (fields vg_name, lv_name, lv_tags, origin,
  lv_attr, pool_lv, lv_size, thin_id: the thin device id, see thintools)
- ``lvchange ...``: refused (exit 5), nothing here needs it.

Errors are printed like lvm's on stderr (``  Failed to find logical volume "VG/X"``), exit status 5 (3 for bad
arguments).  With ``QUBES_SIM_LVM_WARN=1`` every command first prints a harmless warning line on stderr, as
real lvm does with leaked descriptors or a missing lvmetad, and still succeeds.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .lvstore import LvError, LvStore, check_name, split_vg_lv

WARNING = "  WARNING: File descriptor 3 (pipe:[4242]) leaked on lvm invocation. Parent PID 1: python3"

# option -> takes a value?
_OPTIONS = {
    "lvcreate": {"--setactivationskip": True, "-k": True, "--activate": True, "-a": True, "--snapshot": False,
                 "-s": False, "--type": True, "--permission": True, "-p": True, "--addtag": True,
                 "--name": True, "-n": True},
    "lvremove": {"-f": False, "--force": False, "-y": False, "--yes": False},
    "lvs": {"--noheadings": False, "--separator": True, "-o": True, "--options": True, "--nosuffix": False,
            "--units": True, "--readonly": False},
}  # fmt: skip
_ALIASES = {"-k": "--setactivationskip", "-a": "--activate", "-s": "--snapshot", "-p": "--permission",
            "-n": "--name", "--force": "-f", "--yes": "-y", "--options": "-o"}  # fmt: skip


def parse(cmd: str, argv: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Options (repeatable: a list of values, '' for flags) and positional arguments."""
    spec = _OPTIONS[cmd]
    opts: dict[str, list[str]] = {}
    pos: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--":
            pos.extend(it)
            break
        if not arg.startswith("-") or arg == "-":
            pos.append(arg)
            continue
        name, eq, value = arg.partition("=")
        if name not in spec:
            raise LvError(f"{cmd}: unrecognized option '{name}'", 3)
        if spec[name] and not eq:
            value = next(it, None)  # type: ignore[assignment]
            if value is None:
                raise LvError(f"{cmd}: option '{name}' requires an argument", 3)
        elif not spec[name] and eq:
            raise LvError(f"{cmd}: option '{name}' takes no argument", 3)
        opts.setdefault(_ALIASES.get(name, name), []).append(value)
    return opts, pos


def _one(opts: dict[str, list[str]], name: str, default: str | None = None) -> str | None:
    values = opts.get(name)
    return values[-1] if values else default


def lvcreate(store: LvStore, argv: Sequence[str]) -> str:
    opts, pos = parse("lvcreate", argv)
    if "--snapshot" not in opts or _one(opts, "--type", "thin") != "thin":
        raise LvError("  Only thin snapshots (--snapshot --type=thin) are simulated.", 3)
    new = _one(opts, "--name")
    if not new or len(pos) != 1:
        raise LvError("  Please specify a logical volume name (--name) and one origin VG/LV.", 3)
    if _one(opts, "--setactivationskip", "y") not in ("n", "y") or _one(opts, "--activate", "y") not in ("n", "y"):
        raise LvError("  Invalid activation argument.", 3)
    perm = _one(opts, "--permission", "rw")
    if perm not in ("r", "rw"):
        raise LvError(f'  Invalid permission "{perm}".', 3)
    tags = tuple(check_name(t, "tag") for t in opts.get("--addtag", []))
    vg, origin = split_vg_lv(pos[0])
    check_name(new)
    with store.lock(vg):
        store.snapshot(vg, origin, new, tags=tags, readonly=perm == "r")
    return f'  Logical volume "{new}" created.\n'


def lvremove(store: LvStore, argv: Sequence[str]) -> str:
    opts, pos = parse("lvremove", argv)
    if "-f" not in opts and "-y" not in opts:
        raise LvError("  lvremove without -f would ask for confirmation; the simulation refuses.", 3)
    if not pos:
        raise LvError("  Please enter one or more logical volume paths.", 3)
    out = []
    failed: LvError | None = None
    for spec in pos:
        vg, lv = split_vg_lv(spec)
        try:
            with store.lock(vg):
                store.remove(vg, lv)
            out.append(f'  Logical volume "{lv}" successfully removed.\n')
        except LvError as e:
            failed = e
    if failed is not None:
        sys.stdout.write("".join(out))
        raise failed
    return "".join(out)


def lvs(store: LvStore, argv: Sequence[str]) -> str:
    opts, pos = parse("lvs", argv)
    sep = _one(opts, "--separator", " ") or " "
    fields = ",".join(opts.get("-o", ["lv_name,vg_name"])).split(",")
    known = {"vg_name", "lv_name", "lv_tags", "origin", "lv_attr", "pool_lv", "lv_size", "thin_id"}
    bad = [f for f in fields if f not in known]
    if bad:
        raise LvError(f'  Unrecognised field: {bad[0]}', 3)
    lines = []
    vgs: list[str | None] = list(pos) or [None]
    for vg in vgs:
        infos = [store.info(*split_vg_lv(vg))] if vg is not None and "/" in vg else store.lvs(vg)
        for info in infos:
            size = store.path(info.vg, info.name).stat().st_size
            attr = "V" + ("r" if info.readonly else "w") + "i-a-tz--"
            values = {"vg_name": info.vg, "lv_name": info.name, "lv_tags": ",".join(info.tags),
                      "origin": info.origin, "lv_attr": attr, "pool_lv": info.thin_pool,
                      "lv_size": f"{size}B", "thin_id": "" if info.thin_id is None else str(info.thin_id)}  # fmt: skip
            row = sep.join(values[f] for f in fields)
            lines.append(row if "--noheadings" not in opts else f"  {row}")
    if "--noheadings" not in opts:
        lines.insert(0, sep.join(f.upper() for f in fields))
    return "".join(f"{line}\n" for line in lines)


COMMANDS = {"lvcreate": lvcreate, "lvremove": lvremove, "lvs": lvs}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python -m qubes_backup_sim.lvm DEVDIR SUBCOMMAND [ARGS...]", file=sys.stderr)
        return 3
    devdir, cmd, rest = Path(argv[0]), argv[1], argv[2:]
    if os.environ.get("QUBES_SIM_LVM_WARN") == "1":
        print(WARNING, file=sys.stderr, flush=True)
    if cmd == "lvchange":
        print("  lvchange is not simulated (refused).", file=sys.stderr)
        return 5
    func = COMMANDS.get(cmd)
    if func is None:
        print(f"  No such command '{cmd}'.  Try 'help'.", file=sys.stderr)
        return 3
    try:
        sys.stdout.write(func(LvStore(devdir), rest))
    except LvError as e:
        sys.stdout.flush()
        print(e.message, file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
