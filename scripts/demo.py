#!/usr/bin/env python3
"""kproxy demo: a throw-away node with pods in network namespaces, real Service traffic.

Run as root (``make demo``). Builds a node namespace, one namespace per pod of
examples/cluster.yaml (plus a ``debug`` pod and an external client), runs
``kproxy sync`` inside the node namespace, sends traffic to the ClusterIPs, the NodePort
and the Service without endpoints, then shows that ``kproxy diff`` has nothing pending.
Everything it created is deleted at the end, also on errors and Ctrl-C. Nothing is done in
the machine's own network namespace.

Exit status: 0 when every check passed (every web and dns pod answered, the empty Service
was refused, diff found nothing pending), 1 otherwise.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "cluster.yaml"
CLUSTER_CIDR = "10.244.0.0/16"
NODE_NAME = "node-1"
DEBUG_POD = ("debug", 10)


def _load_netns():
    spec = importlib.util.spec_from_file_location("netns", REPO / "tests" / "netns.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["netns"] = module
    spec.loader.exec_module(module)
    return module


netns = _load_netns()


# --------------------------------------------------------------------------- output


def heading(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(3, 74 - len(text)), flush=True)


def say(text: str = "") -> None:
    print(text, flush=True)


class Checks:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def check(self, ok: bool, what: str) -> bool:
        say(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            self.failures.append(what)
        return ok


# --------------------------------------------------------------------------- example


def load_example(path: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """(services by name, pods by name) from the example file.

    A pod is every endpoint of every EndpointSlice: {ip, tcp: [...], udp: [...]}.
    """
    doc = yaml.safe_load(path.read_text())
    services: dict[str, dict] = {}
    pods: dict[str, dict] = {}
    for obj in doc.get("items", []):
        if obj.get("kind") == "Service":
            services[obj["metadata"]["name"]] = obj
        elif obj.get("kind") == "EndpointSlice":
            ports = obj.get("ports") or []
            for ep in obj.get("endpoints") or []:
                ip = ep["addresses"][0]
                name = (ep.get("targetRef") or {}).get("name") or f"pod-{ip.split('.')[-1]}"
                pod = pods.setdefault(name, {"ip": ip, "tcp": [], "udp": []})
                for p in ports:
                    pod["udp" if p.get("protocol") == "UDP" else "tcp"].append(p["port"])
    return services, pods


def kproxy_argv() -> list[str]:
    script = Path(sys.executable).with_name("kproxy")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "kproxy"]


def run_kproxy(topo, command: str, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [*kproxy_argv(), command, "--state", str(EXAMPLE.relative_to(REPO))]
    argv += ["--cluster-cidr", CLUSTER_CIDR, "--node-name", NODE_NAME, *extra]
    shown = ["ip", "netns", "exec", topo.node, "kproxy", *argv[len(kproxy_argv()) :]]
    say(f"$ {shlex.join(shown)}")
    proc = topo.run(topo.node, argv, check=False, timeout=120)
    for line in (proc.stdout + proc.stderr).splitlines():
        say(f"  | {line}")
    say(f"  (exit status {proc.returncode})")
    return proc


# --------------------------------------------------------------------------- traffic


def show_requests(label: str, replies) -> Counter[str]:
    say(f"{label}:")
    for i, reply in enumerate(replies, 1):
        say(f"  #{i:<2} {reply}")
    counts = netns.tally(replies)
    say("  tally: " + ", ".join(f"{pod}={n}" for pod, n in sorted(counts.items())))
    return counts


def nat_excerpt(save: str, services: dict[str, dict]) -> list[str]:
    """KUBE-SERVICES rules plus the web Service's KUBE-SVC/KUBE-SEP chains."""
    lines = save.splitlines()
    keep = [line for line in lines if line.startswith("-A KUBE-SERVICES")]
    web_ip = services["web"]["spec"]["clusterIP"]
    svc_chain = None
    for line in keep:
        m = re.search(rf"-d {re.escape(web_ip)}/32 .*-j (KUBE-SVC-\S+)", line)
        if m:
            svc_chain = m.group(1)
    if svc_chain:
        svc_rules = [line for line in lines if line.startswith(f"-A {svc_chain} ")]
        keep += svc_rules
        seps = {m.group(1) for r in svc_rules if (m := re.search(r"-j (KUBE-SEP-\S+)", r))}
        keep += [line for line in lines if any(line.startswith(f"-A {s} ") for s in seps)]
    return keep


# --------------------------------------------------------------------------- main


def demo(topo_holder: list) -> int:
    checks = Checks()
    services, pods = load_example(EXAMPLE)
    web = services["web"]["spec"]
    dns = services["dns"]["spec"]
    empty = services["empty"]["spec"]
    web_pods = {n for n, p in pods.items() if web["ports"][0]["targetPort"] in p["tcp"]}
    dns_pods = {n for n, p in pods.items() if dns["ports"][0]["targetPort"] in p["udp"]}

    heading("1. Topology (network namespaces; nothing touches this machine's network)")
    topo = netns.Topology()
    topo_holder.append(topo)
    say(f"node namespace    {topo.node}  (kproxy runs here; node IP {netns.NODE_EXTERNAL_IP})")
    for name, pod in sorted(pods.items(), key=lambda kv: kv[1]["ip"]):
        octet = int(pod["ip"].rsplit(".", 1)[1])
        p = topo.add_pod(name, octet)
        say(f"pod {name:<14}{p.ns}  {p.ip}  via node veth {p.host_if}")
    debug = topo.add_pod(*DEBUG_POD)
    say(f"pod {debug.name:<14}{debug.ns}  {debug.ip}  (client pod, no Service)")
    client = topo.add_client("client")
    say(f"external client   {client.ns}  {client.ip}")

    heading("2. Pod servers (each answers with its own name)")
    for name, pod in pods.items():
        server = topo.start_server(topo.pods[name], tcp=pod["tcp"], udp=pod["udp"])
        ports = [f"{p}/tcp" for p in pod["tcp"]] + [f"{p}/udp" for p in pod["udp"]]
        say(f"{name:<8} pid {server.pid:<8} listening on {', '.join(ports)}")

    heading("3. kproxy sync")
    proc = run_kproxy(topo, "sync")
    if not checks.check(proc.returncode == 0, "kproxy sync exits 0"):
        return 1

    heading("4. The nat rules kproxy wrote (excerpt: KUBE-SERVICES and the web Service)")
    for line in nat_excerpt(topo.iptables_save("nat"), services):
        say(f"  {line}")
    say("filter table, Services without endpoints are rejected:")
    for line in topo.iptables_save("filter").splitlines():
        if line.startswith(("-A KUBE-SERVICES", "-A KUBE-EXTERNAL-SERVICES")):
            say(f"  {line}")

    heading("5. Traffic")
    web_ip, web_port = web["clusterIP"], web["ports"][0]["port"]
    node_port = web["ports"][0]["nodePort"]
    web_counts: Counter[str] = Counter()
    web_counts += show_requests(
        f"TCP {web_ip}:{web_port} (web ClusterIP) from pod debug",
        topo.tcp(debug.ns, web_ip, web_port, count=12),
    )
    web_counts += show_requests(
        f"TCP {web_ip}:{web_port} (web ClusterIP) from the node",
        topo.tcp(topo.node, web_ip, web_port, count=12),
    )
    web_counts += show_requests(
        f"TCP {netns.NODE_EXTERNAL_IP}:{node_port} (web NodePort) from the external client",
        topo.tcp(client.ns, netns.NODE_EXTERNAL_IP, node_port, count=6),
    )
    dns_ip, dns_port = dns["clusterIP"], dns["ports"][0]["port"]
    dns_replies = topo.udp(debug.ns, dns_ip, dns_port, count=16)
    dns_counts = show_requests(
        f"UDP {dns_ip}:{dns_port} (dns ClusterIP) from pod debug", dns_replies
    )
    empty_ip, empty_port = empty["clusterIP"], empty["ports"][0]["port"]
    empty_replies = topo.tcp(debug.ns, empty_ip, empty_port, count=1, timeout=3)
    show_requests(
        f"TCP {empty_ip}:{empty_port} (empty: no endpoints) from pod debug", empty_replies
    )

    say("\nweb total: " + ", ".join(f"{p}={n}" for p, n in sorted(web_counts.items())))
    checks.check(
        set(web_counts) == web_pods,
        f"every web pod ({', '.join(sorted(web_pods))}) answered, and only they",
    )
    checks.check(
        set(dns_counts) == dns_pods,
        f"every dns pod ({', '.join(sorted(dns_pods))}) answered, and only they",
    )
    refused = empty_replies[0].result == "refused" and empty_replies[0].elapsed < 1
    checks.check(refused, "the Service without endpoints is refused at once (REJECT)")

    heading("6. Nothing pending: kproxy diff, then a second sync")
    before = topo.iptables_save()
    proc = run_kproxy(topo, "diff")
    checks.check(proc.returncode == 0, "kproxy diff exits 0 (kernel already matches the file)")
    proc = run_kproxy(topo, "sync")
    checks.check(proc.returncode == 0, "second kproxy sync exits 0")
    checks.check(topo.iptables_save() == before, "the second sync left the rules unchanged")

    heading("Result")
    if checks.failures:
        say("FAILED: " + "; ".join(checks.failures))
        return 1
    say("all checks passed")
    return 0


def main() -> int:
    if os.geteuid() != 0:
        print("demo: must run as root (it creates network namespaces)", file=sys.stderr)
        return 1
    reason = netns.probe_netns_support()
    if reason is not None:
        print(f"demo: cannot run here: {reason}", file=sys.stderr)
        return 1

    os.chdir(REPO)  # the state file is shown and passed relative to the repository
    holder: list = []

    def teardown() -> None:
        for topo in holder:
            topo.close()

    atexit.register(teardown)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    try:
        return demo(holder)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # let the teardown finish
        heading("Teardown")
        for topo in holder:
            pids = [s.pid for s in topo.servers]
            namespaces = list(topo.namespaces)
            topo.close()
            say(f"killed pod servers (pids {', '.join(map(str, pids)) or 'none'})")
            say(f"deleted namespaces {', '.join(namespaces) or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
