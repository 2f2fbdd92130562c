"""Stale endpoints: UDP conntrack flows still sent to an address no endpoint of their Service
holds any more (clients keep sending to a pod that is gone until the flow times out)."""

from __future__ import annotations

import socket

from kproxy.doctor.context import Context
from kproxy.doctor.result import OK, SKIPPED, WARN, Result


def stale_endpoints(ctx: Context) -> Result:
    """The state cache's Services and EndpointSlices (the daemon's last-known-good state)
    against this namespace's UDP conntrack flows, judged as the daemon's cleanup judges them
    (kproxy/daemon/conntrack.py)."""
    name = "stale_endpoints"
    if not ctx.state_cache:
        return Result(name, SKIPPED, "no --state-cache to know the endpoints from")
    from kproxy import nodeinfo
    from kproxy.daemon.conntrack import _canon, list_udp_flows, stale_flows, udp_service_ports
    from kproxy.sources.statefile import StateFileError, load_state

    try:
        state, _ = load_state(ctx.state_cache)
    except (StateFileError, OSError, ValueError) as err:
        return Result(name, SKIPPED, f"state cache {ctx.state_cache} unusable: {err}")
    local = {_canon(ip) for ip in nodeinfo.local_addresses()}
    stale, total = [], 0
    for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
        ports = udp_service_ports(state, version)
        if not ports:
            continue
        try:
            flows = list_udp_flows(family)
        except Exception as err:  # no conntrack netlink here
            return Result(name, SKIPPED, f"cannot list conntrack flows: {err}")
        total += len(flows)
        stale += stale_flows(flows, ports, local)
    if stale:
        shown = ", ".join(
            f"{f.orig_dst}:{f.orig_dport} -> {f.reply_src}:{f.reply_sport}" for f in stale[:3]
        )
        more = f" and {len(stale) - 3} more" if len(stale) > 3 else ""
        return Result(
            name,
            WARN,
            f"{len(stale)} UDP flow(s) to endpoints that are gone: {shown}{more}",
            "stale-endpoints",
        )
    return Result(name, OK, f"{total} UDP flow(s), none to an endpoint that is gone")
