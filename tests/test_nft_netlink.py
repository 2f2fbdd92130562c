"""The netlink datapath's encoder without a kernel: rule shapes, templates, intervals, keys,
the batch's framing. (tests/test_kernel_nft_netlink.py holds it against nft and the kernel.)"""

from __future__ import annotations

import struct

import pytest

from kproxy.model import build_state
from kproxy.nftables import nlmsg as m
from kproxy.nftables.nlencode import BatchEncoder, KeyEncoder
from kproxy.nftables.nlrules import (
    ANON_ID,
    FAMILIES,
    Hole,
    RuleEncoder,
    Unsupported,
    _intervals,
    immediate_verdict,
    lookup,
)
from kproxy.nftables.plan import plan_table
from kproxy.nftables.render import NFT_IPV4, NFT_IPV6, render_nft
from kproxy.nftables.table import NftSet
from tests import nft_shapes


def expressions(encoded: bytes) -> list[tuple[str, dict[int, bytes]]]:
    """(name, {attribute: value}) of each expression of a rule's encoding."""
    out = []
    for _, element in m.iter_attrs(encoded):
        a = m.parse_attrs(element)
        out.append((m.cstr(a[m.NFTA_EXPR_NAME]), m.parse_attrs(a[m.NFTA_EXPR_DATA])))
    return out


def shapes_table(fam, config="masks"):
    state, warnings = build_state(nft_shapes.objects())
    assert warnings == []
    return render_nft(
        state, nft_shapes.CONFIGS[config], fam, **nft_shapes.OPTIONS.get(config, {})
    ).table


@pytest.mark.parametrize("fam", [NFT_IPV4, NFT_IPV6])
@pytest.mark.parametrize("config", sorted(nft_shapes.CONFIGS))
def test_every_rule_the_renderer_writes_encodes(fam, config):
    table = shapes_table(fam, config)
    enc = RuleEncoder(fam.name)
    rules = [r for c in table.chains.values() for r in c.rules]
    assert len(rules) > 60
    for rule in rules:
        assert enc.encode(rule).expressions, rule


def test_a_set_reference_and_an_address_are_different_shapes():
    # Same keywords, one value each: the template of the first must not serve the second
    # (it once did, and `ip saddr 10.0.0.0/9 goto X` became a lookup of set "0.0.0.0/9").
    enc = RuleEncoder("ip")
    by_set = expressions(enc.expressions("ip saddr @affinity-x goto endpoint-x"))
    by_cidr = expressions(enc.expressions("ip saddr 10.0.0.0/9 goto service-x"))
    assert [n for n, _ in by_set] == ["payload", "lookup", "immediate"]
    assert [n for n, _ in by_cidr] == ["payload", "bitwise", "cmp", "immediate"]
    assert by_set[1][1][1] == b"affinity-x\0"


def test_templates_patch_in_each_rules_own_values():
    enc = RuleEncoder("ip")
    one = expressions(enc.expressions("meta l4proto tcp dnat to 10.0.0.1:8080"))
    two = expressions(enc.expressions("meta l4proto tcp dnat to 10.9.8.7:53"))
    data = lambda e: m.parse_attrs(e[1][2])[m.NFTA_DATA_VALUE]  # noqa: E731
    assert (data(one[2]), data(one[3])) == (bytes([10, 0, 0, 1]), (8080).to_bytes(2, "big"))
    assert (data(two[2]), data(two[3])) == (bytes([10, 9, 8, 7]), (53).to_bytes(2, "big"))


def test_prefixes_on_a_byte_boundary_load_only_their_bytes():
    enc = RuleEncoder("ip")
    short = expressions(enc.expressions("ip saddr 10.0.0.0/8 goto x"))
    assert short[0][0] == "payload" and m.be32(short[0][1][4]) == 1  # one byte loaded
    assert m.parse_attrs(short[1][1][3])[m.NFTA_DATA_VALUE] == b"\x0a"
    masked = expressions(enc.expressions("ip saddr != 203.0.113.0/25 drop"))
    assert [n for n, _ in masked] == ["payload", "bitwise", "cmp", "immediate"]
    assert m.parse_attrs(masked[1][1][4])[m.NFTA_DATA_VALUE] == bytes([255, 255, 255, 128])
    assert m.be32(masked[2][1][2]) == 1  # NFT_CMP_NEQ


@pytest.mark.parametrize("name", ["s", "service-ABCDEFGH-ns/x/tcp/p", "e" * 239])
def test_a_filled_name_keeps_every_length_around_it_right(name):
    hole = Hole(lambda n: immediate_verdict("goto " + n))
    assert hole.fill(name) == immediate_verdict("goto " + name)
    vmap = Hole(lambda n: lookup(n, 1, 0))
    assert vmap.fill(name) == lookup(name, 1, 0)


def test_unknown_rules_are_refused_for_the_nft_datapath_to_take():
    enc = RuleEncoder("ip")
    for rule in ("counter", "ip saddr 10.0.0.1 counter accept", "ip6 saddr ::1 drop"):
        with pytest.raises(Unsupported):
            enc.encode(rule)


def test_intervals_are_merged_as_nft_sends_them():
    fam = FAMILIES["ip"]
    got = _intervals(fam, ["203.0.113.0/25,", "192.168.0.0/24,", "192.168.1.0/24", "5.6.7.9"])
    assert got == [
        (bytes(4), True),  # nothing below the first range
        (bytes([5, 6, 7, 9]), False),
        (bytes([5, 6, 7, 10]), True),
        (bytes([192, 168, 0, 0]), False),  # two adjacent /24s: one range
        (bytes([192, 168, 2, 0]), True),
        (bytes([203, 0, 113, 0]), False),
        (bytes([203, 0, 113, 128]), True),
    ]
    # A range from zero needs no leading end; one to the top has no end.
    assert _intervals(fam, ["0.0.0.0/1", "255.0.0.0/8"]) == [
        (bytes(4), False),
        (bytes([128, 0, 0, 0]), True),
        (bytes([255, 0, 0, 0]), False),
    ]


@pytest.mark.parametrize(
    "family,set_type,key",
    [
        ("ip", "ipv4_addr . inet_proto . inet_service : verdict", "10.96.0.1 . udp . 53"),
        ("ip6", "ipv6_addr . inet_proto . inet_service : verdict", "fd00::1 . sctp . 443"),
        ("ip", "inet_proto . inet_service : verdict", "tcp . 30080"),
        ("ip", "ipv4_addr", "192.168.0.2"),
        ("ip6", "ipv6_addr", "2001:db8::1"),
    ],
)
def test_keys_round_trip(family, set_type, key):
    keys = KeyEncoder(family)
    raw = keys.encode(set_type, False, key)
    assert keys.decode(len(raw), False, raw) == key
    assert keys.decode(4, True, keys.encode("", True, "7")) == "7"


def _messages(batch: bytes) -> list[tuple[int, int, int, bytes]]:
    return [(kind, flags, seq, body) for kind, flags, seq, _port, body in m.iter_messages(batch)]


def test_a_batch_is_framed_and_numbered_and_acks_only_its_last_message():
    table = shapes_table(NFT_IPV4)
    plan = plan_table(table, None)
    batch = BatchEncoder("ip").batch(plan, 1000, table.sets)
    msgs = _messages(bytes(batch.data))
    assert msgs[0][0] == m.NFNL_MSG_BATCH_BEGIN and msgs[-1][0] == m.NFNL_MSG_BATCH_END
    assert [seq for _, _, seq, _ in msgs] == list(range(1000, 1000 + len(msgs)))
    acked = [seq for _, flags, seq, _ in msgs if flags & m.NLM_F_ACK]
    assert acked == [batch.last_seq] == [msgs[-2][2]]
    # Every NEWSET has a batch id (the kernel refuses one without); the anonymous sets'
    # ids are patched into the rules that use them.
    set_ids = []
    for kind, _, _, payload in msgs:
        if kind == (m.NFNL_SUBSYS_NFTABLES << 8) | m.NFT_MSG_NEWSET:
            set_ids.append(m.be32(m.parse_attrs(payload, 4)[m.NFTA_SET_ID]))
    anonymous = sum("{ " in r for c in table.chains.values() for r in c.rules if "update" not in r)
    assert anonymous >= 1
    assert len(set_ids) == len(set(set_ids)) == len(table.sets) + anonymous
    assert struct.pack("=HH", 8, 4) + struct.pack(">I", ANON_ID) not in bytes(batch.data)


def test_dynamic_sets_are_declared_after_the_others():
    table = shapes_table(NFT_IPV4)
    declared = [op[2] for op in plan_table(table, None).ops if op[0] == "set"]
    kinds = [s.dynamic for s in declared]
    assert kinds == sorted(kinds) and kinds[-1] and not kinds[0]


def test_elements_go_in_messages_under_64k():
    # An attribute's length is 16 bits: thousands of elements are cut into several messages.
    s = NftSet("map", "ipv4_addr . inet_proto . inet_service : verdict")
    items = [
        (f"10.96.{i // 250}.{i % 250} . tcp . 80", f"goto service-{'x' * 60}-{i}")
        for i in range(5000)
    ]
    from kproxy.nftables.plan import NftPlan

    plan = NftPlan("ip", ops=[("elements", "add", "service-ips", "map", items)])
    batch = BatchEncoder("ip").batch(plan, 1, {"service-ips": s})
    msgs = _messages(bytes(batch.data))[1:-1]
    assert len(msgs) > 5
    count = 0
    for _, _, _, payload in msgs:
        a = m.parse_attrs(payload, 4)
        assert len(a[m.NFTA_SET_ELEM_LIST_ELEMENTS]) < 65536
        count += sum(1 for _ in m.iter_attrs(a[m.NFTA_SET_ELEM_LIST_ELEMENTS]))
    assert count == 5000
    assert m.strz(1, "kproxy") in msgs[0][3]
