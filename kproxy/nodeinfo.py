"""What the node itself tells: local addresses (netlink) and the sysctls kproxy reads or sets.

Everything acts on the network namespace the process runs in.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from kproxy.model import Node, NodeConfig

log = logging.getLogger(__name__)

PROC_SYS = Path("/proc/sys")
ROUTE_LOCALNET = "net/ipv4/conf/all/route_localnet"
TCP_BE_LIBERAL = "net/netfilter/nf_conntrack_tcp_be_liberal"


def read_sysctl(key: str) -> str | None:
    try:
        return (PROC_SYS / key).read_text().strip()
    except OSError:
        return None


def write_sysctl(key: str, value: str) -> bool:
    try:
        (PROC_SYS / key).write_text(value)
        return True
    except OSError as err:
        log.warning("cannot set %s=%s: %s", key.replace("/", "."), value, err.strerror or err)
        return False


def ipv6_off() -> str | None:
    """Why this kernel has no IPv6 at all (None: it has), as upstream checks it
    (cmd/kube-proxy/app/server_linux.go): /proc/net/if_inet6 is missing when IPv6 is turned off
    at boot (ipv6.disable=1) or not built in. (`disable_ipv6=1` is not that: addresses go, the
    netfilter family stays.)"""
    if Path("/proc/net/if_inet6").exists():
        return None
    return "IPv6 is off in this kernel (no /proc/net/if_inet6)"


def conntrack_tcp_liberal() -> bool:
    return read_sysctl(TCP_BE_LIBERAL) not in (None, "0")


def ensure_route_localnet() -> None:
    """IPv4 NodePorts on 127.0.0.1 need route_localnet=1, as upstream sets it; the KUBE-FIREWALL
    rule rendered with them drops martian traffic to 127/8 from elsewhere (k8s issue 90259)."""
    if read_sysctl(ROUTE_LOCALNET) != "1":
        write_sysctl(ROUTE_LOCALNET, "1")


def local_addresses() -> list[str]:
    """Every address configured on an interface of this network namespace."""
    from pyroute2 import IPRoute  # imported here: only --nodeport-addresses needs netlink

    with IPRoute() as ipr:
        return [
            msg.get_attr("IFA_ADDRESS") for msg in ipr.get_addr() if msg.get_attr("IFA_ADDRESS")
        ]


def nodeport_addresses(specs: list[str], node_ips: tuple[str, ...]) -> tuple[str, ...]:
    """Resolve --nodeport-addresses (CIDRs, or "primary" for the node's own IPs) to the local
    addresses NodePorts answer on, as upstream's GetNodeIPs does."""
    local = local_addresses() if any(spec != "primary" for spec in specs) else []
    return match_nodeport_addresses(specs, node_ips, local)


def match_nodeport_addresses(
    specs: Sequence[str], node_ips: Sequence[str], local: Iterable[str]
) -> tuple[str, ...]:
    """The addresses of `local` inside the CIDRs of `specs`, and `node_ips` for "primary"
    (no I/O: the caller dumps the local addresses)."""
    cidrs = []
    chosen: list[str] = []
    for spec in specs:
        if spec == "primary":
            chosen.extend(node_ips)
        else:
            cidrs.append(ipaddress.ip_network(spec, strict=False))
    if cidrs:
        for addr in local:
            ip = ipaddress.ip_address(addr)
            if any(ip.version == c.version and ip in c for c in cidrs):
                chosen.append(str(ip))
    return tuple(dict.fromkeys(chosen))


class NodeAddresses:
    """The daemon's node IPs and NodePort addresses, worked out again at every full sync.

    The node IPs are --node-ip, else the watched Node's (InternalIP, then ExternalIP, one per
    family: upstream's GetNodeHostIPs); --nodeport-addresses CIDRs are matched against the
    addresses this network namespace has at that moment (one netlink dump), so an address
    added or removed later is followed. The result is a new NodeConfig: the render itself
    stays free of I/O.
    """

    def __init__(
        self,
        explicit_node_ips: tuple[str, ...],
        specs: Sequence[str],
        local: Callable[[], list[str]] = local_addresses,
    ) -> None:
        self.explicit_node_ips = explicit_node_ips
        self.specs = tuple(specs)
        self._local = local
        self._warned_empty = False
        self._last: tuple[str, ...] = ()  # the NodePort addresses of the last full sync

    def config(self, base: NodeConfig, node: Node | None) -> NodeConfig:
        """`base` with the node IPs and NodePort addresses of this moment."""
        node_ips = self.explicit_node_ips or (node.host_ips if node is not None else ())
        nodeport_ips = None
        if self.specs:
            local: list[str] = []
            if any(spec != "primary" for spec in self.specs):
                try:
                    local = self._local()
                except Exception as err:  # netlink failed: keep what the last sync used
                    log.warning("cannot list this node's addresses (kept as they were): %s", err)
                    return replace(base, node_ips=node_ips, nodeport_ips=self._last)
            nodeport_ips = match_nodeport_addresses(self.specs, node_ips, local)
            self._warn_when_empty(nodeport_ips, node_ips)
            self._last = nodeport_ips
        return replace(base, node_ips=node_ips, nodeport_ips=nodeport_ips)

    def _warn_when_empty(self, nodeport_ips: tuple[str, ...], node_ips: tuple[str, ...]) -> None:
        # Said once when it happens (again only after an address has matched meanwhile):
        # a full sync runs every sync period and would repeat it forever.
        if nodeport_ips:
            self._warned_empty = False
            return
        if self._warned_empty:
            return
        self._warned_empty = True
        if self.specs == ("primary",) and not node_ips:
            why = "the Node has no InternalIP or ExternalIP (and there is no --node-ip)"
        else:
            why = "no local address matches"
        log.warning(
            "--nodeport-addresses %s: %s; NodePorts answer on no address until one does",
            ",".join(self.specs),
            why,
        )


def nodeport_destinations(
    config: NodeConfig, version: int, mode: str, local: Iterable[str]
) -> frozenset[str]:
    """The addresses of IP `version` that NodePorts are served on, as the render writes them:
    --nodeport-addresses, or else every address of `local` (the namespace's own); loopback
    only for IPv4 in iptables mode with localhost NodePorts (never in nftables mode)."""
    loopback = mode == "iptables" and version == 4 and config.localhost_nodeports
    candidates = local if config.nodeport_ips is None else config.nodeport_ips
    out = set()
    for addr in candidates:
        ip = ipaddress.ip_address(addr)
        if ip.version == version and (loopback or not ip.is_loopback):
            out.add(str(ip))
    return frozenset(out)
