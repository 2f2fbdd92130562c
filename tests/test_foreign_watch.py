"""Other tools' changes seen during a whole-table restore (issue 13.7): xtables-monitor's
output parsed, kproxy's own transactions told apart, the net effect turned into repairs."""

from kproxy.iptables.foreign_watch import net_effect, parse_monitor, repair_lines

# Printed by `xtables-monitor -e -4` (iptables 1.8.9) in a namespace: Docker-like `iptables`
# calls, then a restore of kproxy's (it touches KUBE- chains), then more foreign calls.
MONITOR = """\
 EVENT: # nft: ip6 filter FORWARD use 1 type filter hook forward prio 0 policy drop flags 1
 EVENT: nft: NEW table: table filter ip flags 0 use 1 handle 1
 EVENT: # nft: ip filter FORWARD use 1 type filter hook forward prio 0 policy accept flags 1
 EVENT: -4 -t filter -A FORWARD -s 192.0.2.1/32 -j ACCEPT
NEWGEN: GENID=2 PID=23867 NAME=iptables
 EVENT: -4 -t filter -N DOCKER-USER
NEWGEN: GENID=3 PID=23868 NAME=iptables
 EVENT: -4 -t filter -A DOCKER-USER -m comment --comment "hi there" -j RETURN
 EVENT: -6 -t filter -A FORWARD -s 2001:db8::1/128 -j ACCEPT
NEWGEN: GENID=4 PID=23869 NAME=iptables
 EVENT: -4 -t nat -N KUBE-SERVICES
 EVENT: -4 -t nat -A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
 EVENT: -4 -t nat -A POSTROUTING -s 198.51.100.1/32 -j MASQUERADE
NEWGEN: GENID=5 PID=23871 NAME=iptables-nft-re
 EVENT: -4 -t filter -D FORWARD -s 192.0.2.1/32 -j ACCEPT
 EVENT: -4 -t nat -A POSTROUTING -s 198.51.100.2/32 -j MASQUERADE
NEWGEN: GENID=6 PID=23873 NAME=iptables
 EVENT: # nft: ip filter FORWARD use 1 type filter hook forward prio 0 policy drop flags 1
NEWGEN: GENID=7 PID=23874 NAME=iptables
 EVENT: -4 -t filter -A FORWARD -s 192.0.2.9/32 -j ACCEPT
"""


def test_transactions_of_one_family_in_order_unfinished_one_dropped():
    txs = parse_monitor(MONITOR.splitlines(), 4)
    assert [t.pid for t in txs] == [23867, 23868, 23869, 23871, 23873, 23874]
    assert txs[2].events == [
        ("filter", "A", "DOCKER-USER", '-m comment --comment "hi there" -j RETURN')
    ]
    assert txs[0].policies == [("filter", "FORWARD", "ACCEPT")]
    assert txs[5].policies == [("filter", "FORWARD", "DROP")]
    v6 = parse_monitor(MONITOR.splitlines(), 6)
    assert v6[0].policies == [("filter", "FORWARD", "DROP")] and not v6[0].events
    assert v6[1].events == [("filter", "A", "FORWARD", "-s 2001:db8::1/128 -j ACCEPT")]


def test_net_effect_skips_kproxys_own_transaction_and_keeps_the_last_word():
    eff = net_effect(parse_monitor(MONITOR.splitlines(), 4), {"filter", "nat"})
    # The restore's own transaction (KUBE-SERVICES) is not foreign, even the foreign-looking
    # rule it carried over; 192.0.2.1 was added, then deleted: its last word is the delete.
    assert ("nat", "POSTROUTING", "-s 198.51.100.1/32 -j MASQUERADE") not in eff.rules
    assert eff.rules[("nat", "POSTROUTING", "-s 198.51.100.2/32 -j MASQUERADE")] == 1
    assert eff.rules[("filter", "FORWARD", "-s 192.0.2.1/32 -j ACCEPT")] == -1
    assert eff.chains == {("filter", "DOCKER-USER"): True}
    assert eff.policies == {("filter", "FORWARD"): "DROP"}
    assert "iptables (pid 23873)" in eff.who
    # Only the tables that were restored count.
    assert not net_effect(parse_monitor(MONITOR.splitlines(), 4), {"mangle"}).rules


def test_repairs_only_what_the_kernel_lacks():
    eff = net_effect(parse_monitor(MONITOR.splitlines(), 4), {"filter", "nat"})
    now = {
        "FORWARD": ("ACCEPT", ["-s 192.0.2.1/32 -j ACCEPT"]),  # the restore brought it back
        "DOCKER-USER": None,  # and dropped the new chain
    }
    assert repair_lines(eff, "filter", now) == [
        ":DOCKER-USER - [0:0]",
        ":FORWARD DROP [0:0]",
        "-D FORWARD -s 192.0.2.1/32 -j ACCEPT",
        '-A DOCKER-USER -m comment --comment "hi there" -j RETURN',
    ]
    kept = {"POSTROUTING": ("ACCEPT", ["-s 198.51.100.2/32 -j MASQUERADE"])}
    assert repair_lines(eff, "nat", kept) == []
    lost = {"POSTROUTING": ("ACCEPT", [])}
    assert repair_lines(eff, "nat", lost) == ["-A POSTROUTING -s 198.51.100.2/32 -j MASQUERADE"]
