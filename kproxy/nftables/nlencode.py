"""A plan (kproxy.nftables.plan) as nf_tables netlink messages: one batch, one transaction.

The rules' expressions come from kproxy.nftables.nlrules; here: tables, chains, sets and maps
(with the user data nft stores, so `nft list` prints them back as the renderer wrote them),
element keys and verdicts, and the batch around them. No I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kproxy.nftables import nlmsg as m
from kproxy.nftables.nlrules import (
    ANON_ID_ATTR,
    FAMILIES,
    PROTOCOL_NAMES,
    PROTOCOLS,
    AnonSet,
    Hole,
    RuleEncoder,
    Unsupported,
    verdict_data,
)
from kproxy.nftables.plan import NAMED_PRIORITIES, NftPlan, Op
from kproxy.nftables.table import TABLE, NftChain, NftSet

_ATTR = struct.Struct("=HH")
_HOST32 = struct.Struct("=I")
_MSG_HEADER = struct.Struct("=IHHIIBBH")  # nlmsghdr and nfgenmsg
_RES_ID = m.NFNL_SUBSYS_NFTABLES << 8  # res_id in network order, as a host-order u16
HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}


# ---- sets, maps, elements ----

# Set declarations the renderer writes, with nft's user data for them (how `nft list` prints
# the key back). The comment, when there is one, follows as its own TLV.
_CONCAT_UDATA = bytes.fromhex("000400000000010400000000030800040d0000000100060400000000")
_ADDR_UDATA = bytes.fromhex("000402000000")
_NUMGEN_UDATA = bytes.fromhex(
    "000401000000010400000000031a000417000000011200040100000001040200000002"
    "040000000004080004010000000100060400000000"
)
TYPEOF_NUMGEN = "numgen random mod 2 : verdict"


@dataclass(frozen=True)
class SetShape:
    """What a set's declaration is in the kernel: the fields a dump gives back."""

    flags: int
    key_type: int
    key_len: int
    data_type: int | None
    timeout_ms: int | None
    udata: bytes


def set_shape(family: str, s: NftSet) -> SetShape:
    fam = FAMILIES[family]
    addr = "ipv6_addr" if fam.addr_len == 16 else "ipv4_addr"
    flags = m.NFT_SET_MAP if s.kind == "map" else 0
    if s.flags:
        for word in s.flags.split(","):
            if word == "dynamic":
                flags |= m.NFT_SET_EVAL
            elif word == "timeout":
                flags |= m.NFT_SET_TIMEOUT
            else:
                raise Unsupported(f"set flag {word!r}")
    key, _, data = s.type.partition(" : ")
    data_type = None
    if s.kind == "map":
        if data != "verdict":
            raise Unsupported(f"map type {s.type!r}")
        data_type = m.NFT_DATA_VERDICT
    if s.typeof:
        if s.type != TYPEOF_NUMGEN:
            raise Unsupported(f"typeof {s.type!r}")
        key_type, key_len, udata = 4, 4, _NUMGEN_UDATA
    elif key == f"{addr} . inet_proto . inet_service":
        key_type, key_len, udata = (
            (fam.key_type << 12) | (12 << 6) | 13,
            fam.addr_len + 8,
            _CONCAT_UDATA,
        )
    elif key == "inet_proto . inet_service":
        key_type, key_len, udata = (12 << 6) | 13, 8, _CONCAT_UDATA
    elif key == addr:
        key_type, key_len, udata = fam.key_type, fam.addr_len, _ADDR_UDATA
    else:
        raise Unsupported(f"set type {s.type!r}")
    if s.comment:
        text = s.comment.encode() + b"\0"
        udata += bytes([7, len(text)]) + text
    timeout = _timeout_ms(s.timeout) if s.timeout else None
    return SetShape(flags, key_type, key_len, data_type, timeout, udata)


def _timeout_ms(text: str) -> int:
    total, number = 0, ""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    for ch in text:
        if ch.isdigit():
            number += ch
        elif ch in units and number:
            total += int(number) * units[ch]
            number = ""
        else:
            raise Unsupported(f"timeout {text!r}")
    if number:
        raise Unsupported(f"timeout {text!r}")
    return total * 1000


class KeyEncoder:
    """Element keys as the renderer writes them -> the kernel's key bytes, and back."""

    def __init__(self, family: str) -> None:
        self.fam = FAMILIES[family]

    def encoder(self, set_type: str, typeof: bool) -> Callable[[str], bytes]:
        """A key encoder for one set's keys."""
        return lambda key: self.encode(set_type, typeof, key)

    def encode(self, set_type: str, typeof: bool, key: str) -> bytes:
        if typeof:
            return _HOST32.pack(int(key))
        parts = key.split(" . ")
        if len(parts) == 3:
            return (
                self.fam.addr(parts[0])
                + bytes([PROTOCOLS[parts[1]], 0, 0, 0])
                + int(parts[2]).to_bytes(2, "big")
                + b"\0\0"
            )
        if len(parts) == 2:
            return (
                bytes([PROTOCOLS[parts[0]], 0, 0, 0]) + int(parts[1]).to_bytes(2, "big") + b"\0\0"
            )
        return self.fam.addr(key)

    def decode(self, key_len: int, typeof: bool, raw: bytes) -> str:
        if typeof:
            return str(_HOST32.unpack(raw[:4])[0])
        n = self.fam.addr_len
        if key_len == n + 8:
            proto = PROTOCOL_NAMES.get(raw[n], str(raw[n]))
            port = int.from_bytes(raw[n + 4 : n + 6], "big")
            return f"{self.fam.text(raw)} . {proto} . {port}"
        if key_len == 8:
            proto = PROTOCOL_NAMES.get(raw[0], str(raw[0]))
            return f"{proto} . {int.from_bytes(raw[4:6], 'big')}"
        return self.fam.text(raw)


def decode_verdict(raw: bytes) -> str:
    """NFTA_DATA_VERDICT's payload -> `goto X`, `drop`, ..."""
    attrs = m.parse_attrs(raw)
    code = struct.unpack(">i", attrs.get(m.NFTA_VERDICT_CODE, b"\0\0\0\0")[:4])[0]
    chain = m.cstr(attrs[m.NFTA_VERDICT_CHAIN]) if m.NFTA_VERDICT_CHAIN in attrs else ""
    names = {
        m.NF_DROP: "drop",
        m.NF_ACCEPT: "accept",
        m.NFT_RETURN: "return",
        m.NFT_JUMP: "jump",
        m.NFT_GOTO: "goto",
    }
    word = names.get(code, f"verdict {code}")
    return f"{word} {chain}" if chain else word


_ELEMENT_JUMP = Hole(lambda n: m.attr(m.NFTA_SET_ELEM_DATA, verdict_data("jump " + n)))
_ELEMENT_GOTO = Hole(lambda n: m.attr(m.NFTA_SET_ELEM_DATA, verdict_data("goto " + n)))


def _element_verdict(value: str) -> bytes:
    """NFTA_SET_ELEM_DATA of a verdict map's element."""
    word, _, chain = value.partition(" ")
    if chain and word == "goto":
        return _ELEMENT_GOTO.fill(chain)
    if chain and word == "jump":
        return _ELEMENT_JUMP.fill(chain)
    return m.attr(m.NFTA_SET_ELEM_DATA, verdict_data(value))


# ---- the batch ----

ELEMENTS_PER_MESSAGE_BYTES = 60000  # an attribute's length is 16 bits


def priority_number(base: str) -> tuple[str, int, int]:
    """ "type nat hook prerouting priority dstnat; policy accept;" -> (type, hook, priority)."""
    words = base.replace(";", " ").split()
    try:
        kind = words[words.index("type") + 1]
        hook = HOOKS[words[words.index("hook") + 1]]
        rest = words[words.index("priority") + 1 :]
    except (ValueError, KeyError, IndexError) as err:
        raise Unsupported(f"chain {base!r}") from err
    value = NAMED_PRIORITIES.get(rest[0]) if rest else None
    if value is None:
        value = int(rest[0])
    elif len(rest) >= 3 and rest[1] in "+-" and rest[2].lstrip("-").isdigit():
        value += int(rest[2]) * (1 if rest[1] == "+" else -1)
    return kind, hook, value


@dataclass
class Batch:
    """A whole transaction as bytes, and what each message was (for errors)."""

    data: bytearray
    last_seq: int
    what: dict[int, Op]  # seq -> the plan step the message is part of (errors name it)
    messages: int = 0


class BatchEncoder:
    """NftPlan -> one netlink batch for the kproxy table of one family."""

    def __init__(self, family: str, rules: RuleEncoder | None = None, table: str = TABLE) -> None:
        self.family, self.table = family, table
        self.nfproto = m.NFPROTO[family]
        self.rules = rules or RuleEncoder(family)
        self.keys = KeyEncoder(family)
        self._table = m.strz(1, table)

    def batch(self, plan: NftPlan, first_seq: int, sets: dict[str, NftSet]) -> Batch:
        """`sets`: the declarations of the sets the plan's elements go to (the desired table's
        and the kernel's), for their key types."""
        out = bytearray(m.batch_begin(first_seq))
        seq = first_seq + 1
        what: dict[int, Op] = {}
        self._set_id = 0  # every new set has a batch id (the kernel requires one)
        anon_ids: list[int] = []
        last_at = 0
        header = _MSG_HEADER.pack
        family = self.nfproto
        rule_type = (m.NFNL_SUBSYS_NFTABLES << 8) | m.NFT_MSG_NEWRULE
        rule_flags = m.NLM_F_REQUEST | m.NLM_F_CREATE | m.NLM_F_APPEND
        table = self._table
        chain_name, chain_attr = None, b""
        encode = self.rules.encode
        for op in plan.ops:
            if op[0] == "rule":  # the bulk of a big transaction: inline
                if op[1] != chain_name:
                    chain_name, chain_attr = op[1], table + m.strz(m.NFTA_RULE_CHAIN, op[1])
                try:
                    enc = encode(op[2])
                except Unsupported:
                    raise
                except (ValueError, KeyError, IndexError) as err:
                    raise Unsupported(f"chain {op[1]} rule {op[2]!r}: {err}") from err
                exprs = enc.expressions
                if enc.anon:  # anonymous sets first: NEWSET and its elements, by batch id
                    for anon in enc.anon:
                        anon_ids.append(self._new_set_id())
                        for aflags, amsg, abody in _anon_messages(table, anon, anon_ids[-1]):
                            last_at = len(out)
                            out += m.message(amsg, aflags, seq, family, abody)
                            what[seq] = op
                            seq += 1
                    for n in anon_ids[-exprs.count(ANON_ID_ATTR) :]:
                        exprs = exprs.replace(ANON_ID_ATTR, m.u32(4, n), 1)
                n_exprs = 4 + len(exprs)
                last_at = len(out)
                out += header(
                    20 + len(chain_attr) + n_exprs,
                    rule_type,
                    rule_flags,
                    seq,
                    0,
                    family,
                    0,
                    _RES_ID,
                )
                out += chain_attr
                out += _ATTR.pack(n_exprs, m.NFTA_RULE_EXPRESSIONS)
                out += exprs
                what[seq] = op
                seq += 1
                continue
            for flags, msg, body in self._messages(op, sets):
                last_at = len(out)
                out += m.message(msg, flags, seq, family, body)
                what[seq] = op
                seq += 1
        if seq > first_seq + 1:
            # An ack of the last message: its answer tells the batch was read to the end.
            flags = struct.unpack_from("=H", out, last_at + 6)[0]
            struct.pack_into("=H", out, last_at + 6, flags | m.NLM_F_ACK)
        out += m.batch_end(seq)
        return Batch(out, seq - 1, what, seq - first_seq - 1)

    def _new_set_id(self) -> int:
        self._set_id += 1
        return self._set_id

    def _messages(self, op: Op, sets: dict[str, NftSet]) -> Iterator[tuple[int, int, bytes]]:
        """(flags, message type, body) of one plan step other than a rule."""
        kind = op[0]
        t = self._table
        create = m.NLM_F_CREATE
        if kind == "elements":
            _, verb, name, set_kind, items = op
            decl = sets.get(name)
            if decl is None:
                raise Unsupported(f"elements of an unknown set {name}")
            msg = m.NFT_MSG_NEWSETELEM if verb == "add" else m.NFT_MSG_DELSETELEM
            flags = create if verb == "add" else 0
            head = t + m.strz(m.NFTA_SET_ELEM_LIST_SET, name)
            key_of = self.keys.encoder(decl.type, decl.typeof)
            with_data = verb == "add" and set_kind == "map"
            chunk: list[bytes] = []
            size = 0
            for key, value in items:
                raw = key_of(key)
                element = m.attr(m.NFTA_SET_ELEM_KEY, m.attr(m.NFTA_DATA_VALUE, raw))
                if with_data:
                    element += _element_verdict(value or "")
                element = _ATTR.pack(4 + len(element), 1) + element
                if size + len(element) > ELEMENTS_PER_MESSAGE_BYTES:
                    yield flags, msg, head + m.attr(m.NFTA_SET_ELEM_LIST_ELEMENTS, b"".join(chunk))
                    chunk, size = [], 0
                chunk.append(element)
                size += len(element)
            if chunk:
                yield flags, msg, head + m.attr(m.NFTA_SET_ELEM_LIST_ELEMENTS, b"".join(chunk))
        elif kind == "chain":
            yield create, m.NFT_MSG_NEWCHAIN, t + _chain_attrs(op[1], op[2])
        elif kind == "flush":
            yield 0, m.NFT_MSG_DELRULE, t + m.strz(m.NFTA_RULE_CHAIN, op[1])
        elif kind == "delchain":
            yield 0, m.NFT_MSG_DELCHAIN, t + m.strz(m.NFTA_CHAIN_NAME, op[1])
        elif kind == "set":
            body = t + _set_attrs(self.family, op[1], op[2], self._new_set_id())
            yield create, m.NFT_MSG_NEWSET, body
        elif kind == "delset":
            yield 0, m.NFT_MSG_DELSET, t + m.strz(m.NFTA_SET_NAME, op[1])
        elif kind == "deltable":
            yield 0, m.NFT_MSG_DELTABLE, m.strz(m.NFTA_TABLE_NAME, self.table)
        elif kind == "table":
            comment = (op[1] or "").encode() + b"\0"
            udata = bytes([0, len(comment)]) + comment if op[1] else b""
            body = m.strz(m.NFTA_TABLE_NAME, self.table) + m.u32(m.NFTA_TABLE_FLAGS, 0)
            if udata:
                body += m.attr(m.NFTA_TABLE_USERDATA, udata)
            yield create, m.NFT_MSG_NEWTABLE, body
        else:
            raise Unsupported(f"plan step {kind!r}")

    def delete_table(self, first_seq: int) -> Batch:
        out = bytearray(m.batch_begin(first_seq))
        body = m.strz(m.NFTA_TABLE_NAME, self.table)
        out += m.message(m.NFT_MSG_DELTABLE, m.NLM_F_ACK, first_seq + 1, self.nfproto, body)
        out += m.batch_end(first_seq + 2)
        return Batch(out, first_seq + 1, {first_seq + 1: ("deltable",)}, 1)


def _chain_attrs(name: str, chain: NftChain) -> bytes:
    body = m.strz(m.NFTA_CHAIN_NAME, name)
    if chain.base:
        kind, hook, priority = priority_number(chain.base)
        body += m.strz(m.NFTA_CHAIN_TYPE, kind)
        body += m.attr(
            m.NFTA_CHAIN_HOOK,
            m.u32(m.NFTA_HOOK_HOOKNUM, hook) + m.u32(m.NFTA_HOOK_PRIORITY, priority),
        )
    if chain.comment:
        text = chain.comment.encode() + b"\0"
        body += m.attr(m.NFTA_CHAIN_USERDATA, bytes([0, len(text)]) + text)
    return body


def _set_attrs(family: str, name: str, s: NftSet, set_id: int) -> bytes:
    shape = set_shape(family, s)
    body = m.strz(m.NFTA_SET_NAME, name) + m.u32(m.NFTA_SET_FLAGS, shape.flags)
    body += m.u32(m.NFTA_SET_KEY_TYPE, shape.key_type) + m.u32(m.NFTA_SET_KEY_LEN, shape.key_len)
    if shape.data_type is not None:
        body += m.u32(m.NFTA_SET_DATA_TYPE, shape.data_type) + m.u32(m.NFTA_SET_DATA_LEN, 0)
    body += m.u32(m.NFTA_SET_ID, set_id)
    if shape.timeout_ms is not None:
        body += m.attr(m.NFTA_SET_TIMEOUT, shape.timeout_ms.to_bytes(8, "big"))
    return body + m.attr(m.NFTA_SET_USERDATA, shape.udata)


# An anonymous verdict map keyed by a numgen value, as nft 1.0.6 declares one: the key's
# byte order (host), the data's, the verdict's typeof, and no data interval.
_NUMGEN_MAP_UDATA = bytes.fromhex("00040100000001040000000004080004010000000100060400000000")
_NUMGEN_KEY_TYPE = 4  # nft's "integer"


def _anon_messages(table: bytes, anon: AnonSet, set_id: int) -> Iterator[tuple[int, int, bytes]]:
    if anon.is_map:
        yield from _anon_map_messages(table, anon, set_id)
        return
    fam = next(f for f in FAMILIES.values() if f.addr_len == anon.key_len)
    body = (
        table
        + m.strz(m.NFTA_SET_NAME, "__set%d")
        + m.u32(m.NFTA_SET_FLAGS, m.NFT_SET_ANONYMOUS | m.NFT_SET_CONSTANT | m.NFT_SET_INTERVAL)
        + m.u32(m.NFTA_SET_KEY_TYPE, fam.key_type)
        + m.u32(m.NFTA_SET_KEY_LEN, anon.key_len)
        + m.u32(m.NFTA_SET_ID, set_id)
        + m.attr(m.NFTA_SET_DESC, m.u32(m.NFTA_SET_DESC_SIZE, len(anon.elements)))
        + m.attr(m.NFTA_SET_USERDATA, fam.anon_set_udata)
    )
    yield m.NLM_F_CREATE, m.NFT_MSG_NEWSET, body
    elements = b"".join(
        m.attr(
            1,
            (m.u32(m.NFTA_SET_ELEM_FLAGS, m.NFT_SET_ELEM_INTERVAL_END) if end else b"")
            + m.attr(m.NFTA_SET_ELEM_KEY, m.attr(m.NFTA_DATA_VALUE, key)),
        )
        for key, end in anon.elements
    )
    yield _anon_elements_message(table, "__set%d", set_id, elements)


def _anon_map_messages(
    table: bytes, anon: AnonSet, set_id: int
) -> Iterator[tuple[int, int, bytes]]:
    """`numgen random mod N vmap { 0 : goto X, ... }`'s map, attributes in nft's order."""
    flags = m.NFT_SET_ANONYMOUS | m.NFT_SET_CONSTANT | m.NFT_SET_MAP
    body = (
        table
        + m.strz(m.NFTA_SET_NAME, "__map%d")
        + m.u32(m.NFTA_SET_FLAGS, flags)
        + m.u32(m.NFTA_SET_KEY_TYPE, _NUMGEN_KEY_TYPE)
        + m.u32(m.NFTA_SET_KEY_LEN, anon.key_len)
        + m.u32(m.NFTA_SET_DATA_TYPE, m.NFT_DATA_VERDICT)
        + m.u32(m.NFTA_SET_DATA_LEN, 0)
        + m.u32(m.NFTA_SET_ID, set_id)
        + m.attr(m.NFTA_SET_DESC, m.u32(m.NFTA_SET_DESC_SIZE, len(anon.elements)))
        + m.attr(m.NFTA_SET_USERDATA, _NUMGEN_MAP_UDATA)
    )
    yield m.NLM_F_CREATE, m.NFT_MSG_NEWSET, body
    elements = b"".join(
        m.attr(1, m.attr(m.NFTA_SET_ELEM_KEY, m.attr(m.NFTA_DATA_VALUE, key)) + _element_verdict(v))
        for (key, _), v in zip(anon.elements, anon.verdicts or [], strict=True)
    )
    yield _anon_elements_message(table, "__map%d", set_id, elements)


def _anon_elements_message(
    table: bytes, name: str, set_id: int, elements: bytes
) -> tuple[int, int, bytes]:
    """The elements of an anonymous set made in the same batch, which names it by its id."""
    body = (
        table
        + m.strz(m.NFTA_SET_ELEM_LIST_SET, name)
        + m.u32(m.NFTA_SET_ELEM_LIST_SET_ID, set_id)
        + m.attr(m.NFTA_SET_ELEM_LIST_ELEMENTS, elements)
    )
    return m.NLM_F_CREATE, m.NFT_MSG_NEWSETELEM, body
