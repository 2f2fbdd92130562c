"""The kinds of drift issue 16 names, as commands another process runs in the node
namespace: for tests/test_kernel_drift.py and the chaos scenario foreign_change. Each case is
(what, the command (made when it runs: it may look up a chain's name), and which Service shows
the damage: WEB, new connections fail; NOPE, a Service without endpoints is no longer
refused)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable

import netns

WEB, NOPE = "web", "nope"
Case = tuple[str, Callable[[], list[str]], str]


def cases(mode: str, node: str, web: str, nope: str) -> list[Case]:
    """`web`, `nope`: the two Services' ClusterIPs (port 80)."""
    made = iptables_cases(node, web, nope) if mode == "iptables" else nft_cases(node, web, nope)
    return [c if len(c) == 3 else (*c, WEB) for c in made]


def iptables_cases(node: str, web: str, nope: str) -> list[tuple]:
    def chain(prefix: str, table: str = "nat") -> str:
        return next(
            ln.split()[1]
            for ln in netns.iptables_save(node, table).splitlines()
            if ln.startswith(f"-A {prefix}") and "default/web:" in ln
        )

    def rule(table: str, chain_name: str, needle: str) -> list[str]:
        text = netns.run(node, ["iptables", "-t", table, "-S", chain_name]).stdout
        line = next(ln for ln in text.splitlines() if needle in ln)
        return ["iptables", "-t", table, *shlex.split(line.replace("-A", "-D", 1))]

    return [
        ("nat KUBE-SERVICES flushed", lambda: ["iptables", "-t", "nat", "-F", "KUBE-SERVICES"]),
        (
            "filter KUBE-SERVICES flushed",
            lambda: ["iptables", "-t", "filter", "-F", "KUBE-SERVICES"],
        ),
        ("a KUBE-SVC- chain flushed", lambda: ["iptables", "-t", "nat", "-F", chain("KUBE-SVC-")]),
        ("a KUBE-SEP- chain flushed", lambda: ["iptables", "-t", "nat", "-F", chain("KUBE-SEP-")]),
        ("one owned rule deleted", lambda: rule("nat", "KUBE-SERVICES", "default/web:")),
        (
            "one rule inserted",
            lambda: ["iptables", "-t", "nat", "-I", chain("KUBE-SVC-"), "1", "-j", "RETURN"],
        ),
        (
            "a jump from a built-in chain deleted",
            lambda: rule("nat", "PREROUTING", "KUBE-SERVICES"),
        ),
        ("the whole nat table flushed", lambda: ["iptables", "-t", "nat", "-F"]),
        ("the whole filter table flushed", lambda: ["iptables", "-t", "filter", "-F"], NOPE),
    ]


def nft_cases(node: str, web: str, nope: str) -> list[tuple]:
    def listing() -> str:
        return netns.run(node, ["nft", "-a", "list", "table", "ip", "kproxy"]).stdout

    def chain(prefix: str) -> str:
        return next(
            ln.split()[1]
            for ln in listing().splitlines()
            if ln.strip().startswith(f"chain {prefix}") and "default/web" in ln
        )

    def first_rule(chain_name: str) -> list[str]:
        text = netns.run(node, ["nft", "-a", "list", "chain", "ip", "kproxy", chain_name])
        rules = [ln for ln in text.stdout.splitlines() if "# handle" in ln and "chain " not in ln]
        handle = re.search(r"# handle (\d+)", rules[0]).group(1)
        return ["nft", "delete", "rule", "ip", "kproxy", chain_name, "handle", handle]

    nft = ["nft"]
    return [
        ("chain services flushed", lambda: [*nft, "flush", "chain", "ip", "kproxy", "services"]),
        (
            "a service- chain flushed",
            lambda: [*nft, "flush", "chain", "ip", "kproxy", chain("service-")],
        ),
        (
            "an endpoint- chain flushed",
            lambda: [*nft, "flush", "chain", "ip", "kproxy", chain("endpoint-")],
        ),
        (
            "one map element deleted",
            lambda: [*nft, f"delete element ip kproxy service-ips {{ {web} . tcp . 80 }}"],
        ),
        (
            "the reject of a Service without endpoints deleted",
            lambda: [
                *nft,
                f"delete element ip kproxy no-endpoint-services {{ {nope} . tcp . 80 }}",
            ],
            NOPE,
        ),
        ("one rule deleted", lambda: first_rule("services")),
        (
            "one rule inserted",
            lambda: [*nft, "insert", "rule", "ip", "kproxy", chain("service-"), "return"],
        ),
        ("a base chain's jump deleted", lambda: first_rule("nat-prerouting")),
        ("the whole table flushed", lambda: [*nft, "flush", "table", "ip", "kproxy"]),
        ("the table deleted", lambda: [*nft, "delete", "table", "ip", "kproxy"]),
    ]
