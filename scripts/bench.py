#!/usr/bin/env python3
"""`make bench`: kproxy's sync costs at cluster scale, next to bare iptables-restore / nft -f.

Everything runs in network namespaces made here and deleted afterwards. The driver (this
script, in the test process's namespace) builds namespaces and runs a worker inside one
(`ip netns exec NS python scripts/bench.py --worker ...`), which:
  1. writes the synthetic cluster to a state file and loads it as `kproxy sync` would (load),
  2. renders and applies it into the empty namespace (render, plan, apply),
  3. applies one-Service changes through the daemon's path (store -> cached render -> plan
     against the record of the last apply -> apply): endpoint added, endpoint removed,
     Service added, Service deleted; then a no-op sync and a verify (kernel read),
and reports timings, lines sent and peak RSS. The driver then replays the exact payload the
full sync sent into a second, empty namespace with the bare tool, so the ratio compares the
same work in the same run. Optionally it measures first-packet latency (connect time to one
ClusterIP) with 100 and 10k Services in each mode.

    python scripts/bench.py [--sizes 1000x10,5000x10,10000x10,5000x50] [--modes iptables,nftables]
                            [--latency] [--write BENCHMARKS.md] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


# ----------------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> None:
    """Runs inside the benchmark namespace; prints one JSON object."""
    from kproxy import tools
    from kproxy.daemon.reconciler import Reconciler
    from kproxy.families import modes_for
    from kproxy.model import NodeConfig
    from kproxy.sources.statefile import load_state
    from kproxy.sources.store import ObjectStore
    from tests.synthetic import as_list, generate

    out: dict = {"mode": args.label, "services": args.services, "endpoints": args.endpoints}
    objects = generate(args.services, args.endpoints, mix=True)
    state_file = Path(args.tmp) / "state.json"
    state_file.write_text(json.dumps(as_list(objects)))
    t0 = time.perf_counter()
    state, _ = load_state(state_file, "node-1")
    out["load"] = time.perf_counter() - t0
    config = NodeConfig(node_name="node-1", cluster_cidrs=("10.244.0.0/16",))
    modes = modes_for(args.mode, nft_datapath=args.datapath)
    tools.RECORD_PAYLOADS = True  # the bare replay below needs the exact text sent

    # Full sync from empty, as `kproxy sync` does it (both families).
    render_s = apply_s = 0.0
    sent: list[tuple[bool, str]] = []
    lines = 0
    for m in modes:
        t = time.perf_counter()
        rendered = m.render(state, config)
        render_s += time.perf_counter() - t
        t = time.perf_counter()
        outcome = m.sync(rendered.desired, verify=True)
        apply_s += time.perf_counter() - t
        if m.name == "IPv4":
            sent = outcome.sent
        lines += sum(text.count("\n") for _, text in outcome.sent)
    out.update(
        render=render_s, sync=apply_s, full_total=out["load"] + render_s + apply_s, full_lines=lines
    )
    if args.mode == "nftables" and args.datapath == "netlink":
        # The encoder alone: the whole IPv4 table as one netlink batch (no kernel).
        from kproxy.nftables.nlencode import BatchEncoder
        from kproxy.nftables.plan import plan_table

        desired = modes[0].render(state, config).desired
        whole = plan_table(desired, None)
        t = time.perf_counter()
        batch = BatchEncoder("ip").batch(whole, 1, desired.sets)
        out["encode"] = time.perf_counter() - t
        out["encode_messages"] = batch.messages
        out["encode_mb"] = len(batch.data) / 1e6
    payload_dir = Path(args.tmp) / "payload"
    payload_dir.mkdir()
    for i, (noflush, text) in enumerate(sent):
        (payload_dir / f"{i:02d}-{'noflush' if noflush else 'full'}.txt").write_text(text)

    # The daemon's path: a store with the same objects, caches warm after one sync.
    store = ObjectStore("node-1")
    for kind in ("Service", "EndpointSlice"):
        store.resync(kind, [o for o in objects if o["kind"] == kind])

    lines_seen: dict[str, int] = {}

    class Lines:  # the reconciler's observer, keeping the lines of the last sync
        def synced(self, full, seconds, lines, rules, no_local):
            lines_seen.clear()
            lines_seen.update(lines)

        def __getattr__(self, name):
            return lambda *a, **k: None

    rec = Reconciler(
        store, config, modes_for(args.mode, nft_datapath=args.datapath), observer=Lines()
    )

    def daemon_sync(verify: bool = False) -> tuple[float, int]:
        lines_seen.clear()
        t = time.perf_counter()
        report = rec.sync("periodic" if verify else None)
        took = time.perf_counter() - t
        assert report.ok, "sync failed"
        return took, sum(lines_seen.values())

    daemon_sync(verify=True)  # warm the render caches and the record of what is applied
    slices = {o["metadata"]["name"]: o for o in objects if o["kind"] == "EndpointSlice"}
    target = slices[f"svc-{args.services // 2}-x"]
    changes = {}

    def change(name: str, apply) -> None:
        apply()
        changes[name] = daemon_sync()

    def add_endpoint() -> None:
        target["endpoints"].append({"addresses": ["10.250.0.1"], "conditions": {"ready": True}})
        target["metadata"]["resourceVersion"] = "2"
        store.apply("EndpointSlice", "MODIFIED", json.loads(json.dumps(target)))

    def remove_endpoint() -> None:
        target["endpoints"].pop(0)
        target["metadata"]["resourceVersion"] = "3"
        store.apply("EndpointSlice", "MODIFIED", json.loads(json.dumps(target)))

    extra = generate(1, 3, first=args.services + 7)

    def add_service() -> None:
        for o in extra:
            store.apply(o["kind"], "ADDED", o)

    def delete_service() -> None:
        for o in extra:
            store.apply(o["kind"], "DELETED", o)

    change("endpoint added", add_endpoint)
    change("endpoint removed", remove_endpoint)
    change("Service added", add_service)
    change("Service deleted", delete_service)
    out["changes"] = changes
    out["noop"] = daemon_sync()[0]
    out["verify"] = daemon_sync(verify=True)[0]
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["child_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(out))


# ----------------------------------------------------------------------------- driver


def sh(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=True, **kw)


class Namespaces:
    """Namespaces made by this run; all deleted on exit, also on failure."""

    def __init__(self) -> None:
        self.made: list[str] = []
        self.tag = f"kpb-{os.getpid()}"

    def new(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        sh(["ip", "netns", "add", ns])
        self.made.append(ns)
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        return ns

    def close(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made.clear()


def timed(argv: list[str], stdin_path: Path | None = None) -> tuple[float, float, str]:
    """Run argv; (wall seconds, peak RSS MB of the process and its children, from wait4,
    stderr)."""
    with open(stdin_path) if stdin_path else open(os.devnull) as stdin:
        t = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        _, status, usage = os.wait4(proc.pid, 0)
        took = time.perf_counter() - t
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {err.strip()[:300]}")
    return took, usage.ru_maxrss / 1024, err


# `kproxy ARGS...` that prints its own peak RSS (children excluded) last on stderr.
SELF_RSS = (
    "import resource, sys; from kproxy.cli import main; rc = main(sys.argv[1:]); "
    "print('self-maxrss-kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); "
    "sys.exit(rc)"
)


def bare_replay(ns: str, mode: str, payload_dir: Path) -> tuple[float, float]:
    """Time the same payload files with the bare tool in an empty namespace; (s, peak MB)."""
    total = peak = 0.0
    for path in sorted(payload_dir.iterdir()):
        if mode == "nftables":
            took, rss, _ = timed(["ip", "netns", "exec", ns, "nft", "-f", str(path)])
        else:
            flags = ["--noflush"] if "noflush" in path.name else []
            took, rss, _ = timed(
                ["ip", "netns", "exec", ns, "iptables-restore", "-w", "5", *flags], path
            )
        total += took
        peak = max(peak, rss)
    return total, peak


def split_mode(label: str) -> tuple[str, str]:
    """A bench mode -> (kproxy --mode, --nftables-datapath): "nftables" is the netlink
    datapath (the default), "nftables-nft" the nft binary."""
    if label == "nftables-nft":
        return "nftables", "nft"
    return label, "netlink"


def run_size(nss: Namespaces, label: str, services: int, endpoints: int) -> dict:
    mode, datapath = split_mode(label)
    with tempfile.TemporaryDirectory(prefix="kproxy-bench-") as tmp:
        ns = nss.new(f"{label[:3]}{label[-3:]}{services}x{endpoints}")
        proc = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                __file__,
                "--worker",
                "--mode",
                mode,
                "--datapath",
                datapath,
                "--label",
                label,
                "--services",
                str(services),
                "--endpoints",
                str(endpoints),
                "--tmp",
                tmp,
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed: {proc.stderr[-2000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        bare_ns = nss.new(f"bare{services}x{endpoints}")
        result["bare"], result["bare_rss_mb"] = bare_replay(bare_ns, mode, Path(tmp) / "payload")
        # The real `kproxy sync` process on an empty node: its wall time, interpreter start
        # included, and its own peak RSS (the worker above also holds the generated cluster;
        # wait4 would report the larger of kproxy and its iptables-restore / nft child).
        cli_ns = nss.new(f"cli{services}x{endpoints}")
        result["cli"], _, err = timed(
            [
                "ip",
                "netns",
                "exec",
                cli_ns,
                sys.executable,
                "-c",
                SELF_RSS,
                "sync",
                "--mode",
                mode,
                "--nftables-datapath",
                datapath,
                "--state",
                str(Path(tmp) / "state.json"),
                "--cluster-cidr",
                "10.244.0.0/16",
                "--node-name",
                "node-1",
                "--lock-file",
                str(Path(tmp) / "lock"),
            ]
        )
        result["cli_rss_mb"] = int(re.findall(r"self-maxrss-kb (\d+)", err)[-1]) / 1024
        subprocess.run(["ip", "netns", "del", cli_ns], capture_output=True)
        nss.made.remove(cli_ns)
        for n in (ns, bare_ns):
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
            nss.made.remove(n)
        return result


LATENCY_CLIENT = r"""
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
times = []
for _ in range(n):
    s = socket.socket()
    s.settimeout(2)
    t = time.perf_counter()
    s.connect((host, port))
    times.append(time.perf_counter() - t)
    s.close()
times.sort()
print(times[len(times) // 2] * 1e6, times[int(len(times) * 0.99) - 1] * 1e6)
"""


def latency(mode: str, services: int, samples: int = 2000) -> tuple[float, float]:
    """Median and p99 connect time (µs) from a pod to the ClusterIP of the Service that is
    matched last (the worst case for iptables' linear KUBE-SERVICES)."""
    import netns

    from tests.synthetic import as_list, generate

    topo = netns.build(pods=(("a", 2), ("c", 4)), clients=0)
    try:
        topo.start_server(topo.pods["a"], tcp=[8080])
        objects = generate(services, 1, node_ports=False)
        last = objects[-1]
        last["endpoints"] = [{"addresses": ["10.244.1.2"], "conditions": {"ready": True}}]
        target_ip = objects[-2]["spec"]["clusterIP"]
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(as_list(objects), f)
        netns.run(
            topo.node,
            [
                sys.executable,
                "-m",
                "kproxy",
                "sync",
                "--mode",
                mode,
                "--state",
                f.name,
                "--cluster-cidr",
                "10.244.0.0/16",
                "--lock-file",
                f.name + ".lock",
            ],
            timeout=600,
        )
        os.unlink(f.name)
        out = netns.run(
            topo.pods["c"].ns,
            [sys.executable, "-c", LATENCY_CLIENT, target_ip, "80", str(samples)],
            timeout=600,
        ).stdout
        med, p99 = map(float, out.split())
        return med, p99
    finally:
        topo.close()


def programming_latency(label: str, services: int, trials: int) -> dict:
    """From an EndpointSlice change written to the API server to the first new connection
    that reaches the new endpoint, through `kproxy run` on a node with `services` Services
    × 10 endpoints (ms: median, p90, max). Each trial moves Service web from pod a to pod b
    (or back) and connects from pod c in a tight loop until pod b (a) answers: before the
    change every connection reaches the other pod, so the first answer from the new one is
    the changed rules at work."""
    import statistics

    from tests.chaos.harness import POD_A, POD_B, WEB_IP, Bench, slice_
    from tests.synthetic import generate

    mode, datapath = split_mode(label)
    with Bench(mode) as b:
        assert b.api is not None and b.kproxy is not None and b.topo is not None
        for o in generate(services, 10, mix=True):
            b.api.apply(o)
        b.kproxy.extra = ["--nftables-datapath", datapath] if mode == "nftables" else []
        b.api.apply(slice_("web-1", "web", [POD_A]))
        b.start_kproxy(wait_ready=False)
        b.wait("kproxy ready", lambda: b.status("/readyz") == 200, timeout=1800, step=1)
        client = b.topo.pods["c"].ns

        def answer() -> str:
            with socket.create_connection((WEB_IP, 80), timeout=1) as conn:
                return conn.recv(64).decode(errors="replace")

        def until(name: str, limit: float) -> float | None:
            """Seconds until `name` answers (None: not within `limit`)."""
            t0 = time.monotonic()
            while time.monotonic() - t0 < limit:
                try:
                    if answer().startswith(name + " "):
                        return time.monotonic() - t0
                except OSError:
                    pass
            return None

        assert netns_call(client, until, "a", 120) is not None, "web never answered from pod a"
        took: list[float] = []
        for i in range(trials):
            to_b = i % 2 == 0
            time.sleep(1.5)  # past --iptables-min-sync-period: each change syncs at once

            def trial(to_b: bool = to_b) -> float | None:
                b.api.apply(slice_("web-1", "web", [POD_B if to_b else POD_A]))
                return until("b" if to_b else "a", 30)

            seconds = netns_call(client, trial)
            if seconds is None:
                raise RuntimeError(f"trial {i}: the change never reached the packets")
            took.append(seconds * 1000)
    took.sort()
    return {
        "median": statistics.median(took),
        "p90": took[int(len(took) * 0.9) - 1],
        "max": took[-1],
        "trials": len(took),
    }


def drift_repair(label: str, services: int, rounds: int) -> dict:
    """Another process changes kproxy's rules on a node with `services` Services × 10
    endpoints, through `kproxy run` (canaries every 60 s, verify every 300 s: only the
    nf_tables events repair in time): per kind of change, the time from the start of the
    command to the first new connection that works again (tests/chaos/scenarios._until: 50 ms
    tries), and kproxy's own repair time from its log ("repaired in N ms")."""
    import statistics

    import driftcases

    from tests.chaos.harness import POD_A, WEB_IP, Bench, service, slice_
    from tests.chaos.scenarios import NOPE_IP, _until
    from tests.synthetic import generate

    mode, datapath = split_mode(label)
    # The kinds that touch one Service's objects and the shared ones; a whole table flushed
    # at this size is a full verify (more than 64 chains), as the canaries already were.
    kinds = {
        "nat KUBE-SERVICES flushed",
        "a KUBE-SVC- chain flushed",
        "one owned rule deleted",
        "a jump from a built-in chain deleted",
        "chain services flushed",
        "a service- chain flushed",
        "one map element deleted",
        "one rule deleted",
    }
    out: dict[str, dict] = {}
    with Bench(mode, clients=1) as b:
        assert b.api is not None and b.kproxy is not None and b.topo is not None
        for o in generate(services, 10, mix=True):
            b.api.apply(o)
        b.api.apply(slice_("web-1", "web", [POD_A]))
        b.api.apply(service("nope", NOPE_IP))
        b.kproxy.extra = ["--canary-interval", "60s", "--iptables-sync-period", "300s"]
        if mode == "nftables":
            b.kproxy.extra += ["--nftables-datapath", datapath]
        b.start_kproxy(wait_ready=False)
        b.wait("kproxy ready", lambda: b.status("/readyz") == 200, timeout=1800, step=1)
        client = b.topo.pods["c"].ns
        assert netns_call(client, _until, WEB_IP, "ok", time.monotonic(), 600, 0.05) is not None
        time.sleep(30)  # the verify after the start's own flood of events, if any, is done
        for _ in range(rounds):
            for name, command, _target in driftcases.cases(mode, b.node, WEB_IP, NOPE_IP):
                if name not in kinds:
                    continue
                argv = command()
                seen = len(_REPAIRED.findall(b.kproxy.log()))
                t0 = time.monotonic()
                netns_pid(b.node, argv)
                took = netns_call(client, _until, WEB_IP, "ok", t0, 60, 0.05)
                b.wait("logged", lambda s=seen: _repair_ms(b.kproxy.log(), s) is not None, 120)
                r = out.setdefault(name, {"recovery": [], "repair": []})
                r["recovery"].append((took or 60) * 1000)
                r["repair"].append(_repair_ms(b.kproxy.log(), seen))
                time.sleep(15)  # five repairs of one chain within a minute are a fight
    return {
        name: {
            "recovery": statistics.median(r["recovery"]),
            "repair": statistics.median(abs(x) for x in r["repair"]),
            "verified": sum(1 for x in r["repair"] if x < 0),
            "n": len(r["recovery"]),
        }
        for name, r in out.items()
    }


# A repair of the touched objects ("repaired in 5 ms"), or a full verify's ("... behind
# kproxy's back (...): ... read 7.313s plan 0.203s apply 1.464s").
_REPAIRED = re.compile(
    r"repaired in (\d+) ms|behind kproxy's back .* read ([\d.]+)s plan ([\d.]+)s apply ([\d.]+)s"
)


def _repair_ms(log: str, seen: int) -> float | None:
    """kproxy's own time for the repair after `seen` earlier ones; a full verify's is its
    read + plan + apply, and counts as negative (reported as "full verify")."""
    found = _REPAIRED.findall(log)
    if len(found) <= seen:
        return None
    ms, *verify = found[seen]
    return float(ms) if ms else -1000 * sum(float(x) for x in verify)


def netns_pid(ns: str, argv: list[str]) -> int:
    import netns

    return netns.run_pid(ns, argv)


def netns_call(ns: str, fn, *args):
    import netns

    return netns.call_in(ns, fn, *args)


def versions() -> dict[str, str]:
    def first(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            return "?"

    return {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "iptables": first(["iptables", "--version"]),
        "nft": first(["nft", "--version"]),
        "cpus": str(os.cpu_count()),
    }


def fmt_ms(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s"


def report(results: list[dict], lat: dict, prog: dict, info: dict) -> str:
    lines = [
        "| mode | cluster | kproxy full sync | load / render / apply | bare restore of the same payload | ratio | lines | `kproxy sync` process: wall (÷ bare), own peak RSS | tool RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['services']} × {r['endpoints']} | {fmt_ms(r['full_total'])} | "
            f"{fmt_ms(r['load'])} / {fmt_ms(r['render'])} / {fmt_ms(r['sync'])} | "
            f"{fmt_ms(r['bare'])} | {r['full_total'] / r['bare']:.2f} | {r['full_lines']} | "
            f"{fmt_ms(r['cli'])} ({r['cli'] / r['bare']:.2f}), {r['cli_rss_mb']:.0f} MB | "
            f"{max(r['child_rss_mb'], r['bare_rss_mb']):.0f} MB |"
        )
    lines += [
        "",
        "One change on the full table through the daemon's reconciler (only the changed "
        "Service is rendered and sent; the kernel is not read), a sync with nothing "
        "changed, and a verify (reads the kernel and compares):",
        "",
        "| mode | cluster | endpoint added | endpoint removed | Service added | Service deleted | no-op | verify |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r["changes"]
        cells = [
            f"{fmt_ms(c[k][0])} ({c[k][1]} lines)"
            for k in ("endpoint added", "endpoint removed", "Service added", "Service deleted")
        ]
        lines.append(
            f"| {r['mode']} | {r['services']} × {r['endpoints']} | "
            + " | ".join(cells)
            + f" | {fmt_ms(r['noop'])} | {fmt_ms(r['verify'])} |"
        )
    encoded = [r for r in results if "encode" in r]
    if encoded:
        lines += [
            "",
            "The netlink encoder alone (the IPv4 table from empty as one batch, no kernel):",
            "",
            "| cluster | messages | batch | encode |",
            "|---|---|---|---|",
        ]
        for r in encoded:
            lines.append(
                f"| {r['services']} × {r['endpoints']} | {r['encode_messages']} | "
                f"{r['encode_mb']:.1f} MB | {fmt_ms(r['encode'])} |"
            )
    if lat:
        lines += [
            "",
            "First-packet latency (connect() to the ClusterIP matched last, from a pod; "
            "2,000 connections):",
            "",
            "| mode | Services | median | p99 |",
            "|---|---|---|---|",
        ]
        for (mode, n), (med, p99) in sorted(lat.items()):
            lines.append(f"| {mode} | {n} | {med:.0f} µs | {p99:.0f} µs |")
    if prog:
        lines += [
            "",
            "From an EndpointSlice change written to the API server to the first new "
            "connection reaching the new endpoint, through `kproxy run` (Services × 10 "
            "endpoints; a tight connect loop from a pod):",
            "",
            "| mode | Services | median | p90 | max | trials |",
            "|---|---|---|---|---|---|",
        ]
        for (label, n), r in sorted(prog.items()):
            lines.append(
                f"| {label} | {n} | {r['median']:.0f} ms | {r['p90']:.0f} ms | "
                f"{r['max']:.0f} ms | {r['trials']} |"
            )
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items())]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="iptables")
    p.add_argument("--datapath", default="netlink")
    p.add_argument("--label", default="iptables")
    p.add_argument("--services", type=int, default=100)
    p.add_argument("--endpoints", type=int, default=3)
    p.add_argument("--tmp")
    p.add_argument("--sizes", default="1000x10,5000x10,10000x10,5000x50")
    p.add_argument(
        "--modes",
        default="iptables,nftables,nftables-nft",
        help="nftables: the netlink datapath; nftables-nft: the nft binary's",
    )
    p.add_argument("--latency", action="store_true", help="also measure first-packet latency")
    p.add_argument("--latency-sizes", default="100,10000")
    p.add_argument(
        "--programming",
        metavar="SERVICES",
        type=int,
        default=0,
        help="also measure EndpointSlice change -> packets through `kproxy run` at this size",
    )
    p.add_argument("--programming-modes", default="nftables,nftables-nft")
    p.add_argument("--programming-trials", type=int, default=20)
    p.add_argument(
        "--drift",
        metavar="SERVICES",
        type=int,
        default=0,
        help="also measure the repair of other processes' changes at this size",
    )
    p.add_argument("--drift-modes", default="iptables,nftables")
    p.add_argument("--drift-rounds", type=int, default=3)
    p.add_argument("--write", metavar="FILE", help="write the results table into FILE")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, quick (used by make test)")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    if os.geteuid() != 0:
        print("bench: needs root (creates network namespaces)", file=sys.stderr)
        return 2
    if args.smoke:
        args.sizes, args.latency_sizes = "50x3", "20"
    sizes = [tuple(map(int, s.split("x"))) for s in args.sizes.split(",") if s]
    nss = Namespaces()
    results = []
    lat: dict = {}
    prog: dict = {}
    try:
        for services, endpoints in sizes:
            for mode in args.modes.split(","):
                print(f"bench: {mode} {services} × {endpoints} ...", file=sys.stderr, flush=True)
                r = run_size(nss, mode, services, endpoints)
                results.append(r)
                print(
                    f"bench:   full sync {fmt_ms(r['full_total'])} vs bare {fmt_ms(r['bare'])}",
                    file=sys.stderr,
                    flush=True,
                )
        if args.latency or args.smoke:
            # Packet latency depends on the mode, not on how the rules were written.
            lat_modes = dict.fromkeys(split_mode(m)[0] for m in args.modes.split(","))
            for n in map(int, args.latency_sizes.split(",")):
                for mode in lat_modes:
                    print(f"bench: latency {mode} {n} Services ...", file=sys.stderr, flush=True)
                    lat[(mode, n)] = latency(mode, n, samples=200 if args.smoke else 2000)
        if args.programming or args.smoke:
            n = args.programming or 30
            trials = 4 if args.smoke else args.programming_trials
            for label in args.programming_modes.split(","):
                print(f"bench: programming latency {label} {n} Services ...", file=sys.stderr)
                prog[(label, n)] = programming_latency(label, n, trials)
        drift: dict = {}
        if args.drift:
            for label in args.drift_modes.split(","):
                print(f"bench: drift repair {label} {args.drift} Services ...", file=sys.stderr)
                drift[(label, args.drift)] = drift_repair(label, args.drift, args.drift_rounds)
    finally:
        nss.close()
    if drift:
        text = drift_report(drift, versions())
        print(text)
        if args.write:
            write_block(Path(args.write), text, "bench-drift")
        if not results:
            return 0
    text = report(results, lat, prog, versions())
    print(text)
    if args.write:
        write_block(Path(args.write), text, "bench")
    return 0


def write_block(path: Path, text: str, marker: str) -> None:
    """Put `text` between <!-- marker:start --> and <!-- marker:end --> in `path`."""
    doc = path.read_text() if path.exists() else ""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    block = f"{start}\n{text}\n{end}"
    if start in doc and end in doc:
        doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end) :]
    else:
        doc = doc + "\n" + block + "\n"
    path.write_text(doc)


def drift_report(drift: dict, info: dict) -> str:
    lines = [
        "Another process changes kproxy's rules, through `kproxy run` (Services × 10 "
        "endpoints; only the nf_tables events can repair in time): from the start of the "
        "command to the first new connection that works again (50 ms tries), and kproxy's own "
        "repair (reading the touched objects, planning, applying), medians:",
        "",
        "| mode | Services | change | connections work again | kproxy's repair | n | of which full verifies |",
        "|---|---|---|---|---|---|---|",
    ]
    for (label, n), kinds in sorted(drift.items()):
        for name, r in kinds.items():
            lines.append(
                f"| {label} | {n} | {name} | {r['recovery']:.0f} ms | {r['repair']:.0f} ms | "
                f"{r['n']} | {r['verified']} |"
            )
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
