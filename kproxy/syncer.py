"""One sync of one IP family: read the kernel, plan against the desired rules, apply.

Shared by `kproxy sync`, `kproxy diff` and (later) the daemon's reconciler.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from kproxy.backends.iptables import IptablesBackend, IptablesError
from kproxy.plan import Plan, full_table, plan
from kproxy.ruleset import RuleSet, Table, parse_save, table_text

log = logging.getLogger(__name__)

# A --noflush restore on iptables 1.8.9 costs roughly the square of its payload, a plain
# restore the size of the whole table (../shared/MEASURED.md: 43k lines take 5 s with
# --noflush, 0.7 s without). Past this many changed lines, and when the square rule says so,
# a table is replaced whole instead (foreign rules carried over, still one transaction).
FULL_RESTORE_MIN_LINES = 2000
FULL_RESTORE_FACTOR = 1600


@dataclass
class SyncResult:
    plan: Plan
    lines_sent: int = 0
    full_tables: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def read_live(backend: IptablesBackend, tables: list[str]) -> dict[str, Table]:
    live: dict[str, Table] = {}
    for name in tables:
        live.update(parse_save(backend.save(name)))
    return live


def wants_full_restore(changed_lines: int, table_lines: int) -> bool:
    return (
        changed_lines > FULL_RESTORE_MIN_LINES
        and changed_lines * changed_lines > FULL_RESTORE_FACTOR * table_lines
    )


def sync_family(backend: IptablesBackend, desired: RuleSet, dry_run: bool = False) -> SyncResult:
    """Bring the kernel's owned rules of `backend`'s family to `desired`."""
    t0 = time.perf_counter()
    tables = sorted(set(desired.tables) | {j.table for j in desired.jumps})
    live = read_live(backend, tables)
    t1 = time.perf_counter()
    the_plan = plan(desired, live)
    t2 = time.perf_counter()
    result = SyncResult(the_plan, timings={"read": t1 - t0, "plan": t2 - t1})
    if dry_run or the_plan.empty():
        return result

    full: list[str] = []
    for name, change in the_plan.changes.items():
        size = live.get(name, Table(name)).rule_count() + desired.table(name).rule_count()
        if wants_full_restore(change.line_count(), size):
            full.append(name)
    if full:
        payload = "".join(
            table_text(full_table(desired, name, live.get(name, Table(name)))) for name in full
        )
        try:
            backend.restore(payload, noflush=False)
            result.full_tables = full
            result.lines_sent += payload.count("\n")
        except IptablesError as err:
            # The table is unchanged (the restore is atomic); the edit path below still works.
            log.warning("whole-table restore failed, applying the changes instead: %s", err)
            full = []
    rest = Plan({n: c for n, c in the_plan.changes.items() if n not in full})
    payload = rest.restore_text()
    if payload:
        try:
            backend.restore(payload, noflush=True)
        except IptablesError as err:
            if err.detail:
                log.error("iptables-restore input around the failing line:\n%s", err.detail)
            raise
        result.lines_sent += payload.count("\n")
    result.timings["apply"] = time.perf_counter() - t2
    return result
