"""nftables mode's common language: one table, its chains, sets and verdict maps; and parsing
`nft list table` output into it.

As in iptables mode, rules are held in the exact text `nft list` prints back, so comparing
the kernel's table with a render is a string comparison. Map and set elements are kept as
keys and values, not as printed lines (the kernel lists them in hash order). The elements of
dynamic sets (session affinity) belong to the kernel and are never kept. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# kproxy's own table; in kube-proxy's place (README "Replacing kube-proxy") it writes kube-proxy's
# instead, so that kube-proxy's start takes it over (nftables mode) or deletes it (its
# iptables mode's cleanup of the other mode): the way back is one image swap too.
TABLE = "kproxy"
KUBE_PROXY_TABLE = "kube-proxy"
# Written by kproxy under either name; it marks a `kube-proxy` table as kproxy's (the kernel
# keeps a table's comment from its creation: an update cannot change it).
TABLE_COMMENT = "rules for kproxy"


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
