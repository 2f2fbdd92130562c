"""Throw-away network topologies in Linux network namespaces, built with iproute2.

Everything this module creates lives in namespaces it created itself, named
``kpt-<6 hex>-<role>``; nothing is ever added to the caller's (root) namespace: veth pairs
are created directly inside the node namespace with their peer inside the pod namespace
(``ip -n NODE link add vpX type veth peer name eth0 netns POD``), and every other command
runs through ``ip -n NS`` or ``ip netns exec NS``.

Layout (no bridge: every pod link is its own routed L3 hop, so all pod<->pod traffic
crosses the node's netfilter hooks)::

    pod ns  eth0 10.244.1.X/32  --veth--  vpX 10.244.1.1/32  node ns
            route 10.244.1.1 dev eth0          route 10.244.1.X/32 dev vpX
            default via 10.244.1.1             ip_forward=1, rp_filter=0, icmp_ratelimit=0

    client ns eth0 192.168.100.2/24 --veth-- vcX 192.168.100.1/24 node ns
                                             default via 192.168.100.2

The node's default route points at the client namespace so that ClusterIPs are routable
from the node before DNAT; the client namespace does not forward, so nothing leaves.
Later clients (.3, ...) reach the node's 192.168.100.1 over their own veth (a /32 route on
the node side). ``client_route(CIDR)`` makes every client send CIDR (externalIPs, load
balancer IPs) via 192.168.100.1.

Optional second node (``add_node2()``), where no kproxy runs, with its own routed pods::

    node ns  vn2 192.168.200.1/24 --veth-- vn1 192.168.200.2/24  node2 ns
             route 10.244.2.0/24 via .2         route 10.244.1.0/24 via .1, default via .1
                                                ip_forward=1, rp_filter=0
    node2 pods: eth0 10.244.2.X/32 -- vpX 10.244.2.1/32 (``add_pod(name, X, node=2)``)

Optional IPv6 (``Topology(ipv6=True)``; every address is added ``nodad``)::

    pods     eth0 fd00:10:244:N::X/128, route fd00:10:244:N::1 dev eth0, default via it
    nodes    vpX fd00:10:244:N::1/128, route fd00:10:244:N::X/128 dev vpX, forwarding=1
    clients  eth0 fd00:192:168:100::X/64, node fd00:192:168:100::1, node default via ::2
    node<->node2  fd00:192:168:200::1/64 and ::2/64, routes as for IPv4

No pytest dependency: the tests and ``scripts/demo.py`` both use it. Typical use::

    with Topology() as topo:
        topo.add_pod("a", 2)
        topo.add_client()
        topo.start_server(topo.pods["a"], tcp=[8080], udp=[5353])
        print(topo.tcp(topo.node, "10.244.1.2", 8080))
"""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PODSERVER = Path(__file__).resolve().with_name("podserver.py")

POD_GATEWAY = "10.244.1.1"
POD_PREFIX = "10.244.1."
NODE_EXTERNAL_IP = "192.168.100.1"
CLIENT_PREFIX = "192.168.100."

NODE_NAME = "node-1"
NODE2_NAME = "node-2"
NODE2_POD_GATEWAY = "10.244.2.1"
NODE2_POD_PREFIX = "10.244.2."
NODE_LINK_IP = "192.168.200.1"  # node <-> node2 link, node side
NODE2_LINK_IP = "192.168.200.2"

POD6_GATEWAY = "fd00:10:244:1::1"
POD6_PREFIX = "fd00:10:244:1::"
NODE2_POD6_GATEWAY = "fd00:10:244:2::1"
NODE2_POD6_PREFIX = "fd00:10:244:2::"
NODE6_EXTERNAL_IP = "fd00:192:168:100::1"
CLIENT6_PREFIX = "fd00:192:168:100::"
NODE_LINK_IP6 = "fd00:192:168:200::1"
NODE2_LINK_IP6 = "fd00:192:168:200::2"

_SBIN_PATHS = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin", "/bin")


def command_env() -> dict[str, str]:
    """The environment for every command: ours, with the sbin directories on PATH."""
    env = os.environ.copy()
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p]
    for extra in _SBIN_PATHS:
        if extra not in parts:
            parts.append(extra)
    env["PATH"] = os.pathsep.join(parts)
    return env


def which(cmd: str) -> str | None:
    return shutil.which(cmd, path=command_env()["PATH"])


def _ip() -> str:
    path = which("ip")
    if path is None:
        raise RuntimeError("iproute2's `ip` command was not found")
    return path


class CommandError(RuntimeError):
    def __init__(self, argv: Sequence[str], proc: subprocess.CompletedProcess[str]):
        self.argv = list(argv)
        self.proc = proc
        detail = (proc.stderr or proc.stdout or "").strip()
        super().__init__(f"`{' '.join(self.argv)}` exited {proc.returncode}: {detail}")


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=command_env(),
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise CommandError(argv, proc)
    return proc


def run(
    ns: str,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside namespace ``ns`` (``ip netns exec``); output is captured as text."""
    return _run([_ip(), "netns", "exec", ns, *argv], check=check, timeout=timeout, input=input)


def stop_process(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """Stop a process this test started, by its pid: SIGTERM, then SIGKILL after `grace`
    seconds (a daemon that does not stop in time is killed, never left running)."""
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


def run_pid(ns: str, argv: Sequence[str], timeout: float = 60) -> int:
    """Run ``argv`` inside ``ns`` and return its pid (``ip netns exec`` execs the command, so
    the pid is the command's own: what nf_tables names as the author of its changes)."""
    proc = subprocess.Popen(
        [_ip(), "netns", "exec", ns, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=command_env(),
    )
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, list(argv), stderr=err)
    return proc.pid


def ip(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ip -n NS ARGS...``: an iproute2 command acting on namespace ``ns``."""
    return _run([_ip(), "-n", ns, *args], check=check)


def sysctl(ns: str, key: str, value: str | int) -> None:
    run(ns, ["sysctl", "-q", "-w", f"{key}={value}"])


_COUNTERS = re.compile(r"\[\d+:\d+\]")


def iptables_save(
    ns: str,
    table: str | None = None,
    *,
    raw: bool = False,
    family: int = 4,
    counters: bool = False,
    variant: str | None = None,
) -> str:
    """``iptables-save [-t table]`` (``ip6tables-save`` for family 6) inside ``ns``.

    Unless ``raw``, the comment lines (they carry timestamps) are dropped and chain counters
    are zeroed, so two saves of the same rules compare equal. ``counters`` adds ``-c``
    (every rule line then starts with ``[packets:bytes]``) and implies ``raw``.
    """
    base = "iptables" if family == 4 else "ip6tables"
    argv = [f"{base}-{variant}-save" if variant else f"{base}-save"]
    argv += (["-t", table] if table else []) + (["-c"] if counters else [])
    text = run(ns, argv).stdout
    if counters:
        return text
    if raw:
        return text
    lines = [_COUNTERS.sub("[0:0]", line) for line in text.splitlines() if not line.startswith("#")]
    return "\n".join(lines) + "\n"


def nft_table(ns: str, family: str = "ip", table: str = "kproxy") -> str | None:
    """``nft -s list table FAMILY TABLE`` inside ``ns`` (stateless: no counters, no dynamic
    set contents), or None when there is no such table."""
    proc = run(ns, ["nft", "-s", "list", "table", family, table], check=False)
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr:
            return None
        raise CommandError(["nft", "-s", "list", "table", family, table], proc)
    return proc.stdout


def nft_ruleset(ns: str) -> str:
    """``nft -s list ruleset`` inside ``ns``: every table of every family, no counters."""
    return run(ns, ["nft", "-s", "list", "ruleset"]).stdout


def nft_tables(ns: str) -> list[str]:
    """Every nftables table in ``ns`` as "FAMILY NAME" (e.g. "ip kproxy", "ip nat")."""
    out = run(ns, ["nft", "list", "tables"]).stdout
    return [
        line.split(None, 1)[1].strip() for line in out.splitlines() if line.startswith("table ")
    ]


def _nft_blocks(text: str, kind: str) -> dict[str, list[str]]:
    """The ``kind`` (chain, map, set) blocks of one ``nft list table`` text: name -> the lines
    inside the block, stripped, blank lines dropped."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if current is None:
            m = re.match(rf"^\t{kind} (\S+) \{{$", line)
            if m:
                current = blocks.setdefault(m.group(1), [])
        elif line == "\t}":
            current = None
        elif line.strip():
            current.append(line.strip())
    return blocks


def nft_chains(text: str) -> dict[str, list[str]]:
    """Chain name -> its lines (a base chain's ``type ... hook ...`` line first)."""
    return _nft_blocks(text, "chain")


def nft_elements(text: str, name: str) -> dict[str, str | None]:
    """The elements of map or set ``name`` in an ``nft list table`` text: key -> verdict
    (e.g. ``"10.96.0.30 . tcp . 80" -> "goto reject-chain"``; None for a set's elements).
    A missing map or set has no elements."""
    lines = _nft_blocks(text, "map").get(name) or _nft_blocks(text, "set").get(name) or []
    body = " ".join(lines)
    m = re.search(r"elements = \{(.*?)\}", body)
    elements: dict[str, str | None] = {}
    for item in m.group(1).split(",") if m else []:
        key, sep, value = item.partition(" : ")
        elements[key.strip()] = value.strip() if sep else None
    return elements


def probe_netns_support() -> str | None:
    """None when namespaces, veth pairs and iptables work here, else the reason they don't."""
    if os.geteuid() != 0:
        return "needs root (creates network namespaces)"
    if which("ip") is None:
        return "iproute2's `ip` is not installed"
    for cmd in ("iptables", "iptables-restore", "iptables-save"):
        if which(cmd) is None:
            return f"`{cmd}` is not installed"
    name = f"kpt-{secrets.token_hex(3)}-probe"
    peer = f"{name}-peer"
    created: list[str] = []
    try:
        for ns in (name, peer):
            proc = _run([_ip(), "netns", "add", ns], check=False)
            if proc.returncode != 0:
                return f"`ip netns add` failed: {proc.stderr.strip()}"
            created.append(ns)
        proc = _run(
            [_ip(), "-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1"]
            + ["netns", peer],
            check=False,
        )
        if proc.returncode != 0:
            return f"cannot create a veth pair in a namespace: {proc.stderr.strip()}"
        proc = run(name, ["iptables", "-t", "nat", "-S"], check=False)
        if proc.returncode != 0:
            return f"iptables does not work in a network namespace: {proc.stderr.strip()}"
        return None
    finally:
        for ns in reversed(created):
            _run([_ip(), "netns", "del", ns], check=False)


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Reply:
    """One request's outcome: result is ok, refused, timeout or error."""

    result: str
    pod: str = ""
    peer: str = ""
    elapsed: float = 0.0
    answer: str = ""

    @property
    def ok(self) -> bool:
        return self.result == "ok"

    def __str__(self) -> str:
        if self.ok:
            return f"{self.pod} (saw client {self.peer}, {self.elapsed * 1000:.0f} ms)"
        extra = f" {self.answer}" if self.answer else ""
        return f"{self.result.upper()}{extra} after {self.elapsed * 1000:.0f} ms"


def request(
    ns: str,
    proto: str,
    host: str,
    port: int,
    *,
    count: int = 1,
    timeout: float = 2.0,
) -> list[Reply]:
    """Send ``count`` TCP connections / UDP datagrams from namespace ``ns``, one at a time.

    Every attempt is a new connection (new source port, new conntrack entry). Never
    raises for refused/timeout: look at ``Reply.result``.
    """
    argv = [sys.executable, str(PODSERVER), "--client", proto, "--host", host]
    argv += ["--port", str(port), "--timeout", str(timeout), "--count", str(count), "--json"]
    proc = run(ns, argv, check=False, timeout=count * (timeout + 1) + 15)
    if proc.returncode not in (0, 3, 4, 5):
        raise RuntimeError(f"client in {ns} failed ({proc.returncode}): {proc.stderr.strip()}")
    replies = []
    for line in proc.stdout.splitlines():
        data = json.loads(line)
        replies.append(
            Reply(data["result"], data["pod"], data["peer"], data["elapsed"], data["answer"])
        )
    if len(replies) != count:
        raise RuntimeError(f"client in {ns} printed {len(replies)} of {count} replies")
    return replies


def tcp(ns: str, host: str, port: int, *, count: int = 1, timeout: float = 2.0) -> list[Reply]:
    return request(ns, "tcp", host, port, count=count, timeout=timeout)


def udp(ns: str, host: str, port: int, *, count: int = 1, timeout: float = 2.0) -> list[Reply]:
    return request(ns, "udp", host, port, count=count, timeout=timeout)


def tally(replies: Iterable[Reply]) -> Counter[str]:
    """Counts per answering pod; failures are counted under REFUSED/TIMEOUT/ERROR."""
    return Counter(r.pod if r.ok else r.result.upper() for r in replies)


# --------------------------------------------------------------------------- topology


@dataclass
class Pod:
    name: str
    ns: str
    ip: str
    host_if: str  # the node-side veth
    node: str = ""  # namespace of the node the pod runs on
    node_name: str = NODE_NAME  # that node's Kubernetes name (EndpointSlice nodeName)
    ip6: str = ""  # with Topology(ipv6=True)


@dataclass
class Client:
    name: str
    ns: str
    ip: str
    host_if: str
    ip6: str = ""


@dataclass
class Server:
    pod: Pod
    name: str
    pid: int
    tcp: list[int]
    udp: list[int]
    proc: subprocess.Popen[bytes] = field(repr=False)
    log: Path = field(repr=False)


class Topology:
    """A node namespace with routed pod namespaces and external client namespaces.

    ``close()`` (also run by ``with``) kills every server it started, by pid, and deletes
    every namespace it created; it is idempotent and never raises.
    """

    def __init__(self, tag: str | None = None, *, ipv6: bool = False):
        self.tag = tag or f"kpt-{secrets.token_hex(3)}"
        self.node = f"{self.tag}-node"
        self.node2: str | None = None  # set by add_node2()
        self.ipv6 = ipv6
        self.namespaces: list[str] = []
        self.pods: dict[str, Pod] = {}
        self.clients: dict[str, Client] = {}
        self.servers: list[Server] = []
        self.client_routes: list[str] = []
        # the --mode the tests run kproxy with in the node namespace (netns never runs it)
        self.proxy_mode = "iptables"
        self._tmp = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self._closed = False
        try:
            self._add_ns(self.node)
            ip(self.node, "link", "set", "lo", "up")
            self._router_sysctls(self.node)
        except BaseException:
            self.close()
            raise

    # -- building

    def _add_ns(self, ns: str) -> None:
        if self._closed:
            raise RuntimeError("topology already closed")
        _run([_ip(), "netns", "add", ns])
        self.namespaces.append(ns)
        if self.ipv6:
            # links created in this namespace from now on skip duplicate address detection
            # (link-local addresses included), so IPv6 works the moment a link is up
            for key in ("net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"):
                sysctl(ns, key, 0)

    def _router_sysctls(self, ns: str) -> None:
        settings: list[tuple[str, int]] = [
            ("net.ipv4.ip_forward", 1),
            ("net.ipv4.icmp_ratelimit", 0),
            ("net.ipv4.conf.all.rp_filter", 0),
            ("net.ipv4.conf.default.rp_filter", 0),
        ]
        if self.ipv6:
            settings += [("net.ipv6.conf.all.forwarding", 1), ("net.ipv6.icmp.ratelimit", 0)]
        for key, value in settings:
            sysctl(ns, key, value)

    def add_node2(self) -> str:
        """Second node namespace ``<tag>-node2`` (no kproxy), linked to the node; returns it.

        node vn2 192.168.200.1/24 <-> node2 vn1 192.168.200.2/24; the node routes
        10.244.2.0/24 via node2, node2 routes 10.244.1.0/24 and its default via the node.
        """
        if self.node2 is not None:
            return self.node2
        ns = f"{self.tag}-node2"
        self._add_ns(ns)
        self.node2 = ns
        ip(ns, "link", "set", "lo", "up")
        self._router_sysctls(ns)
        ip(self.node, "link", "add", "vn2", "type", "veth", "peer", "name", "vn1", "netns", ns)
        ip(self.node, "addr", "add", f"{NODE_LINK_IP}/24", "dev", "vn2")
        ip(ns, "addr", "add", f"{NODE2_LINK_IP}/24", "dev", "vn1")
        if self.ipv6:
            ip(self.node, "addr", "add", f"{NODE_LINK_IP6}/64", "dev", "vn2", "nodad")
            ip(ns, "addr", "add", f"{NODE2_LINK_IP6}/64", "dev", "vn1", "nodad")
        ip(self.node, "link", "set", "vn2", "up")
        ip(ns, "link", "set", "vn1", "up")
        ip(self.node, "route", "add", f"{NODE2_POD_PREFIX}0/24", "via", NODE2_LINK_IP)
        ip(ns, "route", "add", f"{POD_PREFIX}0/24", "via", NODE_LINK_IP)
        ip(ns, "route", "add", "default", "via", NODE_LINK_IP)
        if self.ipv6:
            ip(self.node, "-6", "route", "add", f"{NODE2_POD6_PREFIX}/64", "via", NODE2_LINK_IP6)
            ip(ns, "-6", "route", "add", f"{POD6_PREFIX}/64", "via", NODE_LINK_IP6)
            ip(ns, "-6", "route", "add", "default", "via", NODE_LINK_IP6)
        return ns

    def add_pod(self, name: str, octet: int, *, node: int = 1) -> Pod:
        """Pod namespace ``<tag>-<name>`` with 10.244.<node>.<octet>, routed via veth vp<octet>
        of the node (``node=1``) or of node2 (``node=2``, created on first use).

        With ``ipv6`` the pod also gets fd00:10:244:<node>::<octet>.
        """
        if name in self.pods:
            raise ValueError(f"pod {name} exists")
        if not 2 <= octet <= 254:
            raise ValueError("octet must be 2..254")
        if node == 1:
            node_ns, node_name = self.node, NODE_NAME
            gateway, prefix, gateway6, prefix6 = POD_GATEWAY, POD_PREFIX, POD6_GATEWAY, POD6_PREFIX
        elif node == 2:
            node_ns, node_name = self.add_node2(), NODE2_NAME
            gateway, prefix = NODE2_POD_GATEWAY, NODE2_POD_PREFIX
            gateway6, prefix6 = NODE2_POD6_GATEWAY, NODE2_POD6_PREFIX
        else:
            raise ValueError("node must be 1 or 2")
        if any(p.node == node_ns and p.host_if == f"vp{octet}" for p in self.pods.values()):
            raise ValueError(f"octet {octet} already used on node {node}")
        ns = f"{self.tag}-{name}"
        pod_ip = f"{prefix}{octet}"
        pod_ip6 = f"{prefix6}{octet}" if self.ipv6 else ""
        host_if = f"vp{octet}"
        self._add_ns(ns)
        ip(node_ns, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip(node_ns, "addr", "add", f"{gateway}/32", "dev", host_if)
        if self.ipv6:
            ip(node_ns, "addr", "add", f"{gateway6}/128", "dev", host_if, "nodad")
        ip(node_ns, "link", "set", host_if, "up")
        ip(node_ns, "route", "add", f"{pod_ip}/32", "dev", host_if)
        ip(ns, "link", "set", "lo", "up")
        ip(ns, "addr", "add", f"{pod_ip}/32", "dev", "eth0")
        if self.ipv6:
            ip(ns, "addr", "add", f"{pod_ip6}/128", "dev", "eth0", "nodad")
        ip(ns, "link", "set", "eth0", "up")
        ip(ns, "route", "add", gateway, "dev", "eth0")
        ip(ns, "route", "add", "default", "via", gateway)
        if self.ipv6:
            ip(node_ns, "-6", "route", "add", f"{pod_ip6}/128", "dev", host_if)
            ip(ns, "-6", "route", "add", gateway6, "dev", "eth0")
            ip(ns, "-6", "route", "add", "default", "via", gateway6)
        pod = Pod(name, ns, pod_ip, host_if, node_ns, node_name, pod_ip6)
        self.pods[name] = pod
        return pod

    def add_client(self, name: str = "client", octet: int | None = None) -> Client:
        """External client namespace on 192.168.100.0/24; the node is 192.168.100.1.

        The first client gets .2 and becomes the node's default gateway; later clients
        (.3, ...) get a /32 route on their own node-side veth.
        """
        if name in self.clients:
            raise ValueError(f"client {name} exists")
        first = not self.clients
        octet = octet or (2 + len(self.clients))
        ns = f"{self.tag}-{name}"
        client_ip = f"{CLIENT_PREFIX}{octet}"
        client_ip6 = f"{CLIENT6_PREFIX}{octet}" if self.ipv6 else ""
        host_if = f"vc{octet}"
        self._add_ns(ns)
        ip(self.node, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        node_prefix = 24 if first else 32
        ip(self.node, "addr", "add", f"{NODE_EXTERNAL_IP}/{node_prefix}", "dev", host_if)
        if self.ipv6:
            node6 = f"{NODE6_EXTERNAL_IP}/{64 if first else 128}"
            ip(self.node, "addr", "add", node6, "dev", host_if, "nodad")
        ip(self.node, "link", "set", host_if, "up")
        ip(ns, "link", "set", "lo", "up")
        ip(ns, "addr", "add", f"{client_ip}/24", "dev", "eth0")
        if self.ipv6:
            ip(ns, "addr", "add", f"{client_ip6}/64", "dev", "eth0", "nodad")
        ip(ns, "link", "set", "eth0", "up")
        if first:
            ip(self.node, "route", "add", "default", "via", client_ip, "dev", host_if)
        else:
            ip(self.node, "route", "add", f"{client_ip}/32", "dev", host_if)
        if self.ipv6:
            if first:
                ip(self.node, "-6", "route", "add", "default", "via", client_ip6, "dev", host_if)
            else:
                ip(self.node, "-6", "route", "add", f"{client_ip6}/128", "dev", host_if)
        client = Client(name, ns, client_ip, host_if, client_ip6)
        self.clients[name] = client
        for cidr in self.client_routes:
            self._client_route(client, cidr)
        return client

    def _client_route(self, client: Client, cidr: str) -> None:
        v6 = ":" in cidr
        if v6 and not self.ipv6:
            raise ValueError(f"{cidr}: this topology has no IPv6")
        via = NODE6_EXTERNAL_IP if v6 else NODE_EXTERNAL_IP
        ip(client.ns, "-6" if v6 else "-4", "route", "add", cidr, "via", via, "dev", "eth0")

    def client_route(self, cidr: str) -> None:
        """Every client, present and future, sends ``cidr`` to the node (192.168.100.1)."""
        if cidr in self.client_routes:
            return
        for client in self.clients.values():
            self._client_route(client, cidr)
        self.client_routes.append(cidr)

    def start_server(
        self,
        pod: Pod,
        *,
        tcp: Sequence[int] = (8080,),
        udp: Sequence[int] = (),
        name: str | None = None,
        ready_timeout: float = 10.0,
        dual_stack: bool | None = None,
    ) -> Server:
        """Start tests/podserver.py in the pod's namespace; returns once it listens.

        ``dual_stack`` (default: when the pod has an IPv6 address) binds ``::`` so the
        server answers IPv4 and IPv6 alike.
        """
        name = name or pod.name
        if dual_stack is None:
            dual_stack = bool(pod.ip6)
        log = self._tmp / f"server-{pod.name}-{len(self.servers)}.log"
        argv = [_ip(), "netns", "exec", pod.ns, sys.executable, str(PODSERVER), "--name", name]
        if dual_stack:
            argv += ["--bind", "::"]
        for port in tcp:
            argv += ["--tcp", str(port)]
        for port in udp:
            argv += ["--udp", str(port)]
        with open(log, "wb") as errf:
            # `ip netns exec` execs the command, so proc.pid is the server's own pid
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errf,
                env=command_env(),
                start_new_session=True,
            )
        server = Server(pod, name, proc.pid, list(tcp), list(udp), proc, log)
        self.servers.append(server)
        assert proc.stdout is not None
        deadline = time.monotonic() + ready_timeout
        line = b""
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stdout], [], [], 0.1)
            if ready:
                line = proc.stdout.readline()
                break
        proc.stdout.close()
        if line.strip() != b"READY":
            self._kill(server)
            raise RuntimeError(
                f"pod server {name} in {pod.ns} did not become ready: "
                f"{log.read_text(errors='replace').strip()}"
            )
        return server

    # -- traffic helpers bound to this topology

    def run(self, ns: str, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess[str]:
        return run(ns, argv, **kwargs)

    def tcp(self, ns: str, host: str, port: int, **kwargs) -> list[Reply]:
        return tcp(ns, host, port, **kwargs)

    def udp(self, ns: str, host: str, port: int, **kwargs) -> list[Reply]:
        return udp(ns, host, port, **kwargs)

    def iptables_save(self, table: str | None = None, **kwargs) -> str:
        return iptables_save(self.node, table, **kwargs)

    def ip6tables_save(self, table: str | None = None, **kwargs) -> str:
        return iptables_save(self.node, table, family=6, **kwargs)

    # -- teardown

    @staticmethod
    def _kill(server: Server, grace: float = 2.0) -> None:
        proc = server.proc
        if proc.poll() is not None:
            return
        try:
            os.kill(server.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.kill(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        """Kill started servers by pid, delete every namespace created. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for server in reversed(self.servers):
            try:
                self._kill(server)
            except Exception as exc:  # keep tearing down
                print(f"netns: killing {server.pid} failed: {exc}", file=sys.stderr)
        for ns in reversed(self.namespaces):
            proc = _run([_ip(), "netns", "del", ns], check=False)
            if proc.returncode != 0:
                print(f"netns: deleting {ns} failed: {proc.stderr.strip()}", file=sys.stderr)
        self.namespaces.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def build(
    pods: Sequence[tuple[str, int]] = (("a", 2), ("b", 3), ("c", 4)),
    clients: int = 1,
    *,
    node2_pods: Sequence[tuple[str, int]] = (),
    ipv6: bool = False,
    client_routes: Sequence[str] = (),
) -> Topology:
    """A node, the given (name, octet) pods and ``clients`` external clients; with
    ``node2_pods`` also node2 and those pods on it; ``client_routes`` as client_route().

    On any failure the partial topology is torn down before the exception propagates.
    """
    topo = Topology(ipv6=ipv6)
    try:
        for name, octet in pods:
            topo.add_pod(name, octet)
        for name, octet in node2_pods:
            topo.add_pod(name, octet, node=2)
        for i in range(clients):
            topo.add_client("client" if i == 0 else f"client{i + 1}")
        for cidr in client_routes:
            topo.client_route(cidr)
        return topo
    except BaseException:
        topo.close()
        raise


_CLONE_NEWNET = 0x40000000


def enter(ns: str) -> None:
    """Move the calling thread (only it: setns acts per thread) into namespace `ns`."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in(ns: str, fn, *args, **kwargs):
    """Run `fn(*args, **kwargs)` in a fresh thread that has entered namespace `ns`, and return
    its result (or raise its exception).

    Only that short-lived thread ever changes namespace (setns acts per thread), so the test
    process itself never leaves its own. Sockets created inside `fn` belong to `ns` for their
    whole life: a server started this way listens on `ns`'s addresses, e.g. its 127.0.0.1.
    """
    import threading

    outcome: dict[str, object] = {}

    def runner() -> None:
        enter(ns)
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    def guarded() -> None:
        try:
            runner()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=guarded, name=f"in-{ns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome.get("value")


def http_get(ns: str, url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], str]:
    """GET `url` from inside `ns`: (status, headers, body); HTTP errors are returned too."""
    import urllib.error
    import urllib.request

    def get() -> tuple[int, dict[str, str], str]:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read().decode()

    return call_in(ns, get)
