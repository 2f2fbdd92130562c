"""Desired RuleSet vs the kernel's tables -> the smallest change, for iptables-restore.

How the change stays minimal:
- a per-Service chain (KUBE-SVC/SEP/EXT/...) is left alone when its rules are equal, else it is
  rewritten whole (a `:CHAIN` line flushes it, then its rules) — these chains are small;
- a shared chain (KUBE-SERVICES, KUBE-NODEPORTS, ...) is edited rule by rule: `-D` for each
  rule no longer wanted, `-I CHAIN 1` for each new one. Its rules match distinct destinations,
  so their order is free except for the tail the RuleSet pins (the KUBE-NODEPORTS jump, which
  stays last); only when that tail is out of place is the chain rewritten;
- owned chains that are no longer wanted are flushed and deleted (`-X`);
- jump rules in built-in chains are inserted only when missing, duplicates removed; stale jumps
  into owned chains are deleted; every other rule and chain is foreign and never named.

Also the two ways between whole tables and owned rules: `full_table` (a table as it must be
after a sync, foreign rules kept) and `owned_ruleset` (the part of read tables that is
kproxy's, as a render lays it out). No I/O.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from kproxy.iptables.render import UNORDERED
from kproxy.iptables.rules import (
    BUILTIN_CHAINS,
    OWNED_TABLES,
    Fragments,
    Jump,
    RuleSet,
    Table,
    is_managed_chain,
    is_owned_chain,
    rule_target,
)

NODEPORTS_JUMP = "-j KUBE-NODEPORTS"


@dataclass
class TableChange:
    """The edits for one table, in the order iptables-restore needs them."""

    table: str
    declare: list[str] = field(default_factory=list)  # chains created or flushed
    delete_rules: list[str] = field(default_factory=list)  # "-D CHAIN rule"
    # Chains written whole after their flush: (chain, its rules), formatted as "-A CHAIN rule"
    # only when the lines are asked for (455k rules at 10k Services: the whole-table path
    # never needs them as edits).
    write_chains: list[tuple[str, list[str]]] = field(default_factory=list)
    add_rules: list[str] = field(default_factory=list)  # "-I CHAIN 1 rule" edits
    delete_chains: list[str] = field(default_factory=list)
    # Per-chain summary for humans: chain -> "created" | "rewritten" | "edited" | "deleted"
    summary: dict[str, str] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (
            self.declare
            or self.delete_rules
            or self.write_chains
            or self.add_rules
            or self.delete_chains
        )

    def lines(self) -> list[str]:
        return (
            [f":{c} - [0:0]" for c in self.declare]
            + self.delete_rules
            + [f"-A {chain} {r}" for chain, rules in self.write_chains for r in rules]
            + self.add_rules
            + [f"-X {c}" for c in self.delete_chains]
        )

    def line_count(self) -> int:
        return (
            len(self.declare)
            + len(self.delete_rules)
            + sum(len(rules) for _, rules in self.write_chains)
            + len(self.add_rules)
            + len(self.delete_chains)
        )


@dataclass
class Plan:
    changes: dict[str, TableChange]

    def empty(self) -> bool:
        return all(c.empty() for c in self.changes.values())

    def line_count(self) -> int:
        return sum(c.line_count() for c in self.changes.values())

    def restore_text(self) -> str:
        """Input for `iptables-restore --noflush` applying every change atomically per table."""
        parts = []
        for change in self.changes.values():
            if not change.empty():
                parts.append(f"*{change.table}\n" + "".join(f"{ln}\n" for ln in change.lines()))
                parts.append("COMMIT\n")
        return "".join(parts)


def _whole(desired: object) -> None:
    # A fragment set planned as a whole table deletes every owned chain and jump outside it
    # (issue 13.1); the types keep the two apart, and this keeps them apart at run time too.
    if not isinstance(desired, RuleSet):
        raise TypeError(
            f"a whole RuleSet is needed here, not {type(desired).__name__} "
            "(fragments are planned against fragments: plan_fragments)"
        )


def plan(desired: RuleSet, live: dict[str, Table]) -> Plan:
    """The change that turns `live` into `desired` for the owned chains and jumps."""
    _whole(desired)
    tables = sorted(set(desired.tables) | {j.table for j in desired.jumps})
    changes = {}
    for name in tables:
        live_table = live.get(name, Table(name))
        want = desired.tables.get(name, Table(name))
        change = TableChange(name)
        _plan_chains(change, name, want, desired.unordered, live_table)
        _plan_jumps(change, desired, name, live_table)
        changes[name] = change
    return Plan(changes)


def plan_fragments(old: Fragments, new: Fragments) -> Plan:
    """The change from some Services' old rules to their new ones, and nothing else: chains
    only `old` holds are deleted, chains only `new` holds created, shared chains edited rule
    by rule. No built-in chain, and no chain outside the two sets, is ever named."""
    if not (isinstance(old, Fragments) and isinstance(new, Fragments)):
        raise TypeError("plan_fragments plans Fragments against Fragments")
    changes = {}
    for name in sorted(set(old.tables) | set(new.tables)):
        change = TableChange(name)
        _plan_chains(
            change, name, new.tables.get(name, Table(name)), new.unordered, old.table(name)
        )
        changes[name] = change
    return Plan(changes)


def _plan_chains(
    change: TableChange,
    name: str,
    want: Table,
    unordered: dict[tuple[str, str], int],
    live: Table,
) -> None:
    for chain, rules in want.chains.items():
        have = live.chains.get(chain)
        tail = unordered.get((name, chain))
        if have is None:
            change.declare.append(chain)
            change.write_chains.append((chain, rules))
            change.summary[chain] = "created"
        elif tail is not None and _tail_in_place(rules, have, tail):
            if _edit_unordered(change, chain, rules, have, tail):
                change.summary[chain] = "edited"
        elif have != rules:
            change.declare.append(chain)
            change.write_chains.append((chain, rules))
            change.summary[chain] = "rewritten"

    for chain in live.chains:
        if chain not in want.chains and is_owned_chain(name, chain):
            change.declare.append(chain)  # flush first, so nothing it references blocks -X
            change.delete_chains.append(chain)
            change.summary[chain] = "deleted"


def _tail_in_place(want: list[str], have: list[str], tail: int) -> bool:
    if tail == 0:
        return True
    if len(have) < tail or have[-tail:] != want[-tail:]:
        return False
    # The pinned rules must not also appear earlier (they would then not be last).
    pinned = set(want[-tail:])
    return not any(r in pinned for r in have[:-tail])


def _edit_unordered(
    change: TableChange, chain: str, want: list[str], have: list[str], tail: int
) -> bool:
    body_want = Counter(want[: len(want) - tail])
    body_have = Counter(have[: len(have) - tail])
    if body_want == body_have:
        return False
    for rule, count in (body_have - body_want).items():
        change.delete_rules.extend([f"-D {chain} {rule}"] * count)
    # Inserted at the top: order among these rules is free and the pinned tail stays last.
    for rule in want[: len(want) - tail]:
        if body_have[rule] < body_want[rule]:
            body_have[rule] += 1
            change.add_rules.append(f"-I {chain} 1 {rule}")
    return True


def _plan_jumps(change: TableChange, desired: RuleSet, name: str, live: Table) -> None:
    wanted: dict[str, list[str]] = {}
    for jump in desired.jumps:
        if jump.table == name:
            wanted.setdefault(jump.chain, []).append(jump.rule)
    for chain in BUILTIN_CHAINS.get(name, ()):
        have = live.chains.get(chain, [])
        rules = wanted.get(chain, [])
        counts = Counter(have)
        for rule in have:
            target = rule_target(rule)
            stale = target is not None and is_owned_chain(name, target) and rule not in rules
            if stale and counts[rule] > 0:
                change.delete_rules.extend([f"-D {chain} {rule}"] * counts[rule])
                counts[rule] = 0
        missing = []
        for rule in rules:
            if counts[rule] == 0:
                missing.append(rule)
            elif counts[rule] > 1:
                change.delete_rules.extend([f"-D {chain} {rule}"] * (counts[rule] - 1))
            counts[rule] = 0
        # Prepended like upstream's EnsureRule(Prepend), keeping their relative order.
        for rule in reversed(missing):
            change.add_rules.append(f"-I {chain} 1 {rule}")
        if missing or any(line.startswith(f"-D {chain} ") for line in change.delete_rules):
            change.summary[chain] = "jumps fixed"


def full_table(desired: RuleSet, name: str, live: Table) -> Table:
    """The whole table as it must be after the sync: foreign chains and rules from `live`
    untouched, owned chains from `desired`, jumps present exactly once.

    Restoring this without --noflush replaces the table atomically; on iptables 1.8.9 that is
    far cheaper than a large --noflush payload (../shared/MEASURED.md).
    """
    _whole(desired)
    want = desired.tables.get(name, Table(name))
    out = Table(name, policies=dict(live.policies))
    wanted_jumps: dict[str, list[str]] = {}
    for jump in desired.jumps:
        if jump.table == name:
            wanted_jumps.setdefault(jump.chain, []).append(jump.rule)
    for chain in BUILTIN_CHAINS.get(name, ()):
        jumps = wanted_jumps.get(chain, [])
        present = [j for j in jumps if j in live.chains.get(chain, [])]
        missing = [j for j in jumps if j not in present]
        kept: list[str] = []
        for rule in live.chains.get(chain, []):
            target = rule_target(rule)
            if target is not None and is_owned_chain(name, target):
                if rule in jumps and rule not in kept:
                    kept.append(rule)
                continue
            kept.append(rule)
        if jumps or chain in live.chains:
            out.chains[chain] = missing + kept
    for chain, rules in live.chains.items():
        if chain not in out.chains and not is_owned_chain(name, chain):
            out.chains[chain] = list(rules)
    for chain, rules in want.chains.items():
        out.chains[chain] = list(rules)
    return out


def owned_ruleset(tables: dict[str, Table]) -> RuleSet:
    """The part of parsed tables that is kproxy's: managed chains and jumps into them."""
    out = RuleSet()
    for name in OWNED_TABLES:
        table = tables.get(name)
        if table is None:
            continue
        out.table(name)
        for chain, rules in table.chains.items():
            if chain in BUILTIN_CHAINS.get(name, ()):
                for rule in rules:
                    target = rule_target(rule)
                    if target is not None and is_managed_chain(name, target):
                        out.jumps.append(Jump(name, chain, rule))
            elif is_managed_chain(name, chain):
                out.chain(name, chain).extend(rules)
    layout(out)
    return out


def layout(rs: RuleSet) -> None:
    """The shared chains' order rules (see RuleSet.unordered), as the renderer sets them."""
    for key in UNORDERED:
        rs.unordered[key] = 0
    services = rs.tables.get("nat", Table("nat")).chains.get("KUBE-SERVICES", [])
    tail = 0
    for rule in reversed(services):
        if not rule.endswith(NODEPORTS_JUMP):
            break
        tail += 1
    rs.unordered[("nat", "KUBE-SERVICES")] = tail


def record_after(record: dict[str, Table], the_plan: Plan) -> None:
    """Bring `record` (what the kernel holds of kproxy's rules, as applied_tables makes it) to
    what it holds after `the_plan` was applied, edit for edit as iptables-restore does them."""
    for name, change in the_plan.changes.items():
        _table_after(record.setdefault(name, Table(name)).chains, change)


def _table_after(chains: dict[str, list[str]], change: TableChange) -> None:
    # A chain's list is copied before it is edited: the record shares its lists with renders.
    mine: set[str] = set()

    def own(chain: str) -> list[str]:
        if chain not in mine:
            chains[chain] = list(chains.get(chain, []))
            mine.add(chain)
        return chains[chain]

    for chain in change.declare:
        chains[chain] = []
        mine.add(chain)
    for line in change.delete_rules:  # "-D CHAIN rule"
        _, chain, rule = line.split(" ", 2)
        rules = own(chain)
        if rule in rules:
            rules.remove(rule)
    for chain, rules in change.write_chains:
        own(chain).extend(rules)
    for line in change.add_rules:  # "-I CHAIN 1 rule"
        _, chain, _, rule = line.split(" ", 3)
        own(chain).insert(0, rule)
    for chain in change.delete_chains:
        chains.pop(chain, None)
