"""Drift seen as it happens (issue 16): what other processes' nf_tables changes touched of
kproxy's rules, how a repair of just that is described, and the limit that keeps a tool
fighting kproxy from making it spin. No I/O: the events come from kproxy.daemon.nfevents, the
repairs are the modes' (Mode.repair), the loop is the reconciler's.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

# The objects a scope names: iptables mode (table, chain); nftables mode ("chain"|"set", name).
Object = tuple[str, str]


@dataclass(frozen=True)
class Change:
    """One object of an nf_tables transaction: `verb` "add"/"delete", `kind` table/chain/rule/
    set/element, and where it is: the family ("ip", "ip6", "inet", or the number), the table,
    and the chain (rules, chains) or set (sets, elements)."""

    verb: str
    kind: str
    family: str
    table: str
    name: str = ""
    # A rule's jumps and gotos: the chains its verdicts name (kproxy's jumps from built-in
    # chains are recognised by these).
    targets: tuple[str, ...] = ()


@dataclass
class DriftScope:
    """What other processes changed of one family's rules: the objects to read and repair."""

    objects: set[Object] = field(default_factory=set)
    # A table of kproxy's was deleted or re-created: only a full verify can tell what is left.
    whole: bool = False

    def __bool__(self) -> bool:
        return self.whole or bool(self.objects)

    def merge(self, other: DriftScope) -> None:
        self.whole = self.whole or other.whole
        self.objects |= other.objects

    def without(self, objects: set[Object]) -> DriftScope:
        return DriftScope(self.objects - objects, self.whole)


def finding(want: list[str] | None, have: list[str] | None) -> str:
    """What a repair found in one chain, the rules kproxy wrote (`want`, None: it has no such
    chain) against the kernel's (`have`, None: gone)."""
    if want is None:
        return "not kproxy's: deleted"
    if have is None:
        return "deleted"
    if want and not have:
        return "flushed"
    missing = sum((Counter(want) - Counter(have)).values())
    extra = sum((Counter(have) - Counter(want)).values())
    parts = []
    if missing:
        parts.append(f"{missing} rule{'s' if missing > 1 else ''} missing")
    if extra:
        parts.append(f"{extra} rule{'s' if extra > 1 else ''} not kproxy's")
    return ", ".join(parts) or "rules out of order"


@dataclass
class Repair:
    """One family's repair: what differed (object -> finding), and how many restore lines or
    netlink steps it sent (for the log)."""

    found: dict[Object, str]
    sent: int = 0


def label(obj: Object) -> str:
    """An object as the log names it: "nat KUBE-SERVICES", "chain services", "set ..."."""
    return " ".join(part for part in obj if part)


def summary(found: dict[Object, str], most: int = 3) -> str:
    """A repair's findings in one phrase: objects with the same finding together, at most
    `most` named each ("nat KUBE-SERVICES, nat KUBE-SVC-X and 9 more flushed")."""
    groups: dict[str, list[str]] = {}
    for obj, what in found.items():
        groups.setdefault(what, []).append(label(obj))
    parts = []
    for what, names in groups.items():
        named = ", ".join(sorted(names)[:most])
        more = f" and {len(names) - most} more" if len(names) > most else ""
        parts.append(f"{named}{more} {what}")
    return "; ".join(parts)


class RepairLimiter:
    """At most `limit` repairs of one object in `window` seconds. Past that, the object is
    left alone for a backoff that doubles with each round of the fight (up to `max_backoff`),
    and the periodic verify, which still runs, is what repairs it meanwhile."""

    def __init__(
        self,
        limit: int = 5,
        window: float = 60.0,
        backoff: float = 60.0,
        max_backoff: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit, self.window = limit, window
        self.backoff, self.max_backoff = backoff, max_backoff
        self.clock = clock
        self._repairs: dict[tuple, deque[float]] = {}
        self._until: dict[tuple, float] = {}
        self._rounds: dict[tuple, int] = {}
        self._last: dict[tuple, float] = {}  # the last repair, or the end of the last backoff

    def allowed(self, key: tuple) -> bool:
        until = self._until.get(key)
        if until is None:
            return True
        if self.clock() < until:
            return False
        del self._until[key]
        return True

    def repaired(self, key: tuple) -> float | None:
        """Count one repair of `key`; the backoff (seconds) it now starts, or None. A fight
        that stopped for `max_backoff` starts again from the first backoff."""
        now = self.clock()
        if now - self._last.get(key, now) > self.max_backoff:
            self._rounds.pop(key, None)
        self._last[key] = now
        if len(self._repairs) > 10_000:  # objects repaired once, long ago
            self._repairs = {
                k: t for k, t in self._repairs.items() if t and t[-1] > now - self.window
            }
        times = self._repairs.setdefault(key, deque())
        times.append(now)
        while times and times[0] < now - self.window:
            times.popleft()
        if len(times) < self.limit:
            return None
        times.clear()
        rounds = self._rounds[key] = self._rounds.get(key, 0) + 1
        seconds = min(self.max_backoff, self.backoff * 2 ** (rounds - 1))
        self._until[key] = now + seconds
        self._last[key] = now + seconds
        return seconds
