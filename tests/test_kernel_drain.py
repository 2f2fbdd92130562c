"""A node drain: hundreds of EndpointSlices change in one burst while traffic flows.

Issue 13.1: a partial sync whose change was large enough for a whole-table restore planned the
*fragments* of the changed Services as if they were the whole table, so every owned chain and
jump outside them (filter FORWARD -> KUBE-FORWARD, nat's chains of untouched Services) was
restored away until the next verify. On a node whose FORWARD policy is DROP (Docker sets it)
that is lost traffic. Here: 300 Services x 10 endpoints, FORWARD policy DROP with a foreign
rule admitting new pod traffic (so replies depend on kproxy's KUBE-FORWARD), 200 Services'
endpoints replaced at once; an `iptables-save` sampler every 0.25 s must never see a chain or
jump missing that exists both before and after, and the prober to untouched Services must not
fail once.
"""

from __future__ import annotations

import threading
import time

import pytest

from kproxy.iptables.rules import BUILTIN_CHAINS, is_owned_chain, parse_save, rule_target
from tests.chaos.harness import Bench, netns, service, slice_

pytestmark = pytest.mark.kernel

SERVICES = 300
ENDPOINTS = 10
DRAINED = 200


def _svc_ip(i: int) -> str:
    return f"10.97.{i // 250}.{i % 250 + 1}"


def _endpoints(i: int, generation: int) -> list[str]:
    # Nobody answers on these: only the rules matter for the bulk Services.
    return [f"10.{250 - generation}.{i % 250}.{e + 1 + 10 * (i // 250)}" for e in range(ENDPOINTS)]


def _owned_view(text: str) -> tuple[set[tuple[str, str]], set[tuple[str, str, str]]]:
    """(owned chains, jumps from built-in chains into owned chains) of an iptables-save text."""
    chains: set[tuple[str, str]] = set()
    jumps: set[tuple[str, str, str]] = set()
    for name, table in parse_save(text).items():
        for chain, rules in table.chains.items():
            if is_owned_chain(name, chain):
                chains.add((name, chain))
            elif chain in BUILTIN_CHAINS.get(name, ()):
                for rule in rules:
                    target = rule_target(rule)
                    if target is not None and is_owned_chain(name, target):
                        jumps.add((name, chain, rule))
    return chains, jumps


def _generation() -> int:
    """The nf_tables ruleset generation of the calling thread's namespace."""
    from kproxy.nftables.netlink import _generation as generation
    from kproxy.nftables.nlsock import NetlinkSocket

    with NetlinkSocket() as sock:
        return generation(sock)


class Sampler:
    """`iptables-save` of the node every `interval` seconds, from a thread.

    iptables-nft-save reads a table in several netlink dumps; one racing a whole-table
    restore can print a state no transaction ever committed (seen here: a nat table without
    its PREROUTING jump, once in ~1,200 saves, with nothing but iptables-restore and
    iptables-save running). A save is kept only when the ruleset generation did not move
    while it ran: then it is one committed state."""

    def __init__(self, ns: str, interval: float = 0.25) -> None:
        self.ns, self.interval = ns, interval
        self.samples: list[tuple[float, str]] = []
        self.torn = 0  # saves a commit ran through, not kept
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="sampler")

    def _run(self) -> None:
        try:
            while not self.stop_event.is_set():
                t0 = time.monotonic()
                before = netns.call_in(self.ns, _generation)
                text = netns.iptables_save(self.ns)
                if netns.call_in(self.ns, _generation) == before:
                    self.samples.append((t0, text))
                else:
                    self.torn += 1
                self.stop_event.wait(max(0.0, self.interval - (time.monotonic() - t0)))
        except BaseException as exc:  # reported by the test
            self.error = exc

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(30)


def test_a_drain_of_200_services_never_removes_other_rules(kernel_support):
    with Bench("iptables") as bench:
        # Docker's FORWARD policy: only what a rule accepts is forwarded. A foreign rule admits
        # new pod traffic; the replies are accepted by kproxy's KUBE-FORWARD (ESTABLISHED).
        netns.run(bench.node, ["iptables", "-P", "FORWARD", "DROP"])
        netns.run(
            bench.node,
            [
                "iptables",
                "-A",
                "FORWARD",
                "-s",
                "10.244.0.0/16",
                "-m",
                "conntrack",
                "--ctstate",
                "NEW",
                "-j",
                "ACCEPT",
            ],
        )
        objs = []
        for i in range(SERVICES):
            objs.append(service(f"bulk-{i}", _svc_ip(i)))
            objs.append(slice_(f"bulk-{i}-1", f"bulk-{i}", _endpoints(i, 0)))
        bench.apply(*objs)
        bench.start_kproxy(timeout=120)
        bench.start_prober(interval=0.1)
        time.sleep(1.0)  # the prober's steady state before the burst

        with Sampler(bench.node) as sampler:
            time.sleep(1.0)
            log_before = len(bench.kproxy.log())
            # The drain: 200 Services' endpoints all move, in one burst.
            bench.apply(
                *(slice_(f"bulk-{i}-1", f"bulk-{i}", _endpoints(i, 1)) for i in range(DRAINED))
            )
            bench.wait("the drain applied", bench.converged, 120, step=0.5)
            time.sleep(2.0)  # past the canary interval: a repair would have happened by now
        assert sampler.error is None, sampler.error
        assert len(sampler.samples) >= 8, f"{len(sampler.samples)} kept, {sampler.torn} torn"
        bench.prober.stop()

        before_chains, before_jumps = _owned_view(sampler.samples[0][1])
        after_chains, after_jumps = _owned_view(sampler.samples[-1][1])
        keep_chains = before_chains & after_chains
        keep_jumps = before_jumps & after_jumps
        # Both ends hold the untouched Services' chains and every jump: the check has teeth.
        assert len(keep_chains) > 100 * 3 and keep_jumps
        t_start = sampler.samples[0][0]
        for when, text in sampler.samples:
            chains, jumps = _owned_view(text)
            lost_chains = sorted(keep_chains - chains)
            lost_jumps = sorted(keep_jumps - jumps)
            assert not lost_chains and not lost_jumps, (
                f"{when - t_start:.2f}s into the drain: {len(lost_chains)} chains missing "
                f"(e.g. {lost_chains[:3]}), jumps missing: {lost_jumps[:3]}\n"
                f"--- kproxy's log of the drain ---\n{bench.kproxy.log()[log_before:][-6000:]}"
            )
        assert len(sampler.samples) >= 8
        assert bench.prober.failed == 0, bench.prober.summary()
        # The burst was large enough for a whole-table restore (the path that lost the rules):
        # the test exercises what it means to.
        drain_log = bench.kproxy.log()[log_before:]
        assert "whole nat restored" in drain_log, drain_log[-3000:]
