"""Validation: every bad input is skipped with one line naming kind, object and field, and
the other objects still load."""

import copy
import json

import pytest

from kproxy.model import build_state
from kproxy.sources.statefile import StateFileError, load_state

GOOD_SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"namespace": "shop", "name": "cart"},
    "spec": {
        "type": "NodePort",
        "clusterIP": "10.96.0.20",
        "ports": [
            {"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP", "nodePort": 30020}
        ],
    },
}
GOOD_SLICE = {
    "apiVersion": "discovery.k8s.io/v1",
    "kind": "EndpointSlice",
    "metadata": {
        "namespace": "shop",
        "name": "cart-x1",
        "labels": {"kubernetes.io/service-name": "cart"},
    },
    "addressType": "IPv4",
    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    "endpoints": [
        {"addresses": ["10.244.1.5"], "conditions": {"ready": True}, "nodeName": "node-1"}
    ],
}
OTHER_SERVICE = {
    "kind": "Service",
    "metadata": {"namespace": "shop", "name": "other"},
    "spec": {"clusterIP": "10.96.0.21", "ports": [{"port": 53, "protocol": "UDP"}]},
}


def mutate(obj, path, value):
    obj = copy.deepcopy(obj)
    target = obj
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return obj


BAD_CASES = [
    # (object, expected text in the warning)
    (
        mutate(GOOD_SERVICE, ["spec", "clusterIP"], "10.96.0.300"),
        "Service shop/cart: spec.clusterIP: '10.96.0.300' is not a valid IP address",
    ),
    (
        mutate(GOOD_SERVICE, ["spec", "ports", 0, "port"], 70000),
        "Service shop/cart: spec.ports[0].port: 70000 is not a valid port number",
    ),
    (
        mutate(GOOD_SERVICE, ["spec", "ports", 0, "port"], "eighty"),
        "Service shop/cart: spec.ports[0].port: 'eighty' is not a port number",
    ),
    (
        mutate(GOOD_SERVICE, ["spec", "ports", 0, "port"], KeyError),
        "Service shop/cart: spec.ports[0].port: missing",
    ),
    (
        mutate(GOOD_SERVICE, ["spec", "ports", 0, "protocol"], "ICMP"),
        "Service shop/cart: spec.ports[0].protocol: 'ICMP' is not a supported protocol",
    ),
    (
        mutate(GOOD_SERVICE, ["spec", "ports", 0, "nodePort"], -1),
        "Service shop/cart: spec.ports[0].nodePort: -1 is not a valid port number",
    ),
    (
        mutate(GOOD_SERVICE, ["spec", "ports", 0, "targetPort"], 0),
        "Service shop/cart: spec.ports[0].targetPort: 0 is not a valid port number",
    ),
    (
        mutate(GOOD_SERVICE, ["spec", "type"], "Magic"),
        "Service shop/cart: spec.type: 'Magic' is not a Service type",
    ),
    (mutate(GOOD_SERVICE, ["spec"], KeyError), "Service shop/cart: spec: missing"),
    (
        mutate(GOOD_SERVICE, ["metadata", "name"], KeyError),
        "Service shop/<unnamed>: metadata.name: missing",
    ),
    (
        mutate(GOOD_SERVICE, ["spec", "ports"], "80"),
        "Service shop/cart: spec.ports: must be a list",
    ),
    (
        mutate(GOOD_SERVICE, ["spec", "externalIPs"], ["1.2.3"]),
        "Service shop/cart: spec.externalIPs[0]: '1.2.3' is not a valid IP address",
    ),
    (
        mutate(GOOD_SLICE, ["endpoints", 0, "addresses"], ["10.244.1.999"]),
        "EndpointSlice shop/cart-x1: endpoints[0].addresses[0]: '10.244.1.999' is not a valid IP",
    ),
    (
        mutate(GOOD_SLICE, ["endpoints", 0, "addresses"], ["fd00::5"]),
        "EndpointSlice shop/cart-x1: endpoints[0].addresses[0]: 'fd00::5' is not an IPv4 address",
    ),
    (
        mutate(GOOD_SLICE, ["endpoints", 0, "addresses"], []),
        "EndpointSlice shop/cart-x1: endpoints[0].addresses: missing",
    ),
    (
        mutate(GOOD_SLICE, ["ports", 0, "port"], 0),
        "EndpointSlice shop/cart-x1: ports[0].port: 0 is not a valid port number",
    ),
    (
        mutate(GOOD_SLICE, ["ports", 0, "protocol"], "tcp"),
        "EndpointSlice shop/cart-x1: ports[0].protocol: 'tcp' is not a supported protocol",
    ),
    (
        mutate(GOOD_SLICE, ["addressType"], "IPv5"),
        "EndpointSlice shop/cart-x1: addressType: 'IPv5' is not IPv4, IPv6 or FQDN",
    ),
    (
        mutate(GOOD_SLICE, ["addressType"], KeyError),
        "EndpointSlice shop/cart-x1: addressType: missing",
    ),
    (
        mutate(GOOD_SLICE, ["metadata", "labels"], {}),
        "EndpointSlice shop/cart-x1: metadata.labels[kubernetes.io/service-name]: missing",
    ),
    (
        mutate(GOOD_SLICE, ["endpoints", 0, "conditions"], {"ready": "yes"}),
        "EndpointSlice shop/cart-x1: endpoints[0].conditions.ready: must be true or false",
    ),
    (
        {"kind": "Pod", "metadata": {"namespace": "shop", "name": "p1"}},
        "Pod shop/p1: kind: not a Service, EndpointSlice or Node, skipped",
    ),
]


@pytest.mark.parametrize("bad,message", BAD_CASES, ids=[m for _, m in BAD_CASES])
def test_bad_object_is_skipped_with_one_line_naming_it(bad, message):
    good = [GOOD_SERVICE, GOOD_SLICE, OTHER_SERVICE]
    state, warnings = build_state([*good, bad])
    assert len(warnings) == 1, warnings
    assert message in warnings[0]
    assert "\n" not in warnings[0]
    # The bad object is gone and every good one is still there.
    kind = bad.get("kind")
    if kind == "Service" and bad["metadata"].get("name") == "cart":
        # The bad copy replaced nothing: the good cart came first and stays.
        assert ("shop", "cart") in state.services
    assert ("shop", "other") in state.services
    assert ("shop", "cart-x1") in state.slices


def test_bad_object_alone_is_dropped():
    bad = mutate(GOOD_SERVICE, ["spec", "ports", 0, "port"], 0)
    state, warnings = build_state([bad, OTHER_SERVICE])
    assert list(state.services) == [("shop", "other")]
    assert len(warnings) == 1


def test_good_objects_build_the_model():
    state, warnings = build_state([GOOD_SERVICE, GOOD_SLICE])
    assert warnings == []
    svc = state.services[("shop", "cart")]
    assert svc.cluster_ips == ("10.96.0.20",)
    port = svc.ports[0]
    assert (port.name, port.protocol, port.port, port.target_port, port.node_port) == (
        "http",
        "TCP",
        80,
        "web",
        30020,
    )
    eps = state.slices[("shop", "cart-x1")]
    assert eps.service_name == "cart"
    assert eps.endpoints[0].ip == "10.244.1.5"
    assert eps.endpoints[0].ready and eps.endpoints[0].serving


def test_defaults_follow_the_api():
    state, _ = build_state([OTHER_SERVICE])
    svc = state.services[("shop", "other")]
    assert svc.type == "ClusterIP"
    assert svc.ports[0].name == ""
    # Missing ready means ready (EndpointSlice API: nil is "unknown", consumers treat as ready).
    slice_ = mutate(GOOD_SLICE, ["endpoints", 0, "conditions"], KeyError)
    state, _ = build_state([slice_])
    assert state.slices[("shop", "cart-x1")].endpoints[0].ready


def test_headless_and_external_name_are_ignored_without_warning():
    headless = mutate(GOOD_SERVICE, ["spec", "clusterIP"], "None")
    external = mutate(GOOD_SERVICE, ["spec"], {"type": "ExternalName", "externalName": "x.y"})
    fqdn = mutate(GOOD_SLICE, ["addressType"], "FQDN")
    state, warnings = build_state([headless, external, fqdn])
    assert warnings == []
    assert not state.services and not state.slices


def test_kubectl_list_multidoc_and_json_all_load(tmp_path):
    listed = {"apiVersion": "v1", "kind": "List", "items": [GOOD_SERVICE, GOOD_SLICE]}
    import yaml

    (tmp_path / "list.yaml").write_text(yaml.safe_dump(listed))
    (tmp_path / "multi.yaml").write_text(yaml.safe_dump_all([GOOD_SERVICE, GOOD_SLICE]))
    (tmp_path / "list.json").write_text(json.dumps(listed))
    for name in ("list.yaml", "multi.yaml", "list.json"):
        state, warnings = load_state(tmp_path / name)
        assert warnings == [], name
        assert ("shop", "cart") in state.services, name
        assert ("shop", "cart-x1") in state.slices, name


def test_node_is_taken_when_it_is_this_node(tmp_path):
    node = {
        "kind": "Node",
        "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": "z1"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}]},
    }
    state, _ = build_state([node], node_name="node-1")
    assert state.node is not None and state.node.labels["topology.kubernetes.io/zone"] == "z1"
    assert state.node.addresses == ("192.168.1.10",)
    state, _ = build_state([node], node_name="node-2")
    assert state.node is None


@pytest.mark.parametrize(
    "content,expected",
    [
        (None, "cannot read state file"),
        ("kind: List\nitems: [\n", "cannot parse state file"),
        ("", "is empty"),
        (b"\xff\xfe\x00bad", "cannot read state file"),
    ],
)
def test_unusable_file_is_one_line_error(tmp_path, content, expected):
    path = tmp_path / "state.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(StateFileError) as err:
        load_state(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_empty_list_is_an_empty_cluster(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("apiVersion: v1\nkind: List\nitems: []\n")
    state, warnings = load_state(path)
    assert not state.services and warnings == []


def test_source_ranges_tolerate_space_and_leading_zeros_and_skip_invalid_with_a_warning():
    svc = mutate(
        GOOD_SERVICE,
        ["spec", "loadBalancerSourceRanges"],
        [" 203.0.113.0/25", "010.000.0.1/8", "not-a-cidr", "fd00::1/64"],
    )
    state, warnings = build_state([svc])
    assert state.services[("shop", "cart")].load_balancer_source_ranges == (
        "203.0.113.0/25",
        "10.0.0.0/8",
        "fd00::/64",
    )
    assert warnings == [
        "Service shop/cart: spec.loadBalancerSourceRanges[2]: 'not-a-cidr' is not a CIDR; "
        "range ignored"
    ]


@pytest.mark.parametrize(
    "text", ["10.0.0.256", "010.0.0.1", "1.2.3", "1.2.3.4.5", "１.2.3.4", "٣.1.1.1", " 1.2.3.4x"]
)
def test_odd_ipv4_text_is_refused(text):
    svc = mutate(GOOD_SERVICE, ["spec", "clusterIP"], text)
    state, warnings = build_state([svc])
    assert not state.services and len(warnings) == 1 and "spec.clusterIP" in warnings[0]


PLAIN_ENDPOINTS = [
    {"addresses": ["10.1.0.1"]},
    {"addresses": ["10.1.0.2", "10.1.0.9"], "conditions": {"ready": False}},
    {
        "addresses": ["10.1.0.3"],
        "conditions": {"ready": False, "serving": True, "terminating": True},
    },
    {"addresses": ["10.1.0.4"], "conditions": {"ready": None, "serving": None}, "nodeName": "n1"},
    {"addresses": ["10.1.0.5"], "zone": "z1", "hints": {"forZones": [{"name": "z1"}]}},
    {"addresses": ["10.1.0.6"], "conditions": {"ready": "yes"}},
    {"addresses": ["010.1.0.7"]},
    {"addresses": [" 10.1.0.8"]},
    {"addresses": ["10.1.0.9"], "nodeName": 7},
    {"addresses": []},
    {"addresses": ["10.1.0.10"], "conditions": []},
]


@pytest.mark.parametrize("endpoint", PLAIN_ENDPOINTS)
def test_endpoint_fast_path_reads_like_the_careful_path(endpoint, monkeypatch):
    # The fast path for plain IPv4 endpoints must give the careful path's result, or its error.
    import kproxy.model as model

    def read():
        obj = _slice([endpoint])
        try:
            return model.endpoint_slice_from_k8s(obj)
        except model.InvalidObject as e:
            return str(e)

    fast = read()
    monkeypatch.setattr(model, "_plain_ipv4_endpoint", lambda e: None)
    assert read() == fast


def _slice(endpoints):
    return {
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "default",
            "name": "web-x",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "careful-path"])
def test_absent_conditions_read_as_upstream_reads_them(fast_path, monkeypatch):
    """Upstream (pkg/proxy/endpointslicecache.go): ready and serving are true when absent,
    terminating false. An absent `serving` is not a copy of `ready`: a terminating endpoint
    whose slice leaves `serving` out still serves (the fallback when no endpoint is ready)."""
    import kproxy.model as model

    if not fast_path:
        monkeypatch.setattr(model, "_plain_ipv4_endpoint", lambda e: None)
    endpoints = [
        {"addresses": ["10.1.0.1"], "conditions": {"ready": False, "terminating": True}},
        {"addresses": ["10.1.0.2"], "conditions": {"ready": False, "serving": None}},
        {"addresses": ["10.1.0.3"]},
        {"addresses": ["10.1.0.4"], "conditions": {"ready": False, "serving": False}},
    ]
    eps = model.endpoint_slice_from_k8s(_slice(endpoints))
    got = [(e.ready, e.serving, e.terminating) for e in eps.endpoints]
    assert got == [
        (False, True, True),
        (False, True, False),
        (True, True, False),
        (False, False, False),
    ]


def test_slice_port_without_a_number_is_skipped_not_the_slice():
    """A slice port with `port: null` (the API allows it: "all ports", which upstream ignores)
    costs that port only, with one warning naming the slice and the field."""
    obj = _slice([{"addresses": ["10.1.0.1"]}])
    obj["ports"] = [
        {"name": "metrics", "port": None, "protocol": "TCP"},
        {"name": "http", "port": 8080, "protocol": "TCP"},
    ]
    state, warnings = build_state([obj])
    eps = state.slices[("default", "web-x")]
    assert [(p.name, p.port) for p in eps.ports] == [("http", 8080)]
    assert [e.ip for e in eps.endpoints] == ["10.1.0.1"]
    assert len(warnings) == 1, warnings
    assert "EndpointSlice default/web-x: ports[0].port:" in warnings[0]
    assert "\n" not in warnings[0]


def test_local_detection_as_upstream_picks_it():
    from kproxy.localdetect import LocalMatch, local_match
    from kproxy.model import Node, NodeConfig

    node = Node("n", pod_cidrs=("10.244.1.0/24", "fd00:1::/64"))
    cfg = NodeConfig(cluster_cidrs=("10.244.0.0/16", "10.245.0.0/16"))
    warnings: list[str] = []
    assert local_match(cfg, node, 4, warnings) == LocalMatch(cidr="10.244.0.0/16")
    assert "only 10.244.0.0/16 is used" in warnings[0]
    assert local_match(cfg, node, 6) is None
    by_node = NodeConfig(cluster_cidrs=("10.244.0.0/16",), detect_local_mode="NodeCIDR")
    assert local_match(by_node, node, 4) == LocalMatch(cidr="10.244.1.0/24")
    assert local_match(by_node, node, 6) == LocalMatch(cidr="fd00:1::/64")
    assert local_match(by_node, None, 4) is None
    warnings = []
    assert local_match(by_node, Node("n"), 4, warnings) is None
    assert "Node n has no spec.podCIDRs yet" in warnings[0]
    bridge = NodeConfig(detect_local_mode="BridgeInterface", bridge_interface="cbr0")
    assert local_match(bridge, None, 4).iptables(negate=True) == ("", "! -i cbr0")
    assert local_match(bridge, None, 6).nft("ip6") == 'iifname "cbr0"'
    prefix = NodeConfig(detect_local_mode="InterfaceNamePrefix", interface_name_prefix="veth")
    assert local_match(prefix, None, 4).iptables() == ("", "-i veth+")
    assert local_match(prefix, None, 4).nft("ip", negate=True) == 'iifname != "veth*"'
    assert LocalMatch(cidr="10.0.0.0/8").iptables(negate=True) == ("! -s 10.0.0.0/8", "")
