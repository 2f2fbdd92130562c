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


def _set_decl(family: str, name: str, s: NftSet) -> str:
    parts = [f"{'typeof' if s.typeof else 'type'} {s.type} ;"]
    if s.flags:
        parts.append(f"flags {s.flags} ;")
    if s.timeout:
        parts.append(f"timeout {s.timeout} ;")
    if s.comment:
        parts.append(f'comment "{s.comment}" ;')
    return f"add {s.kind} {family} {TABLE} {name} {{ {' '.join(parts)} }}"


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


def _chain_decl(family: str, name: str, c: NftChain) -> str:
    parts = []
    if c.base:
        # Printed as "...; policy accept;"; written without the policy (accept is the default).
        parts.append(_numeric_priority(c.base.split("; policy")[0]) + " ;")
    if c.comment:
        parts.append(f'comment "{c.comment}" ;')
    return f"add chain {family} {TABLE} {name}" + (f" {{ {' '.join(parts)} }}" if parts else "")


def _element_lines(verb: str, family: str, name: str, items: list[str]) -> list[str]:
    return [
        f"{verb} element {family} {TABLE} {name} {{ {', '.join(items[i : i + ELEMENT_BATCH])} }}"
        for i in range(0, len(items), ELEMENT_BATCH)
    ]


@dataclass
class NftPlan:
    family: str
    lines: list[str] = field(default_factory=list)
    created: int = 0
    rewritten: int = 0
    deleted: int = 0
    elements_changed: int = 0

    def empty(self) -> bool:
        return not self.lines

    def text(self) -> str:
        return "".join(self.pieces())

    def pieces(self, size: int = 4096) -> Iterator[str]:
        """text() in pieces of `size` lines (a 10k-Service table is 400k lines)."""
        for i in range(0, len(self.lines), size):
            yield "".join(f"{ln}\n" for ln in self.lines[i : i + size])

    def summary(self) -> str:
        return (
            f"chains: {self.created} created, {self.rewritten} rewritten, {self.deleted} deleted; "
            f"{self.elements_changed} map/set elements changed"
        )


def plan_table(want: NftTable, have: NftTable | None) -> NftPlan:
    """The transaction turning `have` (None: no table) into `want`, in the order nft needs:
    declarations, flushes, element deletions, set re-creations, rules, element additions,
    deletions of what is gone."""
    fam = want.family
    p = NftPlan(fam)
    have = have or NftTable(fam, comment=None)
    declare: list[str] = []
    flush: list[str] = []
    del_elements: list[str] = []
    del_sets: list[str] = []
    add_sets: list[str] = []
    rules: list[str] = []
    add_elements: list[str] = []
    del_chains: list[str] = []

    if have.comment != want.comment or not have.chains and not have.sets:
        declare.append(f'add table {fam} {TABLE} {{ comment "{want.comment}" ; }}')

    recreated = {
        name
        for name, s in want.sets.items()
        if name in have.sets and have.sets[name].declaration() != s.declaration()
    }
    stale_sets = {name for name in have.sets if name not in want.sets}
    gone = recreated | stale_sets

    def references(rules_: list[str]) -> bool:
        return any(f"@{name}" in r for r in rules_ for name in gone) if gone else False

    for name, s in want.sets.items():
        if name not in have.sets:
            declare.append(_set_decl(fam, name, s))
    for name, chain in want.chains.items():
        old = have.chains.get(name)
        if old is None:
            declare.append(_chain_decl(fam, name, chain))
            rules.extend(f"add rule {fam} {TABLE} {name} {r}" for r in chain.rules)
            p.created += 1
        elif old.rules != chain.rules or references(old.rules) or not old.header_equal(chain):
            flush.append(f"flush chain {fam} {TABLE} {name}")
            if not old.header_equal(chain):
                # A chain's hook or comment cannot be changed in place: replace the chain
                # (only base chains and commented helpers have one; nothing jumps to them).
                rules.append(f"delete chain {fam} {TABLE} {name}")
                rules.append(_chain_decl(fam, name, chain))
            rules.extend(f"add rule {fam} {TABLE} {name} {r}" for r in chain.rules)
            p.rewritten += 1
    stale_chains = [name for name in have.chains if name not in want.chains]
    for name in stale_chains:
        flush.append(f"flush chain {fam} {TABLE} {name}")
        del_chains.append(f"delete chain {fam} {TABLE} {name}")
        p.deleted += 1

    for name, s in want.sets.items():
        old = have.sets.get(name)
        if s.dynamic:
            if name in recreated:
                del_sets.append(f"delete {s.kind} {fam} {TABLE} {name}")
                add_sets.append(_set_decl(fam, name, s))
            continue
        old_elements = {} if old is None or name in recreated else old.elements
        if name in recreated:
            del_sets.append(f"delete {s.kind} {fam} {TABLE} {name}")
            add_sets.append(_set_decl(fam, name, s))
        removed = [k for k, v in old_elements.items() if k not in s.elements or s.elements[k] != v]
        added = [k for k, v in s.elements.items() if old_elements.get(k, object()) != v]
        if removed:
            del_elements.extend(_element_lines("delete", fam, name, removed))
        if added:
            items = [k if s.kind == "set" else f"{k} : {s.elements[k]}" for k in added]
            add_elements.extend(_element_lines("add", fam, name, items))
        p.elements_changed += len(removed) + len(added)
    for name in stale_sets:
        del_sets.append(f"delete {have.sets[name].kind} {fam} {TABLE} {name}")

    # Element deletions come first among the changes so no element points at a chain being
    # deleted; re-created sets after the flushes of the chains using them.
    p.lines = (
        declare + flush + del_elements + del_sets + add_sets + rules + add_elements + del_chains
    )
    return p
