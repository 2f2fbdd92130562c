"""kube-proxy's IPVS-mode chains left on a node whose kube-proxy ran in IPVS mode, and the
iptables-restore text that removes them. No I/O.

kproxy never runs IPVS (`mode: ipvs` runs its nftables mode), so after a kube-proxy in IPVS
mode is replaced these chains are nobody's: they match packets against kube-proxy's ipsets
(which cannot be destroyed while a rule names them) and KUBE-IPVS-FILTER rejects new
connections to the addresses it held on kube-ipvs0. Upstream removes the same ones when
kube-proxy leaves IPVS mode (pkg/proxy/ipvs: `iptablesJumpChain`, `iptablesCleanupChains`).

Only the chains IPVS mode alone writes are here. The ones it shares with iptables mode
(KUBE-SERVICES, KUBE-POSTROUTING, KUBE-MARK-MASQ, KUBE-FORWARD, KUBE-PROXY-FIREWALL) are
kproxy's own (rules.FIXED_CHAINS): iptables mode's full sync rewrites them, nftables mode
removes them with the rest of iptables mode's chains.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kproxy.iptables.rules import BUILTIN_CHAINS, Table, rule_target

# Upstream's iptablesCleanupChains less the chains kproxy owns: (table, chains).
IPVS_CHAINS: dict[str, tuple[str, ...]] = {
    "nat": ("KUBE-NODE-PORT", "KUBE-LOAD-BALANCER"),
    "filter": (
        "KUBE-NODE-PORT",
        "KUBE-SOURCE-RANGES-FIREWALL",
        "KUBE-IPVS-FILTER",
        "KUBE-IPVS-OUT-FILTER",
    ),
}
IPVS_TABLES = tuple(IPVS_CHAINS)


@dataclass
class IpvsRemoval:
    """What removing the IPVS chains of one family takes: `text` for `iptables-restore
    --noflush` ("" when there is nothing), the chains it deletes ("nat/KUBE-NODE-PORT"), and
    the chains kept because a rule of someone else's still jumps to them."""

    text: str = ""
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def _may_edit(table: str, chain: str) -> bool:
    """Chains whose jumps into an IPVS chain are kube-proxy's: the built-in chains (its
    `iptablesJumpChain` rules) and KUBE- chains (KUBE-SERVICES jumping to KUBE-NODE-PORT,
    KUBE-PROXY-FIREWALL to KUBE-SOURCE-RANGES-FIREWALL)."""
    return chain in BUILTIN_CHAINS.get(table, ()) or chain.startswith("KUBE-")


def ipvs_removal(tables: dict[str, Table]) -> IpvsRemoval:
    """The restore text that deletes the IPVS chains present in `tables` (as iptables-save
    read them: at least nat and filter) in one transaction per table: the jumps into them,
    then their rules, then the chains. A chain that a foreign chain's rule jumps to is kept
    (deleting it would fail the whole table's transaction) and named in `kept`."""
    out = IpvsRemoval()
    lines: list[str] = []
    for name in IPVS_TABLES:
        table = tables.get(name)
        if table is None:
            continue
        present = [c for c in IPVS_CHAINS[name] if c in table.chains]
        if not present:
            continue
        ipvs = set(present)
        keep = {
            rule_target(rule)
            for chain, rules in table.chains.items()
            if chain not in ipvs and not _may_edit(name, chain)
            for rule in rules
        } & ipvs
        gone = [c for c in present if c not in keep]
        out.kept += [f"{name}/{c}" for c in present if c in keep]
        if not gone:
            continue
        deletes = [
            f"-D {chain} {rule}"
            for chain, rules in table.chains.items()
            if chain not in gone and _may_edit(name, chain)
            for rule in rules
            if rule_target(rule) in gone
        ]
        lines += [f"*{name}"]
        lines += [f":{c} - [0:0]" for c in gone]  # flushed: their own jumps go with them
        lines += deletes
        lines += [f"-X {c}" for c in gone]
        lines += ["COMMIT"]
        out.removed += [f"{name}/{c}" for c in gone]
    out.text = "".join(line + "\n" for line in lines)
    return out
