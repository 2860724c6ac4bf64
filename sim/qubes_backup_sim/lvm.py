"""Stand-in for the ``lvm`` command over simulated LVs: ``python -m qubes_backup_sim.lvm DEVDIR SUBCOMMAND ...``.

DEVDIR is e.g. ``DIR/dom0/dev``; LV ``VG/LV`` is the file ``DEVDIR/VG/LV`` (see lvstore).  Subcommands, parsed
like lvm (``--opt=value`` and ``--opt value``, ``--`` ends options):

- ``lvcreate --snapshot --type=thin [--setactivationskip=n] [--activate=y] [--permission=r] [--addtag=TAG]
  --name=NEW -- VG/ORIGIN``
- ``lvremove -f VG/LV [VG/LV ...]``
- ``lvs --noheadings --separator=SEP -o FIELD,... [VG | VG/LV ...]`` (fields vg_name, lv_name, lv_tags, origin,
  lv_attr, pool_lv, lv_size, thin_id: the thin device id, see thintools; data_percent, metadata_percent: a thin
  pool's use, asked as ``VG/POOL``: ``QUBES_SIM_POOL_USAGE=DATA,META`` percent, default 12.50,8.00)
- ``lvrename VG OLD NEW``
- ``lvchange --addtag=TAG|--deltag=TAG ... VG/LV [VG/LV ...]`` (tags), ``lvchange --activate=n VG/LV ...``
  (recorded in the LV's metadata as ``active: false``); anything else is refused, exit 5.

Every call is appended to ``DEVDIR/lvm.log`` (one JSON list per line: the benchmarks count them).  Errors are
printed like lvm's on stderr (``  Failed to find logical volume "VG/X"``), exit status 5 (3 for bad
arguments).  With ``QUBES_SIM_LVM_WARN=1`` every command first prints a harmless warning line on stderr, as
real lvm does with leaked descriptors or a missing lvmetad, and still succeeds.
"""

from __future__ import annotations

import contextlib
import json
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
    "lvchange": {"--addtag": True, "--deltag": True, "--activate": True},
    "lvrename": {},
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
    known = {"vg_name", "lv_name", "lv_tags", "origin", "lv_attr", "pool_lv", "lv_size", "thin_id", "data_percent",
             "metadata_percent"}  # fmt: skip
    bad = [f for f in fields if f not in known]
    if bad:
        raise LvError(f'  Unrecognised field: {bad[0]}', 3)
    lines = []
    vgs: list[str | None] = list(pos) or [None]
    for vg in vgs:
        if vg is not None and "/" in vg and _is_pool(store, *split_vg_lv(vg)):
            data, _, meta = os.environ.get("QUBES_SIM_POOL_USAGE", "12.50,8.00").partition(",")
            pool_values = {"vg_name": vg.split("/")[0], "lv_name": vg.split("/")[1], "data_percent": data,
                           "metadata_percent": meta}  # fmt: skip
            row = sep.join(pool_values.get(f, "") for f in fields)
            lines.append(row if "--noheadings" not in opts else f"  {row}")
            continue
        infos = [store.info(*split_vg_lv(vg))] if vg is not None and "/" in vg else store.lvs(vg)
        for info in infos:
            size = store.path(info.vg, info.name).stat().st_size
            attr = "V" + ("r" if info.readonly else "w") + "i-a-tz--"
            values = {"vg_name": info.vg, "lv_name": info.name, "lv_tags": ",".join(info.tags),
                      "origin": info.origin, "lv_attr": attr, "pool_lv": info.thin_pool,
                      "lv_size": f"{size}B", "thin_id": "" if info.thin_id is None else str(info.thin_id),
                      "data_percent": "0.00", "metadata_percent": ""}  # fmt: skip
            row = sep.join(values[f] for f in fields)
            lines.append(row if "--noheadings" not in opts else f"  {row}")
    if "--noheadings" not in opts:
        lines.insert(0, sep.join(f.upper() for f in fields))
    return "".join(f"{line}\n" for line in lines)


def _is_pool(store: LvStore, vg: str, name: str) -> bool:
    """``VG/NAME`` is a thin pool (the pool of some LV; sim pools are not files themselves)."""
    return not store.exists(vg, name) and any(i.thin_pool == name for i in store.lvs(vg))


def lvchange(store: LvStore, argv: Sequence[str]) -> str:
    try:
        opts, pos = parse("lvchange", argv)
    except LvError as e:
        raise LvError("  lvchange: only --addtag/--deltag/--activate=n are simulated (refused).", 5) from e
    deactivate = opts.get("--activate") == ["n"]
    if not pos or not (opts.get("--addtag") or opts.get("--deltag") or deactivate) or \
            opts.get("--activate", ["n"]) != ["n"]:  # fmt: skip
        raise LvError("  lvchange: only --addtag/--deltag/--activate=n are simulated (refused).", 5)
    add = [check_name(t, "tag") for t in opts.get("--addtag", [])]
    drop = set(opts.get("--deltag", []))
    out = []
    for spec in pos:
        vg, lv = split_vg_lv(spec)
        with store.lock(vg):
            info = store.info(vg, lv)
            info.tags = [t for t in info.tags if t not in drop] + [t for t in add if t not in info.tags]
            info.active = info.active and not deactivate
            store.write_meta(info)
        out.append(f'  Logical volume {vg}/{lv} changed.\n')
    return "".join(out)


def lvrename(store: LvStore, argv: Sequence[str]) -> str:
    _opts, pos = parse("lvrename", argv)
    if len(pos) != 3:
        raise LvError("  Old and new logical volume names required (lvrename VG OLD NEW).", 3)
    vg = check_name(pos[0], "volume group")
    old, new = check_name(pos[1]), check_name(pos[2])
    with store.lock(vg):
        store.rename(vg, old, new)
    return f'  Renamed "{old}" to "{new}" in volume group "{vg}"\n'


COMMANDS = {"lvcreate": lvcreate, "lvremove": lvremove, "lvs": lvs, "lvchange": lvchange, "lvrename": lvrename}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python -m qubes_backup_sim.lvm DEVDIR SUBCOMMAND [ARGS...]", file=sys.stderr)
        return 3
    devdir, cmd, rest = Path(argv[0]), argv[1], argv[2:]
    if os.environ.get("QUBES_SIM_LVM_WARN") == "1":
        print(WARNING, file=sys.stderr, flush=True)
    with contextlib.suppress(OSError), open(devdir / "lvm.log", "a") as log:  # every call, as thintools.log
        log.write(json.dumps([cmd, *rest]) + "\n")
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
