"""A compromised DisposableVM for the paranoid-mode tests: ``python paranoid_disp.py MODE``.

It runs the real qubes.RestoreParanoid service (qubes_backup_agent.paranoid_service) as a child, passes dom0's
frames to it unchanged and rewrites what the service answers according to MODE -- what a DisposableVM taken
over by a hostile backup could send dom0.  ``pass`` changes nothing.  Frames are read with the frame layer
only; records are built with the grammar's construct structs directly (bypassing its checks).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import BinaryIO

from qubes_backup_protocol import frames
from qubes_backup_protocol import plan_frames as pf
from qubes_backup_protocol.frames import FrameType

ANY = {t: (64, 1 << 23) for t in FrameType}


def record(name: str = "evil", klass: int = 1, label: str = "red", template: str = "", volumes: list | None = None,
           properties: list | None = None, features: list | None = None) -> bytes:  # fmt: skip
    return bytes(pf.VmRecord.build({
        "name": name, "klass": klass, "label": label, "template": template, "netvm_none": 0,
        "default_dispvm_none": 0, "properties": properties or [], "features": features or [],
        "volumes": volumes or [],
    }))  # fmt: skip


def send(out: BinaryIO, ftype: FrameType, name: str = "", data: bytes = b"") -> None:
    frames.write_frame(out, ftype, name, data)
    out.flush()


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else os.environ["QUBES_AGENT_FAKE_MODE"]
    child = subprocess.Popen([sys.executable, "-c", "from qubes_backup_agent.paranoid_service import main; main()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer

    def forward() -> None:
        try:
            while piece := os.read(stdin.fileno(), 1 << 20):
                child.stdin.write(piece)  # type: ignore[union-attr]
        except OSError:
            pass
        finally:
            child.stdin.close()  # type: ignore[union-attr]

    threading.Thread(target=forward, daemon=True).start()
    plan_vms = 0
    volume_frames = 0
    while True:
        frame = frames.read_frame(child.stdout, ANY)
        if frame is None:
            break
        ftype, name, data = frame.type, frame.name, bytes(frame.data)
        if mode == "stall-plan" and ftype == FrameType.PLAN_VM:
            time.sleep(3600)
        if ftype == FrameType.PLAN_VM:
            plan_vms += 1
            if plan_vms == 1:
                if mode == "garbage-record":
                    data = b"\x04evil\xff\xff\xff"
                elif mode == "oversize-record":
                    data = bytes(pf.MAX_VM_RECORD + 1)
                elif mode == "trailing-byte":
                    data += b"\0"
                elif mode.startswith("name:"):
                    data = record(name=mode[5:])
                elif mode == "class":
                    data = record(klass=9)
                elif mode == "property":
                    data = record(properties=[{"code": 1, "value": (1 << 20) + 1}])
                elif mode == "unknown-property":
                    data = record(properties=[{"code": 99, "value": 1}])
                elif mode == "feature":
                    data = record(features=[{"key": "qemu-extra-args", "value": "x"}])
                elif mode == "appvm-root":
                    data = record(volumes=[{"code": 1, "size": 1 << 20, "data": 0}])
                elif mode == "repeat":
                    send(stdout, ftype, name, data)
        if ftype == FrameType.PLAN_END and mode == "too-many":
            info = pf.decode_info(data)
            for i in range(pf.MAX_PLAN_VMS + 1 - info.vms):
                send(stdout, FrameType.PLAN_VM, f"vm{1000 + i}", record(name=f"evil{i}"))
            data = data[:-2] + (pf.MAX_PLAN_VMS + 1).to_bytes(2, "big")
        if ftype in (FrameType.VOLUME_DATA, FrameType.VOLUME_HOLE, FrameType.VOLUME_END):
            volume_frames += 1
            if mode == "stall-volume" and volume_frames == 2:
                time.sleep(3600)
            if mode == "grow-volume" and ftype == FrameType.VOLUME_END:
                send(stdout, FrameType.VOLUME_DATA, name, b"\x55" * 512)
            if mode == "huge-hole" and ftype == FrameType.VOLUME_END:
                send(stdout, FrameType.VOLUME_HOLE, name, pf.encode_hole(1 << 40))
            if mode == "short-volume" and ftype == FrameType.VOLUME_DATA:
                continue
            if mode == "other-volume" and volume_frames == 1:
                name = "vm1/root"
            if mode == "early-verified" and volume_frames == 1:
                send(stdout, FrameType.VERIFIED)
                continue
            if mode == "error-controls" and volume_frames == 1:
                send(stdout, FrameType.ERROR, "", "it\x1b[2J\nworked\u202e\x9b31m: done".encode())
                return 1
        if ftype == FrameType.VERIFIED and mode == "data-after-verified":
            send(stdout, ftype, name, data)
            send(stdout, FrameType.VERIFIED)
            continue
        send(stdout, ftype, name, data)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
