"""What both tracers share (`kproxy trace`, iptables and nftables mode): the traced packet, the
ways it can go (branches, each with its probability), the outcomes they end in, merged and
printed. Pure: no I/O."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Packet:
    src: Address
    dst: Address
    proto: str
    dport: int
    mark: int = 0
    dnat: str | None = None  # "ip:port" after DNAT
    masquerade: bool = False
    iif: str = ""  # the interface it came in on ("" for the node's own traffic)


def interface_matches(pattern: str, iif: str, wildcard: str) -> bool:
    """iptables' `-i veth+` / nft's `iifname "veth*"`: a trailing wildcard matches a prefix."""
    if pattern.endswith(wildcard):
        return iif.startswith(pattern[: -len(wildcard)])
    return iif == pattern


@dataclass
class Branch:
    """One way the connection can go, with its probability."""

    probability: float
    packet: Packet
    path: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fork(self, factor: float, **changes: object) -> Branch:
        return Branch(
            self.probability * factor,
            replace(self.packet, **changes) if changes else self.packet,
            list(self.path),
            list(self.notes),
        )


@dataclass
class Outcome:
    probability: float
    verdict: str  # ACCEPT, DROP or REJECT
    dnat: str | None
    masquerade: bool
    path: list[str]
    notes: list[str]
    delivered: str  # "forwarded", "local" (to this node) or "sent" (node's own traffic)


def outcome(b: Branch, verdict: str, delivered: str) -> Outcome:
    """Where branch `b` ends: `verdict`, and how it was `delivered`."""
    return Outcome(
        b.probability, verdict, b.packet.dnat, b.packet.masquerade, b.path, b.notes, delivered
    )


def merge(outcomes: list[Outcome]) -> list[Outcome]:
    """One line per distinct result (same verdict, DNAT, masquerade and path)."""
    merged: dict[tuple, Outcome] = {}
    for o in outcomes:
        key = (o.verdict, o.dnat, o.masquerade, tuple(o.path), o.delivered)
        if key in merged:
            merged[key].probability += o.probability
            merged[key].notes.extend(n for n in o.notes if n not in merged[key].notes)
        else:
            merged[key] = Outcome(
                o.probability,
                o.verdict,
                o.dnat,
                o.masquerade,
                list(o.path),
                list(dict.fromkeys(o.notes)),
                o.delivered,
            )
    return sorted(merged.values(), key=lambda o: (-o.probability, o.dnat or ""))


ORIGINS = {"node": "the node", "pod": "a pod", "external": "an external client"}


def format_outcomes(packet: Packet, origin: str, outcomes: list[Outcome]) -> str:
    lines = [
        f"new {packet.proto} connection {packet.src} -> {packet.dst} port {packet.dport} "
        f"(from {ORIGINS[origin]})"
    ]
    for o in outcomes:
        where = f"DNAT to {o.dnat}" if o.dnat else "not DNATed"
        masq = "masqueraded" if o.masquerade else "source kept"
        lines.append(
            f"  {o.probability * 100:6.2f}%  {o.verdict:<6} {where}, {masq} ({o.delivered})"
        )
        lines.append(f"           path: {' > '.join(o.path)}")
        for note in o.notes:
            lines.append(f"           note: {note}")
    return "\n".join(lines)
