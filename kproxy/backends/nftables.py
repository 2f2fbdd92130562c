"""Run `nft` for the `kproxy` table: one transaction per apply, listing to verify."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from kproxy.backends.iptables import IptablesError, failing_context, first_line
from kproxy.nft import TABLE, NftTable, parse_table


class NftError(IptablesError):
    """`nft` failed; the transaction was not applied (nft -f is all or nothing)."""


@dataclass(frozen=True)
class NftBackend:
    family: str  # "ip" or "ip6"

    @property
    def version(self) -> int:
        return 6 if self.family == "ip6" else 4

    def read(self) -> NftTable | None:
        """The kernel's kproxy table, or None when there is none."""
        text = self.read_text()
        return None if text is None else parse_table(text, self.family)

    def read_text(self) -> str | None:
        """`nft list table <family> kproxy`, or None when there is no such table."""
        proc = subprocess.run(
            ["nft", "list", "table", self.family, TABLE], capture_output=True, text=True
        )
        if proc.returncode != 0:
            if "No such file or directory" in proc.stderr:
                return None
            raise NftError(
                f"nft list table {self.family} {TABLE} failed: {first_line(proc.stderr)}",
                proc.returncode,
            )
        return proc.stdout

    def exists(self) -> bool:
        """Cheap check (no listing of rules) that the table is still there."""
        proc = subprocess.run(
            ["nft", "list", "tables", self.family], capture_output=True, text=True
        )
        wanted = f"table {self.family} {TABLE}"
        return proc.returncode == 0 and any(ln.strip() == wanted for ln in proc.stdout.splitlines())

    def apply(self, transaction: str) -> None:
        proc = subprocess.run(["nft", "-f", "-"], input=transaction, capture_output=True, text=True)
        if proc.returncode != 0:
            raise NftError(
                f"nft -f failed: {first_line(proc.stderr)}",
                proc.returncode,
                detail=failing_context(transaction, proc.stderr, r"/dev/stdin:(\d+)"),
            )

    def delete_table(self) -> bool:
        """Remove the whole kproxy table; False when there was none."""
        if not self.exists():
            return False
        self.apply(f"delete table {self.family} {TABLE}\n")
        return True
