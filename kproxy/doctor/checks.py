"""Every check, in the order `kproxy doctor` prints them, and running them all."""

from __future__ import annotations

import logging
from collections.abc import Callable

from kproxy.doctor.apiserver import apiserver
from kproxy.doctor.context import Context
from kproxy.doctor.kernel import bridged_traffic, conntrack_table, forwarding
from kproxy.doctor.lastsync import last_sync
from kproxy.doctor.processes import firewall_managers, other_proxy
from kproxy.doctor.result import WARN, Result
from kproxy.doctor.rules import forward_policy, mixed_backends, other_mode_leftovers, route_localnet
from kproxy.doctor.stale import stale_endpoints

log = logging.getLogger(__name__)

# (name, check): the name is the check's label in kproxy_node_check.
CHECKS: tuple[tuple[str, Callable[[Context], Result]], ...] = (
    ("mixed_backends", mixed_backends),
    ("forwarding", forwarding),
    ("conntrack_table", conntrack_table),
    ("forward_policy", forward_policy),
    ("route_localnet", route_localnet),
    ("other_mode_leftovers", other_mode_leftovers),
    ("bridge_netfilter", bridged_traffic),
    ("other_proxy", other_proxy),
    ("firewall_managers", firewall_managers),
    ("stale_endpoints", stale_endpoints),
    ("apiserver", apiserver),
    ("last_sync", last_sync),
)
CHECK_NAMES = tuple(name for name, _ in CHECKS)


def run_checks(ctx: Context, only: tuple[str, ...] = ()) -> list[Result]:
    """Every check (or those named in `only`), in order; a check that raises is a warning
    naming the error (it could not tell), never the end of the others."""
    out = []
    for name, check in CHECKS:
        if only and name not in only:
            continue
        try:
            out.append(check(ctx))
        except Exception as err:
            log.debug("check %s failed", name, exc_info=True)
            out.append(Result(name, WARN, f"could not check: {type(err).__name__}: {err}"))
    return out
