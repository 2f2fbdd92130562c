"""The way back from kproxy's nftables mode to kube-proxy's: kube-proxy's own first sync takes
over the `kube-proxy` table kproxy wrote in its place, and leaves nothing of kproxy's.

kube-proxy cannot run here, so its transactions are written out as its nftables proxier makes
them (pkg/proxy/nftables/proxier.go, v1.31-v1.35: setupNFTables, syncProxyRules,
writeServiceToEndpointRules; knftables turns each Add/Flush/Delete into one `nft` line): its
first full sync after a start, for the one Service it knows, then, a second later, its
deletion of the stale Service chains it flushed. kproxy wrote two Services; the second is gone
by the time kube-proxy starts, as Services and endpoints come and go during the swap.

What must hold: nft accepts kube-proxy's transactions on kproxy's table (every declaration of
kube-proxy's matches kproxy's: a set or chain declared otherwise fails its whole sync), the
stale chains can be deleted (nothing of kproxy's still refers to them: named endpoint maps
would, and kube-proxy would fail that deletion at every sync, forever), nothing of kproxy's
is left, and the Service answers through kube-proxy's rules.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns  # noqa: E402

from kproxy.nftables.render import endpoint_base, hash_name  # noqa: E402

pytestmark = pytest.mark.kernel

WEB_IP, OLD_IP, NODE_PORT = "10.96.0.10", "10.96.0.20", 30080
POD_A, POD_B = "10.244.1.2", "10.244.1.3"
T = "ip kube-proxy"

# Upstream's fixed objects (proxier.go's constants); Service and endpoint chains are named
# "<prefix>-<hash>-<namespace>/<name>/...", and only those hold a "/".
UPSTREAM_CHAINS = {
    "filter-prerouting",
    "filter-input",
    "filter-forward",
    "filter-output",
    "filter-output-post-dnat",
    "nat-prerouting",
    "nat-output",
    "nat-postrouting",
    "nodeport-endpoints-check",
    "service-endpoints-check",
    "firewall-check",
    "services",
    "masquerading",
    "mark-for-masquerade",
    "cluster-ips-check",
    "reject-chain",
}
UPSTREAM_SETS = {
    "cluster-ips",
    "no-endpoint-services",
    "no-endpoint-nodeports",
    "firewall-ips",
    "service-ips",
    "service-nodeports",
}
# nftablesBaseChains: name, type, hook, priority (as numbers: dstnat = -100, srcnat = 100).
BASE_CHAINS = [
    ("filter-prerouting", "filter", "prerouting", -110),
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    ("filter-output-post-dnat", "filter", "output", -90),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
]
# nftablesJumpChains: (dstChain, srcChain, extraArgs).
JUMP_CHAINS = [
    ("nodeport-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-forward", "ct state new"),
    ("service-endpoints-check", "filter-output", "ct state new"),
    ("firewall-check", "filter-prerouting", "ct state new"),
    ("firewall-check", "filter-output", "ct state new"),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
    ("cluster-ips-check", "filter-forward", "ct state new"),
    ("cluster-ips-check", "filter-output-post-dnat", "ct state new"),
]
VERDICT_KEY = "ipv4_addr . inet_proto . inet_service : verdict"


def kube_proxy_first_sync(chains: set[str], sets: set[str]) -> tuple[str, set[str]]:
    """kube-proxy's first full sync after its start (nodePortAddresses unset: all local
    addresses; clusterCIDR 10.244.0.0/16 the local traffic detector; masquerade bit 14), for
    Service default/web (port http 80/TCP, NodePort 30080, one endpoint 10.244.1.2:8080,
    policies Cluster), on a table holding `chains` and `sets` (it lists them): the
    transaction, and the Service chains it uses."""
    base = "default/web/tcp/http"
    svc, ext = "service-" + hash_name(base), "external-" + hash_name(base)
    ep = "endpoint-" + hash_name(endpoint_base(base, POD_A, 8080))
    out = [f'add table {T} {{ comment "rules for kube-proxy" ; }}']
    created: set[str] = set()

    def ensure(chain: str) -> None:  # ensureChain: add and flush, once per sync
        if chain not in created:
            created.add(chain)
            out.extend([f"add chain {T} {chain}", f"flush chain {T} {chain}"])

    for name, _, _, _ in BASE_CHAINS:  # once after a start: recreate the base chains
        out.extend([f"add chain {T} {name}", f"delete chain {T} {name}"])
    for name, kind, hook, prio in BASE_CHAINS:
        out.append(f"add chain {T} {name} {{ type {kind} hook {hook} priority {prio} ; }}")
        out.append(f"flush chain {T} {name}")
    for dst, src, extra in JUMP_CHAINS:
        ensure(dst)
        out.append(f"add rule {T} {src} {extra} jump {dst}".replace("  ", " "))
    for chain in ("services", "cluster-ips-check", "masquerading", "mark-for-masquerade"):
        ensure(chain)
    out += [
        f"add rule {T} mark-for-masquerade mark set mark or 0x4000",
        f"add rule {T} masquerading mark and 0x4000 == 0 return",
        f"add rule {T} masquerading mark set mark xor 0x4000",
        f"add rule {T} masquerading masquerade fully-random",
        f'add set {T} cluster-ips {{ type ipv4_addr ; comment "Active ClusterIPs" ; }}',
        f"add rule {T} cluster-ips-check ip daddr @cluster-ips reject"
        ' comment "Reject traffic to invalid ports of ClusterIPs"',
        # nodePortAddresses matches all: the set is added, then deleted.
        f"add set {T} nodeport-ips {{ type ipv4_addr ;"
        ' comment "IPs that accept NodePort traffic" ; }',
        f"delete set {T} nodeport-ips",
        f"add map {T} no-endpoint-services {{ type {VERDICT_KEY} ;"
        ' comment "vmap to drop or reject packets to services with no endpoints" ; }',
        f"add map {T} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ;"
        ' comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }',
        f"add chain {T} reject-chain"
        ' { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }',
        f"flush chain {T} reject-chain",
        f"add rule {T} reject-chain reject",
        f"add rule {T} service-endpoints-check"
        " ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
        f"add rule {T} nodeport-endpoints-check"
        " ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports",
        f"add map {T} firewall-ips {{ type {VERDICT_KEY} ;"
        ' comment "destinations that are subject to LoadBalancerSourceRanges" ; }',
    ]
    ensure("firewall-check")
    out += [
        f"add rule {T} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips",
        f"add map {T} service-ips {{ type {VERDICT_KEY} ;"
        ' comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }',
        f"add map {T} service-nodeports {{ type inet_proto . inet_service : verdict ;"
        ' comment "NodePort traffic" ; }',
        f"add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips",
        f"add rule {T} services fib daddr type local ip daddr != 127.0.0.0/8"
        " meta l4proto . th dport vmap @service-nodeports",
    ]
    # The containers are flushed: the sync fills them from its own state.
    for kind, name in [
        ("set", "cluster-ips"),
        ("map", "service-ips"),
        ("map", "firewall-ips"),
        ("map", "no-endpoint-services"),
        ("map", "no-endpoint-nodeports"),
        ("map", "service-nodeports"),
    ]:
        out.append(f"flush {kind} {T} {name}")
    # syncProxyRules, the one Service.
    for chain in (ep, svc, ext):
        ensure(chain)
    out += [
        f"add element {T} cluster-ips {{ {WEB_IP} }}",
        f"add element {T} service-ips {{ {WEB_IP} . tcp . 80 : goto {svc} }}",
        f"add element {T} service-nodeports {{ tcp . {NODE_PORT} : goto {ext} }}",
        f"add rule {T} {svc} ip daddr {WEB_IP} tcp dport 80 ip saddr != 10.244.0.0/16"
        " jump mark-for-masquerade",
        f"add rule {T} {ext} jump mark-for-masquerade",
        f"add rule {T} {ext} goto {svc}",
        f"add rule {T} {svc} numgen random mod 1 vmap {{ 0 : goto {ep} }}",
        f"add rule {T} {ep} ip saddr {POD_A} jump mark-for-masquerade",
        f"add rule {T} {ep} meta l4proto tcp dnat to {POD_A}:8080",
    ]
    # The Service chains it did not write are flushed now (deleted a second later), and the
    # affinity sets it did not write are deleted.
    out += [f"flush chain {T} {c}" for c in sorted(chains) if "/" in c and c not in created]
    out += [f"delete set {T} {n}" for n in sorted(sets) if n.startswith("affinity-")]
    return "\n".join(out) + "\n", created


def state() -> dict:
    """What kproxy synced: web (NodePort, pod a) and old (ClusterIP, pod b, with session
    affinity), both policies Cluster."""

    def service(name: str, ip: str, node_port: int | None, affinity: bool) -> list[dict]:
        port = {"name": "http", "port": 80, "protocol": "TCP"}
        spec: dict = {"type": "ClusterIP", "clusterIP": ip, "ports": [port]}
        if node_port:
            spec["type"], port["nodePort"] = "NodePort", node_port
        if affinity:
            spec["sessionAffinity"] = "ClientIP"
        pod = POD_A if name == "web" else POD_B
        return [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"namespace": "default", "name": name},
                "spec": spec,
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "namespace": "default",
                    "name": f"{name}-1",
                    "labels": {"kubernetes.io/service-name": name},
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": [pod], "conditions": {"ready": True}}],
            },
        ]

    items = service("web", WEB_IP, NODE_PORT, False) + service("old", OLD_IP, None, True)
    return {"apiVersion": "v1", "kind": "List", "items": items}


def objects(ns: str) -> tuple[set[str], set[str]]:
    """The chains, and the sets and maps, of `ip kube-proxy`."""
    listing = json.loads(netns.run(ns, ["nft", "-j", "list", "table", "ip", "kube-proxy"]).stdout)
    chains, sets = set(), set()
    for item in listing["nftables"]:
        if "chain" in item:
            chains.add(item["chain"]["name"])
        for kind in ("set", "map"):
            if kind in item:
                sets.add(item[kind]["name"])
    return chains, sets


def test_kube_proxys_nftables_mode_takes_over_the_table_kproxy_wrote_in_its_place(
    kernel_support: None, tmp_path: Path
):
    topo = netns.build(pods=(("a", 2), ("b", 3), ("c", 4)), clients=1)
    try:
        topo.start_server(topo.pods["a"], tcp=[8080])
        topo.start_server(topo.pods["b"], tcp=[8080])
        path = tmp_path / "state.json"
        path.write_text(json.dumps(state()))
        sync = netns.run(
            topo.node,
            [sys.executable, "-m", "kproxy", "sync", "--state", str(path), "--mode", "nftables"]
            + ["--nft-table", "kube-proxy", "--node-name", "node-1"]
            + ["--cluster-cidr", "10.244.0.0/16", "--lock-file", str(tmp_path / "lock")],
            check=False,
        )
        assert sync.returncode == 0, sync.stderr
        replies = topo.tcp(topo.pods["c"].ns, OLD_IP, 80, count=2, timeout=1.0)
        assert {r.pod for r in replies if r.ok} == {"b"}, replies
        kproxys_chains, kproxys_sets = objects(topo.node)
        assert any(n.startswith("affinity-") for n in kproxys_sets), kproxys_sets
        # kube-proxy starts: its first sync, on kproxy's table, is accepted whole.
        first, active = kube_proxy_first_sync(kproxys_chains, kproxys_sets)
        netns.run(topo.node, ["nft", "-f", "-"], input=first)
        # A second later: the Service chains it did not write are stale; it deletes them.
        stale = sorted(c for c in kproxys_chains if "/" in c and c not in active)
        assert any("default/old/" in c for c in stale), stale
        delete = "".join(f"delete chain {T} {c}\n" for c in stale)
        res = netns.run(topo.node, ["nft", "-f", "-"], input=delete, check=False)
        assert res.returncode == 0, f"kube-proxy's stale chain deletion fails: {res.stderr}"
        chains, sets = objects(topo.node)
        assert chains == UPSTREAM_CHAINS | active, chains - UPSTREAM_CHAINS - active
        assert sets == UPSTREAM_SETS, sets - UPSTREAM_SETS
        # Served by kube-proxy's rules: web to pod a (ClusterIP, NodePort); old is gone.
        replies = topo.tcp(topo.pods["c"].ns, WEB_IP, 80, count=3, timeout=1.0)
        assert {r.pod for r in replies if r.ok} == {"a"}, replies
        client = topo.clients["client"]
        replies = netns.tcp(client.ns, netns.NODE_EXTERNAL_IP, NODE_PORT, count=2, timeout=1.0)
        assert {r.pod for r in replies if r.ok} == {"a"}, replies
        replies = topo.tcp(topo.pods["c"].ns, OLD_IP, 80, count=1, timeout=1.0)
        assert not any(r.ok for r in replies), replies
    finally:
        topo.close()
