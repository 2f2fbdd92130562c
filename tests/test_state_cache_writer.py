"""The daemon's state cache writer: the last-known-good state is rewritten at most once per
sync period, however often partial syncs submit one, and the newest one is not lost."""

from __future__ import annotations

import threading
import time

import pytest

from kproxy.daemon import cachewriter as daemon_module
from kproxy.daemon.cachewriter import CacheWriter


class Saves:
    """Stands in for cache.save: records what was written, and when."""

    def __init__(self) -> None:
        self.written: list[tuple[float, list[str]]] = []
        self.failures = 0  # how many of the next calls fail like a full disk
        self.lock = threading.Lock()

    def __call__(self, path, objects, node="") -> None:
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise OSError(28, "No space left on device")
            self.written.append((time.monotonic(), list(objects)))

    def states(self) -> list[list[str]]:
        with self.lock:
            return [objects for _, objects in self.written]


@pytest.fixture
def saves(monkeypatch) -> Saves:
    recorder = Saves()
    monkeypatch.setattr(daemon_module.cache, "save", recorder)
    return recorder


def wait_until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_many_partial_syncs_cost_one_write_per_period_and_the_last_state_lands(saves):
    interval = 0.5
    writer = CacheWriter("unused", "node-1", interval=interval)
    try:
        started = time.monotonic()
        for i in range(60):  # a partial sync every 20 ms
            writer.submit([f"state-{i}"])
            time.sleep(0.02)
        elapsed = time.monotonic() - started
        # The first write goes at once, each later one at least `interval` after the one
        # before: however slow this machine was, no more than this can have happened.
        assert 1 <= len(saves.states()) <= 1 + int(elapsed / interval)
        assert saves.states()[0] == ["state-0"]
        # The newest state is written within one period of the previous write.
        wait_until(lambda: saves.states()[-1] == ["state-59"], timeout=10 * interval)
        count = len(saves.states())
        time.sleep(3 * interval)
        assert len(saves.states()) == count, "rewritten with nothing new submitted"
    finally:
        writer.stop()
    times = [t for t, _ in saves.written]
    assert all(b > a for a, b in zip(times, times[1:], strict=False))


def test_stop_writes_the_pending_state_before_returning(saves):
    writer = CacheWriter("unused", "node-1", interval=3600)
    writer.submit(["first"])
    wait_until(lambda: saves.states() == [["first"]])
    writer.submit(["second"])
    writer.submit(["newest"])
    time.sleep(0.2)
    assert saves.states() == [["first"]], "written before its period was over"
    writer.stop()  # SIGTERM: the newest state must not be lost
    assert saves.states() == [["first"], ["newest"]]


def test_a_failed_write_is_tried_again(saves):
    saves.failures = 1
    writer = CacheWriter("unused", "node-1", interval=0.2)
    try:
        writer.submit(["only"])
        wait_until(lambda: saves.states() == [["only"]], timeout=10)
    finally:
        writer.stop()
