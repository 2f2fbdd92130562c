"""`kproxy run`: the API source, the store, the reconciler, metrics and health, put together."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass

from kproxy import conntrack
from kproxy.backends.iptables import IptablesBackend, detect_variant
from kproxy.health import HealthServer, ProxyHealth, ServiceHealthServers
from kproxy.metrics import Metrics
from kproxy.model import NodeConfig
from kproxy.reconciler import (
    FamilyState,
    Reconciler,
    SyncReport,
    local_ready_endpoints,
    udp_service_ports,
)
from kproxy.render.iptables import IPV4, IPV6
from kproxy.sources.kube import KubeEvent, KubeSource
from kproxy.store import ObjectStore

log = logging.getLogger(__name__)


class DaemonObserver:
    """Turns the reconciler's reports into upstream's metrics and health state."""

    def __init__(self, metrics: Metrics, health: ProxyHealth, store: ObjectStore) -> None:
        self.metrics = metrics
        self.health = health
        self.store = store

    def queued(self) -> None:
        self.metrics.sync_proxy_rules_last_queued_timestamp_seconds.set(time.time())
        pending = self.store.pending()
        self.metrics.sync_proxy_rules_service_changes_pending.set(pending.service_events)
        self.metrics.sync_proxy_rules_endpoint_changes_pending.set(pending.endpoint_events)
        self.health.queued_update()

    def changes(self, service_events: int, endpoint_events: int) -> None:
        self.metrics.sync_proxy_rules_service_changes_total.inc(service_events)
        self.metrics.sync_proxy_rules_endpoint_changes_total.inc(endpoint_events)
        self.metrics.sync_proxy_rules_service_changes_pending.set(0)
        self.metrics.sync_proxy_rules_endpoint_changes_pending.set(0)

    def updated(self, family: str) -> None:
        self.health.updated(family)

    def synced(
        self,
        full: bool,
        seconds: float,
        lines_sent: dict[str, int],
        rules: dict[str, int],
        no_local: dict[str, int],
    ) -> None:
        m = self.metrics
        m.sync_done(seconds, full, when=time.time())
        for table, count in rules.items():
            m.sync_proxy_rules_iptables_total.labels(table=table).set(count)
        for table in rules:
            m.sync_proxy_rules_iptables_last.labels(table=table).set(lines_sent.get(table, 0))
        m.rules_last_payload_lines.set(sum(lines_sent.values()))
        for policy, count in no_local.items():
            m.sync_proxy_rules_no_local_endpoints_total.labels(traffic_policy=policy).set(count)
        if full:
            self.health.mark_ready()

    def failed(self, family: str, partial: bool) -> None:
        self.metrics.sync_proxy_rules_iptables_restore_failures_total.inc()
        if partial:
            self.metrics.sync_proxy_rules_iptables_partial_restore_failures_total.inc()
        self.metrics.sync_failures_total.labels(family=family).inc()

    def drift_repaired(self, reason: str) -> None:
        self.metrics.drift_repairs_total.labels(reason=reason).inc()

    def programming_latency(self, seconds: float) -> None:
        self.metrics.network_programming_duration_seconds.observe(seconds)


@dataclass
class DaemonOptions:
    node_name: str
    config: NodeConfig
    servers: list[str]
    kubeconfig: str | None
    backend: str = "auto"
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    canary_interval: float = 5.0
    metrics_bind: str = "127.0.0.1:10249"
    healthz_bind: str = "0.0.0.0:10256"
    conntrack: bool = True


class Daemon:
    def __init__(self, opts: DaemonOptions) -> None:
        self.opts = opts
        self.stop_event = threading.Event()
        self.store = ObjectStore(opts.node_name, warn=log.warning)
        self.metrics = Metrics()
        self.health = ProxyHealth(opts.sync_period)
        self.service_health = ServiceHealthServers(self.health)
        families = []
        for family in (IPV4, IPV6):
            variant = detect_variant(family.version) if opts.backend == "auto" else opts.backend
            families.append(FamilyState(family, IptablesBackend(family.version, variant)))
        self.reconciler = Reconciler(
            self.store,
            opts.config,
            families,
            min_sync_period=opts.min_sync_period,
            sync_period=opts.sync_period,
            canary_interval=opts.canary_interval,
            observer=DaemonObserver(self.metrics, self.health, self.store),
            after_sync=self._after_sync,
        )
        self.source = KubeSource(
            opts.servers or None,
            opts.kubeconfig,
            opts.node_name,
            on_event=self._on_event,
            on_resync=self._on_resync,
            metrics=self.metrics,
        )

    def _on_event(self, event: KubeEvent) -> None:
        if self.store.apply(event.kind, event.type, event.obj):
            self.reconciler.notify()
        if event.kind == "Node":
            self._update_node()

    def _on_resync(self, kind: str, items: list[dict]) -> None:
        if self.store.resync(kind, items):
            self.reconciler.notify()
        if kind == "Node":
            self._update_node()

    def _update_node(self) -> None:
        node = self.store.snapshot_node()
        self.health.set_node(node, tainted_for_deletion=bool(node and node.tainted_for_deletion))

    def _after_sync(self, report: SyncReport) -> None:
        self.service_health.sync(local_ready_endpoints(report.state, self.opts.config))
        if not (report.ok and self.opts.conntrack):
            return
        udp_changed = any(
            p.protocol == "UDP"
            for key in report.changes.services
            if (svc := report.state.services.get(key)) is not None
            for p in svc.ports
        )
        if not udp_changed:
            return
        for family in (IPV4, IPV6):
            ports = [
                conntrack.UdpServicePort(ips, port, node_port, endpoints)
                for ips, port, node_port, endpoints in udp_service_ports(report.state, family)
            ]
            af = socket.AF_INET if family.version == 4 else socket.AF_INET6
            deleted = conntrack.cleanup(ports, af, self.metrics)
            if deleted:
                log.info("removed %d stale UDP conntrack entries (IPv%d)", deleted, family.version)

    def run(self) -> int:
        opts = self.opts
        metrics_server = self.metrics.serve(opts.metrics_bind)
        health_server = HealthServer(self.health, opts.healthz_bind, metrics=self.metrics)
        health_server.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        log.info(
            "kproxy running on node %s: metrics on %s, health on %s",
            opts.node_name,
            opts.metrics_bind,
            opts.healthz_bind,
        )
        self.source.start()
        try:
            self.reconciler.run(self.stop_event, self.source.synced)
        finally:
            self.source.stop()
            self.service_health.stop()
            health_server.stop()
            metrics_server.stop()
        log.info("kproxy stopped; rules left in place")
        return 0
