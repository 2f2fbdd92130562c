"""KubeSource against tests/fake_apiserver.py over real HTTP, with the real kubernetes client.

No root needed: the fake server runs on 127.0.0.1 in this process. Backoff bounds are tiny so
failure tests take well under a second each.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fake_apiserver import FakeApiServer
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from kproxy.sources.kube import KubeEvent, KubeSource, SourceUnavailable

FAST = {"backoff_initial": 0.05, "backoff_max": 0.4, "watch_timeout": 30, "request_timeout": 2}


def service(name: str, ns: str = "default", ip: str = "10.96.0.10") -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": ip, "ports": [{"port": 80, "protocol": "TCP"}]},
    }


def endpoint_slice(name: str, svc: str, ns: str = "default") -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.1.2"], "conditions": {"ready": True}}],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }


def node(name: str, zone: str = "a") -> dict[str, Any]:
    return {
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
    }


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout}s")


def dead_url() -> str:
    """An address where nothing listens: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


class Recorder:
    """Collects callbacks and metrics calls (thread-safe: callbacks come from source threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[KubeEvent] = []
        self.resyncs: list[tuple[str, list[dict[str, Any]]]] = []
        self.metrics: list[tuple[Any, ...]] = []

    def on_event(self, event: KubeEvent) -> None:
        with self.lock:
            self.events.append(event)

    def on_resync(self, kind: str, items: list[dict[str, Any]]) -> None:
        with self.lock:
            self.resyncs.append((kind, items))

    def seen(self, kind: str) -> list[tuple[str, str]]:
        with self.lock:
            return [(e.type, e.obj["metadata"]["name"]) for e in self.events if e.kind == kind]

    def resyncs_of(self, kind: str) -> list[list[str]]:
        with self.lock:
            return [
                sorted(o["metadata"]["name"] for o in items)
                for k, items in self.resyncs
                if k == kind
            ]

    # SourceMetrics
    def request(self, verb: str, code: str) -> None:
        self.metrics.append(("request", verb, code))

    def watch_restart(self, resource: str) -> None:
        self.metrics.append(("watch_restart", resource))

    def reachable(self, address: str, up: bool) -> None:
        self.metrics.append(("reachable", address, up))

    def failover(self, from_address: str, to_address: str) -> None:
        self.metrics.append(("failover", from_address, to_address))


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    srv = FakeApiServer(bookmark_interval=0.2).start()
    yield srv
    srv.stop()


@pytest.fixture
def make_source() -> Iterator[Callable[..., tuple[KubeSource, Recorder]]]:
    sources: list[KubeSource] = []

    def make(urls: list[str], node_name: str = "n1", **kw: Any) -> tuple[KubeSource, Recorder]:
        rec = Recorder()
        src = KubeSource(urls, None, node_name, rec.on_event, rec.on_resync, rec, **{**FAST, **kw})
        sources.append(src)
        return src, rec

    yield make
    for src in sources:
        src.stop()


# --- the fake server speaks what the real client expects ---


def test_real_client_lists_pages_and_watches(server: FakeApiServer) -> None:
    for i in range(3):
        server.apply(service(f"s{i}"))
    api = client.CoreV1Api(client.ApiClient(client.Configuration(host=server.url)))
    listed = api.list_service_for_all_namespaces()
    assert [s.metadata.name for s in listed.items] == ["s0", "s1", "s2"]
    assert listed.metadata.resource_version == str(server.resource_version)

    page = api.list_service_for_all_namespaces(limit=2)
    assert len(page.items) == 2 and page.metadata._continue
    rest = api.list_service_for_all_namespaces(limit=2, _continue=page.metadata._continue)
    assert [s.metadata.name for s in rest.items] == ["s2"] and not rest.metadata._continue

    start = listed.metadata.resource_version
    server.apply(service("s3"))
    server.delete("Service", "default", "s0")
    seen = []
    for event in watch.Watch().stream(
        api.list_service_for_all_namespaces,
        resource_version=start,
        allow_watch_bookmarks=True,
        timeout_seconds=1,
    ):
        seen.append((event["type"], event["raw_object"]["metadata"].get("name")))
    assert seen[:2] == [("ADDED", "s3"), ("DELETED", "s0")]
    assert {t for t, _ in seen[2:]} == {"BOOKMARK"}

    discovery = client.DiscoveryV1Api(client.ApiClient(client.Configuration(host=server.url)))
    server.apply(endpoint_slice("s1-abc", "s1"))
    slices = discovery.list_endpoint_slice_for_all_namespaces()
    assert slices.items[0].endpoints[0].addresses == ["10.244.1.2"]


def test_fake_server_expires_old_resource_versions(server: FakeApiServer) -> None:
    server.apply(service("a"))
    old = server.resource_version
    server.apply(service("b"))
    server.compact()
    api = client.CoreV1Api(client.ApiClient(client.Configuration(host=server.url)))
    with pytest.raises(ApiException) as err:
        api.list_service_for_all_namespaces(resource_version=str(old))
    assert err.value.status == 410
    # A watch answers 200 and then an ERROR event carrying a 410 Status, as the real API.
    with pytest.raises(ApiException) as err:
        for _ in watch.Watch().stream(
            api.list_service_for_all_namespaces, resource_version=str(old), timeout_seconds=2
        ):
            pass
    assert err.value.status == 410


# --- KubeSource ---


def test_events_in_order_and_synced_after_both_lists(
    server: FakeApiServer, make_source: Callable[..., tuple[KubeSource, Recorder]]
) -> None:
    server.apply(service("a"))
    server.apply(endpoint_slice("a-1", "a"))
    src, rec = make_source([server.url])
    # Hold the EndpointSlice list in its callback: Services alone must not set `synced`.
    release = threading.Event()
    plain = rec.on_resync

    def slow_resync(kind: str, items: list[dict[str, Any]]) -> None:
        if kind == "EndpointSlice":
            release.wait(5)
        plain(kind, items)

    src._on_resync = slow_resync
    src.start()
    wait_for(lambda: rec.resyncs_of("Service"))
    time.sleep(0.1)
    assert not src.synced.is_set()
    release.set()
    assert src.synced.wait(3)
    assert rec.resyncs_of("Service") == [["a"]] and rec.resyncs_of("EndpointSlice") == [["a-1"]]
    listed = next(items[0] for kind, items in rec.resyncs if kind == "Service")
    assert listed["kind"] == "Service" and listed["spec"]["clusterIP"] == "10.96.0.10"

    server.apply(service("b"))
    server.apply(service("b", ip="10.96.0.11"))
    server.delete("Service", "default", "a")
    server.apply(endpoint_slice("b-1", "b"))
    wait_for(lambda: len(rec.seen("Service")) == 3 and rec.seen("EndpointSlice"))
    assert rec.seen("Service") == [("ADDED", "b"), ("MODIFIED", "b"), ("DELETED", "a")]
    assert rec.seen("EndpointSlice") == [("ADDED", "b-1")]
    modified = [e.obj for e in rec.events if e.type == "MODIFIED"][0]
    assert modified["kind"] == "Service" and modified["spec"]["clusterIP"] == "10.96.0.11"


def test_bookmarks_advance_the_resource_version(
    server: FakeApiServer, make_source: Callable[..., tuple[KubeSource, Recorder]]
) -> None:
    server.apply(service("a"))
    src, rec = make_source([server.url])
    src.start()
    assert src.synced.wait(3)
    server.apply(service("b"))
    wait_for(lambda: rec.seen("Service"))
    # Changes the Service watch does not see move the global RV on; only bookmarks tell it.
    for i in range(5):
        server.apply(node(f"other{i}"))
    target = server.resource_version
    time.sleep(0.5)  # > 2 bookmark intervals
    # Were the RV still that of "b", this watch restart would now get 410 and relist.
    server.compact()
    server.cut_watches()
    wait_for(
        lambda: any(
            r.path == "/api/v1/services" and r.query.get("resourceVersion") == str(target)
            for r in server.requests
        )
    )
    server.apply(service("c"))
    wait_for(lambda: len(rec.seen("Service")) == 2)
    time.sleep(0.2)
    assert rec.seen("Service") == [("ADDED", "b"), ("ADDED", "c")]  # nothing replayed
    assert rec.resyncs_of("Service") == [["a"]]  # and no relist


def test_expired_watch_relists_with_the_full_current_list(
    server: FakeApiServer, make_source: Callable[..., tuple[KubeSource, Recorder]]
) -> None:
    server.apply(service("a"))
    server.apply(service("b"))
    src, rec = make_source([server.url])
    src.start()
    assert src.synced.wait(3)
    # The source misses changes while the server is unreachable, then the history is gone.
    server.set_fail("drop")
    server.cut_watches()
    server.apply(service("c"))
    server.apply(service("b", ip="10.96.0.99"))
    server.delete("Service", "default", "a")
    server.compact()
    server.set_fail(None)
    wait_for(lambda: len(rec.resyncs_of("Service")) == 2)
    assert rec.resyncs_of("Service") == [["a", "b"], ["b", "c"]]
    b = next(o for k, items in rec.resyncs[::-1] if k == "Service" for o in items)
    assert b["spec"]["clusterIP"] == "10.96.0.99"
    assert rec.seen("Service") == []  # the missed changes come only through the resync
    assert ("watch_restart", "Service") in rec.metrics
    server.apply(service("d"))
    wait_for(lambda: rec.seen("Service"))
    time.sleep(0.2)
    assert rec.seen("Service") == [("ADDED", "d")]


def test_recovers_from_500s_with_backoff(
    server: FakeApiServer, make_source: Callable[..., tuple[KubeSource, Recorder]]
) -> None:
    src, rec = make_source([server.url], node_name="")
    src.start()
    wait_for(lambda: server.watch_count() == 2)  # both watches open: nothing else in flight
    server.set_fail("500")
    server.cut_watches()
    before = len(server.requests)
    time.sleep(1.5)
    failed = server.requests[before:]
    # Two resources, delays 0.05, 0.1, 0.2, 0.4, 0.4... (+jitter): about 6 tries each.
    # A client without backoff would send hundreds.
    assert 4 <= len(failed) <= 20, len(failed)
    assert all(r.code == 500 for r in failed)
    assert ("request", "WATCH", "500") in rec.metrics
    server.set_fail(None)
    server.apply(service("after"))
    wait_for(lambda: rec.seen("Service") == [("ADDED", "after")], timeout=3)


def test_fails_over_to_the_next_server(
    server: FakeApiServer, make_source: Callable[..., tuple[KubeSource, Recorder]]
) -> None:
    server.apply(service("a"))
    down = dead_url()
    src, rec = make_source([down, server.url])
    src.start()
    assert src.synced.wait(3)
    assert src.current_server == server.url and src.failovers == 1
    assert ("failover", down, server.url) in rec.metrics
    assert ("reachable", down, False) in rec.metrics
    assert ("reachable", server.url, True) in rec.metrics
    server.apply(service("b"))
    wait_for(lambda: rec.seen("Service") == [("ADDED", "b")])


def test_node_is_watched_by_field_selector(
    server: FakeApiServer, make_source: Callable[..., tuple[KubeSource, Recorder]]
) -> None:
    server.apply(node("n1"))
    server.apply(node("n2"))
    src, rec = make_source([server.url], node_name="n1")
    src.start()
    wait_for(lambda: rec.resyncs_of("Node"))
    assert rec.resyncs_of("Node") == [["n1"]]
    server.apply(node("n2", zone="b"))
    server.apply(node("n1", zone="c"))
    wait_for(lambda: rec.seen("Node"))
    time.sleep(0.1)
    assert rec.seen("Node") == [("MODIFIED", "n1")]
    zone = rec.events[-1].obj["metadata"]["labels"]["topology.kubernetes.io/zone"]
    assert zone == "c"
    node_watches = [r for r in server.requests if r.path == "/api/v1/nodes"]
    assert all(r.query["fieldSelector"] == "metadata.name=n1" for r in node_watches)


def test_callback_failure_relists(
    server: FakeApiServer, make_source: Callable[..., tuple[KubeSource, Recorder]]
) -> None:
    src, rec = make_source([server.url], node_name="")
    plain = rec.on_event
    failed = []

    def flaky(event: KubeEvent) -> None:
        if not failed:
            failed.append(event)
            raise RuntimeError("consumer bug")
        plain(event)

    src._on_event = flaky
    src.start()
    assert src.synced.wait(3)
    server.apply(service("a"))
    wait_for(lambda: rec.resyncs_of("Service") == [[], ["a"]])


def test_stop_is_prompt(
    server: FakeApiServer, make_source: Callable[..., tuple[KubeSource, Recorder]]
) -> None:
    src, _ = make_source([server.url])
    src.start()
    assert src.synced.wait(3)
    time.sleep(0.1)  # watches open
    started = time.monotonic()
    src.stop()
    assert time.monotonic() - started < 1.0
    assert not any(t.is_alive() for t in src._threads)


def test_list_once_returns_everything(
    server: FakeApiServer, make_source: Callable[..., tuple[KubeSource, Recorder]]
) -> None:
    server.apply(service("a"))
    server.apply(service("b", ns="other"))
    server.apply(endpoint_slice("a-1", "a"))
    server.apply(node("n1"))
    server.apply(node("n2"))
    src, _ = make_source([dead_url(), server.url], page_size=1)
    objs = src.list_once(timeout=3)
    names = sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    assert names == [
        ("EndpointSlice", "a-1"),
        ("Node", "n1"),
        ("Service", "a"),
        ("Service", "b"),
    ]
    assert any("continue" in r.query for r in server.requests)  # paged with page_size=1


def test_list_once_gives_up_quickly(
    make_source: Callable[..., tuple[KubeSource, Recorder]],
) -> None:
    src, _ = make_source([dead_url(), dead_url()], list_attempts=4)
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="cannot list"):
        src.list_once(timeout=1.0)
    assert time.monotonic() - started < 1.5

    hanging = socket.socket()  # accepts connections (backlog) but never answers
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(8)
    try:
        src, _ = make_source([f"http://127.0.0.1:{hanging.getsockname()[1]}"])
        started = time.monotonic()
        with pytest.raises(SourceUnavailable):
            src.list_once(timeout=0.5)
        assert time.monotonic() - started < 1.5
    finally:
        hanging.close()


def test_configuration_sources(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'https://10.0.0.1:6443'}}]\n"
        "users: [{name: u, user: {token: secret}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    noop = Recorder()
    src = KubeSource(None, str(kubeconfig), "", noop.on_event, noop.on_resync)
    assert src.servers == ["https://10.0.0.1:6443"]
    # --master addresses override the kubeconfig's server and keep its credentials.
    src = KubeSource(
        ["https://a:6443", "b:6443"], str(kubeconfig), "", noop.on_event, noop.on_resync
    )
    assert src.servers == ["https://a:6443", "https://b:6443"]
    assert all(c.configuration.api_key for _, c in src._clients)

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SourceUnavailable, match="no API server configuration"):
        KubeSource(None, None, "", noop.on_event, noop.on_resync)


def test_master_without_kubeconfig_uses_the_service_account(tmp_path, monkeypatch):
    """In a pod, --master (the API server's real address, reachable before any Service rule
    exists) takes the pod's service account token and CA; the token refresh keeps the address."""
    import datetime

    from kproxy.sources import kube

    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("first-token\n")
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    loader = kube.config.incluster_config.InClusterConfigLoader
    init = loader.__init__

    def always_due(self, *args, **kwargs):  # every use re-reads the token file
        init(self, *args, **kwargs)
        self._token_refresh_period = datetime.timedelta(0)

    monkeypatch.setattr(loader, "__init__", always_due)
    monkeypatch.setattr(
        kube,
        "_service_account",
        lambda f=kube._service_account: f(token_file=str(token), cert_file=str(ca)),
    )
    (cfg,) = kube._configurations(["https://192.0.2.10:6443"], None)
    assert cfg.host == "https://192.0.2.10:6443"
    assert cfg.ssl_ca_cert == str(ca)
    assert cfg.get_api_key_with_prefix("BearerToken") == "bearer first-token"
    token.write_text("second-token")  # the kubelet rotated it
    assert cfg.get_api_key_with_prefix("BearerToken") == "bearer second-token"
    assert cfg.host == "https://192.0.2.10:6443"


def test_master_outside_a_pod_has_no_credentials(tmp_path, monkeypatch):
    from kproxy.sources import kube

    monkeypatch.setattr(
        kube,
        "_service_account",
        lambda f=kube._service_account: f(
            token_file=str(tmp_path / "none"), cert_file=str(tmp_path / "none.crt")
        ),
    )
    (cfg,) = kube._configurations(["http://127.0.0.1:8080"], None)
    assert cfg.host == "http://127.0.0.1:8080"
    assert not cfg.api_key


def test_api_client_is_the_current_servers(
    make_source: Callable[..., tuple[KubeSource, Recorder]],
) -> None:
    first, second = dead_url(), dead_url()
    src, _ = make_source([first, second])
    assert src.api_client().configuration.host == first
    src._server_failed(0, "test")  # what a failed request does: fail over
    assert src.api_client().configuration.host == second == src.current_server


def test_rate_limit_spaces_every_request_beyond_the_burst(
    server: FakeApiServer, make_source: Callable[..., tuple[KubeSource, Recorder]]
) -> None:
    """qps 4, burst 2 (kube-proxy's clientConnection.qps/burst): lists, watch starts and
    an Event post all wait on one token bucket, so beyond the first two, requests reach the
    server no faster than 4 a second. A list's next pages do not (upstream's informers list
    once, from the API server's cache). Arrival times give lower bounds only (a noisy machine
    only delays a request), and only cumulative ones: one request's latency may close the gap
    to the next."""
    from kproxy.daemon.nodeevents import NodeEventPoster

    qps, burst = 4.0, 2
    for i in range(5):
        server.apply(service(f"s{i}"))
    server.apply(endpoint_slice("s0-abc", "s0"))
    # No node: Services (5 pages of 1) and EndpointSlices (1 page) listed, then 2 watches;
    # and an Event posted through the source's client meanwhile.
    src, rec = make_source([server.url], node_name="", page_size=1, qps=qps, burst=burst)
    events = NodeEventPoster("n1", src.api_client)
    try:
        events.post("RulesRepaired", "a test note")
        src.start()
        wait_for(lambda: server.watch_count() == 2 and events.posted == 1, timeout=10)
    finally:
        events.stop()
    api = [r for r in server.requests if r.path.startswith(("/api/", "/apis/"))]
    lists = [r for r in api if r.method == "GET" and r.query.get("watch") != "true"]
    watches = [r for r in api if r.query.get("watch") == "true"]
    posts = [r for r in api if r.method == "POST"]
    assert (len(lists), len(watches), len(posts)) == (6, 2, 1), api
    pages = [r for r in lists if r.query.get("continue")]
    assert len(pages) == 4  # the Services' pages after the first
    times = sorted(r.at for r in api if not r.query.get("continue"))
    # Unlimited, all 5 arrive within a few ms. Limited: the i-th request (from 0) needs i + 1
    # tokens, `burst` of which were there at the start, the others coming 1/qps apart; had any
    # of the 5 not waited, the last would come 1/qps early.
    tolerance = 0.1
    for i in range(burst, len(times)):
        assert times[i] - times[0] >= (i + 1 - burst) / qps - tolerance, (i, times)
    assert {kind for kind, _ in rec.resyncs} == {"Service", "EndpointSlice"}
