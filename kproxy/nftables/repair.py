"""nftables mode's repair of just the objects other processes changed (issue 16).

Everything in the kproxy table is kproxy's, so every change another process makes there is
drift: its events (kproxy.drift.Change) name the chains, maps and sets touched. Those alone
are read (NetlinkBackend.read_objects: a GETCHAIN and a GETRULE dump per chain, a GETSET and a
GETSETELEM dump per set), planned against the record of what kproxy last applied with the
usual planner, and the difference sent as one transaction.
"""

from __future__ import annotations

from collections.abc import Iterable

from kproxy.drift import Change, DriftScope, Repair, finding
from kproxy.nftables.nft import NftBackend
from kproxy.nftables.plan import plan_table
from kproxy.nftables.table import NftTable

# More objects than this touched at once (the table flushed whole) are left to a full verify.
MAX_OBJECTS = 256


def scope_of(changes: Iterable[Change], family: str, table: str) -> DriftScope:
    """What of kproxy's table `table` of `family` ("ip", "ip6") the changes touched."""
    scope = DriftScope()
    for c in changes:
        if c.family != family or c.table != table:
            continue
        if c.kind == "table":
            scope.whole = True
        elif c.kind in ("rule", "chain"):
            scope.objects.add(("chain", c.name))
        elif not c.name.startswith(("__set", "__map")):  # anonymous: its rule's chain's
            scope.objects.add(("set", c.name))
    return scope


def repair(backend: NftBackend, record: NftTable, scope: DriftScope) -> Repair | None:
    """Put back what `scope`'s objects lost of `record`; None when a full verify must do it
    (the table gone, too many objects)."""
    if scope.whole or len(scope.objects) > MAX_OBJECTS:
        return None
    chains = {name for kind, name in scope.objects if kind == "chain"}
    sets = {name for kind, name in scope.objects if kind == "set"}
    have = backend.read_objects(chains, sets, record)
    if have is None:
        return None
    # A set gone or declared otherwise is made again, and the rules naming it with it.
    remade = {
        name
        for name in sets & set(record.sets)
        if name not in have.sets or have.sets[name].declaration() != record.sets[name].declaration()
    }
    users = {
        name
        for name, chain in record.chains.items()
        if name not in chains and any(f"@{s}" in r for r in chain.rules for s in remade)
    }
    if users:
        more = backend.read_objects(users, set(), record)
        if more is None:
            return None
        have.chains.update(more.chains)
        chains |= users
    want = NftTable(
        record.family,
        {n: c for n, c in record.chains.items() if n in chains},
        {n: s for n, s in record.sets.items() if n in sets},
        record.comment,
    )
    the_plan = plan_table(want, have, backend.table)
    # The table is there: never declared again (its comment is not a repair's business).
    the_plan.ops = [op for op in the_plan.ops if op[0] not in ("table", "deltable")]
    if the_plan.empty():
        return Repair({})
    found = {}
    for name in sorted(chains):
        mine, got = record.chains.get(name), have.chains.get(name)
        if mine is None or got is None or mine.rules != got.rules:
            found[("chain", name)] = finding(
                mine.rules if mine else None, got.rules if got else None
            )
    for name in sorted(sets):
        mine_set, got_set = record.sets.get(name), have.sets.get(name)
        if mine_set is None or got_set is None:
            found[("set", name)] = "deleted" if got_set is None else "not kproxy's: deleted"
        elif mine_set.elements != got_set.elements or name in remade:
            lost = sum(1 for k, v in mine_set.elements.items() if got_set.elements.get(k) != v)
            extra = sum(1 for k in got_set.elements if k not in mine_set.elements)
            found[("set", name)] = ", ".join(
                p
                for p in (
                    "declared otherwise" if name in remade else "",
                    f"{lost} element{'s' if lost != 1 else ''} missing" if lost else "",
                    f"{extra} element{'s' if extra != 1 else ''} not kproxy's" if extra else "",
                )
                if p
            )
    backend.apply_plan(the_plan, record)
    return Repair(found or {("", "objects"): "changed"}, the_plan.size())
