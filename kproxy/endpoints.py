"""Which endpoints a Service port sends traffic to, for Cluster and Local policy.

Upstream's pkg/proxy/topology.go (CategorizeEndpoints) restated: ready endpoints first,
serving+terminating ones when none is ready, topology hints when every ready endpoint carries
them and one matches this node, Local policy choosing among this node's endpoints on its own.
Shared by every renderer. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kproxy.model import Endpoint, EndpointSlice, ServicePort

PREFER_SAME_NODE = "PreferSameNode"
PREFER_SAME_ZONE = "PreferSameZone"


@dataclass(frozen=True, slots=True)
class ResolvedEndpoint:
    """One endpoint of one Service port: address, port and the EndpointSlice's view of it."""

    ip: str
    port: int
    endpoint: Endpoint

    @property
    def ready(self) -> bool:
        return self.endpoint.ready

    @property
    def serving_terminating(self) -> bool:
        return self.endpoint.serving and self.endpoint.terminating


def endpoints_for_port(
    port: ServicePort, slices: list[EndpointSlice], address_type: str
) -> list[ResolvedEndpoint]:
    """All endpoints of one Service port, de-duplicated and sorted by `ip:port` as upstream.

    The port is the EndpointSlice port whose name and protocol equal the Service port's (the
    EndpointSlice controller already resolved targetPort, by number or by name).
    """
    found: dict[str, ResolvedEndpoint] = {}
    for eps in slices:
        if eps.address_type != address_type:
            continue
        for ep_port in eps.ports:
            if ep_port.name != port.name or ep_port.protocol != port.protocol:
                continue
            for ep in eps.endpoints:
                found.setdefault(
                    f"{ep.ip}:{ep_port.port}", ResolvedEndpoint(ep.ip, ep_port.port, ep)
                )
    return [found[k] for k in sorted(found)]


@dataclass
class Categorized:
    cluster: list[ResolvedEndpoint] = field(default_factory=list)
    local: list[ResolvedEndpoint] = field(default_factory=list)
    # Every endpoint some rule may send to: the union of the two lists (its SEP chains).
    reachable: list[ResolvedEndpoint] = field(default_factory=list)
    # Some endpoint anywhere can take traffic (ready, or serving and terminating).
    has_any: bool = False
    topology_mode: str = ""


def topology_mode(
    endpoints: list[ResolvedEndpoint], node_name: str, zone: str, prefer_same_node: bool = True
) -> str:
    """Hints apply only when every ready endpoint carries them and one names this node/zone."""
    all_node_hints = all_zone_hints = True
    for_node = for_zone = False
    for ep in endpoints:
        if not ep.ready:
            continue
        node_hints = ep.endpoint.node_hints or ()
        zone_hints = ep.endpoint.zone_hints or ()
        if not node_hints:
            all_node_hints = False
        elif node_name in node_hints:
            for_node = True
        if not zone_hints:
            all_zone_hints = False
        elif zone and zone in zone_hints:
            for_zone = True
    if prefer_same_node and all_node_hints and for_node:
        return PREFER_SAME_NODE
    if all_zone_hints and for_zone:
        return PREFER_SAME_ZONE
    return ""


def _available(ep: ResolvedEndpoint, mode: str, node_name: str, zone: str) -> bool:
    if mode == PREFER_SAME_NODE:
        return node_name in (ep.endpoint.node_hints or ())
    if mode == PREFER_SAME_ZONE:
        return zone in (ep.endpoint.zone_hints or ())
    return True


def categorize(
    endpoints: list[ResolvedEndpoint],
    node_name: str,
    zone: str,
    uses_cluster: bool,
    uses_local: bool,
) -> Categorized:
    out = Categorized()
    if uses_cluster:
        out.topology_mode = topology_mode(endpoints, node_name, zone)
        out.cluster = [
            e for e in endpoints if e.ready and _available(e, out.topology_mode, node_name, zone)
        ]
        if not out.cluster:
            out.cluster = [e for e in endpoints if e.serving_terminating]
        out.has_any = bool(out.cluster)
    if not uses_local:
        out.reachable = out.cluster
        return out

    def local(e: ResolvedEndpoint) -> bool:
        return bool(node_name) and e.endpoint.node_name == node_name

    if any(e.ready or e.serving_terminating for e in endpoints):
        out.has_any = True
    out.local = [e for e in endpoints if local(e) and e.ready]
    if not out.local:
        out.local = [e for e in endpoints if local(e) and e.serving_terminating]
    if not uses_cluster:
        out.reachable = out.local
        return out
    merged = {f"{e.ip}:{e.port}": e for e in out.cluster}
    merged.update({f"{e.ip}:{e.port}": e for e in out.local})
    out.reachable = [merged[k] for k in sorted(merged)]
    return out
