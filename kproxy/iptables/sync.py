"""iptables mode's sync of one IP family: read the kernel, plan against the desired rules,
apply with iptables-restore — as edits (--noflush), as whole tables (foreign rules carried
over, other tools' changes meanwhile put back), or as a partial sync's fragments.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from kproxy import tools
from kproxy.iptables.foreign_watch import ForeignWatch, Transaction, net_effect, repair_lines
from kproxy.iptables.plan import Plan, full_table, plan, plan_fragments
from kproxy.iptables.restore import IptablesBackend, IptablesError
from kproxy.iptables.rules import Fragments, RuleSet, Table, parse_save, table_chunks

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
    read_kernel: bool = True  # planned against the kernel's tables (not an assumed record)
    lines_sent: int = 0
    full_tables: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # What was sent, in order: (with --noflush, iptables-restore input); whole tables only with
    # tools.RECORD_PAYLOADS. For benchmarks.
    sent: list[tuple[bool, str]] = field(default_factory=list)


def describe(result: SyncResult) -> str:
    """One line for the log: what was sent and what changed."""
    changed = {t: c.summary for t, c in result.plan.changes.items() if c.summary}
    how = f"whole {'+'.join(result.full_tables)} restored, " if result.full_tables else ""
    what = ", ".join(f"{t}: {len(s)} chain(s) changed" for t, s in changed.items())
    t = result.timings
    return (
        f"{result.lines_sent} lines sent, {how}{what or 'no change'}; read {t.get('read', 0):.3f}s "
        f"plan {t.get('plan', 0):.3f}s apply {t.get('apply', 0):.3f}s"
    )


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


def sync_family(
    backend: IptablesBackend,
    desired: RuleSet,
    dry_run: bool = False,
    assumed: dict[str, Table] | None = None,
) -> SyncResult:
    """Bring the kernel's owned rules of `backend`'s family to `desired`.

    `assumed` is what the caller believes the kernel holds (the daemon's record of its last
    apply): planning against it skips reading the kernel, which costs seconds at 10k Services.
    Without it, or when the change is big enough for a whole-table restore (which must carry
    the foreign rules, so needs the kernel's real tables), the kernel is read.

    `desired` is always the whole rule set: planned against the kernel, whatever it lacks is
    deleted. A partial sync's fragments go through sync_fragments instead.
    """
    if not isinstance(desired, RuleSet):
        raise TypeError(f"sync_family needs the whole RuleSet, not {type(desired).__name__}")
    watch = _Window(backend, dry_run)
    try:
        return _sync_family(backend, desired, dry_run, assumed, watch)
    finally:
        watch.close()


class _Window:
    """Reads the kernel for a sync and watches, from that read on, what other tools change
    until a whole-table restore has replaced the tables (foreign_watch)."""

    def __init__(self, backend: IptablesBackend, dry_run: bool) -> None:
        self.backend, self.dry_run = backend, dry_run
        self.watch: ForeignWatch | None = None
        self.read_s = 0.0

    def read(self, tables: list[str]) -> dict[str, Table]:
        started = time.perf_counter()
        if not self.dry_run and self.watch is None:
            self.watch = start_foreign_watch(self.backend)  # the window opens with the read
        live = read_live(self.backend, tables)
        self.read_s += time.perf_counter() - started
        return live

    def put_back(self, tables: list[str]) -> int:
        """After a whole-table restore of `tables`: apply again what other tools changed in
        them since the read and the restore undid; the number of lines sent."""
        if self.watch is None:
            return 0
        transactions, self.watch = self.watch.stop(), None
        return put_back_foreign(self.backend, transactions, tables)

    def close(self) -> None:
        if self.watch is not None:
            self.watch.stop(wait=0)
            self.watch = None


def _sync_family(
    backend: IptablesBackend,
    desired: RuleSet,
    dry_run: bool,
    assumed: dict[str, Table] | None,
    window: _Window,
) -> SyncResult:
    t0 = time.perf_counter()
    tables = sorted(set(desired.tables) | {j.table for j in desired.jumps})
    live = assumed if assumed is not None else window.read(tables)
    the_plan = plan(desired, live)
    if assumed is not None and any(
        wants_full_restore(c.line_count(), _size(live, desired, n))
        for n, c in the_plan.changes.items()
    ):
        live = window.read(tables)
        the_plan = plan(desired, live)
        assumed = None
    t2 = time.perf_counter()
    result = SyncResult(
        the_plan,
        read_kernel=assumed is None,
        timings={"read": window.read_s, "plan": t2 - t0 - window.read_s},
    )
    if dry_run or the_plan.empty():
        return result

    full: list[str] = []
    if assumed is None:
        full = [
            n
            for n, c in the_plan.changes.items()
            if wants_full_restore(c.line_count(), _size(live, desired, n))
        ]
    if full:
        recorded: list[str] = []

        def pieces(names: list[str] = full) -> Iterator[str]:
            recorded.clear()
            for name in names:
                for piece in table_chunks(full_table(desired, name, live.get(name, Table(name)))):
                    if tools.RECORD_PAYLOADS:
                        recorded.append(piece)
                    yield piece

        try:
            result.lines_sent += backend.restore(pieces, noflush=False)
            if tools.RECORD_PAYLOADS:
                result.sent.append((False, "".join(recorded)))
            result.full_tables = full
        except IptablesError as err:
            # The table is unchanged (the restore is atomic); the edit path below still works.
            log.warning("whole-table restore failed, applying the changes instead: %s", err)
            full = []
        else:
            result.lines_sent += window.put_back(full)
    rest = Plan({n: c for n, c in the_plan.changes.items() if n not in full})
    result.lines_sent += _restore_edits(backend, rest, result)
    result.timings["apply"] = time.perf_counter() - t2
    return result


def start_foreign_watch(backend: IptablesBackend) -> ForeignWatch | None:
    """A watch of other tools' changes, where the backend has events (nf_tables)."""
    if backend.variant != "nft" or not ForeignWatch.available():
        return None
    watch = ForeignWatch(backend.family)
    return watch if watch.start() else None


def put_back_foreign(
    backend: IptablesBackend, transactions: list[Transaction], tables: list[str]
) -> int:
    """Apply again, with one --noflush restore, what other tools' `transactions` changed in
    `tables` and the kernel no longer holds; the number of lines sent."""
    eff = net_effect(transactions, set(tables))
    if eff.empty():
        return 0
    parts = []
    for table in tables:
        chains = {c for t, c in eff.chains if t == table}
        chains |= {c for t, c in eff.policies if t == table}
        chains |= {c for t, c, _ in eff.rules if t == table}
        now = {chain: backend.chain_listing(table, chain) for chain in sorted(chains)}
        lines = repair_lines(eff, table, now)
        if lines:
            parts.append(f"*{table}\n" + "".join(f"{ln}\n" for ln in lines) + "COMMIT\n")
    if not parts:
        return 0
    payload = "".join(parts)
    try:
        backend.restore(payload, noflush=True)
    except IptablesError as err:
        log.error("could not put back other tools' changes made during the restore: %s", err)
        return 0
    log.warning(
        "put back %d change(s) that %s made while the whole table was restored",
        payload.count("\n") - 2 * len(parts),
        ", ".join(sorted(eff.who)),
    )
    return payload.count("\n")


def sync_fragments(
    backend: IptablesBackend,
    old: Fragments,
    new: Fragments,
    table_rules: dict[str, int],
    dry_run: bool = False,
) -> SyncResult | None:
    """Apply the change from some Services' old rules to their new ones with --noflush, the
    kernel not read: `old` is what the kernel holds of them (the last apply). Nothing outside
    the two sets is named, so nothing else can be lost.

    None, with nothing applied, when the change is too large for --noflush on a table of
    `table_rules` rules (quadratic on iptables 1.8.9): the caller then syncs the whole rule
    set, which may restore whole tables (a node drain changing hundreds of Services).
    """
    t0 = time.perf_counter()
    the_plan = plan_fragments(old, new)
    if any(
        wants_full_restore(c.line_count(), table_rules.get(n, 0))
        for n, c in the_plan.changes.items()
    ):
        return None
    t1 = time.perf_counter()
    result = SyncResult(the_plan, read_kernel=False, timings={"read": 0.0, "plan": t1 - t0})
    if not dry_run and not the_plan.empty():
        result.lines_sent = _restore_edits(backend, the_plan, result)
    result.timings["apply"] = time.perf_counter() - t1
    return result


def _restore_edits(backend: IptablesBackend, the_plan: Plan, result: SyncResult) -> int:
    """Send `the_plan` as one --noflush restore (atomic per table); the lines sent."""
    payload = the_plan.restore_text()
    if not payload:
        return 0
    try:
        backend.restore(payload, noflush=True)
    except IptablesError as err:
        if err.detail:
            log.error("iptables-restore input around the failing line:\n%s", err.detail)
        raise
    result.sent.append((True, payload))
    return payload.count("\n")


def _size(live: dict[str, Table], desired: RuleSet, name: str) -> int:
    return live.get(name, Table(name)).rule_count() + desired.table(name).rule_count()


def applied_tables(desired: RuleSet) -> dict[str, Table]:
    """What the kernel holds of kproxy's rules after `desired` was applied: the owned chains
    and the built-in chains with exactly kproxy's jumps (foreign rules are never planned on)."""
    out = {}
    for name in sorted(set(desired.tables) | {j.table for j in desired.jumps}):
        jumps: dict[str, list[str]] = {}
        for j in desired.jumps:
            if j.table == name:
                jumps.setdefault(j.chain, []).append(j.rule)
        # The rule lists are shared with `desired`, not copied (nobody changes them later):
        # at 10k Services a copy costs half a second per full sync.
        chains = {**jumps, **desired.tables.get(name, Table(name)).chains}
        out[name] = Table(name, chains)
    return out
