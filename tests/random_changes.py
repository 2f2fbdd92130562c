"""Random changes through the daemon's partial-sync path, each checked against the kernel.

Run inside a network namespace (tests/test_kernel_partial.py does): applies `--steps` seeded
random changes to Services and EndpointSlices through the reconciler (the code `kproxy run`
uses), and after each one checks that the kernel's rules equal a full render of the current
state. Prints a JSON report.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kproxy.daemon.reconciler import Reconciler  # noqa: E402
from kproxy.families import modes_for  # noqa: E402
from kproxy.iptables.mode import IptablesMode  # noqa: E402
from kproxy.iptables.plan import owned_ruleset, plan  # noqa: E402
from kproxy.iptables.sync import read_live  # noqa: E402
from kproxy.model import NodeConfig  # noqa: E402
from kproxy.nftables.nft import NftBackend  # noqa: E402
from kproxy.nftables.plan import plan_table  # noqa: E402
from kproxy.sources.store import ObjectStore  # noqa: E402
from tests.synthetic import generate  # noqa: E402


def drift(fam, state, config) -> str:
    """The change a full sync would make now ("" when the kernel equals a full render)."""
    desired = fam.render(state, config).desired
    if isinstance(fam, IptablesMode):
        tables = sorted(set(desired.tables) | {j.table for j in desired.jumps})
        return plan(desired, read_live(fam.backend, tables)).restore_text()
    # Read through the nft binary whatever the datapath: nft's view of the table is the
    # reference the netlink datapath is held to.
    return plan_table(desired, NftBackend(fam.backend.family).read()).text()


def record_drift(fam) -> str:
    """How the kernel differs from the mode's record of it (what a drift repair compares
    with), kept through partial syncs ("" when equal)."""
    if fam.record is None:
        return "no record"
    if isinstance(fam, IptablesMode):
        desired = owned_ruleset(fam.record)
        tables = sorted(set(desired.tables) | {j.table for j in desired.jumps})
        return plan(desired, read_live(fam.backend, tables)).restore_text()
    return plan_table(fam.record, NftBackend(fam.backend.family).read()).text()


def mutate(rng: random.Random, objects: dict, step: int) -> tuple[str, str, dict]:
    """One random change: (kind, event, object)."""
    services = [o for o in objects.values() if o["kind"] == "Service"]
    slices = [o for o in objects.values() if o["kind"] == "EndpointSlice"]
    action = rng.choice(
        [
            "ep-add",
            "ep-remove",
            "ep-ready",
            "ep-node",
            "ep-terminating",
            "svc-add",
            "svc-delete",
            "svc-nodeport",
            "svc-etp",
            "svc-affinity",
            "svc-port",
            "slice-delete",
            "svc-itp",
        ]
    )
    if action.startswith("ep-") and slices:
        s = copy.deepcopy(rng.choice(slices))
        eps = s["endpoints"]
        if action == "ep-add" or not eps:
            eps.append(
                {
                    "addresses": [f"10.250.{step % 250}.{rng.randint(1, 250)}"],
                    "conditions": {"ready": True},
                    "nodeName": rng.choice(["node-1", "node-2"]),
                }
            )
        elif action == "ep-remove":
            eps.pop(rng.randrange(len(eps)))
        elif action == "ep-ready":
            e = rng.choice(eps)
            e["conditions"] = {"ready": not e.get("conditions", {}).get("ready", True)}
        elif action == "ep-terminating":
            e = rng.choice(eps)
            e["conditions"] = {"ready": False, "serving": True, "terminating": True}
        else:
            rng.choice(eps)["nodeName"] = rng.choice(["node-1", "node-2"])
        return "EndpointSlice", "MODIFIED", s
    if action == "svc-add" or not services:
        new = generate(1, rng.randint(0, 3), first=1000 + step, mix=True)
        svc, eps = new
        objects[(svc["kind"], svc["metadata"]["name"])] = svc
        objects[(eps["kind"], eps["metadata"]["name"])] = eps
        return "Service", "ADDED", svc  # its slice follows as the next change
    if action == "slice-delete" and slices:
        s = rng.choice(slices)
        del objects[(s["kind"], s["metadata"]["name"])]
        return "EndpointSlice", "DELETED", s
    svc = copy.deepcopy(rng.choice(services))
    spec = svc["spec"]
    if action == "svc-delete":
        del objects[(svc["kind"], svc["metadata"]["name"])]
        return "Service", "DELETED", svc
    if action == "svc-nodeport":
        if spec.get("type") == "NodePort":
            spec["type"] = "ClusterIP"
            spec["ports"][0].pop("nodePort", None)
        else:
            spec["type"] = "NodePort"
            spec["ports"][0]["nodePort"] = 31000 + step
    elif action == "svc-etp" and spec.get("type") == "NodePort":
        spec["externalTrafficPolicy"] = rng.choice(["Local", "Cluster"])
    elif action == "svc-itp":
        spec["internalTrafficPolicy"] = rng.choice(["Local", "Cluster"])
    elif action == "svc-affinity":
        if spec.get("sessionAffinity") == "ClientIP":
            spec["sessionAffinity"] = "None"
            spec.pop("sessionAffinityConfig", None)
        else:
            spec["sessionAffinity"] = "ClientIP"
            spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": rng.choice([60, 600])}}
    elif action == "svc-port":
        spec["ports"][0]["port"] = rng.choice([80, 81, 8443])
    return "Service", "MODIFIED", svc


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="iptables")
    p.add_argument("--nft-datapath", default="netlink", choices=("netlink", "nft"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--inline-dispatch", action="store_true", help="nftables: upstream's inline dispatch"
    )
    args = p.parse_args()
    rng = random.Random(args.seed)
    objects = {(o["kind"], o["metadata"]["name"]): o for o in generate(25, 3, mix=True)}
    store = ObjectStore("node-1")
    for kind in ("Service", "EndpointSlice"):
        store.resync(kind, [o for o in objects.values() if o["kind"] == kind])
    config = NodeConfig(node_name="node-1", cluster_cidrs=("10.244.0.0/16",))
    families = modes_for(args.mode, nft_datapath=args.nft_datapath)
    for fam in families:
        if args.inline_dispatch:
            fam.inline_dispatch = True  # NftablesMode's; set before its first render
    rec = Reconciler(store, config, families)
    assert rec.sync("start").ok
    report = {
        "mode": args.mode,
        "datapath": args.nft_datapath,
        "steps": 0,
        "partial": 0,
        "lines": 0,
        "failure": None,
    }
    pending_slice = None
    for step in range(args.steps):
        if pending_slice is not None:
            kind, event, obj = "EndpointSlice", "ADDED", pending_slice
            pending_slice = None
        else:
            kind, event, obj = mutate(rng, objects, step)
            if kind == "Service" and event == "ADDED":
                name = obj["metadata"]["name"]
                pending_slice = objects[("EndpointSlice", f"{name}-x")]
        if event != "DELETED":
            objects[(kind, obj["metadata"]["name"])] = obj
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(step + 10)
        store.apply(kind, event, obj)
        result = rec.sync(None)
        if not result.ok:
            report["failure"] = f"step {step}: sync failed ({kind} {event})"
            break
        report["steps"] = step + 1
        state = result.state
        for fam in families:
            if fam.last is not None and fam.applied is None:
                report["partial"] += 1
            left = drift(fam, state, config)
            if not left and (off := record_drift(fam)):
                left = f"(the record of the kernel, not the kernel, is wrong)\n{off}"
            if left:
                report["failure"] = (
                    f"step {step} ({kind} {event} {obj['metadata']['name']}), "
                    f"{fam.name}: the kernel differs from a full render:\n" + left[:3000]
                )
                break
        if report["failure"]:
            break
    print(json.dumps(report))


if __name__ == "__main__":
    main()
