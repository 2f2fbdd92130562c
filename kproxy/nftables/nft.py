"""Run `nft` for kproxy's table: one transaction per apply, listing to verify."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO

from kproxy import tools
from kproxy.errors import ApplyError
from kproxy.nftables.plan import NftPlan
from kproxy.nftables.table import TABLE, NftTable, parse_table
from kproxy.tools import failing_context, first_line, stream_to

# The table `problem()` checks (never committed).
PROBE_TABLE = "kproxy-probe"


class NftError(ApplyError):
    """`nft` failed; the transaction was not applied (nft -f is all or nothing)."""


@dataclass(frozen=True)
class NftBackend:
    family: str  # "ip" or "ip6"
    table: str = TABLE  # kproxy's table, or kube-proxy's in its place (kproxy.nftables.table)

    @property
    def version(self) -> int:
        return 6 if self.family == "ip6" else 4

    def problem(self) -> str | None:
        """Why nft cannot program this family here (None: it can), checked once at start: `nft
        -c` of a table with a nat base chain, which the kernel validates and then discards
        (nothing is created; ~15 ms). A kernel without the family or its NAT refuses it; it
        is a write that fails there, so reading the family's tables would not tell."""
        text = (
            f"add table {self.family} {PROBE_TABLE}\n"
            f"add chain {self.family} {PROBE_TABLE} probe"
            " { type nat hook prerouting priority -100 ; }\n"
        )
        try:
            returncode, stderr = stream_to(["nft", "-c", "-f", "-"], text)
        except FileNotFoundError:
            return "nft not found"
        except OSError as err:
            return f"nft: {err.strerror or err}"
        if returncode != 0:
            message = first_line(stderr) or f"exit status {returncode}"
            return f"`nft -c` refused an {self.family} table: {message}"
        return None

    @property
    def datapath(self) -> str:
        return "nft"

    def read(self, hint: NftTable | None = None) -> NftTable | None:
        """The kernel's kproxy table, or None when there is none (`hint`, the desired table,
        is for the netlink datapath; nft prints every rule's text)."""
        text = self.read_text()
        return None if text is None else parse_table(text, self.family)

    def read_objects(self, chains: set[str], sets: set[str], hint: NftTable) -> NftTable | None:
        """Only these chains and sets of the kproxy table (None: no table). nft lists the
        whole table to print a part of it: read whole, then cut."""
        whole = self.read(hint)
        if whole is None:
            return None
        return NftTable(
            self.family,
            {n: c for n, c in whole.chains.items() if n in chains},
            {n: s for n, s in whole.sets.items() if n in sets},
            whole.comment,
        )

    def read_text(self) -> str | None:
        """`nft list table <family> kproxy`, or None when there is no such table."""
        if not self.exists():
            return None  # without asking nft, which would fetch the whole ruleset to say so
        proc = subprocess.run(
            ["nft", "list", "table", self.family, self.table], capture_output=True, text=True
        )
        if proc.returncode != 0:
            if "No such file or directory" in proc.stderr:
                return None
            raise NftError(
                f"nft list table {self.family} {self.table} failed: {first_line(proc.stderr)}",
                proc.returncode,
            )
        return proc.stdout

    def exists(self) -> bool:
        """Whether the kproxy table is there: the table names alone, over netlink. (`nft list
        tables` would fetch the whole ruleset first; next to a 10k-Service iptables-nft ruleset
        that took 98 s on nft 1.0.6.)"""
        from pyroute2.nftables.main import NFTables  # netlink; imported only when needed

        nfproto = 10 if self.family == "ip6" else 2  # NFPROTO_IPV6 / NFPROTO_IPV4
        with NFTables(nfgen_family=nfproto) as nl:
            return any(t.get_attr("NFTA_TABLE_NAME") == self.table for t in nl.get_tables())

    def apply(self, transaction: str | Callable[[], Iterable[str]]) -> None:
        """Apply one `nft -f` transaction; `transaction` may be a function returning it in
        pieces (a 10k-Service transaction is never held as one string).

        `nft -f -` commits whatever it has read when its input ends, so it is never fed a
        transaction still being written: a kproxy killed mid-write (kill -9, the OOM killer)
        would leave that prefix committed, chains flushed without their rules. The pieces
        go into an anonymous memory file first and nft is started on it once it is whole:
        killed before, nothing is applied; killed after, the orphaned nft still reads the
        complete transaction; nft killed too, its one netlink batch lands whole or not."""
        with _spooled(transaction) as spool:
            with tempfile.TemporaryFile() as errfile:
                proc = subprocess.Popen(
                    ["nft", "-f", "-"], stdin=spool, stdout=subprocess.DEVNULL, stderr=errfile
                )
                # Remembered as kproxy's own (the drift watch), though it may have committed
                # already: the watch decides in the thread that started it, after this.
                tools.started(proc.pid)
                returncode = proc.wait()
                errfile.seek(0)
                stderr = errfile.read().decode(errors="replace")
            if returncode != 0:
                spool.seek(0)
                lines = (line.decode(errors="replace") for line in spool)
                raise NftError(
                    f"nft -f failed: {first_line(stderr)}",
                    returncode,
                    detail=failing_context(lines, stderr, r"/dev/stdin:(\d+)"),
                )

    def unchanged(self) -> bool:
        """Whether the kernel's table is known to be as last applied or read, without reading
        it (the nft datapath never knows)."""
        return False

    def apply_plan(self, plan: NftPlan, desired: NftTable | None = None) -> None:
        """Apply a plan (kproxy.nftables.plan) as one `nft -f` transaction."""
        if not plan.empty():
            self.apply(plan.pieces)

    def delete_table(self) -> bool:
        """Remove the whole kproxy table; False when there was none."""
        if not self.exists():
            return False
        self.apply(f"delete table {self.family} {self.table}\n")
        return True


def _spooled(transaction: str | Callable[[], Iterable[str]]) -> IO[bytes]:
    """The whole transaction in an anonymous file, rewound: a memfd (memory, gone with the
    last process holding it; the node's root filesystem may be read-only), else a temporary
    file where memfd_create is refused (some seccomp profiles)."""
    try:
        spool: IO[bytes] = os.fdopen(os.memfd_create("kproxy-nft", os.MFD_CLOEXEC), "w+b")
    except OSError:
        spool = tempfile.TemporaryFile()
    try:
        for piece in [transaction] if isinstance(transaction, str) else transaction():
            spool.write(piece.encode())
        spool.flush()
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool
