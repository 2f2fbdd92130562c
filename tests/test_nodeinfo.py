"""The node's IPs and NodePort addresses as the daemon works them out (no kernel: the local
addresses are handed in)."""

from __future__ import annotations

import logging

from kproxy.model import NodeConfig, node_from_k8s
from kproxy.nodeinfo import NodeAddresses

BASE = NodeConfig(node_name="node-1")


def node(*addresses: tuple[str, str]):
    return node_from_k8s(
        {
            "kind": "Node",
            "metadata": {"name": "node-1"},
            "status": {"addresses": [{"type": t, "address": a} for t, a in addresses]},
        }
    )


def test_host_ips_are_upstreams_pick_internal_first_then_one_per_family():
    n = node(
        ("ExternalIP", "203.0.113.1"),
        ("Hostname", "node-1"),
        ("InternalIP", "fd00::10"),
        ("InternalIP", "192.168.1.10"),
        ("InternalIP", "192.168.1.11"),
    )
    assert n.addresses == ("fd00::10", "192.168.1.10", "192.168.1.11", "203.0.113.1")
    assert n.host_ips == ("fd00::10", "192.168.1.10")
    assert node(("ExternalIP", "203.0.113.1")).host_ips == ("203.0.113.1",)
    assert node().host_ips == ()


def test_primary_follows_the_node_unless_node_ip_is_given():
    addresses = NodeAddresses((), ["primary"], local=lambda: [])
    config = addresses.config(BASE, node(("InternalIP", "192.168.1.10")))
    assert config.node_ips == config.nodeport_ips == ("192.168.1.10",)
    config = addresses.config(BASE, node(("InternalIP", "192.168.1.20")))
    assert config.node_ips == config.nodeport_ips == ("192.168.1.20",)
    pinned = NodeAddresses(("10.0.0.5",), ["primary"], local=lambda: [])
    config = pinned.config(BASE, node(("InternalIP", "192.168.1.10")))
    assert config.node_ips == config.nodeport_ips == ("10.0.0.5",)


def test_without_nodeport_addresses_every_local_address_answers():
    addresses = NodeAddresses((), [], local=lambda: ["192.168.1.10"])
    config = addresses.config(BASE, node(("InternalIP", "192.168.1.10")))
    assert config.nodeport_ips is None and config.node_ips == ("192.168.1.10",)


def test_cidrs_are_matched_against_the_addresses_of_each_call(caplog):
    local = ["127.0.0.1", "10.244.1.1"]
    addresses = NodeAddresses((), ["192.168.77.0/24", "fd00:77::/64"], local=lambda: local)
    with caplog.at_level(logging.WARNING, logger="kproxy.nodeinfo"):
        for _ in range(3):
            assert addresses.config(BASE, None).nodeport_ips == ()
        assert [r.getMessage() for r in caplog.records] == [
            "--nodeport-addresses 192.168.77.0/24,fd00:77::/64: no local address matches; "
            "NodePorts answer on no address until one does"
        ], "said once, not on every sync"
        local.extend(["192.168.77.1", "fd00:77::0:1"])
        assert addresses.config(BASE, None).nodeport_ips == ("192.168.77.1", "fd00:77::1")
        del local[2:]
        caplog.clear()
        assert addresses.config(BASE, None).nodeport_ips == ()
        assert len(caplog.records) == 1, "said again once the addresses went away again"


def test_a_failed_address_dump_keeps_the_last_addresses(caplog):
    answers: list = [["192.168.77.1"], OSError("netlink says no")]

    def local() -> list[str]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    addresses = NodeAddresses((), ["192.168.77.0/24"], local=local)
    assert addresses.config(BASE, None).nodeport_ips == ("192.168.77.1",)
    with caplog.at_level(logging.WARNING, logger="kproxy.nodeinfo"):
        assert addresses.config(BASE, None).nodeport_ips == ("192.168.77.1",)
    assert "netlink says no" in caplog.text
