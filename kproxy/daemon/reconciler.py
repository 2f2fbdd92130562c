"""The daemon's loop: changes -> coalesce (min sync period) -> render -> plan -> apply.

- Nothing is written before the source has listed Services and EndpointSlices completely.
- A change renders only the Services it touched and plans their old rules against their new
  ones (no kernel read, see kproxy/mode.py); the kernel itself is read and every difference
  repaired ("verify") at start, after a failed apply, when a canary has vanished, and once per
  sync period. A sync with nothing changed does nothing.
- The canaries (empty KUBE-PROXY-CANARY chains in mangle, nat and filter of each family; the
  kproxy table in nftables mode) are checked every canary interval (upstream watches mangle
  only, k8s issue 129128): a missing one means rules were flushed behind kproxy's back, and
  triggers a verify at once.
- Other processes' changes to kproxy's rules come as nf_tables events (kproxy.daemon.
  driftwatch, where the backend has them): the objects a foreign transaction touched are read
  alone and repaired at once (Mode.repair), attributed to the process, and rate-limited per
  object (kproxy.drift.RepairLimiter) so a tool fighting kproxy cannot make it spin. A table
  deleted, too many objects, or events lost trigger a full verify instead.
- A failed apply leaves the kernel as it was (every restore is atomic) and is retried with
  exponential backoff, up to the sync period. So is any other error of a sync (a missing
  binary, a netlink error, a bug): the daemon logs it (its traceback once per distinct
  error), counts it, and goes on; an error of the canary check is logged and counted too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

from kproxy import tools
from kproxy.daemon.nfevents import Overflow, Transaction
from kproxy.drift import DriftScope, Object, RepairLimiter, label, summary
from kproxy.errors import ApplyError
from kproxy.mode import Mode, sync_families
from kproxy.model import ClusterState, NodeConfig
from kproxy.recovery.lockfile import LockError
from kproxy.sources.store import Changes, ObjectStore

log = logging.getLogger(__name__)


class SyncObserver(Protocol):
    """What the reconciler reports (daemon.DaemonObserver turns it into metrics and health)."""

    def queued(self) -> None: ...
    def changes(self, service_events: int, endpoint_events: int) -> None: ...
    def synced(
        self,
        full: bool,
        seconds: float,
        lines_sent: dict[str, int],
        rules: dict[str, int],
        no_local: dict[str, int],
    ) -> None: ...
    def failed(self, family: str, partial: bool, reason: str) -> None: ...
    def updated(self, family: str) -> None: ...
    def drift_repaired(self, reason: str, process: str = "") -> None: ...
    def drift_backoff(self, process: str) -> None: ...
    def node_event(self, reason: str, note: str) -> None: ...
    def programming_latency(self, seconds: float) -> None: ...


class _NoObserver:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@dataclass
class SyncReport:
    ok: bool
    full: bool
    state: ClusterState
    changes: Changes
    # The families whose rules were not applied (all of them when the sync was postponed).
    failed_families: list[str] = field(default_factory=list)
    config: NodeConfig | None = None  # the config the sync rendered with


# The periodic verify reads the kernel and compares it with a full render: ~10 s at 10k
# Services in iptables mode, ~50 s in nftables mode (BENCHMARKS.md). It runs every sync period,
# but never more often than keeps its share of the time under 1/VERIFY_SHARE: at scale it would
# otherwise run back to back, holding up the partial syncs that carry the changes. (Upstream
# does a full sync every hour; canaries catch a flush within the canary interval either way.)
VERIFY_SHARE = 10

# Why a sync counted as failed (kproxy_sync_failures_total's reason label): iptables-restore or
# nft refused the change; any other exception of a sync (a missing binary, netlink, a bug); an
# exception of the canary check; one of the work after a successful apply (health check
# ports, state cache, snapshot, conntrack cleanup).
APPLY, UNEXPECTED, CANARY, AFTER_SYNC = "apply", "unexpected", "canary", "after-sync"
ALL_FAMILIES = "all"  # the family label of an error that belongs to no family
# Why drift was found and repaired (kproxy_drift_repairs_total's reason label): a canary
# chain vanished; the periodic verify found a difference; the verify after a failed sync did;
# another process's nf_tables transaction changed kproxy's rules (its `process` label names
# it); nf_tables events were lost, and the verify that followed found a difference.
FLUSH, PERIODIC, RETRY = "flush", "periodic", "retry"
FOREIGN, EVENTS_LOST = "foreign-change", "events-lost"
DRIFT_REASONS = (FLUSH, PERIODIC, RETRY, FOREIGN, EVENTS_LOST)
# Events of other processes' changes are gathered this long after the first before the repair
# (a tool often commits a few transactions in a row: one repair for all of them).
DRIFT_SETTLE = 0.03
# How long a fight (the limiter stepping in) is remembered for the node checks: the longest
# backoff, so a fight that goes on is never forgotten between two of its rounds.
FIGHTS_KEPT = 900.0
WHOLE: Object = ("", "all of its rules")  # the limiter's key for a family verified whole
LOST = ("", "events lost")  # and for the verifies after lost events


def failure_labels(families: list[str]) -> list[tuple[str, str]]:
    """Every (family, reason) a failed sync is counted under, so the daemon can show each at 0
    from the start (an alert's increase() misses the first event of a series born at 1)."""
    per_family = [(fam, reason) for fam in families for reason in (APPLY, UNEXPECTED, CANARY)]
    return per_family + [(ALL_FAMILIES, UNEXPECTED), (ALL_FAMILIES, AFTER_SYNC)]


# Distinct errors whose traceback was logged, at most: past it the set starts again (an error
# whose text changes on every attempt must not grow it forever).
MAX_TRACEBACKS = 100


def verify_interval(sync_period: float, last_verify_seconds: float) -> float:
    """Seconds between periodic verifies, given how long the last one took."""
    return max(sync_period, VERIFY_SHARE * last_verify_seconds)


class Reconciler:
    def __init__(
        self,
        store: ObjectStore,
        config: NodeConfig,
        families: list[Mode],
        *,
        min_sync_period: float = 1.0,
        sync_period: float = 30.0,
        canary_interval: float = 5.0,
        observer: SyncObserver | None = None,
        after_sync: Callable[[SyncReport], None] | None = None,
        lock: Callable[[], AbstractContextManager[None]] | None = None,
        configure: Callable[[ClusterState], NodeConfig] | None = None,
    ) -> None:
        self.store = store
        self.config = config
        # Called before each full render (verify, node change) for the config of that moment:
        # the node's addresses are read there (netlink), never inside the render.
        self.configure = configure
        self.families = families
        self.min_sync_period = min_sync_period
        self.sync_period = sync_period
        self.canary_interval = canary_interval
        self.observer = observer or _NoObserver()
        self.after_sync = after_sync
        # Held around each apply so `kproxy sync`/`restore` never interleave with the daemon.
        self.lock = lock or nullcontext
        self._cv = threading.Condition()
        self._pending = False
        self._verify_reason: str | None = "start"
        self._warned: set[str] = set()
        self._tracebacks: set[tuple[str, str, str]] = set()
        self.syncs = 0  # completed sync attempts, for tests and logs
        # Other processes' nf_tables transactions (and event losses) not handled yet, and the
        # monotonic time the first of them came; who caused the verify requested next.
        self._drift: list[Transaction | Overflow] = []
        self._drift_since = 0.0
        self._verify_cause = ""
        self.limiter = RepairLimiter()
        self.repairs = 0  # drift repairs done, for tests
        self._fights: list[tuple[float, str]] = []  # (monotonic time, who) of each backoff
        self._lock_fights = threading.Lock()  # the node checks' thread reads them

    # --- called from other threads ---

    def notify(self) -> None:
        """The store changed: sync soon (coalesced, at most once per min sync period)."""
        self.observer.queued()
        with self._cv:
            self._pending = True
            self._cv.notify()

    def wake(self) -> None:
        """End the loop's wait now: it sleeps until its next deadline (up to a canary
        interval or a sync period) and would see its stop only then."""
        with self._cv:
            self._cv.notify()

    def request_verify(self, reason: str, cause: str = "") -> None:
        with self._cv:
            if self._verify_reason is None:
                self._verify_reason, self._verify_cause = reason, cause
            self._cv.notify()

    def foreign_change(self, item: Transaction | Overflow) -> None:
        """An nf_tables transaction that may be another process's, or lost events (from the
        drift watch's thread): repaired within DRIFT_SETTLE, not held up by the min sync
        period (a repair is no change of Services)."""
        with self._cv:
            if not self._drift:
                self._drift_since = time.monotonic()
            self._drift.append(item)
            self._cv.notify()

    # --- the loop ---

    def run(self, stop: threading.Event, source_synced: threading.Event) -> None:
        """Sync until `stop` is set. Waits for `source_synced` before writing anything."""
        # `stop` is set by a signal handler or another thread (SIGTERM, a changed --config):
        # the loop, asleep on its condition, is woken for it at once (a pod's termination
        # would otherwise wait up to a canary interval, or a sync period, for the loop).
        threading.Thread(
            target=lambda: stop.wait() and self.wake(), name="stop-wake", daemon=True
        ).start()
        while not source_synced.wait(0.2):
            if stop.is_set():
                return
        last_start = float("-inf")
        last_verify = time.monotonic()
        verify_cost = 0.0
        last_canary = time.monotonic()
        retry_at = 0.0
        backoff = 1.0
        while not stop.is_set():
            now = time.monotonic()
            check_canaries = False
            drift: list[Transaction | Overflow] = []
            with self._cv:
                if self._drift and now >= self._drift_since + DRIFT_SETTLE:
                    drift, self._drift = self._drift, []
            if drift:
                self._handle_drift(drift)
                continue
            with self._cv:
                every = verify_interval(self.sync_period, verify_cost)
                if now - last_verify >= every and self._verify_reason is None:
                    self._verify_reason = PERIODIC
                due = self._pending or self._verify_reason is not None
                start_at = max(last_start + self.min_sync_period, retry_at)
                if self._verify_reason in (FOREIGN, EVENTS_LOST):
                    # Rules another process removed are missed now: not held up by the min
                    # sync period (which coalesces Service changes); the limiter holds back
                    # a process that keeps doing it.
                    start_at = retry_at
                if due and now >= start_at:
                    verify_reason, cause = self._verify_reason, self._verify_cause
                    self._pending = False
                    self._verify_reason, self._verify_cause = None, ""
                else:
                    deadlines = [last_verify + every, last_canary + self.canary_interval]
                    if due:
                        deadlines.append(start_at)
                    if self._drift:
                        deadlines.append(self._drift_since + DRIFT_SETTLE)
                    self._cv.wait(max(0.01, min(deadlines) - now))
                    check_canaries = (
                        time.monotonic() - last_canary >= self.canary_interval
                        and not due
                        and not self._drift
                    )
                    if not check_canaries:
                        continue
            if check_canaries:
                # Outside the lock: the check runs iptables/nft, and the watch threads' notify()
                # must not wait for it.
                last_canary = time.monotonic()
                missing = self.missing_canaries()
                if missing:
                    log.warning(
                        "owned rules were flushed (%s missing); repairing", ", ".join(missing)
                    )
                    with self._cv:
                        self._verify_reason = FLUSH
                continue
            last_start = time.monotonic()
            try:
                ok = self.sync(verify_reason, cause).ok
            except Exception as err:  # outside any family's sync (the store, the lock): a bug
                self._log_error("sync failed (will retry)", ALL_FAMILIES, err)
                self.observer.failed(ALL_FAMILIES, partial=verify_reason is None, reason=UNEXPECTED)
                for fam in self.families:
                    fam.forget()
                ok = False
            if verify_reason is not None or not ok:
                last_verify = time.monotonic()
            if verify_reason is not None and ok:
                verify_cost = last_verify - last_start
            if ok:
                backoff = 1.0
                retry_at = 0.0
            else:
                # Retry soon, then less often; the next attempt reads the kernel.
                retry_at = time.monotonic() + backoff
                backoff = min(backoff * 2, self.sync_period)
                with self._cv:
                    self._verify_reason = self._verify_reason or RETRY

    def sync(self, verify_reason: str | None, cause: str = "") -> SyncReport:
        """One sync of every family. `verify_reason` set: plan against the kernel's tables;
        `cause`: the process whose change made it (a drift verify's)."""
        try:
            with self.lock():
                return self._sync(verify_reason, cause)
        except LockError as err:
            log.warning("sync postponed: %s", err)
            state, changes = self.store.snapshot()
            report = SyncReport(
                ok=False,
                full=False,
                state=state,
                changes=changes,
                failed_families=[fam.name for fam in self.families],
                config=self.config,
            )
            # The changes were taken out of the store: make the retry a full one.
            for fam in self.families:
                fam.forget()
            # Told like a failed sync, so what the changes owed (conntrack cleanup) is kept.
            if self.after_sync is not None:
                self.after_sync(report)
            return report

    def _sync(self, verify_reason: str | None, cause: str = "") -> SyncReport:
        started = time.monotonic()
        state, changes = self.store.snapshot()
        self.observer.changes(changes.service_events, changes.endpoint_events)
        partial = verify_reason is None
        changed = None if changes.node else changes.services
        reconfigured = False
        if self.configure is not None and (not partial or changes.node):
            config = self.configure(state)
            if config != self.config:
                reconfigured = True
                log.info(
                    "node IPs %s, NodePorts on %s",
                    ", ".join(config.node_ips) or "unknown",
                    "every local address"
                    if config.nodeport_ips is None
                    else ", ".join(config.nodeport_ips) or "no address",
                )
                self.config = config
                changed = None  # every Service's NodePort and source-range rules may change
        report = SyncReport(
            ok=True,
            full=verify_reason is not None,
            state=state,
            changes=changes,
            config=self.config,
        )
        lines: dict[str, int] = {}
        rules: dict[str, int] = {}
        no_local = {"internal": 0, "external": 0}
        warned: set[str] = set()
        todo = []
        for fam in self.families:
            if partial and not changes.any() and fam.last is not None:
                self.observer.updated(fam.name)  # nothing changed: nothing to render or send
                warned.update(self._warned)
            else:
                todo.append(fam)
        # Every error of one family's sync ends that family's sync only: a missing binary,
        # netlink, a bug are never the daemon's end.
        results = sync_families(
            todo, state, self.config, changed, verify=not partial, errors=(Exception,)
        )
        for result in results:
            fam, err = result.mode, result.error
            if err is not None:
                if isinstance(err, ApplyError):
                    log.error("%s sync failed (rules unchanged, will retry): %s", fam.name, err)
                    if err.detail:
                        log.error("input around the failing line:\n%s", err.detail)
                    reason = APPLY
                else:
                    self._log_error("sync failed (rules unchanged, will retry)", fam.name, err)
                    reason = UNEXPECTED
                report.ok = False
                report.failed_families.append(fam.name)
                self.observer.failed(fam.name, partial=partial, reason=reason)
                continue
            outcome, rendered = result.outcome, result.rendered
            for warning in rendered.warnings:
                if warning not in self._warned:
                    log.warning("%s", warning)
            warned.update(rendered.warnings)
            # A verify that also brought new node addresses changed the rules for that reason,
            # not because someone else touched them: not reported as drift.
            drift = verify_reason not in (None, "start", "api-back") and not reconfigured
            if drift and outcome.changed:
                log.warning(
                    "%s: repaired rules changed behind kproxy's back (%s%s): %s",
                    fam.name,
                    verify_reason,
                    f", by {cause}" if cause else "",
                    outcome.summary,
                )
                self.observer.drift_repaired(verify_reason or "verify", _process_of(cause))
                if cause:
                    self.observer.node_event(
                        "RulesRepaired",
                        f"{fam.name} {fam.mode} rules changed by {cause}; repaired with a "
                        f"full verify in {time.monotonic() - started:.1f} s",
                    )
            elif outcome.changed or verify_reason == "start":
                log.info(
                    "synced %s (%s, %s, %d services): %s",
                    fam.name,
                    fam.label,
                    "full" if outcome.read_kernel else "partial",
                    len(state.services),
                    outcome.summary,
                )
            self.observer.updated(fam.name)
            for table, count in outcome.lines.items():
                lines[table] = lines.get(table, 0) + count
            for table, count in rendered.rules.items():
                rules[table] = rules.get(table, 0) + count
            for policy, count in rendered.no_local_endpoints.items():
                no_local[policy] += count
        # A warning is logged once when it appears, not on every sync.
        self._warned = warned
        self.syncs += 1
        if report.ok:
            self.observer.synced(report.full, time.monotonic() - started, lines, rules, no_local)
            now = time.time()
            for trigger in changes.trigger_times:
                self.observer.programming_latency(max(0.0, now - trigger))
        if self.after_sync is not None:
            try:
                self.after_sync(report)
            except Exception as err:  # the rules are applied: only the work after it failed
                self._log_error("work after the sync failed", ALL_FAMILIES, err)
                self.observer.failed(ALL_FAMILIES, partial=partial, reason=AFTER_SYNC)
        return report

    def _handle_drift(self, items: list[Transaction | Overflow]) -> None:
        """Repair what other processes' transactions changed of kproxy's rules."""
        if any(isinstance(item, Overflow) for item in items):
            # Held back like a fight when it keeps happening (a tool committing huge
            # transactions all the time): the periodic verify is there meanwhile.
            if self.limiter.allowed(LOST):
                log.warning("nf_tables events were lost (socket buffer full): verifying all")
                self.request_verify(EVENTS_LOST)
                self.limiter.repaired(LOST)
        foreign = [
            tx
            for tx in items
            if isinstance(tx, Transaction) and not tools.own_task(tx.pid, tx.portid)
        ]
        for fam in self.families:
            scope = DriftScope()
            who: dict[Object, str] = {}
            whole = ""
            for tx in foreign:
                part = fam.drift_scope(tx.changes)
                if not part:
                    continue
                author = f"{tx.process or '?'} (pid {tx.pid})"
                whole = author if part.whole else whole
                who.update(dict.fromkeys(part.objects, author))
                scope.merge(part)
            if scope:
                self._repair(fam, scope, who, whole)

    def _repair(self, fam: Mode, scope: DriftScope, who: dict[Object, str], whole: str) -> None:
        held = {o for o in scope.objects if not self.limiter.allowed((fam.name, o))}
        if held and not scope.whole:
            log.info(
                "%s: not repairing %s at once (backing off): the periodic verify will",
                fam.name,
                ", ".join(sorted(label(o) for o in held)),
            )
            scope = scope.without(held)
            if not scope:
                return
        started = time.monotonic()
        try:
            with self.lock():
                done = fam.repair(scope)
        except LockError as err:
            log.warning("drift repair postponed: %s", err)
            done = None
        except Exception as err:
            self._log_error("drift repair failed (verifying instead)", fam.name, err)
            self.observer.failed(fam.name, partial=True, reason=UNEXPECTED)
            done = None
        if done is None:  # a table gone, too much, no record: the whole family is verified
            author = whole or ", ".join(sorted(set(who.values())))
            if self.limiter.allowed((fam.name, WHOLE)):
                self.request_verify(FOREIGN, author)
                self._count_repair(fam, WHOLE, author)
            return
        if not done.found:
            return  # changed and changed back, or the same rules written again
        self.repairs += 1
        ms = (time.monotonic() - started) * 1000
        by_author: dict[str, dict[Object, str]] = {}
        for obj, found in done.found.items():
            by_author.setdefault(who.get(obj, "another process"), {})[obj] = found
        for author, found in by_author.items():
            note = f"{summary(found)} by {author}; repaired in {ms:.0f} ms"
            log.warning("%s %s rules: %s (%d lines sent)", fam.name, fam.mode, note, done.sent)
            self.observer.drift_repaired(FOREIGN, _process_of(author))
            self.observer.node_event("RulesRepaired", f"{fam.name} {fam.mode} rules: {note}")
        for obj in done.found:
            if obj in scope.objects:
                self._count_repair(fam, obj, who.get(obj, "another process"))

    def _count_repair(self, fam: Mode, obj: Object, author: str) -> None:
        """One more repair of `obj`: past the limiter's limit, say who fights kproxy."""
        backoff = self.limiter.repaired((fam.name, obj))
        if backoff is None:
            return
        log.error(
            "%s: %s was repaired %d times in %.0f s and changed again each time by %s: another "
            "program is fighting kproxy over it; not repairing it at once for %.0f s (the "
            "periodic verify still does)",
            fam.name,
            label(obj),
            self.limiter.limit,
            self.limiter.window,
            author,
            backoff,
        )
        self.observer.drift_backoff(_process_of(author))
        with self._lock_fights:
            self._fights = [f for f in self._fights if f[0] > time.monotonic() - FIGHTS_KEPT]
            self._fights.append((time.monotonic(), author))
        self.observer.node_event(
            "RulesFought",
            f"{fam.name} {fam.mode} rules: {label(obj)} keeps being changed by {author}; "
            f"kproxy backs off for {backoff:.0f} s",
        )

    def fought_by(self, within: float = FIGHTS_KEPT) -> list[str]:
        """Who fought kproxy over its rules (the limiter stepped in) in the last `within`
        seconds, each once: for the node check that looks for another proxy."""
        since = time.monotonic() - within
        with self._lock_fights:
            return sorted({who for at, who in self._fights if at > since})

    def missing_canaries(self) -> list[str]:
        """What the canary check of each family found missing. A check that fails says
        nothing is missing (it must not trigger repairs by itself): logged and counted."""
        missing = []
        for fam in self.families:
            try:
                missing.extend(fam.missing_canaries())
            except Exception as err:
                self._log_error("canary check failed", fam.name, err)
                self.observer.failed(fam.name, partial=False, reason=CANARY)
        return missing

    def _log_error(self, what: str, family: str, err: Exception) -> None:
        """One line on every occurrence; the traceback only the first time this error (type
        and message) is seen, so a retry every second does not flood the log."""
        key = (family, type(err).__name__, str(err))
        first = key not in self._tracebacks
        if first:
            if len(self._tracebacks) >= MAX_TRACEBACKS:
                self._tracebacks.clear()
            self._tracebacks.add(key)
        log.error(
            "%s %s: %s: %s", family, what, type(err).__name__, err, exc_info=err if first else None
        )


def _process_of(author: str) -> str:
    """ "iptables (pid 5122)" -> "iptables": the metrics' label (pids would make a series each)."""
    return author.split(" (pid ", 1)[0].split(", ", 1)[0] if author else ""
