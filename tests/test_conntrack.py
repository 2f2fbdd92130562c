"""Stale UDP conntrack cleanup: the pure decision, then real flows in a namespace topology."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import netns
import pytest

from kproxy.daemon.conntrack import Flow, UdpServicePort, stale_flows

REPO = Path(__file__).resolve().parents[1]
UDP, TCP = socket.IPPROTO_UDP, socket.IPPROTO_TCP

SVC_IP, EXT_IP, LB_IP = "10.96.0.53", "203.0.113.7", "198.51.100.9"
NODE_IP = "192.168.100.1"
EP_A, EP_B, EP_GONE = ("10.244.1.2", 5353), ("10.244.1.3", 5353), ("10.244.1.9", 5353)


def flow(
    dst: str,
    dport: int,
    reply: tuple[str, int],
    *,
    src: str = "10.244.1.4",
    sport: int = 40000,
    proto: int = UDP,
    family: int = socket.AF_INET,
) -> Flow:
    return Flow(
        family=family,
        proto=proto,
        orig_src=src,
        orig_dst=dst,
        orig_sport=sport,
        orig_dport=dport,
        reply_src=reply[0],
        reply_dst=src,
        reply_sport=reply[1],
        reply_dport=sport,
    )


def svc(
    endpoints=(EP_A, EP_B), ips=(SVC_IP, EXT_IP, LB_IP), port=53, node_port=30053
) -> UdpServicePort:
    return UdpServicePort(frozenset(ips), port, node_port, frozenset(endpoints))


NODE_IPS = frozenset({NODE_IP, "10.244.1.1"})  # where the node serves its NodePorts


def stale(flows, ports, node_port_ips=NODE_IPS):
    return stale_flows(flows, ports, node_port_ips)


# --------------------------------------------------------------------------- stale_flows


def test_flow_to_a_serving_endpoint_is_kept():
    flows = [flow(SVC_IP, 53, EP_A), flow(SVC_IP, 53, EP_B, sport=40001)]
    assert stale(flows, [svc()]) == []


@pytest.mark.parametrize("frontend", [SVC_IP, EXT_IP, LB_IP])
def test_flow_to_any_frontend_ip_replied_by_a_removed_endpoint_is_stale(frontend):
    gone = flow(frontend, 53, EP_GONE)
    good = flow(frontend, 53, EP_B, sport=40001)
    assert stale([gone, good], [svc()]) == [gone]


def test_endpoint_ip_right_but_port_changed_is_stale():
    moved = flow(SVC_IP, 53, (EP_A[0], 8053))  # the targetPort changed under the flow
    assert stale([moved], [svc()]) == [moved]


def test_flow_never_dnated_is_stale():
    # sent while the service had no endpoints (0 -> N, k8s issue 48370): nobody DNATed it
    undnated = flow(SVC_IP, 53, (SVC_IP, 53))
    assert stale([undnated], [svc()]) == [undnated]


def test_node_port_flows_judged_on_every_address_the_node_port_is_served_on():
    to_node = flow(NODE_IP, 30053, EP_GONE, src="192.168.100.2")
    to_other_local_ip = flow("10.244.1.1", 30053, EP_GONE, sport=40001)
    good = flow(NODE_IP, 30053, EP_A, src="192.168.100.2", sport=40002)
    flows = [to_node, to_other_local_ip, good]
    assert stale(flows, [svc()]) == [to_node, to_other_local_ip]
    # --nodeport-addresses 192.168.100.0/24: only that address serves the NodePort
    assert stale(flows, [svc()], frozenset({NODE_IP})) == [to_node]


def test_service_without_endpoints_still_has_its_flows_cleared():
    # upstream bug 139628 (fixed): a service port whose endpoints all went was skipped
    flows = [flow(SVC_IP, 53, EP_A), flow(NODE_IP, 30053, EP_B, sport=40001)]
    assert stale(flows, [svc(endpoints=())]) == flows


def test_flows_elsewhere_that_share_a_node_port_number_are_untouched():
    # Pod to pod (forwarded through the node) and to a remote host on port 30053: not sent
    # to the node, so not NodePort traffic, whatever the NodePort's endpoints (upstream
    # matches the port alone and, for a Service without endpoints, deletes them all).
    pod_to_pod = flow(EP_A[0], 30053, (EP_A[0], 30053))
    outward = flow("203.0.113.50", 30053, ("203.0.113.50", 30053), sport=40001)
    for endpoints in ((), (EP_B,)):
        assert stale([pod_to_pod, outward], [svc(endpoints=endpoints)]) == []


def test_other_protocols_ports_and_destinations_untouched():
    flows = [
        flow(SVC_IP, 53, EP_GONE, proto=TCP),  # TCP: never touched
        flow(SVC_IP, 54, EP_GONE),  # same IP, another port
        flow("10.96.0.99", 53, EP_GONE),  # another IP, same port
        flow("10.244.1.3", 5353, EP_B),  # pod to pod, no service
    ]
    assert stale(flows, [svc()]) == []


def test_no_service_ports_means_nothing_is_deleted():
    # a restart with nothing known yet must never clear flows (upstream issue 122740)
    assert stale([flow(SVC_IP, 53, EP_GONE)], []) == []


def test_frontend_match_takes_precedence_over_an_equal_node_port():
    # ClusterIP port 30053 of one service, NodePort 30053 of another: a flow to the
    # ClusterIP reaching that service's endpoint is good whatever the NodePort's endpoints
    cluster = svc(endpoints=(EP_A,), ips=("10.96.0.60",), port=30053, node_port=0)
    other = svc(endpoints=(EP_B,), ips=(SVC_IP,), port=53, node_port=30053)
    good = flow("10.96.0.60", 30053, EP_A)
    bad = flow("10.96.0.60", 30053, EP_B, sport=40001)
    assert stale([good, bad], [cluster, other]) == [bad]


def test_ipv6_addresses_compared_canonically():
    port = UdpServicePort(
        frozenset({"fd00:96::0:53"}), 53, 0, frozenset({("fd00:10:244:1:0::2", 5353)})
    )
    six = socket.AF_INET6
    good = flow("fd00:96::53", 53, ("fd00:10:244:1::2", 5353), src="fd00::4", family=six)
    bad = flow("fd00:96::53", 53, ("fd00:10:244:1::3", 5353), src="fd00::4", family=six)
    assert stale([good, bad], [port]) == [bad]


def test_duplicate_frontends_keep_flows_to_either_endpoint_set():
    one = svc(endpoints=(EP_A,), node_port=0)
    two = svc(endpoints=(EP_B,), node_port=0)
    flows = [flow(SVC_IP, 53, EP_A), flow(SVC_IP, 53, EP_B, sport=40001)]
    assert stale(flows, [one, two]) == []


# --------------------------------------------------------------------------- owed cleanups


def report(ok: bool, udp_change: bool, failed: tuple[str, ...] = ()):
    from kproxy.daemon.reconciler import SyncReport
    from kproxy.model import NodeConfig
    from kproxy.sources.store import Changes, ObjectStore

    store = ObjectStore("node-1")
    store.apply("Service", "ADDED", dns_objects([POD_A])[0])
    state, changes = store.snapshot()
    return SyncReport(
        ok=ok,
        full=False,
        state=state,
        changes=changes if udp_change else Changes(),
        failed_families=list(failed),
        config=NodeConfig(node_name="node-1"),
    )


def test_a_cleanup_owed_by_a_failed_sync_is_done_by_the_next_successful_one():
    from kproxy.daemon.conntrack import ConntrackCleanup

    cleaned: list[tuple[int, bool]] = []
    results: list[int | None] = []

    def clean(rep, version: int) -> int | None:
        cleaned.append((version, rep.ok))
        return results.pop(0) if results else 0

    owed = ConntrackCleanup(["IPv4", "IPv6"], "iptables", clean=clean)
    # A UDP endpoint change whose sync was postponed (nothing applied): nothing cleaned yet.
    owed.after_sync(report(False, True, failed=("IPv4", "IPv6")))
    assert cleaned == [] and owed.due == {"IPv4", "IPv6"}
    # The next sync applies IPv6 but IPv4 fails: IPv6 is cleaned, IPv4 stays owed.
    owed.after_sync(report(False, False, failed=("IPv4",)))
    assert cleaned == [(6, False)] and owed.due == {"IPv4"}
    # A successful sync with no change of its own pays the rest; its cleanup failing once
    # keeps it owed for the sync after.
    results.append(None)
    owed.after_sync(report(True, False))
    assert cleaned[-1] == (4, True) and owed.due == {"IPv4"}
    owed.after_sync(report(True, False))
    assert cleaned[-1] == (4, True) and owed.due == set()
    # Nothing owed, nothing changed: no cleanup at all.
    owed.after_sync(report(True, False))
    assert len(cleaned) == 3


# --------------------------------------------------------------------------- kernel

DNS_NODE_PORT = 30053
POD_A, POD_B = EP_A[0], EP_B[0]
SPORTS = list(range(40100, 40116))  # 16 flows: each endpoint gets some, bar 2**-15 luck

# Sends one datagram from each fixed source port (so each port is one conntrack flow) and
# prints {sport: answering pod | TIMEOUT | REFUSED}.
FIXED_PORT_CLIENT = r"""
import json, socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
out = {}
for sport in map(int, sys.argv[4:]):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", sport))
    s.settimeout(timeout)
    try:
        s.sendto(b"ping", (host, port))
        out[sport] = s.recvfrom(4096)[0].decode().split()[0]
    except TimeoutError:
        out[sport] = "TIMEOUT"
    except ConnectionRefusedError:
        out[sport] = "REFUSED"
    finally:
        s.close()
print(json.dumps(out))
"""

# Runs inside the node namespace: {"op": "list"} or {"op": "cleanup", "ports": [...]}.
NODE_HELPER = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[1])
from kproxy.daemon.conntrack import UdpServicePort, cleanup, list_udp_flows
from kproxy.daemon.metrics import Metrics
req = json.load(sys.stdin)
if req["op"] == "list":
    flows = list_udp_flows(socket.AF_INET)
    print(json.dumps([{k: v for k, v in vars(f).items() if k != "family"} for f in flows]))
else:
    ports = [
        UdpServicePort(frozenset(p["ips"]), p["port"], p["node_port"],
                       frozenset(tuple(e) for e in p["endpoints"]))
        for p in req["ports"]
    ]
    m = Metrics(process_metrics=False)
    n = cleanup(ports, socket.AF_INET, frozenset(req["node_port_ips"]), m)
    value = m.registry.get_sample_value
    ct = "kubeproxy_conntrack_reconciler_"
    print(json.dumps({
        "deleted": n,
        "metric": value(ct + "deleted_entries_total"),
        "timed": value(ct + "sync_duration_seconds_count"),
    }))
"""


def dns_objects(endpoint_ips: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "dns", "namespace": "default"},
            "spec": {
                "type": "NodePort",
                "clusterIP": SVC_IP,
                "clusterIPs": [SVC_IP],
                "ports": [
                    {
                        "name": "dns",
                        "port": 53,
                        "protocol": "UDP",
                        "targetPort": 5353,
                        "nodePort": DNS_NODE_PORT,
                    }
                ],
            },
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "dns-abcde",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "dns"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": [ip], "nodeName": "node-1", "conditions": {"ready": True}}
                for ip in endpoint_ips
            ],
        },
    ]


def dns_ports(endpoint_ips: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "ips": [SVC_IP],
            "port": 53,
            "node_port": DNS_NODE_PORT,
            "endpoints": [[ip, 5353] for ip in endpoint_ips],
        }
    ]


def cleanup_request(endpoint_ips: list[str]) -> dict[str, Any]:
    # The NodePort is served on every local address (no --nodeport-addresses): NODE_IP is one.
    return {"op": "cleanup", "ports": dns_ports(endpoint_ips), "node_port_ips": [NODE_IP]}


def sync(topo: netns.Topology, state: Path) -> None:
    argv = [sys.executable, "-m", "kproxy", "sync", "--state", str(state)]
    argv += ["--cluster-cidr", "10.244.0.0/16", "--node-name", "node-1"]
    # A lock of the test's own: the host's /run/kproxy.lock is shared with other test runs.
    argv += ["--lock-file", str(state.parent / "kproxy.lock")]
    proc = netns.run(topo.node, argv, check=False, timeout=120)
    assert proc.returncode == 0, f"kproxy sync failed: {proc.stderr}"


def send(ns: str, host: str, port: int, sports: list[int]) -> dict[int, str]:
    argv = [sys.executable, "-c", FIXED_PORT_CLIENT, host, str(port), "1.0", *map(str, sports)]
    out = json.loads(netns.run(ns, argv, timeout=60).stdout)
    return {int(k): v for k, v in out.items()}


def node_helper(topo: netns.Topology, request: dict[str, Any]) -> Any:
    argv = [sys.executable, "-c", NODE_HELPER, str(REPO)]
    proc = netns.run(topo.node, argv, input=json.dumps(request), timeout=60)
    return json.loads(proc.stdout)


def conntrack_ids(topo: netns.Topology) -> dict[tuple[str, int], tuple[str, int]]:
    """(orig src, orig sport) -> (reply src, conntrack id) of every UDP flow in the node."""
    return {
        (f["orig_src"], f["orig_sport"]): (f["reply_src"], f["id"])
        for f in node_helper(topo, {"op": "list"})
    }


@pytest.mark.kernel
def test_cleanup_unpins_flows_from_a_removed_endpoint(topology, write_state):
    topo = topology
    pod_c = topo.pods["c"]
    client = topo.clients["client"]
    sync(topo, write_state(dns_objects([POD_A, POD_B])))

    # 1. one flow per source port, from a pod (ClusterIP) and an external client (NodePort)
    via_cluster_ip = send(pod_c.ns, SVC_IP, 53, SPORTS)
    via_node_port = send(client.ns, NODE_IP, DNS_NODE_PORT, SPORTS)
    for answers in (via_cluster_ip, via_node_port):
        assert set(answers.values()) == {"a", "b"}, answers
    before = conntrack_ids(topo)
    assert len(before) == 2 * len(SPORTS), before

    # 2. with both endpoints serving, cleanup deletes nothing (no "clear all on start")
    result = node_helper(topo, cleanup_request([POD_A, POD_B]))
    assert result["deleted"] == 0 and result["timed"] == 1
    assert conntrack_ids(topo) == before

    # 3. endpoint a removed and synced: its UDP flows stay pinned to a (a still answers)
    sync(topo, write_state(dns_objects([POD_B])))
    assert send(pod_c.ns, SVC_IP, 53, SPORTS) == via_cluster_ip
    assert send(client.ns, NODE_IP, DNS_NODE_PORT, SPORTS) == via_node_port
    on_a = {key for key, (reply, _) in before.items() if reply == POD_A}
    on_b = {key for key, (reply, _) in before.items() if reply == POD_B}
    assert on_a and on_b

    # 4. cleanup in the node namespace deletes exactly the flows replied by a
    result = node_helper(topo, cleanup_request([POD_B]))
    assert result["deleted"] == len(on_a), result
    assert result["metric"] == len(on_a)
    after = conntrack_ids(topo)
    assert set(after) == on_b, "only the flows to the removed endpoint may go"
    assert all(after[key] == before[key] for key in on_b), "valid flows must be untouched"
    listing = netns.run(topo.node, ["conntrack", "-L", "-p", "udp"]).stdout
    assert f"src={POD_A} " not in listing, listing
    assert listing.count(f"src={POD_B} ") == len(on_b), listing

    # 5. the next datagram of every flow reaches the remaining endpoint; b's flows were
    # never re-created (same conntrack ids)
    assert set(send(pod_c.ns, SVC_IP, 53, SPORTS).values()) == {"b"}
    assert set(send(client.ns, NODE_IP, DNS_NODE_PORT, SPORTS).values()) == {"b"}
    final = conntrack_ids(topo)
    assert all(final[key] == before[key] for key in on_b)
    assert all(final[key][0] == POD_B for key in on_a)
