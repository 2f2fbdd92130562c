"""nf_tables change events of this network namespace, as whole transactions with their author
(what kproxy.daemon.driftwatch hands to the reconciler: drift seen as it happens, issue 16).

Every change to the nf_tables ruleset — nftables mode's `kproxy` table and iptables-nft's
tables alike — is multicast on the NFNLGRP_NFTABLES netlink group as it is committed: one
message per table, chain, rule, set or element added or deleted, then NFT_MSG_NEWGEN, which
carries the ruleset's new generation and the id and name of the task (thread) that committed
the transaction. A watcher subscribes in the namespace the calling thread is in and turns the
stream into `Transaction`s. It sleeps in recv while nothing changes. When the socket's buffer
overflows (ENOBUFS), events were lost: `Overflow` says so, and the reader must fall back to
one full verify.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

from kproxy.drift import Change
from kproxy.nftables import nlmsg as m

__all__ = ["Change", "NfEventWatcher", "Overflow", "Transaction"]

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
RECV_SIZE = 1 << 20
# The socket's receive buffer (memory is charged only for what is queued): a burst of other
# tools' changes must fit while the reader catches up. `iptables -F KUBE-SERVICES` at 10k
# Services is 10k events, each with the deleted rule's expressions: 8 MiB overflowed, 16 MiB
# held it (measured). kproxy's own big transactions (a full sync at thousands of Services)
# overflow it anyway; that costs one verify (see kproxy.daemon.reconciler).
RCVBUF = 32 << 20
SO_RCVBUFFORCE = 33
NFTA_IMMEDIATE_DATA = 2

_KINDS = {
    m.NFT_MSG_NEWTABLE: ("add", "table"),
    m.NFT_MSG_DELTABLE: ("delete", "table"),
    m.NFT_MSG_NEWCHAIN: ("add", "chain"),
    m.NFT_MSG_DELCHAIN: ("delete", "chain"),
    m.NFT_MSG_NEWRULE: ("add", "rule"),
    m.NFT_MSG_DELRULE: ("delete", "rule"),
    m.NFT_MSG_NEWSET: ("add", "set"),
    m.NFT_MSG_DELSET: ("delete", "set"),
    m.NFT_MSG_NEWSETELEM: ("add", "element"),
    m.NFT_MSG_DELSETELEM: ("delete", "element"),
}
_FAMILIES = {v: k for k, v in m.NFPROTO.items()}


@dataclass
class Transaction:
    """The changes one commit made, and who made it: `pid` is the id of the task (thread) that
    committed, `process` its name (the thread's comm: a process's threads share it unless
    renamed)."""

    generation: int
    pid: int
    process: str
    changes: list[Change] = field(default_factory=list)
    # The netlink port of the socket that committed it (the messages' nlmsg_pid): an id in the
    # committer's own pid namespace, where `pid` is one in the outermost.
    portid: int = 0

    def touches(self, family: str, table: str) -> list[Change]:
        return [c for c in self.changes if c.family == family and c.table == table]


@dataclass(frozen=True)
class Overflow:
    """Events were lost (the socket's buffer was full): what changed is unknown."""


class NfEventWatcher:
    """A subscription to NFNLGRP_NFTABLES in the calling thread's network namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            try:  # root may go past net.core.rmem_max
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            self.sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
        except BaseException:
            self.sock.close()
            raise
        self._pending: list[Change] = []
        # wake() writes here, so a reader waiting for events forever can be stopped.
        self._wake_r, self._wake_w = os.pipe()

    def close(self) -> None:
        self.sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def wake(self) -> None:
        """Make a read() waiting without a timeout return (from another thread)."""
        os.write(self._wake_w, b"x")

    def __enter__(self) -> NfEventWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, timeout: float | None = None) -> Iterator[Transaction | Overflow]:
        """The transactions committed since the last read, waiting up to `timeout` seconds
        (None: forever, or until wake()) for the first answer; ends when nothing more is
        queued. While nothing changes it sleeps in the kernel and uses no CPU."""
        ready, _, _ = select.select([self.sock, self._wake_r], [], [], timeout)
        if self._wake_r in ready:
            os.read(self._wake_r, 64)
        if self.sock not in ready:
            return
        while True:
            try:
                data = self.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            except (BlockingIOError, TimeoutError):  # nothing (more) queued
                return
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                self._pending.clear()
                yield Overflow()
                return
            yield from self._parse(data)

    def _parse(self, data: bytes) -> Iterator[Transaction]:
        for kind, _flags, _seq, portid, payload in m.iter_messages(data):
            if kind >> 8 != m.NFNL_SUBSYS_NFTABLES:
                continue
            msg = kind & 0xFF
            if msg == m.NFT_MSG_NEWGEN:
                a = m.parse_attrs(payload, 4)
                yield Transaction(
                    generation=m.be32(a[m.NFTA_GEN_ID]) if m.NFTA_GEN_ID in a else -1,
                    pid=m.be32(a[m.NFTA_GEN_PROC_PID]) if m.NFTA_GEN_PROC_PID in a else 0,
                    process=m.cstr(a.get(m.NFTA_GEN_PROC_NAME, b"")),
                    changes=self._pending,
                    portid=portid,
                )
                self._pending = []
            elif msg in _KINDS:
                self._pending.append(_change(msg, payload))


def _change(msg: int, payload: bytes) -> Change:
    verb, kind = _KINDS[msg]
    family = _FAMILIES.get(payload[0], str(payload[0]))
    a = m.parse_attrs(payload, 4)
    # Attribute 1 is the table's name for every kind; the object's own name is 2 for rules
    # (their chain) and sets and elements (their set), 3 for chains.
    table = m.cstr(a.get(1, b""))
    if kind == "table":
        name = ""
    elif kind == "chain":
        name = m.cstr(a.get(m.NFTA_CHAIN_NAME, b""))
    else:
        name = m.cstr(a.get(2, b""))
    targets: tuple[str, ...] = ()
    if kind == "rule" and b"immediate" in payload:
        targets = _verdict_chains(a.get(m.NFTA_RULE_EXPRESSIONS, b""))
    return Change(verb, kind, family, table, name, targets)


def _verdict_chains(expressions: bytes) -> tuple[str, ...]:
    """The chains a rule's immediate verdicts jump or go to (iptables-nft's `-j CHAIN`)."""
    out = []
    for _, elem in m.iter_attrs(expressions):
        e = m.parse_attrs(elem)
        if m.cstr(e.get(m.NFTA_EXPR_NAME, b"")) != "immediate":
            continue
        data = m.parse_attrs(e.get(m.NFTA_EXPR_DATA, b"")).get(NFTA_IMMEDIATE_DATA, b"")
        verdict = m.parse_attrs(m.parse_attrs(data).get(m.NFTA_DATA_VERDICT, b""))
        if m.NFTA_VERDICT_CHAIN in verdict:
            out.append(m.cstr(verdict[m.NFTA_VERDICT_CHAIN]))
    return tuple(out)
