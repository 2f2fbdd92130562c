#!/usr/bin/env python3
"""Run kproxy's chaos scenarios (tests/chaos/scenarios.py) and print their figures.

Needs root: every scenario builds its own network namespaces (a node, pods, a client), runs
`kproxy run` in them against the test API server with traffic flowing, and deletes all of it
afterwards. Nothing touches the machine's own network namespace or its /run/xtables.lock.

    scripts/chaos/run.py                       # every scenario, long versions (~31 min)
    scripts/chaos/run.py kill9 drift --short   # some, in the short versions `make test` runs
    scripts/chaos/run.py --json out.json       # also write the figures as JSON

Exit status 1 when a scenario broke a promise (its `problems` are printed).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tests.chaos import badinput, scenarios  # noqa: E402

SCENARIOS = {
    "kill9": lambda a: scenarios.kill9(a.mode, kills=a.kills, short=a.short),
    "kill9_nft_apply": lambda a: scenarios.kill9_nft_apply(
        kills=a.nft_kills, services=a.nft_services, short=a.short, datapath="nft"
    ),
    "kill9_netlink_apply": lambda a: scenarios.kill9_nft_apply(
        kills=a.nft_kills, services=a.nft_services, short=a.short, datapath="netlink"
    ),
    "drift": lambda a: scenarios.drift(a.mode, rounds=3, short=a.short),
    "foreign_change": lambda a: scenarios.foreign_change(a.mode, short=a.short),
    "api_outage": lambda a: scenarios.api_outage(a.mode, outage=a.outage, short=a.short),
    "xtables_lock": lambda a: scenarios.xtables_lock(hold=a.lock_hold, short=a.short),
    "gone_storm": lambda a: scenarios.gone_storm(a.mode, duration=a.storm, short=a.short),
    "churn": lambda a: scenarios.churn(
        a.mode, services=a.services, duration=a.churn, short=a.short
    ),
    "bad_input": lambda a: badinput.bad_input(a.mode, short=a.short),
    "full_disk": lambda a: scenarios.full_disk(short=a.short),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"scenarios (default all): {', '.join(SCENARIOS)}")
    p.add_argument("--short", action="store_true", help="the short versions (as make test)")
    p.add_argument("--mode", default="iptables", choices=["iptables", "nftables"])
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--outage", type=float, default=180.0, help="API outage seconds")
    p.add_argument("--lock-hold", type=float, default=60.0, help="xtables lock held seconds")
    p.add_argument("--storm", type=float, default=180.0, help="410 storm seconds")
    p.add_argument("--churn", type=float, default=300.0, help="churn seconds")
    p.add_argument("--services", type=int, default=1000, help="Services during the churn")
    p.add_argument("--nft-kills", type=int, default=20, help="kills of kill9_nft_apply")
    p.add_argument(
        "--nft-services",
        type=int,
        default=2000,
        help="Services (x 10 endpoints) whose transactions kill9_nft_apply interrupts",
    )
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    names = args.names or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(unknown)}")
    results = []
    failed = False
    for name in names:
        t0 = time.monotonic()
        print(f"=== {name} ({args.mode}{', short' if args.short else ''})", flush=True)
        try:
            result = SCENARIOS[name](args)
        except Exception as exc:  # report and go on with the next scenario
            result = {"scenario": name, "problems": [f"crashed: {exc!r}"]}
        result["wall_s"] = round(time.monotonic() - t0, 1)
        results.append(result)
        print(json.dumps(result, indent=1, default=str), flush=True)
        failed |= bool(result.get("problems"))
    if args.json:
        doc = {
            "machine": {"cpus": __import__("os").cpu_count(), "kernel": platform.release()},
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "results": results,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
