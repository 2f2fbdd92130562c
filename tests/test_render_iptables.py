"""Render details beyond the golden dump: protocols, ports, masquerade, readiness, conflicts."""

from kproxy.iptables.render import render
from kproxy.model import NodeConfig, build_state


def cluster(ports, slice_ports, endpoints, svc_type="ClusterIP", extra=(), warnings=None):
    """The state of Service ns/s and its slice; the warnings go to `warnings` when given,
    else there must be none."""
    objs = [
        {
            "kind": "Service",
            "metadata": {"namespace": "ns", "name": "s"},
            "spec": {"type": svc_type, "clusterIP": "10.96.0.5", "ports": ports},
        },
        {
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": "ns",
                "name": "s-1",
                "labels": {"kubernetes.io/service-name": "s"},
            },
            "addressType": "IPv4",
            "ports": slice_ports,
            "endpoints": endpoints,
        },
        *extra,
    ]
    state, found = build_state(objs)
    if warnings is None:
        assert found == []
    else:
        warnings.extend(found)
    return state


def nat_rules(ruleset, prefix):
    return [
        r
        for c, rules in ruleset.tables["nat"].chains.items()
        if c.startswith(prefix)
        for r in rules
    ]


def test_sctp_udp_and_several_ports_each_get_their_own_chains():
    state = cluster(
        [
            {"name": "a", "port": 80, "protocol": "TCP"},
            {"name": "b", "port": 53, "protocol": "UDP"},
            {"name": "c", "port": 3868, "protocol": "SCTP"},
        ],
        [
            {"name": "a", "port": 8080, "protocol": "TCP"},
            {"name": "b", "port": 5353, "protocol": "UDP"},
            {"name": "c", "port": 3869, "protocol": "SCTP"},
        ],
        [{"addresses": ["10.244.0.9"]}],
    )
    rs = render(state, NodeConfig()).ruleset
    services = rs.tables["nat"].chains["KUBE-SERVICES"]
    assert any("-p tcp" in r and "-m tcp --dport 80 " in r for r in services)
    assert any("-p udp" in r and "-m udp --dport 53 " in r for r in services)
    assert any("-p sctp" in r and "-m sctp --dport 3868 " in r for r in services)
    dnat = [r for r in nat_rules(rs, "KUBE-SEP-") if "DNAT" in r]
    assert sorted(d.split("--to-destination ")[1] for d in dnat) == [
        "10.244.0.9:3869",
        "10.244.0.9:5353",
        "10.244.0.9:8080",
    ]
    assert len([c for c in rs.tables["nat"].chains if c.startswith("KUBE-SVC-")]) == 3


def test_named_target_port_resolves_through_the_slice_port_of_the_same_name():
    # targetPort "web" is resolved by the EndpointSlice controller; kproxy, like kube-proxy,
    # takes the number from the slice port named as the Service port.
    state = cluster(
        [{"name": "http", "port": 80, "targetPort": "web"}],
        [{"name": "http", "port": 9376, "protocol": "TCP"}, {"name": "other", "port": 1}],
        [{"addresses": ["10.244.0.9"]}],
    )
    dnat = [r for r in nat_rules(render(state, NodeConfig()).ruleset, "KUBE-SEP-") if "DNAT" in r]
    assert dnat == [
        '-p tcp -m comment --comment "ns/s:http" -m tcp -j DNAT --to-destination 10.244.0.9:9376'
    ]


def test_only_ready_endpoints_and_no_ready_means_reject():
    ports = [{"name": "", "port": 80, "nodePort": 30005}]
    slice_ports = [{"port": 8080}]
    eps = [
        {"addresses": ["10.244.0.1"], "conditions": {"ready": True}},
        {"addresses": ["10.244.0.2"], "conditions": {"ready": False, "serving": False}},
    ]
    rs = render(cluster(ports, slice_ports, eps, "NodePort"), NodeConfig()).ruleset
    dnat = [r for r in nat_rules(rs, "KUBE-SEP-") if "DNAT" in r]
    assert [d.split("--to-destination ")[1] for d in dnat] == ["10.244.0.1:8080"]
    assert rs.tables["filter"].chains["KUBE-SERVICES"] == []

    eps[0]["conditions"]["ready"] = False
    rs = render(cluster(ports, slice_ports, eps, "NodePort"), NodeConfig()).ruleset
    assert not nat_rules(rs, "KUBE-SEP-") and not nat_rules(rs, "KUBE-SVC-")
    assert rs.tables["filter"].chains["KUBE-SERVICES"] == [
        '-d 10.96.0.5/32 -p tcp -m comment --comment "ns/s has no endpoints" -m tcp --dport 80 '
        "-j REJECT --reject-with icmp-port-unreachable"
    ]
    assert rs.tables["filter"].chains["KUBE-EXTERNAL-SERVICES"] == [
        '-p tcp -m comment --comment "ns/s has no endpoints" -m addrtype --dst-type LOCAL '
        "-m tcp --dport 30005 -j REJECT --reject-with icmp-port-unreachable"
    ]
    # The NodePort of a Service with no endpoints is not in nat at all.
    assert rs.tables["nat"].chains["KUBE-NODEPORTS"] == []


def test_masquerade_all_and_cluster_cidr():
    ports = [{"name": "p", "port": 80}]
    state = cluster(ports, [{"name": "p", "port": 80}], [{"addresses": ["10.244.0.1"]}])
    svc_rules = nat_rules(render(state, NodeConfig(masquerade_all=True)).ruleset, "KUBE-SVC-")
    assert svc_rules[0].startswith("-d 10.96.0.5/32 -p tcp ")
    assert svc_rules[0].endswith("-j KUBE-MARK-MASQ")
    cidr = NodeConfig(cluster_cidrs=("10.244.0.0/16",))
    svc_rules = nat_rules(render(state, cidr).ruleset, "KUBE-SVC-")
    assert svc_rules[0].startswith("! -s 10.244.0.0/16 -d 10.96.0.5/32 ")
    # Every SEP masquerades hairpin traffic (a pod reaching itself through its Service).
    sep = nat_rules(render(state, cidr).ruleset, "KUBE-SEP-")
    assert sep[0] == '-s 10.244.0.1/32 -m comment --comment "ns/s:p" -j KUBE-MARK-MASQ'


def test_two_services_claiming_one_ip_and_port_keep_the_first_and_warn():
    ports = [{"name": "p", "port": 80}]
    clash = {
        "kind": "Service",
        "metadata": {"namespace": "zz", "name": "copy"},
        "spec": {"clusterIP": "10.96.0.5", "ports": ports},
    }
    state = cluster(
        ports, [{"name": "p", "port": 80}], [{"addresses": ["10.244.0.1"]}], extra=[clash]
    )
    result = render(state, NodeConfig())
    assert len(result.warnings) == 1
    assert "Service zz/copy" in result.warnings[0] and "ns/s:p" in result.warnings[0]
    services = result.ruleset.tables["nat"].chains["KUBE-SERVICES"]
    assert len([r for r in services if "10.96.0.5" in r]) == 1
    assert "zz/copy" not in "".join(result.ruleset.tables["filter"].chains["KUBE-SERVICES"])


def test_large_clusters_leave_out_per_endpoint_comments():
    from tests.synthetic import generate

    def comments(n_services, n_endpoints):
        state, _ = build_state(generate(n_services, n_endpoints))
        nat = render(state, NodeConfig()).ruleset.tables["nat"].chains
        svc_rules = [r for c, rules in nat.items() if c.startswith("KUBE-SVC-") for r in rules]
        sep_rules = [r for c, rules in nat.items() if c.startswith("KUBE-SEP-") for r in rules]
        return (
            any("--comment" in r for r in svc_rules),
            any("--comment" in r for r in sep_rules),
            any("--comment" in r for r in nat["KUBE-SERVICES"]),
        )

    assert comments(100, 10) == (True, True, True)  # exactly 1000 endpoints: not large
    # 1001 endpoints: per-endpoint comments go, the Service-level ones stay (as upstream).
    assert comments(91, 11) == (False, False, True)


def test_slice_port_without_a_number_leaves_the_other_ports_rendered():
    # `port: null` on one slice port: that Service port has no endpoints (rejected, as
    # upstream), the other port still goes to the endpoint.
    warnings = []
    state = cluster(
        [{"name": "a", "port": 80}, {"name": "b", "port": 81}],
        [{"name": "a", "port": None}, {"name": "b", "port": 8081}],
        [{"addresses": ["10.244.0.9"]}],
        warnings=warnings,
    )
    assert len(warnings) == 1 and "EndpointSlice ns/s-1: ports[0].port" in warnings[0]
    rs = render(state, NodeConfig()).ruleset
    dnat = [r for r in nat_rules(rs, "KUBE-SEP-") if "DNAT" in r]
    assert [d.split("--to-destination ")[1] for d in dnat] == ["10.244.0.9:8081"]
    assert rs.tables["filter"].chains["KUBE-SERVICES"] == [
        '-d 10.96.0.5/32 -p tcp -m comment --comment "ns/s:a has no endpoints" -m tcp '
        "--dport 80 -j REJECT --reject-with icmp-port-unreachable"
    ]


def test_terminating_endpoint_without_serving_condition_is_the_fallback():
    # No ready endpoint; one terminating endpoint whose slice leaves `serving` out. Upstream
    # reads the absent condition as serving, so traffic goes to it instead of a REJECT.
    eps = [{"addresses": ["10.244.0.3"], "conditions": {"ready": False, "terminating": True}}]
    rs = render(cluster([{"port": 80}], [{"port": 8080}], eps), NodeConfig()).ruleset
    dnat = [r for r in nat_rules(rs, "KUBE-SEP-") if "DNAT" in r]
    assert [d.split("--to-destination ")[1] for d in dnat] == ["10.244.0.3:8080"]
    assert rs.tables["filter"].chains["KUBE-SERVICES"] == []
