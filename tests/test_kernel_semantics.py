"""kube-proxy's Service semantics, checked with real packets through the rules ``kproxy sync``
programs: externalIPs, LoadBalancer IPs with source ranges, external and internal traffic
policy Local, ClientIP session affinity, terminating endpoints, IPv6 and masquerading.

Topologies (tests/netns.py), one fresh one per test: node-1 is the namespace kproxy runs in;
its pods are 10.244.1.X behind routed veths; node-2 (no kproxy) is reached over
192.168.200.0/24 and holds pod r (10.244.2.2); external clients are 192.168.100.2 and .3 and
route 203.0.113.0/24 (externalIPs, load balancer IPs) to node-1 (192.168.100.1). Every pod
answers TCP 8080 and UDP 5353 with ``<pod name> <peer address>``, so each reply tells which
endpoint was chosen and which source address it saw.

"Timeout" below always means DROP: a rejected (refused) connection is a different outcome
and fails the test.

Every test runs once per ``--mode`` (iptables, nftables: the ``proxy_mode`` fixture of
tests/conftest.py). The traffic must behave the same in both, except where upstream's
nftables mode differs on purpose (no NodePorts on 127.0.0.1). Where a test checks that a
DROP came from kproxy's rule: in iptables mode a filter DROP rule counted the packets; in
nftables mode (no counters there) the Service's map element says drop and the attempts timed
out.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import netns
import pytest

pytestmark = pytest.mark.kernel

CLUSTER_CIDR = "10.244.0.0/16"
CLUSTER_CIDR6 = "fd00:10:244::/56"
EXTERNAL_NET = "203.0.113.0/24"
NODE_IP = netns.NODE_EXTERNAL_IP
CLIENT_IP, CLIENT2_IP = "192.168.100.2", "192.168.100.3"
NODE1_POD_GW = netns.POD_GATEWAY  # what a masqueraded connection looks like to a node-1 pod
NODE1_LINK_IP = netns.NODE_LINK_IP  # ... and to a node-2 pod

HTTP = {"name": "http", "port": 8080, "protocol": "TCP"}
DNS = {"name": "dns", "port": 5353, "protocol": "UDP"}

OK_TIMEOUT = 2.0  # seconds per attempt that must be answered
DROP_TIMEOUT = 1.0  # seconds per attempt that must time out


# --------------------------------------------------------------------------- objects


def port(name: str, number: int, target: int, protocol: str = "TCP", node_port: int = 0):
    p: dict[str, Any] = {"name": name, "port": number, "protocol": protocol, "targetPort": target}
    if node_port:
        p["nodePort"] = node_port
    return p


def http(number: int = 80, node_port: int = 0) -> dict[str, Any]:
    return port("http", number, 8080, "TCP", node_port)


def dns(number: int = 53, node_port: int = 0) -> dict[str, Any]:
    return port("dns", number, 5353, "UDP", node_port)


def service(
    name: str,
    cluster_ips: str | list[str],
    ports: list[dict[str, Any]],
    svc_type: str = "ClusterIP",
    *,
    status: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    ips = [cluster_ips] if isinstance(cluster_ips, str) else list(cluster_ips)
    families = ["IPv6" if ":" in a else "IPv4" for a in ips]
    body: dict[str, Any] = {
        "type": svc_type,
        "clusterIP": ips[0],
        "clusterIPs": ips,
        "ipFamilies": families,
        "ipFamilyPolicy": "RequireDualStack" if len(ips) > 1 else "SingleStack",
        "sessionAffinity": "None",
        "ports": ports,
    }
    body.update(spec)
    obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "uid": f"uid-svc-{name}"},
        "spec": body,
    }
    if status is not None:
        obj["status"] = status
    return obj


def endpoint(
    pod: netns.Pod,
    *,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    family: int = 4,
) -> dict[str, Any]:
    """The pod as an EndpointSlice endpoint on its own node (``nodeName`` node-1/node-2)."""
    address = pod.ip6 if family == 6 else pod.ip
    assert address, f"pod {pod.name} has no IPv{family} address"
    return {
        "addresses": [address],
        "nodeName": pod.node_name,
        "conditions": {
            "ready": ready,
            "serving": ready if serving is None else serving,
            "terminating": terminating,
        },
    }


def endpoint_slice(
    service_name: str,
    endpoints: list[dict[str, Any]],
    ports: list[dict[str, Any]],
    family: int = 4,
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service_name}-ipv{family}",
            "namespace": "default",
            "labels": {
                "kubernetes.io/service-name": service_name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": f"IPv{family}",
        "ports": ports,
        "endpoints": endpoints,
    }


# --------------------------------------------------------------------------- kproxy


def kproxy_sync(
    topo: netns.Topology,
    write_state: Callable[..., Path],
    objects: list[dict[str, Any]],
    *flags: str,
    cidrs: tuple[str, ...] = (CLUSTER_CIDR,),
) -> subprocess.CompletedProcess[str]:
    """``kproxy sync --state FILE --node-name node-1 --cluster-cidr ... FLAGS`` in node-1."""
    state = write_state(objects)
    argv = [sys.executable, "-m", "kproxy", "sync", "--state", str(state)]
    argv += ["--mode", topo.proxy_mode, "--node-name", netns.NODE_NAME]
    for cidr in cidrs:
        argv += ["--cluster-cidr", cidr]
    argv += list(flags)
    proc = netns.run(topo.node, argv, check=False, timeout=120)
    assert proc.returncode == 0, (
        f"`kproxy sync {' '.join(argv[4:])}` failed: exit {proc.returncode}\n"
        f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"
    )
    return proc


def nft_rules(topo: netns.Topology, family: int = 4) -> str:
    """node-1's ``kproxy`` nft table of ``family`` ("" when there is none)."""
    return netns.nft_table(topo.node, "ip6" if family == 6 else "ip") or ""


def rules(topo: netns.Topology, family: int = 4) -> str:
    """node-1's nat and filter tables (nftables mode: its kproxy table), for failure messages."""
    if topo.proxy_mode == "nftables":
        name = "ip6" if family == 6 else "ip"
        return f"--- nft list table {name} kproxy\n{nft_rules(topo, family)}"
    return "\n".join(
        f"--- {'ip6tables' if family == 6 else 'iptables'}-save -t {table}\n"
        + netns.iptables_save(topo.node, table, family=family)
        for table in ("nat", "filter")
    )


_COUNTED = re.compile(r"^\[(\d+):\d+\] (-A .*)$")


def drop_hits(topo: netns.Topology, *needles: str, family: int = 4) -> int:
    """Packets counted by filter-table ``-j DROP`` rules whose text holds every needle."""
    text = netns.iptables_save(topo.node, "filter", family=family, counters=True)
    total = 0
    for line in text.splitlines():
        m = _COUNTED.match(line)
        if m and m.group(2).endswith("-j DROP") and all(n in m.group(2) for n in needles):
            total += int(m.group(1))
    return total


# --------------------------------------------------------------------------- checks


def describe(replies: list[netns.Reply]) -> str:
    return "; ".join(str(r) for r in replies)


def send(proto: str, ns: str, host: str, port: int, count: int) -> list[netns.Reply]:
    """``count`` attempts; when the first one is not answered, only that one (fail fast)."""
    first = netns.request(ns, proto, host, port, timeout=OK_TIMEOUT)
    if not first[0].ok or count == 1:
        return first
    return first + netns.request(ns, proto, host, port, count=count - 1, timeout=OK_TIMEOUT)


def answered_by(
    topo: netns.Topology,
    request: tuple[str, str, str, int, int],
    expected: set[str],
    what: str,
    *,
    family: int = 4,
) -> dict[str, set[str]]:
    """``request`` = (proto, ns, host, port, count): every attempt answered, by exactly the
    pods ``expected``; returns pod -> peer addresses seen."""
    replies = send(*request)
    seen = dict(netns.tally(replies))
    cut = f", stopped after {len(replies)} of {request[4]}" if len(replies) < request[4] else ""
    assert all(r.ok for r in replies) and set(seen) == expected, (
        f"{what}: expected answers from exactly {sorted(expected)}, got {seen} "
        f"({len(replies)} attempts{cut})\n{rules(topo, family)}"
    )
    peers: dict[str, set[str]] = {}
    for r in replies:
        peers.setdefault(r.pod, set()).add(r.peer)
    return peers


def assert_peers(
    topo: netns.Topology, peers: dict[str, set[str]], expected: dict[str, str], what: str
) -> None:
    for pod, address in expected.items():
        assert peers.get(pod) == {address}, (
            f"{what}: pod {pod} should see the connection from {address}, saw "
            f"{sorted(peers.get(pod, ()))}\n{rules(topo)}"
        )


def timed_out(
    topo: netns.Topology, replies: list[netns.Reply], what: str, *, family: int = 4
) -> None:
    bad = [r for r in replies if r.result != "timeout"]
    assert not bad, (
        f"{what}: expected every attempt to time out (DROP), got {describe(replies)}\n"
        f"{rules(topo, family)}"
    )


def assert_dropped_by_rule(
    topo: netns.Topology, what: str, needles: tuple[str, ...], nft_map: str, nft_key: str
) -> None:
    """The timeout came from kproxy's DROP for this destination, not from nowhere.

    iptables mode: a filter DROP rule whose text holds every one of ``needles`` counted a
    packet. nftables mode: map ``nft_map`` maps ``nft_key`` to drop (the caller has seen the
    attempts time out).
    """
    if topo.proxy_mode == "nftables":
        table = nft_rules(topo)
        verdict = netns.nft_elements(table, nft_map).get(nft_key)
        assert verdict == "drop", (
            f"{what}: the attempts timed out but map {nft_map} has {nft_key!r} -> {verdict!r}, "
            f"not drop:\n{table}"
        )
        return
    assert_drop_counted(topo, what, *needles)


def assert_drop_counted(topo: netns.Topology, what: str, *needles: str) -> None:
    """iptables mode: a filter DROP rule whose text holds every needle counted a packet."""
    assert drop_hits(topo, *needles) > 0, (
        f"{what}: the attempts timed out but no filter-table DROP rule matching {needles} "
        f"counted a packet:\n{netns.iptables_save(topo.node, 'filter', counters=True)}"
    )


def assert_firewalled(topo: netns.Topology, what: str, ip: str, port: int, allowed: str) -> None:
    """The timeout came from the loadBalancerSourceRanges DROP for ``ip``:``port``.

    iptables mode: a filter DROP rule for ``-d ip/32`` counted a packet. nftables mode: map
    firewall-ips sends ``ip . tcp . port`` to a firewall chain that drops every source but
    ``allowed``.
    """
    if topo.proxy_mode != "nftables":
        assert_drop_counted(topo, what, f"-d {ip}/32")
        return
    table = nft_rules(topo)
    verdict = netns.nft_elements(table, "firewall-ips").get(f"{ip} . tcp . {port}") or ""
    chain = verdict.removeprefix("goto ")
    lines = netns.nft_chains(table).get(chain, [])
    assert verdict.startswith("goto firewall-") and lines == [f"ip saddr != {allowed} drop"], (
        f"{what}: the attempts timed out but firewall-ips has {ip} . tcp . {port} -> "
        f"{verdict!r} whose chain is {lines}, expected a drop of every source but {allowed}:"
        f"\n{table}"
    )


# --------------------------------------------------------------------------- topologies


@contextmanager
def running(
    pods: tuple[tuple[str, int], ...],
    *,
    node2_pods: tuple[tuple[str, int], ...] = (),
    clients: int = 1,
    ipv6: bool = False,
    mode: str = "iptables",
) -> Iterator[netns.Topology]:
    """Build a topology whose node runs kproxy with ``--mode mode``, start every pod's server
    (TCP 8080, UDP 5353), always tear down."""
    topo = netns.build(
        pods=pods,
        clients=clients,
        node2_pods=node2_pods,
        ipv6=ipv6,
        client_routes=(EXTERNAL_NET,),
    )
    topo.proxy_mode = mode
    try:
        for pod in topo.pods.values():
            topo.start_server(pod, tcp=[8080], udp=[5353])
        yield topo
    finally:
        topo.close()


@pytest.fixture
def two_nodes(proxy_mode: str) -> Iterator[netns.Topology]:
    """Pods a (10.244.1.2) and c (10.244.1.4) on node-1, r (10.244.2.2) on node-2, client."""
    with running((("a", 2), ("c", 4)), node2_pods=(("r", 2),), mode=proxy_mode) as topo:
        yield topo


@pytest.fixture
def two_clients(proxy_mode: str) -> Iterator[netns.Topology]:
    """Pods a, b on node-1; clients 192.168.100.2 and 192.168.100.3."""
    with running((("a", 2), ("b", 3)), clients=2, mode=proxy_mode) as topo:
        yield topo


@pytest.fixture
def one_node(proxy_mode: str) -> Iterator[netns.Topology]:
    """Pods a, b, c (10.244.1.2-4) and x (10.244.1.10, used as the client) on node-1."""
    with running((("a", 2), ("b", 3), ("c", 4), ("x", 10)), mode=proxy_mode) as topo:
        yield topo


@pytest.fixture
def dual_stack(proxy_mode: str) -> Iterator[netns.Topology]:
    """Pods a, b, c on node-1 with 10.244.1.X and fd00:10:244:1::X."""
    with running((("a", 2), ("b", 3), ("c", 4)), ipv6=True, mode=proxy_mode) as topo:
        yield topo


# --------------------------------------------------------------------------- tests

EXT_CLUSTER_IP, EXT_IP = "10.96.1.10", "203.0.113.10"


def test_external_ip_reaches_local_and_remote_endpoints(two_nodes, write_state):
    topo = two_nodes
    a, r, c = topo.pods["a"], topo.pods["r"], topo.pods["c"]
    objects = [
        service("ext", EXT_CLUSTER_IP, [http(), dns()], externalIPs=[EXT_IP]),
        endpoint_slice("ext", [endpoint(a), endpoint(r)], [HTTP, DNS]),
    ]
    kproxy_sync(topo, write_state, objects)
    client = topo.clients["client"].ns

    what = f"TCP {EXT_IP}:80 (externalIP) from the client"
    peers = answered_by(topo, ("tcp", client, EXT_IP, 80, 30), {"a", "r"}, what)
    # externalTrafficPolicy Cluster: external traffic is masqueraded on the way to any endpoint
    assert_peers(topo, peers, {"a": NODE1_POD_GW, "r": NODE1_LINK_IP}, what)

    what = f"UDP {EXT_IP}:53 (externalIP) from the client"
    answered_by(topo, ("udp", client, EXT_IP, 53, 20), {"a", "r"}, what)

    for ns, who in ((c.ns, "pod c"), (topo.node, "node-1")):
        what = f"TCP {EXT_IP}:80 (externalIP) from {who}"
        answered_by(topo, ("tcp", ns, EXT_IP, 80, 20), {"a", "r"}, what)


LB_CLUSTER_IP, LB_NODE_PORT = "10.96.1.20", 30020
LB_IP, LB_PROXY_IP = "203.0.113.20", "203.0.113.21"


def lb_open_to_client(ingress: list[dict[str, Any]]) -> dict[str, Any]:
    """Service lb: a LoadBalancer (NodePort LB_NODE_PORT) whose source ranges hold only the
    first client."""
    return service(
        "lb",
        LB_CLUSTER_IP,
        [http(node_port=LB_NODE_PORT)],
        "LoadBalancer",
        loadBalancerSourceRanges=[f"{CLIENT_IP}/32"],
        status={"loadBalancer": {"ingress": ingress}},
    )


def test_load_balancer_source_ranges_drop_other_clients_but_not_nodeports(two_clients, write_state):
    topo = two_clients
    a, b = topo.pods["a"], topo.pods["b"]
    ingress = [{"ip": LB_IP, "ipMode": "VIP"}, {"ip": LB_PROXY_IP, "ipMode": "Proxy"}]
    objects = [
        lb_open_to_client(ingress),
        endpoint_slice("lb", [endpoint(a), endpoint(b)], [HTTP]),
    ]
    kproxy_sync(topo, write_state, objects)
    client1, client2 = topo.clients["client"].ns, topo.clients["client2"].ns

    what = f"TCP {LB_IP}:80 (LB IP) from allowed client {CLIENT_IP}"
    answered_by(topo, ("tcp", client1, LB_IP, 80, 20), {"a", "b"}, what)

    what = f"TCP {LB_IP}:80 (LB IP) from {CLIENT2_IP}, outside loadBalancerSourceRanges"
    timed_out(topo, topo.tcp(client2, LB_IP, 80, count=2, timeout=DROP_TIMEOUT), what)
    assert_firewalled(topo, what, LB_IP, 80, CLIENT_IP)

    what = f"TCP {NODE_IP}:{LB_NODE_PORT} (NodePort: no source ranges) from {CLIENT2_IP}"
    answered_by(topo, ("tcp", client2, NODE_IP, LB_NODE_PORT, 20), {"a", "b"}, what)

    nat = (
        nft_rules(topo) if topo.proxy_mode == "nftables" else netns.iptables_save(topo.node, "nat")
    )
    assert LB_PROXY_IP not in nat, (
        f"ingress {LB_PROXY_IP} has ipMode Proxy and must not be captured by the node:\n{nat}"
    )


def test_nftables_source_ranges_apply_to_a_load_balancer_without_endpoints(
    kernel_support, write_state
):
    """nftables mode, as upstream's nftables proxier: a LoadBalancer's source ranges hold
    while it has no endpoints. From outside them its IP drops (the client cannot tell a
    Service is there); from inside, the no-endpoints reject answers. (iptables mode, as
    upstream's iptables proxier, writes the firewall only with endpoints.)"""
    if netns.which("nft") is None:
        pytest.skip("kernel test skipped: `nft` is not installed (needed for --mode nftables)")
    with running((("a", 2),), clients=2, mode="nftables") as topo:
        objects = [
            lb_open_to_client([{"ip": LB_IP, "ipMode": "VIP"}]),
            endpoint_slice("lb", [], [HTTP]),
        ]
        kproxy_sync(topo, write_state, objects)
        client1, client2 = topo.clients["client"].ns, topo.clients["client2"].ns

        replies = topo.tcp(client1, LB_IP, 80, count=2, timeout=DROP_TIMEOUT)
        assert all(r.result == "refused" for r in replies), (
            f"TCP {LB_IP}:80 (LB IP, no endpoints) from allowed client {CLIENT_IP} must be "
            f"rejected, got {describe(replies)}\n{rules(topo)}"
        )
        what = f"TCP {LB_IP}:80 (LB IP, no endpoints) from {CLIENT2_IP}, outside the ranges"
        timed_out(topo, topo.tcp(client2, LB_IP, 80, count=2, timeout=DROP_TIMEOUT), what)
        assert_firewalled(topo, what, LB_IP, 80, CLIENT_IP)


ETP_CLUSTER_IP, ETP_EXT_IP = "10.96.1.30", "203.0.113.30"
ETP_NODE_PORT, ETP_UDP_NODE_PORT = 30030, 30053


def test_external_traffic_policy_local(two_nodes, write_state):
    topo = two_nodes
    a, r, c = topo.pods["a"], topo.pods["r"], topo.pods["c"]
    svc = service(
        "etp",
        ETP_CLUSTER_IP,
        [http(node_port=ETP_NODE_PORT), dns(node_port=ETP_UDP_NODE_PORT)],
        "NodePort",
        externalTrafficPolicy="Local",
        externalIPs=[ETP_EXT_IP],
    )
    kproxy_sync(
        topo, write_state, [svc, endpoint_slice("etp", [endpoint(a), endpoint(r)], [HTTP, DNS])]
    )
    client = topo.clients["client"].ns

    for host, p in ((NODE_IP, ETP_NODE_PORT), (ETP_EXT_IP, 80)):
        what = f"TCP {host}:{p} from the client (ETP Local, endpoints a on node-1, r on node-2)"
        peers = answered_by(topo, ("tcp", client, host, p, 20), {"a"}, what)
        assert_peers(topo, peers, {"a": CLIENT_IP}, what + ", not masqueraded")
    what = f"UDP {NODE_IP}:{ETP_UDP_NODE_PORT} from the client (ETP Local)"
    peers = answered_by(topo, ("udp", client, NODE_IP, ETP_UDP_NODE_PORT, 10), {"a"}, what)
    assert_peers(topo, peers, {"a": CLIENT_IP}, what + ", not masqueraded")

    what = f"TCP {NODE_IP}:{ETP_NODE_PORT} from pod c (pod traffic ignores ETP Local)"
    answered_by(topo, ("tcp", c.ns, NODE_IP, ETP_NODE_PORT, 30), {"a", "r"}, what)

    # Only the remote endpoint left: external traffic is dropped, cluster traffic still flows.
    kproxy_sync(topo, write_state, [svc, endpoint_slice("etp", [endpoint(r)], [HTTP, DNS])])
    what = f"TCP {NODE_IP}:{ETP_NODE_PORT} from the client (ETP Local, no local endpoint)"
    timed_out(topo, topo.tcp(client, NODE_IP, ETP_NODE_PORT, count=2, timeout=DROP_TIMEOUT), what)
    assert_dropped_by_rule(
        topo, what, (f"--dport {ETP_NODE_PORT}",), "no-endpoint-nodeports", f"tcp . {ETP_NODE_PORT}"
    )
    what = f"TCP {ETP_EXT_IP}:80 (externalIP) from the client (ETP Local, no local endpoint)"
    timed_out(topo, topo.tcp(client, ETP_EXT_IP, 80, count=1, timeout=DROP_TIMEOUT), what)
    assert_dropped_by_rule(
        topo, what, (f"-d {ETP_EXT_IP}/32",), "no-endpoint-services", f"{ETP_EXT_IP} . tcp . 80"
    )

    what = f"TCP {ETP_CLUSTER_IP}:80 (ClusterIP) from pod c, only remote endpoint r"
    answered_by(topo, ("tcp", c.ns, ETP_CLUSTER_IP, 80, 5), {"r"}, what)
    what = f"TCP {NODE_IP}:{ETP_NODE_PORT} from pod c, only remote endpoint r"
    answered_by(topo, ("tcp", c.ns, NODE_IP, ETP_NODE_PORT, 5), {"r"}, what)


ITP_CLUSTER_IP = "10.96.1.40"


def test_internal_traffic_policy_local(two_nodes, write_state):
    topo = two_nodes
    a, r, c = topo.pods["a"], topo.pods["r"], topo.pods["c"]
    svc = service("itp", ITP_CLUSTER_IP, [http(), dns()], internalTrafficPolicy="Local")
    kproxy_sync(
        topo, write_state, [svc, endpoint_slice("itp", [endpoint(a), endpoint(r)], [HTTP, DNS])]
    )
    for ns, who in ((c.ns, "pod c"), (topo.node, "node-1")):
        what = f"TCP {ITP_CLUSTER_IP}:80 from {who} (ITP Local, endpoints a local, r remote)"
        answered_by(topo, ("tcp", ns, ITP_CLUSTER_IP, 80, 20), {"a"}, what)
    what = f"UDP {ITP_CLUSTER_IP}:53 from pod c (ITP Local)"
    answered_by(topo, ("udp", c.ns, ITP_CLUSTER_IP, 53, 10), {"a"}, what)

    kproxy_sync(topo, write_state, [svc, endpoint_slice("itp", [endpoint(r)], [HTTP, DNS])])
    what = f"TCP {ITP_CLUSTER_IP}:80 from pod c (ITP Local, only remote endpoint r)"
    timed_out(topo, topo.tcp(c.ns, ITP_CLUSTER_IP, 80, count=2, timeout=DROP_TIMEOUT), what)
    assert_dropped_by_rule(
        topo,
        what,
        (f"-d {ITP_CLUSTER_IP}/32",),
        "no-endpoint-services",
        f"{ITP_CLUSTER_IP} . tcp . 80",
    )


AFFINITY_IP, SPREAD_IP = "10.96.1.50", "10.96.1.51"


def test_session_affinity_client_ip(one_node, write_state):
    topo = one_node
    pods = [topo.pods[n] for n in ("a", "b", "c")]
    slice_eps = [endpoint(p) for p in pods]
    objects = [
        service(
            "sticky",
            AFFINITY_IP,
            [http()],
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}},
        ),
        endpoint_slice("sticky", slice_eps, [HTTP]),
        service("spread", SPREAD_IP, [http()]),
        endpoint_slice("spread", slice_eps, [HTTP]),
    ]
    kproxy_sync(topo, write_state, objects)
    x = topo.pods["x"].ns

    replies = topo.tcp(x, AFFINITY_IP, 80, count=20)
    seen = dict(netns.tally(replies))
    assert all(r.ok for r in replies) and len(seen) == 1, (
        f"20 connections from pod x to {AFFINITY_IP}:80 (sessionAffinity ClientIP, endpoints "
        f"a, b, c) must all reach one pod, got {seen}\n{rules(topo)}"
    )
    replies = topo.tcp(x, SPREAD_IP, 80, count=40)
    seen = dict(netns.tally(replies))
    assert all(r.ok for r in replies) and len(seen) >= 2, (
        f"40 connections from pod x to {SPREAD_IP}:80 (no affinity, endpoints a, b, c) should "
        f"spread over at least two pods, got {seen}\n{rules(topo)}"
    )


TERM_ONLY_IP, TERM_MIXED_IP, NOT_SERVING_IP = "10.96.1.60", "10.96.1.61", "10.96.1.62"


def test_terminating_endpoints_fallback(one_node, write_state):
    topo = one_node
    a, b, c = topo.pods["a"], topo.pods["b"], topo.pods["c"]

    def terminating(pod: netns.Pod, serving: bool) -> dict[str, Any]:
        return endpoint(pod, ready=False, serving=serving, terminating=True)

    objects = [
        service("term-only", TERM_ONLY_IP, [http()]),
        endpoint_slice("term-only", [terminating(a, True), terminating(b, False)], [HTTP]),
        service("term-mixed", TERM_MIXED_IP, [http()]),
        endpoint_slice(
            "term-mixed", [endpoint(a), terminating(b, True), terminating(c, False)], [HTTP]
        ),
        service("not-serving", NOT_SERVING_IP, [http()]),
        endpoint_slice("not-serving", [terminating(b, False)], [HTTP]),
    ]
    kproxy_sync(topo, write_state, objects)
    x = topo.pods["x"].ns

    what = (
        f"TCP {TERM_ONLY_IP}:80 from pod x (no ready endpoint; a serving+terminating, "
        f"b not serving)"
    )
    answered_by(topo, ("tcp", x, TERM_ONLY_IP, 80, 20), {"a"}, what)
    what = (
        f"TCP {TERM_MIXED_IP}:80 from pod x (a ready, b serving+terminating, c not serving): "
        f"only the ready one"
    )
    answered_by(topo, ("tcp", x, TERM_MIXED_IP, 80, 20), {"a"}, what)
    replies = topo.tcp(x, NOT_SERVING_IP, 80, count=3, timeout=DROP_TIMEOUT)
    assert all(r.result == "refused" for r in replies), (
        f"TCP {NOT_SERVING_IP}:80 whose only endpoint b is not serving must be rejected "
        f"like a Service without endpoints, got {describe(replies)}\n{rules(topo)}"
    )


V6_CLUSTER_IP, V4_CLUSTER_IP = "fd00:10:96::10", "10.96.1.70"
DUAL_CLUSTER_IPS = ["10.96.1.71", "fd00:10:96::11"]


def test_ipv6_cluster_ip_and_ipv4_side_by_side(dual_stack, write_state):
    topo = dual_stack
    a, b, c = topo.pods["a"], topo.pods["b"], topo.pods["c"]
    objects = [
        service("web6", V6_CLUSTER_IP, [http(), dns()]),
        endpoint_slice("web6", [endpoint(a, family=6), endpoint(b, family=6)], [HTTP, DNS], 6),
        service("web4", V4_CLUSTER_IP, [http()]),
        endpoint_slice("web4", [endpoint(a), endpoint(b)], [HTTP]),
    ]
    kproxy_sync(topo, write_state, objects, cidrs=(CLUSTER_CIDR, CLUSTER_CIDR6))

    what = f"TCP [{V6_CLUSTER_IP}]:80 from pod c"
    peers = answered_by(topo, ("tcp", c.ns, V6_CLUSTER_IP, 80, 30), {"a", "b"}, what, family=6)
    for pod, addresses in peers.items():
        assert addresses == {c.ip6}, (
            f"{what}: pod {pod} saw {sorted(addresses)}, expected the unmasqueraded pod "
            f"address {c.ip6} (pod CIDR {CLUSTER_CIDR6})\n{rules(topo, 6)}"
        )
    what = f"TCP [{V6_CLUSTER_IP}]:80 from node-1"
    answered_by(topo, ("tcp", topo.node, V6_CLUSTER_IP, 80, 30), {"a", "b"}, what, family=6)
    what = f"UDP [{V6_CLUSTER_IP}]:53 from pod c"
    answered_by(topo, ("udp", c.ns, V6_CLUSTER_IP, 53, 20), {"a", "b"}, what, family=6)

    what = f"TCP {V4_CLUSTER_IP}:80 from pod c (IPv4 Service next to an IPv6 one)"
    answered_by(topo, ("tcp", c.ns, V4_CLUSTER_IP, 80, 20), {"a", "b"}, what)
    if topo.proxy_mode == "nftables":
        nat4, nat6 = nft_rules(topo), nft_rules(topo, 6)
        assert V6_CLUSTER_IP in nat6 and V4_CLUSTER_IP not in nat6, (
            f"table ip6 kproxy should hold web6 and not web4:\n{nat6}"
        )
    else:
        nat4 = netns.iptables_save(topo.node, "nat")
    assert V6_CLUSTER_IP not in nat4 and a.ip6 not in nat4, (
        f"IPv6 addresses leaked into the IPv4 nat table:\n{nat4}"
    )


def test_dual_stack_service_answers_on_both_cluster_ips(dual_stack, write_state):
    topo = dual_stack
    a, b, c = topo.pods["a"], topo.pods["b"], topo.pods["c"]
    objects = [
        service("dual", DUAL_CLUSTER_IPS, [http()]),
        endpoint_slice("dual", [endpoint(a), endpoint(b)], [HTTP], 4),
        endpoint_slice("dual", [endpoint(a, family=6), endpoint(b, family=6)], [HTTP], 6),
    ]
    kproxy_sync(topo, write_state, objects, cidrs=(CLUSTER_CIDR, CLUSTER_CIDR6))
    for cluster_ip in DUAL_CLUSTER_IPS:
        family = 6 if ":" in cluster_ip else 4
        what = f"TCP {cluster_ip} port 80 from pod c (dual-stack Service)"
        answered_by(topo, ("tcp", c.ns, cluster_ip, 80, 20), {"a", "b"}, what, family=family)


MASQ_IP = "10.96.1.80"


def test_masquerade_cluster_cidr_and_masquerade_all(one_node, write_state):
    topo = one_node
    a, c = topo.pods["a"], topo.pods["c"]
    objects = [
        service("masq", MASQ_IP, [http()]),
        endpoint_slice("masq", [endpoint(a)], [HTTP]),
    ]
    kproxy_sync(topo, write_state, objects)
    what = f"TCP {MASQ_IP}:80 from pod c with --cluster-cidr {CLUSTER_CIDR}"
    peers = answered_by(topo, ("tcp", c.ns, MASQ_IP, 80, 5), {"a"}, what)
    assert_peers(topo, peers, {"a": c.ip}, what + ": pod traffic is not masqueraded")
    what = f"TCP {MASQ_IP}:80 from node-1 with --cluster-cidr {CLUSTER_CIDR}"
    peers = answered_by(topo, ("tcp", topo.node, MASQ_IP, 80, 5), {"a"}, what)
    assert_peers(topo, peers, {"a": NODE1_POD_GW}, what + ": non-pod traffic is masqueraded")

    kproxy_sync(topo, write_state, objects, "--masquerade-all")
    what = f"TCP {MASQ_IP}:80 from pod c with --masquerade-all"
    peers = answered_by(topo, ("tcp", c.ns, MASQ_IP, 80, 5), {"a"}, what)
    assert_peers(topo, peers, {"a": NODE1_POD_GW}, what)


DL_CLUSTER_IP, DL_ETP_CLUSTER_IP, DL_EXT_IP = "10.96.1.85", "10.96.1.86", "203.0.113.86"


@pytest.mark.parametrize("detect", ["NodeCIDR", "BridgeInterface", "InterfaceNamePrefix"])
def test_detect_local_mode_tells_pod_traffic_without_a_cluster_cidr(two_nodes, write_state, detect):
    """No --cluster-cidr: pod traffic is told by the Node's podCIDRs, by the interface pod c
    comes in on (the topology routes each pod over its own veth, vpX: one stands for a bridge,
    since `-i` matches any interface by name), or by the pods' interface name prefix. Without
    a detector, the node's own traffic would not be masqueraded and pod c's traffic to the
    ETP Local externalIP, whose only endpoint is remote, would be dropped."""
    topo = two_nodes
    a, r, c = topo.pods["a"], topo.pods["r"], topo.pods["c"]
    flags = {
        "NodeCIDR": [],
        "BridgeInterface": ["--pod-bridge-interface", c.host_if],
        "InterfaceNamePrefix": ["--pod-interface-name-prefix", "vp"],
    }[detect]
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": netns.NODE_NAME},
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
    }
    etp = service(
        "dl-etp",
        DL_ETP_CLUSTER_IP,
        [http()],
        externalTrafficPolicy="Local",
        externalIPs=[DL_EXT_IP],
    )
    objects = [
        node,
        service("dl", DL_CLUSTER_IP, [http()]),
        endpoint_slice("dl", [endpoint(a)], [HTTP]),
        etp,
        endpoint_slice("dl-etp", [endpoint(r)], [HTTP]),
    ]
    kproxy_sync(topo, write_state, objects, "--detect-local-mode", detect, *flags, cidrs=())
    # The rules read back as written (iptables-save's order of -s, -d, -i, -p; nft's iifname).
    diff = netns.run(
        topo.node,
        [sys.executable, "-m", "kproxy", "diff", "--state", str(write_state(objects))]
        + ["--mode", topo.proxy_mode, "--node-name", netns.NODE_NAME]
        + ["--detect-local-mode", detect, *flags],
        check=False,
        timeout=120,
    )
    assert diff.returncode == 0, diff.stdout + diff.stderr

    what = f"TCP {DL_CLUSTER_IP}:80 from pod c, --detect-local-mode {detect}"
    peers = answered_by(topo, ("tcp", c.ns, DL_CLUSTER_IP, 80, 3), {"a"}, what)
    assert_peers(topo, peers, {"a": c.ip}, what + ": pod traffic is not masqueraded")
    what = f"TCP {DL_CLUSTER_IP}:80 from node-1, --detect-local-mode {detect}"
    peers = answered_by(topo, ("tcp", topo.node, DL_CLUSTER_IP, 80, 3), {"a"}, what)
    assert_peers(topo, peers, {"a": NODE1_POD_GW}, what + ": non-pod traffic is masqueraded")
    what = f"TCP {DL_EXT_IP}:80 (ETP Local, only remote endpoint r) from pod c, {detect}"
    answered_by(topo, ("tcp", c.ns, DL_EXT_IP, 80, 3), {"r"}, what)


NP_CLUSTER_IP, NP_PORT = "10.96.1.90", 30090


def test_route_localnet_is_set_in_iptables_mode_only(proxy_mode, write_state):
    """`route_localnet=1` is what lets 127.0.0.1 NodePorts work (and opens 127/8 to martian
    traffic, k8s issue 90259): iptables mode sets it with --iptables-localhost-nodeports
    (default true), nftables mode never answers NodePorts on 127.0.0.1 and leaves it alone,
    as upstream's nftables mode, where that flag means nothing."""
    key = "net.ipv4.conf.all.route_localnet"
    with running((), clients=0, mode=proxy_mode) as topo:
        # A new namespace copies the host's IPv4 settings: start from 0 whatever they are.
        netns.sysctl(topo.node, key, 0)
        objects = [service("np", NP_CLUSTER_IP, [http(node_port=NP_PORT)], "NodePort")]
        kproxy_sync(topo, write_state, objects)
        value = netns.run(topo.node, ["sysctl", "-n", key]).stdout.strip()
        assert value == ("1" if proxy_mode == "iptables" else "0"), (
            f"{key} is {value} after `kproxy sync --mode {proxy_mode}`"
        )


def test_nodeport_addresses_and_localhost_nodeports(two_nodes, write_state):
    """NodePorts answer on every local address by default (127.0.0.1 included in iptables
    mode, upstream's default; never in nftables mode, as upstream's nftables mode, so there
    --iptables-localhost-nodeports does not apply), only on the chosen ones with
    --nodeport-addresses; elsewhere nothing captures the port and node-1's own stack refuses
    the connection."""
    topo = two_nodes
    a = topo.pods["a"]
    objects = [
        service("np", NP_CLUSTER_IP, [http(node_port=NP_PORT)], "NodePort"),
        endpoint_slice("np", [endpoint(a)], [HTTP]),
    ]
    client, node2 = topo.clients["client"].ns, topo.node2
    assert node2 is not None
    via_client = (client, NODE_IP, "the client")
    via_node2 = (node2, NODE1_LINK_IP, "node-2")
    via_localhost = (topo.node, "127.0.0.1", "node-1 itself")

    def check(flags: tuple[str, ...], answered: list, refused: list) -> None:
        kproxy_sync(topo, write_state, objects, *flags)
        for ns, host, who in answered:
            what = f"TCP {host}:{NP_PORT} from {who} with flags {list(flags)}"
            answered_by(topo, ("tcp", ns, host, NP_PORT, 3), {"a"}, what)
        for ns, host, who in refused:
            replies = topo.tcp(ns, host, NP_PORT, count=2, timeout=DROP_TIMEOUT)
            assert all(r.result == "refused" for r in replies), (
                f"TCP {host}:{NP_PORT} from {who} with flags {list(flags)}: the NodePort must "
                f"not be captured on {host} (node-1 refuses), got {describe(replies)}\n"
                f"{rules(topo)}"
            )

    if topo.proxy_mode == "nftables":
        check((), [via_client, via_node2], [via_localhost])
        check(
            ("--nodeport-addresses", "192.168.100.0/24"), [via_client], [via_node2, via_localhost]
        )
        # 127.0.0.0/8 named explicitly changes nothing: still never on localhost
        check(
            ("--nodeport-addresses", "127.0.0.0/8,192.168.100.0/24"), [via_client], [via_localhost]
        )
    else:
        check((), [via_client, via_node2, via_localhost], [])
        check(
            ("--nodeport-addresses", "192.168.100.0/24", "--iptables-localhost-nodeports", "false"),
            [via_client],
            [via_node2, via_localhost],
        )
    check(
        ("--nodeport-addresses", "primary", "--node-ip", NODE1_LINK_IP),
        [via_node2],
        [via_client],
    )
