"""The rules the renderer writes (kproxy.nftables.render) as nf_tables expressions.

Each rule is held in the text `nft list` prints; this module turns it into the expressions
nft 1.0.6 makes of that text (checked by the tests: a table written over netlink and the same
one written by `nft -f` list identically). The expressions are encoded in the form the kernel
dumps them back (attribute order, defaults spelled out, no nested flag), so that a rule read
from the kernel is compared with a desired one as bytes.

Speed: a rule's *shape* (its keywords, with addresses, ports and names taken out) is compiled
once into a template of constant bytes and small encoders; a rule is its template applied to
its values. 400k rules encode in seconds of Python. No I/O.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from kproxy.nftables import nlmsg as m


class Unsupported(ValueError):
    """A rule or declaration this encoder does not know (the nft datapath can still send it)."""


_U32 = struct.Struct(">I")
_HOST32 = struct.Struct("=I")
_ATTR = struct.Struct("=HH")

PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}

# Registers, as nft allocates them (NFT_REG_1 = 1, NFT_REG32_01 = 9, ...).
REG_VERDICT, REG_1, REG_2 = 0, 1, 2

NFT_META_MARK, NFT_META_IIFNAME, NFT_META_L4PROTO = 3, 6, 16
IFNAMSIZ = 16
NFT_PAYLOAD_NETWORK, NFT_PAYLOAD_TRANSPORT = 1, 2
NFT_CMP_EQ, NFT_CMP_NEQ = 0, 1
NFT_LOOKUP_F_INV = 1
NFT_NG_RANDOM = 1
NFT_FIB_RESULT_ADDRTYPE = 3
NFTA_FIB_F_SADDR, NFTA_FIB_F_DADDR = 1, 2
RTN_LOCAL = 2
NFT_CT_STATE = 0
IP_CT_NEW_BIT = 8
NFT_DYNSET_OP_UPDATE = 1
NFT_NAT_DNAT = 1
NF_NAT_RANGE_MAP_IPS = 1
NF_NAT_RANGE_PROTO_SPECIFIED = 2
NF_NAT_RANGE_PROTO_RANDOM_FULLY = 0x10


# Nests are written with nlmsg.attr too: as the kernel dumps them, without NLA_F_NESTED.
_a, _u32, _str = m.attr, m.u32, m.strz


def _expr(name: str, *data: bytes) -> bytes:
    return _a(m.NFTA_LIST_ELEM, _str(m.NFTA_EXPR_NAME, name) + _a(m.NFTA_EXPR_DATA, b"".join(data)))


def _value(kind: int, raw: bytes) -> bytes:
    return _a(kind, _a(m.NFTA_DATA_VALUE, raw))


def verdict_data(verdict: str) -> bytes:
    """NFTA_DATA_VERDICT of `drop`, `accept`, `return`, `jump X`, `goto X`."""
    word, _, chain = verdict.partition(" ")
    if word == "drop":
        return _a(m.NFTA_DATA_VERDICT, _u32(m.NFTA_VERDICT_CODE, m.NF_DROP))
    if word == "accept":
        return _a(m.NFTA_DATA_VERDICT, _u32(m.NFTA_VERDICT_CODE, m.NF_ACCEPT))
    if word == "return":
        return _a(m.NFTA_DATA_VERDICT, _u32(m.NFTA_VERDICT_CODE, m.NFT_RETURN))
    if word in ("jump", "goto") and chain:
        code = m.NFT_JUMP if word == "jump" else m.NFT_GOTO
        return _a(
            m.NFTA_DATA_VERDICT,
            _u32(m.NFTA_VERDICT_CODE, code) + _str(m.NFTA_VERDICT_CHAIN, chain),
        )
    raise Unsupported(f"verdict {verdict!r}")


# ---- expressions (kernel dump form) ----


def meta_load(key: int, reg: int) -> bytes:
    return _expr("meta", _u32(2, key), _u32(1, reg))


def meta_set(key: int, reg: int) -> bytes:
    return _expr("meta", _u32(2, key), _u32(3, reg))


def payload(base: int, offset: int, length: int, reg: int = REG_1) -> bytes:
    return _expr("payload", _u32(1, reg), _u32(2, base), _u32(3, offset), _u32(4, length))


def bitwise(mask: bytes, xor: bytes, reg: int = REG_1) -> bytes:
    return _expr(
        "bitwise",
        _u32(1, reg),
        _u32(2, reg),
        _u32(3, len(mask)),
        _u32(6, 0),
        _value(4, mask),
        _value(5, xor),
    )


def cmp(op: int, data: bytes, reg: int = REG_1) -> bytes:
    return _expr("cmp", _u32(1, reg), _u32(2, op), _value(3, data))


def lookup(
    set_name: str, reg: int = REG_1, dreg: int | None = None, flags: int = 0, set_id: int = -1
) -> bytes:
    parts = [_str(1, set_name), _u32(2, reg)]
    if set_id >= 0:
        parts.insert(1, _u32(4, set_id))
    if dreg is not None:
        parts.append(_u32(3, dreg))
    parts.append(_u32(5, flags))
    return _expr("lookup", *parts)


def immediate_verdict(verdict: str) -> bytes:
    return _expr("immediate", _u32(1, REG_VERDICT), _a(2, verdict_data(verdict)))


def immediate_value(reg: int, raw: bytes) -> bytes:
    return _expr("immediate", _u32(1, reg), _value(2, raw))


class Hole:
    """An encoding with one name left open (a chain or set name, a string attribute): built
    once around a sentinel name, then filled in with the lengths of the attributes around it
    corrected. Filling costs a copy and a few packs instead of building every attribute."""

    SENTINEL = "\x01" * 8

    def __init__(self, build: Callable[[str], bytes]) -> None:
        t = build(self.SENTINEL)
        start = t.index(self.SENTINEL.encode()) - 4
        self.size = (4 + len(self.SENTINEL) + 1 + 3) & ~3  # the sentinel attribute, padded
        self.kind = _ATTR.unpack_from(t, start)[1]
        self.pre, self.post = t[:start], t[start + self.size :]
        self.fixups: list[tuple[int, int]] = []  # (offset, length) of the enclosing attributes
        off, end = 0, start
        while off < end:
            n = _ATTR.unpack_from(t, off)[0]
            if off + n > start:  # encloses the name: correct it, and look inside
                self.fixups.append((off, n))
                off += 4
            else:
                off += (n + 3) & ~3

    def fill(self, name: str) -> bytes:
        nb = name.encode() + b"\0"
        n = 4 + len(nb)
        pad = -n & 3
        delta = n + pad - self.size
        pre = bytearray(self.pre)
        for off, length in self.fixups:
            _LEN.pack_into(pre, off, length + delta)
        return b"".join((pre, _ATTR.pack(n, self.kind), nb, _PAD[pad], self.post))


class Slot:
    """An encoding with one fixed-size value left open (an address, a port)."""

    def __init__(self, build: Callable[[bytes], bytes], size: int) -> None:
        sentinel = bytes([0xA5]) * size
        t = build(sentinel)
        at = t.index(sentinel)
        self.pre, self.post = t[:at], t[at + size :]

    def fill(self, raw: bytes) -> bytes:
        return self.pre + raw + self.post


_LEN = struct.Struct("=H")
_PAD = (b"", b"\0", b"\0\0", b"\0\0\0")


# ---- rule shapes ----

# Words of the rule grammar the renderer writes; every other token is a value (an address,
# port, name, mark) and is patched into the shape's template.
KEYWORDS = frozenset(
    """ip ip6 saddr daddr meta l4proto th dport vmap . != == & | ^ fib type local ct state new
    jump goto return drop accept reject masquerade fully-random numgen random mod update { }
    dnat to tcp udp sctp mark set iifname""".split()
)

# A template piece: constant bytes, or (encoder, value index[, value index]).
Piece = bytes | tuple
# The NFTA_LOOKUP_SET_ID of an anonymous set's lookup until the batch numbers the set.
ANON_ID = 0xFFFFFFFF
ANON_ID_ATTR = _u32(4, ANON_ID)


@dataclass
class _Family:
    name: str  # "ip" / "ip6"
    nfproto: int
    addr_len: int
    saddr: int  # offsets in the network header
    daddr: int
    reject_code: int  # ICMP port unreachable / ICMPv6 port unreachable
    concat_proto_reg: int  # where `meta l4proto` goes after an address in a concatenation
    concat_port_reg: int
    anon_set_udata: bytes  # an anonymous set of `<ip> saddr`, as nft describes it

    def addr(self, text: str) -> bytes:
        if self.addr_len == 4:
            raw = bytes(map(int, text.split(".")))  # several times faster than ipaddress
            if len(raw) != 4:
                raise ValueError(f"not an IPv4 address: {text!r}")
            return raw
        return ipaddress.IPv6Address(text).packed

    def text(self, raw: bytes) -> str:
        if self.addr_len == 4:
            return ".".join(map(str, raw[:4]))
        return str(ipaddress.IPv6Address(raw[:16]))

    @property
    def key_type(self) -> int:
        return 8 if self.addr_len == 16 else 7


FAMILIES = {
    "ip": _Family(
        "ip",
        2,
        4,
        12,
        16,
        3,
        9,
        10,
        bytes.fromhex("0004020000000204010000000314000407000000010c00040c00000001040b000000"),
    ),
    "ip6": _Family(
        "ip6",
        10,
        16,
        8,
        24,
        4,
        2,
        13,
        bytes.fromhex("0004020000000204010000000314000407000000010c00040d000000010408000000"),
    ),
}


@dataclass
class AnonSet:
    """An anonymous set a rule uses, created in the same batch: an interval set of addresses
    (nft's `{ a, b/24 }`), or a verdict map of numgen values (`vmap { 0 : goto X }`)."""

    key_len: int
    elements: list[tuple[bytes, bool]]  # (key, is an interval's end)
    verdicts: list[str] | None = None  # a verdict map's: each element's verdict, in order

    @property
    def is_map(self) -> bool:
        return self.verdicts is not None

    def contents(self) -> list[tuple[bytes, bool, str | None]]:
        """(key, interval end, verdict or None) of every element, in key order: what a rule
        read back is compared on, beside its expressions."""
        verdicts = self.verdicts or [None] * len(self.elements)
        return sorted((k, end, v) for (k, end), v in zip(self.elements, verdicts, strict=True))


@dataclass
class Encoded:
    """One rule's expressions, and the anonymous sets they need (rare: source ranges)."""

    expressions: bytes
    anon: list[AnonSet] = field(default_factory=list)


def _intervals(fam: _Family, items: list[str]) -> list[tuple[bytes, bool]]:
    """Addresses and prefixes as nft 1.0.6 sends an interval set: merged ranges, each a start
    and an end one past it, and an end at zero first when the first range does not start
    there."""
    bits = fam.addr_len * 8
    ranges = []
    for item in items:
        net = ipaddress.ip_network(item.rstrip(","), strict=False)
        ranges.append((int(net.network_address), int(net.broadcast_address) + 1))
    ranges.sort()
    merged: list[list[int]] = []
    for start, end in ranges:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out: list[tuple[bytes, bool]] = []
    if merged[0][0] != 0:
        out.append((bytes(fam.addr_len), True))
    for start, end in merged:
        out.append((start.to_bytes(fam.addr_len, "big"), False))
        if end < 1 << bits:
            out.append((end.to_bytes(fam.addr_len, "big"), True))
    return out


class RuleEncoder:
    """Rule text -> expressions, for one family. Templates are cached per shape."""

    def __init__(self, family: str) -> None:
        self.fam = FAMILIES[family]
        self._templates: dict[tuple, Callable[[list[str]], bytes]] = {}

    def encode(self, text: str) -> Encoded:
        tokens = text.split()
        if "{" in tokens and tokens[0] != "update":
            return self._compile(tokens, anon=True)  # type: ignore[return-value]
        # A set reference and an address are different shapes (a lookup, a comparison).
        key = tuple(t if t in KEYWORDS else t[0] == "@" for t in tokens)
        template = self._templates.get(key)
        if template is None:
            template = self._templates[key] = self._compile(tokens)
        return Encoded(template([t for t in tokens if t not in KEYWORDS]))

    def expressions(self, text: str) -> bytes:
        return self.encode(text).expressions

    # The compiler: walks the tokens of one rule once, and returns a function of the rule's
    # values (the tokens that are not keywords, in order).
    def _compile(self, tokens: list[str], anon: bool = False):  # noqa: C901 - one grammar
        fam = self.fam
        pieces: list[Piece] = []
        anon_sets: list[AnonSet] = []
        values = 0  # index of the next value token
        i = 0

        def take() -> int:
            nonlocal values
            values += 1
            return values - 1

        def peek(k: int) -> str | None:
            return tokens[k] if k < len(tokens) else None

        while i < len(tokens):
            t = tokens[i]
            if t in ("ip", "ip6") and peek(i + 1) in ("saddr", "daddr"):
                if t != fam.name:
                    raise Unsupported(f"{t} match in an {fam.name} table")
                offset = fam.saddr if tokens[i + 1] == "saddr" else fam.daddr
                i += 2
                if peek(i) == ".":  # ip daddr . meta l4proto . th dport vmap @map
                    shape = tokens[i : i + 8]
                    if shape != [".", "meta", "l4proto", ".", "th", "dport", "vmap", shape[-1]]:
                        raise Unsupported(" ".join(tokens))
                    pieces.append(
                        payload(NFT_PAYLOAD_NETWORK, offset, fam.addr_len)
                        + meta_load(NFT_META_L4PROTO, fam.concat_proto_reg)
                        + payload(NFT_PAYLOAD_TRANSPORT, 2, 2, fam.concat_port_reg)
                    )
                    pieces.append((_vmap_lookup, take()))
                    i += 8
                    continue
                op = NFT_CMP_EQ
                if peek(i) == "!=":
                    op = NFT_CMP_NEQ
                    i += 1
                if peek(i) == "{":
                    end = tokens.index("}", i)
                    items = tokens[i + 1 : end]
                    for _ in items:
                        take()
                    anon_sets.append(AnonSet(fam.addr_len, _intervals(fam, items)))
                    flags = NFT_LOOKUP_F_INV if op == NFT_CMP_NEQ else 0
                    pieces.append(
                        payload(NFT_PAYLOAD_NETWORK, offset, fam.addr_len)
                        + lookup("__set%d", flags=flags, set_id=ANON_ID)
                    )
                    i = end + 1
                    continue
                v = tokens[i]
                if v.startswith("@"):
                    if op != NFT_CMP_EQ:
                        raise Unsupported(" ".join(tokens))
                    pieces.append(payload(NFT_PAYLOAD_NETWORK, offset, fam.addr_len))
                    pieces.append((_set_lookup, take()))
                else:
                    pieces.append((_addr_match(fam, offset, op), take()))
                i += 1
            elif t == "meta" and peek(i + 1) == "l4proto":
                if peek(i + 2) == ".":  # meta l4proto . th dport vmap @map
                    if tokens[i + 3 : i + 6] != ["th", "dport", "vmap"]:
                        raise Unsupported(" ".join(tokens))
                    pieces.append(
                        meta_load(NFT_META_L4PROTO, REG_1) + payload(NFT_PAYLOAD_TRANSPORT, 2, 2, 9)
                    )
                    pieces.append((_vmap_lookup, take()))
                    i += 7
                    continue
                proto = PROTOCOLS.get(peek(i + 2) or "")
                if proto is None:
                    raise Unsupported(" ".join(tokens))
                pieces.append(meta_load(NFT_META_L4PROTO, REG_1) + cmp(NFT_CMP_EQ, bytes([proto])))
                i += 3
            elif t in PROTOCOLS and peek(i + 1) == "dport":
                pieces.append(
                    meta_load(NFT_META_L4PROTO, REG_1)
                    + cmp(NFT_CMP_EQ, bytes([PROTOCOLS[t]]))
                    + payload(NFT_PAYLOAD_TRANSPORT, 2, 2)
                )
                pieces.append((_port_cmp, take()))
                i += 3
            elif t == "iifname":  # iifname [!=] "cni0" / "veth*" (--detect-local-mode)
                op = NFT_CMP_NEQ if peek(i + 1) == "!=" else NFT_CMP_EQ
                i += 2 if op == NFT_CMP_NEQ else 1
                pieces.append((_iifname_match(op), take()))
                i += 1
            elif t == "fib" and tokens[i + 2 : i + 4] == ["type", "local"]:
                flag = NFTA_FIB_F_SADDR if tokens[i + 1] == "saddr" else NFTA_FIB_F_DADDR
                pieces.append(
                    _expr("fib", _u32(1, REG_1), _u32(2, NFT_FIB_RESULT_ADDRTYPE), _u32(3, flag))
                    + cmp(NFT_CMP_EQ, _HOST32.pack(RTN_LOCAL))
                )
                i += 4
            elif tokens[i : i + 3] == ["ct", "state", "new"]:
                pieces.append(
                    _expr("ct", _u32(1, REG_1), _u32(2, NFT_CT_STATE))
                    + bitwise(_HOST32.pack(IP_CT_NEW_BIT), bytes(4))
                    + cmp(NFT_CMP_NEQ, bytes(4))
                )
                i += 3
            elif tokens[i : i + 3] == ["meta", "mark", "&"]:
                # meta mark & M == V
                if peek(i + 4) != "==":
                    raise Unsupported(" ".join(tokens))
                pieces.append((_mark_test, take(), take()))
                i += 6
            elif tokens[i : i + 5] == ["meta", "mark", "set", "meta", "mark"]:
                op_token = peek(i + 5)
                if op_token not in ("|", "^"):
                    raise Unsupported(" ".join(tokens))
                pieces.append((_mark_or if op_token == "|" else _mark_xor, take()))
                i += 7
            elif tokens[i : i + 3] == ["numgen", "random", "mod"]:
                if peek(i + 4) != "vmap":
                    raise Unsupported(" ".join(tokens))
                if peek(i + 5) == "{":  # upstream's inline form: an anonymous verdict map
                    modulus = int(tokens[i + 3])
                    end = tokens.index("}", i)
                    anon_sets.append(_numgen_map(tokens[i + 6 : end], " ".join(tokens)))
                    for tok in tokens[i + 3 : end + 1]:
                        if tok not in KEYWORDS:
                            take()
                    pieces.append(_NUMGEN.fill(_U32.pack(modulus)) + _ANON_VMAP)
                    i = end + 1
                    continue
                pieces.append((_numgen_vmap, take(), take()))
                i += 6
            elif t == "update" and tokens[i + 2 : i + 6] == ["{", fam.name, "saddr", "}"]:
                pieces.append(payload(NFT_PAYLOAD_NETWORK, fam.saddr, fam.addr_len))
                pieces.append((_dynset_update, take()))
                i += 6
            elif tokens[i : i + 2] == ["dnat", "to"]:
                pieces.append((_dnat(fam), take()))
                i += 3
            elif tokens[i : i + 2] == ["masquerade", "fully-random"]:
                pieces.append(_expr("masq", _u32(1, NF_NAT_RANGE_PROTO_RANDOM_FULLY)))
                i += 2
            elif t == "reject" and i == len(tokens) - 1:
                pieces.append(_expr("reject", _u32(1, 0), _a(2, bytes([fam.reject_code]))))
                i += 1
            elif t in ("jump", "goto") and i == len(tokens) - 2:
                pieces.append((_jump if t == "jump" else _goto, take()))
                i += 2
            elif t in ("return", "drop", "accept") and i == len(tokens) - 1:
                pieces.append(immediate_verdict(t))
                i += 1
            else:
                raise Unsupported(f"rule {' '.join(tokens)!r} (at {t!r})")

        if anon:
            vals = [tok for tok in tokens if tok not in KEYWORDS]
            return Encoded(_run(pieces, vals), anon_sets)
        frozen = tuple(pieces)
        return lambda vals: _run(frozen, vals)


def _run(pieces, vals: list[str]) -> bytes:
    out = []
    for p in pieces:
        if type(p) is bytes:
            out.append(p)
        elif len(p) == 2:
            out.append(p[0](vals[p[1]]))
        else:
            out.append(p[0](vals[p[1]], vals[p[2]]))
    return b"".join(out)


_VMAP = Hole(lambda n: lookup(n, REG_1, REG_VERDICT))
# The lookup of an anonymous verdict map, by name pattern and batch id (as nft sends it).
_ANON_VMAP = lookup("__map%d", REG_1, REG_VERDICT, set_id=ANON_ID)
_LOOKUP = Hole(lambda n: lookup(n, REG_1))
_PORT = Slot(lambda raw: cmp(NFT_CMP_EQ, raw), 2)
_JUMP = Hole(lambda n: immediate_verdict("jump " + n))
_GOTO = Hole(lambda n: immediate_verdict("goto " + n))
_DYNSET = Hole(
    lambda n: _expr(
        "dynset",
        _u32(4, REG_1),
        _u32(3, NFT_DYNSET_OP_UPDATE),
        _str(1, n),
        _a(6, bytes(8)),
        _u32(9, 0),
    )
)
_NUMGEN = Slot(
    lambda raw: _expr("numgen", _u32(1, REG_1), _a(2, raw), _u32(3, NFT_NG_RANDOM), _u32(4, 0)),
    4,
)


def _vmap_lookup(v: str) -> bytes:
    return _VMAP.fill(v[1:])


def _set_lookup(v: str) -> bytes:
    return _LOOKUP.fill(v[1:])


def _port_cmp(v: str) -> bytes:
    return _PORT.fill(int(v).to_bytes(2, "big"))


def _jump(v: str) -> bytes:
    return _JUMP.fill(v)


def _goto(v: str) -> bytes:
    return _GOTO.fill(v)


def _mark_test(mask: str, value: str) -> bytes:
    return (
        meta_load(NFT_META_MARK, REG_1)
        + bitwise(_HOST32.pack(int(mask, 0)), bytes(4))
        + cmp(NFT_CMP_EQ, _HOST32.pack(int(value, 0)))
    )


def _mark_or(bits: str) -> bytes:
    b = int(bits, 0)
    return (
        meta_load(NFT_META_MARK, REG_1)
        + bitwise(_HOST32.pack(~b & 0xFFFFFFFF), _HOST32.pack(b))
        + meta_set(NFT_META_MARK, REG_1)
    )


def _mark_xor(bits: str) -> bytes:
    return (
        meta_load(NFT_META_MARK, REG_1)
        + bitwise(b"\xff\xff\xff\xff", _HOST32.pack(int(bits, 0)))
        + meta_set(NFT_META_MARK, REG_1)
    )


def _numgen_vmap(modulus: str, name: str) -> bytes:
    return _NUMGEN.fill(_U32.pack(int(modulus))) + _VMAP.fill(name[1:])


def _numgen_map(arms: list[str], rule: str) -> AnonSet:
    """`0 : goto X, 1 : goto Y` -> the anonymous map's elements: a numgen value is a 32-bit
    integer in host byte order."""
    words = " ".join(arms).split(",")
    keys: list[tuple[bytes, bool]] = []
    verdicts: list[str] = []
    for arm in words:
        key, sep, verdict = arm.strip().partition(" : ")
        if not sep or not key.isdigit() or verdict.split(" ")[0] not in ("goto", "jump"):
            raise Unsupported(f"rule {rule!r} (arm {arm.strip()!r})")
        keys.append((_HOST32.pack(int(key)), False))
        verdicts.append(verdict)
    return AnonSet(4, keys, verdicts)


def _dynset_update(name: str) -> bytes:
    return _DYNSET.fill(name[1:])


def _iifname_match(op: int) -> Callable[[str], bytes]:
    """As nft writes it: a name compares all IFNAMSIZ bytes (NUL-padded); a wildcard `x*`
    compares only the bytes of its prefix."""

    def encode(v: str) -> bytes:
        name = v.strip('"')
        raw = name.removesuffix("*").encode()
        if not raw or len(raw) >= IFNAMSIZ:
            raise Unsupported(f"interface name {v}")
        if not name.endswith("*"):
            raw = raw.ljust(IFNAMSIZ, b"\0")
        return meta_load(NFT_META_IIFNAME, REG_1) + cmp(op, raw)

    return encode


def _addr_match(fam: _Family, offset: int, op: int) -> Callable[[str], bytes]:
    """`ip saddr [!=] A` or `A/len`, as nft optimises it: a prefix on a byte boundary loads
    only its bytes; another prefix loads the address and masks it."""

    plain = Slot(
        lambda raw: payload(NFT_PAYLOAD_NETWORK, offset, fam.addr_len) + cmp(op, raw),
        fam.addr_len,
    )
    prefixes: dict[str, bytes] = {}  # the same few CIDRs recur in every Service's rules

    def encode(v: str) -> bytes:
        if "/" not in v:
            return plain.fill(fam.addr(v))
        known = prefixes.get(v)
        if known is None:
            known = prefixes[v] = prefix(v)
        return known

    def prefix(v: str) -> bytes:
        addr, _, plen_text = v.partition("/")
        plen = int(plen_text)
        raw = fam.addr(addr)
        if plen == fam.addr_len * 8:
            return payload(NFT_PAYLOAD_NETWORK, offset, fam.addr_len) + cmp(op, raw)
        if plen % 8 == 0:
            n = plen // 8
            return payload(NFT_PAYLOAD_NETWORK, offset, n) + cmp(op, raw[:n])
        mask = ((1 << plen) - 1) << (fam.addr_len * 8 - plen)
        mask_bytes = mask.to_bytes(fam.addr_len, "big")
        net = bytes(a & b for a, b in zip(raw, mask_bytes, strict=True))
        return (
            payload(NFT_PAYLOAD_NETWORK, offset, fam.addr_len)
            + bitwise(mask_bytes, bytes(fam.addr_len))
            + cmp(op, net)
        )

    return encode


def _dnat(fam: _Family) -> Callable[[str], bytes]:
    addr_slot = Slot(lambda raw: immediate_value(REG_1, raw), fam.addr_len)
    port_slot = Slot(lambda raw: immediate_value(REG_2, raw), 2)
    nat = _expr(
        "nat",
        _u32(1, NFT_NAT_DNAT),
        _u32(2, fam.nfproto),
        _u32(3, REG_1),
        _u32(4, REG_1),
        _u32(5, REG_2),
        _u32(6, REG_2),
        _u32(7, NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED),
    )

    def encode(v: str) -> bytes:
        addr, _, port = v.rpartition(":")
        return (
            addr_slot.fill(fam.addr(addr.strip("[]")))
            + port_slot.fill(int(port).to_bytes(2, "big"))
            + nat
        )

    return encode
