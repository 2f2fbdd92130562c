"""Stale UDP conntrack flow cleanup, as upstream's reconciler (kube-proxy >= v1.32).

UDP has no connection teardown, so a conntrack entry DNATed to an endpoint that went away
keeps pinning every later datagram of that flow to the dead endpoint (k8s issues 48370,
125467) until the client stays quiet for the UDP timeout. After a sync, kproxy lists the
UDP flows of the namespace it runs in, keeps every flow whose reply source is a serving
endpoint of the service it was sent to, and deletes the rest. It never clears all flows
(a restart must not reset live flows, issue 122740): only flows decided stale are deleted,
each by its exact original tuple and conntrack id.

A flow is judged as a NodePort flow only when it was sent to one of the node's addresses the
NodePort is served on: upstream matches the destination port alone, so a Service without
endpoints would also delete, say, a pod-to-pod flow that only shares its NodePort's number.

`stale_flows` is the pure decision; `list_udp_flows` / `delete_flows` are thin netlink I/O
through pyroute2 (no `conntrack` binary needed); `ConntrackCleanup` is the daemon's record of
the cleanups owed, run after each sync.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from kproxy import nodeinfo
from kproxy.endpoints import endpoints_for_port
from kproxy.model import ClusterState, NodeConfig
from kproxy.policy import family_ips

if TYPE_CHECKING:
    from kproxy.daemon.metrics import Metrics
    from kproxy.daemon.reconciler import SyncReport

log = logging.getLogger(__name__)

IPPROTO_UDP = socket.IPPROTO_UDP


@dataclass(frozen=True)
class UdpServicePort:
    """One UDP service port as the proxy programs it (one IP family)."""

    ips: frozenset[str]  # ClusterIPs + externalIPs + LB IPs of this family
    port: int
    node_port: int  # 0 if none
    endpoints: frozenset[tuple[str, int]]  # serving endpoints (ip, port), on any node


@dataclass(frozen=True)
class Flow:
    """One conntrack entry: its original and reply tuples (the reply source is where the
    original direction was DNATed to)."""

    family: int
    proto: int
    orig_src: str
    orig_dst: str
    orig_sport: int
    orig_dport: int
    reply_src: str
    reply_dst: str
    reply_sport: int
    reply_dport: int
    zone: int = 0
    id: int | None = None  # conntrack id: a delete only hits this very entry


@lru_cache(maxsize=4096)
def _canon(ip: str) -> str:
    """One spelling per address, so "fd00::0:1" and "fd00::1" compare equal."""
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


def stale_flows(
    flows: Iterable[Flow], ports: Iterable[UdpServicePort], node_port_ips: Collection[str]
) -> list[Flow]:
    """UDP flows sent to a service (ip, port) or to a NodePort whose reply source
    (ip, port) is not one of that service port's serving endpoints.

    Traffic policy, topology and terminating state are deliberately ignored (upstream): a
    flow to any serving endpoint stays, as a TCP connection would. A service port with no
    endpoints at all still has its flows cleared (upstream bug 139628, fixed). A flow is a
    NodePort flow only when sent to one of `node_port_ips` (the node's addresses the NodePort
    is served on, canonical spelling): upstream matches the port alone, whatever the
    destination, and deletes flows between other hosts that merely share the port number.
    """
    by_frontend: dict[tuple[str, int], set[tuple[str, int]]] = {}
    by_node_port: dict[int, set[tuple[str, int]]] = {}
    for sp in ports:
        endpoints = {(_canon(ip), port) for ip, port in sp.endpoints}
        # Two service ports on one frontend should not exist; if they do, a flow to either's
        # endpoints is kept rather than deleting a good flow.
        for ip in sp.ips:
            by_frontend.setdefault((_canon(ip), sp.port), set()).update(endpoints)
        if sp.node_port:
            by_node_port.setdefault(sp.node_port, set()).update(endpoints)
    stale = []
    for flow in flows:
        if flow.proto != IPPROTO_UDP:
            continue
        backend = (_canon(flow.reply_src), flow.reply_sport)
        # A flow to a service IP is judged by that service port alone, even when its port
        # number is also some NodePort: traffic to a ClusterIP never takes the NodePort
        # path (upstream would also check it against the NodePort's endpoints and could
        # delete a good flow).
        dst = _canon(flow.orig_dst)
        allowed = by_frontend.get((dst, flow.orig_dport))
        if allowed is None and dst in node_port_ips:
            allowed = by_node_port.get(flow.orig_dport)
        if allowed is not None and backend not in allowed:
            stale.append(flow)
    return stale


# --------------------------------------------------------------------------- netlink I/O


def _tuple_fields(family: int, nla: Any) -> tuple[str, str, int, int]:
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    t = NFCTAttrTuple.from_netlink(family, nla)
    return t.saddr, t.daddr, t.sport or 0, t.dport or 0


def _flow_from_msg(family: int, msg: Any) -> Flow | None:
    orig, reply = msg.get_attr("CTA_TUPLE_ORIG"), msg.get_attr("CTA_TUPLE_REPLY")
    if orig is None or reply is None:
        return None
    proto_nla = orig.get_attr("CTA_TUPLE_PROTO")
    proto = proto_nla.get_attr("CTA_PROTO_NUM") if proto_nla is not None else None
    if proto != IPPROTO_UDP:
        return None
    o_src, o_dst, o_sport, o_dport = _tuple_fields(family, orig)
    r_src, r_dst, r_sport, r_dport = _tuple_fields(family, reply)
    return Flow(
        family=family,
        proto=proto,
        orig_src=o_src,
        orig_dst=o_dst,
        orig_sport=o_sport,
        orig_dport=o_dport,
        reply_src=r_src,
        reply_dst=r_dst,
        reply_sport=r_sport,
        reply_dport=r_dport,
        zone=msg.get_attr("CTA_ZONE") or 0,
        id=msg.get_attr("CTA_ID"),
    )


def list_udp_flows(family: int) -> list[Flow]:
    """Every UDP conntrack entry of `family` (socket.AF_INET / AF_INET6) in this netns."""
    from pyroute2 import NFCTSocket

    with NFCTSocket(nfgen_family=family) as ct:
        # The whole table is dumped and filtered here: kernel-side tuple filters need
        # Linux >= 5.8 and had bugs; the decision needs every UDP flow anyway.
        flows = (_flow_from_msg(family, msg) for msg in ct.dump())
        return [f for f in flows if f is not None]


def delete_flows(flows: Iterable[Flow]) -> int:
    """Delete each flow by its original tuple (and id, zone); returns how many went.

    A flow already gone (expired, or re-created with another id) is not an error.
    """
    from pyroute2 import NFCTSocket
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    by_family: dict[int, list[Flow]] = {}
    for flow in flows:
        by_family.setdefault(flow.family, []).append(flow)
    deleted = 0
    for family, group in by_family.items():
        with NFCTSocket(nfgen_family=family) as ct:
            for flow in group:
                orig = NFCTAttrTuple(
                    family=family,
                    saddr=flow.orig_src,
                    daddr=flow.orig_dst,
                    proto=flow.proto,
                    sport=flow.orig_sport,
                    dport=flow.orig_dport,
                )
                try:
                    ct.entry("del", tuple_orig=orig, zone=flow.zone or None, id=flow.id)
                except NetlinkError as err:
                    if err.code != errno.ENOENT:
                        log.warning("cannot delete conntrack entry %s: %s", _show(flow), err)
                    continue
                log.debug("deleted stale conntrack entry %s", _show(flow))
                deleted += 1
    return deleted


def _show(flow: Flow) -> str:
    return (
        f"udp {flow.orig_src}:{flow.orig_sport} -> {flow.orig_dst}:{flow.orig_dport} "
        f"(replied by {flow.reply_src}:{flow.reply_sport})"
    )


def cleanup(
    ports: Iterable[UdpServicePort],
    family: int,
    node_port_ips: Collection[str],
    metrics: Metrics | None = None,
) -> int | None:
    """List this netns's UDP flows of `family`, delete the stale ones; returns the count, or
    None when the cleanup failed (the caller keeps it due).

    Errors are logged, never raised: a failed cleanup must not fail the sync that ran it.
    """
    start = time.monotonic()
    deleted: int | None = 0
    try:
        stale = stale_flows(list_udp_flows(family), ports, node_port_ips)
        if stale:
            deleted = delete_flows(stale)
            log.info("deleted %d of %d stale UDP conntrack entries", deleted, len(stale))
    except Exception as err:  # netlink errors, EPERM without CAP_NET_ADMIN, ...
        log.warning("conntrack cleanup (%s) failed: %s", _family_name(family), err)
        deleted = None
    if metrics is not None:
        metrics.conntrack_reconciled(time.monotonic() - start, deleted or 0)
    return deleted


def _family_name(family: int) -> str:
    return "IPv6" if family == socket.AF_INET6 else "IPv4"


def udp_service_ports(state: ClusterState, version: int) -> list[UdpServicePort]:
    """Every UDP Service port of IP `version`: its IPs, port, node port, serving endpoints."""
    out = []
    by_service = state.slices_by_service()
    address_type = f"IPv{version}"
    for key, svc in state.services.items():
        ips = frozenset(
            family_ips((*svc.cluster_ips, *svc.external_ips, *svc.load_balancer_ips), version)
        )
        if not ips:
            continue
        for port in svc.ports:
            if port.protocol != "UDP":
                continue
            eps = endpoints_for_port(port, by_service.get(key, []), address_type)
            serving = frozenset((e.ip, e.port) for e in eps if e.endpoint.serving)
            node_port = port.node_port if svc.type in ("NodePort", "LoadBalancer") else 0
            out.append(UdpServicePort(ips, port.port, node_port, serving))
    return out


class ConntrackCleanup:
    """Stale UDP conntrack flows, deleted after the sync that changed a UDP Service.

    What is owed is kept per IP family until a sync of that family succeeds: a sync that
    failed or was postponed took the changes out of the store, and forgetting them left
    clients pinned to a removed endpoint for as long as they kept sending (k8s issue 139628).
    The cleanup then runs against the state and config that successful sync applied.
    """

    def __init__(
        self,
        families: list[str],
        mode: str,
        metrics: Metrics | None = None,
        clean: Callable[[SyncReport, int], int | None] | None = None,
    ) -> None:
        self.families = families  # "IPv4", "IPv6": the reconciler's family names
        self.mode = mode
        self.metrics = metrics
        self.clean = clean or self._clean
        self.due: set[str] = set()

    def after_sync(self, report: SyncReport) -> None:
        if _udp_changed(report):
            self.due.update(self.families)
        for name in sorted(self.due):
            if name in report.failed_families:
                continue  # its rules are not the report's state yet
            version = 6 if name == "IPv6" else 4
            deleted = self.clean(report, version)
            if deleted is None:
                continue  # the cleanup failed: tried again after the next sync
            self.due.discard(name)
            if deleted:
                log.info("removed %d stale UDP conntrack entries (%s)", deleted, name)

    def _clean(self, report: SyncReport, version: int) -> int | None:
        config = report.config or NodeConfig()
        ports = udp_service_ports(report.state, version)
        try:
            local = nodeinfo.local_addresses() if config.nodeport_ips is None else []
        except Exception as err:  # netlink: logged, and the cleanup stays due
            log.warning("conntrack cleanup: cannot list this node's addresses: %s", err)
            return None
        node_port_ips = nodeinfo.nodeport_destinations(config, version, self.mode, local)
        af = socket.AF_INET if version == 4 else socket.AF_INET6
        return cleanup(ports, af, node_port_ips, self.metrics)


def _udp_changed(report: SyncReport) -> bool:
    """A UDP Service, or the endpoints of one, changed in this sync."""
    return any(
        p.protocol == "UDP"
        for key in report.changes.services
        if (svc := report.state.services.get(key)) is not None
        for p in svc.ports
    )
