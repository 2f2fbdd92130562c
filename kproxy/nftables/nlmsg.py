"""nf_tables netlink framing: constants, attributes, messages, batches; and parsing them back.

The numbers are the kernel's (include/uapi/linux/netfilter/nf_tables.h, nfnetlink.h,
linux/netlink.h). Attributes are packed with `struct` into bytes directly: at 10k Services a
transaction is 400k messages, and a general attribute encoder per message would cost more than
the kernel's own work. No I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

# linux/netlink.h
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

# linux/netfilter/nfnetlink.h
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11

# nf_tables.h: message types (the low byte; the subsystem is the high byte)
NFT_MSG_NEWTABLE = 0
NFT_MSG_GETTABLE = 1
NFT_MSG_DELTABLE = 2
NFT_MSG_NEWCHAIN = 3
NFT_MSG_GETCHAIN = 4
NFT_MSG_DELCHAIN = 5
NFT_MSG_NEWRULE = 6
NFT_MSG_GETRULE = 7
NFT_MSG_DELRULE = 8
NFT_MSG_NEWSET = 9
NFT_MSG_GETSET = 10
NFT_MSG_DELSET = 11
NFT_MSG_NEWSETELEM = 12
NFT_MSG_GETSETELEM = 13
NFT_MSG_DELSETELEM = 14
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16

# Attributes. Tables:
NFTA_TABLE_NAME = 1
NFTA_TABLE_FLAGS = 2
NFTA_TABLE_USERDATA = 6
# Chains:
NFTA_CHAIN_TABLE = 1
NFTA_CHAIN_NAME = 3
NFTA_CHAIN_HOOK = 4
NFTA_CHAIN_POLICY = 5
NFTA_CHAIN_TYPE = 7
NFTA_CHAIN_USERDATA = 12
NFTA_HOOK_HOOKNUM = 1
NFTA_HOOK_PRIORITY = 2
# Rules:
NFTA_RULE_TABLE = 1
NFTA_RULE_CHAIN = 2
NFTA_RULE_HANDLE = 3
NFTA_RULE_EXPRESSIONS = 4
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME = 1
NFTA_EXPR_DATA = 2
# Sets:
NFTA_SET_TABLE = 1
NFTA_SET_NAME = 2
NFTA_SET_FLAGS = 3
NFTA_SET_KEY_TYPE = 4
NFTA_SET_KEY_LEN = 5
NFTA_SET_DATA_TYPE = 6
NFTA_SET_DATA_LEN = 7
NFTA_SET_DESC = 9
NFTA_SET_ID = 10
NFTA_SET_TIMEOUT = 11
NFTA_SET_USERDATA = 13
NFTA_SET_DESC_SIZE = 1
NFT_SET_ANONYMOUS = 0x1
NFT_SET_CONSTANT = 0x2
NFT_SET_INTERVAL = 0x4
NFT_SET_MAP = 0x8
NFT_SET_TIMEOUT = 0x10
NFT_SET_EVAL = 0x20
NFT_DATA_VERDICT = 0xFFFFFF00
# Set elements:
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_SET_ELEM_LIST_SET_ID = 4
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_SET_ELEM_FLAGS = 3
NFT_SET_ELEM_INTERVAL_END = 0x1
# Data and verdicts:
NFTA_DATA_VALUE = 1
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CODE = 1
NFTA_VERDICT_CHAIN = 2
NF_DROP = 0
NF_ACCEPT = 1
NFT_CONTINUE = -1
NFT_BREAK = -2
NFT_JUMP = -3
NFT_GOTO = -4
NFT_RETURN = -5
# Generation:
NFTA_GEN_ID = 1
NFTA_GEN_PROC_PID = 2
NFTA_GEN_PROC_NAME = 3

NFPROTO = {"ip": 2, "ip6": 10, "inet": 1}

_HDR = struct.Struct("=IHHIIBBH")  # nlmsghdr + nfgenmsg
_ATTR = struct.Struct("=HH")
_U32 = struct.Struct(">I")


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes; a nest too (its payload the nested
    attributes), without NLA_F_NESTED, as the kernel writes its dumps."""
    n = 4 + len(payload)
    return _ATTR.pack(n, kind) + payload + b"\0" * (-n & 3)


def strz(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def u32(kind: int, value: int) -> bytes:
    return _ATTR.pack(8, kind) + _U32.pack(value & 0xFFFFFFFF)


def message(msg: int, flags: int, seq: int, family: int, body: bytes, res_id: int = 0) -> bytes:
    """One nf_tables message: nlmsghdr, nfgenmsg (version 0, res_id in network order), body."""
    return (
        _HDR.pack(
            20 + len(body),
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            flags | NLM_F_REQUEST,
            seq,
            0,
            family,
            0,
            ((res_id & 0xFF) << 8) | (res_id >> 8),
        )
        + body
    )


def batch_begin(seq: int) -> bytes:
    return _HDR.pack(
        20, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, 0, 0, NFNL_SUBSYS_NFTABLES << 8
    )


def batch_end(seq: int) -> bytes:
    return _HDR.pack(20, NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0, 0, 0, NFNL_SUBSYS_NFTABLES << 8)


# ---- parsing ----


def parse_attrs(buf: bytes | memoryview, start: int = 0, end: int | None = None) -> dict:
    """{type: payload bytes} of the attributes in buf[start:end] (the last of a repeated type
    wins; use iter_attrs for lists)."""
    return {kind: value for kind, value in iter_attrs(buf, start, end)}


def iter_attrs(
    buf: bytes | memoryview, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, bytes]]:
    end = len(buf) if end is None else end
    off = start
    unpack = _ATTR.unpack_from
    while off + 4 <= end:
        n, kind = unpack(buf, off)
        if n < 4:
            return
        yield kind & NLA_TYPE_MASK, bytes(buf[off + 4 : off + n])
        off += (n + 3) & ~3


def iter_messages(buf: bytes | memoryview) -> Iterator[tuple[int, int, int, int, bytes]]:
    """(type, flags, seq, sender's port id, payload after nlmsghdr) of each message in a
    received buffer."""
    off, end = 0, len(buf)
    unpack = struct.Struct("=IHHII").unpack_from
    while off + 16 <= end:
        n, kind, flags, seq, portid = unpack(buf, off)
        if n < 16:
            return
        yield kind, flags, seq, portid, bytes(buf[off + 16 : off + n])
        off += (n + 3) & ~3


def cstr(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode(errors="replace")


def be32(value: bytes) -> int:
    return _U32.unpack(value[:4])[0]
