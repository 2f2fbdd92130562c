"""Real traffic through real rules programmed by ``kproxy sync``, in both proxy modes.

Every test runs once per ``--mode`` (iptables, nftables: the ``proxy_mode`` fixture of
tests/conftest.py); what the traffic must do is the same in both, and the assertions that
read rules look at iptables-save or at ``nft list table ip kproxy`` accordingly.

Every test builds its own throw-away topology (see tests/netns.py): a node namespace where
kproxy runs, pods a (10.244.1.2), b (10.244.1.3), c (10.244.1.4) each behind its own routed
veth, and an external client (192.168.100.2) that reaches the node at 192.168.100.1. Each pod
answers TCP 8080 and UDP 5353 with its own name, so a reply tells which endpoint was chosen.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import netns
import pytest

pytestmark = pytest.mark.kernel

CLUSTER_CIDR = "10.244.0.0/16"
NODE_NAME = "node-1"
NODE_IP = netns.NODE_EXTERNAL_IP

POD_A, POD_B, POD_C = "10.244.1.2", "10.244.1.3", "10.244.1.4"

WEB_IP, WEB_NODE_PORT = "10.96.0.10", 30080
DNS_IP = "10.96.0.53"
EMPTY_IP, EMPTY_NODE_PORT = "10.96.0.30", 30081
NOTREADY_IP = "10.96.0.31"
EXTRA_IP = "10.96.0.40"
BAD_IP = "10.96.0.66"

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- objects


def service(
    name: str,
    cluster_ip: str,
    ports: list[dict[str, Any]],
    svc_type: str = "ClusterIP",
    namespace: str = "default",
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-svc-{name}"},
        "spec": {
            "type": svc_type,
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "sessionAffinity": "None",
            "ports": ports,
        },
    }


def port(name: str, number: int, target: int, protocol: str = "TCP", node_port: int = 0):
    p: dict[str, Any] = {"name": name, "port": number, "protocol": protocol, "targetPort": target}
    if node_port:
        p["nodePort"] = node_port
    return p


def endpoint(ip: str, ready: bool | None = True) -> dict[str, Any]:
    ep: dict[str, Any] = {"addresses": [ip], "nodeName": NODE_NAME}
    if ready is not None:
        ep["conditions"] = {"ready": ready, "serving": ready, "terminating": False}
    return ep


def endpoint_slice(
    service_name: str,
    ports: list[dict[str, Any]],
    endpoints: list[dict[str, Any]] | None,
    namespace: str = "default",
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service_name}-x7k2p",
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": service_name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    }


def standard_objects() -> list[dict[str, Any]]:
    """web (TCP, NodePort) and dns (UDP) on pods a+b, empty and notready without endpoints.

    Pod b's web endpoint carries no conditions at all: absent ``ready`` counts as ready.
    Pod a's notready endpoint is not ready although a listens on 8080, so any answer would
    mean kproxy used a not-ready endpoint.
    """
    http = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    dns = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
    return [
        service("web", WEB_IP, [port("http", 80, 8080, node_port=WEB_NODE_PORT)], "NodePort"),
        endpoint_slice("web", http, [endpoint(POD_A), endpoint(POD_B, ready=None)]),
        service("dns", DNS_IP, [port("dns", 53, 5353, "UDP")]),
        endpoint_slice("dns", dns, [endpoint(POD_A), endpoint(POD_B)]),
        service("empty", EMPTY_IP, [port("http", 80, 8080, node_port=EMPTY_NODE_PORT)], "NodePort"),
        endpoint_slice("empty", http, None),
        service("notready", NOTREADY_IP, [port("http", 80, 8080)]),
        endpoint_slice("notready", http, [endpoint(POD_A, ready=False)]),
    ]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The Service called ``name``, or the EndpointSlice of the Service called ``name``."""

    def owner(o: dict[str, Any]) -> str:
        if o["kind"] == "EndpointSlice":
            return o["metadata"]["labels"]["kubernetes.io/service-name"]
        return o["metadata"]["name"]

    return next(o for o in objects if o["kind"] == kind and owner(o) == name)


# --------------------------------------------------------------------------- kproxy


@pytest.fixture
def topology(topology: netns.Topology, proxy_mode: str) -> netns.Topology:
    """conftest's topology, whose node runs kproxy with ``--mode proxy_mode``."""
    topology.proxy_mode = proxy_mode
    return topology


def other_mode(mode: str) -> str:
    return "iptables" if mode == "nftables" else "nftables"


def kproxy_argv() -> list[str]:
    if (REPO / "kproxy" / "__main__.py").exists():
        return [sys.executable, "-m", "kproxy"]
    script = Path(sys.executable).with_name("kproxy")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from kproxy.cli import main; sys.exit(main())"]


def kproxy(
    topo: netns.Topology, command: str, state: Path | str, *extra: str, mode: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``kproxy COMMAND --state STATE --mode M --cluster-cidr ... --node-name node-1`` in the
    node ns; M is the topology's proxy mode unless ``mode`` says otherwise."""
    argv = [*kproxy_argv(), command, "--state", str(state), "--mode", mode or topo.proxy_mode]
    argv += ["--cluster-cidr", CLUSTER_CIDR, "--node-name", NODE_NAME, *extra]
    return netns.run(topo.node, argv, check=False, timeout=120)


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"


def sync_ok(
    topo: netns.Topology, state: Path, mode: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = kproxy(topo, "sync", state, mode=mode)
    mode = mode or topo.proxy_mode
    assert proc.returncode == 0, (
        f"kproxy sync --mode {mode} --state {state} failed: {describe(proc)}"
    )
    return proc


def nonblank_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def save_all(topo: netns.Topology) -> str:
    """Everything a sync could change: iptables-save; in nftables mode also every nft table
    (``nft -s list ruleset``: kproxy's tables, and iptables-nft's ones if any)."""
    if topo.proxy_mode == "nftables":
        return topo.iptables_save() + netns.nft_ruleset(topo.node)
    return topo.iptables_save()


def kproxy_rules(topo: netns.Topology) -> str:
    """kproxy's IPv4 rules as text: iptables-save (all tables), or ``nft list table ip kproxy``
    ("" when there is none)."""
    if topo.proxy_mode == "nftables":
        return netns.nft_table(topo.node) or ""
    return topo.iptables_save()


def dnat_text(topo: netns.Topology, destination: str) -> str:
    """How a DNAT to ``destination`` (``ip:port``) reads in kproxy_rules()."""
    if topo.proxy_mode == "nftables":
        return f"dnat to {destination}"
    return f"--to-destination {destination}"


def sep_chain_for(nat_save: str, destination: str) -> str | None:
    """The KUBE-SEP chain whose DNAT goes to ``destination`` (``ip:port``), if any."""
    pattern = re.compile(rf"^-A (KUBE-SEP-\S+) .*--to-destination {re.escape(destination)}(\s|$)")
    for line in nat_save.splitlines():
        m = pattern.match(line)
        if m:
            return m.group(1)
    return None


def nft_endpoint_chain_for(table: str, destination: str) -> str | None:
    """The ``endpoint-...`` chain of the kproxy table whose DNAT goes to ``destination``."""
    for name, lines in netns.nft_chains(table).items():
        if name.startswith("endpoint-") and any(
            line.endswith(f" dnat to {destination}") for line in lines
        ):
            return name
    return None


def endpoint_chain_for(topo: netns.Topology, rules: str, destination: str) -> str | None:
    """The per-endpoint chain (KUBE-SEP-... / endpoint-...) DNATing to ``destination`` in
    ``rules`` (kproxy_rules() text), if any."""
    if topo.proxy_mode == "nftables":
        return nft_endpoint_chain_for(rules, destination)
    return sep_chain_for(rules, destination)


def pods_seen(replies: list[netns.Reply]) -> dict[str, int]:
    return dict(netns.tally(replies))


def assert_balanced(replies, expected: set[str], what: str) -> None:
    seen = pods_seen(replies)
    assert set(seen) == expected, (
        f"{what}: expected answers from exactly {sorted(expected)} over {len(replies)} "
        f"requests, got {seen}"
    )


def assert_refused_fast(replies, what: str, limit: float = 1.0) -> None:
    for reply in replies:
        assert reply.result == "refused", f"{what}: expected a quick REJECT (refused), got {reply}"
        assert reply.elapsed < limit, f"{what}: refused but only after {reply.elapsed:.2f}s"


# --------------------------------------------------------------------------- tests


def test_tcp_clusterip_reaches_both_endpoints_from_pod_and_node(topology, write_state):
    sync_ok(topology, write_state(standard_objects()))
    pod_c = topology.pods["c"].ns
    for ns, who in ((pod_c, "pod c"), (topology.node, "the node")):
        replies = topology.tcp(ns, WEB_IP, 80, count=40, timeout=2)
        assert_balanced(
            replies,
            {"a", "b"},
            f"TCP {WEB_IP}:80 from {who} (b's endpoint has no conditions: absent ready = ready)",
        )


def test_udp_clusterip_from_pod(topology, write_state):
    sync_ok(topology, write_state(standard_objects()))
    replies = topology.udp(topology.pods["c"].ns, DNS_IP, 53, count=24, timeout=2)
    assert_balanced(replies, {"a", "b"}, f"UDP {DNS_IP}:53 from pod c")


def test_nodeport_from_external_client(topology, write_state):
    sync_ok(topology, write_state(standard_objects()))
    client = topology.clients["client"].ns
    replies = topology.tcp(client, NODE_IP, WEB_NODE_PORT, count=24, timeout=2)
    assert_balanced(replies, {"a", "b"}, f"NodePort {NODE_IP}:{WEB_NODE_PORT} from the client")


def test_service_without_ready_endpoints_is_rejected_quickly(topology, write_state):
    sync_ok(topology, write_state(standard_objects()))
    for ns, who in ((topology.pods["c"].ns, "pod c"), (topology.node, "the node")):
        replies = topology.tcp(ns, EMPTY_IP, 80, count=3, timeout=2)
        assert_refused_fast(replies, f"{EMPTY_IP}:80 (slice with no endpoints) from {who}")
        replies = topology.tcp(ns, NOTREADY_IP, 80, count=3, timeout=2)
        assert_refused_fast(replies, f"{NOTREADY_IP}:80 (only a not-ready endpoint) from {who}")
    client = topology.clients["client"].ns
    replies = topology.tcp(client, NODE_IP, EMPTY_NODE_PORT, count=3, timeout=2)
    assert_refused_fast(replies, f"NodePort {EMPTY_NODE_PORT} of empty from the client")
    rules = kproxy_rules(topology)
    assert endpoint_chain_for(topology, rules, f"{POD_A}:8080") is not None, (
        f"web's endpoint chain for pod a missing:\n{rules}"
    )
    if topology.proxy_mode == "nftables":
        services = netns.nft_elements(rules, "no-endpoint-services")
        for ip in (EMPTY_IP, NOTREADY_IP):
            assert services.get(f"{ip} . tcp . 80") == "goto reject-chain", (
                f"no no-endpoint-services element rejecting {ip}:80:\n{rules}"
            )
        nodeports = netns.nft_elements(rules, "no-endpoint-nodeports")
        assert nodeports.get(f"tcp . {EMPTY_NODE_PORT}") == "goto reject-chain", (
            f"no no-endpoint-nodeports element rejecting NodePort {EMPTY_NODE_PORT}:\n{rules}"
        )
        assert not [k for k in services if k.startswith(f"{WEB_IP} ")], (
            f"web has ready endpoints but is in no-endpoint-services:\n{rules}"
        )
        # nftables mode only (as upstream's): a ClusterIP port no Service uses is rejected
        for ns, who in ((topology.pods["c"].ns, "pod c"), (topology.node, "the node")):
            replies = topology.tcp(ns, WEB_IP, 81, count=2, timeout=2)
            assert_refused_fast(replies, f"{WEB_IP}:81 (a port web does not have) from {who}")
        return
    filt = topology.iptables_save("filter")
    assert re.search(rf"-d {re.escape(EMPTY_IP)}/32 .*-j REJECT", filt), (
        f"no filter REJECT rule for empty's ClusterIP {EMPTY_IP}:\n{filt}"
    )
    assert re.search(
        rf"^-A KUBE-EXTERNAL-SERVICES .*--dport {EMPTY_NODE_PORT} .*-j REJECT", filt, re.M
    ), f"no KUBE-EXTERNAL-SERVICES REJECT for empty's NodePort {EMPTY_NODE_PORT}:\n{filt}"
    assert not re.search(rf"-d {re.escape(WEB_IP)}/32 .*-j REJECT", filt), (
        f"web has ready endpoints but got a REJECT rule:\n{filt}"
    )


def test_removed_endpoint_is_never_reached_and_its_sep_chain_is_gone(topology, write_state):
    objects = standard_objects()
    sync_ok(topology, write_state(objects))
    before = kproxy_rules(topology)
    sep_a = endpoint_chain_for(topology, before, f"{POD_A}:8080")
    sep_b = endpoint_chain_for(topology, before, f"{POD_B}:8080")
    assert sep_a and sep_b, f"expected endpoint chains DNATing to pods a and b:\n{before}"

    slice_ = find(objects, "EndpointSlice", "web")
    slice_["endpoints"] = [e for e in slice_["endpoints"] if e["addresses"] != [POD_B]]
    sync_ok(topology, write_state(objects))

    for ns, who in ((topology.pods["c"].ns, "pod c"), (topology.node, "the node")):
        replies = topology.tcp(ns, WEB_IP, 80, count=30, timeout=2)
        assert_balanced(replies, {"a"}, f"TCP {WEB_IP}:80 from {who} after removing pod b")

    after = kproxy_rules(topology)
    assert sep_b not in after, f"{sep_b} (DNAT to {POD_B}:8080) still there:\n{after}"
    assert dnat_text(topology, f"{POD_B}:8080") not in after, f"DNAT to {POD_B}:8080 remains"
    assert endpoint_chain_for(topology, after, f"{POD_A}:8080") == sep_a, (
        f"pod a's endpoint chain changed or vanished (was {sep_a}):\n{after}"
    )
    assert endpoint_chain_for(topology, after, f"{POD_B}:5353"), (
        "dns's endpoint on pod b must be untouched"
    )


FOREIGN_RULES = {
    "nat": [
        ["-N", "FOREIGN-NAT"],
        ["-A", "FOREIGN-NAT", "-j", "RETURN"],
        ["-A", "PREROUTING", "-j", "FOREIGN-NAT"],
        ["-N", "DOCKER"],
        ["-A", "DOCKER", "-i", "docker0", "-j", "RETURN"],
        ["-A", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "DOCKER"],
        ["-A", "OUTPUT", "!", "-d", "127.0.0.0/8", "-m", "addrtype", "--dst-type", "LOCAL"]
        + ["-j", "DOCKER"],
        ["-A", "POSTROUTING", "-s", "172.17.0.0/16", "!", "-o", "docker0", "-j", "MASQUERADE"],
    ],
    "filter": [
        ["-N", "FOREIGN-FILTER"],
        ["-A", "FOREIGN-FILTER", "-j", "RETURN"],
        ["-A", "INPUT", "-s", "192.0.2.1", "-j", "FOREIGN-FILTER"],
        ["-N", "DOCKER-USER"],
        ["-A", "DOCKER-USER", "-j", "RETURN"],
        ["-A", "FORWARD", "-j", "DOCKER-USER"],
    ],
}


# Foreign nftables tables (another program's, e.g. a firewall): kproxy owns only the tables
# called kproxy in families ip and ip6; an inet table called kproxy, or an ip table whose name
# merely starts with kproxy, is not its own either.
FOREIGN_NFT = """\
table inet foreign {
	set blocked {
		type ipv4_addr
		elements = { 192.0.2.99 }
	}

	chain c {
		type filter hook input priority filter; policy accept;
		ip saddr @blocked drop
		tcp dport 9 reject
	}
}
table ip foreign-nat {
	chain pre {
		type nat hook prerouting priority dstnat - 5; policy accept;
		ip saddr 192.0.2.1 tcp dport 9 return
	}
}
table inet kproxy {
	chain c {
		type filter hook output priority filter; policy accept;
		ip daddr 192.0.2.7 drop
	}
}
table ip kproxy-old {
	set s {
		type ipv4_addr
		elements = { 192.0.2.8 }
	}
}
"""
FOREIGN_NFT_TABLES = (
    ("inet", "foreign"),
    ("ip", "foreign-nat"),
    ("inet", "kproxy"),
    ("ip", "kproxy-old"),
)


def add_foreign_rules(topo: netns.Topology) -> None:
    """The FOREIGN_RULES iptables rules and the FOREIGN_NFT tables, in the node namespace."""
    for table, rules in FOREIGN_RULES.items():
        for rule in rules:
            topo.run(topo.node, ["iptables", "-t", table, *rule])
    netns.run(topo.node, ["nft", "-f", "-"], input=FOREIGN_NFT)


def foreign_lines(topo: netns.Topology) -> dict[str, list[str]]:
    """Per table, every iptables-save line that does not mention a KUBE- chain, in order."""
    return {
        table: [line for line in topo.iptables_save(table).splitlines() if "KUBE-" not in line]
        for table in FOREIGN_RULES
    }


def foreign_nft(topo: netns.Topology) -> dict[str, str | None]:
    """The FOREIGN_NFT tables as ``nft -s list table`` prints them (None: gone)."""
    return {
        f"{fam} {name}": netns.nft_table(topo.node, fam, name) for fam, name in FOREIGN_NFT_TABLES
    }


def kube_lines(topo: netns.Topology) -> list[str]:
    """Every iptables/ip6tables-save line (nat, filter, mangle) that mentions a KUBE- chain."""
    return [
        f"IPv{family} {table}: {line}"
        for family in (4, 6)
        for table in ("nat", "filter", "mangle")
        for line in netns.iptables_save(topo.node, table, family=family).splitlines()
        if "KUBE-" in line
    ]


def assert_foreign_intact(topo, iptables_before, nft_before, when: str) -> None:
    assert foreign_lines(topo) == iptables_before, f"{when} changed foreign (non KUBE-) rules"
    nft_now = foreign_nft(topo)
    assert nft_now == nft_before, (
        f"{when} changed foreign nft tables:\n{nft_now}\n--- nft list ruleset\n"
        f"{netns.nft_ruleset(topo.node)}"
    )
    if topo.proxy_mode == "nftables":
        assert kube_lines(topo) == [], f"{when} (nftables mode) wrote iptables rules"


def test_foreign_chains_and_rules_survive_every_sync(topology, write_state):
    add_foreign_rules(topology)
    before = foreign_lines(topology)
    assert any("FOREIGN-NAT" in line for line in before["nat"]), before
    assert any("DOCKER-USER" in line for line in before["filter"]), before
    nft_before = foreign_nft(topology)
    assert all(nft_before.values()), nft_before

    objects = standard_objects()
    state = write_state(objects)
    sync_ok(topology, state)
    assert_foreign_intact(topology, before, nft_before, "the first sync")
    replies = topology.tcp(topology.pods["c"].ns, WEB_IP, 80, count=20, timeout=2)
    assert_balanced(replies, {"a", "b"}, "web with foreign rules present")

    find(objects, "EndpointSlice", "web")["endpoints"] = [endpoint(POD_A)]
    find(objects, "Service", "dns")["spec"]["ports"][0]["port"] = 5300
    sync_ok(topology, write_state(objects))
    assert_foreign_intact(topology, before, nft_before, "a changing sync")

    sync_ok(topology, write_state(objects))
    assert_foreign_intact(topology, before, nft_before, "an unchanged sync")
    replies = topology.tcp(topology.pods["c"].ns, WEB_IP, 80, count=10, timeout=2)
    assert_balanced(replies, {"a"}, "web after the changing sync")
    replies = topology.udp(topology.pods["c"].ns, DNS_IP, 5300, count=4, timeout=2)
    assert all(r.ok for r in replies), f"dns on its new port 5300: {replies}"


def test_second_sync_is_a_noop_and_diff_reports_pending_changes(topology, write_state):
    objects = standard_objects()
    state = write_state(objects)
    sync_ok(topology, state)
    first = save_all(topology)
    proc = sync_ok(topology, state)
    assert save_all(topology) == first, "a second sync with the same file changed the rules"
    sent = re.findall(r"synced (IPv[46]) \(.*?(\d+) lines sent", proc.stderr)
    assert sent == [("IPv4", "0"), ("IPv6", "0")], (
        f"a second sync with the same file must send nothing in either family: {describe(proc)}"
    )

    proc = kproxy(topology, "diff", state)
    assert proc.returncode == 0, f"diff right after sync must exit 0: {describe(proc)}"

    objects += [
        service("extra", EXTRA_IP, [port("http", 80, 8080)]),
        endpoint_slice(
            "extra", [{"name": "http", "port": 8080, "protocol": "TCP"}], [endpoint(POD_C)]
        ),
    ]
    state = write_state(objects)
    proc = kproxy(topology, "diff", state)
    assert proc.returncode == 1, f"diff with a new Service pending must exit 1: {describe(proc)}"
    assert save_all(topology) == first, "kproxy diff modified the rules"

    sync_ok(topology, state)
    proc = kproxy(topology, "diff", state)
    assert proc.returncode == 0, f"diff after syncing the edit must exit 0: {describe(proc)}"
    replies = topology.tcp(topology.node, EXTRA_IP, 80, count=5, timeout=2)
    assert_balanced(replies, {"c"}, f"new Service extra {EXTRA_IP}:80 from the node")


def test_invalid_service_is_skipped_with_one_warning(topology, write_state):
    objects = standard_objects()
    objects.append(service("bad", BAD_IP, [port("http", 70000, 8080)]))
    proc = sync_ok(topology, write_state(objects))
    naming = [line for line in proc.stderr.splitlines() if "default/bad" in line]
    assert len(naming) == 1, f"expected one warning line naming default/bad: {describe(proc)}"
    assert "port" in naming[0].lower(), f"warning should name the port field: {naming[0]!r}"
    assert BAD_IP not in kproxy_rules(topology), "rules were written for the invalid Service"

    replies = topology.tcp(topology.pods["c"].ns, WEB_IP, 80, count=20, timeout=2)
    assert_balanced(replies, {"a", "b"}, "web next to an invalid Service")
    replies = topology.udp(topology.pods["c"].ns, DNS_IP, 53, count=4, timeout=2)
    assert all(r.ok for r in replies), f"dns next to an invalid Service: {replies}"


BROKEN_YAML = """\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: default
  spec: [
"""


@pytest.mark.parametrize("case", ["missing", "broken-yaml"])
def test_unreadable_state_file_exits_2_and_changes_nothing(topology, write_state, tmp_path, case):
    if case == "missing":
        bad = tmp_path / "does-not-exist.yaml"
    else:
        bad = tmp_path / "broken.yaml"
        bad.write_text(BROKEN_YAML)

    # on a fresh node: nothing at all may be applied
    pristine = save_all(topology)
    for command in ("sync", "diff"):
        proc = kproxy(topology, command, bad)
        assert proc.returncode == 2, f"{command} with a {case} file must exit 2: {describe(proc)}"
        assert len(nonblank_lines(proc.stderr)) == 1, f"expected a one-line error: {describe(proc)}"
        assert save_all(topology) == pristine, f"{command} with a {case} file changed rules"

    # after a good sync: the programmed rules stay exactly as they were
    good = write_state(standard_objects())
    sync_ok(topology, good)
    programmed = save_all(topology)
    proc = kproxy(topology, "sync", bad)
    assert proc.returncode == 2, f"sync with a {case} file must exit 2: {describe(proc)}"
    assert len(nonblank_lines(proc.stderr)) == 1, f"expected a one-line error: {describe(proc)}"
    assert save_all(topology) == programmed, f"sync with a {case} file changed rules"
    replies = topology.tcp(topology.pods["c"].ns, WEB_IP, 80, count=10, timeout=2)
    assert all(r.ok for r in replies), f"web broken after a failed sync: {replies}"


# Upstream's owned chains; KUBE-FIREWALL is the kubelet's too and is left, as upstream's cleanup
KUBE_SHARED = "KUBE-FIREWALL"


def assert_rules_of_mode(topo: netns.Topology, mode: str) -> None:
    """Only ``mode``'s rules are on the node: kproxy's iptables chains or its nft tables."""
    owned = [line for line in kube_lines(topo) if KUBE_SHARED not in line]
    tables = netns.nft_tables(topo.node)
    mine = [t for t in ("ip kproxy", "ip6 kproxy") if t in tables]
    if mode == "nftables":
        assert owned == [], "iptables mode's chains remain after syncing in nftables mode:\n" + (
            "\n".join(owned)
        )
        assert mine == ["ip kproxy", "ip6 kproxy"], f"kproxy nft tables missing: {tables}"
    else:
        assert any(":KUBE-SERVICES" in line for line in owned), (
            f"no KUBE-SERVICES chain after syncing in iptables mode: {owned}"
        )
        assert mine == [], f"nftables mode's tables remain after syncing in iptables mode: {tables}"


def test_switching_modes_removes_the_other_modes_rules(topology, write_state):
    """sync in one mode, then in the other, then back: traffic works after each, the other
    mode's rules are gone, foreign iptables rules and nft tables are untouched."""
    add_foreign_rules(topology)
    before, nft_before = foreign_lines(topology), foreign_nft(topology)
    state = write_state(standard_objects())
    pod_c, client = topology.pods["c"].ns, topology.clients["client"].ns
    first = topology.proxy_mode
    for mode in (first, other_mode(first), first):
        # Flows of the previous round stay in conntrack (TIME_WAIT, UDP's 30 s) with their
        # NAT; a new connection that happens to reuse a source port takes that flow's
        # endpoint, so balance is judged on fresh flows only (kproxy keeps existing flows on
        # purpose, across a mode switch too).
        topology.run(topology.node, ["conntrack", "-F"], check=False)
        sync_ok(topology, state, mode=mode)
        what = f"after sync --mode {mode} (started in {first})"
        assert_balanced(topology.tcp(pod_c, WEB_IP, 80, count=16), {"a", "b"}, f"web {what}")
        replies = topology.tcp(client, NODE_IP, WEB_NODE_PORT, count=12)
        assert_balanced(replies, {"a", "b"}, f"NodePort {WEB_NODE_PORT} {what}")
        replies = topology.udp(pod_c, DNS_IP, 53, count=12)
        assert_balanced(replies, {"a", "b"}, f"dns {what}")
        assert_refused_fast(topology.tcp(pod_c, EMPTY_IP, 80, count=2), f"empty {what}")
        assert_rules_of_mode(topology, mode)
        assert foreign_lines(topology) == before, f"foreign iptables rules changed {what}"
        assert foreign_nft(topology) == nft_before, f"foreign nft tables changed {what}"
        proc = kproxy(topology, "diff", state, mode=mode)
        assert proc.returncode == 0, f"diff --mode {mode} {what} must exit 0: {describe(proc)}"
