"""Reading the node's sysctls and links (the current network namespace's)."""

from __future__ import annotations

from pathlib import Path

PROC_SYS = Path("/proc/sys")


def sysctl(key: str) -> str | None:
    """The value of sysctl `key` (net.ipv4.ip_forward), None when it does not exist."""
    try:
        return (PROC_SYS / key.replace(".", "/")).read_text().strip()
    except OSError:
        return None


def has_global_ipv6() -> bool:
    """Whether an interface of this namespace has a global IPv6 address (scope 0)."""
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return False
    return any(len(f := ln.split()) >= 4 and f[3] == "00" for ln in lines)


def bridges() -> list[str]:
    """The links of kind bridge in the current network namespace (over netlink: /sys/class/net
    shows the namespace sysfs was mounted in, not necessarily ours)."""
    from pyroute2 import IPRoute

    out = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            info = link.get_attr("IFLA_LINKINFO")
            if info is not None and info.get_attr("IFLA_INFO_KIND") == "bridge":
                out.append(link.get_attr("IFLA_IFNAME"))
    return sorted(out)
