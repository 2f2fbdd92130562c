"""What one Service port does on this node, decided once for every renderer.

Upstream's syncProxyRules (pkg/proxy/iptables/proxier.go) decides per Service port which
endpoints serve internal (ClusterIP) and external (NodePort, externalIP, LoadBalancer)
traffic, whether those exist here, and which chains are needed; the iptables and nftables
renderers only differ in how they write that down. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from kproxy.endpoints import Categorized, ResolvedEndpoint, categorize
from kproxy.model import Service


def family_ips(ips: tuple[str, ...], version: int) -> list[str]:
    # The model holds validated addresses: only IPv6 ones contain ":".
    return [ip for ip in ips if (":" in ip) == (version == 6)]


def family_cidrs(cidrs: tuple[str, ...], version: int) -> list[str]:
    return [c for c in cidrs if (":" in c) == (version == 6)]


@dataclass(frozen=True)
class PortPolicy:
    external_ips: tuple[str, ...]
    lb_ips: tuple[str, ...]
    source_ranges: tuple[str, ...]
    int_local: bool  # internalTrafficPolicy Local
    ext_local: bool  # externalTrafficPolicy Local (only where the API honours it)
    externally_accessible: bool
    health_port: int  # healthCheckNodePort to open, 0 if none
    endpoints: Categorized
    has_endpoints: bool  # some endpoint anywhere can take traffic
    has_internal: bool  # ClusterIP traffic has endpoints under its policy
    has_external: bool  # external traffic has endpoints under its policy
    uses_cluster_chain: bool
    uses_local_chain: bool
    uses_ext_chain: bool
    # loadBalancerSourceRanges apply to the LoadBalancer IPs. nftables mode writes its
    # firewall whenever they do (upstream's nftables proxier: outside the ranges dropped,
    # inside given the no-endpoints reject when there are none), iptables mode only with
    # endpoints (`uses_fw_chain`, upstream's iptables proxier).
    firewalled: bool
    uses_fw_chain: bool
    # A source range holds one of this node's IPs: the node's own requests to a VIP-like LB
    # address loop back with the VIP as source, and must be let through too.
    allow_from_node: bool


def port_policy(
    svc: Service,
    node_port: int,
    all_endpoints: list[ResolvedEndpoint],
    version: int,
    node_name: str,
    zone: str,
    node_ips: tuple[str, ...],
) -> PortPolicy:
    external_ips = tuple(family_ips(svc.external_ips, version))
    lb_ips = tuple(family_ips(svc.load_balancer_ips, version))
    source_ranges = tuple(family_cidrs(svc.load_balancer_source_ranges, version))
    externally_accessible = bool(node_port or lb_ips or external_ips)
    # Upstream sets externalPolicyLocal only for Services the API calls externally accessible
    # (LoadBalancer, NodePort, or ClusterIP with externalIPs).
    api_external = svc.type in ("NodePort", "LoadBalancer") or bool(svc.external_ips)
    ext_local = svc.external_policy_local and api_external
    int_local = svc.internal_policy_local
    uses_cluster = not int_local or externally_accessible
    uses_local = int_local or (ext_local and externally_accessible)
    cat = categorize(all_endpoints, node_name, zone, uses_cluster, uses_local)
    has_endpoints = cat.has_any
    firewalled = bool(lb_ips) and bool(source_ranges)
    node_addrs = [ipaddress.ip_address(ip) for ip in family_ips(node_ips, version)]
    return PortPolicy(
        external_ips=external_ips,
        lb_ips=lb_ips,
        source_ranges=source_ranges,
        int_local=int_local,
        ext_local=ext_local,
        externally_accessible=externally_accessible,
        health_port=svc.health_check_node_port if svc.type == "LoadBalancer" and ext_local else 0,
        endpoints=cat,
        has_endpoints=has_endpoints,
        has_internal=has_endpoints and not (int_local and not cat.local),
        has_external=has_endpoints and not (ext_local and not cat.local),
        uses_cluster_chain=bool(cat.cluster) and uses_cluster,
        uses_local_chain=bool(cat.local) and uses_local,
        uses_ext_chain=has_endpoints and externally_accessible,
        firewalled=firewalled,
        uses_fw_chain=has_endpoints and firewalled,
        allow_from_node=firewalled
        and any(
            addr in ipaddress.ip_network(cidr) for cidr in source_ranges for addr in node_addrs
        ),
    )
