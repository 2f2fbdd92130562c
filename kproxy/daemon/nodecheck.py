"""The daemon's node checks: `kproxy doctor`'s checks (kproxy/doctor/), run in a thread of
their own at start and then every sync period, exported as kproxy_node_check{check,status}
(1 for each check's current status, 0 for the others). A slow check (a tool waiting on the
xtables lock, an API server timing out) delays only the next round, never a sync; a check
whose status changes to warn or fail is logged once, with what it saw."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from kproxy.daemon.metrics import Metrics
from kproxy.doctor.checks import CHECK_NAMES, run_checks
from kproxy.doctor.context import Context
from kproxy.doctor.result import FAIL, OK, SKIPPED, STATUSES, WARN, Result

log = logging.getLogger(__name__)


class NodeChecker:
    def __init__(
        self,
        ctx: Context,
        metrics: Metrics,
        period: float,
        synced: Callable[[], bool] | None = None,
    ) -> None:
        """`synced`: whether the daemon's first sync is done. The first round waits for it
        (up to one period): before it, kproxy's own rules are not there yet, and the checks
        that look at them (route_localnet's martian rule, the jump to KUBE-FORWARD, the last
        sync) would report what the sync is about to fix."""
        self.ctx, self.metrics, self.period = ctx, metrics, max(1.0, period)
        self.synced = synced
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: dict[str, Result] = {}
        self.rounds = 0
        # Every check's series exists from the first scrape, at 0, before any round ends.
        for name in CHECK_NAMES:
            for status in STATUSES:
                metrics.node_check.labels(check=name, status=status).set(0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="node-checks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        deadline = time.monotonic() + self.period
        while self.synced is not None and not self.synced() and time.monotonic() < deadline:
            if self._stop.wait(0.2):
                return
        while not self._stop.is_set():
            try:
                self.check_once()
            except Exception:  # never the end of the thread
                log.exception("node checks failed")
            self._stop.wait(self.period)

    def check_once(self) -> list[Result]:
        results = run_checks(self.ctx)
        for r in results:
            for status in STATUSES:
                self.metrics.node_check.labels(check=r.name, status=status).set(
                    1 if status == r.status else 0
                )
            before = self.last.get(r.name)
            if r.status in (WARN, FAIL) and (before is None or before.status != r.status):
                log.warning(
                    "node check %s: %s: %s (see %s)", r.name, r.status, r.saw, r.remedy_link
                )
            elif r.status in (OK, SKIPPED) and before is not None and before.status in (WARN, FAIL):
                log.info("node check %s: %s again: %s", r.name, r.status, r.saw)
            self.last[r.name] = r
        self.rounds += 1
        return results


def node_check_context(
    opts: Any, api_limiter: Any = None, fought_by: Callable[[], list[str]] | None = None
) -> Context:
    """The checks' settings from the daemon's own (DaemonOptions): its mode, backend,
    addresses, API server and state cache; its own listeners are kproxy's. `api_limiter`: the
    daemon's client-side rate limit (its KubeSource's), which the apiserver check's request
    waits on too."""
    return Context(
        mode=opts.mode,
        iptables_backend=opts.backend,
        healthz_bind=opts.healthz_bind,
        metrics_bind=opts.metrics_bind,
        servers=list(opts.servers or []),
        kubeconfig=opts.kubeconfig,
        state_cache=opts.state_cache,
        state_cache_max_age=opts.state_cache_max_age,
        sync_period=opts.sync_period,
        own_pid=os.getpid(),
        api_limiter=api_limiter,
        fought_by=fought_by,
    )
