"""The chaos scenarios. Each runs on its own bench (tests/chaos/harness.py), with the prober
sending new TCP connections, UDP datagrams and lines over established connections throughout,
and returns its figures as a dict; `problems` lists every promise that was broken (empty: all
kept). `short=True` is the version `make test` runs; the long one is `make chaos`'s.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import ipaddress
import os
import random
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests import synthetic
from tests.chaos.harness import (
    POD_A,
    POD_B,
    WEB_IP,
    Bench,
    children,
    cpu_meter,
    group_alive,
    percentile,
    service,
    slice_,
)

WEB2_IP = "10.96.0.30"
FAKE_EP = "10.250.{}.{}"  # endpoints nobody answers on: only the rules matter


def _prober_problems(bench: Bench, problems: list[str], what: str = "") -> None:
    p = bench.prober
    assert p is not None
    if p.error is not None:
        problems.append(f"prober stopped: {p.error}")
    if p.failed:
        first = [f"{w}@{t:.1f}" for t, w in (p.tcp.failures + p.udp.failures + p.est.failures)[:8]]
        problems.append(f"{what}traffic failed: {p.summary()} first: {first}")


class Changer:
    """Applies a random change every `period` seconds from a thread: churn Services' endpoints
    between none, some and others (so nat and filter both change), web2's between a, b and
    both (web2 is probed too: every state has a live endpoint)."""

    def __init__(self, bench: Bench, services: int, period: float, seed: int) -> None:
        self.bench, self.services, self.period = bench, services, period
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.paused = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._run, daemon=True, name="changer")

    def setup(self) -> None:
        objs = [service("web2", WEB2_IP), slice_("web2-1", "web2", [POD_A])]
        for i in range(self.services):
            objs.append(service(f"churn-{i}", f"10.96.1.{i + 1}"))
            objs.append(slice_(f"churn-{i}-1", f"churn-{i}", [FAKE_EP.format(i, 1)]))
        self.bench.apply(*objs)

    def change(self) -> None:
        r = self.rng
        if r.random() < 0.2:
            ips = r.choice([[POD_A], [POD_B], [POD_A, POD_B]])
            self.bench.apply(slice_("web2-1", "web2", ips))
        else:
            i = r.randrange(self.services)
            n = r.choice([0, 1, 2, 3])
            ips = [FAKE_EP.format(i, r.randint(1, 250)) for _ in range(n)]
            self.bench.apply(slice_(f"churn-{i}-1", f"churn-{i}", sorted(set(ips))))
        self.count += 1

    def _run(self) -> None:
        while not self.stop_event.wait(self.period):
            if not self.paused.is_set():
                self.change()

    def start(self) -> Changer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)


# --------------------------------------------------------------------------- 1: kill -9


def _kill_mid_apply(bench: Bench, timeout: float) -> bool:
    """Kill the moment the daemon has an iptables-restore or nft child; False when none showed
    within `timeout` (then it is killed anyway)."""
    k = bench.kproxy
    assert k is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _pid, comm in children(k.pid):
            if comm == "nft" or "-re" in comm:  # iptables-nft-restore, ip6tables-legacy-re...
                return True
        time.sleep(0.001)
    return False


def kill9(
    mode: str = "iptables", kills: int = 50, seed: int = 1, short: bool = False
) -> dict[str, Any]:
    """`kill -9` of `kproxy run` at random moments and in the middle of applies; after each
    kill the rules must equal a full render of a state the API server held (per table, and
    how often a family mixed two states across tables is counted); restart; converge."""
    if short:
        kills = min(kills, 4)
    rng = random.Random(seed)
    problems: list[str] = []
    recovery: list[float] = []
    mid_apply = group_kills = mixed = 0
    with Bench(mode) as bench:
        changer = Changer(bench, services=6, period=0.15, seed=seed)
        changer.setup()
        bench.start_kproxy()
        bench.start_prober()
        changer.start()
        try:
            for n in range(kills):
                group = n % 2 == 0  # the whole group (its restore child too) or the daemon only
                if n % 3 == 2:
                    time.sleep(rng.uniform(0.0, 1.5))
                elif _kill_mid_apply(bench, timeout=5.0):
                    mid_apply += 1
                bench.kproxy.kill(group=group)
                group_kills += group
                killed = time.monotonic()
                changer.paused.set()
                time.sleep(0.05)  # let a change the changer is making land in the history
                window = bench.history[-200:]  # ~30 s of changes: ample on a slow machine
                m = bench.matches(window)
                if not m["per_table_ok"]:
                    problems.append(f"kill {n}: a table is not a full render of any state: {m}")
                mixed += m["mixed"]
                changer.paused.clear()
                bench.kproxy.start()
                bench.wait("ready after restart", lambda: bench.status("/readyz") == 200, 60)
                changer.paused.set()
                bench.wait("converged after restart", bench.converged, 60, step=0.1)
                recovery.append(time.monotonic() - killed)
                changer.paused.clear()
                time.sleep(rng.uniform(0.2, 1.0))
        finally:
            changer.stop()
        time.sleep(0.5)
        bench.prober.stop()
        _prober_problems(bench, problems)
        if not bench.kproxy.alive():
            problems.append("kproxy not running at the end")
        return {
            "scenario": "kill9",
            "mode": mode,
            "kills": kills,
            "killed_mid_apply": mid_apply,
            "group_kills": group_kills,
            "changes": changer.count,
            "mixed_families": mixed,
            "recovery_s": _stats(recovery),
            "traffic": bench.prober.summary(),
            "problems": problems,
        }


# ---------------------------------------------------------------- 1b: kill -9 mid `nft -f`


def _nft_apply_children(pid: int) -> list[int]:
    """Pids of `pid`'s `nft -f` children (its `nft list` reads do not count)."""
    out = []
    for child, comm in children(pid):
        if comm != "nft":
            continue
        with contextlib.suppress(OSError):
            if b"-f" in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"):
                out.append(child)
    return out


def _moved_endpoints(objects: list[dict], offset: int) -> list[dict]:
    """The EndpointSlices of `objects` with every address moved by `offset`: a state in which
    every Service's endpoint chains and maps differ (the transaction to it is large)."""
    out = []
    for obj in objects:
        if obj["kind"] != "EndpointSlice":
            continue
        obj = copy.deepcopy(obj)
        for ep in obj["endpoints"]:
            ep["addresses"] = [str(ipaddress.ip_address(a) + offset) for a in ep["addresses"]]
        out.append(obj)
    return out


def kill9_nft_apply(
    kills: int = 20,
    services: int = 2000,
    endpoints: int = 10,
    seed: int = 1,
    short: bool = False,
    delay: float = 0.1,
    datapath: str = "nft",
) -> dict[str, Any]:
    """nftables mode, `kill -9` of `kproxy run` in the middle of large transactions
    (issue 13, item 2: `nft -f -` commits whatever it has read when its input ends; issue
    15: over netlink, one batch in one sendmsg).

    `services` x `endpoints`, every endpoint moved between two states A and B, so the
    transaction from one to the other rewrites every Service (100k lines at 2,000 x 10). The
    daemon is started while the API server holds the state the kernel does not, and killed
    as it applies it: one kill in three the moment its `nft -f` child runs (plus up to
    `delay` s) and the daemon alone, as the OOM killer does (its `nft` survives as an
    orphan); one at a random moment of its start-up and apply, the daemon alone; one at a
    random moment with its whole process group. With `datapath` "netlink" there is no child:
    every kill falls at a random moment of the start-up and apply. After each kill the
    `kproxy` table must be a full render of the old state or of the new one, never anything
    in between; after the last one the daemon must converge again."""
    if short:
        kills, services = min(kills, 3), min(services, 1000)
    rng = random.Random(seed)
    problems: list[str] = []
    outcome = {"old": 0, "new": 0, "neither": 0}
    targeted = group_kills = 0
    first_sync = 0.0
    timeline: list[float] = []
    with Bench("nftables") as bench:
        # Listing thousands of objects can take longer than the bench's --api-wait 3s on a
        # loaded machine: stay on the API server, the state cache is scenario 3's subject.
        bench.kproxy.extra = ["--api-wait", "300s", "--nftables-datapath", datapath]
        objs_a = synthetic.generate(services, endpoints)
        bench.apply(*objs_a)
        state_a = bench.history[-1]
        slices_a = [o for o in objs_a if o["kind"] == "EndpointSlice"]
        t0 = time.monotonic()
        bench.start_kproxy(timeout=300)
        # From start to converged, a full apply included: the random kills' window.
        first_sync = time.monotonic() - t0
        bench.kproxy.kill(group=True)
        slices_b = _moved_endpoints(objs_a, 1 << 20)
        bench.apply(*slices_b)
        state_b = bench.history[-1]
        bench.start_prober()
        slices = {id(state_a): slices_a, id(state_b): slices_b}
        held, api_at = state_a, state_b
        for n in range(kills):
            target = state_a if held is state_b else state_b
            # The API server moves to the other state while no daemon runs: the next start
            # finds the kernel at `held` and applies the whole difference in one transaction.
            if api_at is not target:
                bench.apply(*slices[id(target)])
                api_at = target
            started = time.monotonic()
            bench.kproxy.start()
            group = False
            if n % 3 == 0 and datapath == "nft":
                deadline = time.monotonic() + max(60.0, 5 * first_sync)
                while not _nft_apply_children(bench.kproxy.pid):
                    if time.monotonic() > deadline or not bench.kproxy.alive():
                        problems.append(
                            f"kill {n}: no `nft -f` child showed\n{bench.kproxy.log()[-3000:]}"
                        )
                        break
                    time.sleep(0.001)
                else:
                    targeted += 1
                time.sleep(rng.uniform(0.0, delay))
            else:
                time.sleep(rng.uniform(0.0, first_sync))
                group = n % 3 == 2
            pgid = bench.kproxy.pid
            bench.kproxy.kill(group=group)
            group_kills += group
            # Killed alone, the daemon may leave an `nft` child that goes on as an orphan (as
            # after an OOM kill): the check is of what the kernel holds once it is done.
            bench.wait("the orphaned nft to end", lambda g=pgid: not group_alive(g), 300)
            m = bench.matches([held, target])
            if m["all"] == [0]:
                outcome["old"] += 1
            elif m["all"] == [1]:
                outcome["new"] += 1
                held = target
            else:
                outcome["neither"] += 1
                problems.append(
                    f"kill {n} ({'its group' if group else 'the daemon alone'}): the kproxy "
                    f"table is neither the old state nor the new one: {m['families']}"
                )
                bench.start_kproxy(timeout=300)  # repaired before the next round
                bench.kproxy.kill(group=True)
                held = target
            timeline.append(round(time.monotonic() - started, 1))
        t0 = time.monotonic()
        try:
            bench.start_kproxy(timeout=300)
        except TimeoutError as err:
            problems.append(f"no convergence after the last kill: {err}")
        bench.prober.stop()
        _prober_problems(bench, problems)
        return {
            "scenario": "kill9_nft_apply",
            "mode": "nftables",
            "datapath": datapath,
            "services": services,
            "endpoints_per_service": endpoints,
            "kills": kills,
            "killed_while_nft_ran": targeted,
            "group_kills": group_kills,
            "table_after_kill": outcome,
            "first_sync_s": round(first_sync, 2),
            "converged_after_last_s": round(time.monotonic() - t0, 2),
            "round_s": _stats(timeline),
            "traffic": bench.prober.summary(),
            "problems": problems,
        }


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "n": len(values),
        "min": round(min(values), 3),
        "median": round(percentile(values, 50), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(max(values), 3),
    }


# --------------------------------------------------------------------------- 2: drift


def _web_sep_chain(bench: Bench) -> tuple[str, str]:
    """(KUBE-SVC chain of web, one of its KUBE-SEP chains) from iptables-save."""
    import netns

    text = netns.iptables_save(bench.node, "nat")
    svc = next(
        ln.split()[-1]
        for ln in text.splitlines()
        if ln.startswith("-A KUBE-SERVICES")
        and "-d 10.96.0.10/32" in ln
        and ln.split()[-1].startswith("KUBE-SVC-")
    )
    sep = next(
        ln.split()[-1]
        for ln in text.splitlines()
        if ln.startswith(f"-A {svc} ") and ln.split()[-1].startswith("KUBE-SEP-")
    )
    return svc, sep


def _drift_actions(bench: Bench) -> list[tuple[str, list, str]]:
    """(name, commands — each an argv, or (argv, its input) —, what catches it: "canary" or
    "verify")."""
    if bench.mode == "nftables":
        return [
            ("nft flush ruleset", [["nft", "flush", "ruleset"]], "canary"),
            ("delete table ip kproxy", [["nft", "delete", "table", "ip", "kproxy"]], "canary"),
            (
                "flush chain services",
                [["nft", "flush", "chain", "ip", "kproxy", "services"]],
                "verify",
            ),
            (
                "insert rule into services",
                [
                    [
                        "nft",
                        "insert",
                        "rule",
                        "ip",
                        "kproxy",
                        "services",
                        "ip",
                        "daddr",
                        "10.96.0.99",
                        "drop",
                    ]
                ],
                "verify",
            ),
        ]
    svc, sep = _web_sep_chain(bench)
    actions = []
    for table in ("nat", "filter", "mangle"):
        # -F and -X in one step (an empty table restored): run one after the other, the
        # repair could come in between and make -X fail.
        actions.append(
            (
                f"{table}: -F and -X",
                [["sh", "-c", f"printf '*{table}\\nCOMMIT\\n' | iptables-restore"]],
                "canary",
            )
        )
    for table in ("nat", "filter"):
        # The empty canary chains stay; the canary check also looks for kproxy's first jump
        # in the table's built-in chains.
        actions.append((f"{table}: -F only", [["iptables", "-t", table, "-F"]], "canary"))
    actions.append(
        (
            "delete one owned chain",
            # Unlinked, flushed and deleted in one transaction: as three commands, the repair
            # of the first (at once, from its events) makes the last fail (chain in use).
            [
                (
                    ["iptables-restore", "--noflush"],
                    f"*nat\n-D {svc} {_rule_text(bench, svc, sep)}\n:{sep} - [0:0]\n-X {sep}\n"
                    "COMMIT\n",
                )
            ],
            "verify",
        )
    )
    actions.append(
        (
            "insert a rule into KUBE-SERVICES",
            [
                [
                    "iptables",
                    "-t",
                    "nat",
                    "-I",
                    "KUBE-SERVICES",
                    "-d",
                    "10.96.0.99/32",
                    "-p",
                    "tcp",
                    "-j",
                    "RETURN",
                ]
            ],
            "verify",
        )
    )
    return actions


def _rule_text(bench: Bench, chain: str, target: str) -> str:
    """The rule of `chain` that jumps to `target`, as iptables-save prints it (no -A CHAIN)."""
    import netns

    for ln in netns.iptables_save(bench.node, "nat").splitlines():
        if ln.startswith(f"-A {chain} ") and ln.split()[-1] == target:
            return ln[len(f"-A {chain} ") :]
    raise RuntimeError(f"no rule {chain} -> {target}")


def drift(
    mode: str = "iptables", rounds: int = 3, short: bool = False, sync_period: float = 3.0
) -> dict[str, Any]:
    """Another tool flushes a table, deletes an owned chain or inserts a rule: repaired within
    2 x the interval of the check that catches it (canary: --canary-interval 0.5s; the rest:
    the periodic verify, --iptables-sync-period), counted in kproxy_drift_repairs_total."""
    import netns

    if short:
        rounds = 1
    canary, problems = 0.5, []
    results: dict[str, list[float]] = {}
    with Bench(mode) as bench:
        bench.start_kproxy("--iptables-sync-period", f"{sync_period}s")
        bench.start_prober()
        for _ in range(rounds):
            actions = _drift_actions(bench)
            if short:  # one of each kind: a flush the canary sees, the subtler edits
                actions = [a for i, a in enumerate(actions) if i in (0, 4, 5, 6)]
            for name, commands, caught_by in actions:
                bound = 2 * (canary if caught_by == "canary" else sync_period)
                before = bench.metric("kproxy_drift_repairs_total")
                t0 = time.monotonic()
                for argv in commands:
                    if isinstance(argv, tuple):  # (argv, its input)
                        netns.run(bench.node, argv[0], input=argv[1])
                    else:
                        netns.run(bench.node, argv)
                limit = bound + (20 if short else 5)  # generous on a loaded machine
                try:
                    bench.wait(name, bench.converged, limit, step=0.05)
                except TimeoutError:
                    problems.append(f"{name}: not repaired within {limit:.1f}s")
                    continue
                took = time.monotonic() - t0
                results.setdefault(name, []).append(took)
                if took > bound and not short:  # the short version asserts behaviour only
                    problems.append(f"{name}: repaired in {took:.2f}s > bound {bound:.1f}s")
                with contextlib.suppress(TimeoutError):
                    bench.wait(
                        "drift metric",
                        lambda b=before: bench.metric("kproxy_drift_repairs_total") > b,
                        3,
                    )
                if bench.metric("kproxy_drift_repairs_total") <= before:
                    problems.append(f"{name}: repair not counted in kproxy_drift_repairs_total")
                time.sleep(0.3 if short else 1.0)
        bench.prober.stop()
        traffic = bench.prober.summary()
        # A flushed nat table drops new connections until it is repaired: those failures are
        # the repair time, reported; established connections must never fail.
        if bench.prober.est.failed:
            problems.append(f"established connections failed: {traffic}")
        return {
            "scenario": "drift",
            "mode": mode,
            "canary_interval_s": canary,
            "sync_period_s": sync_period,
            "repair_s": {k: _stats(v) for k, v in results.items()},
            "traffic": traffic,
            "repairs_metric": {
                k: v
                for k, v in bench.metrics().items()
                if k.startswith("kproxy_drift_repairs_total")
            },
            "problems": problems,
        }


# ------------------------------------------------------------ 2b: foreign change (events)

NOPE_IP = "10.96.0.11"  # a Service without endpoints: refused by kproxy's rules


def _until(ip: str, want: str, since: float, limit: float, attempt: float) -> float | None:
    """Seconds from `since` to the start of the first new connection to ip:80 that gets
    `want` ("ok": an answer from a pod; "refused"), trying again each time one does not;
    None when none did within `limit`. Runs inside the client pod's namespace.

    A try gets `attempt` seconds; one whose answer came although the prober saw it late (it
    was short of CPU) still counts as answered at its start."""
    import select
    import socket

    def one() -> str:
        with socket.socket() as s:
            s.setblocking(False)
            s.connect_ex((ip, 80))
            _, ready, _ = select.select([], [s], [], attempt)
            if not ready:
                _, ready, _ = select.select([], [s], [], 0)  # came while we were not running
            if not ready:
                return "timeout"
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                return "refused" if err == errno.ECONNREFUSED else "error"
            s.setblocking(True)
            s.settimeout(1.0)
            try:
                return "ok" if s.recv(100).startswith((b"a ", b"b ")) else "wrong"
            except OSError:
                return "error"

    while time.monotonic() - since < limit:
        start = time.monotonic()
        if one() == want:
            return start - since
        time.sleep(max(0.0, 0.005 - (time.monotonic() - start)))
    return None


def foreign_change(
    mode: str = "iptables", rounds: int = 5, short: bool = False, bound: float = 1.0
) -> dict[str, Any]:
    """Another process changes kproxy's rules in each way issue 16 names (tests/driftcases.py):
    new connections work again (or a Service without endpoints is refused again) within
    `bound` seconds of the change, from the nf_tables events alone (canaries every 60 s, the
    verify every 300 s: neither can). Each repair names the process and its pid in the log,
    and it is counted under reason foreign-change. Then other tools' own rules change for a
    while: no repair, no sync; and an idle daemon's CPU is measured."""
    import driftcases
    import netns

    if short:
        rounds = 1
    problems: list[str] = []
    recovery: dict[str, list[float]] = {}
    with Bench(mode, clients=1) as bench:
        bench.apply(service("nope", NOPE_IP))
        bench.kproxy.extra = ["--canary-interval", "60s", "--iptables-sync-period", "300s"]
        bench.start_kproxy()
        bench.start_prober()
        client = bench.topo.pods["c"].ns
        for n in range(rounds):
            if n:
                # A fresh daemon each round: five repairs of one chain within a minute are a
                # fight, which kproxy backs off from (tests/test_drift.py).
                bench.kproxy.stop()
                bench.start_kproxy()
                # The work after a first sync (the other mode's rules looked for, a garbage
                # collection) holds up a repair right after the start by up to 0.5 s: the
                # figures are of a daemon that runs.
                time.sleep(2)
            for name, command, target in driftcases.cases(mode, bench.node, WEB_IP, NOPE_IP):
                argv = command()
                before = bench.metric("kproxy_drift_repairs_total", reason="foreign-change")
                # From the start of the command (its commit comes some ms later): the figure
                # is an upper bound.
                started = time.monotonic()
                pid = netns.run_pid(bench.node, argv)
                ip, want = (WEB_IP, "ok") if target == driftcases.WEB else (NOPE_IP, "refused")
                took = netns.call_in(client, _until, ip, want, started, 10.0, 0.05)
                if took is None:
                    problems.append(f"{name}: no {want} connection within 10 s")
                    continue
                recovery.setdefault(name, []).append(took)
                if took > bound and not short:
                    problems.append(f"{name}: new connections {want} after {took:.2f}s > {bound}s")
                try:
                    bench.wait(f"{name}: converged", bench.converged, 10, step=0.05)
                    bench.wait(
                        f"{name}: counted",
                        lambda b=before: (
                            bench.metric("kproxy_drift_repairs_total", reason="foreign-change") > b
                        ),
                        5,
                    )
                except TimeoutError as err:
                    problems.append(str(err).splitlines()[0])
                if f"(pid {pid})" not in bench.kproxy.log():
                    problems.append(f"{name}: the log does not name pid {pid}")
                time.sleep(0.2)
        # Other tools' own rules, changed every 0.2 s: nothing to repair, nothing to sync.
        syncs = bench.metric("kubeproxy_sync_proxy_rules_duration_seconds_count")
        repairs = bench.metric("kproxy_drift_repairs_total")
        node = bench.node
        netns.run(node, ["iptables", "-t", "nat", "-N", "DOCKER"])
        netns.run(node, ["nft", "add table inet calico; add chain inet calico cali-fw"])
        pid = bench.kproxy.pid
        with cpu_meter(lambda: pid) as busy:
            for i in range(10 if short else 50):
                rule = ["-p", "tcp", "--dport", str(5000 + i), "-j", "RETURN"]
                netns.run(node, ["iptables", "-t", "nat", "-A", "DOCKER", *rule])
                netns.run(
                    node,
                    [
                        "nft",
                        f"flush chain inet calico cali-fw; add rule inet calico cali-fw "
                        f"tcp dport {i} accept",
                    ],
                )
                netns.run(node, ["iptables", "-t", "nat", "-D", "DOCKER", *rule])
                time.sleep(0.2)
        if bench.metric("kproxy_drift_repairs_total") != repairs:
            problems.append("other tools' own rules were repaired")
        if bench.metric("kubeproxy_sync_proxy_rules_duration_seconds_count") != syncs:
            problems.append("other tools' own rules made kproxy sync")
        with cpu_meter(lambda: pid) as idle:
            time.sleep(5 if short else 30)
        bench.prober.stop()
        if bench.prober.est.failed:
            problems.append(f"established connections failed: {bench.prober.summary()}")
        events = [e.get("note", "") for e in bench.api.events()]
        # kproxy's own part: from the read of the touched objects to the repair's commit.
        own_ms = [float(x) for x in re.findall(r"repaired in (\d+) ms", bench.kproxy.log())]
        if not any("repaired in" in note for note in events):
            problems.append("no Event on the Node for a repair")
        return {
            "scenario": "foreign_change",
            "mode": mode,
            "bound_s": bound,
            "recovery_s": {k: _stats(v) for k, v in recovery.items()},
            "repair_ms": _stats(own_ms),
            "node_events": len(events),
            "other_tools_cpu_pct": round(busy["pct"], 2),
            "idle_cpu_pct": round(idle["pct"], 2),
            "traffic": bench.prober.summary(),
            "repairs_metric": {
                k: v
                for k, v in bench.metrics().items()
                if k.startswith("kproxy_drift_repairs_total") and v
            },
            "problems": problems,
        }


# --------------------------------------------------------------------------- 3: API outage


def api_outage(
    mode: str = "iptables", outage: float = 180.0, short: bool = False, sync_period: float = 30
) -> dict[str, Any]:
    """The API server drops every request for `outage` seconds; the agent is restarted in the
    middle of it; changes made meanwhile are applied within a sync period of its return."""
    if short:
        outage = 7.0
    problems: list[str] = []
    with Bench(mode) as bench:
        bench.apply(service("web2", WEB2_IP), slice_("web2-1", "web2", [POD_A]))
        bench.start_kproxy("--iptables-sync-period", f"{sync_period}s")
        bench.start_prober()
        time.sleep(1.0)  # a state cache is written after the first sync
        api = bench.api
        t0 = time.monotonic()
        api.set_fail("drop")
        api.cut_watches()
        time.sleep(outage / 3)
        # changes the agent cannot see yet
        bench.apply(slice_("web2-1", "web2", [POD_B]))
        bench.apply(service("late", "10.96.0.40"), slice_("late-1", "late", [POD_A, POD_B]))
        bench.kproxy.stop()
        restarted = time.monotonic()
        bench.kproxy.start()
        try:
            bench.wait("ready from the cache", lambda: bench.status("/readyz") == 200, 60)
            ready_from_cache = time.monotonic() - restarted
        except TimeoutError:
            ready_from_cache = None
            problems.append("the agent restarted during the outage never became ready")
        from_cache = bench.metric("kproxy_running_from_state_cache")
        time.sleep(max(0.0, outage - (time.monotonic() - t0)))
        api.set_fail(None)
        back = time.monotonic()
        try:
            bench.wait("converged after the outage", bench.converged, sync_period + 30, step=0.1)
            converge = time.monotonic() - back
            if converge > sync_period:
                problems.append(f"changes applied {converge:.1f}s after the API returned")
        except TimeoutError:
            converge = None
            problems.append("did not converge after the API server returned")
        time.sleep(1.0)
        bench.prober.stop()
        _prober_problems(bench, problems)
        return {
            "scenario": "api_outage",
            "mode": mode,
            "outage_s": outage,
            "ready_from_cache_s": ready_from_cache and round(ready_from_cache, 2),
            "running_from_cache_metric": from_cache,
            "converged_after_return_s": converge and round(converge, 2),
            "traffic": bench.prober.summary(),
            "problems": problems,
        }


# --------------------------------------------------------------------------- 4: xtables lock


def xtables_lock(hold: float = 120.0, short: bool = False) -> dict[str, Any]:
    """The xtables lock (the daemon's own XTABLES_LOCKFILE, legacy backend: the nft backend
    takes no lock) held by another process for longer than the wait while a change is
    pending: the apply is retried, failures show in the metrics, the change lands once the lock
    is free; the daemon does not spin meanwhile (its CPU is measured)."""
    if short:
        # Longer than the 5s wait; an apply gives up (and counts a failure) only after 4
        # attempts, ~21s: the long version checks the metric.
        hold = 12.0
    problems: list[str] = []
    with Bench("iptables") as bench:
        bench.kproxy.extra = ["--iptables-backend", "legacy"]
        bench.backend = "legacy"
        bench.apply(service("web2", WEB2_IP), slice_("web2-1", "web2", [POD_A]))
        bench.start_kproxy()
        bench.start_prober()
        failures0 = bench.metric("kubeproxy_sync_proxy_rules_iptables_restore_failures_total")
        fd = os.open(bench.kproxy.xtables_lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = time.monotonic()
            bench.apply(slice_("web2-1", "web2", [POD_B]))
            with cpu_meter(lambda: bench.kproxy.pid) as cpu:
                time.sleep(hold)
            failures = (
                bench.metric("kubeproxy_sync_proxy_rules_iptables_restore_failures_total")
                - failures0
            )
            if failures < 1 and hold > 22:
                problems.append("no failed apply counted while the lock was held")
            if bench.converged():
                problems.append("the change landed while the lock was held (lock not used?)")
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        released = time.monotonic()
        try:
            bench.wait("applied after release", bench.converged, 60, step=0.1)
            after = time.monotonic() - released
        except TimeoutError:
            after = None
            problems.append("the change was not applied within 60s of the lock's release")
        if cpu["pct"] > 25:
            problems.append(f"busy while waiting for the lock: {cpu['pct']:.1f}% CPU")
        bench.prober.stop()
        _prober_problems(bench, problems)
        return {
            "scenario": "xtables_lock",
            "backend": "legacy",
            "held_s": round(released - held, 1),
            "failed_applies_metric": failures,
            "drift_repairs_metric": {
                k: v
                for k, v in bench.metrics().items()
                if k.startswith("kproxy_drift_repairs_total")
            },
            "cpu_while_held": {k: round(v, 2) for k, v in cpu.items()},
            "applied_after_release_s": after and round(after, 2),
            "traffic": bench.prober.summary(),
            "problems": problems,
        }


# --------------------------------------------------------------------------- 5: 410 storm


def gone_storm(
    mode: str = "iptables", duration: float = 180.0, cut_every: float = 3.0, short: bool = False
) -> dict[str, Any]:
    """Every `cut_every` seconds the API server forgets its history (every watch resumes with
    410 Gone and relists) and cuts every watch stream; nothing in the cluster changes that
    concerns the node: no sync, no rule change, and the CPU it costs."""
    if short:
        duration = min(duration, 15.0)
    problems: list[str] = []
    with Bench(mode) as bench:
        bench.start_kproxy()
        bench.start_prober()
        time.sleep(1.0)
        rules = bench.ruleset_text()
        syncs = bench.metric("kubeproxy_sync_proxy_rules_duration_seconds_count")
        # Syncs caused by a change are partial; the periodic verify (a full sync every sync
        # period) goes on regardless and is counted apart.
        partial = bench.metric("kubeproxy_sync_partial_proxy_rules_duration_seconds_count")
        lists0 = sum(1 for r in bench.api.requests if "watch" not in r.query)
        restarts0 = bench.metric("kproxy_watch_restarts_total")
        n = 0
        with cpu_meter(lambda: bench.kproxy.pid) as cpu:
            end = time.monotonic() + duration
            while time.monotonic() < end:
                for i in range(3):  # unrelated objects move the resourceVersion on
                    bench.api.apply(
                        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"other-{i}"}}
                    )
                bench.api.compact()
                bench.api.cut_watches()
                n += 1
                time.sleep(cut_every)
        lists = sum(1 for r in bench.api.requests if "watch" not in r.query) - lists0
        synced = bench.metric("kubeproxy_sync_proxy_rules_duration_seconds_count") - syncs
        changed = (
            bench.metric("kubeproxy_sync_partial_proxy_rules_duration_seconds_count") - partial
        )
        if bench.ruleset_text() != rules:
            problems.append("rules changed although nothing changed")
        if changed:
            problems.append(f"{changed:.0f} change-driven syncs although nothing changed")
        if lists < n:
            problems.append(f"only {lists} relists for {n} storms: 410 not exercised")
        if cpu["pct"] > 30:
            problems.append(f"CPU {cpu['pct']:.1f}% during the storm")
        bench.prober.stop()
        _prober_problems(bench, problems)
        return {
            "scenario": "gone_storm",
            "mode": mode,
            "storms": n,
            "relists": lists,
            "watch_restarts": bench.metric("kproxy_watch_restarts_total") - restarts0,
            "change_syncs_during": changed,
            "periodic_verifies_during": synced - changed,
            "cpu": {k: round(v, 2) for k, v in cpu.items()},
            "traffic": bench.prober.summary(),
            "problems": problems,
        }


# --------------------------------------------------------------------------- 6: churn


def churn(
    mode: str = "iptables",
    services: int = 1000,
    endpoints: int = 10,
    per_minute: int = 3000,
    duration: float = 300.0,
    short: bool = False,
    seed: int = 3,
) -> dict[str, Any]:
    """Thousands of EndpointSlice updates per minute at `services` Services: memory (RSS,
    sampled), every change applied (the kernel equals a full render of the last state once the
    churn stops), network-programming latency and sync duration percentiles."""
    import copy

    from tests.synthetic import generate

    if short:
        services, per_minute, duration = 200, 1200, 6.0
    rng = random.Random(seed)
    problems: list[str] = []
    with Bench(mode) as bench:
        objs = generate(services, endpoints)
        bench.apply(*objs)
        slices = [o for o in objs if o["kind"] == "EndpointSlice"]
        t_start = bench.start_kproxy(timeout=300)
        bench.start_prober()
        rss: list[int] = [bench.kproxy.rss()]
        period = 60.0 / per_minute
        n = 0
        end = time.monotonic() + duration
        next_sample = time.monotonic() + 2
        latencies: list[float] = []
        with cpu_meter(lambda: bench.kproxy.pid) as cpu:
            while time.monotonic() < end:
                s = copy.deepcopy(rng.choice(slices))
                e = rng.randrange(endpoints)
                ip = s["endpoints"][e]["addresses"][0].rsplit(".", 1)
                s["endpoints"][e]["addresses"] = [f"{ip[0]}.{(int(ip[1]) + 1) % 256}"]
                s["endpoints"][e]["conditions"]["ready"] = rng.random() > 0.1
                s["metadata"]["annotations"] = {
                    "endpoints.kubernetes.io/last-change-trigger-time": _rfc3339(time.time())
                }
                slices[
                    slices.index(
                        next(x for x in slices if x["metadata"]["name"] == s["metadata"]["name"])
                    )
                ] = s
                bench.api.apply(s)
                n += 1
                if time.monotonic() >= next_sample:
                    rss.append(bench.kproxy.rss())
                    next_sample += 2
                time.sleep(period)
        bench.record()
        stopped = time.monotonic()
        try:
            bench.wait("converged after the churn", bench.converged, 120, step=0.5)
            settle = time.monotonic() - stopped
        except TimeoutError:
            settle = None
            problems.append("the kernel does not equal a full render of the last state")
        rss.append(bench.kproxy.rss())
        m = bench.metrics()
        hist = _histogram(m, "kubeproxy_sync_proxy_rules_duration_seconds")
        prog = _histogram(m, "kubeproxy_network_programming_duration_seconds")
        if len(rss) > 4 and max(rss[len(rss) // 2 :]) > 1.5 * max(rss[: len(rss) // 2]) + 20e6:
            problems.append(f"memory grew: {rss}")
        bench.prober.stop()
        _prober_problems(bench, problems)
        del latencies
        return {
            "scenario": "churn",
            "mode": mode,
            "services": services,
            "endpoints_per_service": endpoints,
            "updates": n,
            "updates_per_minute": round(n / (duration / 60)),
            "start_to_ready_s": round(t_start, 2),
            "settled_after_stop_s": settle and round(settle, 2),
            "rss_mb": {
                "start": round(rss[0] / 1e6, 1),
                "max": round(max(rss) / 1e6, 1),
                "end": round(rss[-1] / 1e6, 1),
            },
            "cpu": {k: round(v, 2) for k, v in cpu.items()},
            "syncs": hist["count"],
            "sync_duration_s": {"p50": hist["p50"], "p99": hist["p99"]},
            "network_programming_s": {"p50": prog["p50"], "p99": prog["p99"], "n": prog["count"]},
            "traffic": bench.prober.summary(),
            "problems": problems,
        }


def _rfc3339(t: float) -> str:
    """RFC 3339 with microseconds (the API server writes seconds; finer here so the latency
    histogram's sub-second buckets mean something)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def _histogram(metrics: dict[str, float], name: str) -> dict[str, float]:
    """Count and p50/p99 (upper bucket bounds) of a Prometheus histogram."""
    buckets = sorted(
        (float(k.split('le="', 1)[1].split('"', 1)[0]), v)
        for k, v in metrics.items()
        if k.startswith(f"{name}_bucket{{")
    )
    count = metrics.get(f"{name}_count", 0.0)

    def q(p: float) -> float:
        for le, c in buckets:
            if count and c >= p * count:
                return le
        return float("inf")

    return {"count": count, "p50": q(0.5), "p99": q(0.99)}


# --------------------------------------------------------------------------- 8: full disk


def full_disk(short: bool = False) -> dict[str, Any]:
    """The daemon's snapshot directory and state cache on a tiny tmpfs, mounted in a private
    mount namespace of the daemon's own (`unshare -m`; nothing is mounted anywhere else),
    filled up while changes keep coming: the previous files survive intact, the daemon and
    the traffic carry on, and writing resumes once there is room."""
    problems: list[str] = []
    with Bench("iptables") as bench:
        disk = bench.workdir / "disk"
        disk.mkdir()
        # The daemon runs in its own mount namespace where `disk` is a 256 KiB tmpfs.
        bench.kproxy.wrapper = [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'mount -t tmpfs -o size=256k kproxy-chaos "{disk}" && exec "$0" "$@"',
        ]
        bench.kproxy.extra = [
            "--snapshot-dir",
            str(disk / "snapshots"),
            "--state-cache",
            str(disk / "state.json"),
            # The state cache is rewritten at most once per sync period: a short one, so
            # that the writes this scenario watches fail (and then succeed) within seconds.
            "--iptables-sync-period",
            "3s",
        ]
        bench.apply(service("web2", WEB2_IP), slice_("web2-1", "web2", [POD_A]))
        bench.start_kproxy()
        bench.start_prober()
        pid = bench.kproxy.pid

        def sh(script: str, check: bool = True) -> str:
            """`script` in the daemon's mount namespace (where the small tmpfs is)."""
            return subprocess.run(
                ["nsenter", "-t", str(pid), "-m", "sh", "-c", script],
                capture_output=True,
                text=True,
                check=check,
            ).stdout

        bench.wait(
            "state cache and snapshot written",
            lambda: "state.json" in sh(f"ls {disk}") and sh(f"ls {disk}/snapshots", False),
            20,
        )
        cache_before = sh(f"cat {disk}/state.json")
        snaps_before = sh(f"cd {disk}/snapshots && sha256sum *")
        # Fill the disk (inside the daemon's mount namespace only).
        sh(f"dd if=/dev/zero of={disk}/filler bs=4k 2>/dev/null; true")
        free = sh(f"df -k {disk} | tail -1").split()[3]
        # A change (cache write) and a full sync with new rules (snapshot write).
        bench.apply(slice_("web2-1", "web2", [POD_B]))
        bench.wait("change applied", bench.converged, 30)
        # A full sync (here: the repair of the mangle table deleted, which carries no traffic;
        # a table gone is verified whole) writes a snapshot of the new rules.
        import netns

        netns.run(bench.node, ["nft", "delete", "table", "ip", "mangle"])
        bench.wait("repaired", bench.converged, 30)
        bench.apply(service("late", "10.96.0.40"), slice_("late-1", "late", [POD_A]))
        bench.wait("second change applied", bench.converged, 30)
        with contextlib.suppress(TimeoutError):  # reported as a problem below
            bench.wait(
                "cache write failure logged",
                lambda: "could not write the state cache" in bench.kproxy.log(),
                20,
            )
        log = bench.kproxy.log()
        cache_during = sh(f"cat {disk}/state.json")
        snaps_during = sh(f"cd {disk}/snapshots && sha256sum *")
        leftovers = sh(f"ls -a {disk} {disk}/snapshots | grep '^\\.[a-z]' || true").strip()
        warned_cache = "could not write the state cache" in log
        warned_snap = "could not write a snapshot" in log
        if cache_during != cache_before:
            problems.append("the state cache changed while the disk was full")
        if snaps_during != snaps_before:
            problems.append("the snapshots changed while the disk was full")
        if leftovers:
            problems.append(f"temporary files left on the full disk: {leftovers}")
        if not (warned_cache and warned_snap):
            problems.append(f"write failures not logged (cache {warned_cache}, snap {warned_snap})")
        sh(f"rm -f {disk}/filler")
        bench.apply(slice_("late-1", "late", [POD_A, POD_B]))
        bench.wait("converged", bench.converged, 30)
        with contextlib.suppress(TimeoutError):
            bench.wait(
                "cache written again",
                lambda: (
                    '"late-1"' in sh(f"cat {disk}/state.json")
                    and POD_B in sh(f"cat {disk}/state.json").split('"late-1"', 1)[1][:2000]
                ),
                20,
            )
        import json

        try:
            json.loads(sh(f"cat {disk}/state.json"))
        except ValueError:
            problems.append("the state cache is not valid JSON after the disk was freed")
        if '"late-1"' not in sh(f"cat {disk}/state.json"):
            problems.append("the state cache was not written again once there was room")
        bench.prober.stop()
        _prober_problems(bench, problems)
        alive = bench.kproxy.alive()
        if not alive:
            problems.append("the daemon died")
        return {
            "scenario": "full_disk",
            "free_kib_when_full": int(free),
            "warned": {"cache": warned_cache, "snapshot": warned_snap},
            "traffic": bench.prober.summary(),
            "problems": problems,
        }


__all__ = [
    "api_outage",
    "churn",
    "drift",
    "full_disk",
    "gone_storm",
    "kill9",
    "kill9_nft_apply",
    "xtables_lock",
]
