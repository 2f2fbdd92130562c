"""Checks of the kernel's settings: forwarding, the conntrack table, bridged traffic."""

from __future__ import annotations

from kproxy.doctor.context import Context
from kproxy.doctor.result import FAIL, OK, SKIPPED, WARN, Result
from kproxy.doctor.sysfs import bridges, has_global_ipv6, sysctl


def forwarding(ctx: Context) -> Result:
    """net.ipv4.ip_forward off (and IPv6 forwarding off on a node with a global IPv6 address):
    the node drops every packet it should forward to a pod, Service traffic included."""
    name = "forwarding"
    seen, off = [], []
    v4 = sysctl("net.ipv4.ip_forward")
    seen.append(f"net.ipv4.ip_forward={v4}")
    if v4 == "0":
        off.append("net.ipv4.ip_forward")
    if has_global_ipv6():
        v6 = sysctl("net.ipv6.conf.all.forwarding")
        seen.append(f"net.ipv6.conf.all.forwarding={v6}")
        if v6 == "0":
            off.append("net.ipv6.conf.all.forwarding")
    if off:
        return Result(name, FAIL, f"{' and '.join(off)} off: " + ", ".join(seen), "forwarding")
    return Result(name, OK, ", ".join(seen))


def conntrack_table(ctx: Context) -> Result:
    """nf_conntrack_count near nf_conntrack_max: once full, the kernel drops new flows."""
    name = "conntrack_table"
    count = sysctl("net.netfilter.nf_conntrack_count")
    limit = sysctl("net.netfilter.nf_conntrack_max")
    if count is None or limit is None or not count.isdigit() or not limit.isdigit():
        return Result(name, SKIPPED, "no conntrack table (nf_conntrack not loaded)")
    used = int(count) / max(1, int(limit))
    saw = f"nf_conntrack_count {count} of nf_conntrack_max {limit} ({used:.1%})"
    if used >= ctx.conntrack_fail:
        return Result(name, FAIL, saw, "conntrack-table")
    if used >= ctx.conntrack_warn:
        return Result(name, WARN, saw, "conntrack-table")
    return Result(name, OK, saw)


def bridged_traffic(ctx: Context) -> Result:
    """A bridge whose traffic skips iptables (br_netfilter not loaded, or
    bridge-nf-call-iptables off): Service traffic between pods on one bridge is never
    DNATed."""
    name = "bridge_netfilter"
    found = bridges()
    if not found:
        return Result(name, OK, "no bridge on this node")
    links = ", ".join(found)
    keys = ["net.bridge.bridge-nf-call-iptables"]
    if has_global_ipv6():
        keys.append("net.bridge.bridge-nf-call-ip6tables")
    values = {k: sysctl(k) for k in keys}
    if any(v is None for v in values.values()):
        return Result(
            name,
            FAIL,
            f"bridge {links} but br_netfilter is not loaded: bridged traffic skips the rules",
            "bridge-netfilter",
        )
    off = [k for k, v in values.items() if v == "0"]
    saw = ", ".join(f"{k}={v}" for k, v in values.items())
    if off:
        return Result(name, FAIL, f"bridge {links} and {saw}", "bridge-netfilter")
    return Result(name, OK, f"bridge {links}, {saw}")
