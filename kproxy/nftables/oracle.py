"""The nft binary as the reference for every netlink transaction: a check the test suite turns
on (KPROXY_NFT_ORACLE_NETNS=<namespace>), never a production path.

For each transaction the netlink datapath commits, the same starting table is loaded into the
oracle's namespace and the same plan is applied there as `nft -f` text; then `nft list table`
must print the two tables identically. So nft's own parser and printer check the encoder on
whatever the tests make, with the starting table copied each time (a test that edits the
table behind kproxy's back does not throw the two out of step).
"""

from __future__ import annotations

import difflib
import os
import subprocess

from kproxy.errors import ApplyError
from kproxy.nftables.plan import NftPlan
from kproxy.nftables.table import TABLE

ENV = "KPROXY_NFT_ORACLE_NETNS"
LOG_ENV = "KPROXY_NFT_ORACLE_LOG"  # where mismatches are also written (a daemon goes on)


class OracleMismatch(ApplyError):
    """nft and the netlink datapath left different tables."""


def namespace() -> str | None:
    return os.environ.get(ENV) or None


def listing(family: str, netns: str | None = None, table: str = TABLE) -> str:
    """`nft list table` of kproxy's table ("" when there is none), in `netns` or here."""
    argv = ["nft", "list", "table", family, table]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = subprocess.run(argv, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else ""


def comparable(text: str) -> str:
    """A listing without what the kernel alone decides: the elements of dynamic sets (session
    affinity entries and their expiry times)."""
    out: list[str] = []
    dynamic = skipping = False
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith(("set ", "map ", "chain ")) and stripped.endswith("{"):
            dynamic = skipping = False
        elif stripped.startswith("flags ") and "dynamic" in stripped:
            dynamic = True
        elif dynamic and stripped.startswith("elements = {"):
            skipping = True
        if skipping:
            if stripped.endswith("}"):
                skipping = False
            continue
        out.append(line)
    return "".join(out)


def check(family: str, before: str, plan: NftPlan) -> None:
    """After the netlink datapath applied `plan` to a table that listed as `before`: apply the
    same to `before` with nft in the oracle's namespace and compare the listings."""
    netns = namespace()
    if not netns:
        return
    table = plan.table
    reset = f"add table {family} {table}\ndelete table {family} {table}\n"
    load = reset + comparable(before) + plan.text()
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-f", "-"], input=load, capture_output=True, text=True
    )
    if proc.returncode != 0:
        _fail(f"oracle: nft refused the transaction: {proc.stderr.strip()[:2000]}")
    mine, theirs = (
        comparable(listing(family, table=table)),
        comparable(listing(family, netns, table)),
    )
    if mine != theirs:
        diff = "".join(
            difflib.unified_diff(
                theirs.splitlines(True), mine.splitlines(True), "nft -f", "netlink", n=1
            )
        )
        _fail(
            f"oracle: the netlink datapath's table differs from nft's:\n{diff}\n"
            f"the transaction:\n{plan.text()[:3000]}"
        )


def _fail(message: str) -> None:
    log_path = os.environ.get(LOG_ENV)
    if log_path:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(message + "\n")
    raise OracleMismatch(message)
