"""ClusterState + NodeConfig -> RuleSet in upstream kube-proxy's iptables layout.

Chain names, comments, tables and jump points are kube-proxy's (pkg/proxy/iptables), so a
node can move between kube-proxy and kproxy with no gap. Every rule is written in the exact
canonical form `iptables-save` prints back (addresses with a prefix length, `-p` before the
matches, quoted comments, MARK as --set-xmark, REJECT with its --reject-with, statistic
probabilities as the kernel stores them), so the plan compares strings. Pure: no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from dataclasses import dataclass, field
from functools import lru_cache

from kproxy.model import ClusterState, Endpoint, EndpointSlice, NodeConfig, Service, ServicePort
from kproxy.ruleset import Jump, RuleSet

NODEPORTS_COMMENT = "kubernetes service nodeports; NOTE: this must be the last rule in this chain"

# (table, built-in chain, extra matches, comment, owned chain): upstream's iptablesJumpChains.
JUMPS = (
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW",
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW",
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
    ),
    ("filter", "INPUT", "", "kubernetes health check service ports", "KUBE-NODEPORTS"),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW",
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW",
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    ("filter", "FORWARD", "", "kubernetes forwarding rules", "KUBE-FORWARD"),
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW",
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW",
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW",
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    ("nat", "OUTPUT", "", "kubernetes service portals", "KUBE-SERVICES"),
    ("nat", "PREROUTING", "", "kubernetes service portals", "KUBE-SERVICES"),
    ("nat", "POSTROUTING", "", "kubernetes postrouting rules", "KUBE-POSTROUTING"),
)

# Fixed chains in the order upstream declares them; all are created even when empty.
FIXED = (
    ("filter", "KUBE-NODEPORTS"),
    ("filter", "KUBE-SERVICES"),
    ("filter", "KUBE-EXTERNAL-SERVICES"),
    ("filter", "KUBE-FORWARD"),
    ("filter", "KUBE-PROXY-FIREWALL"),
    ("nat", "KUBE-NODEPORTS"),
    ("nat", "KUBE-SERVICES"),
    ("nat", "KUBE-MARK-MASQ"),
    ("nat", "KUBE-POSTROUTING"),
    # Empty canaries: their disappearance tells the daemon another tool flushed a table.
    ("mangle", "KUBE-PROXY-CANARY"),
    ("nat", "KUBE-PROXY-CANARY"),
    ("filter", "KUBE-PROXY-CANARY"),
)


@dataclass(frozen=True)
class Family:
    version: int
    host_prefix: int
    reject_with: str
    recent_mask: str
    loopback: str

    def host(self, ip: str) -> str:
        return f"{ip}/{self.host_prefix}"

    def join(self, ip: str, port: int) -> str:
        return f"[{ip}]:{port}" if self.version == 6 else f"{ip}:{port}"


IPV4 = Family(4, 32, "icmp-port-unreachable", "255.255.255.255", "127.0.0.0/8")
IPV6 = Family(
    6, 128, "icmp6-port-unreachable", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::1/128"
)


def hash16(text: str) -> str:
    """First 16 characters of base32(SHA-256(text)), as upstream names its chains."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def service_port_name(svc: Service, port: ServicePort) -> str:
    """Upstream's ServicePortName.String(): `ns/name:port`, or `ns/name` for an unnamed port."""
    base = f"{svc.namespace}/{svc.name}"
    return f"{base}:{port.name}" if port.name else base


def service_chain_suffix(spn: str, protocol: str) -> str:
    return hash16(spn + protocol.lower())


def endpoint_chain(spn: str, protocol: str, endpoint: str) -> str:
    return "KUBE-SEP-" + hash16(spn + protocol.lower() + endpoint)


@lru_cache(maxsize=4096)
def probability(n: int) -> str:
    """Probability for the rule that picks 1 of the `n` remaining endpoints.

    Upstream writes `%0.10f` of 1/n; the kernel keeps round(p * 2^31) and iptables-save prints
    that back with 11 decimals. This returns the printed form of upstream's value, so the
    rendered rule equals what the kernel shows.
    """
    upstream = float(f"{1.0 / n:0.10f}")
    return f"{round(upstream * 0x80000000) / 0x80000000:.11f}"


def quote(comment: str) -> str:
    return '"' + comment.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class ResolvedEndpoint:
    ip: str
    port: int
    endpoint: Endpoint


def endpoints_for_port(
    svc: Service, port: ServicePort, slices: list[EndpointSlice], address_type: str
) -> list[ResolvedEndpoint]:
    """The endpoints of one Service port, de-duplicated and sorted as upstream sorts them.

    The endpoint's port is the EndpointSlice port whose name and protocol equal the Service
    port's (the EndpointSlice controller already resolved targetPort, by number or by name).
    """
    found: dict[str, ResolvedEndpoint] = {}
    for eps in slices:
        if eps.address_type != address_type:
            continue
        for ep_port in eps.ports:
            if ep_port.name != port.name or ep_port.protocol != port.protocol:
                continue
            for ep in eps.endpoints:
                resolved = ResolvedEndpoint(ep.ip, ep_port.port, ep)
                found.setdefault(f"{ep.ip}:{ep_port.port}", resolved)
    return [found[k] for k in sorted(found)]


@dataclass
class RenderResult:
    ruleset: RuleSet
    warnings: list[str] = field(default_factory=list)


def render(state: ClusterState, config: NodeConfig, family: Family = IPV4) -> RenderResult:
    """The complete desired rule set for one IP family."""
    out = RuleSet()
    warnings: list[str] = []
    for table, chain in FIXED:
        out.chain(table, chain)
    for table, chain, extra, comment, target in JUMPS:
        rule = f"{extra + ' ' if extra else ''}-m comment --comment {quote(comment)} -j {target}"
        out.jumps.append(Jump(table, chain, rule))
    for key in (
        ("nat", "KUBE-SERVICES"),
        ("nat", "KUBE-NODEPORTS"),
        ("filter", "KUBE-SERVICES"),
        ("filter", "KUBE-EXTERNAL-SERVICES"),
        ("filter", "KUBE-NODEPORTS"),
        ("filter", "KUBE-PROXY-FIREWALL"),
    ):
        out.unordered[key] = 0
    out.unordered[("nat", "KUBE-SERVICES")] = 1  # the KUBE-NODEPORTS jump stays last

    mark = config.masquerade_mark
    masq_rules = out.chain("nat", "KUBE-MARK-MASQ")
    masq_rules.append(f"-j MARK --set-xmark {mark}/{mark}")
    out.chain("nat", "KUBE-POSTROUTING").extend(
        [
            f"-m mark ! --mark {mark}/{mark} -j RETURN",
            f"-j MARK --set-xmark {mark}/0x0",
            '-m comment --comment "kubernetes service traffic requiring SNAT" '
            "-j MASQUERADE --random-fully",
        ]
    )
    out.chain("filter", "KUBE-FORWARD").extend(
        [
            "-m conntrack --ctstate INVALID -j DROP",
            f'-m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} '
            "-j ACCEPT",
            '-m comment --comment "kubernetes forwarding conntrack rule" '
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ]
    )

    local_cidr = _local_cidr(config, family, warnings)
    address_type = f"IPv{family.version}"
    claimed: dict[tuple[str, str, int], str] = {}
    claimed_node_ports: dict[tuple[str, int], str] = {}
    by_service = state.slices_by_service()
    for key in sorted(state.services):
        svc = state.services[key]
        cluster_ip = next(
            (ip for ip in svc.cluster_ips if ipaddress.ip_address(ip).version == family.version),
            None,
        )
        if cluster_ip is None:
            continue
        slices = by_service.get(key, [])
        for port in svc.ports:
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
            endpoints = [
                e for e in endpoints_for_port(svc, port, slices, address_type) if e.endpoint.ready
            ]
            _render_service_port(
                out,
                family,
                config,
                local_cidr,
                svc,
                port,
                spn,
                cluster_ip,
                node_port,
                endpoints,
            )

    out.chain("nat", "KUBE-SERVICES").append(
        f"! -d {family.loopback} -m comment --comment {quote(NODEPORTS_COMMENT)} "
        "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    )
    return RenderResult(out, warnings)


def _local_cidr(config: NodeConfig, family: Family, warnings: list[str]) -> str | None:
    cidrs = [
        str(ipaddress.ip_network(c, strict=False))
        for c in config.cluster_cidrs
        if ipaddress.ip_network(c, strict=False).version == family.version
    ]
    if len(cidrs) > 1:
        warnings.append(
            f"--cluster-cidr: several IPv{family.version} CIDRs given; only {cidrs[0]} is used "
            "to tell pod traffic apart, as kube-proxy does"
        )
    return cidrs[0] if cidrs else None


def _render_service_port(
    out: RuleSet,
    family: Family,
    config: NodeConfig,
    local_cidr: str | None,
    svc: Service,
    port: ServicePort,
    spn: str,
    cluster_ip: str,
    node_port: int,
    endpoints: list[ResolvedEndpoint],
) -> None:
    proto = port.protocol.lower()
    suffix = service_chain_suffix(spn, proto)
    svc_chain = "KUBE-SVC-" + suffix
    ext_chain = "KUBE-EXT-" + suffix
    dst_match = f"-d {family.host(cluster_ip)} -p {proto}"
    port_match = f"-m {proto} --dport {port.port}"
    cluster_comment = quote(f"{spn} cluster IP")

    if not endpoints:
        reject = f"-j REJECT --reject-with {family.reject_with}"
        no_eps = quote(f"{spn} has no endpoints")
        out.chain("filter", "KUBE-SERVICES").append(
            f"{dst_match} -m comment --comment {no_eps} {port_match} {reject}"
        )
        if node_port:
            out.chain("filter", "KUBE-EXTERNAL-SERVICES").append(
                f"-p {proto} -m comment --comment {no_eps} -m addrtype --dst-type LOCAL "
                f"-m {proto} --dport {node_port} {reject}"
            )
        return

    out.chain("nat", "KUBE-SERVICES").append(
        f"{dst_match} -m comment --comment {cluster_comment} {port_match} -j {svc_chain}"
    )

    rules = out.chain("nat", svc_chain)
    if config.masquerade_all:
        rules.append(
            f"{dst_match} -m comment --comment {cluster_comment} {port_match} -j KUBE-MARK-MASQ"
        )
    elif local_cidr:
        rules.append(
            f"! -s {local_cidr} {dst_match} -m comment --comment {cluster_comment} "
            f"{port_match} -j KUBE-MARK-MASQ"
        )
    n = len(endpoints)
    sep_names = []
    for i, ep in enumerate(endpoints):
        addr = family.join(ep.ip, ep.port)
        sep = endpoint_chain(spn, proto, addr)
        sep_names.append(sep)
        comment = f"-m comment --comment {quote(f'{spn} -> {addr}')}"
        if i < n - 1:
            rules.append(
                f"{comment} -m statistic --mode random --probability {probability(n - i)} -j {sep}"
            )
        else:
            rules.append(f"{comment} -j {sep}")
        out.chain("nat", sep).extend(
            [
                f"-s {family.host(ep.ip)} -m comment --comment {quote(spn)} -j KUBE-MARK-MASQ",
                f"-p {proto} -m comment --comment {quote(spn)} -m {proto} "
                f"-j DNAT --to-destination {addr}",
            ]
        )

    if node_port:
        out.chain("nat", "KUBE-NODEPORTS").append(
            f"-p {proto} -m comment --comment {quote(spn)} -m {proto} --dport {node_port} "
            f"-j {ext_chain}"
        )
        masq_comment = quote(f"masquerade traffic for {spn} external destinations")
        out.chain("nat", ext_chain).extend(
            [
                f"-m comment --comment {masq_comment} -j KUBE-MARK-MASQ",
                f"-j {svc_chain}",
            ]
        )
