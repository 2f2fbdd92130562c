"""The errors every mode raises alike, so that callers catch what they mean: an apply that
failed (whichever tool refused it), or a node with nothing to program. No I/O."""

from __future__ import annotations


class ApplyError(Exception):
    """A tool that programs the kernel (iptables-restore, nft) failed; nothing was applied
    (each apply is one atomic transaction). str() is a one-line summary, `detail` the payload
    lines around the one the tool named. Each mode raises its own subclass."""

    def __init__(self, message: str, returncode: int = 1, detail: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.detail = detail


class NoFamilyError(Exception):
    """Neither IP family can be programmed on this node in the chosen mode."""
