"""iptables mode's repair of just the chains other processes changed (issue 16).

The nf_tables events of another process's transaction name the chains it touched
(kproxy.drift.Change). Those of kproxy's (its own chains, and the built-in chains' rules that
jump into them) are read one by one (`iptables -S CHAIN`, a few ms even in a 10k-Service
table), compared with the record of what kproxy last applied, and whatever differs is put
back with one `--noflush` restore: the usual plan (kproxy.iptables.plan) of those chains
alone, so nothing else is read, named or rewritten.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from kproxy.drift import Change, DriftScope, Repair, finding
from kproxy.iptables.plan import layout, plan
from kproxy.iptables.restore import IptablesBackend
from kproxy.iptables.rules import (
    BUILTIN_CHAINS,
    OWNED_TABLES,
    Jump,
    RuleSet,
    Table,
    is_managed_chain,
    rule_target,
)
from kproxy.iptables.sync import wants_full_restore

# More chains than this touched at once (a table flushed whole) are left to a full verify,
# which reads each table once and may restore it whole: cheaper than a chain at a time.
MAX_CHAINS = 64


def scope_of(changes: Iterable[Change], family: str) -> DriftScope:
    """What of kproxy's rules in `family` ("ip", "ip6") the changes touched."""
    scope = DriftScope()
    for c in changes:
        if c.family != family or c.table not in OWNED_TABLES:
            continue
        if c.kind == "table":
            scope.whole = True  # the table deleted (or made again): everything in it
        elif c.kind in ("rule", "chain"):
            if is_managed_chain(c.table, c.name):
                scope.objects.add((c.table, c.name))
            elif c.name in BUILTIN_CHAINS.get(c.table, ()) and any(
                is_managed_chain(c.table, t) for t in c.targets
            ):
                scope.objects.add((c.table, c.name))  # one of kproxy's jumps, or a copy of one
    return scope


def repair(backend: IptablesBackend, record: dict[str, Table], scope: DriftScope) -> Repair | None:
    """Put back what `scope`'s chains lost of `record`; None when a full verify must do it
    (a table gone, too many chains)."""
    if scope.whole or len(scope.objects) > MAX_CHAINS:
        return None
    want = RuleSet()
    live: dict[str, Table] = {}
    found: dict = {}
    for table, chain in sorted(scope.objects):
        want.table(table)
        mine = record.get(table, Table(table)).chains.get(chain)
        listing = backend.chain_listing(table, chain)
        have = listing[1] if listing is not None else None
        if have is not None:
            live.setdefault(table, Table(table)).chains[chain] = have
        if chain in BUILTIN_CHAINS.get(table, ()):
            if have is None:
                return None  # a built-in chain gone: its table was deleted
            want.jumps.extend(Jump(table, chain, rule) for rule in mine or ())
            ours = [r for r in have if is_managed_chain(table, rule_target(r) or "")]
            if ours != list(mine or ()):
                found[(table, chain)] = _jumps_finding(list(mine or ()), ours)
        elif mine is not None:
            want.chain(table, chain).extend(mine)
            if have != mine:
                found[(table, chain)] = finding(mine, have)
        elif have is not None:
            found[(table, chain)] = finding(None, have)
    layout(want)
    the_plan = plan(want, live)
    if the_plan.empty():
        return Repair({})
    if any(
        wants_full_restore(change.line_count(), record.get(name, Table(name)).rule_count())
        for name, change in the_plan.changes.items()
    ):
        return None  # a --noflush restore this large costs more than restoring the table whole
    payload = the_plan.restore_text()
    backend.restore(payload, noflush=True)
    return Repair(found or {("", "rules"): "changed"}, payload.count("\n"))


def _jumps_finding(want: list[str], have: list[str]) -> str:
    """What happened to kproxy's jumps in a built-in chain: "jump to KUBE-SERVICES deleted"."""
    missing = Counter(want) - Counter(have)
    extra = Counter(have) - Counter(want)
    parts = [f"jump to {rule_target(r)} deleted" for r in missing.elements()]
    parts += [f"jump to {rule_target(r)} added" for r in extra.elements()]
    return ", ".join(parts) or "jumps out of order"
