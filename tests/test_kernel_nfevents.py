"""nf_tables change events as transactions with their author (kproxy.daemon.nfevents), in a
namespace: nft, iptables-nft and kproxy's own netlink batches, and an overflow."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns  # noqa: E402

from kproxy.daemon.nfevents import Change, NfEventWatcher, Overflow, Transaction  # noqa: E402
from kproxy.nftables.netlink import NetlinkBackend  # noqa: E402
from kproxy.nftables.plan import NftPlan  # noqa: E402
from kproxy.nftables.table import NftChain  # noqa: E402

pytestmark = pytest.mark.kernel


@pytest.fixture
def node(kernel_support):
    topo = netns.Topology()
    try:
        yield topo.node
    finally:
        topo.close()


def run(ns: str, argv: list[str], text: str | None = None) -> int:
    """Run argv in `ns` and return its pid (`ip netns exec` execs the command: same pid)."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, *argv],
        stdin=subprocess.PIPE if text is not None else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=netns.command_env(),
    )
    _, err = proc.communicate(text, timeout=60)
    assert proc.returncode == 0, err
    return proc.pid


def transactions(watcher: NfEventWatcher) -> list[Transaction | Overflow]:
    return list(watcher.read(timeout=2.0))


def test_each_commit_is_one_transaction_with_its_process_and_changes(node):
    watcher = netns.call_in(node, NfEventWatcher)
    try:
        assert transactions_idle(watcher) == []
        pid = run(
            node,
            ["nft", "-f", "-"],
            "add table inet t\nadd chain inet t c\nadd rule inet t c drop\n",
        )
        (tx,) = transactions(watcher)
        assert (tx.pid, tx.process) == (pid, "nft")
        assert tx.changes == [
            Change("add", "table", "inet", "t"),
            Change("add", "chain", "inet", "t", "c"),
            Change("add", "rule", "inet", "t", "c"),
        ]
        pid = run(node, ["iptables", "-t", "nat", "-N", "KUBE-X"])
        run(node, ["iptables", "-t", "nat", "-A", "KUBE-X", "-j", "RETURN"])
        flush = run(node, ["iptables", "-t", "nat", "-F", "KUBE-X"])
        got = [t for t in transactions(watcher) if isinstance(t, Transaction)]
        assert got[0].pid == pid and got[0].process.startswith("iptables")
        assert Change("add", "chain", "ip", "nat", "KUBE-X") in got[0].changes
        assert got[-1].pid == flush
        assert got[-1].touches("ip", "nat") == [Change("delete", "rule", "ip", "nat", "KUBE-X")]
        generations = [t.generation for t in got]
        assert generations == sorted(generations) and len(set(generations)) == len(got)
    finally:
        watcher.close()


def transactions_idle(watcher: NfEventWatcher) -> list:
    """Nothing committed: the watcher sleeps in recv and hands back nothing."""
    return list(watcher.read(timeout=0.3))


def test_kproxys_own_batches_carry_the_committing_threads_id(node):
    watcher = netns.call_in(node, NfEventWatcher)
    try:
        backend = NetlinkBackend("ip")
        plan = NftPlan(
            "ip",
            ops=[("table", "rules for kproxy"), ("chain", "c", NftChain()), ("rule", "c", "drop")],
        )

        def apply() -> int:
            backend.apply_plan(plan)
            return threading.get_native_id()

        thread = netns.call_in(node, apply)
        (tx,) = transactions(watcher)
        # The kernel names the task that committed: the thread (its own id), of this process.
        assert tx.pid == thread and tx.pid != os.getpid()
        assert [c.kind for c in tx.touches("ip", "kproxy")] == ["table", "chain", "rule"]
    finally:
        watcher.close()


def test_a_full_buffer_says_events_were_lost(node):
    watcher = netns.call_in(node, NfEventWatcher)
    try:
        watcher.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        rules = "".join(
            f"add rule inet t c ip saddr 10.0.{i // 250}.{i % 250} drop\n" for i in range(3000)
        )
        run(node, ["nft", "-f", "-"], "add table inet t\nadd chain inet t c\n" + rules)
        got = transactions(watcher)
        assert any(isinstance(t, Overflow) for t in got)
    finally:
        watcher.close()


def test_a_rules_jumps_are_named_when_added_and_deleted(node):
    """kproxy's jumps from built-in chains are told apart from other tools' rules there by the
    chain a rule jumps to, also for a deleted rule."""
    run(node, ["iptables", "-t", "nat", "-N", "KUBE-X"])
    watcher = netns.call_in(node, NfEventWatcher)
    try:
        run(node, ["iptables", "-t", "nat", "-A", "PREROUTING", "-j", "KUBE-X"])
        run(node, ["iptables", "-t", "nat", "-A", "PREROUTING", "-j", "ACCEPT"])
        run(node, ["iptables", "-t", "nat", "-D", "PREROUTING", "-j", "KUBE-X"])
        got = [c for t in transactions(watcher) for c in t.touches("ip", "nat") if c.kind == "rule"]
        assert got == [
            Change("add", "rule", "ip", "nat", "PREROUTING", ("KUBE-X",)),
            Change("add", "rule", "ip", "nat", "PREROUTING"),
            Change("delete", "rule", "ip", "nat", "PREROUTING", ("KUBE-X",)),
        ]
    finally:
        watcher.close()


def test_wake_ends_a_read_that_waits_forever(node):
    watcher = netns.call_in(node, NfEventWatcher)
    try:
        threading.Timer(0.2, watcher.wake).start()
        assert list(watcher.read(timeout=None)) == []
    finally:
        watcher.close()


OWN_IN_A_PID_NAMESPACE = r"""
import sys, threading
from kproxy import tools
from kproxy.daemon.nfevents import NfEventWatcher, Transaction
from kproxy.nftables.netlink import NetlinkBackend
from kproxy.nftables.plan import NftPlan
from kproxy.nftables.table import NftChain
with NfEventWatcher() as w:
    plan = NftPlan("ip", ops=[("table", "t"), ("chain", "c", NftChain()), ("rule", "c", "drop")])
    NetlinkBackend("ip").apply_plan(plan)
    text = "*nat\n:KUBE-X - [0:0]\nCOMMIT\n"
    code, err = tools.stream_to(["iptables-restore", "--noflush"], text)
    assert code == 0, err
    got = [t for t in w.read(timeout=2) if isinstance(t, Transaction)]
    while len(got) < 2:
        more = [t for t in w.read(timeout=2) if isinstance(t, Transaction)]
        assert more, got
        got += more
    for t in got:
        print(t.process, t.pid, t.portid, tools.own_task(t.pid), tools.own_task(t.pid, t.portid))
"""


def test_kproxys_own_commits_are_known_in_a_pid_namespace_of_its_own(node):
    """A pod without hostPID: the kernel names the committing task by its id in the outermost
    pid namespace, which kproxy cannot see; the committing socket's netlink port tells."""
    proc = subprocess.run(
        ["ip", "netns", "exec", node, "unshare", "--pid", "--fork", "--mount-proc"]
        + [sys.executable, "-c", OWN_IN_A_PID_NAMESPACE],
        capture_output=True,
        text=True,
        timeout=60,
        env={**netns.command_env(), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert len(rows) == 2, proc.stdout
    for _process, _pid, _portid, by_pid, by_both in rows:
        assert by_pid == "False", "the pid alone should not be known in a pid namespace"
        assert by_both == "True", proc.stdout


def test_a_10k_rule_chain_flushed_arrives_whole(node):
    """`iptables -F KUBE-SERVICES` at 10k Services: 10k events carrying the deleted rules. The
    watcher's buffer holds them (8 MiB did not), so the repair is of that chain, not a full
    verify after lost events."""
    rules = "".join(
        f"-A KUBE-SERVICES -d 10.96.{i // 250}.{i % 250 + 1}/32 -p tcp -m comment --comment "
        f'"bench/svc-{i}:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-X\n'
        for i in range(10_000)
    )
    run(
        node,
        ["iptables-restore"],
        f"*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n{rules}COMMIT\n",
    )
    watcher = netns.call_in(node, NfEventWatcher)
    try:
        pid = run(node, ["iptables", "-t", "nat", "-F", "KUBE-SERVICES"])
        got = []
        while not any(isinstance(t, Transaction) and t.pid == pid for t in got):
            more = transactions(watcher)
            assert more, got
            got += more
        assert not any(isinstance(t, Overflow) for t in got)
        (tx,) = [t for t in got if isinstance(t, Transaction)]
        assert len(tx.touches("ip", "nat")) == 10_000
    finally:
        watcher.close()
