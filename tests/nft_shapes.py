"""A dual-stack cluster whose nftables render has every rule shape the renderer writes: TCP,
UDP and SCTP ports; two endpoints and one; session affinity with one endpoint and three; a
NodePort with externalTrafficPolicy Local and endpoints on two nodes; load balancers with
source ranges (byte-aligned and not, one range, several, single addresses, adjacent IPv6
ranges) and externalIPs; internalTrafficPolicy Local; a Service without endpoints. With the
configs below it also has a cluster CIDR on a byte boundary and off one, the nodeport-ips set,
pod traffic told by a bridge's name and by an interface name prefix, and endpoint dispatch
written inline as upstream kube-proxy writes it (an anonymous verdict map per Service)."""

from kproxy.model import NodeConfig

# --cluster-cidr off a byte boundary (masks) / on one (short loads), and with
# --nodeport-addresses given (the nodeport-ips set instead of `fib daddr type local`).
CONFIGS = {
    "masks": NodeConfig(
        node_name="test-node",
        cluster_cidrs=("10.0.0.0/9", "fd00:1::/60"),
        node_ips=("192.168.0.2", "2001:db8::1"),
    ),
    "nodeport-ips": NodeConfig(
        node_name="test-node",
        cluster_cidrs=("10.0.0.0/8", "fd00:1::/64"),
        node_ips=("192.168.0.2", "2001:db8::1"),
        nodeport_ips=("192.168.0.2", "2001:db8::1"),
    ),
    # Endpoint dispatch inline as upstream kube-proxy writes it (OPTIONS below).
    "inline": NodeConfig(
        node_name="test-node",
        cluster_cidrs=("10.0.0.0/9", "fd00:1::/60"),
        node_ips=("192.168.0.2", "2001:db8::1"),
    ),
    # Pod traffic told by interface (--detect-local-mode): a whole name, and a prefix.
    "bridge": NodeConfig(
        node_name="test-node",
        node_ips=("192.168.0.2", "2001:db8::1"),
        detect_local_mode="BridgeInterface",
        bridge_interface="cbr0",
    ),
    "prefix": NodeConfig(
        node_name="test-node",
        node_ips=("192.168.0.2", "2001:db8::1"),
        detect_local_mode="InterfaceNamePrefix",
        interface_name_prefix="veth",
    ),
}

# render_nft's keyword arguments for a config (none for most).
OPTIONS = {"inline": {"inline_dispatch": True}}


def _svc(name, ips, fam_ips, ports, **spec):
    s = {
        "kind": "Service",
        "metadata": {"namespace": "ns", "name": name},
        "spec": {"clusterIPs": ips, "ipFamilies": fam_ips, "ports": ports, **spec},
    }
    return s


def _eps(name, addrtype, addrs, port=8080, proto="TCP", node="test-node"):
    return {
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "ns",
            "name": f"{name}-{addrtype}",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": addrtype,
        "ports": [{"name": "p", "port": port, "protocol": proto}],
        "endpoints": [
            {"addresses": [a], "nodeName": node if i % 2 == 0 else "other"}
            for i, a in enumerate(addrs)
        ],
    }


def objects():
    o = []
    p = [{"name": "p", "port": 80, "protocol": "TCP"}]
    o += [
        _svc("a", ["10.96.0.10", "fd00::10"], ["IPv4", "IPv6"], p),
        _eps("a", "IPv4", ["10.244.1.2", "10.244.2.3"]),
        _eps("a", "IPv6", ["fd00:1::2", "fd00:1::3"]),
    ]
    o += [
        _svc(
            "aff",
            ["10.96.0.11", "fd00::11"],
            ["IPv4", "IPv6"],
            p,
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}},
        ),
        _eps("aff", "IPv4", ["10.244.1.4"]),
        _eps("aff", "IPv6", ["fd00:1::4"]),
    ]
    o += [  # several endpoints and session affinity
        _svc(
            "aff3",
            ["10.96.0.17", "fd00::17"],
            ["IPv4", "IPv6"],
            p,
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 10800}},
        ),
        _eps("aff3", "IPv4", ["10.244.1.10", "10.244.2.10", "10.244.1.11"]),
        _eps("aff3", "IPv6", ["fd00:1::10", "fd00:2::10", "fd00:1::11"]),
    ]
    o += [
        _svc(
            "np",
            ["10.96.0.12", "fd00::12"],
            ["IPv4", "IPv6"],
            [{"name": "p", "port": 53, "protocol": "UDP", "nodePort": 30053}],
            type="NodePort",
            externalTrafficPolicy="Local",
        ),
        _eps("np", "IPv4", ["10.244.1.5", "10.244.9.5"], 53, "UDP"),
        _eps("np", "IPv6", ["fd00:1::5", "fd00:9::5"], 53, "UDP"),
    ]
    o += [
        _svc(
            "lb",
            ["10.96.0.13", "fd00::13"],
            ["IPv4", "IPv6"],
            [{"name": "p", "port": 443, "protocol": "SCTP", "nodePort": 30443}],
            type="LoadBalancer",
            loadBalancerSourceRanges=[
                "203.0.113.0/25",
                "198.51.100.0/24",
                "2001:db8:1::/48",
                "2001:db8:2::/60",
                "10.0.0.0/8",
            ],
            externalIPs=["192.0.2.7", "2001:db8::7"],
        ),
        _eps("lb", "IPv4", ["10.244.1.6"], 8443, "SCTP"),
        _eps("lb", "IPv6", ["fd00:1::6"], 8443, "SCTP"),
    ]
    o[-3]["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.8"}, {"ip": "2001:db8::8"}]}}
    o += [
        _svc(
            "lb1",
            ["10.96.0.14", "fd00::14"],
            ["IPv4", "IPv6"],
            [{"name": "p", "port": 80, "nodePort": 30080}],
            type="LoadBalancer",
            loadBalancerSourceRanges=["203.0.113.0/25", "2001:db8:1::/48"],
            internalTrafficPolicy="Local",
        ),
        _eps("lb1", "IPv4", ["10.244.1.7"]),
        _eps("lb1", "IPv6", ["fd00:1::7"]),
    ]
    o[-3]["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.9"}, {"ip": "2001:db8::9"}]}}
    o += [
        _svc(
            "lb2",
            ["10.96.0.15", "fd00::15"],
            ["IPv4", "IPv6"],
            [{"name": "p", "port": 80, "nodePort": 30081}],
            type="LoadBalancer",
            loadBalancerSourceRanges=["203.0.113.7/32", "2001:db8:1::7/128"],
        ),
        _eps("lb2", "IPv4", ["10.244.1.8"]),
        _eps("lb2", "IPv6", ["fd00:1::8"]),
    ]
    o[-3]["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}, {"ip": "2001:db8::10"}]}}
    o += [_svc("none", ["10.96.0.16", "fd00::16"], ["IPv4", "IPv6"], p)]
    return o
