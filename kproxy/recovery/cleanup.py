"""`kproxy cleanup`: remove every rule kproxy owns, through each mode's Mode.remove_all, and
what kube-proxy's IPVS mode left on the node (as `kube-proxy --cleanup` removes it)."""

from __future__ import annotations

from kproxy import ipvsleftovers
from kproxy.iptables.restore import IptablesBackend
from kproxy.mode import Mode
from kproxy.nftables.mode import NftablesMode

IPVS_ENTRY = "kube-proxy's IPVS mode"


def cleanup(
    families: list[Mode],
    ipvs_backends: list[IptablesBackend] | None = None,
    dry_run: bool = False,
) -> dict[str, str]:
    """Remove everything kproxy owns in `families` (Mode.remove_all; made with dry_run, only
    say it). Returns, per family, what was (or would be) sent: iptables mode's families every
    time, nftables mode's where there was a table. With `ipvs_backends`, IPVS mode's leftovers
    too (kproxy.ipvsleftovers, which logs what it removes): its chains before kproxy's (they
    jump into KUBE-MARK-MASQ), its ipsets after (KUBE-SERVICES names them); with `dry_run`,
    what is there, under IPVS_ENTRY."""
    done = {}
    if ipvs_backends is not None:
        if dry_run:
            found = ipvsleftovers.find(ipvs_backends)
            if not found.empty():
                done[IPVS_ENTRY] = "".join(f"remove {what}\n" for what in found.describe())
        else:
            ipvsleftovers.remove_first(ipvs_backends)
    for fam in families:
        outcome = fam.remove_all()
        if isinstance(fam, NftablesMode):
            if outcome.changed:
                done[f"nftables {fam.family.name}"] = outcome.payload
        else:
            done[fam.name] = outcome.payload
    if ipvs_backends is not None and not dry_run:
        ipvsleftovers.remove_last()
    return done
