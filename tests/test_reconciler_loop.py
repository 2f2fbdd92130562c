"""The reconciler's loop with stand-in families (no kernel): how often it verifies."""

from __future__ import annotations

import threading
import time

from kproxy.daemon.reconciler import Reconciler, verify_interval
from kproxy.mode import Outcome, Rendered
from kproxy.model import NodeConfig
from kproxy.sources.store import ObjectStore


class SlowVerifyFamily:
    """A family whose verify (a full sync that reads the kernel) takes `cost` seconds."""

    name = "IPv4"
    label = "stand-in"

    def __init__(self, cost: float) -> None:
        self.cost = cost
        self.last = None
        self.verifies: list[float] = []

    def sync_state(self, state, config, changed, verify):
        if verify:
            self.verifies.append(time.monotonic())
            time.sleep(self.cost)
        self.last = object()
        return Outcome(False, verify, "nothing"), Rendered(None, [], {}, {})

    def missing_canaries(self) -> list[str]:
        return []

    def forget(self) -> None:
        self.last = None


def test_verify_interval_keeps_the_verify_share_bounded():
    assert verify_interval(30.0, 0.05) == 30.0  # small cluster: every sync period
    assert verify_interval(30.0, 9.6) == 96.0  # iptables at 10k Services
    assert verify_interval(30.0, 52.0) == 520.0  # nftables at 10k Services


def test_slow_verify_is_not_run_back_to_back():
    """A verify costing 0.3 s with a 0.1 s sync period: the loop must not verify continuously
    (it would every 0.1 s + 0.3 s without the bound), but every ~3 s."""
    fam = SlowVerifyFamily(0.3)
    rec = Reconciler(
        ObjectStore("node-1"),
        NodeConfig(node_name="node-1"),
        [fam],
        min_sync_period=0.0,
        sync_period=0.1,
        canary_interval=60.0,
    )
    stop, synced = threading.Event(), threading.Event()
    synced.set()
    loop = threading.Thread(target=rec.run, args=(stop, synced), daemon=True)
    loop.start()
    time.sleep(4.0)
    stop.set()
    rec.notify()
    loop.join(5)
    # The start verify, then one ~3 s later; a loop without the bound makes about ten.
    assert 2 <= len(fam.verifies) <= 3, fam.verifies
    gaps = [b - a for a, b in zip(fam.verifies, fam.verifies[1:], strict=False)]
    assert all(g >= 2.9 for g in gaps), gaps


class RecordingFamily(SlowVerifyFamily):
    """Records what each sync was asked to render: (changed Services or None, config)."""

    def __init__(self) -> None:
        super().__init__(0.0)
        self.calls: list[tuple[set | None, NodeConfig]] = []

    def sync_state(self, state, config, changed, verify):
        self.calls.append((None if changed is None else set(changed), config))
        return super().sync_state(state, config, changed, verify)


def test_node_addresses_are_read_at_full_syncs_and_a_change_renders_everything():
    store = ObjectStore("node-1")
    addresses = ["192.168.1.10"]
    asked: list[int] = []

    def configure(state):
        asked.append(1)
        return NodeConfig(node_name="node-1", nodeport_ips=tuple(addresses))

    fam = RecordingFamily()
    rec = Reconciler(store, NodeConfig(node_name="node-1"), [fam], configure=configure)
    svc = {
        "kind": "Service",
        "metadata": {"namespace": "default", "name": "web"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
    }
    store.apply("Service", "ADDED", svc)
    assert rec.sync("start").config.nodeport_ips == ("192.168.1.10",)
    assert len(asked) == 1

    # A Service change: a partial sync, the addresses are not read again.
    svc["spec"]["ports"][0]["port"] = 81
    store.apply("Service", "MODIFIED", svc)
    rec.sync(None)
    assert len(asked) == 1 and fam.calls[-1][0] == {("default", "web")}

    # A new address seen by the periodic verify: used at once, for every Service.
    addresses.append("192.168.1.11")
    rec.sync("periodic")
    assert len(asked) == 2 and fam.calls[-1][1].nodeport_ips == ("192.168.1.10", "192.168.1.11")

    # The Node changing is a full render too, and reads the addresses again: with a Service
    # change in the same sync, everything is rendered, not only that Service.
    store.apply("Node", "ADDED", {"kind": "Node", "metadata": {"name": "node-1"}})
    store.apply("Service", "MODIFIED", {**svc, "spec": {**svc["spec"], "clusterIP": "10.96.0.11"}})
    rec.sync(None)
    assert len(asked) == 3 and fam.calls[-1][0] is None


# --------------------------------------------------------------------------- unexpected errors


class FlakyFamily:
    """A family whose syncs raise the queued errors, one per attempt, then succeed; its canary
    check raises `canary_errors` the same way, then reports `missing` once."""

    name = "IPv4"
    label = "stand-in"

    def __init__(self, errors=(), canary_errors=(), missing=()) -> None:
        self.errors = list(errors)
        self.canary_errors = list(canary_errors)
        self.missing = list(missing)
        self.last = None
        self.attempts: list[tuple[float, bool]] = []  # (when, verify)
        self.canary_checks = 0
        self.synced = threading.Event()

    def sync_state(self, state, config, changed, verify):
        self.attempts.append((time.monotonic(), verify))
        if self.errors:
            raise self.errors.pop(0)
        self.last = object()
        self.synced.set()
        return Outcome(False, verify, "nothing"), Rendered(None, [], {}, {})

    def missing_canaries(self) -> list[str]:
        self.canary_checks += 1
        if self.canary_errors:
            raise self.canary_errors.pop(0)
        missing, self.missing = self.missing, []
        return missing

    def forget(self) -> None:
        self.last = None


class Failures:
    """An observer recording the failures the reconciler reports."""

    def __init__(self) -> None:
        self.failed_calls: list[tuple[str, str]] = []  # (family, reason)
        self.repairs: list[str] = []
        self.successes = 0  # syncs reported done

    def synced(self, *args) -> None:
        self.successes += 1

    def failed(self, family: str, partial: bool, reason: str = "?") -> None:
        self.failed_calls.append((family, reason))

    def drift_repaired(self, reason: str, process: str = "") -> None:
        self.repairs.append(reason)

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def reconciler(fam, **periods) -> Reconciler:
    """A reconciler of the one stand-in family, syncing as soon as it is asked to."""
    return Reconciler(
        ObjectStore("node-1"), NodeConfig(node_name="node-1"), [fam], min_sync_period=0.0, **periods
    )


def run_loop(rec: Reconciler) -> tuple[threading.Thread, threading.Event]:
    stop, synced = threading.Event(), threading.Event()
    synced.set()
    loop = threading.Thread(target=rec.run, args=(stop, synced), daemon=True)
    loop.start()
    return loop, stop


def stop_loop(rec: Reconciler, loop: threading.Thread, stop: threading.Event) -> None:
    stop.set()
    rec.notify()
    loop.join(10)


def wait_until(what: str, check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_unexpected_sync_errors_are_counted_backed_off_and_survived(caplog):
    """A missing binary, a netlink error or any other exception from one family's sync must
    not end the daemon: each is logged (its traceback once), counted with its reason, retried
    with backoff, and the loop syncs once the error stops."""
    from kproxy.iptables.restore import IptablesError

    missing = FileNotFoundError(2, "No such file or directory", "iptables-nft-restore")
    fam = FlakyFamily(
        errors=[
            IptablesError("iptables-nft-restore failed: line 3 failed"),
            missing,
            FileNotFoundError(2, "No such file or directory", "iptables-nft-restore"),
            OSError(105, "No buffer space available"),  # ENOBUFS from a netlink socket
            RuntimeError("something nobody expected"),
        ]
    )
    observer = Failures()
    rec = reconciler(fam, sync_period=0.5, canary_interval=60.0, observer=observer)
    loop, stop = run_loop(rec)
    try:
        assert fam.synced.wait(30), "the loop never synced after the errors stopped"
        assert loop.is_alive(), "the loop ended on an unexpected error"
        wait_until("the sync reported done", lambda: observer.successes > 0)
    finally:
        stop_loop(rec, loop, stop)
    assert observer.failed_calls == [("IPv4", "apply")] + [("IPv4", "unexpected")] * 4
    # Retried with backoff (1 s, then capped at the sync period), each retry a verify.
    times = [t for t, _ in fam.attempts]
    gaps = [b - a for a, b in zip(times, times[1:5], strict=False)]
    assert gaps[0] >= 0.95 and all(g >= 0.45 for g in gaps), gaps
    assert all(verify for _, verify in fam.attempts[:6])
    # A traceback per distinct error: the same missing binary twice logs one.
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert sorted(type(r.exc_info[1]).__name__ for r in tracebacks) == [
        "FileNotFoundError",
        "OSError",
        "RuntimeError",
    ]
    assert sum("iptables-nft-restore" in r.getMessage() for r in caplog.records) >= 3


def test_an_error_in_the_canary_check_is_counted_and_survived(caplog):
    fam = FlakyFamily(
        canary_errors=[FileNotFoundError(2, "No such file or directory", "iptables-nft")] * 3,
        missing=["IPv4 nat"],
    )
    observer = Failures()
    rec = reconciler(fam, sync_period=60.0, canary_interval=0.05, observer=observer)
    loop, stop = run_loop(rec)
    try:
        # After three failing checks, one reports a flush: the repair follows.
        wait_until("the flush repaired", lambda: len(fam.attempts) >= 2)
        assert loop.is_alive(), "the loop ended on an error of the canary check"
    finally:
        stop_loop(rec, loop, stop)
    assert observer.failed_calls == [("IPv4", "canary")] * 3
    assert fam.attempts[1][1] is True  # the repair reads the kernel
    assert len([r for r in caplog.records if r.exc_info]) == 1


def test_notify_is_not_blocked_while_the_canary_check_runs():
    """The canary check runs iptables/nft subprocesses: the watch threads' notify() must not
    wait for them (it used to, the check ran under the loop's condition lock)."""
    checking, release = threading.Event(), threading.Event()

    class BlockingCanaries(FlakyFamily):
        def missing_canaries(self) -> list[str]:
            checking.set()
            release.wait(30)
            return []

    fam = BlockingCanaries()
    rec = reconciler(fam, sync_period=60.0, canary_interval=0.05)
    loop, stop = run_loop(rec)
    try:
        assert checking.wait(30), "no canary check ran"
        notifier = threading.Thread(target=rec.notify, daemon=True)
        notifier.start()
        notifier.join(5)
        assert not notifier.is_alive(), "notify() blocked while the canary check ran"
        # The change it announced is synced once the check is done.
        synced = rec.syncs
        release.set()
        wait_until("the notified sync", lambda: rec.syncs > synced)
    finally:
        release.set()
        stop_loop(rec, loop, stop)


def test_a_stop_ends_the_loop_at_once_whatever_its_intervals():
    """SIGTERM sets the daemon's stop event from a signal handler (a changed --config, from
    another thread): the loop, asleep until its next deadline (here a 60 s canary interval
    and a 300 s sync period), ends at once, not a minute later (a pod's termination would
    run out its grace period and be killed)."""
    rec = Reconciler(
        ObjectStore("node-1"),
        NodeConfig(node_name="node-1"),
        [SlowVerifyFamily(0.0)],
        sync_period=300.0,
        canary_interval=60.0,
    )
    stop, synced = threading.Event(), threading.Event()
    synced.set()
    loop = threading.Thread(target=rec.run, args=(stop, synced), daemon=True)
    loop.start()
    time.sleep(0.5)  # past the start sync, asleep
    stop.set()  # and nothing else: no notify
    loop.join(20)  # a generous bound, a third of the canary interval
    assert not loop.is_alive()
