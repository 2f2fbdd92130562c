"""Golden test: a full render against upstream kube-proxy's expected dump.

Inputs are the six Services of upstream's TestOverallIPTablesRules
(pkg/proxy/iptables/proxier_test.go; cluster CIDR 10.0.0.0/8, node "test-node"). The
expectation is upstream's, written out by hand in the form iptables-save prints it (address
prefixes, `-p` first, quoted comments, MARK as --set-xmark, REJECT's --reject-with,
probabilities as the kernel stores them). Deliberate differences from that upstream test, all
documented in the README:
- no nfacct counters: upstream writes its `-d 127.0.0.0/8 ... -m nfacct` NodePort rules and the
  nfacct match on the INVALID drop only when it could create the counters; kproxy never does,
  which is exactly upstream's output without nfacct support;
- MASQUERADE with --random-fully (upstream adds it when iptables supports it, as here);
- the empty KUBE-PROXY-CANARY chains of upstream's flush monitor are declared with the rules.
"""

from kproxy.iptables.render import probability, render
from kproxy.iptables.rules import parse_save
from kproxy.model import NodeConfig, build_state


def svc(ns, name, ip, svc_type="ClusterIP", node_port=None, **spec):
    port = {"name": "p80", "port": 80, "protocol": "TCP", "targetPort": 80}
    if node_port:
        port["nodePort"] = node_port
    status = spec.pop("status", {})
    return {
        "kind": "Service",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"type": svc_type, "clusterIP": ip, "ports": [port], **spec},
        "status": status,
    }


def slice_(ns, name, *endpoints):
    return {
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": ns,
            "name": f"{name}-1",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "p80", "port": 80, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ep]} if isinstance(ep, str) else ep for ep in endpoints],
    }


OBJECTS = [
    # ClusterIP
    svc("ns1", "svc1", "172.30.0.41"),
    # LoadBalancer with Local traffic policy
    svc(
        "ns2",
        "svc2",
        "172.30.0.42",
        "LoadBalancer",
        3001,
        externalTrafficPolicy="Local",
        externalIPs=["192.168.99.22"],
        healthCheckNodePort=30000,
        status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}},
    ),
    # NodePort
    svc("ns3", "svc3", "172.30.0.43", "NodePort", 3003),
    # ExternalIP (type NodePort without a node port allocated)
    svc("ns4", "svc4", "172.30.0.44", "NodePort", externalIPs=["192.168.99.33"]),
    # LoadBalancer with Cluster policy, a source range with stray whitespace, and affinity;
    # healthCheckNodePort is ignored with Cluster policy.
    svc(
        "ns5",
        "svc5",
        "172.30.0.45",
        "LoadBalancer",
        3002,
        externalTrafficPolicy="Cluster",
        healthCheckNodePort=30000,
        loadBalancerSourceRanges=[" 203.0.113.0/25"],
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 10800}},
        status={"loadBalancer": {"ingress": [{"ip": "5.6.7.8"}]}},
    ),
    # ClusterIP without endpoints
    svc("ns6", "svc6", "172.30.0.46"),
    slice_("ns1", "svc1", "10.180.0.1"),
    # No nodeName: not local, so the Local policy has no endpoint on this node.
    slice_("ns2", "svc2", "10.180.0.2"),
    slice_("ns3", "svc3", "10.180.0.3"),
    slice_("ns4", "svc4", "10.180.0.4", {"addresses": ["10.180.0.5"], "nodeName": "test-node"}),
    slice_("ns5", "svc5", "10.180.0.3"),
]

EXPECTED = r"""
*filter
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-PROXY-CANARY - [0:0]
-A KUBE-NODEPORTS -p tcp -m comment --comment "ns2/svc2:p80 health check node port" -m tcp --dport 30000 -j ACCEPT
-A KUBE-SERVICES -d 172.30.0.46/32 -p tcp -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
-A KUBE-EXTERNAL-SERVICES -d 192.168.99.22/32 -p tcp -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp --dport 80 -j DROP
-A KUBE-EXTERNAL-SERVICES -d 1.2.3.4/32 -p tcp -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp --dport 80 -j DROP
-A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp --dport 3001 -j DROP
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-PROXY-FIREWALL -d 5.6.7.8/32 -p tcp -m comment --comment "ns5/svc5:p80 traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C" -m tcp --dport 80 -j DROP
COMMIT
*nat
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXT-4SW47YFZTEDKD3PK - [0:0]
:KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
:KUBE-FW-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
:KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
:KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
:KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
:KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
:KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
-A KUBE-NODEPORTS -p tcp -m comment --comment "ns2/svc2:p80" -m tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-NODEPORTS -p tcp -m comment --comment "ns3/svc3:p80" -m tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
-A KUBE-NODEPORTS -p tcp -m comment --comment "ns5/svc5:p80" -m tcp --dport 3002 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -d 172.30.0.42/32 -p tcp -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -d 192.168.99.22/32 -p tcp -m comment --comment "ns2/svc2:p80 external IP" -m tcp --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -d 1.2.3.4/32 -p tcp -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -d 172.30.0.43/32 -p tcp -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-SERVICES -d 172.30.0.44/32 -p tcp -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-SERVICES -d 192.168.99.33/32 -p tcp -m comment --comment "ns4/svc4:p80 external IP" -m tcp --dport 80 -j KUBE-EXT-4SW47YFZTEDKD3PK
-A KUBE-SERVICES -d 172.30.0.45/32 -p tcp -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -d 5.6.7.8/32 -p tcp -m comment --comment "ns5/svc5:p80 loadbalancer IP" -m tcp --dport 80 -j KUBE-FW-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-EXT-4SW47YFZTEDKD3PK -m comment --comment "masquerade traffic for ns4/svc4:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-4SW47YFZTEDKD3PK -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -s 10.0.0.0/8 -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-FW-NUKIZ6OKUXPJNT4C -s 203.0.113.0/25 -m comment --comment "ns5/svc5:p80 loadbalancer IP" -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "other traffic to ns5/svc5:p80 will be dropped by KUBE-PROXY-FIREWALL"
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -s 10.180.0.5/32 -m comment --comment "ns4/svc4:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -p tcp -m comment --comment "ns4/svc4:p80" -m tcp -j DNAT --to-destination 10.180.0.5:80
-A KUBE-SEP-I77PXRDZVX7PMWMN -s 10.180.0.3/32 -m comment --comment "ns5/svc5:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-I77PXRDZVX7PMWMN -p tcp -m comment --comment "ns5/svc5:p80" -m recent --set --name KUBE-SEP-I77PXRDZVX7PMWMN --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SEP-OYPFS5VJICHGATKP -s 10.180.0.3/32 -m comment --comment "ns3/svc3:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-OYPFS5VJICHGATKP -p tcp -m comment --comment "ns3/svc3:p80" -m tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -s 10.180.0.2/32 -m comment --comment "ns2/svc2:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -p tcp -m comment --comment "ns2/svc2:p80" -m tcp -j DNAT --to-destination 10.180.0.2:80
-A KUBE-SEP-SXIVWICOYRO3J4NJ -s 10.180.0.1/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SEP-UKSFD7AGPMPPLUHC -s 10.180.0.4/32 -m comment --comment "ns4/svc4:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-UKSFD7AGPMPPLUHC -p tcp -m comment --comment "ns4/svc4:p80" -m tcp -j DNAT --to-destination 10.180.0.4:80
-A KUBE-SVC-4SW47YFZTEDKD3PK ! -s 10.0.0.0/8 -d 172.30.0.44/32 -p tcp -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT ! -s 10.0.0.0/8 -d 172.30.0.42/32 -p tcp -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -j KUBE-SEP-RS4RBKLTHTF2IUXJ
-A KUBE-SVC-NUKIZ6OKUXPJNT4C ! -s 10.0.0.0/8 -d 172.30.0.45/32 -p tcp -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-I77PXRDZVX7PMWMN --mask 255.255.255.255 --rsource -j KUBE-SEP-I77PXRDZVX7PMWMN
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -j KUBE-SEP-I77PXRDZVX7PMWMN
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
        "-j KUBE-FIREWALL",
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
        "-j KUBE-FIREWALL",
    ],
    ("nat", "OUTPUT"): ['-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'],
    ("nat", "PREROUTING"): ['-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'],
    ("nat", "POSTROUTING"): [
        '-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING'
    ],
}


def render_upstream_set(**config):
    state, warnings = build_state(OBJECTS)
    assert warnings == []
    defaults = dict(node_name="test-node", cluster_cidrs=("10.0.0.0/8",), node_ips=("192.168.0.2",))
    return render(state, NodeConfig(**{**defaults, **config}))


def test_full_render_equals_upstream_expectation():
    result = render_upstream_set()
    assert result.warnings == []
    assert result.no_local_endpoints == {"internal": 0, "external": 1}
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


def test_without_localhost_nodeports_no_kube_firewall_and_loopback_excluded():
    # Upstream with --iptables-localhost-nodeports=false.
    result = render_upstream_set(localhost_nodeports=False)
    assert "KUBE-FIREWALL" not in result.ruleset.tables["filter"].chains
    assert all("KUBE-FIREWALL" not in j.rule for j in result.ruleset.jumps)
    assert result.ruleset.tables["nat"].chains["KUBE-SERVICES"][-1] == (
        '! -d 127.0.0.0/8 -m comment --comment "kubernetes service nodeports; NOTE: this must '
        'be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS'
    )


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
