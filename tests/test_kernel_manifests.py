"""The DaemonSet's own command line, run for real: `kproxy run` with the args of the built
overlay (the ConfigMap's values substituted, kubeadm's kube-proxy kubeconfig pointed at the
test API server) in a network namespace; its probes answer on the paths and port the
DaemonSet uses, and every series an alert or dashboard panel uses is in its live /metrics.

Only the paths kproxy writes (state cache, snapshots, lock) are moved into the test's own
directory; everything runs inside namespaces the test creates, and the daemon is killed by pid.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns  # noqa: E402
import test_manifests as tm  # noqa: E402
from fake_apiserver import FakeApiServer  # noqa: E402

pytestmark = pytest.mark.kernel

WEB_IP = "10.96.0.10"
POD_A = "10.244.1.2"


def objects() -> tuple[list[dict], str]:
    """The overlay as `kubectl kustomize` builds it, else the base as written."""
    if shutil.which("kubectl"):
        return tm.kustomize_build(tm.BESIDE), "overlay"
    return tm.base_objects(), "base"


def kubeconfig_for(api_url: str, tmp: Path) -> Path:
    """kubeadm's kube-proxy kubeconfig.conf with its server and service-account paths moved to
    the test's: what the overlay mounts at /var/lib/kube-proxy."""
    cm = tm.find(tm.load_docs(tm.KUBEADM), "ConfigMap", "kube-proxy")
    conf = yaml.safe_load(cm["data"]["kubeconfig.conf"])
    (tmp / "token").write_text("test-token")  # as the kubelet writes it: no newline
    (tmp / "ca.crt").write_text("unused: the test API server speaks plain HTTP\n")
    cluster = conf["clusters"][0]["cluster"]
    assert cluster["server"].startswith("https://")
    cluster["server"] = api_url
    cluster["certificate-authority"] = str(tmp / "ca.crt")
    user = conf["users"][0]["user"]
    assert user["tokenFile"].endswith("/serviceaccount/token")
    user["tokenFile"] = str(tmp / "token")
    path = tmp / "kubeconfig.conf"
    path.write_text(yaml.safe_dump(conf))
    return path


def daemon_argv(ds: dict, cm: dict, api_url: str, tmp: Path) -> list[str]:
    args = tm.expand_args(ds, cm, node="node-1")
    moved = {
        "--state-cache": str(tmp / "state.json"),
        "--snapshot-dir": str(tmp / "snapshots"),
        "--lock-file": str(tmp / "kproxy.lock"),
        "--kubeconfig": str(kubeconfig_for(api_url, tmp)),
    }
    out = []
    for a in args:
        name = a.split("=", 1)[0]
        out.append(f"{name}={moved[name]}" if name in moved else a)
    if tm.flag(args, "--kubeconfig") is None:
        out.append(f"--master={api_url}")
    return out


def get(topo: netns.Topology, url: str) -> tuple[int, str] | None:
    try:
        status, _, body = netns.http_get(topo.node, url, timeout=1.0)
    except OSError:
        return None
    return status, body


@pytest.fixture
def running(kernel_support: None, tmp_path: Path):
    objs, which = objects()
    ds = tm.find(objs, "DaemonSet", "kproxy")
    cm = tm.find(objs, "ConfigMap", "kproxy-config")
    topo = netns.build(pods=(("a", 2), ("b", 3)), clients=0)
    api = proc = log = None
    try:
        topo.start_server(topo.pods["a"], tcp=[8080])
        api = netns.call_in(topo.node, lambda: FakeApiServer(host="127.0.0.1").start())
        api.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}})
        api.apply(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"namespace": "default", "name": "web"},
                "spec": {
                    "clusterIP": WEB_IP,
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                },
            }
        )
        trigger = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        api.apply(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "namespace": "default",
                    "name": "web-1",
                    "labels": {"kubernetes.io/service-name": "web"},
                    "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": trigger},
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [
                    {"addresses": [POD_A], "conditions": {"ready": True}, "nodeName": "node-1"}
                ],
            }
        )
        argv = daemon_argv(ds, cm, api.url, tmp_path)
        log = open(tmp_path / "kproxy.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [netns._ip(), "netns", "exec", topo.node, sys.executable, "-m", "kproxy", "run", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        yield topo, api, proc, ds, argv, which, tmp_path
    finally:
        netns.stop_process(proc)
        if log is not None:
            log.close()
        if api is not None:
            api.stop()
        topo.close()


def wait_for(what, check, proc, tmp: Path, timeout: float = 20.0, logged=None):
    """check() until it is true; fails when `proc` exits or at `timeout`, with the end of its
    log (tmp/kproxy.log, or `logged()`)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if proc.poll() is not None or time.monotonic() > deadline:
            state = f"exited {proc.returncode}" if proc.poll() is not None else "timed out"
            log = (logged() if logged else (tmp / "kproxy.log").read_text(errors="replace"))[-3000:]
            pytest.fail(f"{state} waiting for {what}\n--- kproxy log ---\n{log}")
        time.sleep(0.2)


def test_daemonset_command_line_runs_probes_answer_and_metrics_cover_alerts(running):
    topo, api, proc, ds, argv, which, tmp = running
    c = tm.container(ds)
    healthz = "http://127.0.0.1:" + str(c["readinessProbe"]["httpGet"]["port"])
    metrics_port = tm.flag(argv, "--metrics-bind-address").rsplit(":", 1)[1]
    # Readiness: the first full sync is done.
    wait_for(
        "readinessProbe 200",
        lambda: (get(topo, healthz + c["readinessProbe"]["httpGet"]["path"]) or (0,))[0] == 200,
        proc,
        tmp,
    )
    assert (get(topo, healthz + c["livenessProbe"]["httpGet"]["path"]) or (0,))[0] == 200
    # The rules are there: the ClusterIP reaches pod a from pod b.
    replies = topo.tcp(topo.pods["b"].ns, WEB_IP, 80, count=3, timeout=1.0)
    assert {r.pod for r in replies if r.ok} == {"a"}
    # It read the cluster through the address given by the kubeconfig (overlay) or --master.
    assert any(r.path.startswith("/api/v1/services") for r in api.requests)
    if which == "overlay":
        assert any(a.startswith("--kubeconfig=") for a in argv)
    # The snapshot the SnapshotTooOld alert watches is written after the first full sync.
    text = wait_for(
        "a snapshot and its timestamp",
        lambda: (
            (r := get(topo, f"http://127.0.0.1:{metrics_port}/metrics"))
            and re.search(r"^kproxy_last_snapshot_timestamp_seconds [1-9]", r[1], re.M)
            and r[1]
        ),
        proc,
        tmp,
    )
    live = tm.exported_from_text(text)
    # Labels of labelled series not used yet in this short run (a drift repair's reason, a
    # sync failure's family) are taken from kproxy's declarations; the names only from the
    # live scrape.
    declared = tm.declared_labels()
    exported = {name: labels | declared.get(name, set()) for name, labels in live.items()}
    assert tm.check_exprs_against(exported) == []
    for series, label in (
        ("kproxy_apiserver_reachable", "address"),
        ("kubeproxy_sync_proxy_rules_iptables_total", "table"),
        ("rest_client_requests_total", "code"),
    ):
        assert label in live[series], f"{series} has no {label} label in the scrape"
    assert re.search(r'^kubeproxy_sync_proxy_rules_iptables_total\{table="nat"\} [1-9]', text, re.M)
    assert re.search(r"^kubeproxy_network_programming_duration_seconds_count [1-9]", text, re.M)
    assert re.search(r"^process_resident_memory_bytes [1-9]", text, re.M)
    assert list((tmp / "snapshots").iterdir()), "no snapshot written"


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_every_series_of_the_alerts_and_dashboard_is_in_the_first_scrape(mode):
    """Right after start, before anything failed, restarted or was repaired, /metrics already
    has every series an alert or a dashboard panel selects, label values included (a labelled
    counter born at its first increment leaves a panel empty and an alert's increase() blind
    to that first event)."""
    from tests.chaos.harness import METRICS, Bench

    with Bench(mode=mode) as bench:
        bench.start_kproxy(wait_ready=False)

        def first_scrape() -> str | None:
            try:
                status, _, body = netns.http_get(bench.node, METRICS, timeout=2.0)
            except OSError:
                return None
            return body if status == 200 else None

        text = bench.wait("the first /metrics answer", first_scrape, timeout=30)
        missing = tm.missing_series(text)
        if mode == "nftables":
            # The snapshot alert applies to iptables mode alone, by joining on this series.
            missing.remove('KproxySnapshotTooOld: no kproxy_info{mode="iptables"}')
        assert missing == []
        # Created at 0, not merely declared: nothing has failed or been repaired yet.
        for line in text.splitlines():
            if line.startswith(("kproxy_drift_repairs_total{", "kproxy_watch_restarts_total{")):
                assert line.endswith(" 0.0"), line
