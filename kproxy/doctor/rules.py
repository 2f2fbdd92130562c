"""Checks of the rules other tools see: iptables backends, the FORWARD policy, the martian
rule of route_localnet, and the other mode's (and kube-proxy's IPVS mode's) leftovers."""

from __future__ import annotations

import shutil
from pathlib import Path

from kproxy.doctor.context import Context
from kproxy.doctor.result import FAIL, OK, SKIPPED, WARN, Result
from kproxy.doctor.sysfs import sysctl
from kproxy.iptables.restore import IptablesBackend, detect_variant

# The comment of kproxy's (and the kubelet's) KUBE-FIREWALL rule dropping martian traffic
# to 127.0.0.0/8 that route_localnet would otherwise let in (k8s issue 90259).
MARTIAN_COMMENT = "block incoming localnet connections"
FAMILY_TOOLS = {
    4: ("iptables", "/proc/net/ip_tables_names"),
    6: ("ip6tables", "/proc/net/ip6_tables_names"),
}


# Chains that every kube-proxy-style ruleset (kube-proxy's, kproxy's, the kubelet's) has, each
# with a few rules: listing one costs a few ms even in a 10k-Service table, where a whole
# iptables-save costs a second (the daemon runs this check every sync period).
MARKER_CHAINS = (
    ("nat", "KUBE-POSTROUTING"),
    ("nat", "KUBE-MARK-MASQ"),
    ("mangle", "KUBE-PROXY-CANARY"),
    ("mangle", "KUBE-KUBELET-CANARY"),
    ("filter", "KUBE-FORWARD"),
    ("filter", "KUBE-FIREWALL"),
    ("nat", "KUBE-SERVICES"),
)


def _legacy_tables(names: str) -> set[str]:
    """The legacy tables the kernel holds (listing another would create it)."""
    try:
        return set(Path(names).read_text().split())
    except OSError:
        return set()


def _kube_chains(family: int, variant: str, tables: set[str] | None = None) -> list[str]:
    """Which of MARKER_CHAINS exist in `variant` (in `tables` only, when given)."""
    base = FAMILY_TOOLS[family][0]
    if shutil.which(f"{base}-{variant}") is None:
        return []
    backend = IptablesBackend(family, variant)
    return [
        f"{table}/{chain}"
        for table, chain in MARKER_CHAINS
        if (tables is None or table in tables) and backend.chain_exists(table, chain)
    ]


def mixed_backends(ctx: Context) -> Result:
    """KUBE- chains in both iptables-legacy and iptables-nft: each set of rules sees the
    packets, and whichever is stale breaks Service traffic without a word."""
    name = "mixed_backends"
    seen = []
    for family, (_, names) in FAMILY_TOOLS.items():
        legacy_tables = _legacy_tables(names)
        legacy = _kube_chains(family, "legacy", legacy_tables) if legacy_tables else []
        nft = _kube_chains(family, "nft")
        if legacy and nft:
            return Result(
                name,
                FAIL,
                f"IPv{family} KUBE- chains in both backends: legacy has {_few(legacy)}, "
                f"nft has {_few(nft)}",
                "mixed-iptables-backends",
            )
        if legacy or nft:
            seen.append(f"IPv{family}: {'legacy' if legacy else 'nft'}")
    return Result(
        name, OK, "KUBE- chains in one backend only (" + (", ".join(seen) or "none") + ")"
    )


def _few(chains: list[str], n: int = 3) -> str:
    return ", ".join(chains[:n]) + (f" and {len(chains) - n} more" if len(chains) > n else "")


def _backend(ctx: Context, family: int = 4) -> IptablesBackend | None:
    variant = detect_variant(family) if ctx.iptables_backend == "auto" else ctx.iptables_backend
    backend = IptablesBackend(family, variant)
    base = FAMILY_TOOLS[family][0]
    if shutil.which(f"{base}-{variant}") is None:
        return None
    return backend


def forward_policy(ctx: Context) -> Result:
    """The filter FORWARD chain's policy is DROP and nothing jumps to KUBE-FORWARD, which
    accepts the forwarded Service traffic (iptables mode): pod-to-Service traffic that
    leaves the node, and NodePort traffic to other nodes' pods, are dropped."""
    name = "forward_policy"
    backend = _backend(ctx)
    if backend is None:
        return Result(name, SKIPPED, "no iptables tools")
    listing = backend.chain_listing("filter", "FORWARD")
    if listing is None:
        return Result(name, OK, "no filter FORWARD chain (policy ACCEPT)")
    policy, rules = listing
    jumped = any(r.split()[-2:] == ["-j", "KUBE-FORWARD"] for r in rules)
    saw = f"iptables-{backend.variant} filter FORWARD policy {policy}" + (
        ", jumps to KUBE-FORWARD" if jumped else ", no jump to KUBE-FORWARD"
    )
    if policy != "DROP" or jumped:
        return Result(name, OK, saw)
    if ctx.mode == "nftables":
        # nftables mode accepts in its own table; iptables' DROP still drops the packet.
        return Result(
            name,
            WARN,
            saw + " (nftables mode: iptables' DROP still applies)",
            "forward-policy-drop",
        )
    return Result(name, FAIL, saw, "forward-policy-drop")


def route_localnet(ctx: Context) -> Result:
    """route_localnet on (IPv4 NodePorts on 127.0.0.1) without the KUBE-FIREWALL rule that
    drops martian traffic to 127.0.0.0/8: services bound to localhost answer the network."""
    name = "route_localnet"
    values = {"all": sysctl("net.ipv4.conf.all.route_localnet")}
    on = [k for k, v in values.items() if v == "1"]
    if not on:
        return Result(name, OK, f"net.ipv4.conf.all.route_localnet={values['all']}")
    backend = _backend(ctx)
    listing = backend.chain_listing("filter", "KUBE-FIREWALL") if backend else None
    rules = listing[1] if listing else []
    if any(MARTIAN_COMMENT in r and r.endswith("-j DROP") for r in rules):
        # The rule only acts on what INPUT sends it.
        inputs = backend.chain_listing("filter", "INPUT") if backend else None
        if any(r.split()[-2:] == ["-j", "KUBE-FIREWALL"] for r in (inputs or (None, []))[1]):
            return Result(name, OK, "route_localnet=1 and KUBE-FIREWALL drops martian 127.0.0.0/8")
        return Result(
            name,
            FAIL,
            "net.ipv4.conf.all.route_localnet=1 and KUBE-FIREWALL has the martian DROP rule "
            "but INPUT does not jump to KUBE-FIREWALL",
            "route-localnet",
        )
    return Result(
        name,
        FAIL,
        "net.ipv4.conf.all.route_localnet=1 and no KUBE-FIREWALL rule "
        f'"{MARTIAN_COMMENT}": 127.0.0.0/8 services are reachable from the network',
        "route-localnet",
    )


def other_mode_leftovers(ctx: Context) -> Result:
    """The other mode's rules still on the node: kproxy's `kproxy` nft table in iptables mode,
    or its KUBE- chains in nftables mode; both sets of rules then see Service traffic. And
    kube-proxy's IPVS-mode leftovers, in either mode (kproxy never runs IPVS): kube-ipvs0
    makes every ClusterIP a local address of the node, answering on ports no Service has."""
    from kproxy import ipvsleftovers
    from kproxy.families import family_backends, other_mode

    name = "other_mode_leftovers"
    left = []
    for other in other_mode(ctx.mode, ctx.iptables_backend):
        try:
            if other.present():
                left.append(other.name)
        except Exception as err:  # the other mode's tools may be missing
            return Result(name, SKIPPED, f"cannot read {other.mode} mode's rules: {err}")
    other_name = "iptables" if ctx.mode == "nftables" else "nftables"
    saw = []
    if left:
        saw.append(
            f"running {ctx.mode} mode and {other_name} mode's rules are here ({', '.join(left)})"
        )
    ipvs = ipvsleftovers.find(family_backends(ctx.iptables_backend, report=False))
    if not ipvs.empty():
        saw.append("kube-proxy's IPVS mode left " + "; ".join(ipvs.describe()))
    if saw:
        return Result(name, WARN, "; ".join(saw), "other-mode-leftovers")
    return Result(name, OK, f"no {other_name} or IPVS mode leftovers (kproxy runs {ctx.mode} mode)")
