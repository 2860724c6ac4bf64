"""A hostile backup VM for the paranoid-mode tests: ``python paranoid_agent.py MODE COUNT``.

Runs the real qubes.Restore service (qubes_backup_agent.restore_service) as a child and passes its frames on
until COUNT frames went out; then, by MODE: ``stall`` (sends nothing more), ``error`` (an ERROR frame), or
``garbage`` (bytes that are no frame).  What dom0's relay thread must turn into one error line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from qubes_backup_protocol import frames
from qubes_backup_protocol.frames import FrameType

ANY = {t: (64, (256 << 20) + 16) for t in FrameType}


def main() -> int:
    mode, count = sys.argv[1], int(sys.argv[2])
    child = subprocess.Popen([sys.executable, "-c", "from qubes_backup_agent.restore_service import main; main()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    out = sys.stdout.buffer

    def forward() -> None:
        try:
            while piece := os.read(0, 1 << 20):
                child.stdin.write(piece)  # type: ignore[union-attr]
        except OSError:
            pass
        finally:
            child.stdin.close()  # type: ignore[union-attr]

    threading.Thread(target=forward, daemon=True).start()
    sent = 0
    while (frame := frames.read_frame(child.stdout, ANY)) is not None:
        if sent == count:
            if mode == "stall":
                time.sleep(3600)
            elif mode == "error":
                frames.write_frame(out, FrameType.ERROR, "", b"disk on fire")
            else:
                out.write(b"\xff" * 64)
            out.flush()
            return 1
        frames.write_frame(out, frame.type, frame.name, frame.data)
        out.flush()
        sent += 1
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
