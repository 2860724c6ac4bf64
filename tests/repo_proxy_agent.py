"""A backup VM between dom0 and the real agent: it starts the agent through its real service entry point
(``SimTransport``), relays dom0's frames to it unchanged, logs every GET dom0 sends (each id of a GETS),
and bends what the agent answers as one attack says (tests/test_repo_hostile_more.py, tests/test_repo_reads.py).

Usage: ``python repo_proxy_agent.py SPEC_JSON SIM_DIR SERVICE VM`` with SPEC:

- ``log``: a file to append every GET's name to (one per line), as the agent receives it;
- ``opening``: how the opening (header, MAC, ENTRY per root, END) is bent: ``extra_roots`` N (N more ENTRY
  frames with higher numbers), ``reverse`` (roots in descending order), ``bad_root`` NAME (one more ENTRY),
  ``header_twice``, ``no_mac``, ``mac_first``, ``member_after_roots``, ``error`` (an ERROR instead);
- ``op`` on the answer to GET number ``at`` (0 first after the opening; or the first answer whose object
  type letter is ``at_type``): ``swap`` (with the next answer), ``repeat`` (sent twice), ``rename`` (under
  the name ``name``, or the next GET's), ``error`` (an ERROR frame instead), ``stop`` (the VM stops
  answering: the proxy exits), ``stall`` (it stops answering but stays),
  ``end`` (an END frame instead), ``drop`` (left out).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO

from qubes_backup_dom0.qubes.system import System
from qubes_backup_dom0.qubes.transport import SimTransport
from qubes_backup_protocol import frames
from qubes_backup_protocol import repo as repo_names
from qubes_backup_protocol.frames import FrameType


def read_raw(stream: BinaryIO) -> tuple[FrameType, str, bytes] | None:
    head = frames.read_header(stream)
    if head is None:
        return None
    ftype, name_len, data_len = head
    name = frames.read_exact(stream, name_len).decode("ascii", "replace")
    return ftype, name, frames.read_exact(stream, data_len)


class Proxy:
    def __init__(self, spec: dict[str, object], out: BinaryIO) -> None:
        self.spec = spec
        self.out = out
        self.gets: list[str] = []
        self.lock = threading.Lock()
        self.answers = 0
        self.held: tuple[FrameType, str, bytes] | None = None
        self.done = False

    def send(self, ftype: FrameType, name: str, data: bytes = b"") -> None:
        raw = name.encode("ascii")
        self.out.write(frames.encode_header(ftype, len(raw), len(data)) + raw + data)
        self.out.flush()

    def opening(self, items: list[tuple[FrameType, str, bytes]]) -> None:
        o = self.spec.get("opening")
        if o == "error":
            self.send(FrameType.ERROR, "", b"cannot list the roots")
            return
        members = [i for i in items if i[0] == FrameType.MEMBER]
        roots = [i for i in items if i[0] == FrameType.ENTRY]
        if o == "extra_roots":
            last = int(roots[-1][1][6:16]) if roots else 0
            n = int(self.spec["n"])  # type: ignore[call-overload]
            roots += [(FrameType.ENTRY, f"roots/{last + 1 + i:010d}-20990101T000000Z", b"") for i in range(n)]
        elif o == "reverse":
            roots.reverse()
        elif o == "bad_root":
            roots.append((FrameType.ENTRY, str(self.spec["name"]), b""))
        elif o == "header_twice":
            members = [members[0], *members]
        elif o == "no_mac":
            members = members[:1]
        elif o == "mac_first":
            members.reverse()
        elif o == "member_after_roots":
            roots.append(members[0])
        for ftype, name, data in [*members, *roots]:
            self.send(ftype, name, data)
        self.send(FrameType.END, "")

    def answer(self, frame: tuple[FrameType, str, bytes]) -> None:
        ftype, name, data = frame
        k = self.answers
        self.answers += 1
        if self.held is not None:  # a swap: this one first, then the held one
            held, self.held = self.held, None
            self.send(ftype, name, data)
            self.send(*held)
            return
        at, at_type = self.spec.get("at"), self.spec.get("at_type")
        hit = (at is not None and k == at) or (
            at_type is not None and ftype == FrameType.MEMBER and data[5:6] == str(at_type).encode())
        if not hit or self.done:
            self.send(ftype, name, data)
            return
        self.done = True
        op = self.spec.get("op")
        if op == "swap":
            self.held = frame
        elif op == "repeat":
            self.send(ftype, name, data)
            self.send(ftype, name, data)
        elif op == "rename":
            with self.lock:
                nxt = self.gets[k + 1] if len(self.gets) > k + 1 else name[::-1]
            self.send(ftype, str(self.spec.get("name") or nxt), data)
        elif op == "error":
            self.send(FrameType.ERROR, "", b"disk on fire")
        elif op == "end":
            self.send(FrameType.END, "")
        elif op == "stop":
            os._exit(0)
        elif op == "stall":
            time.sleep(120)
            os._exit(0)
        elif op == "drop":
            pass
        else:
            self.send(ftype, name, data)


def main() -> int:
    spec = json.loads(sys.argv[1])
    sim_dir, service, vm = Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    system = System(sim_dir, sim_dir / "dom0", "user")
    agent = SimTransport(system).start(service, vm)
    assert agent.stdin is not None and agent.stdout is not None
    dom0_in = os.fdopen(0, "rb", buffering=0)
    out = os.fdopen(1, "wb", buffering=0)
    proxy = Proxy(spec, out)
    log = open(spec["log"], "a") if spec.get("log") else None  # noqa: SIM115

    def upstream() -> None:
        """dom0 -> agent, unchanged; GETs logged."""
        assert agent.stdin is not None
        reader = dom0_in
        try:
            while True:
                frame = read_raw(reader)
                if frame is None:
                    break
                ftype, name, data = frame
                if ftype in (FrameType.GET, FrameType.GETS):
                    asked = [name] if ftype == FrameType.GET else repo_names.parse_gets(data)
                    with proxy.lock:
                        proxy.gets += asked
                    if log is not None:
                        log.write("".join(n + "\n" for n in asked))
                        log.flush()
                raw = name.encode("ascii")
                agent.stdin.write(frames.encode_header(ftype, len(raw), len(data)) + raw + data)
                agent.stdin.flush()
        except (OSError, frames.ProtocolError):
            pass
        finally:
            with contextlib.suppress(OSError):
                agent.stdin.close()

    threading.Thread(target=upstream, daemon=True).start()
    items: list[tuple[FrameType, str, bytes]] = []
    try:
        while True:
            frame = read_raw(agent.stdout)
            if frame is None:
                break
            if items is not None and frame[0] != FrameType.END and frame[0] in (FrameType.MEMBER, FrameType.ENTRY):
                items.append(frame)
                continue
            if frame[0] == FrameType.END and items is not None and proxy.answers == 0 and not proxy.done:
                proxy.opening(items)
                items = None  # type: ignore[assignment]
                continue
            if items is not None:  # an ERROR in the opening
                for it in items:
                    proxy.send(*it)
                items = None  # type: ignore[assignment]
            proxy.answer(frame)
    except (OSError, frames.ProtocolError):
        pass
    if agent.stderr is not None:
        sys.stderr.write(agent.stderr.read().decode("utf-8", "replace")[-2000:])
    return agent.wait()


if __name__ == "__main__":
    sys.exit(main())
