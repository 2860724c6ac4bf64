"""A fake ``lvm`` command for the fake-endpoint tests: ``python lvm.py DEV_DIR SUBCOMMAND ARGS...``.

LVs are files ``DEV_DIR/VG/NAME``; tags live in ``DEV_DIR/VG/.tags/NAME``.  Every invocation is appended to
``DEV_DIR/../lvm.log`` (one JSON argv per line).  Only the exact forms the backup uses are accepted:

    lvcreate --setactivationskip=n --activate=y --snapshot --type=thin --permission=r
             --addtag=TAG --name=NEW -- VG/ORIGIN          (the snapshot: a hard link, like the sim's)
    lvremove -f VG/NAME [VG/NAME ...]
    lvs --noheadings --separator=| -o vg_name,lv_name,lv_tags

``FAKE_LVM_WARN=1`` prints lvm-like warnings on stderr (exit status stays 0); ``FAKE_LVM_FAIL=SUB[:N]`` makes
the N-th (default every) call of SUB fail with exit status 5.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SNAP_FLAGS = ["--setactivationskip=n", "--activate=y", "--snapshot", "--type=thin", "--permission=r"]


def fail(msg: str, code: int = 3) -> None:
    print(f"  {msg}", file=sys.stderr)
    sys.exit(code)


def count(log: Path, sub: str) -> int:
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text().splitlines() if json.loads(line)[0] == sub)


def main() -> None:
    dev = Path(sys.argv[1])
    args = sys.argv[2:]
    log = dev.parent / "lvm.log"
    with open(log, "a") as f:
        f.write(json.dumps(args) + "\n")
    if os.environ.get("FAKE_LVM_WARN"):
        print("  WARNING: This metadata update is NOT backed up.", file=sys.stderr)
        print("  File descriptor 7 (/dev/null) leaked on lvm invocation.", file=sys.stderr)
    sub = args[0] if args else ""
    spec = os.environ.get("FAKE_LVM_FAIL", "")
    if spec:
        what, _, nth = spec.partition(":")
        if what == sub and (not nth or count(log, sub) == int(nth)):
            fail(f"Failed to {sub}: injected failure", 5)
    if sub == "lvcreate":
        if args[1:6] != SNAP_FLAGS or len(args) != 10 or args[8] != "--":
            fail(f"unexpected lvcreate form: {args}")
        if not args[6].startswith("--addtag=") or not args[7].startswith("--name="):
            fail(f"unexpected lvcreate form: {args}")
        tag, name = args[6][len("--addtag="):], args[7][len("--name="):]
        vg, _, origin = args[9].partition("/")
        src = dev / vg / origin
        if not src.is_file():
            fail(f'Failed to find logical volume "{args[9]}"')
        if (dev / vg / name).exists():
            fail(f'Logical Volume "{name}" already exists in volume group "{vg}"')
        os.link(src, dev / vg / name)
        (dev / vg / ".tags").mkdir(exist_ok=True)
        (dev / vg / ".tags" / name).write_text(tag)
        print(f'  Logical volume "{name}" created.')
    elif sub == "lvremove":
        if len(args) < 3 or args[1] != "-f":
            fail(f"unexpected lvremove form: {args}")
        missing = []
        for spec in args[2:]:  # like lvm: removes what it can, fails if any is missing
            vg, _, name = spec.partition("/")
            if not (dev / vg / name).is_file():
                missing.append(spec)
                continue
            os.unlink(dev / vg / name)
            tags = dev / vg / ".tags" / name
            if tags.exists():
                tags.unlink()
            print(f'  Logical volume "{name}" successfully removed.')
        if missing:
            fail(f'Failed to find logical volume "{missing[0]}"', 5)
    elif sub == "lvs":
        if args[1:] != ["--noheadings", "--separator=|", "-o", "vg_name,lv_name,lv_tags"]:
            fail(f"unexpected lvs form: {args}")
        for vg in sorted(p for p in dev.iterdir() if p.is_dir()):
            for lv in sorted(p for p in vg.iterdir() if p.is_file()):
                tags = vg / ".tags" / lv.name
                print(f"  {vg.name}|{lv.name}|{tags.read_text() if tags.exists() else ''}")
    else:
        fail(f"unknown command {sub!r}")


if __name__ == "__main__":
    main()
