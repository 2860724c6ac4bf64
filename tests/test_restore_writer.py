"""The writing thread of a snapshot restore (restore/writer.py): queued calls run in order, the queue is
bounded, the first error is raised (the very exception) on the next put or drain, stop drops what is queued."""

from __future__ import annotations

import threading

import pytest
from qubes_backup_dom0.errors import BackupError
from qubes_backup_dom0.restore.writer import Writer, WriterStopped


def test_calls_run_in_order() -> None:
    w = Writer(limit=10)
    done: list[int] = []
    for i in range(200):
        w.put(lambda i=i: done.append(i), 3)  # type: ignore[misc]
    w.drain()
    w.close()
    assert done == list(range(200))


def test_put_waits_while_the_limit_is_queued() -> None:
    w = Writer(limit=100)
    gate = threading.Event()
    w.put(gate.wait, 60)  # running, holds 60 bytes of the limit until it returns
    w.put(lambda: None, 40)  # 100: still fits
    queued = threading.Event()

    def third() -> None:
        w.put(lambda: None, 1)
        queued.set()

    t = threading.Thread(target=third)
    t.start()
    assert not queued.wait(0.2)  # 101 > 100: waits for the running call
    gate.set()
    assert queued.wait(10)
    t.join()
    w.drain()
    w.close()


def test_one_larger_than_the_limit_is_taken_when_nothing_is_queued() -> None:
    w = Writer(limit=10)
    ran: list[int] = []
    w.put(lambda: ran.append(1), 1000)
    w.drain()
    w.close()
    assert ran == [1]


def test_first_error_raised_by_the_next_put_and_by_drain() -> None:
    w = Writer()
    error = BackupError("import of volume 'private' of work failed")
    after: list[int] = []

    def fail() -> None:
        raise error

    w.put(fail)
    with pytest.raises(BackupError) as info:
        w.drain()
    assert info.value is error
    with pytest.raises(BackupError) as again:
        w.put(lambda: after.append(1))
    assert again.value is error
    w.close()
    assert after == []


def test_stop_drops_what_is_queued() -> None:
    w = Writer()
    gate = threading.Event()
    ran: list[int] = []
    w.put(gate.wait)
    for i in range(5):
        w.put(lambda i=i: ran.append(i))  # type: ignore[misc]
    w.stop()
    gate.set()
    w.join(10)
    assert ran == []
    with pytest.raises(WriterStopped):
        w.put(lambda: None)
