"""The nftables netlink datapath against a real kernel, with nft as the reference.

Every transaction here goes through the nft_oracle fixture too (the same starting table and
transaction applied with `nft -f` elsewhere must list identically); these tests add their own
explicit comparisons, the read side (a verify over netlink sees exactly the drift nft makes),
the kernel's refusals, the fallback to nft, and kill -9 in the middle of a big batch.
"""

from __future__ import annotations

import copy
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns  # noqa: E402

from kproxy.model import build_state  # noqa: E402
from kproxy.nftables import nlmsg as m  # noqa: E402
from kproxy.nftables.mode import NftablesMode  # noqa: E402
from kproxy.nftables.netlink import NetlinkBackend  # noqa: E402
from kproxy.nftables.nft import NftBackend, NftError  # noqa: E402
from kproxy.nftables.nlsock import NetlinkSocket  # noqa: E402
from kproxy.nftables.plan import NftPlan, plan_table  # noqa: E402
from kproxy.nftables.render import NFT_IPV4, NFT_IPV6, render_nft  # noqa: E402
from kproxy.nftables.table import parse_table  # noqa: E402
from tests import nft_shapes  # noqa: E402

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def node(kernel_support, nft_oracle):
    topo = netns.Topology()
    try:
        yield topo.node
    finally:
        topo.close()


@pytest.fixture
def reference(kernel_support):
    """A namespace where the same tables are written with nft -f, to compare with."""
    topo = netns.Topology()
    try:
        yield topo.node
    finally:
        topo.close()


def render(objects=None, config="masks", fam=NFT_IPV4):
    state, warnings = build_state(nft_shapes.objects() if objects is None else objects)
    assert warnings == []
    cfg = nft_shapes.CONFIGS[config] if isinstance(config, str) else config
    options = nft_shapes.OPTIONS.get(config, {}) if isinstance(config, str) else {}
    return render_nft(state, cfg, fam, **options).table


def listing(ns: str, family: str) -> str:
    return netns.run(ns, ["nft", "list", "table", family, "kproxy"], check=False).stdout


def parsed(text: str, family: str = "ip"):
    """A listing as a table: chains and elements compared whatever order nft lists them in
    (a chain made again, or elements added again, list in a new place)."""
    return parse_table(text, family)


def sync(ns: str, mode: NftablesMode, table, verify: bool = True):
    return netns.call_in(ns, mode.sync, table, verify)


def nft_sync(ns: str, table) -> None:
    def go():
        backend = NftBackend(table.family)
        backend.apply_plan(plan_table(table, backend.read()))

    netns.call_in(ns, go)


@pytest.mark.parametrize("fam", [NFT_IPV4, NFT_IPV6], ids=["ip", "ip6"])
@pytest.mark.parametrize("config", sorted(nft_shapes.CONFIGS))
def test_every_shape_lists_as_nft_writes_it_and_reads_back_equal(node, reference, fam, config):
    table = render(config=config, fam=fam)
    mode = NftablesMode(NetlinkBackend(fam.name))
    outcome = sync(node, mode, table)
    assert outcome.changed
    nft_sync(reference, table)
    mine = listing(node, fam.name)
    assert "dnat to" in mine and mine == listing(reference, fam.name)
    # Read back over netlink (a verify): the kernel's rules compare equal, byte for byte, to
    # the encodings of the wanted ones; nothing to do.
    again = sync(node, NftablesMode(NetlinkBackend(fam.name)), table)
    assert not again.changed, again.payload
    # The same for the rules nft wrote: the encoder writes what nft writes.
    theirs = netns.call_in(reference, NetlinkBackend(fam.name).read, table)
    assert {n: c.rules for n, c in theirs.chains.items()} == {
        n: c.rules for n, c in table.chains.items()
    }
    # And the anonymous sets and maps rules use are declared as nft declares them.
    mine_anon = netns.call_in(node, anonymous_sets, fam.name)
    assert mine_anon and mine_anon == netns.call_in(reference, anonymous_sets, fam.name)


SET_HANDLE = 16  # NFTA_SET_HANDLE: the kernel's number, not part of the declaration


def anonymous_sets(family: str) -> list[tuple]:
    """Every anonymous set of the kproxy table as the kernel dumps its declaration (name and
    handle aside), and its elements: sorted."""
    out = []
    with NetlinkSocket() as sock:
        table = m.strz(1, "kproxy")
        for payload in sock.dump(m.NFT_MSG_GETSET, m.NFPROTO[family], table):
            a = m.parse_attrs(payload, 4)
            if not m.be32(a.get(m.NFTA_SET_FLAGS, bytes(4))) & m.NFT_SET_ANONYMOUS:
                continue
            name = m.cstr(a[m.NFTA_SET_NAME])
            declared = tuple(sorted((k, v) for k, v in a.items() if k not in (2, SET_HANDLE)))
            body = table + m.strz(m.NFTA_SET_ELEM_LIST_SET, name)
            elements = sorted(
                element
                for p in sock.dump(m.NFT_MSG_GETSETELEM, m.NFPROTO[family], body)
                for _, element in m.iter_attrs(
                    m.parse_attrs(p, 4).get(m.NFTA_SET_ELEM_LIST_ELEMENTS, b"")
                )
            )
            out.append((name[:5], declared, tuple(elements)))
    return sorted(out)


def _variants() -> list[tuple[str, list, str]]:
    """A walk through changes of every kind: (what, objects, config)."""
    base = nft_shapes.objects()
    fewer = [o for o in base if o["metadata"]["name"] not in ("aff", "lb", "aff-IPv4", "lb-IPv4")]
    moved = copy.deepcopy(base)
    for o in moved:
        if o["kind"] == "EndpointSlice" and o["addressType"] == "IPv4":
            for e in o["endpoints"]:
                e["addresses"] = [e["addresses"][0].replace("10.244.1.", "10.244.7.")]
    timeout = copy.deepcopy(base)
    for o in timeout:
        if o["metadata"]["name"] == "aff" and o["kind"] == "Service":
            o["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"] = 99
    ranges = copy.deepcopy(base)
    for o in ranges:
        if o["metadata"]["name"] == "lb" and o["kind"] == "Service":
            o["spec"]["loadBalancerSourceRanges"] = ["192.0.2.0/24", "198.51.100.7/32"]
    return [
        ("all shapes", base, "masks"),
        ("nodeport addresses given", base, "nodeport-ips"),
        ("back to fib", base, "masks"),
        ("two Services gone", fewer, "masks"),
        ("they come back", base, "masks"),
        ("every endpoint moved", moved, "masks"),
        ("affinity timeout changed (set re-created)", timeout, "masks"),
        ("source ranges changed (anonymous set replaced)", ranges, "masks"),
        ("nothing", [], "masks"),
    ]


def test_a_walk_through_every_kind_of_change_matches_nft(node, reference):
    mode = NftablesMode(NetlinkBackend("ip"))
    for what, objects, config in _variants():
        table = render(objects, config)
        sync(node, mode, table, verify=False)  # planned against the last apply, no read
        nft_sync(reference, table)
        assert listing(node, "ip") == listing(reference, "ip"), what
        assert not sync(node, mode, table).changed, what  # a verify finds nothing


DRIFTS = [
    ("a map element deleted", ["delete", "element", "ip", "kproxy", "service-ips",
                               "{ 10.96.0.10 . tcp . 80 }"]),
    ("an endpoint map emptied", ["flush", "map", "ip", "kproxy", "endpoints-R5ZPL7J4-ns/a/tcp/p"]),
    ("a Service chain flushed", ["flush", "chain", "ip", "kproxy", "service-R5ZPL7J4-ns/a/tcp/p"]),
    ("a rule added to an owned chain", ["add", "rule", "ip", "kproxy", "services", "drop"]),
    ("a firewall chain flushed (anonymous set)",
     ["flush", "chain", "ip", "kproxy", "firewall-GFIVXVWG-ns/lb/sctp/p"]),
    ("a base chain deleted", ["delete", "chain", "ip", "kproxy", "nat-prerouting"]),
    ("a foreign chain added", ["add", "chain", "ip", "kproxy", "intruder"]),
    ("the table deleted", ["delete", "table", "ip", "kproxy"]),
]  # fmt: skip


def test_a_verify_over_netlink_sees_and_repairs_each_drift(node, reference):
    table = render()
    nft_sync(reference, table)
    want = listing(reference, "ip")
    mode = NftablesMode(NetlinkBackend("ip"))
    sync(node, mode, table)
    assert listing(node, "ip") == want
    for what, command in DRIFTS:
        netns.run(node, ["nft", *command])
        assert listing(node, "ip") != want, what
        outcome = sync(node, mode, table)  # verify: read over netlink, repair
        assert outcome.changed, what
        assert parsed(listing(node, "ip")) == parsed(want), what
        assert not sync(node, mode, table).changed, what


def test_a_refused_batch_names_the_service_and_rule_and_changes_nothing(node):
    table = render()
    backend = NetlinkBackend("ip")
    netns.call_in(node, NftablesMode(backend).sync, table, True)
    before = listing(node, "ip")
    plan = NftPlan(
        "ip",
        ops=[
            ("elements", "add", "service-ips", "map", [("10.96.9.9 . tcp . 80", "drop")]),
            ("rule", "service-R5ZPL7J4-ns/a/tcp/p", "jump no-such-chain"),
        ],
    )
    with pytest.raises(NftError) as err:
        netns.call_in(node, backend.apply_plan, plan, table)
    message = str(err.value)
    assert "nothing applied" in message
    assert "Service ns/a" in message and "'jump no-such-chain'" in message
    assert listing(node, "ip") == before  # the element in the same batch was not added


def test_a_rule_the_encoder_does_not_know_goes_through_nft(node, caplog):
    table = render()
    table.chains["reject-chain"].rules.insert(0, "counter packets 0 bytes 0")
    mode = NftablesMode(NetlinkBackend("ip"))
    with caplog.at_level("WARNING"):
        sync(node, mode, table)
    assert "counter packets" in listing(node, "ip")
    assert "goes through nft -f" in caplog.text


KILL_CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from tests.synthetic import generate
from kproxy.model import NodeConfig, build_state
from kproxy.nftables.netlink import NetlinkBackend
from kproxy.nftables.plan import plan_table
from kproxy.nftables.render import render_nft
n, shift = int(sys.argv[1]), int(sys.argv[2])
objects = generate(n, 4, mix=True)
for o in objects:
    if o["kind"] == "EndpointSlice":
        for e in o["endpoints"]:
            e["addresses"] = [e["addresses"][0].replace("10.128.", "10.%d." % (128 + shift))]
state, _ = build_state(objects)
table = render_nft(state, NodeConfig(node_name="node-1", cluster_cidrs=("10.244.0.0/16",))).table
backend = NetlinkBackend("ip")
print("go", flush=True)
backend.apply_plan(plan_table(table, backend.read(table)), table)
print("done", flush=True)
"""


def test_kill_9_in_the_middle_of_a_big_batch_leaves_the_old_or_the_new_table(node):
    """One batch, one sendmsg: the kernel commits it whole at BATCH_END or not at all. Killed
    at random moments of a 1,000-Service apply (encoding, sending, the kernel's work), the
    table is always one of the two complete tables."""
    script = KILL_CHILD.format(root=str(ROOT))

    def run(shift: int, kill_after: float | None) -> str:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", node, sys.executable, "-c", script, "1000", str(shift)],
            stdout=subprocess.PIPE,
            text=True,
            env=netns.command_env() | {"KPROXY_NFT_ORACLE_NETNS": ""},
        )
        try:
            assert proc.stdout.readline().strip() == "go"
            if kill_after is None:
                assert proc.stdout.readline().strip() == "done"
            else:
                time.sleep(kill_after)
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return listing(node, "ip")

    old_text, new_text = run(0, None), run(1, None)
    assert old_text.count("dnat to") == new_text.count("dnat to") == 4000
    old, new = parsed(old_text), parsed(new_text)
    assert old != new
    rng = random.Random(15)
    seen = {"old": 0, "new": 0}
    current = new
    for attempt in range(8):
        target_shift = attempt % 2  # alternate: new -> old -> new ...
        after = parsed(run(target_shift, rng.uniform(0.0, 2.0)))
        assert after in (old, new), f"attempt {attempt}: a partial table after kill -9"
        seen["old" if after == old else "new"] += 1
        current = after
    assert current in (old, new)
    print(json.dumps(seen))


def test_a_verify_reads_nothing_while_no_transaction_was_committed(node):
    """The ruleset's generation moves with every nf_tables commit, of any process on any
    table: while it stays where kproxy last wrote or read the table, a verify reads nothing.
    Any commit at all (here: another tool's own table) makes the next verify read again."""
    table = render()
    mode = NftablesMode(NetlinkBackend("ip"))
    first = sync(node, mode, table)
    assert first.changed and first.read_kernel
    quiet = sync(node, mode, table)
    assert not quiet.changed and not quiet.read_kernel  # one GETGEN, no dump
    netns.run(node, ["nft", "add table inet other-tool"])
    after = sync(node, mode, table)
    assert after.read_kernel and not after.changed
    assert not sync(node, mode, table).read_kernel
    # Drift is a commit too: seen and repaired by the next verify.
    netns.run(node, ["nft", "flush chain ip kproxy services"])
    repaired = sync(node, mode, table)
    assert repaired.read_kernel and repaired.changed
    assert not sync(node, mode, table).changed


def _swap_arms(ns: str, chain: str) -> str:
    """Replace the chain's inline dispatch out of band with its two arms' verdicts swapped:
    the same expressions, only the anonymous map's elements differ."""
    shown = netns.run(ns, ["nft", "-a", "list", "chain", "ip", "kproxy", chain]).stdout
    line = next(ln.strip() for ln in shown.splitlines() if "numgen" in ln)
    rule, _, handle = line.rpartition(" # handle ")
    arms = rule[rule.index("{ ") + 2 : rule.rindex(" }")].split(", ")
    assert len(arms) == 2, rule
    (k0, v0), (k1, v1) = (a.split(" : ") for a in arms)
    swapped = f"numgen random mod 2 vmap {{ {k0} : {v1}, {k1} : {v0} }}"
    netns.run(ns, ["nft", "replace", "rule", "ip", "kproxy", chain, "handle", handle, swapped])
    return swapped


def test_an_inline_maps_changed_verdict_is_drift_to_a_verify_and_a_repair(node, reference):
    """The kernel rule of an inline dispatch is its expressions and its anonymous map: an
    endpoint swapped behind the same index reads back as a different rule."""
    from kproxy.drift import Change
    from kproxy.nftables import repair

    table = render(config="inline")
    nft_sync(reference, table)
    want = listing(reference, "ip")
    mode = NftablesMode(NetlinkBackend("ip"), inline_dispatch=True)
    sync(node, mode, table)
    assert listing(node, "ip") == want
    chain = "service-R5ZPL7J4-ns/a/tcp/p"
    desired = table.chains[chain].rules[-1]
    swapped = _swap_arms(node, chain)
    assert swapped != desired and swapped in listing(node, "ip")
    got = netns.call_in(node, NetlinkBackend("ip").read, table)
    assert got.chains[chain].rules[-1].startswith("# kernel rule")
    assert got.chains[chain].rules[:-1] == table.chains[chain].rules[:-1]
    outcome = sync(node, mode, table)  # a verify: read over netlink, repaired
    assert outcome.changed
    assert listing(node, "ip") == want
    assert not sync(node, mode, table).changed
    # The same drift seen through its nf_tables events: the rule's chain and its `__mapN`
    # are read and put back by a repair of that chain alone.
    _swap_arms(node, chain)
    changes = [
        Change("delete", "rule", "ip", "kproxy", chain),
        Change("add", "set", "ip", "kproxy", "__map99"),
        Change("add", "rule", "ip", "kproxy", chain),
    ]
    scope = repair.scope_of(changes, "ip", "kproxy")
    assert set(scope.objects) == {("chain", chain)}
    done = netns.call_in(node, mode.repair, scope)
    assert done is not None and ("chain", chain) in done.found
    assert listing(node, "ip") == want
    assert not sync(node, mode, table).changed
