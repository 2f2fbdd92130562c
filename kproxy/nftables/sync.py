"""nftables mode's sync of one IP family: read the kproxy table (or take the record of the
last apply), plan against the desired table, apply it as one transaction (one netlink batch,
or one `nft -f`, by the backend's datapath)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kproxy.nftables.nft import NftBackend
from kproxy.nftables.plan import NftPlan, plan_table
from kproxy.nftables.table import NftTable


@dataclass
class NftSyncResult:
    plan: NftPlan
    read_kernel: bool = True
    lines_sent: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def sync_nft(
    backend: NftBackend,
    desired: NftTable,
    dry_run: bool = False,
    assumed: NftTable | None = None,
    known: bool = False,
) -> NftSyncResult:
    """Bring the kernel's kproxy table of `backend`'s family to `desired` in one transaction.

    With `known` set, `assumed` (None: no table) is taken as what the kernel holds and is not
    read; otherwise the kernel's table is listed first.
    """
    t0 = time.perf_counter()
    live = assumed if known else backend.read(desired)
    t1 = time.perf_counter()
    the_plan = plan_table(desired, live, backend.table)
    t2 = time.perf_counter()
    result = NftSyncResult(
        the_plan, read_kernel=not known, timings={"read": t1 - t0, "plan": t2 - t1}
    )
    if dry_run or the_plan.empty():
        return result
    backend.apply_plan(the_plan, desired)
    result.lines_sent = the_plan.size()
    result.timings["apply"] = time.perf_counter() - t2
    return result


def describe_nft(result: NftSyncResult) -> str:
    t = result.timings
    return (
        f"{result.lines_sent} lines sent, {result.plan.summary()}; read {t.get('read', 0):.3f}s "
        f"plan {t.get('plan', 0):.3f}s apply {t.get('apply', 0):.3f}s"
    )
