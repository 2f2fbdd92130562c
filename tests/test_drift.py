"""Drift from events without a kernel (issue 16): which changes are kproxy's business, how a
repair is described, the limiter that ends a fight, and the reconciler's handling of foreign
transactions and lost events with a stand-in family."""

from __future__ import annotations

import logging
import os
import threading
import time

from kproxy.daemon.nfevents import Overflow, Transaction
from kproxy.daemon.reconciler import EVENTS_LOST, FOREIGN, Reconciler
from kproxy.drift import (
    Change,
    DriftScope,
    Repair,
    RepairLimiter,
    finding,
    summary,
)
from kproxy.iptables import repair as ipt_repair
from kproxy.mode import Outcome, Rendered
from kproxy.model import NodeConfig
from kproxy.nftables import repair as nft_repair
from kproxy.sources.store import ObjectStore


def test_iptables_scope_is_kproxys_chains_and_its_jumps_only():
    changes = [
        Change("delete", "rule", "ip", "nat", "KUBE-SERVICES"),
        Change("delete", "rule", "ip", "nat", "KUBE-SERVICES"),
        Change("add", "rule", "ip", "nat", "KUBE-SVC-ABC"),
        Change("delete", "rule", "ip", "nat", "PREROUTING", ("KUBE-SERVICES",)),
        Change("add", "rule", "ip", "filter", "KUBE-FIREWALL"),  # shared with the kubelet
        # Other tools' own chains, and their rules in built-in chains: not kproxy's business.
        Change("add", "rule", "ip", "nat", "DOCKER"),
        Change("add", "chain", "ip", "nat", "cali-PREROUTING"),
        Change("add", "rule", "ip", "nat", "PREROUTING", ("DOCKER",)),
        Change("delete", "rule", "ip", "nat", "POSTROUTING"),
        Change("add", "rule", "ip", "raw", "KUBE-SERVICES"),  # not a table kproxy writes
        Change("delete", "rule", "ip6", "nat", "KUBE-SERVICES"),  # the other family
        Change("delete", "rule", "inet", "kproxy", "services"),
    ]
    scope = ipt_repair.scope_of(changes, "ip")
    assert set(scope.objects) == {
        ("nat", "KUBE-SERVICES"),
        ("nat", "KUBE-SVC-ABC"),
        ("nat", "PREROUTING"),
        ("filter", "KUBE-FIREWALL"),
    }
    assert not scope.whole
    assert not ipt_repair.scope_of(changes[5:10], "ip")
    assert ipt_repair.scope_of([Change("delete", "table", "ip", "nat")], "ip").whole
    assert not ipt_repair.scope_of([Change("delete", "table", "ip", "raw")], "ip")


def test_nftables_scope_is_everything_in_the_kproxy_table_of_the_family():
    changes = [
        Change("delete", "rule", "ip", "kproxy", "services"),
        Change("delete", "element", "ip", "kproxy", "service-ips"),
        Change("add", "set", "ip", "kproxy", "__set3"),  # a rule's anonymous set
        Change("add", "set", "ip", "kproxy", "__map7"),  # an inline dispatch's anonymous map
        Change("add", "chain", "ip", "kproxy", "foo"),
        Change("delete", "rule", "ip6", "kproxy", "services"),
        Change("add", "rule", "ip", "calico", "cali-x"),
        Change("delete", "rule", "ip", "nat", "KUBE-SERVICES"),
    ]
    scope = nft_repair.scope_of(changes, "ip", "kproxy")
    assert set(scope.objects) == {("chain", "services"), ("set", "service-ips"), ("chain", "foo")}
    assert nft_repair.scope_of([Change("delete", "table", "ip", "kproxy")], "ip", "kproxy").whole
    assert not nft_repair.scope_of(changes[5:], "ip", "kproxy")
    # In kube-proxy's place kproxy's table is `kube-proxy`: `kproxy` is then another's.
    assert not nft_repair.scope_of(changes, "ip", "kube-proxy")
    moved = [Change(c.verb, c.kind, c.family, "kube-proxy", c.name) for c in changes[:5]]
    assert nft_repair.scope_of(moved, "ip", "kube-proxy").objects == scope.objects


def test_a_repair_is_summed_up_in_one_phrase():
    found = {("nat", f"KUBE-SEP-{i}"): "flushed" for i in range(5)}
    found[("nat", "PREROUTING")] = "jump to KUBE-SERVICES deleted"
    assert summary(found) == (
        "nat KUBE-SEP-0, nat KUBE-SEP-1, nat KUBE-SEP-2 and 2 more flushed; "
        "nat PREROUTING jump to KUBE-SERVICES deleted"
    )


def test_findings_say_what_happened():
    assert finding(["a", "b"], []) == "flushed"
    assert finding(["a", "b"], None) == "deleted"
    assert finding(["a", "b"], ["b"]) == "1 rule missing"
    assert finding(["a"], ["x", "a", "y"]) == "2 rules not kproxy's"
    assert finding(["a", "b"], ["b", "a"]) == "rules out of order"
    assert finding(None, ["x"]) == "not kproxy's: deleted"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_limiter_backs_off_a_fight_and_forgets_it_later():
    clock = Clock()
    lim = RepairLimiter(limit=3, window=60, backoff=60, max_backoff=240, clock=clock)
    key = ("IPv4", ("nat", "KUBE-SERVICES"))
    assert [lim.repaired(key) for _ in range(2)] == [None, None]
    clock.now += 61  # the first two are out of the window
    assert [lim.repaired(key) for _ in range(2)] == [None, None]
    assert lim.allowed(key)
    assert lim.repaired(key) == 60  # the third in a window: back off
    assert not lim.allowed(key) and lim.allowed(("IPv4", ("nat", "other")))
    clock.now += 61
    assert lim.allowed(key)
    assert [lim.repaired(key) for _ in range(3)] == [None, None, 120]  # the fight goes on
    clock.now += 121
    assert [lim.repaired(key) for _ in range(3)] == [None, None, 240]
    clock.now += 241 + 241  # quiet for longer than the longest backoff: forgiven
    assert [lim.repaired(key) for _ in range(3)] == [None, None, 60]


class DriftFamily:
    """A stand-in family: every foreign change to chain "X" is drift it repairs."""

    name = "IPv4"
    mode = "iptables"
    label = "stand-in"
    drift_events = True

    def __init__(self, record: bool = True) -> None:
        self.last = None
        self.verifies = 0
        self.repairs: list[set] = []
        self.record = record

    def sync_state(self, state, config, changed, verify):
        self.verifies += bool(verify)
        self.last = object()
        return Outcome(False, verify, "nothing"), Rendered(None, [], {}, {})

    def drift_scope(self, changes):
        scope = DriftScope()
        for c in changes:
            if c.name == "X" or c.kind == "table":
                scope.whole = c.kind == "table"
                scope.objects.add(("nat", c.name))
        return scope

    def repair(self, scope):
        if scope.whole or not self.record:
            return None
        self.repairs.append(set(scope.objects))
        return Repair({obj: "flushed" for obj in scope.objects}, 3)

    def missing_canaries(self):
        return []

    def forget(self):
        self.last = None


class Seen:
    def __init__(self) -> None:
        self.repaired: list[tuple[str, str]] = []
        self.backoffs: list[str] = []
        self.events: list[tuple[str, str]] = []

    def drift_repaired(self, reason: str, process: str = "") -> None:
        self.repaired.append((reason, process))

    def drift_backoff(self, process: str) -> None:
        self.backoffs.append(process)

    def node_event(self, reason: str, note: str) -> None:
        self.events.append((reason, note))

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def running(fam, seen) -> tuple[Reconciler, threading.Event, threading.Thread]:
    rec = Reconciler(
        ObjectStore("node-1"),
        NodeConfig(node_name="node-1"),
        [fam],
        min_sync_period=5.0,  # a repair is not held up by it
        sync_period=300.0,
        canary_interval=300.0,
        observer=seen,
    )
    stop, synced = threading.Event(), threading.Event()
    synced.set()
    loop = threading.Thread(target=rec.run, args=(stop, synced), daemon=True)
    loop.start()
    return rec, stop, loop


def wait(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def flush_x(pid: int, process: str = "iptables") -> Transaction:
    return Transaction(7, pid, process, [Change("delete", "rule", "ip", "nat", "X")])


def test_a_foreign_change_is_repaired_at_once_and_attributed(caplog):
    caplog.set_level(logging.INFO)
    fam, seen = DriftFamily(), Seen()
    rec, stop, loop = running(fam, seen)
    try:
        wait(lambda: fam.verifies == 1)  # the start
        rec.foreign_change(flush_x(999_999))  # no such task here: another process
        wait(lambda: fam.repairs)
        assert fam.repairs == [{("nat", "X")}]
        assert seen.repaired == [(FOREIGN, "iptables")]
        assert "nat X flushed by iptables (pid 999999); repaired in" in caplog.text
        assert seen.events[0][0] == "RulesRepaired" and "iptables (pid 999999)" in seen.events[0][1]
        # kproxy's own: a thread of this process committed it. Not repaired.
        rec.foreign_change(flush_x(threading.get_native_id()))
        rec.foreign_change(flush_x(os.getpid()))
        time.sleep(0.3)
        assert len(fam.repairs) == 1 and fam.verifies == 1
    finally:
        stop.set()
        rec.notify()
        loop.join(5)


def test_a_fight_is_backed_off_with_the_fighter_named(caplog):
    fam, seen = DriftFamily(), Seen()
    rec, stop, loop = running(fam, seen)
    try:
        wait(lambda: fam.verifies == 1)
        for n in range(1, rec.limiter.limit + 1):
            rec.foreign_change(flush_x(999_999, "firewall-cmd"))
            wait(lambda n=n: len(fam.repairs) == n)
        assert seen.backoffs == ["firewall-cmd"]
        assert rec.fought_by() == ["firewall-cmd (pid 999999)"]  # for the node checks
        assert rec.fought_by(within=0) == []
        assert "fighting kproxy" in caplog.text and "firewall-cmd (pid 999999)" in caplog.text
        assert any(reason == "RulesFought" for reason, _ in seen.events)
        rec.foreign_change(flush_x(999_999, "firewall-cmd"))
        time.sleep(0.3)
        assert len(fam.repairs) == rec.limiter.limit  # left to the periodic verify
    finally:
        stop.set()
        rec.notify()
        loop.join(5)


def test_a_deleted_table_or_no_record_or_lost_events_verify_everything():
    fam, seen = DriftFamily(record=False), Seen()
    rec, stop, loop = running(fam, seen)
    try:
        wait(lambda: fam.verifies == 1)
        rec.foreign_change(flush_x(999_999))
        wait(lambda: fam.verifies == 2)  # no record: verified whole, not held up 5 s
        rec.foreign_change(Overflow())
        wait(lambda: fam.verifies == 3)
        assert rec.repairs == 0
    finally:
        stop.set()
        rec.notify()
        loop.join(5)
    assert EVENTS_LOST == "events-lost"
