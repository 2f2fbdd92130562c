"""The Service ports a renderer writes, one family at a time: cluster IP of the family,
endpoints, and conflicts settled (two Services on one IP/port or one NodePort: the first in
namespace/name order keeps it, the other is reported). Shared by every renderer. No I/O."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from kproxy.endpoints import ResolvedEndpoint, endpoints_for_port
from kproxy.model import ClusterState, EndpointSlice, Service, ServicePort
from kproxy.policy import family_ips
from kproxy.render.cache import RenderCache


@dataclass(frozen=True)
class PortJob:
    key: tuple  # (service key, port name, protocol): identifies the port across syncs
    svc: Service
    port: ServicePort
    spn: str  # upstream's ServicePortName string, `ns/name:port`
    cluster_ip: str
    node_port: int  # 0 when none (or lost to a conflict)
    slices: tuple[EndpointSlice, ...]
    endpoints: list[ResolvedEndpoint]


def service_port_name(svc: Service, port: ServicePort) -> str:
    """Upstream's ServicePortName.String(): `ns/name:port`, or `ns/name` for an unnamed port."""
    base = f"{svc.namespace}/{svc.name}"
    return f"{base}:{port.name}" if port.name else base


def service_ports(
    state: ClusterState, version: int, cache: RenderCache, warnings: list[str]
) -> tuple[list[PortJob], int]:
    """The ports to render, and the number of endpoints of all of them (large-cluster mode)."""
    by_service = state.slices_by_service()
    address_type = f"IPv{version}"
    jobs: list[PortJob] = []
    total = 0
    claimed: dict[tuple[str, str, int], str] = {}
    claimed_node_ports: dict[tuple[str, int], str] = {}
    for key in sorted(state.services):
        svc = state.services[key]
        cluster_ip = next(iter(family_ips(svc.cluster_ips, version)), None)
        if cluster_ip is None:
            continue
        slices = tuple(by_service.get(key, ()))
        for port in svc.ports:
            pkey = (key, port.name, port.protocol)
            eps = cache.endpoints(
                pkey,
                (port, slices),
                partial(endpoints_for_port, port, list(slices), address_type),
            )
            total += len(eps)
            spn = service_port_name(svc, port)
            proto = port.protocol.lower()
            owner = claimed.setdefault((cluster_ip, proto, port.port), spn)
            if owner != spn:
                warnings.append(
                    f"Service {svc.namespace}/{svc.name}: spec.ports: {cluster_ip} {proto} "
                    f"{port.port} is already used by {owner}; port skipped"
                )
                continue
            node_port = port.node_port if svc.type in ("NodePort", "LoadBalancer") else 0
            if node_port:
                np_owner = claimed_node_ports.setdefault((proto, node_port), spn)
                if np_owner != spn:
                    warnings.append(
                        f"Service {svc.namespace}/{svc.name}: spec.ports: nodePort {proto} "
                        f"{node_port} is already used by {np_owner}; nodePort skipped"
                    )
                    node_port = 0
            jobs.append(PortJob(pkey, svc, port, spn, cluster_ip, node_port, slices, eps))
    return jobs, total
