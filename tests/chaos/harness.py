"""The chaos suite's test bench: a node in network namespaces, `kproxy run` against the test API
server, live traffic, and what the scenarios measure (failures, recovery time, CPU, rules).

Everything lives in namespaces made here (tests/netns.py) and is torn down afterwards, also on
failure: the daemon and the pod servers are killed by pid (the daemon by its own process group,
whose id is its pid), the namespaces deleted. The daemon gets an xtables lock file of its own
(``XTABLES_LOCKFILE``, honoured by iptables 1.8.9's legacy backend; the nft backend takes no
lock), so nothing here ever holds the host's /run/xtables.lock.

Layout: pods a (10.244.1.2) and b (.3) serve; pod c (.4) is the client the prober runs in.
Services (all with endpoints a and b):

    web    10.96.0.10  TCP 80  -> 8080   new connections, one per probe
    dns    10.96.0.53  UDP 53  -> 5353   one datagram per probe
    echo   10.96.0.20  TCP 9000 -> 9000  long-lived connections, a line echoed per probe
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_TESTS = Path(__file__).resolve().parent.parent
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))
_ROOT = _TESTS.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import netns  # noqa: E402
from fake_apiserver import FakeApiServer  # noqa: E402

NODE = "node-1"
CLUSTER_CIDR = "10.244.0.0/16"
WEB_IP, DNS_IP, ECHO_IP = "10.96.0.10", "10.96.0.53", "10.96.0.20"
POD_A, POD_B = "10.244.1.2", "10.244.1.3"
ECHO_PORT = 9000
METRICS = "http://127.0.0.1:10249/metrics"
HEALTH = "http://127.0.0.1:10256"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- objects


def service(name: str, ip: str, port: int = 80, target: int = 8080, proto: str = "TCP", **spec):
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": "default", "name": name},
        "spec": {
            "clusterIP": ip,
            "ports": [{"name": "p", "port": port, "targetPort": target, "protocol": proto}],
            **spec,
        },
    }


def slice_(name: str, svc: str, ips, port: int = 8080, proto: str = "TCP", node: str = NODE):
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "default",
            "name": name,
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": port, "protocol": proto}],
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": True}, "nodeName": node} for ip in ips
        ],
    }


def base_objects() -> list[dict]:
    return [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": {}}},
        service("web", WEB_IP),
        slice_("web-1", "web", [POD_A, POD_B]),
        service("dns", DNS_IP, 53, 5353, "UDP"),
        slice_("dns-1", "dns", [POD_A, POD_B], 5353, "UDP"),
        service("echo", ECHO_IP, ECHO_PORT, ECHO_PORT),
        slice_("echo-1", "echo", [POD_A, POD_B], ECHO_PORT),
    ]


# --------------------------------------------------------------------------- echo server


class EchoServer:
    """Echoes every line back, on TCP ECHO_PORT inside a pod's namespace (in this process:
    the listening socket is made by a thread that entered the namespace)."""

    def __init__(self, ns: str) -> None:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", ECHO_PORT))
            s.listen(64)
            return s

        self.sock = netns.call_in(ns, make)
        self.stopped = False
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name=f"echo-{ns}").start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def stop(self) -> None:
        self.stopped = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()


# --------------------------------------------------------------------------- prober


@dataclass
class ProbeStats:
    total: int = 0
    failed: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, what)

    def add(self, ok: bool, when: float, what: str) -> None:
        self.total += 1
        if not ok:
            self.failed += 1
            if len(self.failures) < 200:
                self.failures.append((when, what))

    def as_dict(self) -> dict[str, Any]:
        return {"failed": self.failed, "total": self.total}


class Prober:
    """From pod c, every `interval`: a new TCP connection to web, a UDP datagram to dns, and a
    line over each of `established` long-lived TCP connections to echo. A connection that
    fails counts once and is reopened (the reconnect counts as a new-connection probe)."""

    def __init__(self, ns: str, interval: float = 0.1, established: int = 4) -> None:
        self.ns = ns
        self.interval = interval
        self.n_established = established
        self.tcp = ProbeStats()
        self.udp = ProbeStats()
        self.est = ProbeStats()
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._guarded, daemon=True, name="prober")

    def start(self) -> Prober:
        self.thread.start()
        if not self.ready.wait(30):
            raise RuntimeError(f"prober did not start: {self.error}")
        if self.error is not None:
            raise RuntimeError(f"prober failed: {self.error}")
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)

    def reset(self) -> None:
        self.tcp, self.udp, self.est = ProbeStats(), ProbeStats(), ProbeStats()

    def summary(self) -> dict[str, Any]:
        return {"tcp": self.tcp.as_dict(), "udp": self.udp.as_dict(), "est": self.est.as_dict()}

    @property
    def failed(self) -> int:
        return self.tcp.failed + self.udp.failed + self.est.failed

    def _guarded(self) -> None:
        try:
            netns.enter(self.ns)
            self._run()
        except BaseException as exc:  # reported by start()/summary users
            self.error = exc
            self.ready.set()

    @staticmethod
    def _new_tcp() -> bool:
        try:
            with socket.create_connection((WEB_IP, 80), timeout=1.0) as s:
                s.settimeout(1.0)
                return s.recv(100).startswith((b"a ", b"b "))
        except OSError:
            return False

    @staticmethod
    def _udp() -> bool:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(1.0)
                s.connect((DNS_IP, 53))
                s.send(b"ping\n")
                return s.recv(100).startswith((b"a ", b"b "))
        except OSError:
            return False

    @staticmethod
    def _open_echo() -> socket.socket | None:
        try:
            s = socket.create_connection((ECHO_IP, ECHO_PORT), timeout=1.0)
            s.settimeout(1.0)
            return s
        except OSError:
            return None

    def _run(self) -> None:
        conns: list[socket.socket | None] = []
        deadline = time.monotonic() + 20
        while len(conns) < self.n_established:
            s = self._open_echo()
            if s is not None:
                conns.append(s)
            elif time.monotonic() > deadline:
                raise RuntimeError("could not open the long-lived echo connections")
            else:
                time.sleep(0.2)
        self.ready.set()
        seq = 0
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            self.tcp.add(self._new_tcp(), t0, "tcp")
            self.udp.add(self._udp(), time.monotonic(), "udp")
            for i, s in enumerate(conns):
                seq += 1
                line = f"{seq}\n".encode()
                ok = False
                if s is not None:
                    try:
                        s.sendall(line)
                        got = b""
                        while not got.endswith(b"\n"):
                            chunk = s.recv(100)
                            if not chunk:
                                break
                            got += chunk
                        ok = got == line
                    except OSError:
                        ok = False
                self.est.add(ok, time.monotonic(), f"est{i}")
                if not ok:
                    if s is not None:
                        s.close()
                    conns[i] = self._open_echo()
            self.stop_event.wait(max(0.0, self.interval - (time.monotonic() - t0)))
        for s in conns:
            if s is not None:
                s.close()


# --------------------------------------------------------------------------- the daemon


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, comm) of the direct children of `pid` (scanning /proc: no CONFIG_PROC_CHILDREN)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append((int(entry), comm))
    return out


class KproxyProcess:
    """`kproxy run` in the node namespace, in a process group of its own (pgid = its pid), so a
    kill can take its iptables-restore/nft child with it, as a container's death does."""

    def __init__(self, node_ns: str, api_url: str, workdir: Path, mode: str = "iptables"):
        self.node_ns, self.api_url, self.workdir, self.mode = node_ns, api_url, workdir, mode
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "kproxy.log"
        self.xtables_lock = workdir / "xtables.lock"
        self.starts = 0
        self.extra: list[str] = []
        self.wrapper: list[str] = []  # e.g. unshare -m ... sh -c, for the full-disk scenario

    def argv(self, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "kproxy",
            "run",
            "--master",
            self.api_url,
            "--node-name",
            NODE,
            "--cluster-cidr",
            CLUSTER_CIDR,
            "--mode",
            self.mode,
            "--iptables-min-sync-period",
            "0.2s",
            "--iptables-sync-period",
            "30s",
            "--canary-interval",
            "0.5s",
            "--api-wait",
            "3s",
            "--metrics-bind-address",
            "127.0.0.1:10249",
            "--healthz-bind-address",
            "127.0.0.1:10256",
            "--snapshot-dir",
            str(self.workdir / "snapshots"),
            "--state-cache",
            str(self.workdir / "state.json"),
            "--lock-file",
            str(self.workdir / "kproxy.lock"),
            *self.extra,
            *extra,
        ]

    def env(self) -> dict[str, str]:
        env = netns.command_env()
        env["XTABLES_LOCKFILE"] = str(self.xtables_lock)
        env["PYTHONPATH"] = str(_ROOT)
        return env

    def start(self, *extra: str) -> None:
        assert self.proc is None or self.proc.poll() is not None
        argv = [netns._ip(), "netns", "exec", self.node_ns, *self.wrapper, *self.argv(*extra)]
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts} at {time.time():.3f}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(),
                start_new_session=True,
                cwd=str(_ROOT),
            )
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, group: bool = True) -> None:
        """SIGKILL the daemon (with `group`, its whole process group: the children too)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        if not group:
            # The child finishes on its own (the kernel does not kill orphans); wait for it
            # so the next check sees a settled kernel.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and group_alive(self.proc.pid):
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers of its group, if any

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cpu(self) -> float:
        return cpu_seconds(self.pid) if self.alive() else 0.0

    def rss(self) -> int:
        return rss_bytes(self.pid) if self.alive() else 0


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def parse_metrics(body: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (the full sample name as printed)."""
    out = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[head] = float(value)
    return out


# --------------------------------------------------------------------------- the bench


class Bench:
    """Topology + API server + echo servers + prober + kproxy; close() tears all down."""

    def __init__(self, mode: str = "iptables", workdir: Path | None = None, clients: int = 0):
        self.mode = mode
        # An external client also gives the node a default route: traffic to a ClusterIP no
        # rule takes is then forwarded (and rejected by kproxy when it has no endpoints).
        self.clients = clients
        self.backend = "auto"  # the iptables variant the rule checks read
        self._own_tmp = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kproxy-chaos-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.topo: netns.Topology | None = None
        self.api: FakeApiServer | None = None
        self.echo: list[EchoServer] = []
        self.prober: Prober | None = None
        self.kproxy: KproxyProcess | None = None
        self.history: list[list[dict]] = []  # every state the API server has held, in order

    def __enter__(self) -> Bench:
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def setup(self) -> None:
        self.topo = netns.build(pods=(("a", 2), ("b", 3), ("c", 4)), clients=self.clients)
        for name in ("a", "b"):
            pod = self.topo.pods[name]
            self.topo.start_server(pod, tcp=[8080], udp=[5353])
            self.echo.append(EchoServer(pod.ns))
        self.api = netns.call_in(self.topo.node, lambda: FakeApiServer(host="127.0.0.1").start())
        for obj in base_objects():
            self.api.apply(obj)
        self.record()
        self.kproxy = KproxyProcess(self.topo.node, self.api.url, self.workdir, self.mode)

    def close(self) -> None:
        if self.prober is not None:
            self.prober.stop()
        if self.kproxy is not None:
            self.kproxy.stop()
        if self.api is not None:
            self.api.stop()
        for e in self.echo:
            e.stop()
        if self.topo is not None:
            self.topo.close()
        if self._own_tmp:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- the cluster

    def record(self) -> None:
        assert self.api is not None
        objs = [o for k in ("Service", "EndpointSlice", "Node") for o in self.api.objects(k)]
        self.history.append(objs)

    def apply(self, *objs: dict) -> None:
        assert self.api is not None
        for obj in objs:
            self.api.apply(copy.deepcopy(obj))
        self.record()

    def delete(self, kind: str, name: str) -> None:
        assert self.api is not None
        self.api.delete(kind, "default", name)
        self.record()

    # -- observing

    @property
    def node(self) -> str:
        assert self.topo is not None
        return self.topo.node

    def start_prober(self, interval: float = 0.1, established: int = 4) -> Prober:
        assert self.topo is not None
        self.prober = Prober(self.topo.pods["c"].ns, interval, established).start()
        return self.prober

    def metrics(self) -> dict[str, float]:
        try:
            status, _, body = netns.http_get(self.node, METRICS, timeout=2.0)
        except OSError:
            return {}
        return parse_metrics(body) if status == 200 else {}

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
        total = 0.0
        for head, value in self.metrics().items():
            base, _, rest = head.partition("{")
            if base != name:
                continue
            if all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += value
        return total

    def status(self, path: str) -> int | None:
        try:
            return netns.http_get(self.node, f"{HEALTH}{path}", timeout=1.0)[0]
        except OSError:
            return None

    def ruleset_text(self) -> str:
        """kproxy's rules as the kernel holds them (iptables-save of both families, or the
        kproxy nftables tables), counters zeroed: equal texts mean equal rules."""
        if self.mode == "nftables":
            return "".join(netns.nft_table(self.node, f) or "" for f in ("ip", "ip6"))
        return netns.iptables_save(self.node) + netns.iptables_save(self.node, family=6)

    def matches(self, candidates: list[list[dict]] | None = None) -> dict[str, Any]:
        """Which of `candidates` (default: the whole history) the kernel's rules are a full
        render of, per family and per table; see rulecheck.match()."""
        from tests.chaos import rulecheck

        cands = candidates if candidates is not None else self.history
        return netns.call_in(self.node, rulecheck.match, cands, self.mode, self.backend)

    def converged(self) -> bool:
        """The kernel holds a full render of the API server's current state."""
        m = self.matches(self.history[-1:])
        return m["all"] == [0]

    def wait(self, what: str, check: Callable[[], Any], timeout: float, step: float = 0.1):
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                tail = self.kproxy.log()[-4000:] if self.kproxy else ""
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{tail}")
            time.sleep(step)

    def start_kproxy(self, *extra: str, wait_ready: bool = True, timeout: float = 60) -> float:
        """Start the daemon; with `wait_ready`, wait until it converged. Returns the seconds."""
        assert self.kproxy is not None
        t0 = time.monotonic()
        self.kproxy.start(*extra)
        if wait_ready:
            self.wait("kproxy ready", lambda: self.status("/readyz") == 200, timeout)
            self.wait("rules converged", self.converged, timeout, step=0.2)
        return time.monotonic() - t0


@contextlib.contextmanager
def cpu_meter(pid_fn: Callable[[], int]) -> Iterator[dict[str, float]]:
    """CPU seconds and wall seconds of a process over the block: out['cpu'], ['wall'], ['pct']."""
    out: dict[str, float] = {}
    pid = pid_fn()
    c0, t0 = cpu_seconds(pid), time.monotonic()
    yield out
    out["cpu"] = cpu_seconds(pid) - c0
    out["wall"] = time.monotonic() - t0
    out["pct"] = 100.0 * out["cpu"] / out["wall"] if out["wall"] else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def rng(seed: int | None = None) -> random.Random:
    return random.Random(seed if seed is not None else int(time.time()))


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str)
