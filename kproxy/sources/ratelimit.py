"""The client-side rate limit on requests to the API server, as client-go's: a token bucket
(flowcontrol.NewTokenBucketRateLimiter) holding at most `burst` tokens, refilled at `qps` per
second; every request takes one, waiting for it when the bucket is empty. kube-proxy's
`clientConnection.qps`/`burst` (and --kube-api-qps/--kube-api-burst) set it.

Pure: no I/O; the clock and the sleep are injectable, so tests run it on a fake clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# client-go's rest.DefaultQPS and DefaultBurst: what a zero in the configuration means.
DEFAULT_QPS = 5.0
DEFAULT_BURST = 10


class TokenBucket:
    """`take()` blocks until a token is there, then consumes it. Thread-safe and fair: each
    caller reserves its token under the lock (the bucket may go negative: a debt), then sleeps
    outside it for as long as that token takes to be refilled, so concurrent callers come out
    spaced 1/qps apart in the order they arrived, as golang.org/x/time/rate's Wait does.

    `qps <= 0` means no limit (client-go creates no limiter then): take() returns at once."""

    def __init__(
        self,
        qps: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.qps = float(qps)
        self.burst = max(1, int(burst))  # a bucket of 0 would never let a request through
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = float(self.burst)  # full at the start, as client-go's
        self._last = clock()
        self.waited = 0.0  # total seconds callers waited (for the log and tests)

    @property
    def unlimited(self) -> bool:
        return self.qps <= 0

    def reserve(self) -> float:
        """Take a token now (on credit if none is left): the seconds to wait before using it."""
        if self.unlimited:
            return 0.0
        with self._lock:
            now = self._clock()
            # Refill for the time since the last call, never beyond the bucket's size: an idle
            # client gets `burst` requests at once, not everything it saved up.
            elapsed = max(0.0, now - self._last)
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.qps)
            self._last = now
            self._tokens -= 1.0
            wait = -self._tokens / self.qps if self._tokens < 0 else 0.0
            self.waited += wait
            return wait

    def take(self) -> float:
        """Wait for a token and consume it; the seconds waited."""
        wait = self.reserve()
        if wait > 0:
            self._sleep(wait)
        return wait

    def describe(self) -> str:
        if self.unlimited:
            return "no limit"
        return f"{self.qps:g} requests/s, bursts of {self.burst}"


def client_go_limits(qps: float, burst: int) -> tuple[float, int]:
    """The (qps, burst) client-go's rest.RESTClientFor uses for a configuration's values: 0
    takes its defaults (5 and 10), a negative qps is no limit (returned as is)."""
    return (DEFAULT_QPS if qps == 0 else float(qps)), (DEFAULT_BURST if burst == 0 else burst)
