"""`kproxy run` in a network namespace against the test API server, with real traffic.

The API server runs in this process but listens on the node namespace's 127.0.0.1 (see
netns.call_in); the daemon runs in the node namespace and is killed by pid afterwards.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns  # noqa: E402
from fake_apiserver import FakeApiServer  # noqa: E402

pytestmark = pytest.mark.kernel

WEB_IP = "10.96.0.10"
POD_A, POD_B = "10.244.1.2", "10.244.1.3"
METRICS = "http://127.0.0.1:10249/metrics"
HEALTH = "http://127.0.0.1:10256"
CANARY_INTERVAL = 0.5


def service(name, ip, port=80, **spec):
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": "default", "name": name},
        "spec": {
            "clusterIP": ip,
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            **spec,
        },
    }


def slice_(name, service_name, *ips, node="node-1"):
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "default",
            "name": name,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": True}, "nodeName": node} for ip in ips
        ],
    }


class Daemon:
    def __init__(self, topo: netns.Topology, api: FakeApiServer, log: Path) -> None:
        self.topo, self.api, self.log_path = topo, api, log
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str) -> None:
        argv = [
            netns._ip(),
            "netns",
            "exec",
            self.topo.node,
            sys.executable,
            "-m",
            "kproxy",
            "run",
            "--master",
            self.api.url,
            "--node-name",
            "node-1",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--iptables-min-sync-period",
            "0.2s",
            "--iptables-sync-period",
            "30s",
            "--canary-interval",
            f"{CANARY_INTERVAL}s",
            "--metrics-bind-address",
            "127.0.0.1:10249",
            "--healthz-bind-address",
            "127.0.0.1:10256",
            # Everything the daemon writes stays in the test's own directory.
            "--snapshot-dir",
            str(self.log_path.parent / "snapshots"),
            "--state-cache",
            str(self.log_path.parent / "state.json"),
            "--lock-file",
            str(self.log_path.parent / "kproxy.lock"),
            *extra,
        ]
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, stdout=self.log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def stop(self) -> None:
        if self.proc is None:
            return
        netns.stop_process(self.proc)
        self.log_file.close()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float | None:
        try:
            status, _, body = netns.http_get(self.topo.node, METRICS)
        except OSError:  # not listening yet
            return None
        assert status == 200
        for line in body.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            if head == name or (
                head.startswith(name + "{") and all(f'{k}="{v}"' in head for k, v in labels.items())
            ):
                return float(value)
        return None


def status_of(topo, url: str) -> int | None:
    """HTTP status of a GET from the node namespace; None while nothing listens."""
    try:
        return netns.http_get(topo.node, url, timeout=1.0)[0]
    except OSError:
        return None


def wait_for(what: str, check, timeout: float = 10.0, daemon: Daemon | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            log = daemon.log()[-3000:] if daemon else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n--- daemon log ---\n{log}")
        time.sleep(0.1)


@pytest.fixture
def env(kernel_support: None, tmp_path: Path) -> Iterator[tuple]:
    topo = netns.build(pods=(("a", 2), ("b", 3), ("c", 4)), clients=0)
    api = None
    daemon = None
    try:
        for name in ("a", "b"):
            topo.start_server(topo.pods[name], tcp=[8080], udp=[5353])
        api = netns.call_in(topo.node, lambda: FakeApiServer(host="127.0.0.1").start())
        api.apply(
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1", "labels": {}}}
        )
        daemon = Daemon(topo, api, tmp_path / "kproxy.log")
        yield topo, api, daemon
    finally:
        if daemon is not None:
            daemon.stop()
        if api is not None:
            api.stop()
        topo.close()


def pods_reached(topo, dst=WEB_IP, count=12) -> set[str]:
    replies = topo.tcp(topo.pods["c"].ns, dst, 80, count=count, timeout=1.0)
    return {r.pod for r in replies if r.ok}


def test_daemon_follows_changes_with_traffic(env):
    topo, api, daemon = env
    api.apply(service("web", WEB_IP))
    api.apply(slice_("web-1", "web", POD_A))
    daemon.start()
    wait_for(
        "pod a reached through the ClusterIP", lambda: pods_reached(topo) == {"a"}, daemon=daemon
    )
    # Scale up: both answer.
    api.apply(slice_("web-1", "web", POD_A, POD_B))
    wait_for(
        "a and b both reached", lambda: pods_reached(topo, count=30) == {"a", "b"}, daemon=daemon
    )
    # Scale down to b: a gets no new connection.
    api.apply(slice_("web-1", "web", POD_B))
    wait_for(
        "only b",
        lambda: "--to-destination 10.244.1.2:8080" not in topo.iptables_save("nat"),
        daemon=daemon,
    )
    assert pods_reached(topo, count=30) == {"b"}
    # Delete the Service: its chains go.
    svc_chains = {
        ln.split()[0][1:]
        for ln in topo.iptables_save("nat").splitlines()
        if ln.startswith(":KUBE-SVC-") or ln.startswith(":KUBE-SEP-")
    }
    assert svc_chains
    api.delete("Service", "default", "web")
    api.delete("EndpointSlice", "default", "web-1")
    wait_for(
        "web's chains deleted",
        lambda: not any(c in topo.iptables_save("nat") for c in svc_chains),
        daemon=daemon,
    )
    # Each change was applied by a partial sync: no full restore of the table.
    assert "whole nat restored" not in daemon.log().split("synced IPv4 (full", 1)[-1]


def test_api_outage_keeps_traffic_and_catches_up(env):
    topo, api, daemon = env
    api.apply(service("web", WEB_IP))
    api.apply(slice_("web-1", "web", POD_A))
    daemon.start()
    wait_for("first sync", lambda: pods_reached(topo) == {"a"}, daemon=daemon)
    api.set_fail("drop")
    api.cut_watches()
    time.sleep(3)
    assert daemon.proc.poll() is None, "the daemon died when the API server went away"
    assert pods_reached(topo, count=20) == {"a"}, "traffic stopped during the API outage"
    # Changes made while the daemon cannot see them...
    api.apply(slice_("web-1", "web", POD_B))
    api.apply(service("extra", "10.96.0.11"))
    api.apply(slice_("extra-1", "extra", POD_A))
    time.sleep(1)
    assert pods_reached(topo, count=10) == {"a"}
    # ...are caught up once it answers again.
    api.set_fail(None)
    wait_for(
        "caught up after the outage", lambda: pods_reached(topo) == {"b"}, timeout=20, daemon=daemon
    )
    assert pods_reached(topo, dst="10.96.0.11") == {"a"}


def test_relist_after_410_churns_nothing(env):
    topo, api, daemon = env
    api.apply(service("web", WEB_IP))
    api.apply(slice_("web-1", "web", POD_A, POD_B))
    daemon.start()
    wait_for(
        "first sync",
        lambda: daemon.metric("kubeproxy_sync_proxy_rules_duration_seconds_count"),
        daemon=daemon,
    )
    time.sleep(0.5)
    syncs = daemon.metric("kubeproxy_sync_proxy_rules_duration_seconds_count")
    before = topo.iptables_save()
    lists = sum(1 for r in api.requests if "watch" not in r.query)
    # Unrelated churn moves the resourceVersion on; compaction makes the daemon's too old.
    for i in range(5):
        api.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"other-{i}"}})
    api.compact()
    api.cut_watches()
    wait_for(
        "a relist",
        lambda: sum(1 for r in api.requests if "watch" not in r.query) > lists,
        daemon=daemon,
    )
    time.sleep(1.5)
    assert daemon.metric("kproxy_watch_restarts_total", resource="Service") >= 1
    assert daemon.metric("kubeproxy_sync_proxy_rules_duration_seconds_count") == syncs, (
        "a relist with no change triggered a sync"
    )
    assert topo.iptables_save() == before


@pytest.mark.parametrize("table", ["nat", "filter", "mangle"])
def test_flushed_table_is_repaired(env, table):
    topo, api, daemon = env
    api.apply(service("web", WEB_IP))
    api.apply(slice_("web-1", "web", POD_A))
    daemon.start()
    wait_for("first sync", lambda: pods_reached(topo) == {"a"}, daemon=daemon)
    good = topo.iptables_save(table)
    # Flush and delete every chain in one step (-F then -X would race the repair, which may
    # come in between and make -X fail).
    netns.run(topo.node, ["iptables-restore"], input=f"*{table}\nCOMMIT\n")
    flushed = time.monotonic()
    wait_for(
        f"{table} repaired",
        lambda: topo.iptables_save(table) == good,
        timeout=2 * CANARY_INTERVAL + 3,
        daemon=daemon,
    )
    took = time.monotonic() - flushed
    assert pods_reached(topo) == {"a"}
    # On iptables-nft the change events see it first (tests/test_kernel_drift.py).
    assert daemon.metric(
        "kproxy_drift_repairs_total", reason="foreign-change", process="iptables-restor"
    )
    print(f"{table} flush repaired in {took:.2f}s")


@pytest.mark.parametrize("table", ["nat", "filter"])
def test_flush_that_keeps_the_chains_is_caught_by_the_canary_check(env, table):
    """`iptables -t nat -F` (no -X) empties every chain and leaves the empty canary chains: the
    canary check must still see it (not wait for the periodic verify, reason "periodic"). On
    the legacy backend, which sends no change events, the canaries are what finds it."""
    topo, api, daemon = env
    api.apply(service("web", WEB_IP))
    api.apply(slice_("web-1", "web", POD_A))
    daemon.start("--iptables-backend", "legacy")
    wait_for("first sync", lambda: pods_reached(topo) == {"a"}, daemon=daemon)
    assert daemon.log().count("drift detection is polling") == 1
    good = netns.iptables_save(topo.node, table, variant="legacy")
    netns.run(topo.node, ["iptables-legacy", "-t", table, "-F"])
    # (Not asserted empty here: the repair may already be done, 0.5 s canary interval.)
    wait_for(
        f"{table} repaired",
        lambda: netns.iptables_save(topo.node, table, variant="legacy") == good,
        timeout=2 * CANARY_INTERVAL + 3,
        daemon=daemon,
    )
    assert pods_reached(topo) == {"a"}
    assert daemon.metric("kproxy_drift_repairs_total", reason="flush") >= 1


def apply_web_and_lb(api, *lb_endpoints: str) -> None:
    """Service web (WEB_IP, pod a) and a LoadBalancer lb with externalTrafficPolicy Local,
    NodePort 30100 and health check node port 32100, served by `lb_endpoints`."""
    api.apply(service("web", WEB_IP))
    api.apply(slice_("web-1", "web", POD_A))
    lb = service(
        "lb",
        "10.96.0.20",
        type="LoadBalancer",
        externalTrafficPolicy="Local",
        healthCheckNodePort=32100,
    )
    lb["spec"]["ports"][0]["nodePort"] = 30100
    api.apply(lb)
    api.apply(slice_("lb-1", "lb", *lb_endpoints))


def test_metrics_and_health_endpoints(env):
    topo, api, daemon = env
    apply_web_and_lb(api, POD_A, POD_B)
    daemon.start()
    wait_for("ready", lambda: status_of(topo, f"{HEALTH}/readyz") == 200, daemon=daemon)
    status, _, body = netns.http_get(topo.node, f"{HEALTH}/healthz")
    assert status == 200
    doc = json.loads(body)
    assert doc["healthy"] is True and doc["nodeEligible"] is True and "lastUpdated" in doc
    assert netns.http_get(topo.node, f"{HEALTH}/livez")[0] == 200

    for name in (
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_proxy_healthz_total",
    ):
        assert daemon.metric(name), f"{name} missing or zero"
    assert daemon.metric("kubeproxy_sync_proxy_rules_iptables_total", table="nat") > 10
    assert daemon.metric("rest_client_requests_total", verb="LIST", code="200") >= 2
    assert daemon.metric("kproxy_apiserver_reachable") == 1
    from kproxy import __version__

    assert (
        daemon.metric("kproxy_info", version=__version__, mode="iptables", backend="iptables-nft")
        == 1
    )

    # The health check node port of the ETP=Local LoadBalancer Service.
    wait_for(
        "service health check",
        lambda: status_of(topo, "http://127.0.0.1:32100/") == 200,
        daemon=daemon,
    )
    status, headers, body = netns.http_get(topo.node, "http://127.0.0.1:32100/")
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "2"
    assert json.loads(body) == {
        "service": {"namespace": "default", "name": "lb"},
        "localEndpoints": 2,
        "serviceProxyHealthy": True,
    }
    # Endpoints move off this node: 503, and the server closes when the Service goes.
    api.apply(slice_("lb-1", "lb", POD_A, POD_B, node="node-2"))
    wait_for(
        "health check 503", lambda: status_of(topo, "http://127.0.0.1:32100/") == 503, daemon=daemon
    )
    api.delete("Service", "default", "lb")

    wait_for(
        "health check server closed",
        lambda: status_of(topo, "http://127.0.0.1:32100/") is None,
        daemon=daemon,
    )

    # The node is being deleted: /healthz fails, /livez does not.
    api.apply(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "node-1", "deletionTimestamp": "2026-11-30T00:00:00Z"},
        }
    )
    wait_for(
        "healthz 503",
        lambda: netns.http_get(topo.node, f"{HEALTH}/healthz")[0] == 503,
        daemon=daemon,
    )
    assert netns.http_get(topo.node, f"{HEALTH}/livez")[0] == 200


def listening_ports(topo) -> set[int]:
    """The TCP ports something listens on in the node namespace."""
    out = netns.run(topo.node, ["ss", "-Hltn"]).stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def test_health_and_metrics_servers_turned_off_as_kube_proxy_allows(env):
    """`--healthz-port 0` and `--metrics-bind-address ""` (kube-proxy: "Set empty to
    disable"): no listener on either port, the rules programmed as ever, the Services' health
    check node ports still served; and --kube-api-qps/--kube-api-burst said once at start."""
    topo, api, daemon = env
    apply_web_and_lb(api, POD_A)
    daemon.start(
        "--healthz-port=0",
        "--metrics-bind-address=",
        "--kube-api-qps=50",
        "--kube-api-burst=60",
    )
    wait_for(
        "pod a reached through the ClusterIP", lambda: pods_reached(topo) == {"a"}, daemon=daemon
    )
    wait_for(
        "service health check",
        lambda: status_of(topo, "http://127.0.0.1:32100/") == 200,
        daemon=daemon,
    )
    assert daemon.proc.poll() is None, daemon.log()[-3000:]
    ports = listening_ports(topo)
    assert 32100 in ports  # ss sees the daemon's sockets...
    assert not ports & {10256, 10249}, ports  # ...and none on the health or metrics port
    assert status_of(topo, f"{HEALTH}/healthz") is None
    log = daemon.log()
    assert "health server off" in log and "metrics server off" in log
    assert log.count("client-side rate limit 50 requests/s, bursts of 60") == 1
    # A change still lands.
    api.apply(slice_("web-1", "web", POD_B))
    wait_for("only b", lambda: pods_reached(topo, count=10) == {"b"}, daemon=daemon)


def test_nothing_written_before_the_first_complete_list(env, tmp_path):
    topo, api, daemon = env
    # Rules already on the node (an earlier kproxy or kube-proxy).
    state = tmp_path / "state.json"
    objs = [service("web", WEB_IP), slice_("web-1", "web", POD_A)]
    state.write_text(json.dumps({"kind": "List", "items": objs}))
    res = netns.run(
        topo.node,
        [
            sys.executable,
            "-m",
            "kproxy",
            "sync",
            "--state",
            str(state),
            "--cluster-cidr",
            "10.244.0.0/16",
            "--node-name",
            "node-1",
        ],
        check=False,
    )
    assert res.returncode == 0, res.stderr
    before = topo.iptables_save()
    api.set_fail("500")
    daemon.start()
    time.sleep(3)
    assert topo.iptables_save() == before, "rules changed before the API server was listed"
    assert pods_reached(topo) == {"a"}
    # The API has changed meanwhile; once it answers the daemon converges.
    for obj in (service("web", WEB_IP), slice_("web-1", "web", POD_B)):
        api.apply(copy.deepcopy(obj))
    api.set_fail(None)
    wait_for("converged", lambda: pods_reached(topo) == {"b"}, timeout=20, daemon=daemon)


# --------------------------------------------------------------------------- conntrack

DNS_IP = "10.96.0.53"


def dns_flows(env, sports: list[int]) -> tuple[dict, dict[int, str]]:
    """The UDP Service dns (DNS_IP:53 -> a and b on 5353) and the daemon started; one flow
    from pod c per source port. Returns the EndpointSlice and who answered each port."""
    from test_conntrack import send  # one datagram per fixed source port, answers by pod

    topo, api, daemon = env
    dns = service("dns", DNS_IP, port=53)
    dns["spec"]["ports"][0].update(protocol="UDP", name="dns")
    api.apply(dns)
    eps = slice_("dns-1", "dns", POD_A, POD_B)
    eps["ports"] = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
    api.apply(eps)
    daemon.start()
    first = wait_for(
        "UDP answers",
        lambda: (
            (r := send(topo.pods["c"].ns, DNS_IP, 53, sports))
            and set(r.values()) <= {"a", "b"}
            and r
        ),
        daemon=daemon,
    )
    assert set(first.values()) == {"a", "b"}, first
    return eps, first


def wait_for_flows_moved_to_a(env, sports: list[int], first: dict[int, str]) -> None:
    """b is no endpoint any more (its pod still answers): its flows must have been deleted,
    so the next datagram of each goes to a."""
    from test_conntrack import send

    topo, _, daemon = env
    wait_for(
        "b's rules gone", lambda: "10.244.1.3:5353" not in topo.iptables_save("nat"), daemon=daemon
    )
    wait_for(
        "the flows pinned to b moved to a",
        lambda: set(send(topo.pods["c"].ns, DNS_IP, 53, sports).values()) == {"a"},
        timeout=10,
        daemon=daemon,
    )
    assert daemon.metric("kubeproxy_conntrack_reconciler_deleted_entries_total") >= sum(
        1 for p in first.values() if p == "b"
    )


def test_udp_flows_to_a_removed_endpoint_are_cleaned(env):
    _, api, _ = env
    sports = list(range(41000, 41012))
    eps, first = dns_flows(env, sports)
    # Remove b. Its pod still answers, so without cleanup the existing flows would stay on it.
    eps["endpoints"] = eps["endpoints"][:1]
    api.apply(eps)
    wait_for_flows_moved_to_a(env, sports, first)


def test_udp_flows_are_cleaned_after_a_postponed_sync(env, tmp_path):
    """An endpoint removed while the sync is postponed (another kproxy command holds the lock):
    the cleanup it owed is done by the next successful sync, not dropped (k8s issue 139628:
    hours of traffic to a removed DNS endpoint)."""
    from kproxy.recovery.lockfile import locked

    _, api, daemon = env
    sports = list(range(41100, 41112))
    eps, first = dns_flows(env, sports)
    # The daemon's own lock file (Daemon.start): held here, the daemon's sync gives up after
    # its 10 s wait and is postponed.
    with locked(str(tmp_path / "kproxy.lock"), what="test"):
        eps["endpoints"] = eps["endpoints"][:1]
        api.apply(eps)
        wait_for("the sync postponed", lambda: "sync postponed" in daemon.log(), timeout=30)
    wait_for_flows_moved_to_a(env, sports, first)


def test_cleanup_for_a_nodeport_without_endpoints_spares_other_flows_on_that_port(env):
    """A UDP NodePort Service losing its endpoints: the flows through its NodePort go, a flow
    between two pods that only shares the port number stays (upstream matches NodePort flows
    by port alone and would delete it)."""
    from test_conntrack import conntrack_ids, send

    topo, api, daemon = env
    node_port = 30053
    # Pod a also serves UDP on the NodePort's number itself, reached pod to pod.
    topo.start_server(topo.pods["a"], tcp=[], udp=[node_port], name="a")
    dns = service("dns", DNS_IP, port=53, type="NodePort")
    dns["spec"]["ports"][0].update(protocol="UDP", name="dns", nodePort=node_port)
    api.apply(dns)
    eps = slice_("dns-1", "dns", POD_A)
    eps["ports"] = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
    api.apply(eps)
    daemon.start()
    pod_c = topo.pods["c"].ns
    via_node_port = list(range(41200, 41204))
    pod_to_pod = list(range(41300, 41304))
    # The node's pod-side address is one of its local addresses: the NodePort answers there.
    wait_for(
        "the NodePort answered",
        lambda: set(send(pod_c, netns.POD_GATEWAY, node_port, via_node_port).values()) == {"a"},
        daemon=daemon,
    )
    assert set(send(pod_c, POD_A, node_port, pod_to_pod).values()) == {"a"}
    before = conntrack_ids(topo)
    keys = {port: (topo.pods["c"].ip, port) for port in via_node_port + pod_to_pod}
    assert all(key in before for key in keys.values()), before
    cleanups = daemon.metric("kubeproxy_conntrack_reconciler_sync_duration_seconds_count") or 0

    eps["endpoints"] = []
    api.apply(eps)
    wait_for(
        "a conntrack cleanup",
        lambda: (
            (daemon.metric("kubeproxy_conntrack_reconciler_sync_duration_seconds_count") or 0)
            > cleanups
        ),
        daemon=daemon,
    )
    after = conntrack_ids(topo)
    gone = [p for p in via_node_port if keys[p] in after]
    assert not gone, f"flows through the NodePort not deleted: {gone}"
    kept = {p: after.get(keys[p]) for p in pod_to_pod}
    assert kept == {p: before[keys[p]] for p in pod_to_pod}, (
        "a pod-to-pod flow on the NodePort's number was deleted or re-created"
    )


# --------------------------------------------------------------------------- node addresses

NP_CLUSTER_IP, NP_PORT = "10.96.0.30", 30080
NODE_IP = netns.NODE_EXTERNAL_IP  # the node's address on the client link, 192.168.100.1


def node_object(*addresses: tuple[str, str]) -> dict:
    """This node's Node object with status.addresses given as (type, address) pairs."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node-1", "labels": {}},
        "status": {"addresses": [{"type": t, "address": a} for t, a in addresses]},
    }


def nodeport_service() -> dict:
    svc = service("np", NP_CLUSTER_IP, type="NodePort")
    svc["spec"]["ports"][0]["nodePort"] = NP_PORT
    return svc


def nodeport_answers(ns: str, host: str) -> set[str]:
    """Who answers 3 TCP connections to host:NP_PORT: pod names, or "refused"/"timeout"."""
    replies = netns.tcp(ns, host, NP_PORT, count=3, timeout=1.0)
    return {r.pod if r.ok else r.result for r in replies}


def test_nodeport_addresses_primary_takes_the_watched_nodes_ip(env, proxy_mode):
    """`--nodeport-addresses primary` without --node-ip: NodePorts answer on the Node's
    InternalIP (preferred to an ExternalIP listed first, as upstream's GetNodeHostIPs), not on
    the node's other addresses, and follow the Node when its address changes."""
    topo, api, daemon = env
    client = topo.add_client()
    # An ExternalIP listed before the InternalIP: upstream takes the InternalIP.
    api.apply(node_object(("ExternalIP", "203.0.113.1"), ("InternalIP", NODE_IP)))
    api.apply(nodeport_service())
    api.apply(slice_("np-1", "np", POD_A))
    daemon.start("--mode", proxy_mode, "--nodeport-addresses", "primary")
    wait_for(
        f"the NodePort answered on the Node's InternalIP {NODE_IP}",
        lambda: nodeport_answers(client.ns, NODE_IP) == {"a"},
        daemon=daemon,
    )
    # The node's pod-side address is local too, but not the Node's IP: not captured there,
    # and node-1 itself has nothing listening on the port.
    assert nodeport_answers(topo.pods["c"].ns, netns.POD_GATEWAY) == {"refused"}

    # The Node's InternalIP becomes another address of the node: the rules follow.
    moved = "192.168.100.10"
    netns.ip(topo.node, "addr", "add", f"{moved}/32", "dev", client.host_if)
    api.apply(node_object(("InternalIP", moved)))
    wait_for(
        f"the NodePort answered on the Node's new InternalIP {moved}",
        lambda: nodeport_answers(client.ns, moved) == {"a"},
        daemon=daemon,
    )
    assert nodeport_answers(client.ns, NODE_IP) == {"refused"}


def test_nodeport_addresses_cidr_follows_the_nodes_local_addresses(env):
    """`--nodeport-addresses CIDR` is resolved against the node's addresses at every full sync:
    an address added later serves the NodePort after the next periodic sync. While none
    matches, that is said once, not on every sync."""
    topo, api, daemon = env
    client = topo.add_client()
    cidr, later = "192.168.77.0/24", "192.168.77.1"
    topo.client_route(cidr)
    api.apply(nodeport_service())
    api.apply(slice_("np-1", "np", POD_A))
    daemon.start("--nodeport-addresses", cidr, "--iptables-sync-period", "1s")
    wait_for(
        "three full syncs",
        lambda: (daemon.metric("kubeproxy_sync_full_proxy_rules_duration_seconds_count") or 0) >= 3,
        daemon=daemon,
    )
    assert daemon.log().count("no local address matches") == 1, daemon.log()[-3000:]

    netns.ip(topo.node, "addr", "add", f"{later}/32", "dev", "lo")
    wait_for(
        f"the NodePort answered on {later}, added after the start",
        lambda: nodeport_answers(client.ns, later) == {"a"},
        daemon=daemon,
    )
    # Only addresses in the CIDR: the node's client-side address is not one.
    assert nodeport_answers(client.ns, NODE_IP) == {"refused"}
    # The rules changed because the node did, not behind kproxy's back.
    assert not daemon.metric("kproxy_drift_repairs_total", reason="periodic")
