"""The two proxy modes behind one interface: per IP family, render -> plan -> apply.

`kproxy sync`, `diff` and the daemon's reconciler drive a list of these without knowing
whether rules go through iptables-restore or nft. Each keeps a render cache and the record of
its last apply (what the kernel should now hold), so a sync after a change plans against
memory and reads nothing from the kernel; `verify` reads the kernel and repairs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kproxy.iptables import sync as syncer
from kproxy.iptables.render import IPV4, IPV6, fragments_of, render, render_delta
from kproxy.iptables.restore import (
    IptablesBackend,
    IptablesError,
    family_backends,
    family_skipped,
)
from kproxy.iptables.rules import Jump, RuleSet, Table, is_owned_chain
from kproxy.iptables.sync import (
    applied_tables,
    describe,
    describe_nft,
    read_live,
    sync_family,
    sync_fragments,
    sync_nft,
)
from kproxy.model import ClusterState, NodeConfig
from kproxy.nftables.nft import NftBackend
from kproxy.nftables.render import (
    NFT_IPV4,
    NFT_IPV6,
    fragments_table,
    render_nft,
    render_nft_delta,
)
from kproxy.nftables.table import NftTable
from kproxy.nodeinfo import ipv6_off
from kproxy.rendercache import RenderCache

log = logging.getLogger(__name__)

CANARY = "KUBE-PROXY-CANARY"
CANARY_TABLES = ("mangle", "nat", "filter")
OWNED_TABLES = ("filter", "nat", "mangle")


@dataclass
class Rendered:
    desired: Any  # RuleSet (iptables) or NftTable (nftables)
    warnings: list[str]
    no_local_endpoints: dict[str, int]
    rules: dict[str, int]  # rules per table, for the metrics


@dataclass
class Outcome:
    """One family's sync."""

    changed: bool
    read_kernel: bool
    summary: str  # for the log line
    # The change as planned (dry run: as it would be sent); a plan's restore_text is formatted
    # only when asked for (`payload`): at 10k Services it is 455k lines nobody reads.
    plan_text: Callable[[], str] | str = ""
    lines: dict[str, int] = field(default_factory=dict)  # lines per table
    sent: list[tuple[bool, str]] = field(default_factory=list)  # (noflush, text) as sent

    @property
    def payload(self) -> str:
        return self.plan_text() if callable(self.plan_text) else self.plan_text


class _DeltaSync:
    """The daemon's sync, shared by both modes: with the Services that changed and a previous
    render (and no verify), only those Services are rendered and their change applied — the
    kernel is not read and the payload holds nothing else; otherwise everything is rendered
    and planned against the record of the last full apply (or, when that record is stale after
    delta syncs, or to verify, against the kernel). A change too large to send as edits (a
    node drain: hundreds of Services at once) is synced as a full render too, so a whole-table
    restore only ever carries the whole rule set."""

    last: Any
    _candidate: Any

    def sync_state(
        self,
        state: ClusterState,
        config: NodeConfig,
        changed: set[tuple[str, str]] | None,
        verify: bool,
    ) -> tuple[Outcome, Rendered]:
        if not verify and changed is not None and self.last is not None:
            delta = self._render_delta(state, config, changed)
            if delta is not None:
                try:
                    applied = self._apply_delta(delta)
                except Exception:
                    self.forget()
                    raise
                if applied is not None:
                    self.last = delta.result
                    return applied
                # Too large a change to apply as edits: the whole rule set, as a full sync.
        rendered = self.render(state, config)
        outcome = self.sync(rendered.desired, verify=verify)
        self.last = self._candidate
        return outcome, rendered


class IptablesMode(_DeltaSync):
    mode = "iptables"

    def __init__(self, backend: IptablesBackend) -> None:
        self.backend = backend
        self.family = IPV4 if backend.family == 4 else IPV6
        self.name = f"IPv{backend.family}"
        self.cache = RenderCache()
        self.applied: dict[str, Table] | None = None
        self.last: Any = None  # the render result last applied, for render_delta
        self.rules: dict[str, int] = {}
        # One jump per table from the last full apply, checked with the canaries.
        self.sentinels: list[Jump] = []

    @property
    def label(self) -> str:
        return f"iptables-{self.backend.variant}"

    def render(self, state: ClusterState, config: NodeConfig) -> Rendered:
        r = render(state, config, self.family, cache=self.cache)
        self.rules = {name: t.rule_count() for name, t in r.ruleset.tables.items()}
        self._candidate = r
        return Rendered(r.ruleset, r.warnings, r.no_local_endpoints, dict(self.rules))

    def _render_delta(self, state: ClusterState, config: NodeConfig, changed: set) -> Any:
        return render_delta(state, config, changed, self.last, self.cache)

    def _apply_delta(self, delta: Any) -> tuple[Outcome, Rendered] | None:
        old = fragments_of([o for o, _ in delta.pairs])
        new = fragments_of([n for _, n in delta.pairs])
        result = sync_fragments(self.backend, old, new, self.rules)
        if result is None:
            return None  # nothing was applied
        self.applied = None  # the full record is stale; a full sync reads the kernel
        for f, sign in [(o, -1) for o, _ in delta.pairs] + [(n, 1) for _, n in delta.pairs]:
            for (table, _chain), rules in f.chains.items() if f else ():
                self.rules[table] = self.rules.get(table, 0) + sign * len(rules)
        lines = {t: c.line_count() for t, c in result.plan.changes.items()}
        outcome = Outcome(
            not result.plan.empty(),
            False,
            describe(result),
            result.plan.restore_text,
            lines,
            result.sent,
        )
        return outcome, Rendered(
            new, delta.result.warnings, dict(delta.result.no_local_endpoints), dict(self.rules)
        )

    def sync(self, desired: RuleSet, verify: bool = True, dry_run: bool = False) -> Outcome:
        assumed = None if verify else self.applied
        try:
            result = sync_family(self.backend, desired, dry_run=dry_run, assumed=assumed)
        except Exception:
            self.applied = None
            raise
        if not dry_run:
            self.applied = applied_tables(desired)
            self.sentinels = list({j.table: j for j in reversed(desired.jumps)}.values())
        lines = {t: c.line_count() for t, c in result.plan.changes.items()}
        return Outcome(
            not result.plan.empty(),
            result.read_kernel,
            describe(result),
            result.plan.restore_text,
            lines,
            result.sent,
        )

    def forget(self) -> None:
        self.applied = None
        self.last = None

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
        from kproxy.recovery.snapshot import owned_ruleset  # snapshot imports render: keep it lazy

        return owned_ruleset(self.applied) if self.applied is not None else None

    def remove_all(self, dry_run: bool = False) -> Outcome:
        """Delete every owned chain and jump of this family."""
        empty = RuleSet(tables={name: Table(name) for name in OWNED_TABLES})
        result = sync_family(self.backend, empty, dry_run=dry_run)
        self.applied = None
        return Outcome(not result.plan.empty(), True, describe(result), result.plan.restore_text)

    def present(self) -> bool:
        live = read_live(self.backend, list(OWNED_TABLES))
        return any(is_owned_chain(t.name, c) for t in live.values() for c in t.chains)


class NftablesMode(_DeltaSync):
    mode = "nftables"

    def __init__(self, backend: NftBackend) -> None:
        self.backend = backend
        self.family = NFT_IPV4 if backend.family == "ip" else NFT_IPV6
        self.name = f"IPv{self.family.version}"
        self.cache = RenderCache()
        self.applied: NftTable | None = None
        self.known = False  # `applied` is what the kernel holds (None: no table)
        self.label = "nftables"
        self.last: Any = None
        self.rules = 0

    def render(self, state: ClusterState, config: NodeConfig) -> Rendered:
        r = render_nft(state, config, self.family, cache=self.cache)
        self._candidate = r
        self.rules = r.table.rule_count()
        return Rendered(r.table, r.warnings, r.no_local_endpoints, {"kproxy": self.rules})

    def _render_delta(self, state: ClusterState, config: NodeConfig, changed: set) -> Any:
        return render_nft_delta(state, config, changed, self.last, self.cache)

    def _apply_delta(self, delta: Any) -> tuple[Outcome, Rendered] | None:
        full = self.last.table
        old = fragments_table(self.family, [o for o, _ in delta.pairs], full)
        new = fragments_table(self.family, [n for _, n in delta.pairs], full)
        result = sync_nft(self.backend, new, assumed=old, known=True)
        self.applied, self.known = None, False  # the full record is stale
        self.rules += new.rule_count() - old.rule_count()
        text = result.plan.text()  # a few lines
        outcome = Outcome(
            not result.plan.empty(),
            False,
            describe_nft(result),
            text,
            {"kproxy": len(result.plan.lines)},
            [(False, text)] if text else [],
        )
        rendered = Rendered(
            new,
            delta.result.warnings,
            dict(delta.result.no_local_endpoints),
            {"kproxy": self.rules},
        )
        return outcome, rendered

    def sync(self, desired: NftTable, verify: bool = True, dry_run: bool = False) -> Outcome:
        known = self.known and not verify
        try:
            result = sync_nft(
                self.backend, desired, dry_run=dry_run, assumed=self.applied, known=known
            )
        except Exception:
            self.forget()
            raise
        if not dry_run:
            self.applied, self.known = desired, True
        sent = []
        if syncer.RECORD_PAYLOADS and not dry_run and not result.plan.empty():
            sent = [(False, result.plan.text())]
        return Outcome(
            not result.plan.empty(),
            result.read_kernel,
            describe_nft(result),
            result.plan.text,  # formatted only when asked for (diff)
            {"kproxy": len(result.plan.lines)},
            sent,
        )

    def forget(self) -> None:
        self.applied, self.known = None, False
        self.last = None

    def missing_canaries(self) -> list[str]:
        return [] if self.backend.exists() else [f"{self.name} table {self.family.name} kproxy"]

    def owned_ruleset(self) -> None:
        return None

    def remove_all(self, dry_run: bool = False) -> Outcome:
        present = self.backend.exists()
        if present and not dry_run:
            self.backend.delete_table()
        self.forget()
        text = f"delete table {self.family.name} kproxy\n" if present else ""
        return Outcome(present, True, "table deleted" if present else "no table", text)

    def present(self) -> bool:
        return self.backend.exists()


Mode = IptablesMode | NftablesMode


class NoFamilyError(IptablesError):
    """Neither IP family can be programmed on this node."""


def modes_for(
    mode: str, iptables_backend: str = "auto", *, report: bool = True, require: bool = True
) -> list[Mode]:
    """One driver per IP family that can be programmed on this node in `mode`. As upstream
    detects the node's families at start, a family whose tools or kernel support are missing
    (no ip6tables, IPv6 off in the kernel, nft refusing the ip6 family) is skipped and the
    node runs single-stack; `report` logs it. Raises NoFamilyError when none is left and
    `require`."""
    families: list[Mode] = []
    if mode == "nftables":
        for name in ("ip", "ip6"):
            backend = NftBackend(name)
            problem = (ipv6_off() if backend.version == 6 else None) or backend.problem()
            if problem is not None:
                family_skipped("nftables", backend.version, problem, report)
                continue
            families.append(NftablesMode(backend))
    else:
        families.extend(IptablesMode(b) for b in family_backends(iptables_backend, report=report))
    if require and not families:
        raise NoFamilyError(f"no IP family can be programmed in {mode} mode on this node")
    return families


def other_mode(mode: str, iptables_backend: str = "auto") -> list[Mode]:
    other = "iptables" if mode == "nftables" else "nftables"
    # What the other mode cannot program it cannot have left either: nothing to report.
    return modes_for(other, iptables_backend, report=False, require=False)


def remove_other_mode(mode: str, iptables_backend: str = "auto") -> None:
    """After the first successful sync in `mode`, remove what the other mode left, so a node
    switching modes never has a gap (the new rules are in place first)."""
    for other in other_mode(mode, iptables_backend):
        try:
            if other.present():
                outcome = other.remove_all()
                log.info(
                    "removed the %s rules of %s mode left on this node: %s",
                    other.name,
                    other.mode,
                    outcome.summary,
                )
        except Exception as err:  # the other mode's tools may be missing: not fatal
            log.warning("could not remove %s mode's %s rules: %s", other.mode, other.name, err)
