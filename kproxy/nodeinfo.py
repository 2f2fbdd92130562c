"""What the node itself tells: local addresses (netlink) and the sysctls kproxy reads or sets.

Everything acts on the network namespace the process runs in.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

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
    cidrs = []
    chosen: list[str] = []
    for spec in specs:
        if spec == "primary":
            chosen.extend(node_ips)
        else:
            cidrs.append(ipaddress.ip_network(spec, strict=False))
    if cidrs:
        for addr in local_addresses():
            ip = ipaddress.ip_address(addr)
            if any(ip.version == c.version and ip in c for c in cidrs):
                chosen.append(str(ip))
    return tuple(dict.fromkeys(chosen))
