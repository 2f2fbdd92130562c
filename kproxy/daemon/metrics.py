"""Prometheus metrics under upstream kube-proxy's names, plus kproxy's own.

Names, types, labels and buckets follow upstream `pkg/proxy/metrics/metrics.go` (subsystem
`kubeproxy`), so existing kube-proxy dashboards and alerts keep working; kproxy's additions
carry the `kproxy_` prefix. Every `Metrics` owns its own `CollectorRegistry` instead of the
process-global one, so tests (and a daemon that restarts a component) can make several.

prometheus-client appends `_total` to a Counter's name itself: counters are declared without it.
"""

from __future__ import annotations

import ipaddress
import threading
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

SUBSYSTEM = "kubeproxy"
# Label values known before anything happened (Metrics.start_at_zero): the codes the health
# endpoints answer, the two traffic policies, the verbs the API source uses.
HEALTH_CODES = ("200", "503")
TRAFFIC_POLICIES = ("internal", "external")
API_VERBS = ("LIST", "WATCH")
DEFAULT_METRICS_BIND = "127.0.0.1:10249"

# prometheus.ExponentialBuckets(0.001, 2, 15): 1 ms .. 16.384 s.
SYNC_BUCKETS: tuple[float, ...] = tuple(0.001 * 2**i for i in range(15))


def _linear(start: float, width: float, count: int) -> list[float]:
    return [start + width * i for i in range(count)]


# upstream merge(LinearBuckets(0.25, 0.25, 2), LinearBuckets(1, 1, 59),
# LinearBuckets(60, 5, 12), LinearBuckets(120, 30, 7)); its merge() also starts the list
# with a 0 bucket (make([]float64, 1)), kept here so the exposed `le` values are identical.
NETWORK_PROGRAMMING_BUCKETS: tuple[float, ...] = tuple(
    [0.0] + _linear(0.25, 0.25, 2) + _linear(1, 1, 59) + _linear(60, 5, 12) + _linear(120, 30, 7)
)


def split_host_port(bind: str, default_port: int) -> tuple[str, int]:
    """ "host:port", "[v6]:port", "host" or ":port" -> (host, port); raises ValueError."""
    bind = bind.strip()
    if bind.startswith("["):
        host, sep, rest = bind[1:].partition("]")
        if not sep:
            raise ValueError(f"{bind!r}: unbalanced [")
        port_text = rest[1:] if rest.startswith(":") else rest
    elif bind.count(":") == 1:
        host, _, port_text = bind.partition(":")
    else:  # "host" alone, or a bare IPv6 address
        host, port_text = bind, ""
    host = host or "0.0.0.0"
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{bind!r}: {host!r} is not an IP address") from None
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{bind!r}: {port_text!r} is not a port number")
    return host, int(port_text)


@dataclass
class MetricsServer:
    """The running /metrics endpoint: `port` is the bound one (useful with port 0)."""

    server: WSGIServer
    thread: threading.Thread
    host: str
    port: int
    _stopped: bool = field(default=False, repr=False)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    __call__ = stop  # "returns something to shut it down": calling it works too


class Metrics:
    """All of kproxy's metrics in one private registry; attributes are the collectors."""

    def __init__(self, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if process_metrics:
            # process_cpu_seconds_total, process_resident_memory_bytes, python_info...:
            # upstream exposes the Go equivalents from its legacy registry.
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

        def hist(name: str, doc: str, buckets: tuple[float, ...], labels=()) -> Histogram:
            return Histogram(name, doc, labels, subsystem=SUBSYSTEM, buckets=buckets, registry=r)

        def gauge(name: str, doc: str, labels=(), subsystem: str = SUBSYSTEM) -> Gauge:
            return Gauge(name, doc, labels, subsystem=subsystem, registry=r)

        def counter(name: str, doc: str, labels=(), subsystem: str = SUBSYSTEM) -> Counter:
            return Counter(name, doc, labels, subsystem=subsystem, registry=r)

        # -- sync loop (upstream names)
        self.sync_proxy_rules_duration_seconds = hist(
            "sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds", SYNC_BUCKETS
        )
        self.sync_full_proxy_rules_duration_seconds = hist(
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            SYNC_BUCKETS,
        )
        self.sync_partial_proxy_rules_duration_seconds = hist(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            SYNC_BUCKETS,
        )
        self.network_programming_duration_seconds = hist(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            NETWORK_PROGRAMMING_BUCKETS,
        )
        self.sync_proxy_rules_last_timestamp_seconds = gauge(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
        )
        self.sync_proxy_rules_last_queued_timestamp_seconds = gauge(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
        )
        self.sync_proxy_rules_endpoint_changes_total = counter(
            "sync_proxy_rules_endpoint_changes", "Cumulative proxy rules Endpoint changes"
        )
        self.sync_proxy_rules_endpoint_changes_pending = gauge(
            "sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes"
        )
        self.sync_proxy_rules_service_changes_total = counter(
            "sync_proxy_rules_service_changes", "Cumulative proxy rules Service changes"
        )
        self.sync_proxy_rules_service_changes_pending = gauge(
            "sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes"
        )
        self.sync_proxy_rules_iptables_total = gauge(
            "sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by kube-proxy",
            ("table",),
        )
        self.sync_proxy_rules_iptables_last = gauge(
            "sync_proxy_rules_iptables_last",
            "Number of iptables rules written by kube-proxy in last sync",
            ("table",),
        )
        self.sync_proxy_rules_iptables_restore_failures_total = counter(
            "sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy iptables restore failures",
        )
        self.sync_proxy_rules_iptables_partial_restore_failures_total = counter(
            "sync_proxy_rules_iptables_partial_restore_failures",
            "Cumulative proxy iptables partial restore failures",
        )
        self.sync_proxy_rules_no_local_endpoints_total = gauge(
            "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            ("traffic_policy",),
        )
        # -- health (upstream names)
        self.proxy_healthz_total = counter(
            "proxy_healthz", "Cumulative proxy healthz HTTP status", ("code",)
        )
        self.proxy_livez_total = counter(
            "proxy_livez", "Cumulative proxy livez HTTP status", ("code",)
        )
        # -- conntrack reconciler (upstream names; buckets as the sync histograms)
        self.conntrack_reconciler_sync_duration_seconds = hist(
            "conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds",
            SYNC_BUCKETS,
        )
        self.conntrack_reconciler_deleted_entries_total = counter(
            "conntrack_reconciler_deleted_entries",
            "Cumulative conntrack flows deleted by conntrack reconciler",
        )
        # -- API client (client-go's name, no subsystem)
        self.rest_client_requests_total = counter(
            "rest_client_requests",
            "Number of HTTP requests, partitioned by status code and verb",
            ("code", "verb"),
            subsystem="",
        )
        # -- kproxy's own
        self.drift_repairs_total = counter(
            "kproxy_drift_repairs",
            "Repairs of rules changed behind kproxy's back, by how the change was found and, "
            "for a foreign-change, the process that made it",
            ("reason", "process"),
            subsystem="",
        )
        self.drift_backoffs_total = counter(
            "kproxy_drift_backoffs",
            "Times kproxy stopped repairing a chain or map at once because the same process "
            "kept changing it (a fight; the periodic verify still repairs)",
            ("process",),
            subsystem="",
        )
        self.apiserver_reachable = gauge(
            "kproxy_apiserver_reachable",
            "1 when the API server at this address answered the last request, else 0",
            ("address",),
            subsystem="",
        )
        self.watch_restarts_total = counter(
            "kproxy_watch_restarts",
            "Watches restarted (error, expiry, 410 Gone relist)",
            ("resource",),
            subsystem="",
        )
        self.rules_last_payload_lines = gauge(
            "kproxy_rules_last_payload_lines",
            "Lines sent to iptables-restore / nft in the last apply",
            subsystem="",
        )
        self.state_cache_age_seconds = gauge(
            "kproxy_state_cache_age_seconds",
            "Age of the last-known-good state the rules were programmed from; 0 while the "
            "API server's state is in use",
            subsystem="",
        )
        self.running_from_state_cache = gauge(
            "kproxy_running_from_state_cache",
            "1 while the rules come from the state cache because the API server was unreachable",
            subsystem="",
        )
        self.last_snapshot_timestamp_seconds = gauge(
            "kproxy_last_snapshot_timestamp_seconds",
            "When the daemon last wrote (or confirmed) a snapshot of its rules",
            subsystem="",
        )
        self.info = gauge(
            "kproxy_info",
            "1, labelled with kproxy's version, its mode, the rules' backend "
            "(iptables-nft, iptables-legacy or nftables) and the IP families it programs "
            "(IPv4,IPv6; one alone on a single-stack node)",
            ("version", "mode", "backend", "families"),
            subsystem="",
        )
        self.snapshot_failures_total = counter(
            "kproxy_snapshot_failures",
            "Snapshots of the rules that could not be written (the previous one is intact)",
            subsystem="",
        )
        self.state_cache_failures_total = counter(
            "kproxy_state_cache_failures",
            "State cache writes that failed (the previous cache is intact)",
            subsystem="",
        )
        self.sync_failures_total = counter(
            "kproxy_sync_failures",
            "Failed syncs, per IP family (all: none in particular) and reason: apply (the "
            "tool refused the change), unexpected (any other error), canary (the canary "
            "check failed), after-sync (the work after an apply failed)",
            ("family", "reason"),
            subsystem="",
        )
        self.node_check = gauge(
            "kproxy_node_check",
            "1 for the current status (ok, warn, fail, skipped) of each of `kproxy doctor`'s "
            "checks of this node, run at start and every sync period; 0 for the others",
            ("check", "status"),
            subsystem="",
        )

    def start_at_zero(
        self,
        *,
        tables: tuple[str, ...],
        failures: list[tuple[str, str]],
        drift_reasons: tuple[str, ...],
        resources: list[str],
        addresses: list[str],
    ) -> None:
        """Create every labelled series whose label values are known at start, at 0.

        A labelled series otherwise appears at its first use: until then a dashboard panel is
        empty, and an alert's increase() misses that first event (a series born at 1 has
        increased by nothing). `failures`: the (family, reason) pairs of kproxy_sync_failures;
        `resources`: the watched kinds; `addresses`: the API servers, unreachable until one
        answers (upstream's own labelled metrics are created here too)."""
        for table in tables:
            self.sync_proxy_rules_iptables_total.labels(table=table)
            self.sync_proxy_rules_iptables_last.labels(table=table)
        for policy in TRAFFIC_POLICIES:
            self.sync_proxy_rules_no_local_endpoints_total.labels(traffic_policy=policy)
        for code in HEALTH_CODES:
            self.proxy_healthz_total.labels(code=code)
            self.proxy_livez_total.labels(code=code)
        for verb in API_VERBS:
            self.rest_client_requests_total.labels(code="200", verb=verb)
        for family, reason in failures:
            self.sync_failures_total.labels(family=family, reason=reason)
        for reason in drift_reasons:
            self.drift_repairs_total.labels(reason=reason, process="")
        # The fighting process is known only when it fights: a series without one shows the
        # alert and the panel that the counter is there.
        self.drift_backoffs_total.labels(process="")
        for resource in resources:
            self.watch_restarts_total.labels(resource=resource)
        for address in addresses:
            self.apiserver_reachable.labels(address=address)

    # -- helpers for the callers that only report an event

    def request(self, verb: str, code: int | str) -> None:
        """One API request done (code "<error>" when no HTTP status came back)."""
        self.rest_client_requests_total.labels(code=str(code), verb=verb.upper()).inc()

    def watch_restart(self, resource: str) -> None:
        self.watch_restarts_total.labels(resource=resource).inc()

    def reachable(self, address: str, up: bool) -> None:
        self.apiserver_reachable.labels(address=address).set(1 if up else 0)

    def healthz(self, code: int) -> None:
        self.proxy_healthz_total.labels(code=str(code)).inc()

    def livez(self, code: int) -> None:
        self.proxy_livez_total.labels(code=str(code)).inc()

    def conntrack_reconciled(self, seconds: float, deleted: int) -> None:
        self.conntrack_reconciler_sync_duration_seconds.observe(seconds)
        if deleted:
            self.conntrack_reconciler_deleted_entries_total.inc(deleted)

    def sync_done(self, seconds: float, full: bool, when: float | None = None) -> None:
        """A successful sync: both duration histograms and, with `when`, the timestamp."""
        self.sync_proxy_rules_duration_seconds.observe(seconds)
        if full:
            self.sync_full_proxy_rules_duration_seconds.observe(seconds)
        else:
            self.sync_partial_proxy_rules_duration_seconds.observe(seconds)
        if when is not None:
            self.sync_proxy_rules_last_timestamp_seconds.set(when)

    def serve(self, bind: str = DEFAULT_METRICS_BIND) -> MetricsServer:
        """Serve this registry on http://bind/metrics from a daemon thread."""
        host, port = split_host_port(bind, 10249)
        server, thread = start_http_server(port, host, registry=self.registry)
        return MetricsServer(server, thread, host, server.server_address[1])
