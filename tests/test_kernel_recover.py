"""scripts/kproxy-recover and the systemd units in manifests/systemd.

Kernel tests (``@pytest.mark.kernel``): a node namespace with pods a and b answering on TCP
8080 and pod c as the client, the test API server listening on the node's 127.0.0.1 (see
netns.call_in), kproxy's rules flushed the way another tool would, then the script run inside
the node namespace. Each of its three steps is exercised (sync from the API, sync from the
state cache, restore of the newest snapshot), and traffic to the ClusterIP is checked after
each. The RTO the script reports is printed (run with -s to see it), not asserted beyond a
generous sanity cap. Every lock, cache and snapshot lives in tmp_path.

The other tests need no root: the script's logic with a stub `kproxy` and a stub `iptables`,
and the unit files (`systemd-analyze verify` when installed, a parse of the key settings
always).
"""

from __future__ import annotations

import configparser
import importlib.machinery
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns  # noqa: E402
from fake_apiserver import FakeApiServer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "kproxy-recover"
UNITS = ROOT / "manifests" / "systemd"

WEB_IP = "10.96.0.10"
POD_A, POD_B = "10.244.1.2", "10.244.1.3"
SYNC_ARGS = "--cluster-cidr 10.244.0.0/16 --node-name node-1"
RTO_CAP = 60.0  # a sanity cap only; the figures are printed


def load_script():
    loader = importlib.machinery.SourceFileLoader("kproxy_recover", str(SCRIPT))
    spec = importlib.util.spec_from_loader("kproxy_recover", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- no root: stubs

STUB_KPROXY = r"""#!/bin/sh
# A stand-in for kproxy: logs its arguments; a step succeeds when $D/ok-<step> exists.
D=__DIR__
echo "$*" >> "$D/calls"
case "$1" in
  sync) kind=sync; for a in "$@"; do [ "$a" = --state ] && kind=cache; done ;;
  restore) kind=restore ;;
  *) echo "unexpected command $1" >&2; exit 9 ;;
esac
[ -f "$D/sleep-$kind" ] && sleep 30
if [ -f "$D/ok-$kind" ]; then
  [ -f "$D/nochains-$kind" ] || : > "$D/rules"
  if [ "$kind" = sync ]; then
    prev=
    for a in "$@"; do
      [ "$prev" = --state-cache ] && echo '{"kind": "List", "items": []}' > "$a"
      prev=$a
    done
  fi
  echo "$kind: applied"
  exit 0
fi
echo "error: $kind cannot work in this test" >&2
exit 2
"""

STUB_IPTABLES = r"""#!/bin/sh
# A stand-in for iptables -w 5 -t nat -S CHAIN: kproxy's chains exist when $D/rules exists.
D=__DIR__
chain=
while [ $# -gt 0 ]; do [ "$1" = -S ] && chain=$2; shift; done
if [ ! -f "$D/rules" ]; then
  if [ "$chain" = KUBE-SERVICES ]; then
    echo "iptables: No chain/target/match by that name." >&2
    exit 1
  fi
  echo "-P $chain ACCEPT"
  exit 0
fi
case $chain in
  KUBE-SERVICES)
    echo "-N KUBE-SERVICES"
    c='"kubernetes service nodeports; NOTE: this must be the last rule in this chain"'
    echo "-A KUBE-SERVICES -m comment --comment $c -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    ;;
  *)
    echo "-P $chain ACCEPT"
    echo "-A $chain -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES" ;;
esac
"""


class Stubs:
    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "stub"
        self.dir.mkdir()
        self.kproxy = self.dir / "kproxy"
        self.iptables = self.dir / "iptables"
        for path, text in ((self.kproxy, STUB_KPROXY), (self.iptables, STUB_IPTABLES)):
            path.write_text(text.replace("__DIR__", shlex.quote(str(self.dir))))
            path.chmod(0o755)
        self.cache = tmp / "state.json"
        self.snapshots = tmp / "snapshots"
        self.lock = tmp / "kproxy.lock"

    def set(self, *flags: str) -> None:
        for flag in flags:
            (self.dir / flag).touch()

    def calls(self) -> list[str]:
        path = self.dir / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def run(self, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, str(SCRIPT), "--kproxy", str(self.kproxy)]
        argv += ["--iptables", str(self.iptables), "--healthz", "none"]
        argv += ["--state-cache", str(self.cache), "--snapshot-dir", str(self.snapshots)]
        argv += ["--lock-file", str(self.lock), "--master", "http://127.0.0.1:1", *extra]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def report(self, *extra: str, **kw) -> tuple[int, dict]:
        proc = self.run("--json", *extra, **kw)
        print(proc.stdout, proc.stderr)
        return proc.returncode, json.loads(proc.stdout)


@pytest.fixture
def stubs(tmp_path: Path) -> Stubs:
    return Stubs(tmp_path)


def test_script_is_executable_python3_stdlib_only():
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/usr/bin/env python3\n")
    proc = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "--snapshot-dir" in proc.stdout


def test_stub_healthy_does_nothing(stubs):
    stubs.set("rules")
    proc = stubs.run()
    assert proc.returncode == 0, proc.stderr
    assert "healthy, nothing to do" in proc.stdout
    assert stubs.calls() == []


def test_stub_sync_first_and_cache_refreshed(stubs):
    stubs.set("ok-sync", "ok-cache", "ok-restore")
    stubs.cache.write_text('{"kind": "List", "items": ["old"]}')
    code, rep = stubs.report()
    assert code == 0
    assert rep["result"] == "recovered" and rep["recovered_by"] == "sync"
    assert 0 <= rep["rto_seconds"] < RTO_CAP
    calls = stubs.calls()
    assert len(calls) == 1 and calls[0].startswith("sync ")
    args = calls[0].split()
    assert "--state" not in args
    assert args[args.index("--lock-file") + 1] == str(stubs.lock)
    assert args[args.index("--master") + 1] == "http://127.0.0.1:1"
    # the API step does not fall back to the cache (that is the next step), and refreshes it
    assert "--no-cache-fallback" in args
    assert args[args.index("--state-cache") + 1] == str(stubs.cache)


def test_stub_cache_when_sync_fails(stubs):
    stubs.set("ok-cache", "ok-restore")
    stubs.cache.write_text("{}")
    code, rep = stubs.report("--sync-args", SYNC_ARGS)
    assert code == 0 and rep["recovered_by"] == "cache"
    first, second = rep["steps"]
    assert first["step"] == "sync" and not first["ok"] and first["exit"] == 2
    assert "cannot work" in first["reason"]
    calls = stubs.calls()
    assert calls[1].split() == [
        "sync",
        "--lock-file",
        str(stubs.lock),
        "--state",
        str(stubs.cache),
        *SYNC_ARGS.split(),
    ]
    assert calls[0].endswith(SYNC_ARGS)


def test_stub_restore_when_no_cache(stubs):
    stubs.set("ok-restore")
    stubs.snapshots.mkdir()
    code, rep = stubs.report()
    assert code == 0 and rep["recovered_by"] == "restore"
    assert [s["step"] for s in rep["steps"]] == ["sync", "cache", "restore"]
    assert rep["steps"][1]["reason"].startswith("skipped: no state cache")
    assert stubs.calls()[-1].split() == [
        "restore",
        "--latest",
        "--lock-file",
        str(stubs.lock),
        "--snapshot-dir",
        str(stubs.snapshots),
    ]


def test_stub_exit_0_without_chains_goes_on(stubs):
    stubs.set("ok-sync", "nochains-sync", "ok-restore")
    stubs.snapshots.mkdir()
    code, rep = stubs.report()
    assert code == 0 and rep["recovered_by"] == "restore"
    assert "exit 0 but" in rep["steps"][0]["reason"]


def test_stub_nothing_works(stubs):
    stubs.snapshots.mkdir()
    stubs.cache.write_text("{}")
    proc = stubs.run()
    print(proc.stdout)
    assert proc.returncode == 1
    assert "FAILED" in proc.stdout
    for step in ("sync", "cache", "restore"):
        assert f"  {step}: exit 2: error: {step} cannot work" in proc.stdout


def test_stub_step_timeout(stubs):
    stubs.set("sleep-sync", "ok-sync", "ok-cache")
    stubs.cache.write_text("{}")
    started = time.monotonic()
    code, rep = stubs.report("--step-timeout", "1")
    assert time.monotonic() - started < 15
    assert code == 0 and rep["recovered_by"] == "cache"
    assert rep["steps"][0]["reason"] == "timed out after 1s"


def test_stub_dry_run(stubs):
    proc = stubs.run("--dry-run")
    assert proc.returncode == 1
    assert "would run:" in proc.stdout and "skip (no state cache" in proc.stdout
    assert stubs.calls() == []


def test_stub_one_at_a_time(stubs):
    import fcntl

    with open(f"{stubs.lock}.recover", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = stubs.run()
    assert proc.returncode == 3 and "another kproxy-recover" in proc.stderr
    assert stubs.calls() == []


def test_multi_word_kproxy(stubs):
    stubs.set("ok-sync")
    proc = stubs.run("--kproxy", f"/bin/sh {stubs.kproxy}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'recovered by step "sync"' in proc.stdout


class _Resp:
    status = 200

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _http_error(code: int, body: dict | None):
    import io

    data = json.dumps(body).encode() if body is not None else b""
    return urllib.error.HTTPError("http://x/healthz", code, "x", {}, io.BytesIO(data))


@pytest.mark.parametrize(
    "answer, state",
    [
        (_Resp(), "ok"),
        (_http_error(503, {"healthy": True, "nodeEligible": False}), "draining"),
        (_http_error(503, {"healthy": False, "nodeEligible": True}), "unhealthy"),
        (_http_error(500, None), "unhealthy"),
        (urllib.error.URLError(ConnectionRefusedError(111, "refused")), "down"),
    ],
)
def test_healthz_classification(monkeypatch, answer, state):
    mod = load_script()

    def urlopen(url, timeout):
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(mod.urllib.request, "urlopen", urlopen)
    assert mod.check_healthz("http://x/healthz", 1)["state"] == state
    assert mod.check_healthz(None, 1)["state"] == "skipped"


# --------------------------------------------------------------------------- systemd units


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string((UNITS / name).read_text())
    return parser


def test_units_key_settings():
    svc = _unit("kproxy.service")["Service"]
    assert svc["ExecStart"].startswith("/usr/local/bin/kproxy run ")
    assert svc["EnvironmentFile"].lstrip("-") == "/etc/kproxy/kproxy.env"
    assert svc["Restart"] == "always" and svc["RestartSec"] == "2"
    caps = {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert set(svc["CapabilityBoundingSet"].split()) == caps
    assert set(svc["AmbientCapabilities"].split()) == caps
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
    assert {"/run"} <= {p.lstrip("-") for p in svc["ReadWritePaths"].split()}
    assert "/var/lib/kproxy" in {p.lstrip("-") for p in svc["ReadWritePaths"].split()}
    families = set(svc["RestrictAddressFamilies"].split())
    assert families == {"AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"}
    assert svc["StateDirectory"].split()[0] == "kproxy"
    # what would break kproxy: no private network, /proc/sys writable (route_localnet)
    for forbidden in ("PrivateNetwork", "ProtectKernelTunables", "IPAddressDeny"):
        assert forbidden not in svc
    assert _unit("kproxy.service")["Install"]["WantedBy"] == "multi-user.target"

    rec = _unit("kproxy-recover.service")["Service"]
    assert rec["Type"] == "oneshot"
    assert rec["ExecStart"].startswith("/usr/local/bin/kproxy-recover")
    assert set(rec["CapabilityBoundingSet"].split()) == caps

    timer = _unit("kproxy-recover.timer")
    assert timer["Timer"]["OnUnitActiveSec"] == "1min"
    assert timer["Timer"].get("Unit", "kproxy-recover.service") == "kproxy-recover.service"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_units_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (the key settings are checked above)")
    # verify wants the ExecStart programs to exist: point them at stand-ins in tmp_path
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for prog in ("kproxy", "kproxy-recover"):
        (bin_dir / prog).write_text("#!/bin/sh\n")
        (bin_dir / prog).chmod(0o755)
    names = ("kproxy.service", "kproxy-recover.service", "kproxy-recover.timer")
    for name in names:
        text = (UNITS / name).read_text().replace("/usr/local/bin/", f"{bin_dir}/")
        (tmp_path / name).write_text(text)
    proc = subprocess.run(
        [tool, "verify", *(str(tmp_path / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


# --------------------------------------------------------------------------- kernel


# The same Service / EndpointSlice builders as the daemon tests.
from test_kernel_daemon import service  # noqa: E402
from test_kernel_daemon import slice_ as endpoint_slice  # noqa: E402


class Node:
    """The node namespace, its API server and the paths kproxy and the script use."""

    def __init__(self, topo: netns.Topology, api: FakeApiServer, tmp: Path) -> None:
        self.topo, self.api = topo, api
        self.lock = tmp / "kproxy.lock"
        self.cache = tmp / "state.json"
        self.snapshots = tmp / "snapshots"
        self.snapshots.mkdir()
        self.daemon: subprocess.Popen | None = None
        self.daemon_log = tmp / "daemon.log"

    def kproxy(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "kproxy", *args, "--lock-file", str(self.lock)]
        proc = netns.run(self.topo.node, argv, check=False, timeout=120)
        if check:
            assert proc.returncode == 0, f"kproxy {' '.join(args)}: {proc.stderr}"
        return proc

    def sync_from_api(self) -> None:
        self.kproxy(
            "sync", "--master", self.api.url, "--state-cache", str(self.cache), *SYNC_ARGS.split()
        )

    def flush(self) -> None:
        """What another tool might do: flush and delete every chain in nat and filter."""
        for table in ("nat", "filter"):
            netns.run(self.topo.node, ["iptables", "-t", table, "-F"])
            netns.run(self.topo.node, ["iptables", "-t", table, "-X"])
        assert "KUBE-" not in netns.iptables_save(self.topo.node, "nat")

    def reached(self, count: int = 8) -> set[str]:
        replies = self.topo.tcp(self.topo.pods["c"].ns, WEB_IP, 80, count=count, timeout=1.0)
        return {r.pod if r.ok else r.result for r in replies}

    def recover(
        self, *extra: str, healthz: str = "http://127.0.0.1:10256/healthz", json_report=True
    ) -> tuple[subprocess.CompletedProcess[str], dict | None]:
        argv = [
            str(SCRIPT),
            "--kproxy",
            f"{shlex.quote(sys.executable)} -m kproxy",
            "--healthz",
            healthz,
            "--master",
            self.api.url,
            "--api-timeout",
            "2",
            "--lock-file",
            str(self.lock),
            "--state-cache",
            str(self.cache),
            "--snapshot-dir",
            str(self.snapshots),
            "--sync-args",
            SYNC_ARGS,
            "--step-timeout",
            "60",
            *(["--json"] if json_report else []),
            *extra,
        ]
        proc = netns.run(self.topo.node, argv, check=False, timeout=300)
        report = json.loads(proc.stdout) if json_report and proc.stdout.strip() else None
        return proc, report

    def start_daemon(self) -> None:
        argv = [netns._ip(), "netns", "exec", self.topo.node, sys.executable, "-m", "kproxy"]
        argv += ["run", "--master", self.api.url, *SYNC_ARGS.split()]
        argv += ["--lock-file", str(self.lock), "--state-cache", str(self.cache)]
        argv += ["--snapshot-dir", str(self.snapshots)]
        argv += ["--healthz-bind-address", "127.0.0.1:10256"]
        argv += ["--metrics-bind-address", "127.0.0.1:10249"]
        argv += ["--iptables-min-sync-period", "0.2s", "--canary-interval", "0.5s"]
        with open(self.daemon_log, "ab") as log:
            # `ip netns exec` execs kproxy: the pid is the daemon's own
            self.daemon = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def stop_daemon(self) -> None:
        proc, self.daemon = self.daemon, None
        netns.stop_process(proc)


@pytest.fixture
def node(kernel_support: None, tmp_path: Path) -> Iterator[Node]:
    topo = netns.build(pods=(("a", 2), ("b", 3), ("c", 4)), clients=0)
    api = None
    env = None
    try:
        for name in ("a", "b"):
            topo.start_server(topo.pods[name], tcp=[8080])
        api = netns.call_in(topo.node, lambda: FakeApiServer(host="127.0.0.1").start())
        api.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}})
        api.apply(service("web", WEB_IP))
        api.apply(endpoint_slice("web-1", "web", POD_A, POD_B))
        env = Node(topo, api, tmp_path)
        yield env
    finally:
        if env is not None:
            env.stop_daemon()
        if api is not None:
            api.stop()
        topo.close()


def _check_recovered(node: Node, proc, report: dict, step: str) -> None:
    print(f"\n--- kproxy-recover ({step}) ---\n{proc.stdout}{proc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["result"] == "recovered" and report["recovered_by"] == step
    rto = report["rto_seconds"]
    print(f"RTO step={step}: {rto:.2f}s")
    assert 0 < rto < RTO_CAP
    assert node.reached() <= {"a", "b"}, "traffic to the ClusterIP did not come back"


def _break(node: Node) -> None:
    assert node.reached() <= {"a", "b"}
    node.flush()
    assert not node.reached(count=2) & {"a", "b"}, "traffic still flows with no rules"


@pytest.mark.kernel
def test_recover_by_sync_from_the_api(node):
    node.sync_from_api()
    _break(node)
    node.cache.unlink()  # the API step refreshes it
    proc, report = node.recover()
    _check_recovered(node, proc, report, "sync")
    assert len(report["steps"]) == 1
    cached = json.loads(node.cache.read_text())
    assert cached["kind"] == "List" and len(cached["items"]) >= 2


@pytest.mark.kernel
def test_recover_from_the_state_cache(node):
    node.sync_from_api()
    assert node.cache.exists()
    node.api.set_fail("drop")
    _break(node)
    proc, report = node.recover()
    _check_recovered(node, proc, report, "cache")
    first = report["steps"][0]
    assert first["step"] == "sync" and not first["ok"] and first["exit"] == 2


@pytest.mark.kernel
def test_recover_from_the_latest_snapshot(node):
    node.sync_from_api()
    node.kproxy("snapshot", "--out", str(node.snapshots / "kproxy-test.snapshot"))
    node.api.set_fail("drop")
    node.cache.unlink()
    _break(node)
    proc, report = node.recover()
    _check_recovered(node, proc, report, "restore")
    assert [s["step"] for s in report["steps"]] == ["sync", "cache", "restore"]
    assert "no state cache" in report["steps"][1]["reason"]


@pytest.mark.kernel
def test_nothing_to_recover_from(node):
    node.sync_from_api()
    node.api.set_fail("drop")
    node.cache.unlink()
    _break(node)
    proc, _ = node.recover(json_report=False)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 1
    assert "FAILED: no step restored the rules" in proc.stdout
    lines = proc.stdout.splitlines()
    for step in ("sync", "cache", "restore"):
        assert any(line.startswith(f"  {step}: ") for line in lines), step
    assert not node.reached(count=2) & {"a", "b"}


@pytest.mark.kernel
def test_healthy_node_nothing_to_do(node):
    node.start_daemon()
    _wait_daemon_ready(node)
    before = netns.iptables_save(node.topo.node)
    proc, _ = node.recover(json_report=False)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0
    assert proc.stdout.strip() == "kproxy-recover: healthy, nothing to do"
    assert netns.iptables_save(node.topo.node) == before


def _wait_daemon_ready(node: Node) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            status = netns.http_get(node.topo.node, "http://127.0.0.1:10256/readyz", 1.0)[0]
        except OSError:
            status = None
        if status == 200 and node.reached(count=2) <= {"a", "b"}:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"daemon not ready: {node.daemon_log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.mark.kernel
def test_agent_killed_rules_stay_and_recover_refreshes_them(node):
    node.start_daemon()
    _wait_daemon_ready(node)
    os.kill(node.daemon.pid, signal.SIGKILL)
    node.daemon.wait(10)
    assert node.reached() <= {"a", "b"}, "traffic stopped when the agent died"
    # A change the dead agent cannot apply: the script's sync from the API does.
    node.api.apply(endpoint_slice("web-1", "web", POD_B))
    proc, report = node.recover()
    _check_recovered(node, proc, report, "sync")
    assert report["before"]["healthz"]["state"] == "down" and report["before"]["chains"]["ok"]
    assert node.reached(count=12) == {"b"}


@pytest.mark.kernel
def test_dry_run_changes_nothing(node):
    node.sync_from_api()
    _break(node)
    proc, report = node.recover("--dry-run")
    assert proc.returncode == 1 and report["result"] == "dry-run"
    assert [s["step"] for s in report["steps"]] == ["sync", "cache", "restore"]
    assert "KUBE-" not in netns.iptables_save(node.topo.node, "nat")
    print(textwrap.indent(proc.stdout, "  "))
