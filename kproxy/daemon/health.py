"""Proxy health (/healthz, /livez, /readyz) and per-Service health check node ports.

Semantics are upstream kube-proxy's (`pkg/proxy/healthcheck`): the proxy is unhealthy only
when an update was queued and no successful sync followed within 2 x the sync period, so an
idle proxy stays healthy; /healthz additionally needs the node to be eligible (exists, not
being deleted, not tainted for deletion by the cluster autoscaler), which lets load balancers
drain a node before it goes away while /livez keeps the process alive.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kproxy.daemon.metrics import Metrics, split_host_port
from kproxy.model import ClusterState, Node, NodeConfig

log = logging.getLogger(__name__)

DEFAULT_HEALTHZ_BIND = "0.0.0.0:10256"
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"
FAMILIES = ("IPv4", "IPv6")


def rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    stamp = datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


class ProxyHealth:
    """Thread-safe health state shared by the sync loop and the HTTP handlers.

    `clock` (monotonic seconds) measures the timeout; `wall_clock` only stamps the JSON.
    Calls without `family` apply to every family: a Service change queues work for both.
    """

    def __init__(
        self,
        sync_period: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        families: Iterable[str] = FAMILIES,
    ) -> None:
        self.timeout = 2 * sync_period  # upstream healthTimeout (cmd/kube-proxy server.go)
        self._clock = clock
        self._wall = wall_clock
        self._families = list(families)
        self._lock = threading.Lock()
        self._pending: dict[str, float] = {}  # family -> oldest queued, not yet synced
        self._last_updated: dict[str, float] = {}  # family -> wall time of last success
        # Eligible until a Node event says otherwise, as upstream: a proxy starting before
        # its node informer synced must not fail the load balancer's probes.
        self._node_eligible = True
        self._ready = False
        self._state_cache_age: float | None = None

    def _which(self, family: str | None) -> list[str]:
        if family is None:
            return self._families
        if family not in self._families:
            self._families.append(family)
        return [family]

    def queued_update(self, family: str | None = None) -> None:
        """A change arrived that the rules do not reflect yet."""
        now = self._clock()
        with self._lock:
            for fam in self._which(family):
                self._pending.setdefault(fam, now)  # keep the oldest

    def updated(self, family: str | None = None) -> None:
        """The rules (of `family`) were applied successfully."""
        wall = self._wall()
        with self._lock:
            for fam in self._which(family):
                self._pending.pop(fam, None)
                self._last_updated[fam] = wall

    def set_node(self, node: Node | None, tainted_for_deletion: bool = False) -> None:
        """This node's Node object (None: deleted). `tainted_for_deletion`: it carries the
        ToBeDeletedByClusterAutoscaler taint (model.Node has no taints field yet)."""
        eligible = node is not None and not node.deleting and not tainted_for_deletion
        with self._lock:
            self._node_eligible = eligible

    def mark_ready(self) -> None:
        """The first full sync is done."""
        with self._lock:
            self._ready = True

    def set_state_cache_age(self, seconds: float | None) -> None:
        """Age of the last-known-good state the rules came from (None: live API data)."""
        with self._lock:
            self._state_cache_age = seconds

    @property
    def node_eligible(self) -> bool:
        with self._lock:
            return self._node_eligible

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._ready

    def _family_healthy(self, family: str, now: float) -> bool:
        queued = self._pending.get(family)
        return queued is None or now - queued < self.timeout

    def healthy(self) -> bool:
        now = self._clock()
        with self._lock:
            return all(self._family_healthy(f, now) for f in self._families)

    def ready_report(self) -> tuple[bool, dict[str, Any]]:
        """(ready, JSON body) for /readyz: ready once the first full sync is done."""
        ready = self.ready
        return ready, {"ready": ready, "currentTime": rfc3339(self._wall())}

    def report(self, with_node: bool) -> tuple[bool, dict[str, Any]]:
        """(ok, JSON body) for /healthz (`with_node`) or /livez."""
        now, wall = self._clock(), self._wall()
        with self._lock:
            status = {
                fam: {
                    "lastUpdated": rfc3339(self._last_updated.get(fam)),
                    "healthy": self._family_healthy(fam, now),
                }
                for fam in self._families
            }
            healthy = all(s["healthy"] for s in status.values())
            eligible = self._node_eligible
            cache_age = self._state_cache_age
            last = max(self._last_updated.values(), default=None)
        ok = healthy and (eligible or not with_node)
        # As upstream: when healthy, lastUpdated is "now" (older releases reported the last
        # sync loop run even when nothing changed; probes rely on it looking recent).
        body: dict[str, Any] = {
            "lastUpdated": rfc3339(wall if ok else last),
            "currentTime": rfc3339(wall),
        }
        if with_node:
            body["nodeEligible"] = eligible
        body["healthy"] = healthy
        body["status"] = status
        body["stateCacheAgeSeconds"] = cache_age
        return ok, body


# --------------------------------------------------------------------------- HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), handler)


class _Handler(BaseHTTPRequestHandler):
    server_version = "kproxy"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def send_json(
        self, code: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> None:
        data = (json.dumps(body) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self) -> None:
        self.answer()

    def do_HEAD(self) -> None:
        self.answer()

    def answer(self) -> None:
        raise NotImplementedError


def _serve(server: _Server, name: str) -> threading.Thread:
    # a short poll interval keeps stop() (and closing a Service's port) quick
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True
    )
    thread.start()
    return thread


def _shutdown(server: _Server, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


# --------------------------------------------------------------------------- /healthz


class HealthServer:
    """/healthz, /livez and /readyz on `bind` (kube-proxy's --healthz-bind-address)."""

    def __init__(
        self, health: ProxyHealth, bind: str = DEFAULT_HEALTHZ_BIND, metrics: Metrics | None = None
    ) -> None:
        self.health = health
        self.metrics = metrics
        self.host, self._port = split_host_port(bind, 10256)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self._port

    def start(self) -> None:
        """Bind and serve from a daemon thread; raises OSError when the port is taken."""
        owner = self

        class Handler(_Handler):
            def answer(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    self.respond(True, owner.metrics.healthz if owner.metrics else None)
                elif path == "/livez":
                    self.respond(False, owner.metrics.livez if owner.metrics else None)
                elif path == "/readyz":
                    ready, body = owner.health.ready_report()
                    self.send_json(200 if ready else 503, body)
                else:
                    self.send_json(404, {"error": f"no such path: {path}"})

            def respond(self, with_node: bool, count: Callable[[int], None] | None) -> None:
                ok, body = owner.health.report(with_node)
                code = 200 if ok else 503
                if count is not None:
                    count(code)
                self.send_json(code, body)

        self._server = _Server(self.host, self._port, Handler)
        self._thread = _serve(self._server, f"healthz:{self.port}")
        log.info("health server listening on %s:%d", self.host, self.port)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            _shutdown(self._server, self._thread)
        self._server = self._thread = None


# --------------------------------------------------------------------------- service health


class _ServiceServer:
    """One Service's health check node port."""

    def __init__(self, key: tuple[str, str], port: int, host: str, health: ProxyHealth) -> None:
        self.key = key
        self.count = 0
        owner = self

        class Handler(_Handler):
            def answer(self) -> None:
                count = owner.count
                proxy_healthy = health.healthy()  # the node's eligibility does not count here
                body = {
                    "service": {"namespace": key[0], "name": key[1]},
                    "localEndpoints": count,
                    "serviceProxyHealthy": proxy_healthy,
                }
                code = 200 if count > 0 and proxy_healthy else 503
                self.send_json(code, body, {"X-Load-Balancing-Endpoint-Weight": str(count)})

        self.server = _Server(host, port, Handler)  # OSError when the port is taken
        self.port = port
        self.thread = _serve(self.server, f"svc-health:{port}")

    def close(self) -> None:
        _shutdown(self.server, self.thread)


class ServiceHealthServers:
    """An HTTP server per Service health check node port (eTP=Local LoadBalancers)."""

    def __init__(self, health: ProxyHealth, bind_ip: str = "0.0.0.0") -> None:
        self.health = health
        self.bind_ip = bind_ip
        self._servers: dict[tuple[str, str], _ServiceServer] = {}
        self._warned: set[tuple[tuple[str, str], int]] = set()
        self._lock = threading.Lock()

    @property
    def ports(self) -> dict[tuple[str, str], int]:
        """The ports actually being served, by Service."""
        with self._lock:
            return {key: srv.port for key, srv in self._servers.items()}

    def _warn_once(self, key: tuple[str, str], port: int, reason: str) -> None:
        if (key, port) not in self._warned:
            self._warned.add((key, port))
            # upstream emits a FailedToStartServiceHealthcheck event here
            log.warning(
                "service %s/%s: cannot serve health check node port %d: %s",
                key[0],
                key[1],
                port,
                reason,
            )

    def sync(self, wanted: Mapping[tuple[str, str], tuple[int, int]]) -> None:
        """`wanted`: (namespace, name) -> (healthCheckNodePort, local ready endpoints).

        Opens servers for new ports, closes those that went, updates counts. A port that
        cannot be bound is warned about once and retried on later syncs.
        """
        with self._lock:
            for key in list(self._servers):
                srv = self._servers[key]
                if key not in wanted or wanted[key][0] != srv.port:
                    srv.close()
                    del self._servers[key]
            claimed = {srv.port: key for key, srv in self._servers.items()}
            for key in sorted(wanted):
                port, count = wanted[key]
                if not 0 < port <= 65535:
                    continue
                srv = self._servers.get(key)
                if srv is None:
                    other = claimed.get(port)
                    if other is not None and other != key:
                        self._warn_once(key, port, f"already used by {other[0]}/{other[1]}")
                        continue
                    try:
                        srv = _ServiceServer(key, port, self.bind_ip, self.health)
                    except OSError as err:
                        self._warn_once(key, port, err.strerror or str(err))
                        continue
                    self._servers[key] = srv
                    claimed[port] = key
                    self._warned.discard((key, port))
                srv.count = count
            self._warned = {(k, p) for k, p in self._warned if wanted.get(k, (0,))[0] == p}

    def stop(self) -> None:
        with self._lock:
            for srv in self._servers.values():
                srv.close()
            self._servers.clear()


def local_ready_endpoints(
    state: ClusterState, config: NodeConfig
) -> dict[tuple[str, str], tuple[int, int]]:
    """(namespace, name) -> (healthCheckNodePort, local ready endpoints) for the Services that
    need a health check (LoadBalancer with externalTrafficPolicy Local), as upstream counts."""
    wanted = {}
    by_service = state.slices_by_service()
    for key, svc in state.services.items():
        if svc.type != "LoadBalancer" or not svc.external_policy_local:
            continue
        if not svc.health_check_node_port:
            continue
        local = {
            ep.ip
            for eps in by_service.get(key, [])
            for ep in eps.endpoints
            if ep.ready and config.node_name and ep.node_name == config.node_name
        }
        wanted[key] = (svc.health_check_node_port, len(local))
    return wanted
