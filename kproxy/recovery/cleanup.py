"""`kproxy cleanup`: remove every rule kproxy owns, through each mode's Mode.remove_all."""

from __future__ import annotations

from kproxy.mode import Mode
from kproxy.nftables.mode import NftablesMode


def cleanup(families: list[Mode]) -> dict[str, str]:
    """Remove everything kproxy owns in `families` (Mode.remove_all; made with dry_run, only
    say it). Returns, per family, what was (or would be) sent: iptables mode's families every
    time, nftables mode's where there was a table."""
    done = {}
    for fam in families:
        outcome = fam.remove_all()
        if isinstance(fam, NftablesMode):
            if outcome.changed:
                done[f"nftables {fam.family.name}"] = outcome.payload
        else:
            done[fam.name] = outcome.payload
    return done
