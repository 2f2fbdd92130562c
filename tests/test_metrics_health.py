"""Metrics exposition, /healthz /livez /readyz semantics and Service health check servers.

No root needed: every server binds 127.0.0.1 on a free port.
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kproxy.daemon.health import HealthServer, ProxyHealth, ServiceHealthServers
from kproxy.daemon.metrics import NETWORK_PROGRAMMING_BUCKETS, Metrics, split_host_port
from kproxy.model import Node

# family name as the parser reports it (counters without _total) -> (type, label names)
EXPECTED = {
    "kubeproxy_sync_proxy_rules_duration_seconds": ("histogram", set()),
    "kubeproxy_sync_full_proxy_rules_duration_seconds": ("histogram", set()),
    "kubeproxy_sync_partial_proxy_rules_duration_seconds": ("histogram", set()),
    "kubeproxy_network_programming_duration_seconds": ("histogram", set()),
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds": ("gauge", set()),
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds": ("gauge", set()),
    "kubeproxy_sync_proxy_rules_endpoint_changes": ("counter", set()),
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending": ("gauge", set()),
    "kubeproxy_sync_proxy_rules_service_changes": ("counter", set()),
    "kubeproxy_sync_proxy_rules_service_changes_pending": ("gauge", set()),
    "kubeproxy_sync_proxy_rules_iptables_total": ("gauge", {"table"}),
    "kubeproxy_sync_proxy_rules_iptables_last": ("gauge", {"table"}),
    "kubeproxy_sync_proxy_rules_iptables_restore_failures": ("counter", set()),
    "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures": ("counter", set()),
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total": ("gauge", {"traffic_policy"}),
    "kubeproxy_proxy_healthz": ("counter", {"code"}),
    "kubeproxy_proxy_livez": ("counter", {"code"}),
    "kubeproxy_conntrack_reconciler_sync_duration_seconds": ("histogram", set()),
    "kubeproxy_conntrack_reconciler_deleted_entries": ("counter", set()),
    "rest_client_requests": ("counter", {"code", "verb"}),
    "kproxy_drift_repairs": ("counter", {"reason", "process"}),
    "kproxy_drift_backoffs": ("counter", {"process"}),
    "kproxy_apiserver_reachable": ("gauge", {"address"}),
    "kproxy_watch_restarts": ("counter", {"resource"}),
    "kproxy_rules_last_payload_lines": ("gauge", set()),
    "kproxy_sync_failures": ("counter", {"family", "reason"}),
    "kproxy_node_check": ("gauge", {"check", "status"}),
}


def get(url: str) -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def touch_every_labelled(m: Metrics) -> None:
    """One child per labelled metric, so its samples (and label names) are exposed."""
    m.sync_proxy_rules_iptables_total.labels(table="nat").set(12)
    m.sync_proxy_rules_iptables_last.labels(table="filter").set(3)
    m.sync_proxy_rules_no_local_endpoints_total.labels(traffic_policy="external").set(1)
    m.healthz(200)
    m.livez(503)
    m.request("get", 200)
    m.drift_repairs_total.labels(reason="foreign-change", process="iptables").inc()
    m.drift_backoffs_total.labels(process="iptables").inc()
    m.reachable("https://10.0.0.1:6443", True)
    m.watch_restart("services")
    m.sync_failures_total.labels(family="IPv6", reason="apply").inc()
    m.node_check.labels(check="forwarding", status="ok").set(1)


# --------------------------------------------------------------------------- metrics


@pytest.fixture
def scrape() -> Iterator[tuple[Metrics, Callable[[], dict]]]:
    m = Metrics()
    server = m.serve("127.0.0.1:0")
    try:

        def _scrape() -> dict:
            status, headers, text = get(f"http://127.0.0.1:{server.port}/metrics")
            assert status == 200
            return {f.name: f for f in text_string_to_metric_families(text)}

        yield m, _scrape
    finally:
        server.stop()


def test_every_metric_exposed_with_upstream_name_type_and_labels(scrape):
    m, do_scrape = scrape
    touch_every_labelled(m)
    families = do_scrape()
    for name, (mtype, labels) in EXPECTED.items():
        assert name in families, f"{name} missing from the scrape"
        assert families[name].type == mtype, f"{name}: {families[name].type} != {mtype}"
        seen = {k for s in families[name].samples for k in s.labels if k not in ("le",)}
        assert seen == labels, f"{name}: labels {seen} != {labels}"
    assert "process_cpu_seconds" in families  # process metrics ride along, as upstream


def test_node_checks_start_at_zero_and_show_the_current_status(scrape, monkeypatch):
    """kproxy_node_check: every check's every status exists at 0 before the first round;
    after it, 1 for each check's status and 0 for the others."""
    from kproxy.daemon import nodecheck
    from kproxy.doctor.checks import CHECK_NAMES
    from kproxy.doctor.context import Context
    from kproxy.doctor.result import STATUSES, Result

    m, do_scrape = scrape
    checker = nodecheck.NodeChecker(Context(), m, 30)
    samples = {
        (s.labels["check"], s.labels["status"]): s.value
        for s in do_scrape()["kproxy_node_check"].samples
    }
    assert samples == {(c, st): 0.0 for c in CHECK_NAMES for st in STATUSES}
    verdicts = {c: STATUSES[i % len(STATUSES)] for i, c in enumerate(CHECK_NAMES)}
    monkeypatch.setattr(
        nodecheck, "run_checks", lambda ctx: [Result(c, st, "seen") for c, st in verdicts.items()]
    )
    checker.check_once()
    samples = {
        (s.labels["check"], s.labels["status"]): s.value
        for s in do_scrape()["kproxy_node_check"].samples
    }
    assert samples == {(c, st): float(verdicts[c] == st) for c in CHECK_NAMES for st in STATUSES}


def test_counter_and_helper_values(scrape):
    m, do_scrape = scrape
    m.request("list", 200)
    m.request("LIST", 200)
    m.request("watch", "<error>")
    m.reachable("a:6443", True)
    m.reachable("b:6443", False)
    m.conntrack_reconciled(0.003, 4)
    m.sync_done(0.02, full=True, when=1700000000.0)
    m.sync_done(0.01, full=False)
    families = do_scrape()

    def value(family: str, sample: str, **labels: str) -> float:
        for s in families[family].samples:
            if s.name == sample and s.labels == labels:
                return s.value
        raise AssertionError(f"{sample}{labels} not found")

    assert value("rest_client_requests", "rest_client_requests_total", code="200", verb="LIST") == 2
    assert value("rest_client_requests", "rest_client_requests_total", code="<error>", verb="WATCH")
    assert value("kproxy_apiserver_reachable", "kproxy_apiserver_reachable", address="a:6443") == 1
    assert value("kproxy_apiserver_reachable", "kproxy_apiserver_reachable", address="b:6443") == 0
    ct = "kubeproxy_conntrack_reconciler_deleted_entries"
    assert value(ct, ct + "_total") == 4
    sync = "kubeproxy_sync_proxy_rules_duration_seconds"
    assert value(sync, sync + "_count") == 2
    full = "kubeproxy_sync_full_proxy_rules_duration_seconds"
    assert value(full, full + "_count") == 1
    last = "kubeproxy_sync_proxy_rules_last_timestamp_seconds"
    assert value(last, last) == 1700000000.0


def bucket_bounds(family) -> list[float]:
    return [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")]


def test_bucket_boundaries(scrape):
    _, do_scrape = scrape
    families = do_scrape()
    sync = [0.001 * 2**i for i in range(15)] + [float("inf")]
    for name in (
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
    ):
        assert bucket_bounds(families[name]) == pytest.approx(sync), name
    assert sync[-2] == pytest.approx(16.384)
    npd = bucket_bounds(families["kubeproxy_network_programming_duration_seconds"])
    expected = (
        [0.0, 0.25, 0.5]
        + [float(i) for i in range(1, 60)]
        + [float(i) for i in range(60, 120, 5)]
        + [float(i) for i in range(120, 301, 30)]
        + [float("inf")]
    )
    assert npd == expected
    assert len(NETWORK_PROGRAMMING_BUCKETS) == 81


def test_two_metrics_objects_do_not_collide():
    a, b = Metrics(process_metrics=False), Metrics(process_metrics=False)
    a.watch_restart("nodes")
    assert a.registry.get_sample_value("kproxy_watch_restarts_total", {"resource": "nodes"}) == 1
    assert b.registry.get_sample_value("kproxy_watch_restarts_total", {"resource": "nodes"}) is None


def test_metrics_server_stops():
    server = Metrics(process_metrics=False).serve("127.0.0.1:0")
    port = server.port
    assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    server.stop()
    server()  # idempotent, and callable as a plain stopper
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


@pytest.mark.parametrize(
    "bind, expected",
    [
        ("127.0.0.1:10249", ("127.0.0.1", 10249)),
        ("0.0.0.0", ("0.0.0.0", 7)),
        (":8080", ("0.0.0.0", 8080)),
        ("[::1]:9000", ("::1", 9000)),
        ("[::]", ("::", 7)),
        ("::1", ("::1", 7)),
    ],
)
def test_split_host_port(bind, expected):
    assert split_host_port(bind, 7) == expected


@pytest.mark.parametrize("bind", ["host.example:80", "1.2.3.4:http", "1.2.3.4:70000", "[::1"])
def test_split_host_port_rejects(bind):
    with pytest.raises(ValueError):
        split_host_port(bind, 7)


# --------------------------------------------------------------------------- proxy health


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served() -> Iterator[tuple[ProxyHealth, FakeClock, Metrics, str]]:
    clock = FakeClock()
    health = ProxyHealth(30, clock=clock, wall_clock=lambda: 1700000000.0 + clock.now)
    metrics = Metrics(process_metrics=False)
    server = HealthServer(health, "127.0.0.1:0", metrics=metrics)
    server.start()
    try:
        yield health, clock, metrics, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def test_idle_proxy_is_healthy(served):
    health, clock, _, url = served
    clock.now += 10_000  # nothing ever queued: healthy however long it stays idle
    status, headers, body = get(url + "/healthz")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    data = json.loads(body)
    assert data["healthy"] is True and data["nodeEligible"] is True
    assert data["lastUpdated"] == data["currentTime"]  # upstream: "now" when healthy
    assert data["currentTime"].endswith("Z") and "T" in data["currentTime"]


def test_queued_update_not_synced_within_two_periods_is_unhealthy(served):
    health, clock, metrics, url = served
    health.queued_update()
    clock.now += 59
    assert get(url + "/healthz")[0] == 200  # late, but within 2 x 30 s
    clock.now += 2
    health.queued_update()  # a newer change does not reset the oldest pending one
    status, _, body = get(url + "/healthz")
    assert status == 503
    assert json.loads(body)["healthy"] is False
    assert get(url + "/livez")[0] == 503
    health.updated()
    assert get(url + "/healthz")[0] == 200
    assert get(url + "/livez")[0] == 200
    sample = metrics.registry.get_sample_value
    assert sample("kubeproxy_proxy_healthz_total", {"code": "503"}) == 1
    assert sample("kubeproxy_proxy_healthz_total", {"code": "200"}) == 2
    assert sample("kubeproxy_proxy_livez_total", {"code": "503"}) == 1


def test_one_family_late_makes_the_proxy_unhealthy(served):
    health, clock, _, url = served
    health.queued_update()
    health.updated("IPv4")
    clock.now += 61
    status, _, body = get(url + "/livez")
    assert status == 503
    data = json.loads(body)
    assert data["status"]["IPv4"]["healthy"] is True
    assert data["status"]["IPv6"]["healthy"] is False
    health.updated("IPv6")
    assert get(url + "/livez")[0] == 200


def test_node_being_deleted_fails_healthz_not_livez(served):
    health, _, _, url = served
    health.set_node(Node(name="node-1", deleting=True))
    status, _, body = get(url + "/healthz")
    assert status == 503
    data = json.loads(body)
    assert data["nodeEligible"] is False and data["healthy"] is True
    assert get(url + "/livez")[0] == 200
    health.set_node(Node(name="node-1"))
    assert get(url + "/healthz")[0] == 200
    health.set_node(Node(name="node-1"), tainted_for_deletion=True)
    assert get(url + "/healthz")[0] == 503
    health.set_node(None)  # the Node object is gone
    assert get(url + "/healthz")[0] == 503


def test_readyz_after_first_full_sync(served):
    health, _, _, url = served
    status, _, body = get(url + "/readyz")
    assert status == 503 and json.loads(body)["ready"] is False
    health.mark_ready()
    status, _, body = get(url + "/readyz")
    assert status == 200 and json.loads(body)["ready"] is True


def test_state_cache_age_shown(served):
    health, _, _, url = served
    assert json.loads(get(url + "/healthz")[2])["stateCacheAgeSeconds"] is None
    health.set_state_cache_age(42.5)
    assert json.loads(get(url + "/livez")[2])["stateCacheAgeSeconds"] == 42.5


def test_unknown_path_is_404(served):
    assert get(served[3] + "/nope")[0] == 404


# --------------------------------------------------------------------------- service health


@pytest.fixture
def svc_servers() -> Iterator[tuple[ServiceHealthServers, ProxyHealth, FakeClock]]:
    clock = FakeClock()
    health = ProxyHealth(30, clock=clock)
    servers = ServiceHealthServers(health, bind_ip="127.0.0.1")
    try:
        yield servers, health, clock
    finally:
        servers.stop()


def test_service_health_server_answers_any_path(svc_servers):
    servers, health, clock = svc_servers
    port = free_port()
    servers.sync({("prod", "web"): (port, 2)})
    assert servers.ports == {("prod", "web"): port}
    status, headers, body = get(f"http://127.0.0.1:{port}/any/path?x=1")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "2"
    assert json.loads(body) == {
        "service": {"namespace": "prod", "name": "web"},
        "localEndpoints": 2,
        "serviceProxyHealthy": True,
    }
    servers.sync({("prod", "web"): (port, 0)})  # count updated in place
    status, headers, body = get(f"http://127.0.0.1:{port}/")
    assert status == 503
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "0"
    assert json.loads(body)["localEndpoints"] == 0
    servers.sync({("prod", "web"): (port, 1)})
    health.queued_update()
    clock.now += 120  # the proxy itself is unhealthy: 503 despite a local endpoint
    status, _, body = get(f"http://127.0.0.1:{port}/")
    assert status == 503
    assert json.loads(body)["serviceProxyHealthy"] is False


def test_service_health_server_closed_when_removed_or_moved(svc_servers):
    servers, _, _ = svc_servers
    first, second = free_port(), free_port()
    servers.sync({("prod", "web"): (first, 1), ("prod", "api"): (second, 1)})
    assert get(f"http://127.0.0.1:{first}/")[0] == 200
    servers.sync({("prod", "api"): (second, 1)})
    assert servers.ports == {("prod", "api"): second}
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{first}/", timeout=2)
    moved = free_port()
    servers.sync({("prod", "api"): (moved, 3)})
    assert get(f"http://127.0.0.1:{moved}/")[1]["X-Load-Balancing-Endpoint-Weight"] == "3"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{second}/", timeout=2)
    servers.sync({})
    assert servers.ports == {}


def test_port_in_use_warns_once_and_keeps_going(svc_servers, caplog):
    servers, _, _ = svc_servers
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ok = free_port()
        wanted = {("prod", "blocked"): (taken, 1), ("prod", "web"): (ok, 1)}
        with caplog.at_level(logging.WARNING, logger="kproxy.daemon.health"):
            servers.sync(wanted)
            servers.sync(wanted)  # retried, but not warned about again
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "prod/blocked" in warnings[0].getMessage()
        assert str(taken) in warnings[0].getMessage()
        assert servers.ports == {("prod", "web"): ok}
        assert get(f"http://127.0.0.1:{ok}/")[0] == 200
    # the port is free now: the next sync opens it
    servers.sync(wanted)
    assert servers.ports == {("prod", "blocked"): taken, ("prod", "web"): ok}
