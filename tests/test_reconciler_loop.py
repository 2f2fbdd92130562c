"""The reconciler's loop with stand-in families (no kernel): how often it verifies."""

from __future__ import annotations

import threading
import time

from kproxy.model import NodeConfig
from kproxy.modes import Outcome, Rendered
from kproxy.reconciler import Reconciler, verify_interval
from kproxy.store import ObjectStore


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
