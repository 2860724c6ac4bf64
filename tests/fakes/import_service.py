"""A fake ``admin.vm.volume.ImportWithSize`` (copied into a fake QUBES_RPC_DIR by restore tests).

Run as qubesadmin runs it: env QREXEC_REMOTE_DOMAIN=dom0 QREXEC_REQUESTED_TARGET=VM, argv VOLUME; stdin
``SIZE\\n`` then exactly SIZE bytes.  Writes ``$FAKE_IMPORT_DIR/VM/VOLUME.img`` (sparse: zero blocks are
seeked), logs ``VM VOLUME SIZE`` to ``$FAKE_IMPORT_DIR/import.log`` and answers a qubesd reply on stdout,
exiting 0 even on failure.  ``FAKE_IMPORT_FAIL=VM/VOLUME`` makes that import fail after reading 4 KiB
(``stop``: and stop reading at once, so the writer sees a broken pipe).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

BLOCK = 1 << 16


def reply_error(msg: str) -> None:
    sys.stdout.buffer.write(b"2\0QubesException\0\0" + msg.encode() + b"\0")
    sys.stdout.flush()
    sys.exit(0)


def main() -> None:
    vm = os.environ.get("QREXEC_REQUESTED_TARGET", "")
    if os.environ.get("QREXEC_REMOTE_DOMAIN") != "dom0" or not vm or len(sys.argv) != 2:
        reply_error("bad invocation")
    volume = sys.argv[1]
    base = Path(os.environ["FAKE_IMPORT_DIR"])
    stdin = sys.stdin.buffer
    line = stdin.readline(32)
    if not line.endswith(b"\n") or not line[:-1].isdigit():
        reply_error("bad size line")
    size = int(line)
    with open(base / "import.log", "a") as f:
        f.write(f"{vm} {volume} {size}\n")
    failing = os.environ.get("FAKE_IMPORT_FAIL", "")
    if failing.startswith(f"{vm}/{volume}"):
        stdin.read(4096)
        if failing.endswith(":stop"):
            os.close(0)
        reply_error(f"import of {volume} failed (injected)")
    (base / vm).mkdir(parents=True, exist_ok=True)
    tmp = base / vm / f".{volume}.import"
    left = size
    with open(tmp, "wb") as out:
        while left:
            piece = stdin.read(min(BLOCK, left))
            if not piece:
                out.close()
                tmp.unlink()
                reply_error(f"short input: {size - left} of {size} bytes")
            if piece.count(0) == len(piece):
                out.seek(len(piece), os.SEEK_CUR)
            else:
                out.write(piece)
            left -= len(piece)
        out.truncate(size)
    if stdin.read(1):
        tmp.unlink()
        reply_error("more input than the size")
    os.replace(tmp, base / vm / f"{volume}.img")
    sys.stdout.buffer.write(b"0\0")


if __name__ == "__main__":
    main()
