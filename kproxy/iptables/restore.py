"""Run iptables-save / iptables-restore (IPv4 and IPv6, nft or legacy backend).

Everything here acts on the network namespace the process runs in.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tenacity import (
    retry,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from kproxy.errors import ApplyError
from kproxy.tools import failing_context, first_line, stream_to

log = logging.getLogger(__name__)

# Seconds iptables-restore waits for the xtables lock before giving up (legacy backend; the nft
# backend serialises through the kernel and accepts the flag).
LOCK_WAIT_SECONDS = 5
# iptables exits with 4 for resource problems, among them "Another app is currently holding
# the xtables lock".
EXIT_RESOURCE_PROBLEM = 4


class IptablesError(ApplyError):
    """An iptables command failed; str() is a one-line summary, `detail` the context."""


def _is_lock_contention(err: BaseException) -> bool:
    return isinstance(err, IptablesError) and err.returncode == EXIT_RESOURCE_PROBLEM


@dataclass(frozen=True)
class IptablesBackend:
    """The iptables binaries of one family and one backend variant ("nft" or "legacy")."""

    family: int = 4
    variant: str = "nft"

    def _binary(self, tool: str) -> str:
        return f"{self._command()}-{tool}"

    def _command(self) -> str:
        base = "ip6tables" if self.family == 6 else "iptables"
        return f"{base}-{self.variant}"

    def problem(self) -> str | None:
        """Why this family cannot be programmed here (None: it can), checked once at start as
        upstream's Present() does: the tools kproxy runs are installed and list nat
        POSTROUTING. Read only: with the nft backend nothing is created; the legacy backend
        loads its nat table, which the first sync would do anyway."""
        for tool in (self._binary("restore"), self._binary("save"), self._command()):
            if shutil.which(tool) is None:
                return f"{tool} not found"
        argv = [self._command(), f"--wait={LOCK_WAIT_SECONDS}", "-t", "nat", "-S", "POSTROUTING"]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"{argv[0]}: {err}"
        # Another process holding the xtables lock says nothing about the family: it works.
        if proc.returncode not in (0, EXIT_RESOURCE_PROBLEM):
            message = first_line(proc.stderr) or f"exit status {proc.returncode}"
            return f"`{' '.join(argv)}` failed: {message}"
        return None

    def save(self, table: str) -> str:
        """`iptables-save -t TABLE` text."""
        argv = [self._binary("save"), "-t", table]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise IptablesError(
                f"{argv[0]} -t {table} failed: {first_line(proc.stderr)}", proc.returncode
            )
        return proc.stdout

    def chain_exists(self, table: str, chain: str) -> bool:
        """Whether `chain` exists in `table`: one cheap call (< 10 ms even in a 10k-Service
        table, ../shared/MEASURED.md), used to notice a flush."""
        argv = [self._command(), f"--wait={LOCK_WAIT_SECONDS}", "-t", table, "-S", chain]
        return subprocess.run(argv, capture_output=True).returncode == 0

    def rule_missing(self, table: str, chain: str, rule: str) -> bool:
        """Whether `rule` (iptables-save text, without "-A CHAIN") is surely absent from
        `chain`: `iptables -S CHAIN` lists only that chain (a few ms in a 10k-Service table,
        where `-C` takes 90 ms). An error (the lock, no such chain) says False: a check must
        not trigger repairs by itself."""
        argv = [self._command(), f"--wait={LOCK_WAIT_SECONDS}", "-t", table, "-S", chain]
        proc = subprocess.run(argv, capture_output=True, text=True)
        return proc.returncode == 0 and f"-A {chain} {rule}" not in proc.stdout.splitlines()

    def chain_listing(self, table: str, chain: str) -> tuple[str | None, list[str]] | None:
        """(policy of a built-in chain or None, rules) of one chain, `iptables -S CHAIN`
        (a few ms in a 10k-Service table); None when the chain does not exist."""
        base = "ip6tables" if self.family == 6 else "iptables"
        argv = [f"{base}-{self.variant}", f"--wait={LOCK_WAIT_SECONDS}", "-t", table, "-S", chain]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            return None
        policy, rules = None, []
        for line in proc.stdout.splitlines():
            if line.startswith(f"-P {chain} "):
                policy = line.split()[2]
            elif line.startswith(f"-A {chain} "):
                rules.append(line[len(chain) + 4 :])
        return policy, rules

    @retry(
        retry=retry_if_exception(_is_lock_contention),
        stop=stop_after_attempt(4),
        wait=wait_exponential(multiplier=0.2, max=2.0) + wait_random(0, 0.2),
        reraise=True,
    )
    def restore(self, payload: str | Callable[[], Iterable[str]], noflush: bool) -> int:
        """Apply `payload` atomically per table; the number of lines sent. Retried while another
        process holds the lock.

        `payload` may be a function returning the text in pieces: they are written to the
        tool as they are made (a whole 10k-Service table is never held as one string, and
        the tool parses while the next pieces are formatted); on failure it is called again
        to show the lines around the one the tool names.
        """
        argv = [self._binary("restore"), f"--wait={LOCK_WAIT_SECONDS}"]
        if noflush:
            argv.append("--noflush")
        lines = 0

        def counted() -> Iterator[str]:
            nonlocal lines
            for piece in [payload] if isinstance(payload, str) else payload():
                lines += piece.count("\n")
                yield piece

        returncode, stderr = stream_to(argv, lambda: counted())
        if returncode != 0:
            message = first_line(stderr) or f"exit status {returncode}"
            text = payload if isinstance(payload, str) else "".join(payload())
            raise IptablesError(
                f"{argv[0]} failed: {message}",
                returncode,
                detail=failing_context(text, stderr),
            )
        return lines


def detect_variant(family: int = 4) -> str:
    """The iptables backend this node uses, decided as kubernetes-sigs/iptables-wrappers does:
    the kubelet's KUBE-IPTABLES-HINT chain in mangle wins; otherwise whichever backend holds
    more rules; a tie (e.g. both empty) means nft, Debian's default."""
    base = "ip6tables" if family == 6 else "iptables"
    # The kernel lists the legacy tables of this network namespace here; none means the legacy
    # backend holds no rules, and running iptables-legacy-save would only create empty ones.
    names = "/proc/net/ip6_tables_names" if family == 6 else "/proc/net/ip_tables_names"
    try:
        if not Path(names).read_text().split():
            return "nft"
    except OSError:
        return "nft"
    available = [v for v in ("nft", "legacy") if shutil.which(f"{base}-{v}-save")]
    if len(available) < 2:
        return available[0] if available else "nft"

    def dump(variant: str, table: str | None = None) -> str:
        argv = [f"{base}-{variant}-save"] + (["-t", table] if table else [])
        proc = subprocess.run(argv, capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 else ""

    for variant in ("nft", "legacy"):
        if ":KUBE-IPTABLES-HINT" in dump(variant, "mangle"):
            return variant
    counts = {v: sum(1 for ln in dump(v).splitlines() if ln.startswith("-")) for v in available}
    return "legacy" if counts["legacy"] > counts["nft"] else "nft"
