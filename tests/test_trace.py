"""Packet-flow tests: every Service behaviour traced through the rendered rules, from a pod,
from the node and from an external client, modelled on the cases upstream checks."""

import ipaddress

import pytest

from kproxy.iptables.plan import full_table
from kproxy.iptables.render import IPV4, IPV6, render
from kproxy.iptables.rules import Table
from kproxy.iptables.trace import Tracer
from kproxy.model import NodeConfig, build_state
from kproxy.nftables.render import NFT_IPV4, NFT_IPV6, render_nft
from kproxy.nftables.table import parse_table
from kproxy.nftables.trace import NftTracer
from kproxy.tracecore import Packet

NODE_IP = "192.168.100.1"
CLIENT = "192.168.100.2"
OTHER_CLIENT = "192.168.100.3"
POD = "10.244.1.9"  # a pod on this node
A, R = "10.244.1.2", "10.244.2.2"  # endpoint on this node, endpoint on node-2
T = "10.244.1.7"  # a terminating endpoint on this node


def ep(ip, node="node-1", ready=True, serving=None, terminating=False, zones=None):
    e = {
        "addresses": [ip],
        "nodeName": node,
        "conditions": {
            "ready": ready,
            "serving": ready if serving is None else serving,
            "terminating": terminating,
        },
    }
    if zones is not None:
        e["hints"] = {"forZones": [{"name": z} for z in zones]}
    return e


def svc(name, ip, *endpoints, svc_type="ClusterIP", node_port=None, family="IPv4", **spec):
    port = {"name": "p", "port": 80, "protocol": "TCP"}
    if node_port:
        port["nodePort"] = node_port
    status = spec.pop("status", {})
    return [
        {
            "kind": "Service",
            "metadata": {"namespace": "ns", "name": name},
            "spec": {"type": svc_type, "clusterIP": ip, "ports": [port], **spec},
            "status": status,
        },
        {
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": "ns",
                "name": f"{name}-1",
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": family,
            "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
            "endpoints": list(endpoints),
        },
    ]


LB = {"loadBalancer": {"ingress": [{"ip": "198.51.100.11"}]}}
OBJECTS = [
    *svc(
        "web",
        "10.96.0.10",
        ep(A),
        ep(R, "node-2"),
        svc_type="NodePort",
        node_port=30080,
        externalIPs=["203.0.113.10"],
    ),
    *svc(
        "local",
        "10.96.0.11",
        ep(A),
        ep(R, "node-2"),
        svc_type="LoadBalancer",
        node_port=30081,
        externalTrafficPolicy="Local",
        externalIPs=["203.0.113.11"],
        healthCheckNodePort=32000,
        status=LB,
    ),
    *svc(
        "local-remote",
        "10.96.0.12",
        ep(R, "node-2"),
        svc_type="NodePort",
        node_port=30082,
        externalTrafficPolicy="Local",
    ),
    *svc("itp", "10.96.0.13", ep(A), ep(R, "node-2"), internalTrafficPolicy="Local"),
    *svc("itp-remote", "10.96.0.14", ep(R, "node-2"), internalTrafficPolicy="Local"),
    *svc(
        "ranges",
        "10.96.0.15",
        ep(A),
        svc_type="LoadBalancer",
        node_port=30085,
        loadBalancerSourceRanges=[f"{CLIENT}/32"],
        status={"loadBalancer": {"ingress": [{"ip": "198.51.100.15"}]}},
    ),
    *svc(
        "sticky",
        "10.96.0.16",
        ep(A),
        ep(R, "node-2"),
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}},
    ),
    *svc("empty", "10.96.0.17", svc_type="NodePort", node_port=30087),
    *svc("term", "10.96.0.18", ep(T, ready=False, serving=True, terminating=True)),
    *svc("mixed", "10.96.0.19", ep(A), ep(T, ready=False, serving=True, terminating=True)),
    *svc("notserving", "10.96.0.20", ep(T, ready=False, serving=False, terminating=True)),
    *svc("zoned", "10.96.0.21", ep(A, zones=["z1"]), ep(R, "node-2", zones=["z2"])),
    *svc("half-zoned", "10.96.0.22", ep(A, zones=["z1"]), ep(R, "node-2")),
    *svc(
        "proxied-lb",
        "10.96.0.23",
        ep(A),
        svc_type="LoadBalancer",
        node_port=30083,
        status={"loadBalancer": {"ingress": [{"ip": "198.51.100.23", "ipMode": "Proxy"}]}},
    ),
    *svc(
        "v6",
        "fd00:10:96::10",
        ep("fd00:10:244:1::2"),
        ep("fd00:10:244:2::2", "node-2"),
        family="IPv6",
        ipFamilies=["IPv6"],
    ),
    {
        "kind": "Node",
        "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": "z1"}},
        "spec": {"podCIDRs": ["10.244.1.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]},
    },
]


MODE = {"mode": "iptables"}


@pytest.fixture(autouse=True, params=["iptables", "nftables", "nftables-inline"])
def mode(request):
    """Every packet-flow test runs against both renderers (nftables's with endpoint dispatch
    through named maps and inline, as upstream writes it): same behaviour expected."""
    MODE["mode"] = request.param
    yield request.param
    MODE["mode"] = "iptables"


def tracer_for(state, config, family_version):
    local = {ipaddress.ip_address(ip) for ip in config.node_ips}
    if MODE["mode"].startswith("nftables"):
        fam = NFT_IPV6 if family_version == 6 else NFT_IPV4
        inline = MODE["mode"] == "nftables-inline"
        table = render_nft(state, config, fam, inline_dispatch=inline).table
        if inline:  # the inline form is what is traced, not a named map
            assert not [n for n in table.sets if n.startswith(("endpoints-", "local-endpoints-"))]
        return NftTracer(table, local)
    ruleset = render(state, config, IPV6 if family_version == 6 else IPV4).ruleset
    tables = {n: full_table(ruleset, n, Table(n)) for n in ("nat", "filter")}
    return Tracer(tables, local)


def trace(src, dst, port=80, origin=None, masquerade_all=False, proto="tcp", iif="", **detect):
    state, warnings = build_state(OBJECTS, node_name="node-1")
    assert warnings == []
    config = NodeConfig(
        node_name="node-1",
        cluster_cidrs=("10.244.0.0/16", "fd00:10:244::/48"),
        node_ips=(NODE_IP, "fd00:192:168:100::1"),
        masquerade_all=masquerade_all,
        **detect,
    )
    if origin is None:
        origin = (
            "node"
            if src in (NODE_IP, "fd00:192:168:100::1")
            else ("pod" if src.startswith(("10.244.", "fd00:10:244")) else "external")
        )
    packet = Packet(ipaddress.ip_address(src), ipaddress.ip_address(dst), proto, port, iif=iif)
    return tracer_for(state, config, 6 if ":" in dst else 4).trace(packet, origin)


def dnats(outcomes):
    """{endpoint ip: probability} for accepted, DNATed outcomes."""
    out = {}
    for o in outcomes:
        if o.verdict == "ACCEPT" and o.dnat:
            ip = o.dnat.rsplit(":", 1)[0].strip("[]")
            out[ip] = out.get(ip, 0) + o.probability
    return out


def only(outcomes):
    assert len(outcomes) == 1, outcomes
    return outcomes[0]


def masq(outcomes):
    return {o.masquerade for o in outcomes if o.verdict == "ACCEPT"}


# --- ClusterIP, NodePort, externalIP, no endpoints, masquerading ---


def test_cluster_ip_from_pod_balances_without_masquerade():
    out = trace(POD, "10.96.0.10")
    assert dnats(out) == pytest.approx({A: 0.5, R: 0.5})
    assert masq(out) == {False}


def test_cluster_ip_from_node_is_masqueraded():
    out = trace(NODE_IP, "10.96.0.10")
    assert dnats(out) == pytest.approx({A: 0.5, R: 0.5})
    assert masq(out) == {True}


def test_masquerade_all_masquerades_pods_too():
    assert masq(trace(POD, "10.96.0.10", masquerade_all=True)) == {True}


def test_nodeport_and_external_ip_from_outside_masquerade_to_all_endpoints():
    for dst, port in ((NODE_IP, 30080), ("203.0.113.10", 80)):
        out = trace(CLIENT, dst, port)
        assert dnats(out) == pytest.approx({A: 0.5, R: 0.5}), dst
        assert masq(out) == {True}, dst


def test_wrong_port_or_unknown_ip_is_not_touched(mode):
    o = only(trace(POD, "10.96.0.10", 81))
    # nftables mode refuses unknown ports of a ClusterIP, as upstream's nftables mode does.
    assert (o.verdict, o.dnat) == ("ACCEPT" if mode == "iptables" else "REJECT", None)
    o = only(trace(POD, "10.96.99.99", 80))
    assert (o.verdict, o.dnat) == ("ACCEPT", None)
    o = only(trace(CLIENT, NODE_IP, 30999))
    assert (o.verdict, o.dnat, o.delivered) == ("ACCEPT", None, "local")


def test_no_endpoints_is_rejected_for_cluster_ip_and_nodeport():
    for src in (POD, NODE_IP):
        assert only(trace(src, "10.96.0.17")).verdict == "REJECT", src
    assert only(trace(CLIENT, NODE_IP, 30087)).verdict == "REJECT"


@pytest.mark.parametrize(
    ("detect", "pod_iif"),
    [
        ({"detect_local_mode": "BridgeInterface", "bridge_interface": "cbr0"}, "cbr0"),
        ({"detect_local_mode": "InterfaceNamePrefix", "interface_name_prefix": "veth"}, "veth7"),
    ],
)
def test_pod_traffic_told_by_its_interface(detect, pod_iif):
    # The same source address in the cluster CIDR: only the interface tells a pod's traffic.
    out = trace(POD, "10.96.0.10", iif=pod_iif, **detect)
    assert dnats(out) == pytest.approx({A: 0.5, R: 0.5}) and masq(out) == {False}
    assert masq(trace(POD, "10.96.0.10", origin="pod", iif="eth1", **detect)) == {True}
    assert masq(trace(NODE_IP, "10.96.0.10", **detect)) == {True}
    # ETP Local: a pod's traffic to the external IP goes to every endpoint; an outsider's
    # only to the local one.
    assert dnats(trace(POD, "198.51.100.11", iif=pod_iif, **detect)) == pytest.approx(
        {A: 0.5, R: 0.5}
    )
    assert dnats(trace(POD, "198.51.100.11", origin="pod", iif="eth1", **detect)) == {A: 1.0}


def test_pod_traffic_told_by_the_nodes_pod_cidr():
    detect = {"detect_local_mode": "NodeCIDR"}
    assert masq(trace(POD, "10.96.0.10", **detect)) == {False}
    # A pod of another node (in the cluster CIDR, not in this node's podCIDRs) is masqueraded
    # under NodeCIDR and not under ClusterCIDR.
    assert masq(trace("10.244.2.9", "10.96.0.10", origin="pod", **detect)) == {True}
    assert masq(trace("10.244.2.9", "10.96.0.10", origin="pod")) == {False}


# --- externalTrafficPolicy: Local ---


def test_etp_local_external_traffic_keeps_source_and_goes_to_local_endpoint_only():
    for dst, port in ((NODE_IP, 30081), ("203.0.113.11", 80), ("198.51.100.11", 80)):
        out = trace(CLIENT, dst, port)
        assert dnats(out) == pytest.approx({A: 1.0}), dst
        assert masq(out) == {False}, dst


def test_etp_local_pod_traffic_to_external_ip_is_short_circuited_to_all_endpoints():
    out = trace(POD, "198.51.100.11")
    assert dnats(out) == pytest.approx({A: 0.5, R: 0.5})
    assert masq(out) == {False}


def test_etp_local_node_traffic_to_nodeport_is_masqueraded_to_all_endpoints():
    out = trace(NODE_IP, NODE_IP, 30081)
    assert dnats(out) == pytest.approx({A: 0.5, R: 0.5})
    assert masq(out) == {True}


def test_etp_local_cluster_ip_still_uses_every_endpoint():
    assert dnats(trace(POD, "10.96.0.11")) == pytest.approx({A: 0.5, R: 0.5})


def test_etp_local_without_local_endpoints_drops_external_but_not_pod_traffic():
    o = only(trace(CLIENT, NODE_IP, 30082))
    assert o.verdict == "DROP" and o.dnat is None
    assert dnats(trace(POD, NODE_IP, 30082)) == pytest.approx({R: 1.0})


# --- internalTrafficPolicy: Local ---


def test_itp_local_uses_only_local_endpoints():
    assert dnats(trace(POD, "10.96.0.13")) == pytest.approx({A: 1.0})
    assert dnats(trace(NODE_IP, "10.96.0.13")) == pytest.approx({A: 1.0})


def test_itp_local_without_local_endpoints_drops_not_rejects():
    for src in (POD, NODE_IP):
        assert only(trace(src, "10.96.0.14")).verdict == "DROP", src


# --- loadBalancerSourceRanges ---


def test_source_ranges_allow_listed_clients_and_drop_others():
    out = trace(CLIENT, "198.51.100.15")
    assert dnats(out) == pytest.approx({A: 1.0})
    o = only(trace(OTHER_CLIENT, "198.51.100.15"))
    assert o.verdict == "DROP" and o.dnat is None
    assert any(c in ("KUBE-PROXY-FIREWALL", "firewall-check") for c in o.path), o.path


def test_nodeports_are_not_subject_to_source_ranges():
    assert dnats(trace(OTHER_CLIENT, NODE_IP, 30085)) == pytest.approx({A: 1.0})


def test_lb_ip_with_proxy_ip_mode_is_not_captured():
    o = only(trace(CLIENT, "198.51.100.23"))
    assert o.dnat is None


# --- session affinity ---


def test_affinity_checks_recent_lists_before_balancing():
    out = trace(POD, "10.96.0.16")
    assert dnats(out) == pytest.approx({A: 0.5, R: 0.5})
    notes = [n for o in out for n in o.notes]
    assert any(
        "in the last 600s sticks to KUBE-SEP-" in n or "seen within 10m sticks to" in n
        for n in notes
    ), notes


# --- terminating endpoints ---


def test_serving_terminating_endpoints_used_only_when_nothing_is_ready():
    assert dnats(trace(POD, "10.96.0.18")) == pytest.approx({T: 1.0})
    assert dnats(trace(POD, "10.96.0.19")) == pytest.approx({A: 1.0})
    assert only(trace(POD, "10.96.0.20")).verdict == "REJECT"


# --- topology ---


def test_zone_hints_keep_traffic_in_zone_only_when_every_endpoint_has_hints():
    assert dnats(trace(POD, "10.96.0.21")) == pytest.approx({A: 1.0})
    assert dnats(trace(POD, "10.96.0.22")) == pytest.approx({A: 0.5, R: 0.5})


# --- dual-stack ---


def test_ipv6_cluster_ip():
    out = trace("fd00:10:244:1::9", "fd00:10:96::10")
    assert dnats(out) == pytest.approx({"fd00:10:244:1::2": 0.5, "fd00:10:244:2::2": 0.5})
    assert masq(out) == {False}
    out = trace("fd00:192:168:100::1", "fd00:10:96::10")
    assert masq(out) == {True}


def test_ipv4_rules_never_capture_ipv6_services():
    assert dnats(trace(POD, "10.96.0.10")) and not dnats(trace(POD, "10.96.0.99"))
    o = only(trace("fd00:10:244:1::9", "fd00:10:96::99"))
    assert o.dnat is None


def test_node_hints_prefer_this_node_when_every_endpoint_has_them():
    objs = [
        *svc(
            "by-node",
            "10.96.0.30",
            {**ep(A), "hints": {"forNodes": [{"name": "node-1"}]}},
            {**ep(R, "node-2"), "hints": {"forNodes": [{"name": "node-2"}]}},
        ),
    ]
    state, _ = build_state(objs, node_name="node-1")
    packet = Packet(ipaddress.ip_address(POD), ipaddress.ip_address("10.96.0.30"), "tcp", 80)
    config = NodeConfig(node_name="node-1", cluster_cidrs=("10.244.0.0/16",))
    assert dnats(tracer_for(state, config, 4).trace(packet, "pod")) == pytest.approx({A: 1.0})
    # On node-2 the same Service goes to node-2's endpoint.
    config2 = NodeConfig(node_name="node-2", cluster_cidrs=("10.244.0.0/16",))
    assert dnats(tracer_for(state, config2, 4).trace(packet, "pod")) == pytest.approx({R: 1.0})


INLINE_LISTING = """table ip kproxy {
	map service-ips {
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = { 10.96.7.7 . tcp . 80 : goto service-X-ns/s/tcp/p }
	}

	chain nat-output {
		type nat hook output priority -100; policy accept;
		jump services
	}

	chain services {
		ip daddr . meta l4proto . th dport vmap @service-ips
	}

	chain service-X-ns/s/tcp/p {
		numgen random mod 3 vmap { 0 : goto endpoint-A, 1 : goto endpoint-B, 2 : goto endpoint-C }
	}

	chain endpoint-A {
		meta l4proto tcp dnat to 10.244.1.7:8080
	}

	chain endpoint-B {
		meta l4proto tcp dnat to 10.244.1.8:8080
	}

	chain endpoint-C {
		meta l4proto tcp dnat to 10.244.1.9:8080
	}
}
"""


def test_a_live_tables_inline_dispatch_is_followed(mode):
    """`kproxy trace` of a live node parses `nft list table`: upstream's inline vmap (here as
    nft 1.0.6 prints it) spreads connections over its arms, one arm included."""
    if mode != "nftables-inline":
        pytest.skip("a listing, not a render")
    table = parse_table(INLINE_LISTING, "ip")
    packet = Packet(ipaddress.ip_address(NODE_IP), ipaddress.ip_address("10.96.7.7"), "tcp", 80)
    out = NftTracer(table, {ipaddress.ip_address(NODE_IP)}).trace(packet, "node")
    third = pytest.approx(1 / 3)
    assert dnats(out) == {"10.244.1.7": third, "10.244.1.8": third, "10.244.1.9": third}
    chain = table.chains["service-X-ns/s/tcp/p"]
    chain.rules = ["numgen random mod 1 vmap { 0 : goto endpoint-B }"]
    out = NftTracer(table, {ipaddress.ip_address(NODE_IP)}).trace(packet, "node")
    assert dnats(out) == {"10.244.1.8": pytest.approx(1.0)}
