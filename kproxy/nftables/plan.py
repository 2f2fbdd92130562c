"""The smallest `nft -f` transaction turning one kproxy table into another.

Chains are compared as their rule texts (as `nft list` prints them); map and set elements as
keys and values. Elements of dynamic sets (session affinity) belong to the kernel and are
never compared or sent. No I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from kproxy.nftables.table import TABLE, NftChain, NftSet, NftTable

# Elements per `add element` command: fewer, bigger commands parse faster in nft.
ELEMENT_BATCH = 1000


def _set_decl(family: str, table: str, name: str, s: NftSet) -> str:
    parts = [f"{'typeof' if s.typeof else 'type'} {s.type} ;"]
    if s.flags:
        parts.append(f"flags {s.flags} ;")
    if s.timeout:
        parts.append(f"timeout {s.timeout} ;")
    if s.comment:
        parts.append(f'comment "{s.comment}" ;')
    return f"add {s.kind} {family} {table} {name} {{ {' '.join(parts)} }}"


NAMED_PRIORITIES = {
    "raw": -300,
    "mangle": -150,
    "dstnat": -100,
    "filter": 0,
    "security": 50,
    "srcnat": 100,
}


def _numeric_priority(base: str) -> str:
    """nft prints some priorities by name ("dstnat - 10") but does not accept every name in
    every hook: declare with the number."""
    head, _, priority = base.partition(" priority ")
    words = priority.split()
    value = NAMED_PRIORITIES.get(words[0], None) if words else None
    if value is None:
        return base
    if len(words) == 3 and words[1] in "+-":
        value += int(words[2]) * (1 if words[1] == "+" else -1)
    return f"{head} priority {value}"


def _chain_decl(family: str, table: str, name: str, c: NftChain) -> str:
    parts = []
    if c.base:
        # Printed as "...; policy accept;"; written without the policy (accept is the default).
        parts.append(_numeric_priority(c.base.split("; policy")[0]) + " ;")
    if c.comment:
        parts.append(f'comment "{c.comment}" ;')
    return f"add chain {family} {table} {name}" + (f" {{ {' '.join(parts)} }}" if parts else "")


def _element_lines(verb: str, family: str, table: str, name: str, items: list[str]) -> list[str]:
    return [
        f"{verb} element {family} {table} {name} {{ {', '.join(items[i : i + ELEMENT_BATCH])} }}"
        for i in range(0, len(items), ELEMENT_BATCH)
    ]


# One step of a plan, as data (`nft -f` text and netlink messages are both made from these):
#   ("deltable",)                           delete the table (to make it anew, below)
#   ("table", comment)                      add the table
#   ("chain", name, NftChain)               declare a chain
#   ("flush", name)                         flush a chain
#   ("rule", chain, text)                   append one rule
#   ("delchain", name)                      delete a chain
#   ("set", name, NftSet)                   declare a set or map
#   ("delset", name, kind)                  delete a set or map
#   ("elements", verb, name, kind, items)   add/delete elements: [(key, value or None)]
Op = tuple


def op_lines(family: str, op: Op, table: str = TABLE) -> list[str]:
    """One step as `nft -f` lines, for `table` (kproxy's, or kube-proxy's in its place)."""
    kind = op[0]
    if kind == "rule":
        return [f"add rule {family} {table} {op[1]} {op[2]}"]
    if kind == "elements":
        _, verb, name, set_kind, items = op
        if verb == "add" and set_kind == "map":
            texts = [f"{k} : {v}" for k, v in items]
        else:
            texts = [k for k, _ in items]
        return _element_lines(verb, family, table, name, texts)
    if kind == "chain":
        return [_chain_decl(family, table, op[1], op[2])]
    if kind == "flush":
        return [f"flush chain {family} {table} {op[1]}"]
    if kind == "delchain":
        return [f"delete chain {family} {table} {op[1]}"]
    if kind == "set":
        return [_set_decl(family, table, op[1], op[2])]
    if kind == "delset":
        return [f"delete {op[2]} {family} {table} {op[1]}"]
    if kind == "table":
        return [f'add table {family} {table} {{ comment "{op[1]}" ; }}']
    if kind == "deltable":
        return [f"delete table {family} {table}"]
    raise ValueError(f"unknown plan step {kind!r}")


@dataclass
class NftPlan:
    family: str
    ops: list[Op] = field(default_factory=list)
    table: str = TABLE  # the table's name: kproxy's, or kube-proxy's in its place
    created: int = 0
    rewritten: int = 0
    deleted: int = 0
    elements_changed: int = 0
    _lines: list[str] | None = field(default=None, repr=False)

    def empty(self) -> bool:
        return not self.ops

    @property
    def lines(self) -> list[str]:
        """The plan as `nft -f` lines (formatted once, when first asked for)."""
        if self._lines is None:
            self._lines = [ln for op in self.ops for ln in op_lines(self.family, op, self.table)]
        return self._lines

    def size(self) -> int:
        """How many `nft -f` lines the plan is, without formatting them."""
        return sum(-(-len(op[4]) // ELEMENT_BATCH) if op[0] == "elements" else 1 for op in self.ops)

    def text(self) -> str:
        return "".join(self.pieces())

    def pieces(self, size: int = 4096) -> Iterator[str]:
        """text() in pieces of about `size` steps (a 10k-Service table is 400k lines)."""
        for i in range(0, len(self.ops), size):
            yield "".join(
                f"{ln}\n"
                for op in self.ops[i : i + size]
                for ln in op_lines(self.family, op, self.table)
            )

    def summary(self) -> str:
        return (
            f"chains: {self.created} created, {self.rewritten} rewritten, {self.deleted} deleted; "
            f"{self.elements_changed} map/set elements changed"
        )


def _makes_anonymous_set(rule: str) -> bool:
    """`... vmap { 0 : goto X }`, `... saddr != { a, b }`; not `update @set { ip saddr }`."""
    return " { " in rule and not rule.startswith("update ")


def plan_table(want: NftTable, have: NftTable | None, table: str = TABLE) -> NftPlan:
    """The transaction turning `have` (None: no table) into `want` in the table named `table`,
    in the order the kernel needs:
    declarations, flushes, element deletions, set re-creations, rules, element additions,
    deletions of what is gone."""
    fam = want.family
    p = NftPlan(fam, table=table)
    if have is not None and have.comment != want.comment and (have.chains or have.sets):
        # Another program made this table (kube-proxy's, taken over in its place): the kernel
        # keeps a table's comment from its creation, so the table is made anew, in this same
        # transaction; the Services never see it missing. Planned against nothing from here.
        p.ops.append(("deltable",))
        have = None
    have = have or NftTable(fam, comment=None)
    declare: list[Op] = []
    flush: list[Op] = []
    del_elements: list[Op] = []
    del_sets: list[Op] = []
    add_sets: list[Op] = []
    rules: list[Op] = []
    add_elements: list[Op] = []
    del_chains: list[Op] = []

    if have.comment != want.comment or not have.chains and not have.sets:
        declare.append(("table", want.comment))

    recreated = {
        name
        for name, s in want.sets.items()
        if name in have.sets and have.sets[name].declaration() != s.declaration()
    }
    stale_sets = {name for name in have.sets if name not in want.sets}
    gone = recreated | stale_sets

    def references(rules_: list[str]) -> bool:
        return any(f"@{name}" in r for r in rules_ for name in gone) if gone else False

    # Dynamic sets (session affinity) are declared last. The kernel finds a set by name by
    # walking the table's sets in the order they were made, for every rule, element message
    # and element dump that names one: the endpoint maps, named far more often, come first.
    for name, s in sorted(want.sets.items(), key=lambda item: item[1].dynamic):
        if name not in have.sets:
            declare.append(("set", name, s))
    # The rules of chains whose rules make anonymous sets (inline dispatch, source ranges) go
    # before the other rules: the kernel finds a set made in the same batch by walking the
    # transaction's list from its start, once for its elements and once for its rule, so
    # they are cheapest while that list is short (measured, inline dispatch from empty: 5k
    # Services 46 s -> 29 s, 10k 262 s -> 193 s).
    early: list[Op] = []
    for name, chain in want.chains.items():
        old = have.chains.get(name)
        into = early if any(map(_makes_anonymous_set, chain.rules)) else rules
        if old is None:
            declare.append(("chain", name, chain))
            into.extend(("rule", name, r) for r in chain.rules)
            p.created += 1
        elif old.rules != chain.rules or references(old.rules) or not old.header_equal(chain):
            flush.append(("flush", name))
            if not old.header_equal(chain):
                # A chain's hook or comment cannot be changed in place: replace the chain
                # (only base chains and commented helpers have one; nothing jumps to them).
                into.append(("delchain", name))
                into.append(("chain", name, chain))
            into.extend(("rule", name, r) for r in chain.rules)
            p.rewritten += 1
    rules[:0] = early
    stale_chains = [name for name in have.chains if name not in want.chains]
    for name in stale_chains:
        flush.append(("flush", name))
        del_chains.append(("delchain", name))
        p.deleted += 1

    for name, s in want.sets.items():
        old = have.sets.get(name)
        if s.dynamic:
            if name in recreated:
                del_sets.append(("delset", name, s.kind))
                add_sets.append(("set", name, s))
            continue
        old_elements = {} if old is None or name in recreated else old.elements
        if name in recreated:
            del_sets.append(("delset", name, s.kind))
            add_sets.append(("set", name, s))
        removed = [
            (k, v) for k, v in old_elements.items() if k not in s.elements or s.elements[k] != v
        ]
        added = [(k, v) for k, v in s.elements.items() if old_elements.get(k, object()) != v]
        if removed:
            del_elements.append(("elements", "delete", name, s.kind, removed))
        if added:
            add_elements.append(("elements", "add", name, s.kind, added))
        p.elements_changed += len(removed) + len(added)
    for name in stale_sets:
        del_sets.append(("delset", name, have.sets[name].kind))

    # Element deletions come first among the changes so no element points at a chain being
    # deleted; re-created sets after the flushes of the chains using them.
    p.ops += (
        declare + flush + del_elements + del_sets + add_sets + rules + add_elements + del_chains
    )
    return p


def record_after(record: NftTable, the_plan: NftPlan) -> None:
    """Bring `record` (what the kernel holds of the kproxy table) to what it holds after
    `the_plan` was applied, step for step. Chains are made anew and sets copied before they
    are changed: the record shares its objects with renders."""
    mine: set[str] = set()  # sets already copied
    for op in the_plan.ops:
        kind = op[0]
        if kind == "deltable":
            record.chains.clear()
            record.sets.clear()
        elif kind == "table":
            record.comment = op[1]
        elif kind == "chain":
            record.chains[op[1]] = NftChain(base=op[2].base, comment=op[2].comment)
        elif kind == "flush":
            old = record.chains.get(op[1]) or NftChain()
            record.chains[op[1]] = NftChain(base=old.base, comment=old.comment)
        elif kind == "rule":
            record.chains[op[1]].rules.append(op[2])
        elif kind == "delchain":
            record.chains.pop(op[1], None)
        elif kind == "set":
            if op[1] not in record.sets:
                s = op[2]
                record.sets[op[1]] = NftSet(
                    s.kind, s.type, s.flags, s.timeout, s.comment, typeof=s.typeof
                )
                mine.add(op[1])
        elif kind == "delset":
            record.sets.pop(op[1], None)
            mine.discard(op[1])
        elif kind == "elements":
            _, verb, name, _, items = op
            s = record.sets[name]
            if name not in mine:
                s = record.sets[name] = NftSet(
                    s.kind, s.type, s.flags, s.timeout, s.comment, dict(s.elements), s.typeof
                )
                mine.add(name)
            if verb == "add":
                s.elements.update(items)
            else:
                for key, _ in items:
                    s.elements.pop(key, None)
        else:
            raise ValueError(f"unknown plan step {kind!r}")


def copy_for_record(table: NftTable) -> NftTable:
    """A record of `table` just applied, which record_after may change without touching it."""
    return NftTable(table.family, dict(table.chains), dict(table.sets), table.comment)
