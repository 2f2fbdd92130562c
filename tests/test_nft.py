"""nftables mode without a kernel: rendering, `nft list` parsing, minimal transactions."""

import copy

from kproxy.model import NodeConfig, build_state
from kproxy.nftables.plan import plan_table
from kproxy.nftables.render import NFT_IPV6, hash_name, render_nft
from kproxy.nftables.table import NftChain, NftSet, NftTable, parse_table
from tests.synthetic import generate

CONFIG = NodeConfig(node_name="node-1", cluster_cidrs=("10.244.0.0/16",))

LISTING = """table ip kproxy {
	comment "rules for kproxy"
	map service-ips {
		type ipv4_addr . inet_proto . inet_service : verdict
		comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
		elements = { 10.96.0.53 . udp . 53 : goto service-Z3XHB2ZZ-default/dns/udp/dns,
			     10.96.0.10 . tcp . 80 : goto service-SUSTUHLJ-default/web/tcp/http }
	}

	set cluster-ips {
		type ipv4_addr
		comment "Active ClusterIPs"
		elements = { 10.96.0.10, 10.96.0.30,
			     10.96.0.53 }
	}

	set affinity-X {
		type ipv4_addr
		size 65535
		flags dynamic,timeout
		timeout 3h
		elements = { 10.244.1.9 expires 2h59m58s }
	}

	chain nat-prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		jump services
	}

	chain reject-chain {
		comment "helper"
		reject
	}
}
"""


def render(objects, config=CONFIG, fam=None):
    state, warnings = build_state(objects)
    assert warnings == []
    return render_nft(state, config, fam) if fam else render_nft(state, config)


def test_chain_names_are_upstreams():
    # Verified in upstream's nftables tests: ULMVA6XW-ns1/svc1/tcp/p80 and its endpoint.
    assert hash_name("ns1/svc1/tcp/p80") == "ULMVA6XW-ns1/svc1/tcp/p80"
    assert (
        hash_name("ns1/svc1/tcp/p80__10.180.0.1/80") == "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    )
    long = hash_name("ns/" + "x" * 300)
    assert len(long) == 240 and long.endswith("...")


def test_parse_listing():
    t = parse_table(LISTING, "ip")
    assert t.comment == "rules for kproxy"
    assert t.sets["service-ips"].elements == {
        "10.96.0.53 . udp . 53": "goto service-Z3XHB2ZZ-default/dns/udp/dns",
        "10.96.0.10 . tcp . 80": "goto service-SUSTUHLJ-default/web/tcp/http",
    }
    assert set(t.sets["cluster-ips"].elements) == {"10.96.0.10", "10.96.0.30", "10.96.0.53"}
    # A dynamic set's elements are the kernel's business.
    assert t.sets["affinity-X"].dynamic and t.sets["affinity-X"].elements == {}
    assert t.sets["affinity-X"].timeout == "3h"
    assert t.chains["nat-prerouting"].base.startswith("type nat hook prerouting")
    assert t.chains["nat-prerouting"].rules == ["jump services"]
    assert t.chains["reject-chain"].comment == "helper"
    assert t.chains["reject-chain"].rules == ["reject"]


def test_plan_from_nothing_then_nothing_to_do():
    table = render(generate(20, 3)).table
    p = plan_table(table, None)
    assert p.lines[0].startswith("add table ip kproxy")
    assert p.created == len(table.chains)
    assert plan_table(table, copy.deepcopy(table)).empty()


def test_a_table_another_program_made_is_made_anew_in_the_same_transaction():
    """kube-proxy's own `kube-proxy` table, taken over in its place: its comment is not
    kproxy's, and the kernel never changes a table's comment, so the plan deletes the table
    and makes it whole, in one transaction; afterwards nothing is left to do."""
    table = render(generate(20, 3)).table
    theirs = copy.deepcopy(table)
    theirs.comment = "rules for kube-proxy"
    theirs.chains["service-OLD-default/gone/tcp/http"] = NftChain(
        ["meta l4proto tcp dnat to 1.2.3.4"]
    )
    p = plan_table(table, theirs, "kube-proxy")
    assert p.lines[:2] == [
        "delete table ip kube-proxy",
        'add table ip kube-proxy { comment "rules for kproxy" ; }',
    ]
    assert p.created == len(table.chains) and "gone" not in p.text()
    assert all(line.split()[2:4] == ["ip", "kube-proxy"] for line in p.lines)  # its name
    # A table kproxy made (its comment) is planned in place as ever, under either name.
    assert plan_table(table, copy.deepcopy(table), "kube-proxy").empty()
    assert plan_table(table, theirs)  # not empty: `kproxy`, the default name, likewise
    assert not plan_table(table, None, "kube-proxy").ops[0] == ("deltable",)


def test_one_endpoint_change_sends_only_that_service():
    objects = generate(200, 5)
    before = render(objects).table
    slice_ = next(o for o in objects if o["metadata"]["name"] == "svc-17-x")
    slice_["endpoints"][0]["addresses"] = ["10.250.0.1"]
    after = render(objects).table
    p = plan_table(after, before)
    text = p.text()
    assert "svc-17/" in text and "svc-16/" not in text and "svc-18/" not in text
    # One endpoint chain added, one deleted, the Service's endpoint map edited (its indices
    # follow the endpoints' order); the Service chain itself is untouched.
    assert (p.created, p.rewritten, p.deleted) == (1, 0, 1)
    assert p.elements_changed <= 10
    assert len(p.lines) <= 12, text
    assert plan_table(after, copy.deepcopy(after)).empty()


def test_service_removed_deletes_its_elements_before_its_chains():
    objects = generate(5, 2)
    before = render(objects).table
    objects = [o for o in objects if not o["metadata"]["name"].startswith("svc-3")]
    after = render(objects).table
    p = plan_table(after, before)
    deletes = [i for i, ln in enumerate(p.lines) if ln.startswith("delete element")]
    chain_deletes = [i for i, ln in enumerate(p.lines) if ln.startswith("delete chain")]
    assert deletes and chain_deletes and max(deletes) < min(chain_deletes)
    assert p.deleted == 3  # service chain + 2 endpoint chains


def test_changed_map_value_is_replaced():
    want = NftTable(
        "ip",
        sets={
            "m": NftSet("map", "inet_proto . inet_service : verdict", elements={"tcp . 80": "drop"})
        },
    )
    have = copy.deepcopy(want)
    have.sets["m"].elements["tcp . 80"] = "goto reject-chain"
    lines = plan_table(want, have).lines
    assert lines == [
        "delete element ip kproxy m { tcp . 80 }",
        "add element ip kproxy m { tcp . 80 : drop }",
    ]


def test_affinity_timeout_change_recreates_the_set_after_flushing_its_users():
    aff = NftSet("set", "ipv4_addr", flags="dynamic,timeout", timeout="3h")
    have = NftTable("ip", chains={"c": NftChain(["update @aff { ip saddr }"])}, sets={"aff": aff})
    want = copy.deepcopy(have)
    want.sets["aff"].timeout = "10m"
    lines = plan_table(want, have).lines
    assert lines.index("flush chain ip kproxy c") < lines.index("delete set ip kproxy aff")
    assert lines.index("delete set ip kproxy aff") < lines.index(
        "add set ip kproxy aff { type ipv4_addr ; flags dynamic,timeout ; timeout 10m ; }"
    )
    assert lines[-1] == "add rule ip kproxy c update @aff { ip saddr }"


def test_render_layout_for_every_kind_of_service():
    from tests.test_render_golden import OBJECTS

    config = NodeConfig(
        node_name="test-node", cluster_cidrs=("10.0.0.0/8",), node_ips=("192.168.0.2",)
    )
    result = render(OBJECTS, config)
    t = result.table
    svc_ips = t.sets["service-ips"].elements
    assert svc_ips["172.30.0.41 . tcp . 80"] == "goto service-ULMVA6XW-ns1/svc1/tcp/p80"
    # ETP Local without local endpoints: external traffic dropped, ClusterIP still served.
    no_eps = t.sets["no-endpoint-services"].elements
    assert no_eps["192.168.99.22 . tcp . 80"] == "drop" and no_eps["1.2.3.4 . tcp . 80"] == "drop"
    assert t.sets["no-endpoint-nodeports"].elements["tcp . 3001"] == "drop"
    assert "172.30.0.42 . tcp . 80" in svc_ips
    # No endpoints at all: REJECT.
    assert no_eps["172.30.0.46 . tcp . 80"] == "goto reject-chain"
    # Source ranges: a firewall chain dropping the others, before DNAT.
    fw = t.sets["firewall-ips"].elements["5.6.7.8 . tcp . 80"]
    assert fw.startswith("goto firewall-") and t.chains[fw[5:]].rules == [
        "ip saddr != 203.0.113.0/25 drop"
    ]
    # Affinity: a dynamic set per endpoint, checked before the random choice.
    svc5 = next(c for n, c in t.chains.items() if n.startswith("service-") and "ns5/svc5" in n)
    assert (
        svc5.rules[1].startswith("ip saddr @affinity-") and "numgen random mod 1" in svc5.rules[2]
    )
    assert any(s.timeout == "3h" for n, s in t.sets.items() if n.startswith("affinity-"))
    # Two endpoints: numgen over both.
    svc4 = next(c for n, c in t.chains.items() if n.startswith("service-") and "ns4/svc4" in n)
    assert svc4.rules[-1].startswith("numgen random mod 2 vmap @endpoints-")
    endpoints_map = t.sets[svc4.rules[-1].split("@")[1]]
    assert endpoints_map.typeof and sorted(endpoints_map.elements) == ["0", "1"]
    assert all(v.startswith("goto endpoint-") for v in endpoints_map.elements.values())
    assert result.no_local_endpoints == {"internal": 0, "external": 1}


def _lb_with_source_ranges(endpoints: list[str]) -> list[dict]:
    return [
        {
            "kind": "Service",
            "metadata": {"namespace": "ns", "name": "lb"},
            "spec": {
                "type": "LoadBalancer",
                "clusterIP": "10.96.5.5",
                "ports": [{"name": "p", "port": 80, "nodePort": 30555}],
                "loadBalancerSourceRanges": ["203.0.113.0/25", "192.168.0.0/24"],
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "5.6.7.9"}]}},
        },
        {
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": "ns",
                "name": "lb-1",
                "labels": {"kubernetes.io/service-name": "lb"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "p", "port": 8080}],
            "endpoints": [{"addresses": [ip]} for ip in endpoints],
        },
    ]


def test_source_ranges_apply_to_a_load_balancer_without_endpoints():
    # Upstream's nftables proxier writes the firewall chain whatever the endpoints (its
    # iptables proxier only with endpoints): from outside the ranges the LB IP drops, from
    # inside it gets the no-endpoints reject.
    config = NodeConfig(node_name="node-1", node_ips=("192.168.0.2",))
    for endpoints in ([], ["10.244.1.2"]):
        t = render(_lb_with_source_ranges(endpoints), config).table
        fw = t.sets["firewall-ips"].elements.get("5.6.7.9 . tcp . 80")
        assert fw and fw.startswith("goto firewall-"), (endpoints, t.sets["firewall-ips"])
        # A source range holds the node's IP: the node's own requests to the VIP loop back
        # from the LB IP, which is let through too.
        assert t.chains[fw[5:]].rules == [
            "ip saddr != { 5.6.7.9, 192.168.0.0/24, 203.0.113.0/25 } drop"
        ]
        no_eps = t.sets["no-endpoint-services"].elements
        if endpoints:
            assert "5.6.7.9 . tcp . 80" not in no_eps
        else:
            assert no_eps["5.6.7.9 . tcp . 80"] == "goto reject-chain"
            assert not any(k.startswith("5.6.7.9 ") for k in t.sets["service-ips"].elements)


def test_ipv6_render_uses_ip6_and_brackets():
    objects = [
        {
            "kind": "Service",
            "metadata": {"namespace": "ns", "name": "v6"},
            "spec": {"clusterIPs": ["fd00::10"], "ports": [{"name": "p", "port": 80}]},
        },
        {
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": "ns",
                "name": "v6-1",
                "labels": {"kubernetes.io/service-name": "v6"},
            },
            "addressType": "IPv6",
            "ports": [{"name": "p", "port": 8080}],
            "endpoints": [{"addresses": ["fd00:1::2"]}],
        },
    ]
    config = NodeConfig(cluster_cidrs=("fd00:1::/64",))
    t = render(objects, config, NFT_IPV6).table
    ep = next(c for n, c in t.chains.items() if n.startswith("endpoint-"))
    assert ep.rules[-1] == "meta l4proto tcp dnat to [fd00:1::2]:8080"
    assert next(n for n in t.chains if n.startswith("endpoint-")).endswith("__fd00.1..2/8080")
    assert t.sets["service-ips"].type == "ipv6_addr . inet_proto . inet_service : verdict"
    svc = next(c for n, c in t.chains.items() if n.startswith("service-") and "/" in n)
    assert (
        svc.rules[0]
        == "ip6 daddr fd00::10 tcp dport 80 ip6 saddr != fd00:1::/64 jump mark-for-masquerade"
    )


def _dispatch_rules(table):
    return {
        name: chain.rules[-1]
        for name, chain in table.chains.items()
        if name.startswith(("service-", "local-")) and "/" in name and chain.rules
    }


def test_inline_dispatch_is_upstreams_anonymous_map_and_no_endpoint_maps():
    objects = generate(3, 3)
    objects += [
        {
            "kind": "Service",
            "metadata": {"namespace": "ns", "name": "one"},
            "spec": {"clusterIPs": ["10.96.5.1"], "ports": [{"name": "p", "port": 80}]},
        },
        {
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": "ns",
                "name": "one-x",
                "labels": {"kubernetes.io/service-name": "one"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.5.1"]}],
        },
    ]
    state, warnings = build_state(objects)
    assert warnings == []
    named = render_nft(state, CONFIG).table
    inline = render_nft(state, CONFIG, inline_dispatch=True).table
    assert any(n.startswith("endpoints-") for n in named.sets)  # the default stays named maps
    assert not [n for n in inline.sets if n.startswith(("endpoints-", "local-endpoints-"))]
    assert set(inline.chains) == set(named.chains)
    one = "service-" + hash_name("ns/one/tcp/p")
    endpoint = "endpoint-" + hash_name("ns/one/tcp/p__10.244.5.1/8080")
    # As `nft list table` prints it back (nft 1.0.6): braces even around one arm.
    assert inline.chains[one].rules[-1] == f"numgen random mod 1 vmap {{ 0 : goto {endpoint} }}"
    three = "service-" + hash_name("bench/svc-1/tcp/http")
    arms = named.sets["endpoints-" + hash_name("bench/svc-1/tcp/http")].elements
    assert inline.chains[three].rules[-1] == (
        f"numgen random mod 3 vmap {{ 0 : {arms['0']}, 1 : {arms['1']}, 2 : {arms['2']} }}"
    )
    # Everything but the dispatch is the same table.
    for name, chain in named.chains.items():
        if name not in _dispatch_rules(named):
            assert inline.chains[name] == chain, name
        else:
            assert inline.chains[name].rules[:-1] == chain.rules[:-1], name
    for name, s in named.sets.items():
        if not name.startswith(("endpoints-", "local-endpoints-")):
            assert inline.sets[name] == s, name


def test_inline_dispatch_is_part_of_the_render_cache_key_and_the_delta_context():
    from kproxy.nftables.render import render_nft_delta
    from kproxy.rendercache import RenderCache

    state, _ = build_state(generate(5, 2))
    cache = RenderCache()
    named = render_nft(state, CONFIG, cache=cache)
    inline = render_nft(state, CONFIG, cache=cache, inline_dispatch=True)
    # The same cache must not hand back the named-map fragments.
    assert all("vmap {" in r for r in _dispatch_rules(inline.table).values())
    assert not any(n.startswith("endpoints-") for n in inline.table.sets)
    changed = {("bench", "svc-1")}
    assert render_nft_delta(state, CONFIG, changed, named, cache, inline_dispatch=True) is None
    assert render_nft_delta(state, CONFIG, changed, inline, cache) is None
    delta = render_nft_delta(state, CONFIG, changed, inline, cache, inline_dispatch=True)
    assert delta is not None


def test_an_endpoint_change_with_inline_dispatch_rewrites_only_that_services_chain():
    objects = generate(200, 5)
    state, _ = build_state(objects)
    before = render_nft(state, CONFIG, inline_dispatch=True).table
    slice_ = next(o for o in objects if o["metadata"]["name"] == "svc-17-x")
    slice_["endpoints"][0]["addresses"] = ["10.250.0.1"]
    state, _ = build_state(objects)
    after = render_nft(state, CONFIG, inline_dispatch=True).table
    p = plan_table(after, before)
    text = p.text()
    assert "svc-17/" in text and "svc-16/" not in text and "svc-18/" not in text
    assert "vmap {" in text and "endpoints-" not in text
    assert (p.created, p.rewritten, p.deleted) == (1, 1, 1)
    assert plan_table(after, copy.deepcopy(after)).empty()


def test_rules_making_anonymous_sets_are_sent_before_the_other_rules():
    # The kernel finds a set made in the same batch by walking the transaction from its
    # start: those rules go while it is short (each chain's rules still in order).
    state, _ = build_state(generate(30, 3, mix=True))
    table = render_nft(state, CONFIG, inline_dispatch=True).table
    ops = plan_table(table, None).ops
    rules = [op for op in ops if op[0] == "rule"]
    anon = [i for i, op in enumerate(rules) if " { " in op[2] and not op[2].startswith("update")]
    early = {rules[i][1] for i in anon}
    firsts = [i for i, op in enumerate(rules) if op[1] in early]
    assert len(anon) >= 30 and firsts == list(range(len(firsts)))
    for name in early:
        assert [op[2] for op in rules if op[1] == name] == table.chains[name].rules
