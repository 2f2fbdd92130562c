"""Run `nft` for the `kproxy` table: one transaction per apply, listing to verify."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from kproxy.backends.iptables import IptablesError
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
                f"nft list table {self.family} {TABLE} failed: {_first_line(proc.stderr)}",
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
                f"nft -f failed: {_first_line(proc.stderr)}",
                proc.returncode,
                detail=_context(transaction, proc.stderr),
            )

    def delete_table(self) -> bool:
        """Remove the whole kproxy table; False when there was none."""
        if not self.exists():
            return False
        self.apply(f"delete table {self.family} {TABLE}\n")
        return True


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


def _context(transaction: str, stderr: str) -> str:
    m = re.search(r"/dev/stdin:(\d+)", stderr)
    if not m:
        return ""
    lines = transaction.splitlines()
    n = int(m.group(1))
    lo, hi = max(1, n - 3), min(len(lines), n + 3)
    return "\n".join(f"{i:6d}{'>' if i == n else ' '} {lines[i - 1]}" for i in range(lo, hi + 1))
