"""A node whose IPv6 family cannot be programmed runs IPv4 only, and says so (issue 13.3).

Two single-stack nodes, each a network namespace of its own (tests/chaos/harness.py's Bench):
- iptables mode with no ip6tables* binaries at all: kproxy's PATH is a directory of symlinks
  to every command of this machine but those;
- nftables mode on a kernel that refuses the ip6 family: `nft` on kproxy's PATH is a shim
  that refuses every command naming ip6, as nft does there. (`disable_ipv6=1` is no stand-in:
  nft's ip6 family keeps working under it.)

`kproxy run` must become ready, stay healthy past 2 x the sync period (it used to answer 503
on /healthz and /livez, IPv6 "never updated", so the kubelet restarted it over and over), keep
the Service health check node ports healthy, and serve IPv4 traffic; `kproxy sync` must
program IPv4 and exit 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import netns
from tests.chaos.harness import HEALTH, NODE, POD_A, POD_B, WEB_IP, Bench, service, slice_

pytestmark = pytest.mark.kernel

SYNC_PERIOD = 2.0
HEALTH_CHECK_PORT = 32100

# Refuses what a kernel without IPv6 nf_tables refuses: any command naming the ip6 family,
# on the command line or in the file read from stdin; the rest goes to the real nft.
NFT_SHIM = """#!/bin/sh
refuse() {
    echo "Error: Could not process rule: Address family not supported by protocol" >&2
    exit 1
}
case " $* " in *" ip6 "*) refuse ;; esac
case " $* " in
*" -f - "*)
    input=$(mktemp)
    cat >"$input"
    if grep -Eq '(^|[^[:alnum:]_])ip6([^[:alnum:]_]|$)' "$input"; then
        rm -f "$input"
        refuse
    fi
    "{real}" "$@" <"$input"
    status=$?
    rm -f "$input"
    exit $status
    ;;
esac
exec "{real}" "$@"
"""


def single_stack_path(directory: Path, mode: str) -> str:
    """A PATH of one directory holding a symlink to every command this machine has, but
    ip6tables* (iptables mode) or with `nft` replaced by the ip6-refusing shim (nftables)."""
    directory.mkdir()
    for source in netns.command_env()["PATH"].split(os.pathsep):
        if not os.path.isdir(source):
            continue
        for name in os.listdir(source):
            link = directory / name
            if link.exists() or link.is_symlink():
                continue  # an earlier PATH entry wins, as in a lookup
            if mode == "iptables" and name.startswith("ip6tables"):
                continue
            if mode == "nftables" and name == "nft":
                continue
            link.symlink_to(os.path.join(source, name))
    if mode == "nftables":
        real = netns.which("nft")
        assert real is not None
        shim = directory / "nft"
        shim.write_text(NFT_SHIM.replace("{real}", real))
        shim.chmod(0o755)
    return str(directory)


@pytest.fixture
def single_stack(proxy_mode: str, tmp_path: Path) -> Iterator[tuple[Bench, str]]:
    path = single_stack_path(tmp_path / "bin", proxy_mode)
    with Bench(mode=proxy_mode, workdir=tmp_path / "bench") as bench:
        assert bench.kproxy is not None
        full_env = bench.kproxy.env
        bench.kproxy.env = lambda: {**full_env(), "PATH": path}  # type: ignore[method-assign]
        yield bench, path


def pods_reached(bench: Bench, count: int = 12) -> set[str]:
    assert bench.topo is not None
    replies = bench.topo.tcp(bench.topo.pods["c"].ns, WEB_IP, 80, count=count, timeout=1.0)
    return {r.pod for r in replies if r.ok}


def test_run_on_a_single_stack_node_stays_healthy_and_serves_ipv4(single_stack):
    bench, _ = single_stack
    # An externalTrafficPolicy: Local LoadBalancer: its health check node port must say
    # healthy too (a 503 there makes the load balancers drain the node).
    lb = service(
        "lb", "10.96.0.30", type="LoadBalancer", externalTrafficPolicy="Local",
        healthCheckNodePort=HEALTH_CHECK_PORT,
    )  # fmt: skip
    lb["spec"]["ports"][0]["nodePort"] = 30080
    bench.apply(lb, slice_("lb-1", "lb", [POD_A]))
    bench.start_kproxy("--iptables-sync-period", f"{SYNC_PERIOD:g}s", wait_ready=False)
    bench.wait("/readyz 200 (the first full sync done)", lambda: bench.status("/readyz") == 200, 60)
    ready_at = time.monotonic()
    assert pods_reached(bench) == {"a", "b"}

    # Past 2 x the sync period (upstream's health timeout) with a change applied meanwhile,
    # so a family that is never updated would have turned every probe to 503.
    bench.apply(slice_("web-1", "web", [POD_B]))
    bench.wait("the change served", lambda: pods_reached(bench, 6) == {"b"}, 30)
    while time.monotonic() < ready_at + 2 * SYNC_PERIOD + 2:
        time.sleep(0.2)
    assert bench.kproxy is not None and bench.kproxy.alive(), bench.kproxy.log()[-3000:]
    for path in ("/healthz", "/livez", "/readyz"):
        assert bench.status(path) == 200, f"{path}\n{bench.kproxy.log()[-3000:]}"
    status, _, body = netns.http_get(bench.node, f"{HEALTH}/livez")
    assert list(json.loads(body)["status"]) == ["IPv4"], body
    status, _, body = netns.http_get(bench.node, f"http://127.0.0.1:{HEALTH_CHECK_PORT}/")
    assert status == 200 and json.loads(body)["serviceProxyHealthy"] is True, body

    # Said once at start, and shown in kproxy_info; nothing counted as failed.
    log = bench.kproxy.log()
    assert log.count("support for family IPv6") == 1, log[-3000:]
    assert bench.metric("kproxy_info", families="IPv4", mode=bench.mode) == 1
    assert bench.metric("kproxy_sync_failures_total") == 0
    assert bench.metric("kubeproxy_sync_proxy_rules_iptables_restore_failures_total") == 0
    # The IPv6 family was left alone.
    if bench.mode == "nftables":
        assert netns.nft_table(bench.node, "ip6") is None
        assert netns.nft_table(bench.node, "ip") is not None
    else:
        assert "KUBE-SERVICES" not in netns.iptables_save(bench.node, family=6)


def test_sync_on_a_single_stack_node_programs_ipv4(single_stack, write_state):
    bench, path = single_stack
    assert bench.api is not None
    state = write_state([o for k in ("Service", "EndpointSlice") for o in bench.api.objects(k)])
    argv = [netns._ip(), "netns", "exec", bench.node, sys.executable, "-m", "kproxy", "sync"]
    argv += ["--state", str(state), "--mode", bench.mode, "--node-name", NODE]
    argv += ["--lock-file", str(bench.workdir / "kproxy.lock")]
    env = {**netns.command_env(), "PATH": path, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "support for family IPv6" in proc.stderr
    assert pods_reached(bench) == {"a", "b"}
