"""The writing thread of a snapshot restore: the verified plaintext goes into its sinks (volume imports through
qubesd, firewall and notes) on a thread of its own, in order, while the receiving thread already fetches and
opens the next blocks; as the extraction thread of a backup file's restore (extract.py).

Bounded: at most ``limit`` bytes queued (the receiving thread waits).  The first error stops the thread and
is raised, the very exception, by the receiving thread's next ``put`` or by ``drain``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

WRITE_AHEAD = 32 << 20  # plaintext queued for the writing thread (it waits on holes: the import takes their zeros)


class WriterStopped(Exception):
    """The writer was stopped (``stop``) before the work was done."""


class Writer:
    """Runs queued calls, in order, on one thread; ``put`` queues, ``drain`` waits for all of them."""

    def __init__(self, limit: int = WRITE_AHEAD) -> None:
        self.limit = limit
        self._jobs: deque[tuple[Callable[[], None], int]] = deque()
        self._queued = 0  # bytes of the queued jobs and of the one running
        self._busy = False
        self._stopped = False
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="restore-write", daemon=True)
        self._thread.start()

    def put(self, job: Callable[[], None], size: int = 0) -> None:
        """Queue ``job`` (it carries ``size`` bytes): waits while ``limit`` bytes are queued."""
        with self._cond:
            while not self._stopped and self._queued and self._queued + size > self.limit:
                self._cond.wait()
            self._check()
            self._jobs.append((job, size))
            self._queued += size
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every queued job ran; raises the first error."""
        with self._cond:
            while not self._stopped and (self._jobs or self._busy):
                self._cond.wait()
            self._check()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error
        if self._stopped:
            raise WriterStopped("the writing thread was stopped")

    def stop(self) -> None:
        """Drop what is queued and end the thread after its current job (from any thread; does not wait)."""
        with self._cond:
            self._stopped = True
            self._jobs.clear()
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def close(self) -> None:
        self.stop()
        self.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._jobs:
                    self._cond.wait()
                if self._stopped:
                    return
                job, size = self._jobs.popleft()
                self._busy = True
            try:
                job()
            except BaseException as e:  # raised by the receiving thread
                with self._cond:
                    self.error = e
                    self._stopped = True
                    self._jobs.clear()
                    self._busy = False
                    self._cond.notify_all()
                return
            with self._cond:
                self._busy = False
                self._queued -= size
                self._cond.notify_all()
