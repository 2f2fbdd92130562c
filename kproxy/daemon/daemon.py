"""`kproxy run`: the API source, the store, the reconciler, metrics and health, put together."""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kproxy import __version__, nodeinfo
from kproxy.daemon.cachewriter import CacheWriter
from kproxy.daemon.conntrack import ConntrackCleanup
from kproxy.daemon.driftwatch import DriftWatch
from kproxy.daemon.health import (
    HealthServer,
    ProxyHealth,
    ServiceHealthServers,
    local_ready_endpoints,
)
from kproxy.daemon.metrics import Metrics
from kproxy.daemon.nodecheck import NodeChecker, node_check_context
from kproxy.daemon.nodeevents import NodeEventPoster
from kproxy.daemon.reconciler import (
    APPLY,
    DRIFT_REASONS,
    UNEXPECTED,
    Reconciler,
    SyncReport,
    failure_labels,
)
from kproxy.families import modes_for, remove_other_mode
from kproxy.model import NodeConfig
from kproxy.recovery.lockfile import locked
from kproxy.recovery.restore import SnapshotStore
from kproxy.sources import cache
from kproxy.sources.kube import KubeEvent, KubeSource
from kproxy.sources.store import ObjectStore

log = logging.getLogger(__name__)


class DaemonObserver:
    """Turns the reconciler's reports into upstream's metrics and health state."""

    def __init__(
        self,
        metrics: Metrics,
        health: ProxyHealth,
        store: ObjectStore,
        events: NodeEventPoster | None = None,
    ) -> None:
        self.metrics = metrics
        self.health = health
        self.store = store
        self.events = events  # Events on the Node (drift repairs), posted in the background

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

    def failed(self, family: str, partial: bool, reason: str) -> None:
        if reason in (APPLY, UNEXPECTED):
            # Upstream counts every failed restore, the tool's refusal or its failure to run;
            # a failed canary check or post-sync step is no restore.
            self.metrics.sync_proxy_rules_iptables_restore_failures_total.inc()
            if partial:
                self.metrics.sync_proxy_rules_iptables_partial_restore_failures_total.inc()
        self.metrics.sync_failures_total.labels(family=family, reason=reason).inc()

    def drift_repaired(self, reason: str, process: str = "") -> None:
        self.metrics.drift_repairs_total.labels(reason=reason, process=process).inc()

    def drift_backoff(self, process: str) -> None:
        self.metrics.drift_backoffs_total.labels(process=process).inc()

    def node_event(self, reason: str, note: str) -> None:
        if self.events is not None:
            self.events.post(reason, note)

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
    # "" turns the server off (kube-proxy's `--healthz-bind-address ""`, `--healthz-port 0`);
    # a port 0 is an ephemeral port.
    metrics_bind: str = "127.0.0.1:10249"
    healthz_bind: str = "0.0.0.0:10256"
    # The client-side rate limit on requests to the API server (kube-proxy's
    # clientConnection.qps/burst); qps <= 0: none, kproxy's own default.
    api_qps: float = 0.0
    api_burst: int = 10
    conntrack: bool = True
    snapshot_dir: str | None = None
    snapshot_keep: int = 5
    state_cache: str | None = None
    state_cache_max_age: float = 3600.0
    api_wait: float = 10.0
    lock_file: str | None = None
    mode: str = "iptables"
    nft_datapath: str = "netlink"  # nftables mode: "netlink" or "nft"
    nft_table: str = "kproxy"  # nftables mode's table ("kube-proxy" in kube-proxy's place)
    # --nodeport-addresses as given (CIDRs, "primary"): resolved at every full sync; the node
    # IPs are config.node_ips (--node-ip) or else the watched Node's.
    nodeport_addresses: tuple[str, ...] = ()


class Daemon:
    def __init__(self, opts: DaemonOptions) -> None:
        self.opts = opts
        self.stop_event = threading.Event()
        self.store = ObjectStore(opts.node_name, warn=log.warning)
        self.metrics = Metrics()
        # The families this node can program (NoFamilyError when none): health tracks only
        # those, or a node without IPv6 would report an IPv6 "never updated" and be restarted
        # by its liveness probe over and over.
        families = modes_for(
            opts.mode, opts.backend, nft_datapath=opts.nft_datapath, nft_table=opts.nft_table
        )
        self.health = ProxyHealth(opts.sync_period, families=[fam.name for fam in families])
        self.service_health = ServiceHealthServers(self.health)
        self._other_mode_removed = False
        self.ready = threading.Event()  # the store holds a complete state (API or cache)
        self.from_cache = False
        self.snapshots = (
            SnapshotStore(Path(opts.snapshot_dir), opts.snapshot_keep)
            if opts.snapshot_dir
            else None
        )
        self.cache_writer = (
            CacheWriter(opts.state_cache, opts.node_name, self.metrics, opts.sync_period)
            if opts.state_cache
            else None
        )
        addresses = nodeinfo.NodeAddresses(opts.config.node_ips, opts.nodeport_addresses)
        self.conntrack = (
            ConntrackCleanup([fam.name for fam in families], opts.mode, self.metrics)
            if opts.conntrack
            else None
        )
        self.reconciler = Reconciler(
            self.store,
            opts.config,
            families,
            min_sync_period=opts.min_sync_period,
            sync_period=opts.sync_period,
            canary_interval=opts.canary_interval,
            observer=(observer := DaemonObserver(self.metrics, self.health, self.store)),
            after_sync=self._after_sync,
            lock=(lambda: locked(opts.lock_file, timeout=10, what="sync", command="kproxy run"))
            if opts.lock_file
            else None,
            configure=lambda state: addresses.config(opts.config, state.node),
        )
        self.metrics.info.labels(
            version=__version__,
            mode=opts.mode,
            backend=families[0].label,
            families=",".join(fam.name for fam in families),
        ).set(1)
        self.source = KubeSource(
            opts.servers or None,
            opts.kubeconfig,
            opts.node_name,
            on_event=self._on_event,
            on_resync=self._on_resync,
            metrics=self.metrics,
            # After a long outage the next attempt comes at most this long after the API server
            # is back, and the changes made meanwhile must land within a sync period (the
            # source's own 30s cap plus the relist and the sync overshot a 30s sync period).
            backoff_max=max(1.0, min(30.0, 0.8 * opts.sync_period)),
            qps=opts.api_qps,
            burst=opts.api_burst,
        )
        # Repairs of other processes' changes are posted as Events on this Node.
        self.events = NodeEventPoster(opts.node_name, self.source.api_client)
        observer.events = self.events
        self.drift_watch = DriftWatch(self.reconciler, families)
        self.node_checks = NodeChecker(
            node_check_context(opts, self.source.limiter, self.reconciler.fought_by),
            self.metrics,
            opts.sync_period,
            lambda: self.health.ready,
        )
        self.metrics.start_at_zero(
            tables=families[0].tables,
            failures=failure_labels([fam.name for fam in families]),
            drift_reasons=DRIFT_REASONS,
            resources=[res.kind for res in self.source.resources],
            addresses=self.source.servers,
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
        if self.conntrack is not None:
            # Before the early return: a failed or postponed sync still owes its cleanup.
            self.conntrack.after_sync(report)
        if not report.ok:
            return
        if self.cache_writer is not None and self.source.synced.is_set():
            # Only the API's state is cached: re-saving objects read from the cache (all of
            # them, or one kind while another is already listed) would make them look fresh.
            objects = self.store.api_objects()
            if objects is not None:
                self.cache_writer.submit(objects)
        if not self._other_mode_removed:
            # The first successful sync is in place: now the other mode's rules can go.
            remove_other_mode(self.opts.mode, self.opts.backend)
            self._other_mode_removed = True
            # What the first sync built (store, render caches) lives as long as the daemon:
            # moved out of the cyclic collector's reach, later collections stay cheap.
            gc.collect()
            gc.freeze()
        if report.full and self.snapshots is not None:
            self._snapshot()

    def _snapshot(self) -> None:
        families = {
            fam.name: rs
            for fam in self.reconciler.families
            if (rs := fam.owned_ruleset()) is not None
        }
        if not families:
            return  # nftables mode: its table is not snapshotted (yet)
        backend = self.reconciler.families[0].label
        try:
            path = self.snapshots.save(families, self.opts.node_name, backend)
        except OSError as err:
            log.warning(
                "could not write a snapshot in %s: %s",
                self.snapshots.directory,
                err.strerror or err,
            )
            self.metrics.snapshot_failures_total.inc()
            return
        self.metrics.last_snapshot_timestamp_seconds.set(time.time())
        if path is not None:
            log.info("snapshot written: %s", path)

    def _wait_for_state(self) -> None:
        """Until the API source has listed everything; if it cannot within --api-wait, start
        from the last-known-good cache instead of waiting forever (upstream waits). The cache
        fills only the kinds not listed yet: a listed kind is the API's, and its watch goes on
        from the list, so an older cached object put in its place would stay."""
        if self.source.synced.wait(self.opts.api_wait) or self.stop_event.is_set():
            self.ready.set()
            return
        if self.opts.state_cache:
            try:
                cached = cache.fallback(self.opts.state_cache, self.opts.state_cache_max_age)
            except cache.CacheUnusable as err:
                log.warning(
                    "API server not listed after %.0fs and no usable state cache (%s); "
                    "waiting for the API server, rules left as they are",
                    self.opts.api_wait,
                    err,
                )
            else:
                self._start_from_cache(cached)
        # Left once every kind the cache filled is listed too (the Node may come after the
        # two lists `synced` waits for); until then the state is not the API's alone.
        while not (self.source.synced.wait(0.5) and not self.store.cached_kinds()):
            # Listed but a cached kind left: synced.wait no longer waits, this does.
            if self.stop_event.wait(0.5 if self.source.synced.is_set() else 0):
                return
        if self.from_cache:
            log.info("API server listed: leaving the state cache")
            # A full sync now checks the kernel against the API's state and snapshots it.
            self.reconciler.request_verify("api-back")
            self.from_cache = False
            self.health.set_state_cache_age(None)
            self.metrics.state_cache_age_seconds.set(0)
            self.metrics.running_from_state_cache.set(0)
        self.ready.set()

    def _start_from_cache(self, cached: cache.CachedState) -> None:
        by_kind: dict[str, list[dict]] = {"Service": [], "EndpointSlice": [], "Node": []}
        for obj in cached.objects:
            if isinstance(obj, dict) and obj.get("kind") in by_kind:
                by_kind[obj["kind"]].append(obj)
        for kind, items in by_kind.items():
            self.store.seed(kind, items)  # refused for a kind the API has listed
        kinds = self.store.cached_kinds()
        if not kinds:
            return  # listed meanwhile, or nothing cached for what is missing: wait on
        self._update_node()
        age = cached.age()
        log.warning(
            "API server not listed after %.0fs: programming the rules from the state cache "
            "%s, saved %.0fs ago%s, for what is not listed yet (%s); still watching the API "
            "server",
            self.opts.api_wait,
            self.opts.state_cache,
            age,
            " (older than --state-cache-max-age)" if cached.stale else "",
            ", ".join(sorted(kinds)),
        )
        self.from_cache = True
        self.health.set_state_cache_age(age)
        self.metrics.state_cache_age_seconds.set(age)
        self.metrics.running_from_state_cache.set(1)
        self.ready.set()

    def run(self) -> int:
        opts = self.opts
        # An empty address turns that server off, as kube-proxy's "Set empty to disable"; the
        # Services' health check node ports are servers of their own and stay.
        metrics_server = health_server = None
        if opts.metrics_bind:
            try:
                metrics_server = self.metrics.serve(opts.metrics_bind)
            except OSError as err:
                log.error("cannot serve /metrics on %s: %s", opts.metrics_bind, err.strerror or err)
                return 2
        else:
            log.info("metrics server off (--metrics-bind-address is empty): no /metrics")
        if opts.healthz_bind:
            health_server = HealthServer(self.health, opts.healthz_bind, metrics=self.metrics)
            try:
                health_server.start()
            except OSError as err:
                if metrics_server is not None:
                    metrics_server.stop()
                log.error("cannot serve /healthz on %s: %s", opts.healthz_bind, err.strerror or err)
                return 2
        else:
            log.info(
                "health server off (--healthz-bind-address is empty): no /healthz, /livez, "
                "/readyz; Services' health check node ports are still served"
            )
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        log.info(
            "kproxy running on node %s (%s, %s): metrics on %s, health on %s",
            opts.node_name,
            f"{opts.mode} mode" + (f", table {opts.nft_table}" if opts.mode == "nftables" else ""),
            " and ".join(fam.name for fam in self.reconciler.families),
            opts.metrics_bind or "off",
            opts.healthz_bind or "off",
        )
        self.source.start()
        self.drift_watch.start()
        self.node_checks.start()
        waiter = threading.Thread(target=self._wait_for_state, name="wait-for-state", daemon=True)
        waiter.start()
        try:
            self.reconciler.run(self.stop_event, self.ready)
        finally:
            self.node_checks.stop()
            self.drift_watch.stop()
            self.events.stop()
            self.source.stop()
            if self.cache_writer is not None:
                self.cache_writer.stop()
            self.service_health.stop()
            if health_server is not None:
                health_server.stop()
            if metrics_server is not None:
                metrics_server.stop()
        log.info("kproxy stopped; rules left in place")
        return 0
