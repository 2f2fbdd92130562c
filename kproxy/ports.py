"""The Service ports a renderer writes, one family at a time: cluster IP of the family,
endpoints, and conflicts settled (two Services on one IP/port or one NodePort: the first in
namespace/name order keeps it, the other is reported). Shared by every renderer. No I/O."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from kproxy.endpoints import ResolvedEndpoint, endpoints_for_port
from kproxy.model import ClusterState, EndpointSlice, Service, ServicePort
from kproxy.policy import family_ips
from kproxy.rendercache import RenderCache


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


@dataclass
class PortIndex:
    """The ports of the last render: jobs by key, the ports of each Service, the claims on
    IP/port and NodePort, the endpoint total (large-cluster mode), whether any conflict was
    settled (then only a full render may settle the next one the same way)."""

    jobs: dict[tuple, PortJob]
    by_service: dict[tuple[str, str], list[tuple]]
    claimed: dict[tuple[str, str, int], str]
    claimed_node_ports: dict[tuple[str, int], str]
    total: int
    conflicts: bool


def _service_jobs(
    key: tuple[str, str],
    state: ClusterState,
    slices: tuple[EndpointSlice, ...],
    version: int,
    cache: RenderCache,
) -> list[PortJob]:
    """One Service's ports before conflicts are settled (node port as the Service asks)."""
    svc = state.services[key]
    cluster_ip = next(iter(family_ips(svc.cluster_ips, version)), None)
    if cluster_ip is None:
        return []
    address_type = f"IPv{version}"
    jobs = []
    for port in svc.ports:
        pkey = (key, port.name, port.protocol)
        eps = cache.endpoints(
            pkey, (port, slices), partial(endpoints_for_port, port, list(slices), address_type)
        )
        node_port = port.node_port if svc.type in ("NodePort", "LoadBalancer") else 0
        jobs.append(
            PortJob(
                pkey, svc, port, service_port_name(svc, port), cluster_ip, node_port, slices, eps
            )
        )
    return jobs


def _claim(index: PortIndex, job: PortJob, warnings: list[str]) -> PortJob | None:
    """Settle the job's claims; None when its IP/port belongs to another Service port."""
    svc, proto = job.svc, job.port.protocol.lower()
    owner = index.claimed.setdefault((job.cluster_ip, proto, job.port.port), job.spn)
    if owner != job.spn:
        warnings.append(
            f"Service {svc.namespace}/{svc.name}: spec.ports: {job.cluster_ip} {proto} "
            f"{job.port.port} is already used by {owner}; port skipped"
        )
        index.conflicts = True
        return None
    if job.node_port:
        np_owner = index.claimed_node_ports.setdefault((proto, job.node_port), job.spn)
        if np_owner != job.spn:
            warnings.append(
                f"Service {svc.namespace}/{svc.name}: spec.ports: nodePort {proto} "
                f"{job.node_port} is already used by {np_owner}; nodePort skipped"
            )
            index.conflicts = True
            return replace(job, node_port=0)
    return job


def service_ports(
    state: ClusterState, version: int, cache: RenderCache, warnings: list[str]
) -> PortIndex:
    """Every port to render, in namespace/name order (the first claim wins)."""
    by_slice = state.slices_by_service()
    index = PortIndex({}, {}, {}, {}, 0, False)
    for key in sorted(state.services):
        for job in _service_jobs(key, state, tuple(by_slice.get(key, ())), version, cache):
            index.total += len(job.endpoints)
            settled = _claim(index, job, warnings)
            if settled is not None:
                index.jobs[job.key] = settled
                index.by_service.setdefault(key, []).append(job.key)
    return index


def service_ports_delta(
    state: ClusterState,
    version: int,
    cache: RenderCache,
    prev: PortIndex,
    changed: set[tuple[str, str]],
    warnings: list[str],
) -> tuple[PortIndex, set[tuple]] | None:
    """The index after `changed` Services, and the port keys to render again (added, changed
    or gone), touching only those Services. None when a full render is needed: a conflict
    is or was involved (who wins depends on every Service's name)."""
    if prev.conflicts:
        return None
    index = PortIndex(
        dict(prev.jobs),
        dict(prev.by_service),
        dict(prev.claimed),
        dict(prev.claimed_node_ports),
        prev.total,
        False,
    )
    touched: set[tuple] = set()
    for key in changed:
        for pkey in index.by_service.pop(key, []):
            job = index.jobs.pop(pkey)
            touched.add(pkey)
            index.total -= len(job.endpoints)
            proto = job.port.protocol.lower()
            index.claimed.pop((job.cluster_ip, proto, job.port.port), None)
            if job.node_port:
                index.claimed_node_ports.pop((proto, job.node_port), None)
    by_slice: dict[tuple[str, str], list[EndpointSlice]] = {}
    for eps in state.slices.values():
        if (eps.namespace, eps.service_name) in changed:
            by_slice.setdefault((eps.namespace, eps.service_name), []).append(eps)
    for key in sorted(changed):
        if key not in state.services:
            continue
        slices = tuple(sorted(by_slice.get(key, ()), key=lambda s: s.key))
        for job in _service_jobs(key, state, slices, version, cache):
            index.total += len(job.endpoints)
            settled = _claim(index, job, warnings)
            if settled is None or settled is not job:
                return None
            index.jobs[job.key] = job
            index.by_service.setdefault(key, []).append(job.key)
            touched.add(job.key)
    return index, touched


@dataclass
class RenderedPorts:
    """What both renderers' results carry besides their rules: warnings, the no-local-endpoint
    counts (upstream's sync_proxy_rules_no_local_endpoints_total{traffic_policy}), and for
    render_delta the ports rendered, their output and the context they had."""

    warnings: list[str] = field(default_factory=list)
    no_local_endpoints: dict[str, int] = field(
        default_factory=lambda: {"internal": 0, "external": 0}
    )
    index: Any = None
    ctx: Any = None
    fragments: dict[tuple, Any] = field(default_factory=dict)


@dataclass
class Delta:
    """The Service ports a change touched: their output before and after (None: absent)."""

    pairs: list[tuple[Any, Any]]
    result: Any  # the render result the change leads to, for the next delta


def delta_pairs(prev: Any, result: Any, touched: set[tuple], render_job: Any) -> list:
    """For each touched port: (output before, output after); fills `result`'s fragments and
    no-local-endpoint counts from `prev`'s. Works for either renderer's results."""
    result.fragments = dict(prev.fragments)
    result.no_local_endpoints = dict(prev.no_local_endpoints)
    pairs = []
    for pkey in touched:
        old = prev.fragments.get(pkey)
        new = render_job(result.index.jobs[pkey]) if pkey in result.index.jobs else None
        if new is None:
            result.fragments.pop(pkey, None)
        else:
            result.fragments[pkey] = new
        for f, sign in ((old, -1), (new, 1)):
            if f is not None:
                result.no_local_endpoints["internal"] += sign * f.no_local_internal
                result.no_local_endpoints["external"] += sign * f.no_local_external
        # Every touched port goes in, changed or not: two ports of one Service may share an
        # element (its cluster IP in a set) that must not look removed.
        pairs.append((old, new))
    return pairs
