"""`kproxy trace` for nftables mode: follow a new connection through the `kproxy` table (a
render, or `nft list table` of a live node parsed into the same model).

It evaluates the statements kproxy's nftables renderer writes (verdict-map lookups, fib
local checks, numgen, marks, dnat, masquerade, drop/reject, source matches); a rule it does
not understand is reported and treated as not matching. Hooks run in priority order: filter
prerouting (-110), nat prerouting (-100), filter input/forward (-110), nat postrouting for
arriving traffic; filter output (-110), nat output (-100), filter output post-DNAT (-90), nat
postrouting for the node's own. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re

from kproxy.nftables.table import NftTable
from kproxy.tracecore import Branch, Outcome, Packet, interface_matches, merge, outcome

_NUMGEN = re.compile(r"^numgen random mod (\d+) vmap (?:\{ (.*) \}|@(\S+))$")
_VMAP = re.compile(
    r"^(?P<prefix>.*?)\b(?P<key>(?:ip6? daddr \. )?meta l4proto \. th dport) vmap @(?P<map>\S+)$"
)


class NftTracer:
    def __init__(self, table: NftTable, local_ips: set) -> None:
        self.table = table
        self.local_ips = local_ips
        self.ip = table.family  # "ip" or "ip6"

    def is_local(self, addr) -> bool:
        return addr in self.local_ips or addr.is_loopback

    def trace(self, packet: Packet, origin: str) -> list[Outcome]:
        start = Branch(1.0, packet)
        if origin == "node":
            hooks = [
                ("filter-output", None),
                ("nat-output", None),
                ("filter-output-post-dnat", None),
                ("nat-postrouting", "sent"),
            ]
        else:
            hooks = [
                ("filter-prerouting", None),
                ("nat-prerouting", None),
                ("route", None),
                ("nat-postrouting", None),
            ]
        branches = [(start, "ACCEPT", "forwarded" if origin != "node" else "sent")]
        out: list[Outcome] = []
        for chain, _ in hooks:
            nxt = []
            for b, _, delivered in branches:
                if chain == "route":
                    delivered = "local" if self.is_local(b.packet.dst) else "forwarded"
                    chain_name = "filter-input" if delivered == "local" else "filter-forward"
                    results = self.hook(chain_name, b)
                else:
                    if chain == "nat-postrouting" and delivered == "local":
                        nxt.append((b, "ACCEPT", delivered))
                        continue
                    results = self.hook(chain, b)
                for rb, verdict in results:
                    if verdict in ("DROP", "REJECT"):
                        out.append(outcome(rb, verdict, delivered))
                    else:
                        nxt.append((rb, "ACCEPT", delivered))
            branches = nxt
        out.extend(outcome(b, "ACCEPT", delivered) for b, _, delivered in branches)
        return merge(out)

    def hook(self, chain: str, branch: Branch) -> list[tuple[Branch, str]]:
        if chain not in self.table.chains:
            return [(branch, "ACCEPT")]
        return [
            (b, "ACCEPT" if s in ("RETURN", "CONTINUE") else s)
            for b, s in self.walk(chain, branch.fork(1.0), 0)
        ]

    def walk(self, chain: str, branch: Branch, depth: int) -> list[tuple[Branch, str]]:
        """Statuses: RETURN (end of chain or `return`), ACCEPT, DROP, REJECT."""
        if depth > 64:
            raise ValueError(f"chain loop through {chain}")
        branch.path.append(chain)
        done: list[tuple[Branch, str]] = []
        active = [branch]
        for rule in self.table.chains[chain].rules:
            nxt = []
            for b in active:
                for rb, status in self.rule(rule, b, depth):
                    (nxt.append(rb) if status == "CONTINUE" else done.append((rb, status)))
            active = nxt
        done.extend((b, "RETURN") for b in active)
        return done

    def call(self, verb: str, target: str, b: Branch, depth: int) -> list[tuple[Branch, str]]:
        """jump: come back and go on; goto: the calling chain ends where the target does."""
        if target not in self.table.chains:
            b.notes.append(f"{verb} to unknown chain {target}")
            return [(b, "CONTINUE")]
        results = []
        for sb, status in self.walk(target, b, depth + 1):
            if status == "RETURN":
                results.append((sb, "CONTINUE" if verb == "jump" else "RETURN"))
            else:
                results.append((sb, status))
        return results

    def verdict(self, text: str, b: Branch, depth: int) -> list[tuple[Branch, str]]:
        text = text.strip()
        if text in ("drop", "reject"):
            return [(b, text.upper())]
        if text == "accept":
            return [(b, "ACCEPT")]
        if text == "return":
            return [(b, "RETURN")]
        verb, _, target = text.partition(" ")
        if verb in ("jump", "goto"):
            return self.call(verb, target, b, depth)
        b.notes.append(f"verdict {text!r} not understood")
        return [(b, "CONTINUE")]

    def lookup(self, name: str, key: str, b: Branch, depth: int) -> list[tuple[Branch, str]]:
        m = self.table.sets.get(name)
        value = m.elements.get(key) if m is not None else None
        if value is None:
            return [(b, "CONTINUE")]
        return self.verdict(value, b, depth)

    def rule(self, rule: str, b: Branch, depth: int) -> list[tuple[Branch, str]]:
        p = b.packet
        ip = self.ip
        m = _NUMGEN.match(rule)
        if m:
            n = int(m.group(1))
            if m.group(3):  # a named map
                named = self.table.sets.get(m.group(3))
                arms = dict(named.elements) if named is not None else {}
            else:
                arms = dict(a.split(" : ", 1) for a in m.group(2).split(", "))
            results = []
            for i in range(n):
                if str(i) not in arms:
                    b.notes.append(f"numgen value {i} has no verdict: packet falls through")
                    results.append((b.fork(1.0 / n), "CONTINUE"))
                    continue
                results.extend(self.verdict(arms[str(i)], b.fork(1.0 / n), depth))
            return results
        words = rule.split()
        # Statements that change the packet or end it.
        if rule == "masquerade fully-random":
            return [(b.fork(1.0, masquerade=True), "ACCEPT")]
        if rule.startswith("meta mark set meta mark "):
            op, value = words[5], int(words[6], 16)
            mark = p.mark | value if op == "|" else p.mark ^ value
            return [(b.fork(1.0, mark=mark), "CONTINUE")]
        if rule.startswith("meta mark & "):
            mask, want = int(words[3], 16), int(words[5], 16)
            if (p.mark & mask) == want:
                return self.verdict(" ".join(words[6:]), b, depth)
            return [(b, "CONTINUE")]
        if rule.startswith("update @"):
            return [(b, "CONTINUE")]
        if " dnat to " in rule:
            proto = words[2]
            if proto != p.proto:
                return [(b, "CONTINUE")]
            to = rule.split(" dnat to ", 1)[1]
            host, _, port = to.rpartition(":")
            dst = ipaddress.ip_address(host.strip("[]"))
            return [(b.fork(1.0, dnat=to, dst=dst, dport=int(port)), "ACCEPT")]
        vm = _VMAP.match(rule)
        if vm:
            if not self.prefix_matches(vm.group("prefix").strip(), b):
                return [(b, "CONTINUE")]
            if vm.group("key").startswith(f"{ip} daddr"):
                key = f"{p.dst} . {p.proto} . {p.dport}"
            else:
                key = f"{p.proto} . {p.dport}"
            return self.lookup(vm.group("map"), key, b, depth)
        # Matches, then a verdict at the end.
        for verdict_start in (" jump ", " goto "):
            if verdict_start in f" {rule}":
                head, _, target = f" {rule}".rpartition(verdict_start)
                if not self.prefix_matches(head.strip(), b):
                    return [(b, "CONTINUE")]
                return self.call(verdict_start.strip(), target.strip(), b, depth)
        for verdict in ("drop", "reject", "return"):
            if rule == verdict or rule.endswith(" " + verdict):
                head = rule[: -len(verdict)].strip()
                if not self.prefix_matches(head, b):
                    return [(b, "CONTINUE")]
                return self.verdict(verdict, b, depth)
        b.notes.append(f"skipped a rule not understood: {rule}")
        return [(b, "CONTINUE")]

    def prefix_matches(self, head: str, b: Branch) -> bool:
        """The match part of a rule (everything before its verdict)."""
        if not head:
            return True
        p, ip = b.packet, self.ip
        tokens = head.split()
        i = 0
        while i < len(tokens):
            t = tokens[i]
            if t == "ct" and tokens[i + 1] == "state":
                if "new" not in tokens[i + 2].split(","):
                    return False
                i += 3
            elif t == "fib":
                which = p.dst if tokens[i + 1] == "daddr" else p.src
                if tokens[i + 2 : i + 4] != ["type", "local"] or not self.is_local(which):
                    return False
                i += 4
            elif t == ip and tokens[i + 1] in ("saddr", "daddr"):
                addr = p.src if tokens[i + 1] == "saddr" else p.dst
                negate = tokens[i + 2] == "!="
                j = i + 3 if negate else i + 2
                if tokens[j] == "{":
                    end = tokens.index("}", j)
                    items = [x.rstrip(",") for x in tokens[j + 1 : end]]
                    i = end + 1
                elif tokens[j].startswith("@"):
                    s = self.table.sets.get(tokens[j][1:])
                    if s is not None and s.dynamic:
                        b.notes.append(
                            f"a client seen within {s.timeout} sticks to its "
                            f"endpoint ({tokens[j][1:]})"
                        )
                        return False  # the traced connection is a client's first
                    items = list(s.elements) if s is not None else []
                    i = j + 1
                else:
                    items = [tokens[j]]
                    i = j + 1
                hit = any(
                    addr.version == ipaddress.ip_network(x, strict=False).version
                    and addr in ipaddress.ip_network(x, strict=False)
                    for x in items
                )
                if hit == negate:
                    return False
            elif t in ("tcp", "udp", "sctp") and tokens[i + 1] == "dport":
                if p.proto != t or p.dport != int(tokens[i + 2]):
                    return False
                i += 3
            elif t == "iifname":
                negate = tokens[i + 1] == "!="
                j = i + 2 if negate else i + 1
                if interface_matches(tokens[j].strip('"'), p.iif, "*") == negate:
                    return False
                i = j + 1
            else:
                b.notes.append(f"match {' '.join(tokens[i:])!r} not understood")
                return False
        return True
