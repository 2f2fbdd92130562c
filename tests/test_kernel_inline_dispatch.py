"""nftables mode with upstream kube-proxy's inline endpoint dispatch (inline_dispatch=True)
through the netlink datapath, with real TCP: a Service's two endpoints answer; an endpoint
change goes through a partial sync (no read, only that Service's objects) and traffic follows
it; a full sync after it finds nothing to do; the table holds no named endpoint maps, so
upstream's nftables mode could take it over.

Every transaction is also checked against nft (the nft_oracle fixture): the same table and
transaction applied with `nft -f` must list identically. Everything runs in the namespaces of
the `topology` fixture (tests/conftest.py): pods a (10.244.1.2), b (.3), c (.4), each
answering TCP 8080 with its name.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns  # noqa: E402

from kproxy.model import NodeConfig, build_state  # noqa: E402
from kproxy.nftables.mode import NftablesMode  # noqa: E402
from kproxy.nftables.netlink import NetlinkBackend  # noqa: E402

pytestmark = pytest.mark.kernel

WEB_IP = "10.96.0.10"
POD_A, POD_B, POD_C = "10.244.1.2", "10.244.1.3", "10.244.1.4"
CONFIG = NodeConfig(
    node_name=netns.NODE_NAME,
    cluster_cidrs=("10.244.0.0/16",),
    node_ips=(netns.NODE_EXTERNAL_IP,),
)
REQUESTS = 40  # a pod left out of 40 random draws of two: 2^-39


def objects(*pods: str) -> list[dict[str, Any]]:
    return [
        {
            "kind": "Service",
            "metadata": {"namespace": "default", "name": "web"},
            "spec": {
                "clusterIPs": [WEB_IP],
                "ipFamilies": ["IPv4"],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
            },
        },
        {
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": "default",
                "name": "web-x",
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "nodeName": netns.NODE_NAME} for ip in pods],
        },
    ]


def state_of(objs: list[dict[str, Any]]):
    state, warnings = build_state(copy.deepcopy(objs), node_name=netns.NODE_NAME)
    assert warnings == []
    return state


def answers(topo: netns.Topology) -> set[str]:
    replies = netns.tcp(topo.node, WEB_IP, 80, count=REQUESTS)
    tally = netns.tally(replies)
    assert all(r.ok for r in replies), tally
    return set(tally)


def test_inline_dispatch_serves_follows_a_partial_sync_and_leaves_no_endpoint_maps(
    topology, nft_oracle
):
    topo = topology
    mode = NftablesMode(NetlinkBackend("ip"), inline_dispatch=True)
    first, _ = netns.call_in(
        topo.node, mode.sync_state, state_of(objects(POD_A, POD_B)), CONFIG, None, True
    )
    assert first.changed
    assert answers(topo) == {"a", "b"}

    # b leaves, c comes: a partial sync (planned from the two renders of this one Service,
    # nothing read from the kernel) rewrites the Service chain's inline map.
    after = state_of(objects(POD_A, POD_C))
    outcome, _ = netns.call_in(
        topo.node, mode.sync_state, after, CONFIG, {("default", "web")}, False
    )
    assert outcome.changed and not outcome.read_kernel
    assert mode.applied is None  # the delta path, not a full sync
    assert "numgen random mod 2 vmap {" in outcome.payload
    assert answers(topo) == {"a", "c"}

    # A full sync (verify: the table read over netlink) finds the kernel as rendered.
    again, _ = netns.call_in(topo.node, mode.sync_state, after, CONFIG, None, True)
    assert again.read_kernel and not again.changed, again.payload
    assert again.payload == ""

    listing = netns.run(topo.node, ["nft", "list", "table", "ip", "kproxy"]).stdout
    assert not re.search(r"\bmap (local-)?endpoints-", listing)
    assert "numgen random mod 2 vmap { 0 : goto endpoint-" in listing
    assert listing.count("\tmap ") == 5  # the shared verdict maps only
