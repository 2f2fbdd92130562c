"""`kproxy doctor` in network namespaces: each check sees the condition the test makes, and a
clean node namespace passes.

Every condition is made inside a namespace this test created (sysctls, rules, links,
conntrack entries, listeners); the only things outside are processes of the test's own tree
(a copy of `sleep` named firewalld), killed by pid.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns  # noqa: E402
from fake_apiserver import FakeApiServer  # noqa: E402

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parent.parent


def doctor(ns: str, *args: str, tmp: Path | None = None) -> tuple[int, dict[str, dict]]:
    """Run `kproxy doctor --output json` in `ns`: (exit status, {check: result})."""
    extra = [] if "--state-cache" in args else ["--state-cache", ""]
    if "--ufw-conf" not in args:
        extra += ["--ufw-conf", "/nonexistent/ufw.conf"]
    proc = netns.run(
        ns,
        [sys.executable, "-m", "kproxy", "doctor", "--output", "json", *extra, *args],
        check=False,
    )
    assert proc.returncode in (0, 1, 2), proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["exit"] == proc.returncode
    return proc.returncode, {c["name"]: c for c in doc["checks"]}


@pytest.fixture
def node(kernel_support: None) -> Iterator[netns.Topology]:
    """A bare node namespace, set up as a node would be: forwarding on."""
    topo = netns.Topology()
    try:
        yield topo
    finally:
        topo.close()


def test_clean_node_passes(node, monkeypatch):
    # No API server configured: not in a pod, and no kubeconfig (the default one ignored).
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    rc, checks = doctor(node.node)
    assert rc == 0, checks
    assert {c["status"] for c in checks.values()} <= {"ok", "skipped"}
    # What needs a daemon, the API server or the state cache says so, rather than passing.
    for name in ("stale_endpoints", "apiserver", "last_sync"):
        assert checks[name]["status"] == "skipped", checks[name]
    for name in ("mixed_backends", "forwarding", "forward_policy", "route_localnet"):
        assert checks[name]["status"] == "ok", checks[name]
    # The text output: one line per check, in order.
    proc = netns.run(
        node.node,
        [sys.executable, "-m", "kproxy", "doctor", "--state-cache", "", "--ufw-conf", "/x"],
        check=False,
    )
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert [ln.split()[1].rstrip(":") for ln in lines] == list(checks)
    # Looking created nothing: no legacy table, no nft table.
    names = netns.run(node.node, ["cat", "/proc/net/ip_tables_names"]).stdout
    assert names.split() == []


def test_mixed_backends(node):
    ns = node.node
    netns.run(ns, ["iptables-legacy", "-t", "nat", "-N", "KUBE-MARK-MASQ"])
    rc, checks = doctor(ns, "--check", "mixed_backends")
    assert checks["mixed_backends"]["status"] == "ok"  # legacy alone is fine
    assert "IPv4: legacy" in checks["mixed_backends"]["saw"]
    netns.run(ns, ["iptables-nft", "-t", "filter", "-N", "KUBE-FORWARD"])
    rc, checks = doctor(ns, "--check", "mixed_backends")
    assert rc == 2
    result = checks["mixed_backends"]
    assert result["status"] == "fail" and "both backends" in result["saw"]
    assert "legacy has nat/KUBE-MARK-MASQ, nft has filter/KUBE-FORWARD" in result["saw"]
    assert result["remedy"] == "docs/RECOVERY.md#mixed-iptables-backends"


def test_forwarding_off(node):
    netns.sysctl(node.node, "net.ipv4.ip_forward", 0)
    rc, checks = doctor(node.node, "--check", "forwarding")
    assert rc == 2
    assert checks["forwarding"]["status"] == "fail"
    assert "net.ipv4.ip_forward" in checks["forwarding"]["saw"]
    assert checks["forwarding"]["remedy"].endswith("#forwarding")


def test_ipv6_forwarding_off(kernel_support):
    topo = netns.Topology(ipv6=True)
    try:
        topo.add_pod("a", 2)  # the node gets a global IPv6 address
        rc, checks = doctor(topo.node, "--check", "forwarding")
        assert rc == 0, checks
        netns.sysctl(topo.node, "net.ipv6.conf.all.forwarding", 0)
        rc, checks = doctor(topo.node, "--check", "forwarding")
        assert rc == 2
        assert "net.ipv6.conf.all.forwarding off" in checks["forwarding"]["saw"]
    finally:
        topo.close()


def _conntrack_entries(ns: str, count: int) -> None:
    for i in range(count):
        netns.run(
            ns,
            ["conntrack", "-I", "-p", "udp", "-s", "10.1.0.1", "-d", "10.2.0.1"]
            + ["--sport", str(1000 + i), "--dport", "53", "-t", "120"],
        )


def test_conntrack_table(node):
    if netns.which("conntrack") is None:
        pytest.skip("conntrack (conntrack-tools) is not installed")
    rc, checks = doctor(node.node, "--check", "conntrack_table")
    assert checks["conntrack_table"]["status"] == "ok"
    # nf_conntrack_max cannot be lowered in a namespace (the kernel refuses): a few flows and
    # a tiny threshold make the same condition.
    _conntrack_entries(node.node, 5)
    rc, checks = doctor(
        node.node, "--check", "conntrack_table", "--conntrack-warn-percent", "0.001"
    )
    assert rc == 1
    assert checks["conntrack_table"]["status"] == "warn"
    assert "nf_conntrack_count 5 of" in checks["conntrack_table"]["saw"]

    from kproxy.doctor.context import Context
    from kproxy.doctor.kernel import conntrack_table

    result = netns.call_in(
        node.node, conntrack_table, Context(conntrack_warn=0.000001, conntrack_fail=0.00001)
    )
    assert result.status == "fail" and result.remedy == "conntrack-table"


@pytest.mark.parametrize("mode,status", [("iptables", "fail"), ("nftables", "warn")])
def test_forward_policy_drop(node, mode, status):
    ns = node.node
    netns.run(ns, ["iptables", "-P", "FORWARD", "DROP"])
    rc, checks = doctor(ns, "--check", "forward_policy", "--mode", mode)
    assert checks["forward_policy"]["status"] == status, checks
    assert "policy DROP" in checks["forward_policy"]["saw"]
    assert rc == (2 if status == "fail" else 1)
    netns.run(ns, ["iptables", "-N", "KUBE-FORWARD"])
    netns.run(ns, ["iptables", "-A", "FORWARD", "-j", "KUBE-FORWARD"])
    rc, checks = doctor(ns, "--check", "forward_policy", "--mode", mode)
    assert rc == 0 and checks["forward_policy"]["status"] == "ok"


def test_route_localnet_without_martian_rule(node):
    ns = node.node
    netns.sysctl(ns, "net.ipv4.conf.all.route_localnet", 1)
    rc, checks = doctor(ns, "--check", "route_localnet")
    assert rc == 2 and checks["route_localnet"]["status"] == "fail"
    netns.run(ns, ["iptables", "-N", "KUBE-FIREWALL"])
    netns.run(
        ns,
        ["iptables", "-A", "KUBE-FIREWALL", "!", "-s", "127.0.0.0/8", "-d", "127.0.0.0/8"]
        + ["-m", "comment", "--comment", "block incoming localnet connections"]
        + ["-m", "conntrack", "!", "--ctstate", "RELATED,ESTABLISHED,DNAT", "-j", "DROP"],
    )
    rc, checks = doctor(ns, "--check", "route_localnet")
    assert rc == 2 and "INPUT does not jump" in checks["route_localnet"]["saw"], checks
    netns.run(ns, ["iptables", "-A", "INPUT", "-j", "KUBE-FIREWALL"])
    rc, checks = doctor(ns, "--check", "route_localnet")
    assert rc == 0 and checks["route_localnet"]["status"] == "ok"


def test_other_mode_leftovers(node):
    ns = node.node
    if netns.which("nft") is None:
        pytest.skip("nft is not installed")
    netns.run(ns, ["nft", "add", "table", "ip", "kproxy"])
    rc, checks = doctor(ns, "--check", "other_mode_leftovers", "--mode", "iptables")
    assert rc == 1 and checks["other_mode_leftovers"]["status"] == "warn"
    assert "nftables mode's rules" in checks["other_mode_leftovers"]["saw"]
    rc, checks = doctor(ns, "--check", "other_mode_leftovers", "--mode", "nftables")
    assert rc == 0, checks
    netns.run(ns, ["iptables", "-t", "nat", "-N", "KUBE-SERVICES"])
    rc, checks = doctor(ns, "--check", "other_mode_leftovers", "--mode", "nftables")
    assert rc == 1 and "iptables mode's rules" in checks["other_mode_leftovers"]["saw"]


def test_bridge_without_netfilter(node):
    ns = node.node
    netns.ip(ns, "link", "add", "br-doc", "type", "bridge")
    rc, checks = doctor(ns, "--check", "bridge_netfilter")
    bridge_nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists()
    if not bridge_nf:
        # br_netfilter not loaded (the test never loads a module: that would change the host)
        assert rc == 2 and "br_netfilter is not loaded" in checks["bridge_netfilter"]["saw"]
        return
    assert rc == 0 and "br-doc" in checks["bridge_netfilter"]["saw"], checks
    netns.sysctl(ns, "net.bridge.bridge-nf-call-iptables", 0)
    rc, checks = doctor(ns, "--check", "bridge_netfilter")
    assert rc == 2 and checks["bridge_netfilter"]["status"] == "fail"
    assert "bridge-nf-call-iptables=0" in checks["bridge_netfilter"]["saw"]


def test_another_process_on_the_health_port(node, tmp_path):
    ns = node.node
    script = (
        "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',10256)); s.listen(); "
        "time.sleep(60)"
    )
    ready = tmp_path / "ready"
    listener = subprocess.Popen(
        [
            netns._ip(),
            "netns",
            "exec",
            ns,
            sys.executable,
            "-c",
            script.replace("s.listen();", f"s.listen(); open({str(ready)!r},'w').close();"),
        ],
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        rc, checks = doctor(ns, "--check", "other_proxy")
        assert rc == 2, checks
        assert checks["other_proxy"]["status"] == "fail"
        assert f"pid {listener.pid}" in checks["other_proxy"]["saw"]
        assert "port 10256" in checks["other_proxy"]["saw"]
    finally:
        os.kill(listener.pid, signal.SIGKILL)
        listener.wait(5)


def test_canary_without_a_proxy(node):
    ns = node.node
    netns.run(ns, ["iptables", "-t", "mangle", "-N", "KUBE-PROXY-CANARY"])
    rc, checks = doctor(ns, "--check", "other_proxy")
    assert rc == 1 and "KUBE-PROXY-CANARY" in checks["other_proxy"]["saw"]


def test_firewall_managers(node, tmp_path):
    fake = tmp_path / "firewalld"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", fake)
    proc = subprocess.Popen([str(fake), "60"], stdin=subprocess.DEVNULL)
    try:
        rc, checks = doctor(node.node, "--check", "firewall_managers")
        assert rc == 1
        assert f"firewalld (pid {proc.pid})" in checks["firewall_managers"]["saw"]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
    conf = tmp_path / "ufw.conf"
    conf.write_text("# ufw\nENABLED=no\nLOGLEVEL=low\n")
    rc, checks = doctor(node.node, "--check", "firewall_managers", "--ufw-conf", str(conf))
    assert rc == 0, checks
    conf.write_text("ENABLED=yes\n")
    rc, checks = doctor(node.node, "--check", "firewall_managers", "--ufw-conf", str(conf))
    assert rc == 1 and "ufw" in checks["firewall_managers"]["saw"]


def _udp_state(path: Path, endpoint: str) -> None:
    """A state cache: Service dns 10.96.0.10:53/UDP with one endpoint `endpoint`:5353."""
    from kproxy.sources import cache

    cache.save(
        path,
        [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"namespace": "default", "name": "dns"},
                "spec": {
                    "clusterIP": "10.96.0.10",
                    "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}],
                },
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "namespace": "default",
                    "name": "dns-1",
                    "labels": {"kubernetes.io/service-name": "dns"},
                },
                "addressType": "IPv4",
                "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
                "endpoints": [{"addresses": [endpoint], "conditions": {"ready": True}}],
            },
        ],
        "node-1",
    )


def test_stale_endpoints(node, tmp_path):
    if netns.which("conntrack") is None:
        pytest.skip("conntrack (conntrack-tools) is not installed")
    ns, state = node.node, tmp_path / "state.json"
    # A client's flow to the Service, DNATed to 10.244.1.9, which the state no longer has.
    netns.run(
        ns,
        ["conntrack", "-I", "-p", "udp", "-s", "10.244.1.5", "-d", "10.96.0.10"]
        + ["--sport", "4000", "--dport", "53", "-r", "10.244.1.9", "-q", "10.244.1.5"]
        + ["--reply-port-src", "5353", "--reply-port-dst", "4000", "-t", "120"],
    )
    _udp_state(state, "10.244.1.9")
    rc, checks = doctor(ns, "--check", "stale_endpoints", "--state-cache", str(state))
    assert rc == 0 and checks["stale_endpoints"]["status"] == "ok", checks
    _udp_state(state, "10.244.1.2")  # the endpoint moved
    rc, checks = doctor(ns, "--check", "stale_endpoints", "--state-cache", str(state))
    assert rc == 1 and checks["stale_endpoints"]["status"] == "warn"
    assert "10.96.0.10:53 -> 10.244.1.9:5353" in checks["stale_endpoints"]["saw"]


def _jwt(exp: float) -> str:
    def part(doc: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part({'sub': 'kproxy', 'exp': int(exp)})}.c2ln"


def _kubeconfig(path: Path, server: str, token: str) -> Path:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": token}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


def test_apiserver(node, tmp_path):
    ns = node.node
    api = netns.call_in(ns, lambda: FakeApiServer(host="127.0.0.1").start())
    try:
        rc, checks = doctor(ns, "--check", "apiserver", "--master", api.url)
        assert rc == 0, checks
        assert "lists Services (HTTP 200)" in checks["apiserver"]["saw"]
        good = _kubeconfig(tmp_path / "good", api.url, _jwt(time.time() + 7 * 86400))
        rc, checks = doctor(ns, "--check", "apiserver", "--kubeconfig", str(good))
        assert rc == 0 and "token expires in 168.0h" in checks["apiserver"]["saw"], checks
        soon = _kubeconfig(tmp_path / "soon", api.url, _jwt(time.time() + 3600))
        rc, checks = doctor(ns, "--check", "apiserver", "--kubeconfig", str(soon))
        assert rc == 1 and checks["apiserver"]["status"] == "warn", checks
        expired = _kubeconfig(tmp_path / "expired", api.url, _jwt(time.time() - 60))
        rc, checks = doctor(ns, "--check", "apiserver", "--kubeconfig", str(expired))
        assert rc == 2 and "token expired" in checks["apiserver"]["saw"], checks
        api.set_kind_fail("Service", "403")  # the credentials may not list Services
        rc, checks = doctor(ns, "--check", "apiserver", "--master", api.url)
        assert rc == 2 and "answers 403" in checks["apiserver"]["saw"], checks
    finally:
        api.stop()
    # Nothing answers any more.
    rc, checks = doctor(ns, "--check", "apiserver", "--master", api.url, "--api-timeout", "2s")
    assert rc == 2 and "unreachable" in checks["apiserver"]["saw"], checks
    assert checks["apiserver"]["remedy"].endswith("#apiserver")


class _Healthz(BaseHTTPRequestHandler):
    body: dict = {}
    code = 200

    def do_GET(self) -> None:  # noqa: N802
        data = json.dumps(self.body).encode()
        self.send_response(self.code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def _rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def test_last_sync(node, tmp_path):
    """A /healthz (kproxy's JSON shape) in the namespace: a recent sync passes, one older than
    two sync periods fails; an old state cache warns."""
    ns, now = node.node, time.time()
    handler = type("H", (_Healthz,), {})
    server = netns.call_in(ns, lambda: ThreadingHTTPServer(("127.0.0.1", 10256), handler))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        handler.body = {
            "lastUpdated": _rfc3339(now),
            "currentTime": _rfc3339(now),
            "healthy": True,
            "status": {"IPv4": {"lastUpdated": _rfc3339(now - 5), "healthy": True}},
            "stateCacheAgeSeconds": None,
        }
        rc, checks = doctor(ns, "--check", "last_sync")
        assert rc == 0 and "IPv4 synced" in checks["last_sync"]["saw"], checks
        handler.code = 503
        handler.body = {
            **handler.body,
            "healthy": False,
            "status": {"IPv4": {"lastUpdated": _rfc3339(now - 600), "healthy": False}},
        }
        rc, checks = doctor(ns, "--check", "last_sync")
        assert rc == 2 and "IPv4 synced 600s ago" in checks["last_sync"]["saw"], checks
        assert checks["last_sync"]["remedy"].endswith("#last-sync")
    finally:
        server.shutdown()
        server.server_close()
    state = tmp_path / "state.json"
    _udp_state(state, "10.244.1.2")
    rc, checks = doctor(ns, "--check", "last_sync", "--state-cache", str(state))
    assert rc == 0 and "state cache saved 0s ago" in checks["last_sync"]["saw"], checks
    old = time.time() - 7200
    doc = json.loads(state.read_text())
    doc["metadata"]["annotations"]["kproxy.io/saved-at"] = f"{old:.3f}"
    state.write_text(json.dumps(doc))
    rc, checks = doctor(ns, "--check", "last_sync", "--state-cache", str(state))
    assert rc == 1 and "state cache saved 7200s ago" in checks["last_sync"]["saw"], checks


def test_daemon_runs_the_checks_and_doctor_sees_it(kernel_support, tmp_path):
    """`kproxy run`: kproxy_node_check in its first scrape (every check at 0), then each
    check's status at 1; a condition made while it runs shows at its next round (every sync
    period) and is logged; `kproxy doctor` beside it sees kproxy on its ports and its syncs."""
    from test_kernel_daemon import Daemon, wait_for

    topo = netns.Topology()
    api = daemon = None
    try:
        api = netns.call_in(topo.node, lambda: FakeApiServer(host="127.0.0.1").start())
        api.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}})
        daemon = Daemon(topo, api, tmp_path / "kproxy.log")
        daemon.start("--iptables-sync-period", "2s")

        def status(check: str) -> str | None:
            for st in ("ok", "warn", "fail", "skipped"):
                if daemon.metric("kproxy_node_check", check=check, status=st) == 1:
                    return st
            return None

        wait_for("a first round of node checks", lambda: status("forwarding"), daemon=daemon)
        assert status("forwarding") == "ok"
        assert status("other_proxy") == "ok"  # its own listeners are kproxy's
        assert daemon.metric("kproxy_node_check", check="forwarding", status="fail") == 0
        netns.sysctl(topo.node, "net.ipv4.ip_forward", 0)
        wait_for("forwarding failing", lambda: status("forwarding") == "fail", daemon=daemon)
        assert "node check forwarding: fail" in daemon.log()
        netns.sysctl(topo.node, "net.ipv4.ip_forward", 1)
        wait_for("the first sync", lambda: "synced" in doctor_saw(topo.node), daemon=daemon)
        rc, checks = doctor(topo.node, "--check", "other_proxy", "--check", "last_sync")
        assert checks["other_proxy"]["status"] == "ok", checks
        assert "kproxy listens on" in checks["other_proxy"]["saw"]
        assert checks["last_sync"]["status"] == "ok", checks
        assert rc == 0
    finally:
        if daemon is not None:
            daemon.stop()
        if api is not None:
            api.stop()
        topo.close()


def doctor_saw(ns: str) -> str:
    return doctor(ns, "--check", "last_sync")[1]["last_sync"]["saw"]
