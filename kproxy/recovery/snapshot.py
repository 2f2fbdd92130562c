"""Snapshots of kproxy's own rules: write, verify, turn back into RuleSets to restore.

A snapshot is text: a header, then per IP family the owned chains and the jump rules into
them in iptables-save form. The header carries a SHA-256 of the body. Reading one checks the
format version, the checksum, and that the body touches nothing but kproxy's chains: only
owned (or shared) chains declared, no built-in chain policy, built-in chains holding only
jumps into owned chains, owned chains jumping only to owned chains or the standard targets
kproxy writes. Anything else is refused with a one-line reason, before any rule is applied.
Restoring goes through the same plan/apply path as a sync. Parsing and checking do no I/O.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from kproxy import __version__
from kproxy.iptables.plan import owned_ruleset
from kproxy.iptables.rules import (
    BUILTIN_CHAINS,
    OWNED_TABLES,
    RuleSet,
    Table,
    is_managed_chain,
    parse_save,
    rule_target,
)
from kproxy.nftables.table import NftTable, parse_table

FORMAT_VERSION = 1
MAGIC = "# kproxy-snapshot"
FAMILIES = ("IPv4", "IPv6")
# Targets kproxy's own chains use besides its chains.
STANDARD_TARGETS = frozenset({"ACCEPT", "DROP", "REJECT", "RETURN", "DNAT", "MARK", "MASQUERADE"})


class SnapshotError(Exception):
    """The file is not a usable snapshot; str() is the one-line reason."""


@dataclass
class Snapshot:
    meta: dict[str, str]
    families: dict[str, RuleSet] = field(default_factory=dict)  # iptables mode, per family
    nft: dict[str, NftTable] = field(default_factory=dict)  # nftables mode: "ip"/"ip6" table
    body: str = ""


def ruleset_chunks(rs: RuleSet) -> Iterator[str]:
    """iptables-save form of an owned RuleSet (built-in chains only through their rules), in
    pieces of a chain each."""
    for name in OWNED_TABLES:
        table = rs.tables.get(name)
        jumps = [j for j in rs.jumps if j.table == name]
        if table is None and not jumps:
            continue
        chains = table.chains if table else {}
        yield f"*{name}\n" + "".join(f":{chain} - [0:0]\n" for chain in sorted(chains))
        yield "".join(f"-A {j.chain} {j.rule}\n" for j in jumps)
        for chain in sorted(chains):
            yield "".join(f"-A {chain} {rule}\n" for rule in chains[chain])
        yield "COMMIT\n"


def dump(
    families: dict[str, RuleSet],
    node: str,
    backend: str,
    now: float | None = None,
    nft: dict[str, str] | None = None,
) -> str:
    """`families`: iptables mode's owned rules; `nft`: `nft list table` text of the kproxy
    table per nft family ("ip", "ip6")."""
    return "".join(dump_chunks(families, node, backend, now, nft))


def dump_chunks(
    families: dict[str, RuleSet],
    node: str,
    backend: str,
    now: float | None = None,
    nft: dict[str, str] | None = None,
) -> Iterator[str]:
    """dump in pieces: the header (its checksum from a first pass over the body), then the
    body made again piece by piece — a 10k-Service snapshot is never one 37 MB string."""

    def body() -> Iterator[str]:
        for name in FAMILIES:
            if name in families:
                yield f"# family {name}\n"
                yield from ruleset_chunks(families[name])
        for fam, text in sorted((nft or {}).items()):
            yield f"# nft {fam}\n{text.rstrip()}\n"

    digest = hashlib.sha256()
    for piece in body():
        digest.update(piece.encode())
    created = time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(now if now is not None else time.time())
    )
    yield (
        f"{MAGIC} {FORMAT_VERSION}\n"
        f"# created {created}\n"
        f"# node {node}\n"
        f"# kproxy {__version__}\n"
        f"# backend {backend}\n"
        f"# sha256 {digest.hexdigest()}\n"
    )
    yield from body()


def parse(text: str) -> Snapshot:
    """A verified snapshot. Raises SnapshotError with the reason it is refused."""
    if not text.strip():
        raise SnapshotError("empty file")
    lines = text.split("\n")
    first = lines[0].split()
    if lines[0].startswith(MAGIC + " ") and len(first) == 3:
        try:
            version = int(first[2])
        except ValueError:
            raise SnapshotError(f"bad format version {first[2]!r}") from None
    else:
        raise SnapshotError("not a kproxy snapshot (no '# kproxy-snapshot' header)")
    if version > FORMAT_VERSION:
        raise SnapshotError(
            f"format version {version} is newer than this kproxy understands ({FORMAT_VERSION})"
        )
    if version < 1:
        raise SnapshotError(f"bad format version {version}")
    meta: dict[str, str] = {}
    i = 1
    while (
        i < len(lines)
        and lines[i].startswith("# ")
        and not lines[i].startswith(("# family ", "# nft "))
    ):
        key, _, value = lines[i][2:].partition(" ")
        meta[key] = value
        i += 1
    for key in ("created", "node", "kproxy", "backend", "sha256"):
        if key not in meta:
            raise SnapshotError(f"header has no {key!r} line")
    body = "\n".join(lines[i:])
    if hashlib.sha256(body.encode()).hexdigest() != meta["sha256"]:
        raise SnapshotError(
            "checksum mismatch: the file was changed or truncated after it was written"
        )

    snap = Snapshot(meta=meta, body=body)
    sections: dict[str, list[str]] = {}
    current = None
    for line in body.split("\n"):
        if line.startswith(("# family ", "# nft ")):
            current = " ".join(line.split()[1:3])
            if current not in [f"family {f}" for f in FAMILIES] + ["nft ip", "nft ip6"]:
                raise SnapshotError(f"unknown section {current!r}")
            sections[current] = []
        elif line.strip():
            if current is None:
                raise SnapshotError("rules before any '# family' line")
            sections[current].append(line)
    for name, section in sections.items():
        kind, family = name.split()
        if kind == "nft":
            snap.nft[family] = _check_nft(family, section)
            continue
        try:
            tables = parse_save("\n".join(section))
        except ValueError as err:
            raise SnapshotError(f"{family}: {err}") from None
        _check_owned(family, tables)
        snap.families[family] = owned_ruleset(tables)
    return snap


NFT_BASE_CHAINS = frozenset(
    {
        "filter-prerouting",
        "filter-input",
        "filter-forward",
        "filter-output",
        "filter-output-post-dnat",
        "nat-prerouting",
        "nat-output",
        "nat-postrouting",
    }
)


def _check_nft(family: str, lines: list[str]) -> NftTable:
    """The kproxy table of a snapshot: one `table <family> kproxy` and nothing else, base
    chains only those kproxy hooks, with policy accept."""
    tables = [ln for ln in lines if ln.startswith("table ")]
    if tables != [f"table {family} kproxy {{"]:
        raise SnapshotError(f"nft {family}: must hold exactly the table {family} kproxy")
    table = parse_table("\n".join(lines), family)
    if table is None:
        raise SnapshotError(f"nft {family}: no table")
    for name, chain in table.chains.items():
        if chain.base is None:
            continue
        if name not in NFT_BASE_CHAINS:
            raise SnapshotError(f"nft {family}: base chain {name} is not one kproxy hooks")
        if not chain.base.rstrip().endswith("policy accept;"):
            raise SnapshotError(f"nft {family}: base chain {name} sets a policy other than accept")
    return table


def _check_owned(family: str, tables: dict[str, Table]) -> None:
    for name, table in tables.items():
        if name not in OWNED_TABLES:
            raise SnapshotError(f"{family}: table {name!r} is not one kproxy writes")
        builtins = BUILTIN_CHAINS.get(name, ())
        for chain, policy in table.policies.items():
            raise SnapshotError(f"{family} {name}: sets the policy of {chain} to {policy}")
        for chain, rules in table.chains.items():
            if chain in builtins:
                for rule in rules:
                    target = rule_target(rule)
                    if target is None or not is_managed_chain(name, target):
                        raise SnapshotError(
                            f"{family} {name}: rule in built-in chain {chain} jumps to "
                            f"{target or 'nothing'}, not to a kproxy chain"
                        )
                continue
            if not is_managed_chain(name, chain):
                raise SnapshotError(f"{family} {name}: chain {chain} is not kproxy's")
            for rule in rules:
                target = rule_target(rule)
                if (
                    target is not None
                    and target not in STANDARD_TARGETS
                    and not (is_managed_chain(name, target))
                ):
                    raise SnapshotError(
                        f"{family} {name}: rule in {chain} jumps to {target}, "
                        "which is neither a kproxy chain nor a standard target"
                    )
