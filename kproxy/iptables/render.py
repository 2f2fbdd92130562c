"""ClusterState + NodeConfig -> RuleSet in upstream kube-proxy's iptables layout.

Chain names, comments, tables and jump points are kube-proxy's (pkg/proxy/iptables), so a
node can move between kube-proxy and kproxy with no gap. Every rule is written in the exact
canonical form `iptables-save` prints back (addresses with a prefix length, `-p` before the
matches, quoted comments, MARK as --set-xmark, REJECT with its --reject-with, statistic
probabilities as the kernel stores them), so the plan compares strings. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from functools import lru_cache, partial

from kproxy.endpoints import ResolvedEndpoint
from kproxy.iptables.rules import Fragments, Jump, RuleSet
from kproxy.localdetect import LocalMatch, local_match
from kproxy.model import ZONE_LABEL, ClusterState, NodeConfig, Service
from kproxy.policy import family_ips, port_policy
from kproxy.ports import (
    Delta,
    PortJob,
    RenderedPorts,
    delta_pairs,
    service_ports,
    service_ports_delta,
)
from kproxy.rendercache import RenderCache

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


# base32 of every 10-bit value: two characters per lookup (hash16 runs 110k times at 10k × 10).
_B32_PAIRS = [
    a + b for a in "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567" for b in "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
]


def hash16(text: str) -> str:
    """First 16 characters of base32(SHA-256(text)), as upstream names its chains."""
    # 16 base32 characters are exactly the first 10 bytes (80 bits = 8 × 10): a table lookup
    # per 10 bits, 2x faster than base64.b32encode of those bytes.
    n = int.from_bytes(hashlib.sha256(text.encode()).digest()[:10], "big")
    p = _B32_PAIRS
    return "".join(
        (
            p[n >> 70],
            p[(n >> 60) & 1023],
            p[(n >> 50) & 1023],
            p[(n >> 40) & 1023],
            p[(n >> 30) & 1023],
            p[(n >> 20) & 1023],
            p[(n >> 10) & 1023],
            p[n & 1023],
        )
    )


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


@dataclass
class RenderResult(RenderedPorts):
    ruleset: RuleSet = field(default_factory=RuleSet)


# Above this many endpoints in total, per-endpoint comments are left out (upstream's
# largeClusterEndpointsThreshold: it "can reduce size of iptables ... even by 40%+").
LARGE_CLUSTER_ENDPOINTS = 1000


@dataclass
class _Fragment:
    """The rules one Service port contributes, chain by chain, in order."""

    chains: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    no_local_internal: int = 0
    no_local_external: int = 0

    def chain(self, table: str, chain: str) -> list[str]:
        return self.chains.setdefault((table, chain), [])


def render(
    state: ClusterState,
    config: NodeConfig,
    family: Family = IPV4,
    cache: RenderCache | None = None,
) -> RenderResult:
    """The complete desired rule set for one IP family."""
    cache = cache if cache is not None else RenderCache()
    out = RuleSet()
    result = RenderResult(ruleset=out)
    localhost_nodeports = family.version == 4 and config.localhost_nodeports
    for table, chain in FIXED:
        out.chain(table, chain)
    for table, chain, extra, comment, target in JUMPS:
        rule = f"{extra + ' ' if extra else ''}-m comment --comment {quote(comment)} -j {target}"
        out.jumps.append(Jump(table, chain, rule))
    for key in UNORDERED:
        out.unordered[key] = 0

    mark = config.masquerade_mark
    out.chain("nat", "KUBE-MARK-MASQ").append(f"-j MARK --set-xmark {mark}/{mark}")
    out.chain("nat", "KUBE-POSTROUTING").extend(
        [
            f"-m mark ! --mark {mark}/{mark} -j RETURN",
            f"-j MARK --set-xmark {mark}/0x0",
            '-m comment --comment "kubernetes service traffic requiring SNAT" '
            "-j MASQUERADE --random-fully",
        ]
    )
    if localhost_nodeports:
        # route_localnet (needed for 127.0.0.1 NodePorts) opens a hole (k8s issue 90259);
        # this is upstream's (and the kubelet's) rule closing it.
        out.chain("filter", "KUBE-FIREWALL").append(
            "! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "
            '"block incoming localnet connections" '
            "-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
        )
        out.jumps.append(Jump("filter", "INPUT", "-j KUBE-FIREWALL"))
        out.jumps.append(Jump("filter", "OUTPUT", "-j KUBE-FIREWALL"))

    ctx = _context(state, config, family, result.warnings)
    index = service_ports(state, family.version, cache, result.warnings)
    ctx.large = index.total > LARGE_CLUSTER_ENDPOINTS
    result.index, result.ctx = index, ctx
    for job in index.jobs.values():
        fragment = _fragment(cache, ctx, job)
        result.fragments[job.key] = fragment
        for (table, chain), rules in fragment.chains.items():
            out.chain(table, chain).extend(rules)
        result.no_local_endpoints["internal"] += fragment.no_local_internal
        result.no_local_endpoints["external"] += fragment.no_local_external
    cache.retain(set(index.jobs))

    comment = f"-m comment --comment {quote(NODEPORTS_COMMENT)}"
    services = out.chain("nat", "KUBE-SERVICES")
    if config.nodeport_ips is None:
        not_local = "" if localhost_nodeports else f"! -d {family.loopback} "
        services.append(f"{not_local}{comment} -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
        out.unordered[("nat", "KUBE-SERVICES")] = 1  # this jump stays last
    else:
        tail = 0
        for ip in family_ips(config.nodeport_ips, family.version):
            if ipaddress.ip_address(ip).is_loopback and not localhost_nodeports:
                result.warnings.append(
                    f"--nodeport-addresses: {ip} is a loopback address but localhost NodePorts "
                    "are off; ignored"
                )
                continue
            services.append(f"-d {family.host(ip)} {comment} -j KUBE-NODEPORTS")
            tail += 1
        out.unordered[("nat", "KUBE-SERVICES")] = tail

    forward = out.chain("filter", "KUBE-FORWARD")
    if not config.conntrack_tcp_liberal:
        # Drop INVALID packets that would otherwise reset connections (k8s issue 74839).
        forward.append("-m conntrack --ctstate INVALID -j DROP")
    forward.extend(
        [
            f'-m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} '
            "-j ACCEPT",
            '-m comment --comment "kubernetes forwarding conntrack rule" '
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ]
    )
    return result


UNORDERED = (
    ("nat", "KUBE-SERVICES"),
    ("nat", "KUBE-NODEPORTS"),
    ("filter", "KUBE-SERVICES"),
    ("filter", "KUBE-EXTERNAL-SERVICES"),
    ("filter", "KUBE-NODEPORTS"),
    ("filter", "KUBE-PROXY-FIREWALL"),
)


def _fragment(cache: RenderCache, ctx: _Context, job: PortJob) -> _Fragment:
    return cache.fragment(
        job.key,
        (job.svc, job.port, job.cluster_ip, job.node_port, job.slices, ctx),
        partial(_render_service_port, ctx, job),
    )


def _context(
    state: ClusterState, config: NodeConfig, family: Family, warnings: list[str] | None = None
) -> _Context:
    return _Context(
        family=family,
        config=config,
        local=local_match(config, state.node, family.version, warnings),
        zone=(state.node.labels.get(ZONE_LABEL, "") if state.node else ""),
        node_ips=tuple(family_ips(config.node_ips, family.version)),
    )


def render_delta(
    state: ClusterState,
    config: NodeConfig,
    changed: set[tuple[str, str]],
    prev: RenderResult,
    cache: RenderCache,
) -> Delta | None:
    """Only the Services in `changed`, against the render `prev`; None when the change reaches
    beyond them (node or flags changed, a conflict, large-cluster mode flipping) and a full
    render is needed."""
    ctx = _context(state, config, prev.ctx.family)
    ctx.large = prev.ctx.large
    if ctx != prev.ctx:
        return None
    warnings: list[str] = []
    step = service_ports_delta(state, ctx.family.version, cache, prev.index, changed, warnings)
    if step is None:
        return None
    index, touched = step
    if (index.total > LARGE_CLUSTER_ENDPOINTS) != ctx.large:
        return None
    result = RenderResult(ruleset=prev.ruleset, warnings=list(prev.warnings))
    result.index, result.ctx = index, ctx
    pairs = delta_pairs(prev, result, touched, partial(_fragment, cache, ctx))
    return Delta(pairs, result)


def fragments_of(fragments: list[_Fragment | None]) -> Fragments:
    """Just these fragments, shared chains present (maybe empty) and unordered without a
    pinned tail: planning one set against another (plan.plan_fragments) gives the change
    between them."""
    out = Fragments()
    for table, chain in UNORDERED:
        out.chain(table, chain)
        out.unordered[(table, chain)] = 0
    for f in fragments:
        if f is not None:
            for (table, chain), rules in f.chains.items():
                out.chain(table, chain).extend(rules)
    return out


@dataclass
class _Context:
    """What every Service port's rules depend on besides the Service itself."""

    family: Family
    config: NodeConfig
    local: LocalMatch | None  # how pod traffic is told (None: it is not)
    zone: str
    node_ips: tuple[str, ...]
    large: bool = False


def _render_service_port(ctx: _Context, job: PortJob) -> _Fragment:
    """One Service port, following upstream's syncProxyRules step by step."""
    out, fam = _Fragment(), ctx.family
    svc, port, spn, cluster_ip, node_port = (
        job.svc,
        job.port,
        job.spn,
        job.cluster_ip,
        job.node_port,
    )
    all_endpoints = job.endpoints
    proto = port.protocol.lower()
    suffix = service_chain_suffix(spn, proto)
    cluster_chain = "KUBE-SVC-" + suffix
    local_chain = "KUBE-SVL-" + suffix
    ext_chain = "KUBE-EXT-" + suffix
    fw_chain = "KUBE-FW-" + suffix

    pol = port_policy(
        svc, node_port, all_endpoints, fam.version, ctx.config.node_name, ctx.zone, ctx.node_ips
    )
    cat = pol.endpoints
    has_endpoints, has_internal, has_external = (
        pol.has_endpoints,
        pol.has_internal,
        pol.has_external,
    )
    internal_chain = local_chain if pol.int_local else cluster_chain
    external_policy_chain = local_chain if pol.ext_local else cluster_chain
    lb_chain = fw_chain if pol.uses_fw_chain else ext_chain

    if not has_endpoints:
        internal_filter = external_filter = f"REJECT --reject-with {fam.reject_with}"
        internal_comment = external_comment = quote(f"{spn} has no endpoints")
    else:
        internal_filter = external_filter = "DROP"
        internal_comment = external_comment = quote(f"{spn} has no local endpoints")
        out.no_local_internal = int(not has_internal)
        out.no_local_external = int(not has_external)

    def dst(ip: str) -> str:
        return f"-d {fam.host(ip)} -p {proto}"

    dport = f"-m {proto} --dport {port.port}"
    nat_services = out.chain("nat", "KUBE-SERVICES")
    filter_services = out.chain("filter", "KUBE-SERVICES")
    external_services = out.chain("filter", "KUBE-EXTERNAL-SERVICES")
    cluster_ip_comment = quote(f"{spn} cluster IP")

    if has_internal:
        nat_services.append(
            f"{dst(cluster_ip)} -m comment --comment {cluster_ip_comment} {dport} "
            f"-j {internal_chain}"
        )
    else:
        filter_services.append(
            f"{dst(cluster_ip)} -m comment --comment {internal_comment} {dport} "
            f"-j {internal_filter}"
        )

    for ip in pol.external_ips:
        if has_endpoints:
            nat_services.append(
                f"{dst(ip)} -m comment --comment {quote(f'{spn} external IP')} {dport} "
                f"-j {ext_chain}"
            )
        if not has_external:
            external_services.append(
                f"{dst(ip)} -m comment --comment {external_comment} {dport} -j {external_filter}"
            )

    for ip in pol.lb_ips:
        if has_endpoints:
            nat_services.append(
                f"{dst(ip)} -m comment --comment {quote(f'{spn} loadbalancer IP')} {dport} "
                f"-j {lb_chain}"
            )
        if pol.uses_fw_chain:
            out.chain("filter", "KUBE-PROXY-FIREWALL").append(
                f"{dst(ip)} -m comment --comment "
                f"{quote(f'{spn} traffic not accepted by {fw_chain}')} {dport} -j DROP"
            )
    if not has_external:
        for ip in pol.lb_ips:
            external_services.append(
                f"{dst(ip)} -m comment --comment {external_comment} {dport} -j {external_filter}"
            )

    if node_port:
        np_match = f"-m {proto} --dport {node_port}"
        if has_endpoints:
            # NodePorts are not subject to loadBalancerSourceRanges (as upstream).
            out.chain("nat", "KUBE-NODEPORTS").append(
                f"-p {proto} -m comment --comment {quote(spn)} {np_match} -j {ext_chain}"
            )
        if not has_external:
            external_services.append(
                f"-p {proto} -m comment --comment {external_comment} "
                f"-m addrtype --dst-type LOCAL {np_match} -j {external_filter}"
            )

    if pol.health_port:
        out.chain("filter", "KUBE-NODEPORTS").append(
            f"-p tcp -m comment --comment {quote(f'{spn} health check node port')} "
            f"-m tcp --dport {pol.health_port} -j ACCEPT"
        )

    if has_internal:
        masq = f"-m comment --comment {cluster_ip_comment} {dport} -j KUBE-MARK-MASQ"
        if ctx.config.masquerade_all:
            out.chain("nat", internal_chain).append(f"{dst(cluster_ip)} {masq}")
        elif ctx.local:
            # In iptables-save's order: -s, -d, -i, -p.
            src, iface = ctx.local.iptables(negate=True)
            parts = (src, f"-d {fam.host(cluster_ip)}", iface, f"-p {proto}", masq)
            out.chain("nat", internal_chain).append(" ".join(p for p in parts if p))

    if pol.uses_ext_chain:
        rules = out.chain("nat", ext_chain)
        if not pol.ext_local:
            rules.append(
                f"-m comment --comment "
                f"{quote(f'masquerade traffic for {spn} external destinations')} "
                "-j KUBE-MARK-MASQ"
            )
        else:
            if ctx.local:
                # Pod traffic to an external destination is treated as if it had gone out to
                # the load balancer and come back: no traffic policy applies.
                src, iface = ctx.local.iptables()
                rules.append(
                    f"{src or iface} -m comment --comment "
                    f"{quote(f'pod traffic for {spn} external destinations')} -j {cluster_chain}"
                )
            rules.append(
                f"-m comment --comment "
                f"{quote(f'masquerade LOCAL traffic for {spn} external destinations')} "
                "-m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"
            )
            rules.append(
                f"-m comment --comment "
                f"{quote(f'route LOCAL traffic for {spn} external destinations')} "
                f"-m addrtype --src-type LOCAL -j {cluster_chain}"
            )
        if has_external:
            rules.append(f"-j {external_policy_chain}")

    if pol.uses_fw_chain:
        rules = out.chain("nat", fw_chain)
        lb_comment = f"-m comment --comment {quote(f'{spn} loadbalancer IP')}"
        for cidr in pol.source_ranges:
            rules.append(f"-s {cidr} {lb_comment} -j {ext_chain}")
        if pol.allow_from_node:
            # A VIP-like LB's address is often local: the node's own requests loop back with
            # the VIP as source.
            for ip in pol.lb_ips:
                rules.append(f"-s {fam.host(ip)} {lb_comment} -j {ext_chain}")
        rules.append(
            "-m comment --comment "
            + quote(f"other traffic to {spn} will be dropped by KUBE-PROXY-FIREWALL")
        )

    # Every endpoint chain is named once (hashing is most of a render's cost).
    seps = {
        (e.ip, e.port): endpoint_chain(spn, proto, fam.join(e.ip, e.port)) for e in cat.reachable
    }
    if pol.uses_cluster_chain:
        _endpoint_dispatch(ctx, svc, spn, out.chain("nat", cluster_chain), cat.cluster, seps)
    if pol.uses_local_chain:
        _endpoint_dispatch(ctx, svc, spn, out.chain("nat", local_chain), cat.local, seps)

    for ep in cat.reachable:
        addr = fam.join(ep.ip, ep.port)
        sep = seps[(ep.ip, ep.port)]
        comment = "" if ctx.large else f"-m comment --comment {quote(spn)} "
        recent = ""
        if svc.affinity_timeout is not None:
            recent = f"-m recent --set --name {sep} --mask {fam.recent_mask} --rsource "
        out.chain("nat", sep)[:] = [
            f"-s {fam.host(ep.ip)} {comment}-j KUBE-MARK-MASQ",
            f"-p {proto} {comment}{recent}-m {proto} -j DNAT --to-destination {addr}",
        ]
    return out


def _endpoint_dispatch(
    ctx: _Context,
    svc: Service,
    spn: str,
    rules: list[str],
    endpoints: list[ResolvedEndpoint],
    seps: dict[tuple[str, int], str],
) -> None:
    """Rules of a KUBE-SVC/KUBE-SVL chain: affinity checks, then the random choice."""
    fam = ctx.family
    targets = []
    for ep in endpoints:
        addr = fam.join(ep.ip, ep.port)
        comment = "" if ctx.large else f"-m comment --comment {quote(f'{spn} -> {addr}')} "
        targets.append((comment, seps[(ep.ip, ep.port)]))
    if svc.affinity_timeout is not None:
        for comment, sep in targets:
            rules.append(
                f"{comment}-m recent --rcheck --seconds {svc.affinity_timeout} --reap "
                f"--name {sep} --mask {fam.recent_mask} --rsource -j {sep}"
            )
    n = len(targets)
    for i, (comment, sep) in enumerate(targets):
        if i < n - 1:
            rules.append(
                f"{comment}-m statistic --mode random --probability {probability(n - i)} -j {sep}"
            )
        else:
            rules.append(f"{comment}-j {sep}")
