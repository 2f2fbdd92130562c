"""Plan: minimal, owned-only changes; render -> save text -> parse round trip."""

import copy
import re

from kproxy.iptables.plan import full_table, plan
from kproxy.iptables.render import hash16, render
from kproxy.iptables.rules import (
    RuleSet,
    Table,
    is_managed_chain,
    parse_save,
    rule_target,
    table_text,
)
from kproxy.iptables.sync import wants_full_restore
from kproxy.model import NodeConfig, build_state

CONFIG = NodeConfig(node_name="node-1", cluster_cidrs=("10.244.0.0/16",), localhost_nodeports=False)

FOREIGN_NAT = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
:KUBE-MARK-DROP - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
-A KUBE-MARK-DROP -j MARK --set-xmark 0x8000/0x8000
COMMIT
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:ADMIN - [0:0]
-A INPUT -s 192.0.2.1/32 -j ADMIN
-A ADMIN -j ACCEPT
COMMIT
"""


def service(name, ip, ports=(("http", 80, "TCP", 0),)):
    return {
        "kind": "Service",
        "metadata": {"namespace": "default", "name": name},
        "spec": {
            "type": "NodePort" if any(p[3] for p in ports) else "ClusterIP",
            "clusterIP": ip,
            "ports": [
                {"name": n, "port": p, "protocol": proto, **({"nodePort": np} if np else {})}
                for n, p, proto, np in ports
            ],
        },
    }


def endpoints(name, ips, ports=(("http", 8080, "TCP"),)):
    return {
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "default",
            "name": f"{name}-abc",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
        "endpoints": [{"addresses": [ip]} for ip in ips],
    }


def cluster(b_ips=("10.244.2.1", "10.244.2.2"), with_c=True):
    objs = [
        service("alpha", "10.96.0.1", (("http", 80, "TCP", 30001),)),
        endpoints("alpha", ["10.244.1.1", "10.244.1.2"]),
        service("bravo", "10.96.0.2", (("http", 80, "TCP", 30002), ("dns", 53, "UDP", 0))),
        endpoints("bravo", b_ips, (("http", 8080, "TCP"), ("dns", 5353, "UDP"))),
    ]
    if with_c:
        objs += [service("charlie", "10.96.0.3"), endpoints("charlie", ["10.244.3.1"])]
    state, warnings = build_state(objs)
    assert warnings == []
    return render(state, CONFIG).ruleset


def apply_to_live(desired: RuleSet, live: dict[str, Table]) -> dict[str, Table]:
    """What the kernel holds after a sync: the full table, printed and parsed back."""
    out = {}
    for name in set(desired.tables) | set(live):
        table = full_table(desired, name, live.get(name, Table(name)))
        out.update(parse_save(table_text(table)))
    return out


def simulate(lines_by_table: dict[str, list[str]], live: dict[str, Table]) -> dict[str, Table]:
    """Execute a --noflush payload against parsed tables, as iptables-restore would."""
    live = copy.deepcopy(live)
    for name, lines in lines_by_table.items():
        t = live.setdefault(name, Table(name))
        for line in lines:
            if line.startswith(":"):
                t.chains[line[1:].split()[0]] = []
            elif line.startswith("-A "):
                _, chain, rule = line.split(" ", 2)
                t.chains.setdefault(chain, []).append(rule)
            elif line.startswith("-I "):
                _, chain, pos, rule = line.split(" ", 3)
                t.chains.setdefault(chain, []).insert(int(pos) - 1, rule)
            elif line.startswith("-D "):
                _, chain, rule = line.split(" ", 2)
                t.chains[chain].remove(rule)
            elif line.startswith("-X "):
                chain = line.split()[1]
                assert not t.chains[chain], f"-X of non-empty {chain}"
                for rules in t.chains.values():
                    assert all(rule_target(r) != chain for r in rules), f"{chain} referenced"
                del t.chains[chain]
    return live


def lines_of(p):
    return {name: c.lines() for name, c in p.changes.items()}


def test_render_save_parse_round_trip():
    desired = cluster()
    for name, table in desired.tables.items():
        parsed = parse_save(table_text(table))[name]
        assert parsed.chains == table.chains


def test_plan_from_empty_then_nothing_to_do():
    desired = cluster()
    p = plan(desired, {})
    assert not p.empty()
    live = simulate(lines_of(p), {})
    assert plan(desired, live).empty()
    # Same through the whole-table path.
    assert plan(desired, apply_to_live(desired, {})).empty()


def test_foreign_rules_survive_and_are_never_named():
    live = parse_save(FOREIGN_NAT)
    desired = cluster()
    p = plan(desired, live)
    for name, change in p.changes.items():
        for line in change.lines():
            chain = line.split()[1] if not line.startswith(":") else line[1:].split()[0]
            if line.startswith(("-D", "-I")) and chain in (
                "INPUT",
                "FORWARD",
                "OUTPUT",
                "PREROUTING",
                "POSTROUTING",
            ):
                assert is_managed_chain(name, rule_target(line) or ""), line
            else:
                assert is_managed_chain(name, chain), line
    after = simulate(lines_of(p), live)
    for name, table in parse_save(FOREIGN_NAT).items():
        for chain, rules in table.chains.items():
            for rule in rules:
                assert rule in after[name].chains[chain], (name, chain, rule)
    # The whole-table path keeps them too, policies included.
    whole = apply_to_live(desired, parse_save(FOREIGN_NAT))
    assert whole["filter"].policies["INPUT"] == "DROP"
    assert whole["nat"].chains["DOCKER"] == ["-i docker0 -j RETURN"]
    assert whole["nat"].chains["KUBE-MARK-DROP"] == ["-j MARK --set-xmark 0x8000/0x8000"]
    assert "-s 192.0.2.1/32 -j ADMIN" in whole["filter"].chains["INPUT"]
    assert plan(desired, whole).empty()


def test_endpoint_change_touches_only_that_service():
    before = cluster()
    live = simulate(lines_of(plan(before, {})), {})
    after = cluster(b_ips=("10.244.2.1", "10.244.2.3"))  # 10.244.2.2 replaced by .3
    p = plan(after, live)
    text = p.restore_text()
    bravo_http = hash16("default/bravo:httptcp")
    bravo_dns = hash16("default/bravo:dnsudp")
    # Nothing about alpha or charlie, and no shared chain rewritten.
    assert "alpha" not in text and "charlie" not in text
    assert ":KUBE-SERVICES" not in text and ":KUBE-NODEPORTS" not in text
    touched = set(re.findall(r"KUBE-(?:SVC|SEP|EXT)-[A-Z2-7]{16}", text))
    bravo_seps = {c for c in touched if c.startswith("KUBE-SEP-")}
    assert touched - bravo_seps == {f"KUBE-SVC-{bravo_http}", f"KUBE-SVC-{bravo_dns}"}
    # Two new SEP chains (http + dns for .3) and two stale ones removed.
    assert len([c for c in p.changes["nat"].declare if c.startswith("KUBE-SEP-")]) == 4
    assert len([c for c in p.changes["nat"].delete_chains]) == 2
    # Small: 2 SVC rewrites of 3 rules, 2 new SEPs of 2 rules, 2 flush+delete.
    assert p.line_count() <= 20
    assert plan(after, simulate(lines_of(p), live)).empty()


def test_new_and_removed_service_edit_shared_chains_rule_by_rule():
    live = simulate(lines_of(plan(cluster(with_c=False), {})), {})
    p = plan(cluster(with_c=True), live)
    nat = p.changes["nat"]
    assert "KUBE-SERVICES" not in nat.declare
    shared = [ln for ln in nat.lines() if " KUBE-SERVICES " in ln]
    assert len(shared) == 1 and shared[0].startswith("-I KUBE-SERVICES 1 ")
    assert "charlie" in shared[0]
    live2 = simulate(lines_of(p), live)
    # The KUBE-NODEPORTS jump is still the last rule.
    assert "KUBE-NODEPORTS" in live2["nat"].chains["KUBE-SERVICES"][-1]
    # And removing it again deletes exactly that rule and its chains.
    p2 = plan(cluster(with_c=False), live2)
    assert [ln for ln in p2.changes["nat"].lines() if " KUBE-SERVICES " in ln] == [
        shared[0].replace("-I KUBE-SERVICES 1 ", "-D KUBE-SERVICES ")
    ]
    assert len(p2.changes["nat"].delete_chains) == 2  # SVC + SEP of charlie
    assert plan(cluster(with_c=False), simulate(lines_of(p2), live2)).empty()


def test_misplaced_tail_rewrites_the_shared_chain():
    desired = cluster()
    live = simulate(lines_of(plan(desired, {})), {})
    rules = live["nat"].chains["KUBE-SERVICES"]
    rules.insert(0, rules.pop())  # the KUBE-NODEPORTS jump is no longer last
    p = plan(desired, live)
    assert "KUBE-SERVICES" in p.changes["nat"].declare
    assert plan(desired, simulate(lines_of(p), live)).empty()


def test_rule_added_to_owned_chain_by_someone_else_is_removed():
    desired = cluster()
    live = simulate(lines_of(plan(desired, {})), {})
    live["nat"].chains["KUBE-SERVICES"].insert(0, "-d 10.9.9.9/32 -j ACCEPT")
    svc_chain = next(c for c in live["nat"].chains if c.startswith("KUBE-SVC-"))
    live["nat"].chains[svc_chain].append("-j ACCEPT")
    p = plan(desired, live)
    nat = p.changes["nat"].lines()
    assert "-D KUBE-SERVICES -d 10.9.9.9/32 -j ACCEPT" in nat
    assert svc_chain in p.changes["nat"].declare
    assert plan(desired, simulate(lines_of(p), live)).empty()


def test_jumps_inserted_once_duplicates_and_stale_ones_removed():
    desired = cluster()
    live = simulate(lines_of(plan(desired, {})), parse_save(FOREIGN_NAT))
    jump = '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'
    live["nat"].chains["PREROUTING"].append(jump)  # duplicate
    live["nat"].chains["OUTPUT"].append("-j KUBE-SERVICES")  # an old variant
    p = plan(desired, live)
    lines = p.changes["nat"].lines()
    assert f"-D PREROUTING {jump}" in lines
    assert "-D OUTPUT -j KUBE-SERVICES" in lines
    after = simulate(lines_of(p), live)
    assert after["nat"].chains["PREROUTING"].count(jump) == 1
    assert plan(desired, after).empty()


def test_stale_owned_chains_go_but_kubelet_chains_stay():
    desired = cluster()
    live = simulate(lines_of(plan(desired, {})), parse_save(FOREIGN_NAT))
    live["nat"].chains["KUBE-SEP-OLDOLDOLDOLDOLDO"] = ["-j RETURN"]
    live["nat"].chains["KUBE-KUBELET-CANARY"] = []
    live["filter"].chains["KUBE-FIREWALL"] = ["-j DROP"]  # the kubelet's copy
    p = plan(desired, live)
    assert "KUBE-FIREWALL" not in p.changes["filter"].delete_chains
    assert p.changes["nat"].delete_chains == ["KUBE-SEP-OLDOLDOLDOLDOLDO"]
    assert "KUBE-MARK-DROP" not in p.restore_text()


def test_whole_table_restore_chosen_only_for_large_changes():
    assert not wants_full_restore(10, 400_000)
    assert not wants_full_restore(1_900, 1_900)
    assert wants_full_restore(43_000, 43_000)  # a sync from empty
    assert not wants_full_restore(5_000, 430_000)  # a big change in a huge table: edit it


def _delta_fragments(before_ips, after_ips):
    """The fragments a partial sync plans when bravo's endpoints go from before to after."""
    from kproxy.iptables.render import IPV4, fragments_of, render_delta
    from kproxy.rendercache import RenderCache

    def state(b_ips):
        objs = [
            service("alpha", "10.96.0.1", (("http", 80, "TCP", 30001),)),
            endpoints("alpha", ["10.244.1.1"]),
            service("bravo", "10.96.0.2", (("http", 80, "TCP", 30002),)),
            endpoints("bravo", b_ips),
        ]
        return build_state(objs)[0]

    cache = RenderCache()
    prev = render(state(before_ips), CONFIG, IPV4, cache=cache)
    delta = render_delta(state(after_ips), CONFIG, {("default", "bravo")}, prev, cache)
    assert delta is not None
    old = fragments_of([o for o, _ in delta.pairs])
    new = fragments_of([n for _, n in delta.pairs])
    return prev.ruleset, old, new


def test_fragments_are_never_planned_as_a_whole_table():
    """Issue 13.1: the fragments of the changed Services planned against the kernel's whole
    table delete everything else; the types keep them apart, at run time too."""
    import pytest

    from kproxy.iptables.restore import IptablesBackend
    from kproxy.iptables.sync import sync_family

    whole, _old, new = _delta_fragments(["10.244.2.1"], ["10.244.2.9"])
    live = simulate(lines_of(plan(whole, {})), {})
    with pytest.raises(TypeError):
        plan(new, live)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        full_table(new, "nat", live["nat"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sync_family(IptablesBackend(), new, dry_run=True)  # type: ignore[arg-type]


def test_fragment_plan_names_only_the_changed_services():
    from kproxy.iptables.plan import plan_fragments

    whole, old, new = _delta_fragments(["10.244.2.1", "10.244.2.2"], ["10.244.2.9"])
    live = simulate(lines_of(plan(whole, {})), {})
    p = plan_fragments(old, new)
    text = p.restore_text()
    assert "alpha" not in text and "10.244.1.1" not in text
    # No built-in chain and no jump is named, and only bravo's SEP chains are deleted.
    assert not any(
        line.split()[1] in ("PREROUTING", "OUTPUT", "FORWARD", "INPUT")
        for line in text.splitlines()
        if line.startswith(("-D", "-I", "-A"))
    )
    assert all("bravo" in " ".join(live["nat"].chains[c]) for c in p.changes["nat"].delete_chains)
    after = simulate(lines_of(p), live)
    # Applied to the kernel's whole table, the result is the whole render of the new state.
    whole_after, _, _ = _delta_fragments(["10.244.2.9"], ["10.244.2.9"])
    assert plan(whole_after, after).empty()
