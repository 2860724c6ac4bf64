"""Writing frames into a service's stdin from one thread while another thread reads its stdout.

A paranoid restore (paranoid.py) sends the DisposableVM the passphrase and the relayed backup frames here,
first from the main thread, then from the relay thread, while the main thread reads the DisposableVM's answers
through a ``transport.Channel`` over the same process.  This writer has its own descriptor and wake-up pipe and
does not touch stdout or stderr, so the two threads share no state; the deadlines are a Channel's.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import time
from typing import IO

from qubes_backup_protocol import frames
from qubes_backup_protocol.frames import FrameType

from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.qubes.transport import MIN_RATE, ChannelClosed, ChannelInterrupted, frame_budget


class FrameWriter:
    """Frames into the DisposableVM's stdin, from one thread at a time (first the main thread, then the relay
    thread), each within the budget a Channel gives a frame (transport.frame_budget: the stall timeout plus
    its size at MIN_RATE).  Its own descriptor and wake-up pipe: the reading Channel over the same process
    (stdout, stderr) shares nothing with it.  ``interrupt`` from any thread."""

    def __init__(self, stdin: IO[bytes], timeout: float, vm: str) -> None:
        self._file: IO[bytes] | None = stdin
        self._fd: int | None = stdin.fileno()
        os.set_blocking(self._fd, False)
        self.timeout, self.vm = timeout, vm
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._interrupted = False

    def send(self, ftype: FrameType, name: str = "", data: bytes | memoryview = b"") -> None:
        raw = name.encode("ascii")
        head = frames.encode_header(ftype, len(raw), len(data)) + raw
        deadline = time.monotonic() + frame_budget(self.timeout, len(head) + len(data))
        self._write(head, deadline)
        if len(data):
            self._write(data, deadline)

    def _write(self, data: bytes | memoryview, deadline: float) -> None:
        view = memoryview(data).cast("B")
        while view:
            if self._interrupted:
                raise ChannelInterrupted(f"{self.vm}: interrupted")
            if self._fd is None:
                raise ChannelClosed(f"{self.vm}: input already closed")
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                self._wait(deadline)
            except (BrokenPipeError, ConnectionResetError):
                raise ChannelClosed(f"{self.vm} stopped reading") from None

    def _wait(self, deadline: float) -> None:
        assert self._fd is not None
        stall = time.monotonic() + self.timeout
        limit = min(stall, deadline)
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        poller.register(self._wake_r, select.POLLIN)
        left = limit - time.monotonic()
        if left <= 0 or not poller.poll(math.ceil(left * 1000)):
            if deadline < stall:
                raise BackupError(f"{self.vm} accepts the backup too slowly (under {MIN_RATE >> 10} KiB/s for a "
                                  "whole frame)")  # fmt: skip
            raise BackupError(f"{self.vm} did not answer for {self.timeout:g} s")

    def interrupt(self) -> None:
        self._interrupted = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def close_input(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._file = self._fd = None

    def close(self) -> None:
        self.close_input()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1
