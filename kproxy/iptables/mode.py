"""iptables mode behind the Mode interface (kproxy.mode), one object per IP family: render in
kube-proxy's chain layout, plan, apply with iptables-restore; canaries and sentinel jumps to
notice a flush."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kproxy.drift import Change, DriftScope, Repair
from kproxy.iptables import repair
from kproxy.iptables.plan import owned_ruleset, record_after
from kproxy.iptables.render import IPV4, IPV6, fragments_of, render, render_delta
from kproxy.iptables.restore import IptablesBackend
from kproxy.iptables.rules import OWNED_TABLES, Jump, RuleSet, Table, is_owned_chain
from kproxy.iptables.sync import (
    SyncResult,
    applied_tables,
    describe,
    read_live,
    sync_family,
    sync_fragments,
)
from kproxy.mode import Mode, Outcome, Rendered
from kproxy.model import ClusterState, NodeConfig
from kproxy.ports import Delta
from kproxy.rendercache import RenderCache

CANARY = "KUBE-PROXY-CANARY"
CANARY_TABLES = ("mangle", "nat", "filter")


class IptablesMode(Mode):
    mode = "iptables"
    tables = OWNED_TABLES

    def __init__(self, backend: IptablesBackend, dry_run: bool = False) -> None:
        self.backend = backend
        self.dry_run = dry_run
        self.family = IPV4 if backend.family == 4 else IPV6
        self.name = f"IPv{backend.family}"
        self.cache = RenderCache()
        self.applied: dict[str, Table] | None = None
        self.last: Any = None  # the render result last applied, for render_delta
        self.rules: dict[str, int] = {}
        # One jump per table from the last full apply, checked with the canaries.
        self.sentinels: list[Jump] = []
        # What the kernel holds of kproxy's rules, kept through partial syncs too (`applied`
        # is not): a drift repair compares single chains with it (None: not known).
        self.record: dict[str, Table] | None = None

    @property
    def label(self) -> str:
        return f"iptables-{self.backend.variant}"

    def render(self, state: ClusterState, config: NodeConfig) -> Rendered:
        r = render(state, config, self.family, cache=self.cache)
        self.rules = {name: t.rule_count() for name, t in r.ruleset.tables.items()}
        self._candidate = r
        return Rendered(r.ruleset, r.warnings, r.no_local_endpoints, dict(self.rules))

    def render_delta(
        self, state: ClusterState, config: NodeConfig, changed: set[tuple[str, str]]
    ) -> Delta | None:
        return render_delta(state, config, changed, self.last, self.cache)

    def sync_delta(self, delta: Delta) -> tuple[Outcome, Rendered] | None:
        old = fragments_of([o for o, _ in delta.pairs])
        new = fragments_of([n for _, n in delta.pairs])
        result = sync_fragments(self.backend, old, new, self.rules, dry_run=self.dry_run)
        if result is None:
            return None  # nothing was applied
        self.applied = None  # the full record is stale; a full sync reads the kernel
        if self.record is not None and not self.dry_run:
            record_after(self.record, result.plan)
        for f, sign in [(o, -1) for o, _ in delta.pairs] + [(n, 1) for _, n in delta.pairs]:
            for (table, _chain), rules in f.chains.items() if f else ():
                self.rules[table] = self.rules.get(table, 0) + sign * len(rules)
        return _outcome(result), Rendered(
            new, delta.result.warnings, dict(delta.result.no_local_endpoints), dict(self.rules)
        )

    def sync(self, desired: RuleSet, verify: bool = True) -> Outcome:
        assumed = None if verify else self.applied
        try:
            result = sync_family(self.backend, desired, dry_run=self.dry_run, assumed=assumed)
        except Exception:
            self.applied = self.record = None
            raise
        if not self.dry_run:
            self.applied = applied_tables(desired)
            # Its own chain dicts: record_after edits them, `applied` must stay as applied.
            self.record = {n: Table(n, dict(t.chains)) for n, t in self.applied.items()}
            self.sentinels = list({j.table: j for j in reversed(desired.jumps)}.values())
        return _outcome(result)

    def forget(self) -> None:
        self.applied = self.record = None
        self.last = None

    @property
    def drift_events(self) -> bool:
        """Whether other processes' changes come as nf_tables events (the legacy backend has
        none: there the canaries and the periodic verify find drift)."""
        return self.backend.variant == "nft"

    def drift_scope(self, changes: Iterable[Change]) -> DriftScope:
        return repair.scope_of(changes, "ip6" if self.backend.family == 6 else "ip")

    def repair(self, scope: DriftScope) -> Repair | None:
        if self.record is None or self.dry_run:
            return None
        try:
            return repair.repair(self.backend, self.record, scope)
        except Exception:
            self.forget()  # a restore of several tables may have landed in part
            raise

    def missing_canaries(self) -> list[str]:
        missing = [
            f"{self.name} {t}" for t in CANARY_TABLES if not self.backend.chain_exists(t, CANARY)
        ]
        # `iptables -t nat -F` without -X empties every chain but leaves the empty canaries:
        # the first jump kproxy keeps in each table's built-in chains tells that apart.
        for jump in self.sentinels if not missing else ():
            if self.backend.rule_missing(jump.table, jump.chain, jump.rule):
                missing.append(f"{self.name} {jump.table} {jump.chain} jump")
        return missing

    def owned_ruleset(self) -> RuleSet | None:
        return owned_ruleset(self.applied) if self.applied is not None else None

    def remove_all(self) -> Outcome:
        """Delete every owned chain and jump of this family."""
        empty = RuleSet(tables={name: Table(name) for name in OWNED_TABLES})
        result = sync_family(self.backend, empty, dry_run=self.dry_run)
        self.applied = self.record = None
        return Outcome(not result.plan.empty(), True, describe(result), result.plan.restore_text)

    def present(self) -> bool:
        live = read_live(self.backend, list(OWNED_TABLES))
        return any(is_owned_chain(t.name, c) for t in live.values() for c in t.chains)


def _outcome(result: SyncResult) -> Outcome:
    return Outcome(
        not result.plan.empty(),
        result.read_kernel,
        describe(result),
        result.plan.restore_text,  # formatted only when asked for (diff)
        {t: c.line_count() for t, c in result.plan.changes.items()},
        result.sent,
    )
