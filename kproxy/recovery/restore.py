"""Snapshots taken from the kernel, read from files (verified) and put back; the daemon's
snapshot directory. The I/O around the snapshot format (recovery/snapshot.py)."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

from kproxy.iptables.mode import IptablesMode
from kproxy.iptables.plan import owned_ruleset
from kproxy.iptables.restore import IptablesBackend
from kproxy.iptables.rules import OWNED_TABLES, RuleSet
from kproxy.iptables.sync import read_live
from kproxy.mode import Outcome
from kproxy.nftables.mode import NftablesMode
from kproxy.nftables.nft import NftBackend, NftError
from kproxy.recovery.fileio import write_atomically
from kproxy.recovery.snapshot import Snapshot, SnapshotError, dump, dump_chunks, parse

log = logging.getLogger(__name__)

DEFAULT_SNAPSHOT_DIR = "/var/lib/kproxy/snapshots"
SNAPSHOT_SUFFIX = ".snapshot"


def family_name(backend: IptablesBackend) -> str:
    return f"IPv{backend.family}"


def take_snapshot(
    backends: list[IptablesBackend],
    node: str,
    nft_mode: bool = True,
    nft_table: str | None = None,
) -> str:
    """The text of a snapshot of everything kproxy owns in the kernel: iptables mode's rules
    of every family, and nftables mode's tables when there are any (`nft_table`: their name;
    None: the one kproxy writes on this node, kproxy.families.nft_table_here)."""
    from kproxy.families import nft_table_here

    families = {family_name(b): owned_ruleset(read_live(b, list(OWNED_TABLES))) for b in backends}
    nft = {}
    for fam in ("ip", "ip6") if nft_mode else ():
        try:
            text = NftBackend(fam, nft_table or nft_table_here(fam)).read_text()
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
    snap: Snapshot,
    backends: list[IptablesBackend],
    dry_run: bool = False,
    nft_table: str | None = None,
) -> dict[str, Outcome]:
    """Apply a verified snapshot as a sync applies a render (minimal, atomic, foreign rules
    untouched), per family: iptables mode's through `backends`, nftables mode's tables (into
    `nft_table`, as take_snapshot names it). Families missing from the snapshot are left
    alone."""
    from kproxy.families import nft_table_here

    results: dict[str, Outcome] = {}
    for backend in backends:
        rs = snap.families.get(family_name(backend))
        if rs is not None:
            results[family_name(backend)] = IptablesMode(backend, dry_run).sync(rs)
    for fam, table in snap.nft.items():
        backend = NftBackend(fam, nft_table or nft_table_here(fam))
        results[f"nftables {fam}"] = NftablesMode(backend, dry_run).sync(table)
    return results


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
