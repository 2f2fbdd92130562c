"""nftables mode's common language: one table, its chains, sets and verdict maps; parsing
`nft list table` output into it; and the smallest `nft -f` transaction from one to another.

As in iptables mode, rules are held in the exact text `nft list` prints back, so comparing
the kernel's table with a render is a string comparison. Map and set elements are compared
as keys and values, not as printed lines (the kernel lists them in hash order). The elements
of dynamic sets (session affinity) belong to the kernel and are never compared or sent.
No I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

TABLE = "kproxy"
TABLE_COMMENT = "rules for kproxy"
# Elements per `add element` command: fewer, bigger commands parse faster in nft.
ELEMENT_BATCH = 1000


@dataclass
class NftChain:
    rules: list[str] = field(default_factory=list)
    base: str | None = None  # e.g. "type nat hook prerouting priority dstnat; policy accept;"
    comment: str | None = None

    def header_equal(self, other: NftChain) -> bool:
        return (self.base, self.comment) == (other.base, other.comment)


@dataclass
class NftSet:
    """A named set (elements -> None) or verdict map (elements -> verdict)."""

    kind: str  # "set" or "map"
    type: str  # e.g. "ipv4_addr . inet_proto . inet_service : verdict"
    flags: str | None = None
    timeout: str | None = None
    comment: str | None = None
    elements: dict[str, str | None] = field(default_factory=dict)
    typeof: bool = False  # declared by an expression ("typeof ...") rather than a type

    @property
    def dynamic(self) -> bool:
        return self.flags is not None and "dynamic" in self.flags

    def declaration(self) -> tuple:
        return (self.kind, self.type, self.typeof, self.flags, self.timeout, self.comment)


@dataclass
class NftTable:
    family: str  # "ip" or "ip6"
    chains: dict[str, NftChain] = field(default_factory=dict)
    sets: dict[str, NftSet] = field(default_factory=dict)
    comment: str | None = TABLE_COMMENT

    def rule_count(self) -> int:
        return sum(len(c.rules) for c in self.chains.values())

    def element_count(self) -> int:
        return sum(len(s.elements) for s in self.sets.values())


def _unquote(text: str) -> str:
    text = text.strip()
    return text[1:-1] if text.startswith('"') and text.endswith('"') else text


def _split_elements(text: str) -> list[str]:
    """`a : b, c : d` -> items, for our element syntax (no nested braces)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_table(text: str, family: str) -> NftTable | None:
    """`nft list table <family> kproxy` -> NftTable; None when the text holds no table."""
    lines = [ln.strip() for ln in text.splitlines()]
    table: NftTable | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("table "):
            table = NftTable(family, comment=None)
        elif table is None or not line or line == "}":
            pass
        elif line.startswith("comment ") and not line.endswith("{"):
            table.comment = _unquote(line[len("comment ") :])
        elif line.startswith(("chain ", "set ", "map ")):
            kind, name = line.split()[0], line.split()[1]
            body: list[str] = []
            i += 1
            while i < len(lines) and lines[i] != "}":
                body.append(lines[i])
                i += 1
            if kind == "chain":
                table.chains[name] = _parse_chain(body)
            else:
                table.sets[name] = _parse_set(kind, body)
        i += 1
    return table


def _parse_chain(body: list[str]) -> NftChain:
    chain = NftChain()
    for line in body:
        if not line:
            continue
        if line.startswith("type ") and " hook " in line:
            chain.base = line
        elif line.startswith("comment ") and not chain.rules:
            chain.comment = _unquote(line[len("comment ") :])
        else:
            chain.rules.append(line)
    return chain


def _parse_set(kind: str, body: list[str]) -> NftSet:
    s = NftSet(kind, "")
    joined: list[str] | None = None
    for line in body:
        if joined is not None:
            joined.append(line)
        elif line.startswith("type "):
            s.type = line[len("type ") :]
        elif line.startswith("typeof "):
            s.type, s.typeof = line[len("typeof ") :], True
        elif line.startswith("flags "):
            s.flags = line[len("flags ") :]
        elif line.startswith("timeout "):
            s.timeout = line[len("timeout ") :]
        elif line.startswith("comment "):
            s.comment = _unquote(line[len("comment ") :])
        elif line.startswith("elements = {"):
            joined = [line[len("elements = {") :]]
        if joined is not None and joined[-1].endswith("}"):
            text = " ".join(joined)[:-1]
            joined = None
            if not s.dynamic:
                for item in _split_elements(text):
                    if kind == "map":
                        key, _, value = item.partition(" : ")
                        s.elements[key.strip()] = value.strip()
                    else:
                        s.elements[item] = None
    return s


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
