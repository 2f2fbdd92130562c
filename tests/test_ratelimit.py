"""The client-side rate limit on API requests (kproxy/sources/ratelimit.py: pure), on a fake
clock: client-go's token bucket, burst at once then 1/qps apart."""

from __future__ import annotations

import threading

import pytest

from kproxy.sources.ratelimit import TokenBucket, client_go_limits


class FakeClock:
    """A clock that moves only when the bucket sleeps (or the test says)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def bucket(qps: float, burst: int) -> tuple[TokenBucket, FakeClock]:
    clock = FakeClock()
    return TokenBucket(qps, burst, clock=clock, sleep=clock.sleep), clock


def take_times(b: TokenBucket, clock: FakeClock, n: int) -> list[float]:
    """When each of `n` back-to-back requests goes out (seconds from the first)."""
    start, out = clock.now, []
    for _ in range(n):
        b.take()
        out.append(round(clock.now - start, 9))
    return out


def test_the_burst_passes_at_once_then_requests_are_one_over_qps_apart():
    b, clock = bucket(qps=4, burst=3)
    assert take_times(b, clock, 7) == [0, 0, 0, 0.25, 0.5, 0.75, 1.0]
    assert clock.slept == [0.25] * 4
    assert b.waited == pytest.approx(1.0)


def test_refill_is_capped_at_the_burst():
    b, clock = bucket(qps=2, burst=2)
    take_times(b, clock, 2)  # empty
    clock.now += 3600  # an hour idle would be 7200 tokens: only 2 are kept
    assert take_times(b, clock, 4) == [0, 0, 0.5, 1.0]


def test_a_partial_refill_is_used():
    b, clock = bucket(qps=10, burst=1)
    b.take()
    clock.now += 0.04  # 0.4 of a token: the next one waits the other 0.06s
    assert b.take() == pytest.approx(0.06)


@pytest.mark.parametrize("qps", [0, -1, -0.5])
def test_qps_zero_or_negative_is_no_limit(qps):
    b, clock = bucket(qps=qps, burst=1)
    assert b.unlimited and b.describe() == "no limit"
    assert take_times(b, clock, 1000) == [0] * 1000
    assert clock.slept == [] and b.waited == 0


def test_concurrent_callers_each_reserve_their_own_slot():
    # Reservations are made under the lock: 8 threads at once on an empty bucket get waits
    # 1/qps apart, never two the same (no thundering herd after one refill).
    b, clock = bucket(qps=5, burst=1)
    b.take()
    waits: list[float] = []
    lock = threading.Lock()

    def one() -> None:
        wait = b.reserve()
        with lock:
            waits.append(round(wait, 9))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(waits) == [round(0.2 * i, 9) for i in range(1, 9)]


def test_burst_below_one_still_lets_requests_through():
    b, clock = bucket(qps=2, burst=0)
    assert take_times(b, clock, 3) == [0, 0.5, 1.0]


def test_client_go_limits():
    assert client_go_limits(0, 0) == (5.0, 10)  # rest.DefaultQPS, DefaultBurst
    assert client_go_limits(20, 30) == (20.0, 30)
    assert client_go_limits(-1, 7) == (-1.0, 7)  # no limiter
    assert TokenBucket(2.5, 4).describe() == "2.5 requests/s, bursts of 4"


def test_a_lists_next_pages_take_no_token(monkeypatch):
    """kube-proxy's first list is one request per resource (served from the API server's
    cache); kproxy's next pages of one list are free, its first page, watches and posts not."""
    from kubernetes import client

    from kproxy.sources.kube import LimitedApiClient

    class Counting:
        taken = 0

        def take(self) -> float:
            Counting.taken += 1
            return 0.0

    monkeypatch.setattr(client.ApiClient, "call_api", lambda self, *a, **k: None)
    api = LimitedApiClient(client.Configuration(), Counting())  # type: ignore[arg-type]
    base = "http://127.0.0.1:1/api/v1/services?limit=500"
    api.call_api("GET", base)
    api.call_api("GET", base + "&continue=abc")
    api.call_api(method="GET", url=base + "&continue=def")
    api.call_api("GET", "http://127.0.0.1:1/api/v1/services?watch=true")
    assert Counting.taken == 2
