"""The interface both proxy modes implement, and what they share.

A `Mode` drives one IP family in one proxy mode (kproxy.iptables.mode, kproxy.nftables.mode):
render -> plan -> apply. The daemon's reconciler, `kproxy sync` / `diff` and `kproxy
cleanup` drive a list of them (kproxy.families.modes_for) without knowing whether rules go
through iptables-restore or nft. Each keeps a render cache and the record of its last apply
(what the kernel should now hold), so a sync after a change plans against memory and reads
nothing from the kernel; a verify reads the kernel and repairs.

Shared here: the daemon's delta sync (`Mode.sync_state`) and the one loop over the families
(`sync_families`). No I/O: the modes do it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kproxy.drift import Change, DriftScope, Repair
from kproxy.errors import ApplyError
from kproxy.model import ClusterState, NodeConfig
from kproxy.ports import Delta


@dataclass
class Rendered:
    desired: Any  # RuleSet (iptables) or NftTable (nftables); Fragments/NftTable after a delta
    warnings: list[str]
    no_local_endpoints: dict[str, int]
    rules: dict[str, int]  # rules per table, for the metrics
    seconds: float = 0.0  # how long the render took


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


class Mode(ABC):
    """One proxy mode driving one IP family of this node; each mode's package implements it.

    `sync_state` is the daemon's sync, shared by both modes: with the Services that changed
    and a previous render (and no verify), only those Services are rendered and their change
    applied — the kernel is not read and the payload holds nothing else; otherwise everything
    is rendered and planned against the record of the last full apply (or, when that record is
    stale after delta syncs, or to verify, against the kernel). A change too large to send as
    edits (a node drain: hundreds of Services at once) is synced as a full render too, so a
    whole-table restore only ever carries the whole rule set.

    A mode made with `dry_run` plans and reports but never changes the kernel."""

    mode: str  # "iptables" or "nftables"
    name: str  # the family: "IPv4" or "IPv6"
    label: str  # what programs it, for logs and kproxy_info: "iptables-nft", "nftables"
    tables: tuple[str, ...]  # the tables its rule counts are reported for (metrics' `table`)
    dry_run: bool
    last: Any  # the render last applied, for render_delta (None: render everything next)
    _candidate: Any  # the result of the last render(), `last` once it is applied

    @abstractmethod
    def render(self, state: ClusterState, config: NodeConfig) -> Rendered:
        """Every rule this family should hold (no I/O)."""

    @abstractmethod
    def render_delta(
        self, state: ClusterState, config: NodeConfig, changed: set[tuple[str, str]]
    ) -> Delta | None:
        """Only the `changed` Services, against `last`; None when the change reaches beyond
        them and everything must be rendered (no I/O)."""

    @abstractmethod
    def sync(self, desired: Any, verify: bool = True) -> Outcome:
        """Bring the kernel to a full render's `desired`. `verify`: plan against the kernel's
        tables, read now; otherwise against the record of the last apply, when there is one."""

    @abstractmethod
    def sync_delta(self, delta: Delta) -> tuple[Outcome, Rendered] | None:
        """Apply a delta's change without reading the kernel; None, with nothing applied, when
        it is too large to send as edits (the caller then syncs a full render)."""

    @abstractmethod
    def forget(self) -> None:
        """Drop the record of the last apply: the next sync renders all and reads the kernel."""

    @abstractmethod
    def missing_canaries(self) -> list[str]:
        """What of the flush canaries is gone from the kernel ([]: nothing)."""

    @abstractmethod
    def owned_ruleset(self) -> Any:
        """The rules of the last full apply, for the daemon's snapshot (None: not kept)."""

    # Whether other processes' changes to this mode's rules come as nf_tables events.
    drift_events: bool = False

    def drift_scope(self, changes: Iterable[Change]) -> DriftScope:
        """What of this family's rules an nf_tables transaction's changes touched (no I/O)."""
        return DriftScope()

    def repair(self, scope: DriftScope) -> Repair | None:
        """Read the objects of `scope` alone and put back what differs from the record of the
        last apply; None when only a full verify can (no record, a table gone, too much)."""
        return None

    @abstractmethod
    def remove_all(self) -> Outcome:
        """Delete everything this mode owns in this family."""

    @abstractmethod
    def present(self) -> bool:
        """Whether the kernel holds anything this mode owns in this family."""

    def sync_state(
        self,
        state: ClusterState,
        config: NodeConfig,
        changed: set[tuple[str, str]] | None,
        verify: bool,
    ) -> tuple[Outcome, Rendered]:
        """The daemon's sync (above): a delta when it can, else render and sync all."""
        if not verify and changed is not None and self.last is not None:
            delta = self.render_delta(state, config, changed)
            if delta is not None:
                try:
                    applied = self.sync_delta(delta)
                except Exception:
                    self.forget()
                    raise
                if applied is not None:
                    self.last = delta.result
                    return applied
                # Too large a change to apply as edits: the whole rule set, as a full sync.
        started = time.perf_counter()
        rendered = self.render(state, config)
        rendered.seconds = time.perf_counter() - started
        outcome = self.sync(rendered.desired, verify=verify)
        if not self.dry_run:
            self.last = self._candidate
        return outcome, rendered


@dataclass
class FamilySync:
    """One family's part of a sync: its outcome and render, or the error that stopped it."""

    mode: Mode
    outcome: Outcome | None = None
    rendered: Rendered | None = None
    error: Exception | None = None


def sync_families(
    families: Sequence[Mode],
    state: ClusterState,
    config: NodeConfig,
    changed: set[tuple[str, str]] | None = None,
    *,
    verify: bool = True,
    errors: tuple[type[Exception], ...] = (ApplyError,),
) -> Iterator[FamilySync]:
    """Sync each family in turn (`Mode.sync_state`), one at a time, as the caller takes the
    results. Each family on its own: an error of `errors` (a refused apply, at the least) ends
    that family's sync only and is handed over in its result; any other error propagates."""
    for fam in families:
        try:
            outcome, rendered = fam.sync_state(state, config, changed, verify=verify)
        except errors as err:
            yield FamilySync(fam, error=err)
            continue
        yield FamilySync(fam, outcome, rendered)
