"""Follow a new connection through iptables rules: which chains it visits, where it is DNATed
to with what probability, whether it is masqueraded, dropped or rejected.

A pure function over parsed tables (a render, or `iptables-save` of a live node), so it is both
`kproxy trace` and the engine of the packet-flow tests. It evaluates the matches kube-proxy's
layout uses (addresses, protocol and ports, addrtype, statistic, recent, mark, conntrack state,
comment); a rule with any other match (say `-i eth0` in a foreign chain) cannot be decided and
is reported and treated as not matching. Hooks are walked in the kernel's order: nat
PREROUTING, then filter INPUT or FORWARD, then nat POSTROUTING for traffic arriving from
outside; nat OUTPUT, filter OUTPUT, nat POSTROUTING for the node's own traffic.
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass
from functools import lru_cache

from kproxy.iptables.rules import BUILTIN_CHAINS, Table
from kproxy.tracecore import Address, Branch, Outcome, Packet, interface_matches, merge, outcome

TERMINAL = ("ACCEPT", "DROP", "REJECT")


@dataclass(frozen=True)
class Match:
    negated: bool
    module: str  # "" for the core matches (-s, -d, -p)
    option: str
    value: str


@dataclass(frozen=True)
class Rule:
    text: str
    matches: tuple[Match, ...]
    target: str | None
    target_args: tuple[str, ...]
    unsupported: str | None  # why this rule cannot be evaluated, if it cannot


SUPPORTED_MODULES = {
    "comment",
    "tcp",
    "udp",
    "sctp",
    "addrtype",
    "statistic",
    "recent",
    "mark",
    "conntrack",
    "nfacct",
}


@lru_cache(maxsize=65536)
def parse_rule(text: str) -> Rule:
    tokens = shlex.split(text)
    matches: list[Match] = []
    module = ""
    negate = False
    unsupported = None
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "!":
            negate = True
            i += 1
            continue
        if tok in ("-j", "-g", "--jump", "--goto"):
            return Rule(text, tuple(matches), tokens[i + 1], tuple(tokens[i + 2 :]), unsupported)
        if tok in ("-m", "--match"):
            module = tokens[i + 1]
            if module not in SUPPORTED_MODULES:
                unsupported = unsupported or f"-m {module}"
            i += 2
            continue
        if tok in ("-s", "--source", "-d", "--destination", "-p", "--protocol"):
            matches.append(Match(negate, "", tok.lstrip("-")[0], tokens[i + 1]))
            negate = False
            i += 2
            continue
        if tok in ("-i", "--in-interface"):
            matches.append(Match(negate, "", "i", tokens[i + 1]))
            negate = False
            i += 2
            continue
        if tok in ("-o", "--out-interface", "-f"):
            unsupported = unsupported or tok
            i += 1 if tok == "-f" else 2
            continue
        if tok.startswith("--"):
            # A module option, with one value unless it is a flag (next token is an option).
            has_value = (
                i + 1 < len(tokens) and not tokens[i + 1].startswith("-") and tokens[i + 1] != "!"
            )
            value = tokens[i + 1] if has_value else ""
            matches.append(Match(negate, module, tok, value))
            negate = False
            i += 2 if has_value else 1
            continue
        unsupported = unsupported or tok
        i += 1
    return Rule(text, tuple(matches), None, (), unsupported)


class Tracer:
    def __init__(self, tables: dict[str, Table], local_ips: set[Address]) -> None:
        self.tables = tables
        self.local_ips = local_ips

    def is_local(self, ip: Address) -> bool:
        return ip in self.local_ips or ip.is_loopback

    def trace(self, packet: Packet, origin: str) -> list[Outcome]:
        """origin: "node" for the node's own traffic, else "pod" or "external"."""
        start = Branch(1.0, packet)
        out: list[Outcome] = []
        first = "OUTPUT" if origin == "node" else "PREROUTING"
        for b, verdict in self.hook("nat", first, start):
            if verdict in ("DROP", "REJECT"):
                out.append(outcome(b, verdict, "dropped in nat"))
                continue
            dst = (
                ipaddress.ip_address(b.packet.dnat.rsplit(":", 1)[0].strip("[]"))
                if b.packet.dnat
                else b.packet.dst
            )
            if origin == "node":
                filter_hook, delivered = "OUTPUT", "sent"
            elif self.is_local(dst):
                filter_hook, delivered = "INPUT", "local"
            else:
                filter_hook, delivered = "FORWARD", "forwarded"
            for fb, fverdict in self.hook("filter", filter_hook, b):
                if fverdict in ("DROP", "REJECT") or delivered == "local":
                    out.append(outcome(fb, fverdict, delivered))
                    continue
                for pb, _ in self.hook("nat", "POSTROUTING", fb):
                    out.append(outcome(pb, "ACCEPT", delivered))
        return merge(out)

    def hook(self, table: str, chain: str, branch: Branch) -> list[tuple[Branch, str]]:
        """Walk a built-in chain; a branch that falls off its end takes the policy."""
        t = self.tables.get(table)
        if t is None or chain not in t.chains:
            return [(branch, "ACCEPT")]
        branch = branch.fork(1.0)
        policy = t.policies.get(chain, "ACCEPT")
        results = []
        for b, status in self.walk(table, chain, branch, depth=0):
            results.append((b, policy if status == "RETURN" else status))
        return results

    def walk(self, table: str, chain: str, branch: Branch, depth: int) -> list[tuple[Branch, str]]:
        """Run `chain`; statuses: RETURN (fell off or returned), ACCEPT, DROP, REJECT."""
        if depth > 64:
            raise ValueError(f"chain loop through {table} {chain}")
        branch.path.append(f"{table}/{chain}" if chain in BUILTIN_CHAINS.get(table, ()) else chain)
        done: list[tuple[Branch, str]] = []
        active = [branch]
        for text in self.tables[table].chains.get(chain, []):
            rule = parse_rule(text)
            nxt: list[Branch] = []
            for b in active:
                for mb, matched in self.match(rule, b):
                    if not matched:
                        nxt.append(mb)
                        continue
                    for tb, status in self.target(table, rule, mb, depth):
                        (nxt.append(tb) if status == "CONTINUE" else done.append((tb, status)))
            active = nxt
        done.extend((b, "RETURN") for b in active)
        return done

    def target(self, table: str, rule: Rule, b: Branch, depth: int) -> list[tuple[Branch, str]]:
        target, args = rule.target, rule.target_args
        if target is None:
            return [(b, "CONTINUE")]
        if target in TERMINAL:
            return [(b, target)]
        if target == "RETURN":
            return [(b, "RETURN")]
        if target == "MARK":
            value, _, mask = _option(args, "--set-xmark").partition("/")
            v, m = int(value, 16), int(mask or "0xffffffff", 16)
            return [(b.fork(1.0, mark=(b.packet.mark & ~m) ^ v), "CONTINUE")]
        if target == "DNAT":
            # Later hooks see the translated destination, as in the kernel.
            to = _option(args, "--to-destination")
            host, _, port = to.rpartition(":")
            changes: dict[str, object] = {"dnat": to, "dst": ipaddress.ip_address(host.strip("[]"))}
            if port:
                changes["dport"] = int(port)
            return [(b.fork(1.0, **changes), "ACCEPT")]
        if target == "MASQUERADE":
            return [(b.fork(1.0, masquerade=True), "ACCEPT")]
        if target in self.tables[table].chains:
            results = []
            for sb, status in self.walk(table, target, b, depth + 1):
                results.append((sb, "CONTINUE" if status == "RETURN" else status))
            return results
        b.notes.append(f"target {target} not understood; treated as no-op")
        return [(b, "CONTINUE")]

    def match(self, rule: Rule, b: Branch) -> list[tuple[Branch, bool]]:
        if rule.unsupported:
            b.notes.append(f"skipped a rule with {rule.unsupported}: {rule.text}")
            return [(b, False)]
        p = b.packet
        probability = None
        for m in rule.matches:
            ok = True
            if m.module == "" and m.option in ("s", "d"):
                net = ipaddress.ip_network(m.value, strict=False)
                addr = p.src if m.option == "s" else p.dst
                ok = addr.version == net.version and addr in net
            elif m.module == "" and m.option == "p":
                ok = p.proto == m.value
            elif m.module == "" and m.option == "i":
                ok = interface_matches(m.value, p.iif, "+")
            elif m.option == "--dport":
                ok = m.module == p.proto and int(m.value) == p.dport
            elif m.option == "--dst-type":
                ok = m.value == "LOCAL" and self.is_local(p.dst)
            elif m.option == "--src-type":
                ok = m.value == "LOCAL" and self.is_local(p.src)
            elif m.option == "--mark":
                value, _, mask = m.value.partition("/")
                ok = (p.mark & int(mask or "0xffffffff", 16)) == int(value, 16)
            elif m.option == "--ctstate":
                states = {"NEW"} | ({"DNAT"} if p.dnat else set())
                ok = bool(states & set(m.value.split(",")))
            elif m.option == "--probability":
                probability = float(m.value)
                continue
            elif m.option == "--rcheck":
                name = next((x.value for x in rule.matches if x.option == "--name"), "?")
                seconds = next((x.value for x in rule.matches if x.option == "--seconds"), "?")
                b.notes.append(f"a client seen in the last {seconds}s sticks to {name}")
                ok = False  # the traced connection is a client's first
            if ok == m.negated:
                return [(b, False)]
        if probability is None:
            return [(b, True)]
        return [(b.fork(probability), True), (b.fork(1.0 - probability), False)]


def _option(args: tuple[str, ...], name: str) -> str:
    for i, a in enumerate(args[:-1]):
        if a == name:
            return args[i + 1]
    return ""
