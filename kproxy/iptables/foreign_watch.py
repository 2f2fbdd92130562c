"""Foreign changes made while a whole table is restored, seen and put back (issue 13.7).

A restore without --noflush replaces a table with what kproxy read seconds earlier plus its
own chains; a rule Docker or a CNI agent added in between would vanish. On the nf_tables
backend every transaction is multicast to the NFNLGRP_NFTABLES group, and iptables' own
`xtables-monitor -e` prints those events in iptables-save syntax, each transaction closed by
a `NEWGEN: GENID=.. PID=.. NAME=..` line. A watch runs it from before the kernel is read until
it prints kproxy's own restore (events come in commit order, so every transaction the restore
could have undone is printed by then); the transactions that touched no chain kproxy owns are
other tools'. Their net effect on the restored tables (rules added or deleted, chains created,
built-in chain policies) is checked against the kernel afterwards and whatever the restore
undid is applied again, in one `--noflush` restore.

What the events cannot tell: `-I CHAIN 1` prints as `-A CHAIN`, so a rule put back goes to
the end of its chain. The legacy backend has no events: there the xtables lock, which
iptables-legacy-restore holds for its whole run, keeps other iptables users out from its
start; the seconds between reading the kernel and that start stay a window (documented).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kproxy.iptables.rules import is_owned_chain

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7

_EVENT = re.compile(r"^ EVENT: -([46]) -t (\S+) -([ADNX]) (\S+)(?: (.*))?$")
_BASE_CHAIN = re.compile(r"^ EVENT: # nft: (ip6?) (\S+) (\S+) .*\bpolicy (accept|drop)\b")
_NEWGEN = re.compile(r"^NEWGEN: GENID=\d+ PID=(\d+) NAME=(.*)$")


@dataclass
class Transaction:
    """One transaction's events on one family: (table, op, chain, rule) and base-chain
    policies, closed by NEWGEN."""

    pid: int = 0
    name: str = ""
    events: list[tuple[str, str, str, str]] = field(default_factory=list)
    policies: list[tuple[str, str, str]] = field(default_factory=list)  # table, chain, policy


def parse_monitor(lines: list[str], family: int) -> list[Transaction]:
    """`xtables-monitor -e` output -> the complete transactions of `family`, in order."""
    out: list[Transaction] = []
    current = Transaction()
    for line in lines:
        m = _EVENT.match(line)
        if m:
            if int(m.group(1)) == family:
                current.events.append((m.group(2), m.group(3), m.group(4), m.group(5) or ""))
            continue
        m = _BASE_CHAIN.match(line)
        if m:
            if (m.group(1) == "ip6") == (family == 6):
                current.policies.append((m.group(2), m.group(3), m.group(4).upper()))
            continue
        m = _NEWGEN.match(line)
        if m:
            current.pid, current.name = int(m.group(1)), m.group(2).strip()
            if current.events or current.policies:
                out.append(current)
            current = Transaction()
    return out


def _owned(table: str, chain: str, rule: str) -> bool:
    """An event on a chain kproxy owns, or a jump into one (kproxy's own transaction)."""
    if is_owned_chain(table, chain):
        return True
    tokens = rule.split()
    for i, tok in enumerate(tokens[:-1]):
        if tok in ("-j", "-g") and is_owned_chain(table, tokens[i + 1]):
            return True
    return False


@dataclass
class NetEffect:
    """What other tools' transactions in the window left behind, per restored table."""

    rules: dict[tuple[str, str, str], int] = field(default_factory=dict)  # +1 added, -1 deleted
    chains: dict[tuple[str, str], bool] = field(default_factory=dict)  # True created, False -X
    policies: dict[tuple[str, str], str] = field(default_factory=dict)
    who: set[str] = field(default_factory=set)

    def empty(self) -> bool:
        return not (self.rules or self.chains or self.policies)


def repair_lines(
    eff: NetEffect, table: str, now: dict[str, tuple[str | None, list[str]] | None]
) -> list[str]:
    """--noflush restore lines for `table` that bring back what the restore undid of `eff`;
    `now` holds each chain `eff` names as the kernel has it now (policy, rules) or None."""
    lines: list[str] = []
    for (t, chain), created in eff.chains.items():
        if t == table and created and now.get(chain) is None:
            lines.append(f":{chain} - [0:0]")
    for (t, chain), policy in eff.policies.items():
        have = now.get(chain)
        if t == table and have is not None and have[0] not in (None, policy):
            lines.append(f":{chain} {policy} [0:0]")  # --noflush: sets the policy, keeps rules
    for (t, chain, rule), sign in eff.rules.items():
        if t != table:
            continue
        have = now.get(chain)
        exists = have is not None or eff.chains.get((t, chain)) is True
        present = have is not None and rule in have[1]
        if sign > 0 and exists and not present:
            lines.append(f"-A {chain} {rule}")
        elif sign < 0 and present:
            lines.append(f"-D {chain} {rule}")
    return lines


def net_effect(transactions: list[Transaction], tables: set[str]) -> NetEffect:
    """The last word of the foreign transactions on each rule, chain and policy of `tables`.
    Transactions that touched anything kproxy owns are kproxy's (its restores) and skipped."""
    eff = NetEffect()
    for tx in transactions:
        if any(_owned(t, c, r) for t, _, c, r in tx.events):
            continue
        for table, op, chain, rule in tx.events:
            if table not in tables:
                continue
            eff.who.add(f"{tx.name} (pid {tx.pid})")
            if op == "A":
                eff.rules[(table, chain, rule)] = 1
            elif op == "D":
                eff.rules[(table, chain, rule)] = -1
            elif op == "N":
                eff.chains[(table, chain)] = True
            elif op == "X":
                eff.chains[(table, chain)] = False
        for table, chain, policy in tx.policies:
            if table in tables:
                eff.policies[(table, chain)] = policy
                eff.who.add(f"{tx.name} (pid {tx.pid})")
    return eff


class ForeignWatch:
    """`xtables-monitor -e` from start() until stop(): the transactions it printed."""

    def __init__(self, family: int) -> None:
        self.family = family
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None
        # Set at the first event on a chain kproxy owns: its own restore's transaction, so
        # everything committed before it has been printed by then.
        self.own_seen = threading.Event()

    @staticmethod
    def available() -> bool:
        return shutil.which("xtables-monitor") is not None and shutil.which("stdbuf") is not None

    def start(self, timeout: float = 2.0) -> bool:
        """Start the monitor and wait until it is subscribed; False when it cannot watch."""
        argv = ["stdbuf", "-oL", "xtables-monitor", "-e", f"-{self.family}"]
        try:
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
        except OSError as err:
            log.debug("xtables-monitor not started: %s", err)
            return False
        self._reader = threading.Thread(target=self._read, name="xtables-monitor", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if _subscribed(self.proc.pid):
                return True
            time.sleep(0.005)
        self.stop()
        return False

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if not self.own_seen.is_set():
                m = _EVENT.match(line)
                if (
                    m
                    and int(m.group(1)) == self.family
                    and _owned(*m.group(2, 4), m.group(5) or "")
                ):
                    # kproxy's own restore: everything committed before it has been printed.
                    # The monitor goes at once: translating the restore's flood of events
                    # would take a core for seconds at 10k Services, and while it listens the
                    # kernel builds an event for every object the restore commits.
                    self.own_seen.set()
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.kill()
                    return

    def stop(self, wait: float = 2.0) -> list[Transaction]:
        """Stop the monitor once it has printed everything committed before kproxy's own
        restore (its first event on an owned chain, or the monitor's end: a full socket
        buffer ends it in a big restore's own flood of events, all after that point); at
        most `wait` seconds."""
        if self.proc is None:
            return []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.own_seen.wait(0.01):
                break
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        if self._reader is not None:
            self._reader.join(2)
        self.proc = None
        return parse_monitor(self.lines, self.family)


def _subscribed(pid: int) -> bool:
    """Whether process `pid` holds a NETLINK_NETFILTER socket in the nf_tables group (found by
    the socket inodes among its file descriptors: its event socket's port id is not its pid)."""
    try:
        inodes = {
            link[8:-1]
            for fd in Path(f"/proc/{pid}/fd").iterdir()
            if (link := _readlink(fd)).startswith("socket:[")
        }
        text = Path("/proc/net/netlink").read_text()
    except OSError:
        return False
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 10 or cols[-1] not in inodes:
            continue
        try:
            proto, groups = int(cols[1]), int(cols[3], 16)
        except ValueError:
            continue
        if proto == NETLINK_NETFILTER and groups & (1 << (NFNLGRP_NFTABLES - 1)):
            return True
    return False


def _readlink(path: Path) -> str:
    try:
        return str(path.readlink())
    except OSError:
        return ""
