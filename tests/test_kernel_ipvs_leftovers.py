"""kube-proxy's IPVS-mode leftovers on a node kproxy took over: removed after kproxy's first
sync (here `kproxy sync`, which calls what the daemon calls after its first full sync; the
daemon itself in tests/test_kernel_dropin.py), by `kproxy cleanup`, and reported by
`kproxy doctor`; nobody else's sets and chains are touched.

A node after kube-proxy in IPVS mode is built in a namespace of the test's own: kube-ipvs0
holding ClusterIPs, kube-proxy's ipsets with members, its IPVS-mode iptables rules (through
the node's iptables, iptables-nft here) matching those sets, plus a set and a chain of
someone else's (Calico's names). This machine's kernel has no dummy link type, so kube-ipvs0
is made a bridge, and kproxy is run with LINK_KINDS extended to bridges (production takes a
dummy only, as upstream's DeleteDummyDevice). Nor has it ip_vs: removing IPVS virtual servers
is not exercised. Netlink sockets are opened inside the namespace (netns.call_in); processes
run under `ip netns exec`; the namespace goes at the end, also on failure.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns  # noqa: E402

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "cluster.yaml"
CLUSTER_IPS = ("10.96.0.1", "10.96.0.10")
FOREIGN_SET, FOREIGN_CHAIN = "cali40-all-hosts", "cali-INPUT"
# kube-proxy's sets made here: (name, type, family), with the members added below.
SETS = (
    ("KUBE-CLUSTER-IP", "hash:ip,port", socket.AF_INET),
    ("KUBE-LOOP-BACK", "hash:ip,port,ip", socket.AF_INET),
    ("KUBE-LOAD-BALANCER", "hash:ip,port", socket.AF_INET),
    ("KUBE-LOAD-BALANCER-FW", "hash:ip,port", socket.AF_INET),
    ("KUBE-NODE-PORT-TCP", "bitmap:port", socket.AF_INET),
    ("KUBE-HEALTH-CHECK-NODE-PORT", "bitmap:port", socket.AF_INET),
    ("KUBE-IPVS-IPS", "hash:ip", socket.AF_INET),
    ("KUBE-6-CLUSTER-IP", "hash:ip,port", socket.AF_INET6),
    # The IPv6 name cut to 31 characters, as upstream's NewIPSet cuts it.
    ("KUBE-6-LOAD-BALANCER-SOURCE-CID", "hash:ip,port,net", socket.AF_INET6),
)
# What kube-proxy in IPVS mode writes (pkg/proxy/ipvs/proxier.go), abridged to one Service.
IPVS_RULES = """*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-LOAD-BALANCER - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-NODE-PORT -p tcp -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ
-A KUBE-POSTROUTING -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -j MASQUERADE
-A KUBE-SERVICES ! -s 10.244.0.0/16 -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m set --match-set KUBE-LOAD-BALANCER dst,dst -j KUBE-LOAD-BALANCER
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT
COMMIT
*filter
:KUBE-FORWARD - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SOURCE-RANGES-FIREWALL - [0:0]
:KUBE-IPVS-FILTER - [0:0]
:KUBE-IPVS-OUT-FILTER - [0:0]
:cali-INPUT - [0:0]
-A INPUT -m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT
-A INPUT -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER
-A INPUT -j cali-INPUT
-A FORWARD -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A OUTPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-OUT-FILTER
-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-NODE-PORT -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT
-A KUBE-PROXY-FIREWALL -m set --match-set KUBE-LOAD-BALANCER-FW dst,dst -j $SRF
-A KUBE-SOURCE-RANGES-FIREWALL -j DROP
-A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT
-A cali-INPUT -m set --match-set cali40-all-hosts src -j ACCEPT
COMMIT
""".replace("$SRF", "KUBE-SOURCE-RANGES-FIREWALL")  # a line too long for this file
IPVS_CHAINS = (
    "KUBE-NODE-PORT",
    "KUBE-LOAD-BALANCER",
    "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
)
# kproxy run as `kproxy` (or, named kube-proxy, as `kproxy run`), taking a bridge for
# kube-ipvs0: this kernel has no dummy links (module docstring).
BRIDGE_AS_DUMMY = (
    "import sys\n"
    "import kproxy.ipvsleftovers as m\n"
    "m.LINK_KINDS = ('dummy', 'bridge')\n"
    "from kproxy.cli import main\n"
    "sys.exit(main())\n"
)


def kproxy(*args: str) -> list[str]:
    """The command line of `kproxy ARGS`, kube-ipvs0 being allowed to be a bridge."""
    return [sys.executable, "-c", BRIDGE_AS_DUMMY, *args]


def _make_sets() -> None:
    from pyroute2 import IPSet

    with IPSet() as ips:
        for name, stype, family in (*SETS, (FOREIGN_SET, "hash:ip", socket.AF_INET)):
            kwargs = {"bitmap_ports_range": (0, 65535)} if stype == "bitmap:port" else {}
            ips.create(name, stype=stype, family=family, **kwargs)
        ips.add("KUBE-IPVS-IPS", CLUSTER_IPS[1])
        ips.add(FOREIGN_SET, "192.0.2.7")
        ips.add("KUBE-NODE-PORT-TCP", 30080, etype="port")


def sets_present(ns: str) -> set[str]:
    def listed() -> set[str]:
        from pyroute2 import IPSet

        with IPSet() as ips:
            return {m.get_attr("IPSET_ATTR_SETNAME") for m in ips.list()}

    return netns.call_in(ns, listed)


def build_ipvs_node(ns: str) -> None:
    """Make `ns` look like a node after kube-proxy in IPVS mode (module docstring)."""
    netns.ip(ns, "link", "add", "kube-ipvs0", "type", "bridge")  # a dummy, on a real node
    for address in CLUSTER_IPS:
        netns.ip(ns, "addr", "add", f"{address}/32", "dev", "kube-ipvs0")
    netns.call_in(ns, _make_sets)
    netns.run(ns, ["iptables-restore", "--noflush"], input=IPVS_RULES)


def assert_ipvs_gone(ns: str) -> None:
    """Every leftover of kube-proxy's IPVS mode gone, the foreign set and chain in place."""
    assert netns.ip(ns, "link", "show", "kube-ipvs0", check=False).returncode != 0
    assert sets_present(ns) == {FOREIGN_SET}
    saved = netns.iptables_save(ns)
    for chain in IPVS_CHAINS:
        assert f":{chain} " not in saved, saved
    assert "--match-set KUBE-" not in saved, saved
    assert "-A cali-INPUT -m set --match-set cali40-all-hosts src -j ACCEPT" in saved
    assert "-A INPUT -j cali-INPUT" in saved


@pytest.fixture
def node(kernel_support: None):
    if netns.which("iptables-restore") is None:
        pytest.skip("iptables is not installed")
    topo = netns.Topology()
    try:
        yield topo
    finally:
        topo.close()


def test_first_sync_in_iptables_mode_removes_ipvs_leftovers_and_nothing_else(node, tmp_path):
    ns = node.node
    build_ipvs_node(ns)
    assert len(sets_present(ns)) == len(SETS) + 1
    lock = ["--lock-file", str(tmp_path / "lock")]
    sync = kproxy("sync", "--state", str(EXAMPLE), "--cluster-cidr", "10.244.0.0/16", *lock)
    res = netns.run(ns, sync, check=False)
    assert res.returncode == 0, res.stderr
    assert_ipvs_gone(ns)
    # kproxy's own chains in place of kube-proxy's IPVS-mode ones (same names, its rules).
    assert "-A KUBE-SERVICES" in netns.iptables_save(ns, "nat")
    # One line per kind of thing removed.
    assert "removed kube-proxy's IPVS-mode interface kube-ipvs0 (2 addresses" in res.stderr
    assert "removed kube-proxy's IPVS-mode chains (IPv4): nat/KUBE-NODE-PORT" in res.stderr
    assert "removed kube-proxy's IPVS-mode ipsets: KUBE-LOOP-BACK, KUBE-CLUSTER-IP" in res.stderr
    # Nothing there: nothing said.
    res = netns.run(ns, sync, check=False)
    assert res.returncode == 0, res.stderr
    assert "IPVS" not in res.stderr and "ipvs" not in res.stderr, res.stderr


def test_cleanup_removes_ipvs_leftovers_and_nothing_else(node, tmp_path):
    ns = node.node
    build_ipvs_node(ns)
    lock = ["--lock-file", str(tmp_path / "lock")]
    res = netns.run(ns, kproxy("cleanup", "--dry-run", *lock), check=False)
    assert res.returncode == 0, res.stderr
    assert "# kube-proxy's IPVS mode" in res.stdout
    assert "remove kube-ipvs0 (2 addresses)" in res.stdout
    assert "kube-ipvs0" in netns.ip(ns, "link", "show").stdout  # a dry run changes nothing
    res = netns.run(ns, kproxy("cleanup", *lock), check=False)
    assert res.returncode == 0, res.stderr
    assert_ipvs_gone(ns)
    # kube-proxy's chains shared with iptables mode went too (kproxy's cleanup).
    assert "KUBE-SERVICES" not in netns.iptables_save(ns, "nat")


def test_doctor_reports_ipvs_leftovers_and_passes_on_a_clean_node(node, tmp_path):
    ns = node.node

    def check(mode: str) -> dict:
        res = netns.run(
            ns,
            kproxy("doctor", "--output", "json", "--state-cache", "", "--mode", mode)
            + ["--check", "other_mode_leftovers"],
            check=False,
        )
        assert res.returncode in (0, 1), res.stderr
        (result,) = json.loads(res.stdout)["checks"]
        return result

    for mode in ("iptables", "nftables"):
        assert check(mode)["status"] == "ok"
    build_ipvs_node(ns)
    for mode in ("iptables", "nftables"):
        result = check(mode)
        assert result["status"] == "warn", result
        assert "kube-proxy's IPVS mode left kube-ipvs0 (2 addresses)" in result["saw"]
        assert "KUBE-CLUSTER-IP" in result["saw"] and FOREIGN_SET not in result["saw"]
        assert "IPv4 chains nat/KUBE-NODE-PORT" in result["saw"]
    res = netns.run(ns, kproxy("cleanup", "--lock-file", str(tmp_path / "lock")), check=False)
    assert res.returncode == 0, res.stderr
    assert check("nftables")["status"] == "ok"
