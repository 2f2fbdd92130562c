"""Tables, chains and rules: the common language of render, plan and the iptables backend.

A rule is held as the text `iptables-save` prints after `-A CHAIN ` (its canonical form), so
that what the kernel prints back compares equal to what was rendered with a plain string
comparison. The renderer writes canonical text directly (see iptables/render.py); nothing is
normalised on the sync path. No I/O here.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field

BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}

# Chains kproxy owns, named as upstream kube-proxy names them so a node can move between the
# two with no gap. Other KUBE-* chains (KUBE-MARK-DROP, KUBE-KUBELET-CANARY,
# KUBE-IPTABLES-HINT, KUBE-FIREWALL) belong to the kubelet and are never touched.
FIXED_CHAINS: dict[str, frozenset[str]] = {
    "filter": frozenset(
        {
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-FORWARD",
            "KUBE-PROXY-FIREWALL",
            "KUBE-PROXY-CANARY",
        }
    ),
    "nat": frozenset(
        {
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
            "KUBE-PROXY-CANARY",
        }
    ),
    "mangle": frozenset({"KUBE-PROXY-CANARY"}),
}
# The tables kproxy writes to.
OWNED_TABLES = ("filter", "nat", "mangle")
SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")
# Chains kproxy writes but never deletes, because the kubelet writes the same one: upstream
# kube-proxy's KUBE-FIREWALL (localhost NodePort protection) is an exact copy of the kubelet's.
SHARED_CHAINS: dict[str, frozenset[str]] = {"filter": frozenset({"KUBE-FIREWALL"})}


def is_owned_chain(table: str, chain: str) -> bool:
    """True for the chains kproxy may create, rewrite and delete in `table`."""
    if chain in FIXED_CHAINS.get(table, ()):
        return True
    return table == "nat" and chain.startswith(SERVICE_CHAIN_PREFIXES)


def is_managed_chain(table: str, chain: str) -> bool:
    """True for the chains kproxy may write: its own and the shared ones."""
    return is_owned_chain(table, chain) or chain in SHARED_CHAINS.get(table, ())


def rule_target(rule: str) -> str | None:
    """The chain or target a rule jumps to (-j/-g), or None."""
    if '"' in rule or "'" in rule:
        try:
            tokens = shlex.split(rule)
        except ValueError:
            return None
    else:
        tokens = rule.split()
    for i in range(len(tokens) - 2, -1, -1):
        if tokens[i] in ("-j", "-g", "--jump", "--goto"):
            return tokens[i + 1]
    return None


@dataclass
class Table:
    """One table: chains in order, each a list of canonical rule texts."""

    name: str
    chains: dict[str, list[str]] = field(default_factory=dict)
    policies: dict[str, str] = field(default_factory=dict)  # built-in chain -> policy

    def rule_count(self) -> int:
        return sum(len(rules) for rules in self.chains.values())


@dataclass(frozen=True)
class Jump:
    """A rule kproxy keeps in a built-in chain (e.g. PREROUTING -> KUBE-SERVICES)."""

    table: str
    chain: str
    rule: str


class _Tables:
    """Tables of owned chains, filled chain by chain (what RuleSet and Fragments share; the
    two stay apart as types so that a fragment set is never planned as a whole table)."""

    tables: dict[str, Table]

    def table(self, name: str) -> Table:
        if name not in self.tables:
            self.tables[name] = Table(name)
        return self.tables[name]

    def chain(self, table: str, chain: str) -> list[str]:
        return self.table(table).chains.setdefault(chain, [])


@dataclass
class RuleSet(_Tables):
    """What kproxy wants in the kernel for one IP family.

    `tables` holds only owned chains. `unordered` names the shared chains whose rules may sit
    in any order (each matches a distinct destination) except for their last `n` rules, which
    must stay last and in order; the plan edits those chains rule by rule instead of rewriting
    them.
    """

    tables: dict[str, Table] = field(default_factory=dict)
    jumps: list[Jump] = field(default_factory=list)
    unordered: dict[tuple[str, str], int] = field(default_factory=dict)

    def rule_count(self) -> int:
        return sum(t.rule_count() for t in self.tables.values()) + len(self.jumps)


@dataclass
class Fragments(_Tables):
    """The rules of *some* Services: their own chains, and their rules in the shared chains
    (KUBE-SERVICES, KUBE-NODEPORTS, ...), which hold nothing else here. What a partial sync
    plans: the changed Services' old fragments against their new ones.

    Deliberately not a RuleSet: planned as a whole table, a fragment set would delete every
    owned chain and jump outside it (issue 13.1, a node drain restoring filter without its
    FORWARD jump). `plan.plan` and `plan.full_table` refuse it; `plan.plan_fragments` takes it.
    """

    tables: dict[str, Table] = field(default_factory=dict)
    # Shared chains held here, all with order free (their other rules are not in the set).
    unordered: dict[tuple[str, str], int] = field(default_factory=dict)

    def rule_count(self) -> int:
        return sum(t.rule_count() for t in self.tables.values())


def parse_save(text: str) -> dict[str, Table]:
    """Parse `iptables-save` output into tables. Comments and counters are dropped."""
    tables: dict[str, Table] = {}
    current: Table | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):  # `iptables-save -c` counters prefix
            line = line.split("] ", 1)[1] if "] " in line else line
        if line.startswith("*"):
            current = tables.setdefault(line[1:], Table(line[1:]))
        elif current is None:
            raise ValueError(f"iptables-save line {lineno}: {line!r} outside a table")
        elif line.startswith(":"):
            name, policy = (line[1:].split() + ["-"])[:2]
            current.chains.setdefault(name, [])
            if policy != "-":
                current.policies[name] = policy
        elif line.startswith("-A "):
            parts = line.split(" ", 2)
            rules = current.chains.setdefault(parts[1], [])
            rules.append(parts[2] if len(parts) > 2 else "")
        elif line == "COMMIT":
            current = None
        else:
            raise ValueError(f"iptables-save line {lineno}: cannot parse {line!r}")
    return tables


def table_text(table: Table) -> str:
    """`iptables-restore` input (without --noflush) that recreates `table` exactly."""
    return "".join(table_chunks(table))


def table_chunks(table: Table) -> Iterator[str]:
    """table_text in pieces of a chain each (a whole 10k-Service table is 455k lines: streamed
    to iptables-restore, it is never held as one string)."""
    builtins = BUILTIN_CHAINS.get(table.name, ())
    yield f"*{table.name}\n"
    yield "".join(
        f":{name} {table.policies.get(name, 'ACCEPT')} [0:0]\n"
        if name in builtins
        else f":{name} - [0:0]\n"
        for name in table.chains
    )
    for name, rules in table.chains.items():
        if rules:
            yield "".join(f"-A {name} {rule}\n" for rule in rules)
    yield "COMMIT\n"
