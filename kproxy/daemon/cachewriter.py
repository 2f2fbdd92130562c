"""The daemon's writer of the last-known-good state cache (sources/cache.py), in the
background."""

from __future__ import annotations

import logging
import threading
import time

from kproxy.daemon.metrics import Metrics
from kproxy.sources import cache

log = logging.getLogger(__name__)


class CacheWriter:
    """Writes the last-known-good state in the background, at most once per `interval` (the
    sync period): under churn a partial sync comes every second, and each write is the whole
    cluster (megabytes at 10k Services) with an fsync. The latest submission wins: the first
    is written at once, a newer one `interval` after the previous write, one still pending
    at stop() before it returns, and a failed one (full disk) again after `interval`. A slow
    disk never delays a sync."""

    def __init__(
        self, path: str, node: str, metrics: Metrics | None = None, interval: float = 0.0
    ) -> None:
        self.path, self.node, self.metrics = path, node, metrics
        self.interval = interval
        self._pending: list[str] | None = None
        self._last_write = float("-inf")  # time.monotonic() of the last write's start
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="state-cache", daemon=True)
        self._thread.start()

    def submit(self, objects: list[str]) -> None:
        with self._cv:
            self._pending = objects
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._pending is None:
                        if self._stop:
                            return
                        self._cv.wait()
                        continue
                    wait = self._last_write + self.interval - time.monotonic()
                    if self._stop or wait <= 0:
                        break
                    self._cv.wait(wait)
                objects, self._pending = self._pending, None
                self._last_write = time.monotonic()
            try:
                cache.save(self.path, objects, self.node)
            except OSError as err:
                # The previous cache file is intact (atomic write); say so and go on.
                log.warning(
                    "could not write the state cache %s: %s", self.path, err.strerror or err
                )
                if self.metrics is not None:
                    self.metrics.state_cache_failures_total.inc()
                with self._cv:
                    if self._pending is None and not self._stop:
                        self._pending = objects  # again in a period, unless a newer one came

    def stop(self) -> None:
        """Write what is pending (SIGTERM: a newer state than the file's is not lost), then end."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(10)
