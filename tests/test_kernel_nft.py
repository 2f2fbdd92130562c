"""nftables mode against a real kernel: big syncs, O(changes) updates, foreign tables kept,
the daemon repairing its table, and switching modes without a gap."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns  # noqa: E402
import synthetic  # noqa: E402
from fake_apiserver import FakeApiServer  # noqa: E402
from test_kernel_daemon import POD_A, POD_B, WEB_IP, Daemon, pods_reached, service, slice_, wait_for  # noqa: E402,E501

from tests.chaos.harness import group_alive  # noqa: E402

pytestmark = pytest.mark.kernel

FOREIGN_NFT = """table inet foreign {
	chain input {
		type filter hook input priority 0; policy accept;
		ip saddr 192.0.2.99 counter accept
	}
}
"""


def kproxy(ns, *args):
    return netns.run(
        ns,
        [
            sys.executable,
            "-m",
            "kproxy",
            *args,
            "--mode",
            "nftables",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--lock-file",
            "/tmp/kproxy-nft-test.lock",
        ],
        check=False,
    )


def nft(ns, *args) -> str:
    return netns.run(ns, ["nft", *args]).stdout


def write(path: Path, objects) -> Path:
    path.write_text(json.dumps(synthetic.as_list(objects)))
    return path


@pytest.fixture
def node(kernel_support, nft_oracle):
    topo = netns.Topology()
    try:
        netns.run(topo.node, ["nft", "-f", "-"], input=FOREIGN_NFT)
        netns.run(topo.node, ["iptables", "-t", "nat", "-N", "DOCKER"])
        netns.run(topo.node, ["iptables", "-t", "nat", "-A", "DOCKER", "-j", "RETURN"])
        yield topo.node
    finally:
        topo.close()


def test_big_sync_then_one_change_sends_only_that_change(node, tmp_path):
    objects = synthetic.generate(300, 5)
    state = write(tmp_path / "s.json", objects)
    res = kproxy(node, "sync", "--state", str(state))
    assert res.returncode == 0, res.stderr
    table = nft(node, "list", "table", "ip", "kproxy")
    assert table.count("dnat to") == 1500
    assert kproxy(node, "diff", "--state", str(state)).returncode == 0
    foreign = nft(node, "list", "table", "inet", "foreign")
    slice_ = next(o for o in objects if o["metadata"]["name"] == "svc-7-x")
    slice_["endpoints"][0]["addresses"] = ["10.200.0.1"]
    write(state, objects)
    res = kproxy(node, "sync", "--state", str(state))
    assert res.returncode == 0, res.stderr
    sent = int(re.search(r"IPv4 \(nftables[^)]*\): 300 services, (\d+) lines", res.stderr)[1])
    assert sent <= 12, res.stderr
    table = nft(node, "list", "table", "ip", "kproxy")
    assert "dnat to 10.200.0.1:8080" in table and table.count("dnat to") == 1500
    assert "svc-7/tcp/http__10.128.0.35/8080" not in table  # the old endpoint's chain is gone
    assert nft(node, "list", "table", "inet", "foreign") == foreign
    assert "-A DOCKER -j RETURN" in netns.iptables_save(node, "nat")
    assert kproxy(node, "diff", "--state", str(state)).returncode == 0


def test_switching_modes_leaves_no_gap_and_no_leftovers(kernel_support, tmp_path):
    topo = netns.build(pods=(("a", 2), ("c", 4)), clients=0)
    try:
        topo.start_server(topo.pods["a"], tcp=[8080])
        state = tmp_path / "s.json"
        state.write_text(
            json.dumps(
                {"kind": "List", "items": [service("web", WEB_IP), slice_("web-1", "web", POD_A)]}
            )
        )
        common = [
            "--state",
            str(state),
            "--cluster-cidr",
            "10.244.0.0/16",
            "--lock-file",
            str(tmp_path / "lock"),
        ]
        run = [sys.executable, "-m", "kproxy", "sync"]
        assert netns.run(topo.node, [*run, *common]).returncode == 0
        assert pods_reached(topo) == {"a"}
        assert netns.run(topo.node, [*run, *common, "--mode", "nftables"]).returncode == 0
        assert pods_reached(topo) == {"a"}
        saved = topo.iptables_save()
        assert "KUBE-SERVICES" not in saved and "KUBE-SEP-" not in saved
        assert "table ip kproxy" in nft(topo.node, "list", "tables")
        assert netns.run(topo.node, [*run, *common]).returncode == 0
        assert pods_reached(topo) == {"a"}
        assert "kproxy" not in nft(topo.node, "list", "tables")
        assert "KUBE-SERVICES" in topo.iptables_save()
    finally:
        topo.close()


def test_daemon_in_nftables_mode_repairs_its_table(kernel_support, tmp_path):
    topo = netns.build(pods=(("a", 2), ("b", 3), ("c", 4)), clients=0)
    api = None
    daemon = None
    try:
        for name in ("a", "b"):
            topo.start_server(topo.pods[name], tcp=[8080])
        api = netns.call_in(topo.node, lambda: FakeApiServer(host="127.0.0.1").start())
        api.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}})
        api.apply(service("web", WEB_IP))
        api.apply(slice_("web-1", "web", POD_A))
        # Rules of iptables mode already on the node: they go after the first nft sync.
        state = tmp_path / "s.json"
        state.write_text(
            json.dumps(
                {"kind": "List", "items": [service("web", WEB_IP), slice_("web-1", "web", POD_A)]}
            )
        )
        assert (
            netns.run(
                topo.node,
                [
                    sys.executable,
                    "-m",
                    "kproxy",
                    "sync",
                    "--state",
                    str(state),
                    "--cluster-cidr",
                    "10.244.0.0/16",
                    "--lock-file",
                    str(tmp_path / "lock"),
                ],
            ).returncode
            == 0
        )
        daemon = Daemon(topo, api, tmp_path / "kproxy.log")
        daemon.start("--mode", "nftables", "--iptables-sync-period", "2s")
        wait_for(
            "iptables mode's rules removed",
            lambda: "KUBE-SERVICES" not in topo.iptables_save(),
            daemon=daemon,
        )
        assert pods_reached(topo) == {"a"}
        # A change: applied as a partial transaction.
        api.apply(slice_("web-1", "web", POD_B))
        wait_for("b reached", lambda: pods_reached(topo) == {"b"}, daemon=daemon)
        # Someone flushes the whole ruleset: the table is back at once.
        netns.run(topo.node, ["nft", "flush", "ruleset"])
        flushed = time.monotonic()
        wait_for(
            "table repaired", lambda: pods_reached(topo, count=3) == {"b"}, timeout=5, daemon=daemon
        )
        print(f"nft ruleset flush repaired in {time.monotonic() - flushed:.2f}s")
        # Seen as it was committed (nf_tables events), and the one who did it named.
        assert daemon.metric("kproxy_drift_repairs_total", reason="foreign-change", process="nft")
        # Someone edits a chain inside kproxy's table: it is put back at once too.
        chain = next(
            ln.split()[1]
            for ln in nft(topo.node, "list", "table", "ip", "kproxy").splitlines()
            if ln.strip().startswith("chain service-") and "/" in ln
        )
        good = nft(topo.node, "list", "chain", "ip", "kproxy", chain)
        netns.run(topo.node, ["nft", "flush", "chain", "ip", "kproxy", chain])
        wait_for(
            "edited chain repaired",
            lambda: nft(topo.node, "list", "chain", "ip", "kproxy", chain) == good,
            timeout=8,
            daemon=daemon,
        )
        assert (
            daemon.metric("kproxy_drift_repairs_total", reason="foreign-change", process="nft") >= 2
        )
    finally:
        if daemon is not None:
            daemon.stop()
        if api is not None:
            api.stop()
        topo.close()


def test_nft_table_check_asks_netlink_for_names_only(node):
    """Whether the kproxy table exists is read from the table names over netlink, never by
    `nft list` (which fetches the whole ruleset first: 98 s next to a 10k-Service iptables-nft
    ruleset). A table with a longer name is not mistaken for it."""
    code = (
        "from kproxy.nftables.nft import NftBackend; "
        "print(NftBackend('ip').exists(), NftBackend('ip6').exists(), NftBackend('ip').read())"
    )
    netns.run(node, ["nft", "add", "table", "ip", "kproxy-old"])
    out = netns.run(node, [sys.executable, "-c", code]).stdout.split()
    assert out == ["False", "False", "None"]
    netns.run(node, ["nft", "add", "table", "ip6", "kproxy"])
    out = netns.run(node, [sys.executable, "-c", code]).stdout.split()
    assert out == ["False", "True", "None"]


def test_streamed_transaction_that_fails_changes_nothing_and_names_the_line(node):
    """The nft transaction is written to `nft -f -` in pieces; a refused line fails the whole
    transaction (nothing applied) and the error shows that line."""
    from kproxy.nftables.nft import NftBackend, NftError

    def pieces():
        yield "add table ip kproxy\n"
        yield "".join(f"add chain ip kproxy c{i}\n" for i in range(3000))
        yield "add rule ip kproxy c1 ip daddr 10.0.0.1 no-such-statement\n"
        yield "".join(f"add chain ip kproxy d{i}\n" for i in range(3000))

    def apply():
        with pytest.raises(NftError) as err:
            NftBackend("ip").apply(pieces)
        return err.value

    err = netns.call_in(node, apply)
    marked = [ln for ln in err.detail.splitlines() if re.match(r"\s*\d+> ", ln)]
    assert marked and "no-such-statement" in marked[0], err.detail
    assert "kproxy" not in nft(node, "list", "tables")


# `kproxy`'s apply in a process of its own, stopped in the middle of writing its transaction:
# the first piece (a flush) is out, the rest is not made yet. A real transaction's pieces are
# 4,096 lines (~300 KB), larger than any buffer between kproxy and nft, so the padding makes
# this piece reach past Python's own buffer as a real one does.
_WRITER_STOPPED_MID_TRANSACTION = """
import sys, time
from pathlib import Path
from kproxy.nftables.nft import NftBackend

def pieces():
    yield "flush chain ip kproxy services\\n" + "# padding\\n" * 30000
    Path(sys.argv[1]).touch()
    time.sleep(120)
    yield "add rule ip kproxy services ip daddr 10.96.0.10 counter accept\\n"

NftBackend("ip").apply(pieces)
"""


def test_kill9_while_a_transaction_is_written_changes_nothing(node, tmp_path):
    """kill -9 (or the OOM killer) of kproxy while it writes an nft transaction: `nft -f -`
    commits whatever it has read when its input ends, so nft must never see an unfinished
    transaction. Here kproxy alone is killed, as the OOM killer does: an `nft` child, if
    one was started, outlives it."""
    netns.run(
        node,
        ["nft", "-f", "-"],
        input="table ip kproxy {\n\tchain services {\n\t\tip daddr 10.96.0.10 accept\n\t}\n}\n",
    )
    before = nft(node, "-s", "list", "table", "ip", "kproxy")
    marker = tmp_path / "mid-transaction"
    env = netns.command_env()
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    argv = [sys.executable, "-c", _WRITER_STOPPED_MID_TRANSACTION, str(marker)]
    proc = subprocess.Popen(
        [netns._ip(), "netns", "exec", node, *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: what it started can be waited for
    )
    try:
        wait_for(
            "the writer mid-transaction", lambda: marker.exists() or proc.poll() is not None, 30
        )
        assert marker.exists(), f"the writer ended early: {proc.stderr.read().decode()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # An orphaned nft child finishes on its own: wait for the whole group to be gone.
        wait_for("the writer's children", lambda: not group_alive(proc.pid), 30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stderr.close()
    after = nft(node, "-s", "list", "table", "ip", "kproxy")
    assert after == before, f"a killed writer's half transaction was committed:\n{after}"
