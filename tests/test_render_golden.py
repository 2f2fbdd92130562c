"""Golden test: a full render against upstream kube-proxy's expected dump.

Inputs are the ClusterIP, NodePort and no-endpoint Services of upstream's
TestOverallIPTablesRules (pkg/proxy/iptables/proxier_test.go: ns1/svc1, ns3/svc3, ns4/svc4
without its external IP, ns6/svc6; cluster CIDR 10.0.0.0/8). The expectation is upstream's,
written out by hand in the form iptables-save prints it (address prefixes, `-p` first, quoted
comments, MARK as --set-xmark, REJECT's --reject-with, probabilities as the kernel stores
them). Deliberate differences from that upstream test, all documented in the README:
- localhost NodePorts are off (no `-d 127.0.0.0/8 ... nfacct` rules, no KUBE-FIREWALL; the
  KUBE-NODEPORTS jump carries `! -d 127.0.0.0/8` as upstream writes it in that case);
- no nfacct counters; MASQUERADE with --random-fully (upstream adds it when iptables can);
- the KUBE-PROXY-CANARY chains of upstream's flush monitor are declared with the rules.
"""

from kproxy.model import NodeConfig, build_state
from kproxy.render.iptables import probability, render
from kproxy.ruleset import parse_save


def svc(ns, name, ip, svc_type="ClusterIP", node_port=None):
    port = {"name": "p80", "port": 80, "protocol": "TCP", "targetPort": 80}
    if node_port:
        port["nodePort"] = node_port
    return {
        "kind": "Service",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"type": svc_type, "clusterIP": ip, "ports": [port]},
    }


def slice_(ns, name, *ips):
    return {
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": ns,
            "name": f"{name}-1",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "p80", "port": 80, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip]} for ip in ips],
    }


OBJECTS = [
    svc("ns1", "svc1", "172.30.0.41"),
    svc("ns3", "svc3", "172.30.0.43", "NodePort", 3003),
    svc("ns4", "svc4", "172.30.0.44", "NodePort"),
    svc("ns6", "svc6", "172.30.0.46"),
    slice_("ns1", "svc1", "10.180.0.1"),
    slice_("ns3", "svc3", "10.180.0.3"),
    slice_("ns4", "svc4", "10.180.0.4", "10.180.0.5"),
]

EXPECTED = r"""
*filter
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-PROXY-CANARY - [0:0]
-A KUBE-SERVICES -d 172.30.0.46/32 -p tcp -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
:KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
:KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
-A KUBE-NODEPORTS -p tcp -m comment --comment "ns3/svc3:p80" -m tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -d 172.30.0.43/32 -p tcp -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-SERVICES -d 172.30.0.44/32 -p tcp -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-SERVICES ! -d 127.0.0.0/8 -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -s 10.180.0.5/32 -m comment --comment "ns4/svc4:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -p tcp -m comment --comment "ns4/svc4:p80" -m tcp -j DNAT --to-destination 10.180.0.5:80
-A KUBE-SEP-OYPFS5VJICHGATKP -s 10.180.0.3/32 -m comment --comment "ns3/svc3:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-OYPFS5VJICHGATKP -p tcp -m comment --comment "ns3/svc3:p80" -m tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SEP-SXIVWICOYRO3J4NJ -s 10.180.0.1/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SEP-UKSFD7AGPMPPLUHC -s 10.180.0.4/32 -m comment --comment "ns4/svc4:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-UKSFD7AGPMPPLUHC -p tcp -m comment --comment "ns4/svc4:p80" -m tcp -j DNAT --to-destination 10.180.0.4:80
-A KUBE-SVC-4SW47YFZTEDKD3PK ! -s 10.0.0.0/8 -d 172.30.0.44/32 -p tcp -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
-A KUBE-SVC-X27LE4BHSL4DOUIK ! -s 10.0.0.0/8 -d 172.30.0.43/32 -p tcp -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.180.0.3:80" -j KUBE-SEP-OYPFS5VJICHGATKP
-A KUBE-SVC-XPGD46QRK7WJZT7O ! -s 10.0.0.0/8 -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
COMMIT
*mangle
:KUBE-PROXY-CANARY - [0:0]
COMMIT
"""

EXPECTED_JUMPS = {
    ("filter", "INPUT"): [
        '-m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service '
        'portals" -j KUBE-EXTERNAL-SERVICES',
        '-m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS',
        '-m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
        "-j KUBE-PROXY-FIREWALL",
    ],
    ("filter", "FORWARD"): [
        '-m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service '
        'portals" -j KUBE-EXTERNAL-SERVICES',
        '-m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" '
        "-j KUBE-SERVICES",
        '-m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        '-m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
        "-j KUBE-PROXY-FIREWALL",
    ],
    ("filter", "OUTPUT"): [
        '-m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" '
        "-j KUBE-SERVICES",
        '-m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
        "-j KUBE-PROXY-FIREWALL",
    ],
    ("nat", "OUTPUT"): ['-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'],
    ("nat", "PREROUTING"): ['-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'],
    ("nat", "POSTROUTING"): [
        '-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING'
    ],
}


def test_full_render_equals_upstream_expectation():
    state, warnings = build_state(OBJECTS)
    assert warnings == []
    result = render(state, NodeConfig(node_name="test-node", cluster_cidrs=("10.0.0.0/8",)))
    assert result.warnings == []
    expected = parse_save(EXPECTED)
    got = result.ruleset.tables
    assert sorted(got) == sorted(expected)
    for table in expected:
        assert sorted(got[table].chains) == sorted(expected[table].chains), table
        for chain, rules in expected[table].chains.items():
            assert got[table].chains[chain] == rules, f"{table} {chain}"
    jumps: dict[tuple[str, str], list[str]] = {}
    for jump in result.ruleset.jumps:
        jumps.setdefault((jump.table, jump.chain), []).append(jump.rule)
    assert jumps == EXPECTED_JUMPS


def test_probabilities_are_upstreams_ten_decimals_as_the_kernel_stores_them():
    # Upstream writes 1/n with %0.10f; the kernel keeps round(p * 2^31) and prints 11 decimals.
    # These kernel outputs were read back from iptables-save on this iptables.
    assert probability(1) == "1.00000000000"
    assert probability(2) == "0.50000000000"
    assert probability(3) == "0.33333333349"
    assert probability(6) == "0.16666666651"
    assert probability(1001) == "0.00099900085"
    assert probability(100000) == "0.00001000008"
    values = [float(probability(n)) for n in range(1, 2000)]
    assert values == sorted(values, reverse=True)


def test_three_endpoints_get_one_third_one_half_then_unconditional():
    objects = [
        svc("ns", "s", "10.96.0.1"),
        slice_("ns", "s", "10.1.0.1", "10.1.0.2", "10.1.0.3"),
    ]
    state, _ = build_state(objects)
    rs = render(state, NodeConfig()).ruleset
    svc_chain = next(c for c in rs.tables["nat"].chains if c.startswith("KUBE-SVC-"))
    rules = rs.tables["nat"].chains[svc_chain]
    # No --cluster-cidr and no --masquerade-all: no masquerade rule, like upstream without a
    # local traffic detector.
    assert len(rules) == 3
    assert "--probability 0.33333333349" in rules[0]
    assert "--probability 0.50000000000" in rules[1]
    assert "statistic" not in rules[2]
