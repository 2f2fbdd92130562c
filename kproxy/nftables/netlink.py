"""nftables mode's netlink datapath: the kproxy table written and read over NETLINK_NETFILTER,
without the `nft` binary on the sync path (`--nftables-datapath netlink`, the default).

nft 1.0.6 loads the whole ruleset before any command that touches a rule, set or element, so
a one-element change costs it ~0.7 s at 10k Services; as one netlink batch it costs only the
kernel's own work (~10 ms; ~0.2 s at 10k Services when rules are added, for the kernel then
validates the whole table: BENCHMARKS.md). Writes: the plan's steps as one batch
(kproxy.nftables.nlencode), one transaction, all or nothing. Reads: the table's chains, rules,
sets and elements dumped, and each kernel rule compared as bytes with the encoding of the
desired rule it should be, so a verify needs no text at all. Where the encoder does not know
a rule, the nft datapath (kproxy.nftables.nft) does that transaction instead, and says so
once.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from kproxy.nftables import nlmsg as m
from kproxy.nftables import oracle
from kproxy.nftables.nft import NftBackend, NftError
from kproxy.nftables.nlencode import (
    HOOKS,
    BatchEncoder,
    KeyEncoder,
    decode_verdict,
    priority_number,
    set_shape,
)
from kproxy.nftables.nlrules import RuleEncoder, Unsupported
from kproxy.nftables.nlsock import BatchError, NetlinkSocket
from kproxy.nftables.plan import NftPlan
from kproxy.nftables.table import TABLE, NftChain, NftSet, NftTable

log = logging.getLogger(__name__)

READ_ATTEMPTS = 3  # a read the generation moved under is taken again
HOOK_NAMES = {number: name for name, number in HOOKS.items()}


@dataclass
class _Wire:
    """A desired chain's rules as the kernel holds them (cached per chain object: the render
    cache hands back the same object while its Service is unchanged)."""

    chain: NftChain
    rules: list[bytes]
    anon: list[list] = field(default_factory=list)  # per rule: its anonymous sets' contents


class NetlinkBackend(NftBackend):
    """The kproxy table of one family over netlink; NftBackend's interface."""

    def __init__(self, family: str, table: str = TABLE) -> None:
        super().__init__(family, table)
        object.__setattr__(self, "_state", _State(family, table))

    @property
    def datapath(self) -> str:
        return "netlink"

    # ---- writes ----

    def apply_plan(self, plan: NftPlan, desired: NftTable | None = None) -> None:
        """The plan as one netlink batch; nothing is applied when the kernel refuses any of it
        (NftError names what it refused)."""
        if plan.empty():
            return
        st = self._state
        sets = dict(desired.sets) if desired is not None else {}
        before = oracle.listing(self.family, table=self.table) if oracle.namespace() else None
        st.verified_gen = None
        try:
            with NetlinkSocket() as sock, _no_gc():
                first = sock.next_seq(len(plan.ops) * 4 + 16)
                batch = st.encoder.batch(plan, first, sets)
                sock.next_seq(batch.messages + 2)
                gen = _generation(sock)
                errors = sock.send_batch(batch.data, batch.last_seq)
                if not errors and _generation(sock) == _next_generation(gen):
                    # Ours was the only commit between the two: the table is what we sent.
                    st.verified_gen = _next_generation(gen)
        except Unsupported as err:
            st.fallback_once(f"{err}")
            super().apply_plan(plan, desired)
            return
        if errors:
            raise NftError(_describe(errors, batch.what), errors[0].errno)
        if before is not None:  # the test suite's check of the encoder against nft
            oracle.check(self.family, before, plan)

    def unchanged(self) -> bool:
        """True when no nf_tables transaction (of any process, on any table) was committed in
        this namespace since the kproxy table was last written or read whole: the ruleset's
        generation, which every commit moves by one, is still the one seen then."""
        known = self._state.verified_gen
        if known is None:
            return False
        with NetlinkSocket() as sock:
            return _generation(sock) == known

    def delete_table(self) -> bool:
        self._state.verified_gen = None
        if not self.exists():
            return False
        with NetlinkSocket() as sock:
            batch = self._state.encoder.delete_table(sock.next_seq(4))
            errors = sock.send_batch(batch.data, batch.last_seq)
        if errors and errors[0].errno != errno.ENOENT:
            raise NftError(_describe(errors, batch.what), errors[0].errno)
        return not errors

    # ---- reads ----

    def exists(self) -> bool:
        with NetlinkSocket() as sock:
            return bool(_get_table(sock, self._state.nfproto, self.table))

    def read_objects(self, chains: set[str], sets: set[str], hint: NftTable) -> NftTable | None:
        """Only these chains and sets of the kernel's kproxy table (None: there is no table),
        read one by one, rules compared with `hint`'s as read() does: a drift repair's read,
        which costs the objects named, not the table."""
        try:
            self._state.verified_gen = None
            with NetlinkSocket() as sock, _no_gc():
                return self._state.read_objects(sock, chains, sets, hint)
        except Unsupported as err:
            self._state.fallback_once(f"{err}")
            return super().read_objects(chains, sets, hint)

    def read(self, hint: NftTable | None = None) -> NftTable | None:
        """The kernel's kproxy table (None: there is none). Rules equal to one of `hint`'s
        (the desired table) carry its text; any other rule gets a text of its own that
        matches nothing, so a plan rewrites its chain. Without a hint every rule is such."""
        try:
            self._state.verified_gen = None
            for _ in range(READ_ATTEMPTS):
                with NetlinkSocket() as sock, _no_gc():
                    before = _generation(sock)
                    table = self._state.read(sock, hint)
                    if _generation(sock) == before:
                        self._state.verified_gen = before
                        return table
            return table
        except Unsupported as err:
            self._state.fallback_once(f"{err}")
            return super().read(hint)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Python's cycle collector off while a batch or a table is built: hundreds of thousands
    of small objects that form no cycles, which would trigger it over and over."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _generation(sock: NetlinkSocket) -> int:
    answer = sock.request(m.NFT_MSG_GETGEN, 0)
    attrs = m.parse_attrs(answer[0], 4) if answer else {}
    return m.be32(attrs[m.NFTA_GEN_ID]) if m.NFTA_GEN_ID in attrs else -1


def _next_generation(gen: int) -> int:
    """The generation after a commit (the kernel's counter is 32 bits and skips 0)."""
    return (gen + 1) & 0xFFFFFFFF or 1


def table_comment(family: str, table: str) -> str | None:
    """The comment of the nf_tables table `family` `table` ("" for none; None: no such
    table), over netlink: one request, whatever the table holds."""
    with NetlinkSocket() as sock:
        answer = _get_table(sock, m.NFPROTO[family], table)
    if not answer:
        return None
    return _udata_comment(m.parse_attrs(answer[0], 4).get(m.NFTA_TABLE_USERDATA)) or ""


def _get_table(sock: NetlinkSocket, nfproto: int, table: str) -> list[bytes]:
    return sock.request(m.NFT_MSG_GETTABLE, nfproto, m.strz(m.NFTA_TABLE_NAME, table))


class _State:
    """What a NetlinkBackend keeps between calls (the backend itself is a frozen dataclass)."""

    def __init__(self, family: str, table: str) -> None:
        self.family, self.table = family, table
        self.nfproto = m.NFPROTO[family]
        self.rules = RuleEncoder(family)
        self.encoder = BatchEncoder(family, self.rules, table)
        self.keys = KeyEncoder(family)
        self.wire: dict[int, _Wire] = {}
        self.warned = False
        # The ruleset generation at which the table was last written or read whole (None:
        # not known); see NetlinkBackend.unchanged.
        self.verified_gen: int | None = None

    def fallback_once(self, why: str) -> None:
        if not self.warned:
            log.warning("nftables netlink datapath: %s; that change goes through nft -f", why)
            self.warned = True

    def wire_of(self, chain: NftChain) -> _Wire:
        w = self.wire.get(id(chain))
        if w is None or w.chain is not chain:
            encoded = [self.rules.encode(r) for r in chain.rules]
            w = _Wire(chain, [e.expressions for e in encoded], [_anon_key(e.anon) for e in encoded])
            self.wire[id(chain)] = w
        return w

    def read(self, sock: NetlinkSocket, hint: NftTable | None) -> NftTable | None:
        answer = _get_table(sock, self.nfproto, self.table)
        if not answer:
            return None
        tattrs = m.parse_attrs(answer[0], 4)
        table = NftTable(self.family, comment=_udata_comment(tattrs.get(m.NFTA_TABLE_USERDATA)))
        want_chains = hint.chains if hint is not None else {}
        want_sets = hint.sets if hint is not None else {}
        table_attr = m.strz(1, self.table)

        table_name = self.table.encode() + b"\0"
        anon_elements: dict[str, list] = {}
        with_elements: list[tuple[str, NftSet | None, int]] = []  # (name, set, key length)
        for payload in sock.dump(m.NFT_MSG_GETSET, self.nfproto, table_attr):
            a = m.parse_attrs(payload, 4)
            if a.get(m.NFTA_SET_TABLE) != table_name:
                continue
            name = m.cstr(a[m.NFTA_SET_NAME])
            flags = m.be32(a.get(m.NFTA_SET_FLAGS, bytes(4)))
            if flags & m.NFT_SET_ANONYMOUS:
                with_elements.append((name, None, 0))
                continue
            s = table.sets[name] = self._set(a, flags, want_sets.get(name))
            if s.type[0] != "#" and not s.dynamic:
                with_elements.append((name, s, m.be32(a[m.NFTA_SET_KEY_LEN])))
        bodies = [table_attr + m.strz(m.NFTA_SET_ELEM_LIST_SET, n) for n, _, _ in with_elements]
        dumps = sock.dump_each(m.NFT_MSG_GETSETELEM, self.nfproto, bodies)
        for (name, s, key_len), answers in zip(with_elements, dumps, strict=True):
            if s is None:
                anon_elements[name] = sorted(self._elements(answers, raw=True))
                continue
            for key, value in self._elements(answers, typeof=s.typeof, key_len=key_len):
                s.elements[key] = value if s.kind == "map" else None

        wanted: list[tuple[str, NftChain]] = []
        for payload in sock.dump(m.NFT_MSG_GETCHAIN, self.nfproto, table_attr):
            a = m.parse_attrs(payload, 4)
            if a.get(m.NFTA_CHAIN_TABLE) != table_name:
                continue  # the kernel dumps every table's chains (iptables-nft's too)
            name = m.cstr(a[m.NFTA_CHAIN_NAME])
            want = want_chains.get(name)
            chain = NftChain(
                base=_base_text(a, want),
                comment=_udata_comment(a.get(m.NFTA_CHAIN_USERDATA)),
            )
            if want is None:
                # Not wanted: it will be flushed and deleted whatever it holds.
                chain.rules = ["# a chain kproxy no longer wants"]
            else:
                wanted.append((name, want))
            table.chains[name] = chain
        bodies = [table_attr + m.strz(m.NFTA_RULE_CHAIN, name) for name, _ in wanted]
        dumps = sock.dump_each(m.NFT_MSG_GETRULE, self.nfproto, bodies)
        for (name, want), answers in zip(wanted, dumps, strict=True):
            table.chains[name].rules = self._rules(answers, want, anon_elements)
        if hint is not None:  # keep the wire cache to the chains still wanted
            live = {id(c) for c in hint.chains.values()}
            self.wire = {k: w for k, w in self.wire.items() if k in live}
        return table

    def read_objects(
        self, sock: NetlinkSocket, chains: set[str], sets: set[str], hint: NftTable
    ) -> NftTable | None:
        if not _get_table(sock, self.nfproto, self.table):
            return None
        # The table is there; its comment is not what a repair is about.
        table = NftTable(self.family, comment=hint.comment)
        table_attr = m.strz(1, self.table)
        for name in sorted(sets):
            got = sock.request(m.NFT_MSG_GETSET, self.nfproto, table_attr + m.strz(2, name))
            if not got:
                continue
            a = m.parse_attrs(got[0], 4)
            flags = m.be32(a.get(m.NFTA_SET_FLAGS, bytes(4)))
            s = table.sets[name] = self._set(a, flags, hint.sets.get(name))
            if s.type[0] != "#" and not s.dynamic:
                body = table_attr + m.strz(m.NFTA_SET_ELEM_LIST_SET, name)
                answers = sock.dump(m.NFT_MSG_GETSETELEM, self.nfproto, body)
                key_len = m.be32(a[m.NFTA_SET_KEY_LEN])
                for key, value in self._elements(answers, typeof=s.typeof, key_len=key_len):
                    s.elements[key] = value if s.kind == "map" else None
        for name in sorted(chains):
            body = table_attr + m.strz(m.NFTA_CHAIN_NAME, name)
            got = sock.request(m.NFT_MSG_GETCHAIN, self.nfproto, body)
            if not got:
                continue
            a = m.parse_attrs(got[0], 4)
            want = hint.chains.get(name)
            chain = table.chains[name] = NftChain(
                base=_base_text(a, want), comment=_udata_comment(a.get(m.NFTA_CHAIN_USERDATA))
            )
            if want is None:
                chain.rules = ["# a chain kproxy no longer wants"]
                continue
            body = table_attr + m.strz(m.NFTA_RULE_CHAIN, name)
            answers = sock.dump(m.NFT_MSG_GETRULE, self.nfproto, body)
            anon_elements = {}
            for payload in answers:
                for anon in _anon_names(payload):
                    body = table_attr + m.strz(m.NFTA_SET_ELEM_LIST_SET, anon)
                    dump = sock.dump(m.NFT_MSG_GETSETELEM, self.nfproto, body)
                    anon_elements[anon] = sorted(self._elements(dump, raw=True))
            chain.rules = self._rules(answers, want, anon_elements)
        return table

    def _rules(self, answers: list[bytes], want: NftChain, anon_elements: dict) -> list[str]:
        """A chain's rules from its GETRULE dump: the wanted texts where the kernel's
        expressions are the wanted ones."""
        got = [_rule_attrs(payload) for payload in answers]
        wire = self.wire_of(want)
        if [g for g, _ in got] == wire.rules and not any(wire.anon):
            return want.rules  # the common case: the chain is as wanted
        triples = list(zip(wire.rules, want.rules, wire.anon, strict=True))
        known = {w: text for w, text, anon in triples if not anon}
        anon_known = {
            (_canonical(w), tuple(tuple(elements) for elements in anon)): text
            for w, text, anon in triples
            if anon
        }
        out = []
        for expressions, handle in got:
            text = known.get(expressions)
            if text is None and (b"__set" in expressions or b"__map" in expressions):
                sets = tuple(tuple(anon_elements.get(n, [])) for n in _anon_names(expressions))
                text = anon_known.get((_canonical(expressions), sets))
            out.append(text if text is not None else f"# kernel rule {handle.hex()}")
        return out

    def _set(self, a: dict, flags: int, want: NftSet | None) -> NftSet:
        """A set's declaration: the wanted one when the kernel's is the same (its elements
        are read after), else one that matches nothing."""
        kind = "map" if flags & m.NFT_SET_MAP else "set"
        got = (
            flags,
            m.be32(a.get(m.NFTA_SET_KEY_TYPE, bytes(4))),
            m.be32(a.get(m.NFTA_SET_KEY_LEN, bytes(4))),
            m.be32(a[m.NFTA_SET_DATA_TYPE]) if m.NFTA_SET_DATA_TYPE in a else None,
            int.from_bytes(a[m.NFTA_SET_TIMEOUT], "big") if m.NFTA_SET_TIMEOUT in a else None,
            a.get(m.NFTA_SET_USERDATA, b""),
        )
        if want is not None:
            shape = set_shape(self.family, want)
            mine = (
                shape.flags,
                shape.key_type,
                shape.key_len,
                shape.data_type,
                shape.timeout_ms,
                shape.udata,
            )
            if got == mine:
                return NftSet(
                    want.kind, want.type, want.flags, want.timeout, want.comment, typeof=want.typeof
                )
        # Not the declaration wanted (or not wanted at all): re-created or deleted whole.
        return NftSet(kind, f"# kernel set {got[:5]}", comment=None)

    def _elements(
        self, answers: list[bytes], typeof: bool = False, key_len: int = 0, raw: bool = False
    ) -> list[tuple]:
        """A set's elements from its GETSETELEM dump: (key text, verdict text or None), or
        (key bytes, is an interval end, verdict text or None) with `raw` (an anonymous set's
        or map's, compared with AnonSet.contents)."""
        out: list[tuple] = []
        decode_key = self.keys.decode
        verdicts: dict[bytes, str] = {}  # a map's values repeat (drop, goto reject-chain)
        for payload in answers:
            top = _children(payload, 4, len(payload))
            if m.NFTA_SET_ELEM_LIST_ELEMENTS not in top:
                continue
            start, end = top[m.NFTA_SET_ELEM_LIST_ELEMENTS]
            while start + 4 <= end:
                n = _ATTR.unpack_from(payload, start)[0]
                if n < 4:
                    break
                key, flags, verdict = _element(payload, start + 4, start + n)
                start += (n + 3) & ~3
                value = None
                if verdict is not None:
                    value = verdicts.get(verdict)
                    if value is None:
                        value = verdicts[verdict] = decode_verdict(verdict)
                if raw:
                    out.append((key, bool(flags & m.NFT_SET_ELEM_INTERVAL_END), value))
                    continue
                out.append((decode_key(key_len, typeof, key), value))
        return out


_ATTR = struct.Struct("=HH")


def _rule_attrs(payload: bytes) -> tuple[bytes, bytes]:
    """(expressions, handle) of a GETRULE answer (payload: nfgenmsg onward). Hand-walked:
    a verify at 10k Services reads 250k rules."""
    off, end, handle = 4, len(payload), b""
    unpack = _ATTR.unpack_from
    while off + 4 <= end:
        n, kind = unpack(payload, off)
        kind &= m.NLA_TYPE_MASK
        if kind == m.NFTA_RULE_EXPRESSIONS:
            return payload[off + 4 : off + n], handle
        if kind == m.NFTA_RULE_HANDLE:
            handle = payload[off + 4 : off + n]
        if n < 4:
            break
        off += (n + 3) & ~3
    return b"", handle


def _children(buf: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """{type: (start, end) of the value} of the attributes in buf[start:end], without
    copying them."""
    out = {}
    unpack = _ATTR.unpack_from
    while start + 4 <= end:
        n, kind = unpack(buf, start)
        if n < 4:
            break
        out[kind & m.NLA_TYPE_MASK] = (start + 4, start + n)
        start += (n + 3) & ~3
    return out


def _element(buf: bytes, start: int, end: int) -> tuple[bytes, int, bytes | None]:
    """(key, flags, verdict payload or None) of one element of a GETSETELEM answer."""
    e = _children(buf, start, end)
    key = b""
    if m.NFTA_SET_ELEM_KEY in e:
        v = _children(buf, *e[m.NFTA_SET_ELEM_KEY]).get(m.NFTA_DATA_VALUE)
        key = buf[v[0] : v[1]] if v else b""
    flags = 0
    if m.NFTA_SET_ELEM_FLAGS in e:
        a, _ = e[m.NFTA_SET_ELEM_FLAGS]
        flags = int.from_bytes(buf[a : a + 4], "big")
    verdict = None
    if m.NFTA_SET_ELEM_DATA in e:
        v = _children(buf, *e[m.NFTA_SET_ELEM_DATA]).get(m.NFTA_DATA_VERDICT)
        verdict = buf[v[0] : v[1]] if v else b""
    return key, flags, verdict


def _anon_key(anon: list) -> list:
    return [a.contents() for a in anon]


# nft names an anonymous set `__setN`, an anonymous map `__mapN`.
_SET_NAME = re.compile(rb"__(set|map)(\d+|%d)\x00")


def _anon_names(expressions: bytes) -> list[str]:
    return [f"__{kind.decode()}{n.decode()}" for kind, n in _SET_NAME.findall(expressions)]


def _canonical(expressions: bytes) -> tuple:
    """A rule's expressions with its anonymous sets' names and batch ids taken out (the
    kernel names them `__setN` and `__mapN`; the elements, and a map's verdicts, are compared
    beside)."""
    out = []
    for _, element in m.iter_attrs(expressions):
        a = m.parse_attrs(element)
        name = m.cstr(a.get(m.NFTA_EXPR_NAME, b""))
        data = a.get(m.NFTA_EXPR_DATA, b"")
        if name == "lookup":
            d = m.parse_attrs(data)
            if m.cstr(d.get(1, b"")).startswith(("__set", "__map")):
                # The destination register too: a verdict map's lookup is not a set's.
                data = b"anon" + d.get(2, b"") + d.get(3, b"-") + d.get(5, bytes(4))
        out.append((name, data))
    return tuple(out)


def _base_text(a: dict, want: NftChain | None) -> str | None:
    """A base chain's header: the wanted text when the kernel's hook equals it."""
    if m.NFTA_CHAIN_HOOK not in a:
        return None
    hook = m.parse_attrs(a[m.NFTA_CHAIN_HOOK])
    num = m.be32(hook.get(m.NFTA_HOOK_HOOKNUM, bytes(4)))
    prio = int.from_bytes(hook.get(m.NFTA_HOOK_PRIORITY, bytes(4))[:4], "big", signed=True)
    kind = m.cstr(a.get(m.NFTA_CHAIN_TYPE, b"filter"))
    policy = m.be32(a[m.NFTA_CHAIN_POLICY]) if m.NFTA_CHAIN_POLICY in a else 1
    if want is not None and want.base and policy == 1:
        try:
            if priority_number(want.base) == (kind, num, prio):
                return want.base
        except Unsupported:
            pass
    verdict = "accept" if policy == 1 else "drop"
    return f"type {kind} hook {HOOK_NAMES.get(num, num)} priority {prio}; policy {verdict};"


def step_label(op: tuple) -> str:
    """A plan step in words, for errors."""
    kind = op[0]
    if kind == "rule":
        return f"chain {op[1]} rule {op[2]!r}"
    if kind == "elements":
        return f"{op[1]} elements of {op[2]} ({', '.join(k for k, _ in op[4][:3])}...)"
    if kind in ("chain", "flush", "delchain"):
        return f"{ {'chain': 'add', 'flush': 'flush', 'delchain': 'delete'}[kind] } chain {op[1]}"
    if kind in ("set", "delset"):
        return f"{'add' if kind == 'set' else 'delete'} set {op[1]}"
    return kind


def _udata_comment(udata: bytes | None) -> str | None:
    """The comment TLV (type 0 for tables and chains) of nft's user data."""
    off = 0
    while udata and off + 2 <= len(udata):
        kind, n = udata[off], udata[off + 1]
        if kind == 0:
            return m.cstr(udata[off + 2 : off + 2 + n])
        off += 2 + n
    return None


def _describe(errors: list[BatchError], what: dict[int, tuple]) -> str:
    """The kernel's refusal, naming the Service and rule of the first refused message."""
    first = errors[0]
    label = step_label(what[first.seq]) if first.seq in what else "the batch"
    service = re.search(r"-[A-Z2-7]{8}-([^/\s]+/[^/\s]+)/", label)
    who = f"Service {service.group(1)}: " if service else ""
    reason = os.strerror(first.errno) + (f" ({first.message})" if first.message else "")
    more = f"; {len(errors) - 1} more refused" if len(errors) > 1 else ""
    return f"netlink batch refused, nothing applied: {who}{label}: {reason}{more}"
