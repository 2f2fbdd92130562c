"""kproxy as kube-proxy, for real: the image's `kube-proxy` started with kubeadm's exact
arguments (`--config=<config.conf> --hostname-override=node-1`) and kubeadm's config.conf
(tests/data/kube-proxy-kubeadm.yaml) with only its addresses changed to the test's: the
kubeconfig pointing at the test API server, metrics and health on 127.0.0.1 ports of the
test's choosing. It serves a ClusterIP (pod to pod) and a NodePort (external client to the
node), and answers /metrics and /healthz on the file's addresses.

As in kube-proxy's DaemonSet, no writable /var/lib/kproxy: the daemon runs in a mount
namespace of its own where /var/lib is read-only and /run an empty tmpfs, so its state cache,
snapshots and lock go to /run (never the machine's). Network: everything inside namespaces the
test creates; the daemon is killed by pid.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns  # noqa: E402
import test_kernel_ipvs_leftovers as tkil  # noqa: E402
import test_kernel_manifests as tkm  # noqa: E402
import test_manifests as tm  # noqa: E402
from fake_apiserver import FakeApiServer  # noqa: E402

from kproxy.nftables.render import hash_name  # noqa: E402

pytestmark = pytest.mark.kernel

WEB_IP, NP_PORT = "10.96.0.10", 30080
POD_A = "10.244.1.2"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cluster.yaml"
METRICS_BIND, HEALTHZ_BIND = "127.0.0.1:20249", "127.0.0.1:20256"
# The daemon's own mount namespace: /var/lib read-only (kube-proxy's DaemonSet has no
# /var/lib/kproxy), /run empty, then exec kube-proxy's command line.
MOUNTS = (
    "mount --bind /var/lib /var/lib && mount -o remount,bind,ro /var/lib /var/lib && "
    'mount -t tmpfs kproxy-run /run && exec "$0" "$@"'
)


def kubeadm_dropin(tmp: Path, api_url: str, mode: str = "") -> tuple[Path, list[str]]:
    """kubeadm's config.conf with the test's addresses (and `mode`, kubeadm's ""), and
    kubeadm's command line for it."""
    objs = tm.load_docs(tm.KUBEADM)
    cm = tm.find(objs, "ConfigMap", "kube-proxy")
    ds = tm.find(objs, "DaemonSet", "kube-proxy")
    conf = yaml.safe_load(cm["data"]["config.conf"])
    assert conf["clusterCIDR"] == "10.244.0.0/16"
    assert conf["clientConnection"]["kubeconfig"] == "/var/lib/kube-proxy/kubeconfig.conf"
    conf["clientConnection"]["kubeconfig"] = str(tkm.kubeconfig_for(api_url, tmp))
    assert conf["metricsBindAddress"] == conf["healthzBindAddress"] == ""
    conf["metricsBindAddress"], conf["healthzBindAddress"] = METRICS_BIND, HEALTHZ_BIND
    assert conf["mode"] == ""
    conf["mode"] = mode
    path = tmp / "config.conf"
    path.write_text(yaml.safe_dump(conf))
    command = tm.container(ds)["command"]
    assert command == [
        "/usr/local/bin/kube-proxy",
        "--config=/var/lib/kube-proxy/config.conf",
        "--hostname-override=$(NODE_NAME)",
    ]
    args = [a.replace("/var/lib/kube-proxy/config.conf", str(path)) for a in command[1:]]
    return path, [a.replace("$(NODE_NAME)", "node-1") for a in args]


def kube_proxy_binary(tmp: Path, script: str | None = None) -> Path:
    """What the image's /usr/local/bin/kube-proxy is: kproxy's console script under the name
    kube-proxy (the name alone makes it `kproxy run`); `script` replaces its body."""
    path = tmp / "bin" / "kube-proxy"
    path.parent.mkdir()
    body = script or "import sys\nfrom kproxy.cli import main\nsys.exit(main())\n"
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


def start_kube_proxy(
    topo: netns.Topology, tmp: Path, binary: Path, args: list[str]
) -> tuple[subprocess.Popen, IO[bytes], Callable[[], str]]:
    """kproxy started as kube-proxy's DaemonSet starts it (`binary ARGS`), in node-1 with a
    mount namespace of its own for MOUNTS: the process, its log file, and its log so far."""
    path = tmp / "kube-proxy.log"
    log = open(path, "wb")  # noqa: SIM115 - closed by stop_kube_proxy
    proc = subprocess.Popen(
        [netns._ip(), "netns", "exec", topo.node]
        + ["unshare", "--mount", "--propagation", "private", "sh", "-c", MOUNTS]
        + [str(binary), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=netns.command_env(),
    )
    return proc, log, lambda: path.read_text(errors="replace")


def stop_kube_proxy(proc: subprocess.Popen | None, log: IO[bytes] | None) -> None:
    """Stop it by its pid (SIGTERM, then SIGKILL), and close its log."""
    netns.stop_process(proc)
    if log is not None:
        log.close()


def cluster(api: FakeApiServer) -> None:
    api.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}})
    api.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"namespace": "default", "name": "web"},
            "spec": {
                "type": "NodePort",
                "clusterIP": WEB_IP,
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": NP_PORT}],
            },
        }
    )
    api.apply(
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": "default",
                "name": "web-1",
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": [POD_A], "conditions": {"ready": True}, "nodeName": "node-1"}
            ],
        }
    )


@contextlib.contextmanager
def dropin_node(
    pods: tuple[tuple[str, int], ...] = (("a", 2), ("b", 3)), servers: tuple[str, ...] = ("a",)
) -> Iterator[tuple[netns.Topology, FakeApiServer]]:
    """A node with `pods` (a TCP server on 8080 in each of `servers`), an external client,
    and the test API server holding cluster()'s objects; all gone afterwards."""
    if netns.which("unshare") is None:
        pytest.skip("util-linux `unshare` is not installed")
    topo = netns.build(pods=pods, clients=1)
    api = None
    try:
        for name in servers:
            topo.start_server(topo.pods[name], tcp=[8080])
        api = netns.call_in(topo.node, lambda: FakeApiServer(host="127.0.0.1").start())
        cluster(api)
        yield topo, api
    finally:
        if api is not None:
            api.stop()
        topo.close()


def test_kubeadms_command_line_and_config_conf_serve_clusterip_nodeport_metrics_health(
    kernel_support: None, tmp_path: Path
):
    with dropin_node() as (topo, api):
        proc = log = None
        try:
            _, args = kubeadm_dropin(tmp_path, api.url)
            assert args == [f"--config={tmp_path / 'config.conf'}", "--hostname-override=node-1"]
            binary = kube_proxy_binary(tmp_path)
            # kube-proxy's nftables-mode tables, as a node that ran it in nftables mode keeps
            # them, and a table of someone else's.
            for family in ("ip", "ip6"):
                netns.run(topo.node, ["nft", f"add table {family} kube-proxy"])
                netns.run(topo.node, ["nft", f"add chain {family} kube-proxy services"])
            netns.run(topo.node, ["nft", "add table ip someone-else"])
            proc, log, logged = start_kube_proxy(topo, tmp_path, binary, args)

            def wait_for(what, check):
                tkm.wait_for(what, check, proc, tmp_path, 30.0, logged)

            # /healthz on the file's healthzBindAddress: 200 once the first full sync is done.
            wait_for(
                f"/healthz 200 on {HEALTHZ_BIND}",
                lambda: (tkm.get(topo, f"http://{HEALTHZ_BIND}/healthz") or (0,))[0] == 200,
            )
            # After the first sync, kube-proxy's nftables tables go; no one else's.
            wait_for(
                "kube-proxy's nftables tables removed",
                lambda: "kube-proxy" not in netns.run(topo.node, ["nft", "list", "tables"]).stdout,
            )
            assert "table ip someone-else" in netns.run(topo.node, ["nft", "list", "tables"]).stdout
            # The ClusterIP, pod to pod; the NodePort, external client to the node's address.
            replies = topo.tcp(topo.pods["b"].ns, WEB_IP, 80, count=3, timeout=1.0)
            assert {r.pod for r in replies if r.ok} == {"a"}, replies
            client = topo.clients["client"]
            replies = netns.tcp(client.ns, netns.NODE_EXTERNAL_IP, NP_PORT, count=3, timeout=1.0)
            assert {r.pod for r in replies if r.ok} == {"a"}, replies
            # /metrics on the file's metricsBindAddress, and not on kube-proxy's default port.
            status, text = tkm.get(topo, f"http://{METRICS_BIND}/metrics") or (0, "")
            assert status == 200
            assert re.search(
                r"^kubeproxy_sync_proxy_rules_last_timestamp_seconds [1-9]", text, re.M
            )
            assert tkm.get(topo, "http://127.0.0.1:10249/metrics") is None
            assert tkm.get(topo, "http://127.0.0.1:10256/healthz") is None
            # It read the cluster through the file's kubeconfig, as node-1 (the flag), in
            # iptables mode (the file's mode "" is upstream's default), with kube-proxy's chains.
            assert any(r.path.startswith("/api/v1/services") for r in api.requests)
            nodes = [r for r in api.requests if r.path.startswith("/api/v1/nodes")]
            assert nodes and all("node-1" in r.path + str(r.query) for r in nodes), nodes
            assert "-A KUBE-SERVICES" in topo.iptables_save("nat")
            # No writable /var/lib/kproxy: said once, state went to /run/kproxy.
            text = logged()
            assert text.count("/var/lib/kproxy cannot be written") == 1, text
            assert "state cache and snapshots go to /run/kproxy" in text
            # kubeadm's file is all defaults: no field kproxy had to ignore, no error.
            assert " error " not in text and "ignored" not in text, text
            # The file changes (a ConfigMap update): kproxy exits, as kube-proxy does, for its
            # pod to restart with it; the rules stay.
            conf_path = tmp_path / "config.conf"
            conf_path.write_text(conf_path.read_text() + "\n# edited\n")
            assert proc.wait(15) == 1
            assert "config.conf changed: exiting" in logged()
            assert "-A KUBE-SERVICES" in topo.iptables_save("nat")
        finally:
            stop_kube_proxy(proc, log)


def test_mode_ipvs_on_a_node_kube_proxy_ran_in_ipvs_mode_removes_its_leftovers(
    kernel_support: None, tmp_path: Path
):
    """kubeadm's file with `mode: ipvs` on a node as kube-proxy in IPVS mode leaves it
    (tests/test_kernel_ipvs_leftovers.py builds it: kube-ipvs0 holding the ClusterIP, the
    ipsets, the IPVS-mode chains, a set and chain of someone else's): kproxy runs nftables
    mode, and after its first full sync removes the leftovers, nothing else; the ClusterIP
    and the NodePort answer through kproxy's table."""
    with dropin_node() as (topo, api):
        proc = log = None
        try:
            _, args = kubeadm_dropin(tmp_path, api.url, mode="ipvs")
            # kube-ipvs0 is a bridge here (no dummy links in this kernel): allowed for the test.
            binary = kube_proxy_binary(tmp_path, tkil.BRIDGE_AS_DUMMY)
            tkil.build_ipvs_node(topo.node)
            proc, log, logged = start_kube_proxy(topo, tmp_path, binary, args)

            tkm.wait_for(
                "kube-ipvs0 removed",
                lambda: "kube-ipvs0" not in netns.ip(topo.node, "link", "show").stdout,
                proc,
                tmp_path,
                30.0,
                logged,
            )
            # Removed after the first full sync: kproxy's table was in place before.
            assert (tkm.get(topo, f"http://{HEALTHZ_BIND}/healthz") or (0,))[0] == 200
            text = logged()
            assert text.index("removed kube-proxy's IPVS-mode") > text.index("synced IPv4")
            # Wait for the ipsets: the last thing removed.
            tkm.wait_for(
                "the ipsets removed",
                lambda: tkil.sets_present(topo.node) == {tkil.FOREIGN_SET},
                proc,
                tmp_path,
                30.0,
                logged,
            )
            tkil.assert_ipvs_gone(topo.node)
            # nftables mode: kube-proxy's chains shared with iptables mode went too.
            assert netns.nft_table(topo.node, table="kube-proxy") is not None  # kproxy's
            assert "KUBE-SERVICES" not in topo.iptables_save("nat")
            text = logged()
            assert text.count("removed kube-proxy's IPVS-mode interface kube-ipvs0") == 1, text
            assert text.count("removed kube-proxy's IPVS-mode ipsets") == 1, text
            assert "runs its nftables mode instead" in text
            # The ClusterIP, pod to pod; the NodePort, external client to the node's address.
            replies = topo.tcp(topo.pods["b"].ns, WEB_IP, 80, count=3, timeout=1.0)
            assert {r.pod for r in replies if r.ok} == {"a"}, replies
            client = topo.clients["client"]
            replies = netns.tcp(client.ns, netns.NODE_EXTERNAL_IP, NP_PORT, count=3, timeout=1.0)
            assert {r.pod for r in replies if r.ok} == {"a"}, replies
        finally:
            stop_kube_proxy(proc, log)


def test_init_only_sets_the_sysctls_and_exits_and_cleanup_removes_the_rules(
    kernel_support: None, tmp_path: Path
):
    """`kube-proxy --init-only` (an init container's privileged start) sets what kube-proxy's
    would in the node's namespace and exits; `kube-proxy --cleanup` removes the rules and
    exits. Both with kubeadm's --config, as a DaemonSet would pass them."""
    if netns.which("unshare") is None:
        pytest.skip("util-linux `unshare` is not installed")
    topo = netns.build(pods=(), clients=0)
    try:
        _, args = kubeadm_dropin(tmp_path, "http://127.0.0.1:1")  # no API server needed
        binary = kube_proxy_binary(tmp_path)

        def kube_proxy(*extra: str) -> subprocess.CompletedProcess[str]:
            return netns.run(
                topo.node,
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", MOUNTS]
                + [str(binary), *args, *extra],
                check=False,
                timeout=60,
            )

        def sysctl(key: str) -> str:
            return netns.run(topo.node, ["cat", f"/proc/sys/{key}"]).stdout.strip()

        established = "net/netfilter/nf_conntrack_tcp_timeout_established"
        assert sysctl("net/ipv4/conf/all/route_localnet") == "0"
        assert sysctl(established) != "86400"
        res = kube_proxy("--init-only")
        assert res.returncode == 0, res.stdout + res.stderr
        assert sysctl("net/ipv4/conf/all/route_localnet") == "1"  # localhost NodePorts
        assert sysctl(established) == "86400"  # kube-proxy's 24h
        assert "KUBE-SERVICES" not in topo.iptables_save("nat")  # no sync: init only
        # Rules as a sync writes them, then kube-proxy --cleanup removes them.
        sync = netns.run(
            topo.node,
            [sys.executable, "-m", "kproxy", "sync", "--state", str(EXAMPLE)]
            + ["--cluster-cidr", "10.244.0.0/16", "--lock-file", str(tmp_path / "lock")],
            check=False,
        )
        assert sync.returncode == 0, sync.stderr
        assert "-A KUBE-SERVICES" in topo.iptables_save("nat")
        netns.run(topo.node, ["nft", "-f", "-"], input=KUBE_PROXY_NFTABLES)  # its nftables mode's
        netns.run(topo.node, ["nft", "add table ip someone-else"])
        res = kube_proxy("--cleanup")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "KUBE-SERVICES" not in topo.iptables_save("nat")
        left = netns.nft_tables(topo.node)
        assert "ip someone-else" in left and not any("kube-proxy" in t for t in left), left
    finally:
        topo.close()


# What kube-proxy's nftables mode left on the node, as it writes it: its comment, its base
# chain, a Service chain sending the ClusterIP to pod b (stale: the Service's endpoint is pod
# a now), and an affinity set.
SVC_CHAIN = "service-" + hash_name("default/web/tcp/http")
AFFINITY = "affinity-" + hash_name("default/web/tcp/http__10.244.1.3/8080")
KUBE_PROXY_NFTABLES = f"""
add table ip kube-proxy {{ comment "rules for kube-proxy" ; }}
add chain ip kube-proxy nat-prerouting {{ type nat hook prerouting priority -100 ; }}
add chain ip kube-proxy services
add chain ip kube-proxy {SVC_CHAIN}
add set ip kube-proxy {AFFINITY} {{ type ipv4_addr ; flags dynamic,timeout ; timeout 3h ; }}
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy services ip daddr {WEB_IP} tcp dport 80 goto {SVC_CHAIN}
add rule ip kube-proxy {SVC_CHAIN} meta l4proto tcp dnat to 10.244.1.3:8080
"""


def test_in_kube_proxys_place_nftables_mode_writes_kube_proxys_table_for_a_one_command_way_back(
    kernel_support: None, tmp_path: Path
):
    """kubeadm's file with `mode: nftables` on a node whose kube-proxy ran nftables mode (its
    `kube-proxy` table, with a stale Service chain) and where an earlier kproxy left its
    `kproxy` table: kproxy takes kube-proxy's table over in one transaction (made anew, with
    kproxy's comment; nothing of the old left), removes its own old table after the first
    sync, and serves. Then the way back, one image swap: kproxy stops (the rules stay and
    serve), and kube-proxy's start in iptables mode deletes the `kube-proxy` tables
    (upstream's platformCleanup -> nftables.CleanupLeftovers): nothing of kproxy's is left.
    (Its nftables mode takes the table over instead: tests/test_kernel_takeover.py.)"""
    with dropin_node(pods=(("a", 2), ("b", 3), ("c", 4)), servers=("a", "c")) as (topo, api):
        proc = log = None
        try:
            _, args = kubeadm_dropin(tmp_path, api.url, mode="nftables")
            netns.run(topo.node, ["nft", "-f", "-"], input=KUBE_PROXY_NFTABLES)
            netns.run(topo.node, ["nft", 'add table ip kproxy { comment "rules for kproxy" ; }'])
            netns.run(topo.node, ["nft", "add chain ip kproxy services"])
            # Before: kube-proxy's stale rules send the ClusterIP to pod b (nothing listens).
            replies = topo.tcp(topo.pods["c"].ns, WEB_IP, 80, count=1, timeout=1.0)
            assert not any(r.ok for r in replies), replies
            proc, log, logged = start_kube_proxy(topo, tmp_path, kube_proxy_binary(tmp_path), args)
            tkm.wait_for(
                "the old kproxy table removed",
                lambda: "ip kproxy" not in netns.nft_tables(topo.node),
                proc,
                tmp_path,
                30.0,
                logged,
            )
            assert "(nftables mode, table kube-proxy, IPv4 and IPv6)" in logged()  # it says so
            # Both families (the test's namespaces have IPv6): kube-proxy's name only.
            assert sorted(netns.nft_tables(topo.node)) == ["ip kube-proxy", "ip6 kube-proxy"]
            table = netns.nft_table(topo.node, table="kube-proxy")
            assert 'comment "rules for kproxy"' in table
            assert "10.244.1.3" not in table and "affinity-" not in table  # nothing stale stayed
            assert SVC_CHAIN in table  # upstream's names, kproxy's rules
            replies = topo.tcp(topo.pods["c"].ns, WEB_IP, 80, count=3, timeout=1.0)
            assert {r.pod for r in replies if r.ok} == {"a"}, replies
            client = topo.clients["client"]
            replies = netns.tcp(client.ns, netns.NODE_EXTERNAL_IP, NP_PORT, count=3, timeout=1.0)
            assert {r.pod for r in replies if r.ok} == {"a"}, replies
            # A one-shot command on the node finds the table kproxy writes there.
            diff = netns.run(
                topo.node,
                [sys.executable, "-m", "kproxy", "diff", "--mode", "nftables", "--master", api.url]
                + ["--node-name", "node-1", "--cluster-cidr", "10.244.0.0/16"]
                + ["--lock-file", str(tmp_path / "diff.lock")],
                check=False,
            )
            assert diff.returncode == 0, diff.stdout + diff.stderr
            # The way back: the image swapped back, kproxy's pod stops; its rules stay and serve.
            stop_kube_proxy(proc, log)
            proc = log = None
            replies = topo.tcp(topo.pods["c"].ns, WEB_IP, 80, count=3, timeout=1.0)
            assert {r.pod for r in replies if r.ok} == {"a"}, replies
            # kube-proxy starts in iptables mode: its cleanup of nftables mode's rules.
            for family in ("ip", "ip6"):
                netns.run(topo.node, ["nft", f"delete table {family} kube-proxy"], check=False)
            assert netns.nft_tables(topo.node) == []
        finally:
            stop_kube_proxy(proc, log)
