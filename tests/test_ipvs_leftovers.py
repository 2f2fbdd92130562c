"""The pure part of removing kube-proxy's IPVS-mode leftovers: which chains and jumps the
iptables-restore text deletes (kproxy/iptables/ipvs.py), and the names of its ipsets."""

from __future__ import annotations

from kproxy.iptables.ipvs import ipvs_removal
from kproxy.iptables.rules import parse_save
from kproxy.ipvsleftovers import IPSET_NAME_MAX, IPSET_NAMES, ipv6_set_name

SAVED = """*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT
-A KUBE-NODE-PORT -p tcp -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ
COMMIT
*filter
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-IPVS-FILTER - [0:0]
:KUBE-IPVS-OUT-FILTER - [0:0]
:cali-INPUT - [0:0]
-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER
-A INPUT -j cali-INPUT
-A OUTPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-OUT-FILTER
-A cali-INPUT -j KUBE-IPVS-OUT-FILTER
-A KUBE-IPVS-FILTER -m set --match-set KUBE-IPVS-IPS dst -j REJECT
COMMIT
"""


def test_ipvs_chains_and_the_jumps_into_them_go_in_one_transaction_per_table():
    removal = ipvs_removal(parse_save(SAVED))
    assert removal.removed == ["nat/KUBE-NODE-PORT", "filter/KUBE-IPVS-FILTER"]
    # A chain someone else's rule jumps to is kept (its deletion would fail the table).
    assert removal.kept == ["filter/KUBE-IPVS-OUT-FILTER"]
    assert removal.text == (
        "*nat\n"
        ":KUBE-NODE-PORT - [0:0]\n"
        "-D KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT\n"
        "-X KUBE-NODE-PORT\n"
        "COMMIT\n"
        "*filter\n"
        ":KUBE-IPVS-FILTER - [0:0]\n"
        '-D INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER\n'
        "-X KUBE-IPVS-FILTER\n"
        "COMMIT\n"
    )


def test_nothing_to_remove_is_no_text():
    tables = parse_save(
        "*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n"
    )
    removal = ipvs_removal(tables)
    assert (removal.text, removal.removed, removal.kept) == ("", [], [])


def test_ipset_names_are_upstreams_with_the_ipv6_ones_cut_to_31():
    assert ipv6_set_name("KUBE-CLUSTER-IP") == "KUBE-6-CLUSTER-IP"
    assert ipv6_set_name("KUBE-LOAD-BALANCER-SOURCE-CIDR") == "KUBE-6-LOAD-BALANCER-SOURCE-CID"
    assert ipv6_set_name("KUBE-NODE-PORT-LOCAL-SCTP-HASH") == "KUBE-6-NODE-PORT-LOCAL-SCTP-HAS"
    assert len(IPSET_NAMES) == 34 == len(set(IPSET_NAMES))
    assert all(n.startswith("KUBE-") and len(n) <= IPSET_NAME_MAX for n in IPSET_NAMES)
