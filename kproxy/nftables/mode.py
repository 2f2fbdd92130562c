"""nftables mode behind the Mode interface (kproxy.mode), one object per IP family: render the
`kproxy` table, plan, apply as one `nft -f` transaction; the table itself is the canary."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kproxy import tools
from kproxy.drift import Change, DriftScope, Repair
from kproxy.mode import Mode, Outcome, Rendered
from kproxy.model import ClusterState, NodeConfig
from kproxy.nftables import repair
from kproxy.nftables.nft import NftBackend
from kproxy.nftables.plan import copy_for_record, record_after
from kproxy.nftables.render import (
    NFT_IPV4,
    NFT_IPV6,
    fragments_table,
    render_nft,
    render_nft_delta,
)
from kproxy.nftables.sync import describe_nft, sync_nft
from kproxy.nftables.table import KUBE_PROXY_TABLE, NftTable
from kproxy.ports import Delta
from kproxy.rendercache import RenderCache


class NftablesMode(Mode):
    mode = "nftables"

    def __init__(
        self, backend: NftBackend, dry_run: bool = False, *, inline_dispatch: bool | None = None
    ) -> None:
        self.backend = backend
        self.table = backend.table
        self.tables = (backend.table,)
        self.dry_run = dry_run
        # Endpoint dispatch in upstream kube-proxy's inline form (kproxy.nftables.render);
        # by default in kube-proxy's table, whose every object kube-proxy's nftables mode then
        # rewrites or deletes when it takes the table over (a named endpoint map it would
        # never delete, and the endpoint chains it refers to could never be deleted either).
        if inline_dispatch is None:
            inline_dispatch = backend.table == KUBE_PROXY_TABLE
        self.inline_dispatch = inline_dispatch
        self.family = NFT_IPV4 if backend.family == "ip" else NFT_IPV6
        self.name = f"IPv{self.family.version}"
        self.cache = RenderCache()
        self.applied: NftTable | None = None
        self.known = False  # `applied` is what the kernel holds (None: no table)
        # What programs it (kproxy_info{backend}): nftables over netlink, or the nft binary.
        self.label = "nftables" if backend.datapath == "nft" else "nftables-netlink"
        self.last: Any = None
        self.rules = 0
        # What the kernel's table holds, kept through partial syncs too (`applied` is not): a
        # drift repair compares single objects with it (None: not known).
        self.record: NftTable | None = None

    drift_events = True  # nf_tables: every change is an event

    def render(self, state: ClusterState, config: NodeConfig) -> Rendered:
        r = render_nft(
            state, config, self.family, cache=self.cache, inline_dispatch=self.inline_dispatch
        )
        self._candidate = r
        self.rules = r.table.rule_count()
        return Rendered(r.table, r.warnings, r.no_local_endpoints, {self.table: self.rules})

    def render_delta(
        self, state: ClusterState, config: NodeConfig, changed: set[tuple[str, str]]
    ) -> Delta | None:
        return render_nft_delta(
            state, config, changed, self.last, self.cache, inline_dispatch=self.inline_dispatch
        )

    def sync_delta(self, delta: Delta) -> tuple[Outcome, Rendered] | None:
        full = self.last.table
        old = fragments_table(self.family, [o for o, _ in delta.pairs], full)
        new = fragments_table(self.family, [n for _, n in delta.pairs], full)
        try:
            result = sync_nft(self.backend, new, dry_run=self.dry_run, assumed=old, known=True)
        except Exception:
            self.record = None
            raise
        self.applied, self.known = None, False  # the full record is stale
        if self.record is not None and not self.dry_run:
            record_after(self.record, result.plan)
        self.rules += new.rule_count() - old.rule_count()
        text = result.plan.text()  # a few lines
        outcome = Outcome(
            not result.plan.empty(),
            False,
            describe_nft(result),
            text,
            {self.table: result.plan.size()},
            [(False, text)] if text else [],
        )
        rendered = Rendered(
            new,
            delta.result.warnings,
            dict(delta.result.no_local_endpoints),
            {self.table: self.rules},
        )
        return outcome, rendered

    def sync(self, desired: NftTable, verify: bool = True) -> Outcome:
        # A verify reads the table, unless the kernel says no nf_tables transaction at all
        # was committed since the table was last known equal to the record (netlink: the
        # ruleset's generation; a quiet node's periodic verify then costs one request).
        known = self.known and (not verify or self.backend.unchanged())
        try:
            result = sync_nft(
                self.backend, desired, dry_run=self.dry_run, assumed=self.applied, known=known
            )
        except Exception:
            self.forget()
            raise
        if not self.dry_run:
            self.applied, self.known = desired, True
            self.record = copy_for_record(desired)
        sent = []
        if tools.RECORD_PAYLOADS and not self.dry_run and not result.plan.empty():
            sent = [(False, result.plan.text())]
        return Outcome(
            not result.plan.empty(),
            result.read_kernel,
            describe_nft(result),
            result.plan.text,  # formatted only when asked for (diff)
            {self.table: result.plan.size()},
            sent,
        )

    def forget(self) -> None:
        self.applied, self.known = None, False
        self.last = self.record = None

    def drift_scope(self, changes: Iterable[Change]) -> DriftScope:
        return repair.scope_of(changes, self.family.name, self.table)

    def repair(self, scope: DriftScope) -> Repair | None:
        if self.record is None or self.dry_run:
            return None
        try:
            done = repair.repair(self.backend, self.record, scope)
        except Exception:
            self.forget()
            raise
        if done is not None and done.found:
            # The next verify reads the table again rather than trust the generation.
            self.known = False
        return done

    def missing_canaries(self) -> list[str]:
        return (
            [] if self.backend.exists() else [f"{self.name} table {self.family.name} {self.table}"]
        )

    def owned_ruleset(self) -> None:
        return None  # the daemon does not snapshot nftables mode's table (yet)

    def remove_all(self) -> Outcome:
        """Delete kproxy's table of this family."""
        present = self.backend.exists()
        if present and not self.dry_run:
            self.backend.delete_table()
        self.forget()
        text = f"delete table {self.family.name} {self.table}\n" if present else ""
        return Outcome(present, True, "table deleted" if present else "no table", text)

    def present(self) -> bool:
        return self.backend.exists()
