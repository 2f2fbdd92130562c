"""Which IP families this node can program, in which mode: one Mode per family (kproxy.mode).

As upstream detects the node's families at start, a family whose tools or kernel support are
missing (no ip6tables, IPv6 off in the kernel, nft refusing the ip6 family) is skipped, said
once, and the node runs single-stack. Also: removing what the other mode (and kube-proxy's
IPVS mode) left on a node that switched modes. Runs the tools' read-only checks (iptables -S,
nft -c) of the namespace the process runs in.
"""

from __future__ import annotations

import logging

from kproxy import ipvsleftovers
from kproxy.errors import NoFamilyError
from kproxy.iptables.mode import IptablesMode
from kproxy.iptables.restore import IptablesBackend, detect_variant
from kproxy.mode import Mode
from kproxy.nftables.mode import NftablesMode
from kproxy.nftables.netlink import NetlinkBackend, table_comment
from kproxy.nftables.nft import NftBackend
from kproxy.nftables.table import KUBE_PROXY_TABLE, TABLE, TABLE_COMMENT
from kproxy.nodeinfo import ipv6_off

log = logging.getLogger(__name__)

FAMILY_VERSIONS = (4, 6)


def family_backends(variant: str = "auto", *, report: bool = True) -> list[IptablesBackend]:
    """A backend per IP family that can be programmed on this node, in the node's variant (or
    the one forced by `variant`). A family whose tools or kernel support are missing is
    skipped, as upstream runs single-stack then; `report` logs that (once, at start)."""
    out = []
    for version in FAMILY_VERSIONS:
        problem = ipv6_off() if version == 6 else None
        if problem is None:
            chosen = detect_variant(version) if variant == "auto" else variant
            backend = IptablesBackend(version, chosen)
            problem = backend.problem()
        if problem is not None:
            family_skipped("iptables", version, problem, report)
            continue
        out.append(backend)
    return out


def kproxy_tables(family: str) -> list[str]:
    """The names kproxy's nftables tables of `family` ("ip", "ip6") have on this node: its own
    `kproxy`, and `kube-proxy` where kproxy made that one (it ran in kube-proxy's place; its
    comment says so). A node without nf_tables has none."""
    try:
        found = [TABLE] if table_comment(family, TABLE) is not None else []
        if table_comment(family, KUBE_PROXY_TABLE) == TABLE_COMMENT:
            found.append(KUBE_PROXY_TABLE)
    except OSError:
        return []
    return found


def nft_table_here(family: str) -> str:
    """The table a one-shot command (sync, diff, trace --live, snapshot, restore) works on
    when not told: the one kproxy's daemon writes on this node (kproxy_tables), else
    `kproxy`."""
    return (kproxy_tables(family) or [TABLE])[0]


def nft_backends(
    datapath: str = "netlink", *, report: bool = True, table: str | None = None
) -> list[NftBackend]:
    """The nft families ("ip", "ip6") that can be programmed on this node; as family_backends.
    `datapath`: "netlink" (kproxy.nftables.netlink) or "nft" (the nft binary); `table`: the
    table's name (None: nft_table_here)."""
    out = []
    for name in ("ip", "ip6"):
        chosen = table or nft_table_here(name)
        backend = (
            NetlinkBackend(name, chosen) if datapath == "netlink" else NftBackend(name, chosen)
        )
        problem = (ipv6_off() if backend.version == 6 else None) or backend.problem()
        if problem is not None:
            family_skipped("nftables", backend.version, problem, report)
            continue
        out.append(backend)
    return out


def family_skipped(tool: str, version: int, problem: str, report: bool) -> None:
    """Upstream's "No iptables support for family" line, with the reason."""
    log.log(
        logging.WARNING if report else logging.DEBUG,
        "No %s support for family IPv%d (%s): that family is left alone",
        tool,
        version,
        problem,
    )


def modes_for(
    mode: str,
    iptables_backend: str = "auto",
    *,
    report: bool = True,
    require: bool = True,
    dry_run: bool = False,
    nft_datapath: str = "netlink",
    nft_table: str | None = None,
) -> list[Mode]:
    """One Mode per IP family that can be programmed on this node in `mode` ("iptables" or
    "nftables", through `nft_datapath`); `report` logs the families skipped. Raises
    NoFamilyError when none is left and `require`. With `dry_run` they plan and report, and
    never change the kernel."""
    families: list[Mode]
    if mode == "nftables":
        backends = nft_backends(nft_datapath, report=report, table=nft_table)
        families = [NftablesMode(b, dry_run) for b in backends]
    else:
        families = [
            IptablesMode(b, dry_run) for b in family_backends(iptables_backend, report=report)
        ]
    if require and not families:
        raise NoFamilyError(f"no IP family can be programmed in {mode} mode on this node")
    return families


def all_nft_tables(dry_run: bool = False) -> list[Mode]:
    """nftables mode over every table of kproxy's this node can have: `kproxy` in each family
    that can be programmed, and the `kube-proxy` tables kproxy made (kproxy_tables)."""
    out: list[Mode] = []
    for backend in nft_backends(report=False, table=TABLE):
        out.append(NftablesMode(backend, dry_run))
        if KUBE_PROXY_TABLE in kproxy_tables(backend.family):
            out.append(NftablesMode(NetlinkBackend(backend.family, KUBE_PROXY_TABLE), dry_run))
    return out


def other_mode(mode: str, iptables_backend: str = "auto") -> list[Mode]:
    # What the other mode cannot program it cannot have left either: nothing to report.
    if mode == "iptables":
        return all_nft_tables()
    return modes_for("iptables", iptables_backend, report=False, require=False)


def remove_other_mode(mode: str, iptables_backend: str = "auto") -> None:
    """After the first successful sync in `mode`, remove what the other mode left, so a node
    switching modes never has a gap (the new rules are in place first); and what kube-proxy's
    IPVS mode left (kproxy.ipvsleftovers), which kproxy never runs: its chains first (they
    jump into chains the other mode's removal deletes), its ipsets last (once no rule names
    them)."""
    ipvsleftovers.remove_first(family_backends(iptables_backend, report=False))
    for other in other_mode(mode, iptables_backend):
        try:
            if other.present():
                outcome = other.remove_all()
                log.info(
                    "removed the %s rules of %s mode left on this node: %s",
                    other.name,
                    other.mode,
                    outcome.summary,
                )
        except Exception as err:  # the other mode's tools may be missing: not fatal
            log.warning("could not remove %s mode's %s rules: %s", other.mode, other.name, err)
    ipvsleftovers.remove_last()
