"""Is the kernel's rule set a full render of one of these cluster states?

`match()` runs in a thread that entered the node's network namespace (netns.call_in): it reads
kproxy's rules of each family from the kernel once, renders every candidate state with the
daemon's own renderer and node settings, and says which candidates equal the kernel, for the
family as a whole and for each table separately (iptables-restore commits each table on its
own, so a kill between two tables' commits can leave a family whose tables come from two
different states: `mixed` counts those).
"""

from __future__ import annotations

from typing import Any

from kproxy import nodeinfo
from kproxy.families import modes_for
from kproxy.iptables.mode import IptablesMode
from kproxy.iptables.plan import plan
from kproxy.iptables.sync import read_live
from kproxy.model import NodeConfig, build_state
from kproxy.nftables.plan import plan_table

NODE = "node-1"
CLUSTER_CIDR = "10.244.0.0/16"


def node_config() -> NodeConfig:
    """The NodeConfig `kproxy run --node-name node-1 --cluster-cidr 10.244.0.0/16` builds."""
    return NodeConfig(
        node_name=NODE,
        cluster_cidrs=(CLUSTER_CIDR,),
        conntrack_tcp_liberal=nodeinfo.conntrack_tcp_liberal(),
    )


def match(candidates: list[list[dict]], mode: str, backend: str = "auto") -> dict[str, Any]:
    """{"all": [indices equal in every family and table],
    "families": {"IPv4": {"all": [...], "tables": {"nat": [...], ...}}, ...},
    "per_table_ok": every (family, table) equals some candidate,
    "mixed": families whose tables match only different candidates}"""
    config = node_config()
    states = [build_state(objs, NODE)[0] for objs in candidates]
    out: dict[str, Any] = {"families": {}}
    whole: set[int] | None = None
    per_table_ok = True
    mixed = 0
    # nftables tables are read through nft, the reference (a netlink read without the desired
    # table to compare with names no rule).
    for fam in modes_for(mode, backend, nft_datapath="nft"):
        if isinstance(fam, IptablesMode):
            tables = ["filter", "mangle", "nat"]
            live = read_live(fam.backend, tables)
        else:
            tables = ["kproxy"]
            live = fam.backend.read()
        by_table: dict[str, list[int]] = {t: [] for t in tables}
        fam_all: list[int] = []
        for i, state in enumerate(states):
            desired = fam.render(state, config).desired
            if isinstance(fam, IptablesMode):
                p = plan(desired, live)
                ok_tables = [t for t in tables if p.changes.get(t) is None or p.changes[t].empty()]
            else:
                ok_tables = tables if plan_table(desired, live).empty() else []
            for t in ok_tables:
                by_table[t].append(i)
            if len(ok_tables) == len(tables):
                fam_all.append(i)
        if not all(by_table.values()):
            per_table_ok = False
        elif not fam_all:
            mixed += 1
        out["families"][fam.name] = {"all": fam_all, "tables": by_table}
        whole = set(fam_all) if whole is None else whole & set(fam_all)
    out["all"] = sorted(whole or ())
    out["per_table_ok"] = per_table_ok
    out["mixed"] = mixed
    return out
