"""Snapshots, verified restore and cleanup against the kernel (the I/O around snapshot.py)."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

from kproxy.iptables.restore import IptablesBackend
from kproxy.iptables.rules import RuleSet, Table
from kproxy.iptables.sync import NftSyncResult, SyncResult, read_live, sync_family, sync_nft
from kproxy.nftables.nft import NftBackend, NftError
from kproxy.recovery.fileio import write_atomically
from kproxy.recovery.snapshot import (
    TABLES,
    Snapshot,
    SnapshotError,
    dump,
    dump_chunks,
    owned_ruleset,
    parse,
)

log = logging.getLogger(__name__)

DEFAULT_SNAPSHOT_DIR = "/var/lib/kproxy/snapshots"
SNAPSHOT_SUFFIX = ".snapshot"


def family_name(backend: IptablesBackend) -> str:
    return f"IPv{backend.family}"


def take_snapshot(backends: list[IptablesBackend], node: str, nft_mode: bool = True) -> str:
    """The text of a snapshot of everything kproxy owns in the kernel: iptables mode's rules
    of every family, and nftables mode's kproxy tables when there are any."""
    families = {family_name(b): owned_ruleset(read_live(b, list(TABLES))) for b in backends}
    nft = {}
    for fam in ("ip", "ip6") if nft_mode else ():
        try:
            text = NftBackend(fam).read_text()
        except (NftError, OSError):
            text = None  # no nft on this node: nothing of nftables mode to save
        if text is not None:
            nft[fam] = text
    variant = backends[0].variant if backends else "nft"
    return dump(families, node=node, backend=f"iptables-{variant}", nft=nft)


def read_snapshot(path: str | Path) -> Snapshot:
    """A verified snapshot from a file; SnapshotError names the path and the reason."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise SnapshotError(f"{path}: is a directory") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise SnapshotError(f"{path}: cannot read: {reason}") from None
    try:
        return parse(text)
    except SnapshotError as err:
        raise SnapshotError(f"{path}: {err}") from None


def latest_snapshot(directory: str | Path) -> tuple[Path, Snapshot]:
    """The newest valid snapshot in `directory`; corrupted ones are skipped with a warning."""
    candidates = sorted(
        Path(directory).glob(f"*{SNAPSHOT_SUFFIX}"),
        key=lambda p: (p.stat().st_mtime, p.name),
        reverse=True,
    )
    for path in candidates:
        try:
            return path, read_snapshot(path)
        except SnapshotError as err:
            log.warning("skipping %s", err)
    raise SnapshotError(f"no valid snapshot in {directory}")


def restore(
    snap: Snapshot, backends: list[IptablesBackend], dry_run: bool = False
) -> dict[str, SyncResult]:
    """Apply a verified snapshot through the plan/apply path (minimal, atomic, foreign rules
    untouched). Families missing from the snapshot are left alone."""
    results: dict[str, SyncResult | NftSyncResult] = {}
    for backend in backends:
        rs = snap.families.get(family_name(backend))
        if rs is None:
            continue
        results[family_name(backend)] = sync_family(backend, rs, dry_run=dry_run)
    for fam, table in snap.nft.items():
        results[f"nftables {fam}"] = sync_nft(NftBackend(fam), table, dry_run=dry_run)
    return results


def cleanup(
    backends: list[IptablesBackend], dry_run: bool = False, nft_mode: bool = True
) -> dict[str, str]:
    """Remove everything kproxy owns in either mode: iptables mode's chains and jumps in every
    family, nftables mode's kproxy tables. Returns, per family, what was (or would be) sent."""
    done = {}
    for backend in backends:
        empty = RuleSet(tables={name: Table(name) for name in TABLES})
        result = sync_family(backend, empty, dry_run=dry_run)
        done[family_name(backend)] = result.plan.restore_text()
    for fam in ("ip", "ip6") if nft_mode else ():
        backend_nft = NftBackend(fam)
        try:
            present = backend_nft.exists()
        except OSError:
            present = False
        if present:
            if not dry_run:
                backend_nft.delete_table()
            done[f"nftables {fam}"] = f"delete table {fam} kproxy\n"
    return done


@dataclass
class SnapshotStore:
    """The daemon's snapshot directory: newest `keep` files, written atomically, mode 0600."""

    directory: Path
    keep: int = 5
    _last_digest: str | None = None

    def save(self, families: dict[str, RuleSet], node: str, backend: str) -> Path | None:
        """Write a snapshot unless it equals the last one written; returns its path."""
        pieces = dump_chunks(families, node=node, backend=backend)
        header = next(pieces)
        fields = dict(line[2:].split(" ", 1) for line in header.splitlines()[1:])
        if fields["sha256"] == self._last_digest:
            return None
        created = fields["created"].replace(":", "")
        path = self.directory / f"kproxy-{created}{SNAPSHOT_SUFFIX}"
        n = 1
        while path.exists():
            n += 1
            path = self.directory / f"kproxy-{created}-{n}{SNAPSHOT_SUFFIX}"
        write_atomically(path, itertools.chain([header], pieces))
        self._last_digest = fields["sha256"]
        old = sorted(self.directory.glob(f"*{SNAPSHOT_SUFFIX}"), key=lambda p: p.stat().st_mtime)
        for stale in old[: max(0, len(old) - self.keep)]:
            stale.unlink(missing_ok=True)
        return path
