"""What one check found: a Result, and the rules that turn results into an exit status."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass

OK = "ok"
WARN = "warn"
FAIL = "fail"
# Not applicable here, or not configured (no API server given, no daemon answering, a kernel
# module not loaded that only matters once loaded): counts as ok for the exit status.
SKIPPED = "skipped"
STATUSES = (OK, WARN, FAIL, SKIPPED)

RECOVERY_DOC = "docs/RECOVERY.md"

EXIT_OK = 0
EXIT_WARN = 1
EXIT_FAIL = 2


@dataclass(frozen=True)
class Result:
    """One check's verdict: `status` (ok, warn, fail, skipped), what it `saw`, and the
    `remedy`: an anchor of docs/RECOVERY.md ("" when there is nothing to do)."""

    name: str
    status: str
    saw: str
    remedy: str = ""

    @property
    def remedy_link(self) -> str:
        return f"{RECOVERY_DOC}#{self.remedy}" if self.remedy else ""


def exit_status(results: Iterable[Result]) -> int:
    """0 when every check is ok (or skipped), 1 on a warning, 2 on a failure."""
    statuses = {r.status for r in results}
    if FAIL in statuses:
        return EXIT_FAIL
    if WARN in statuses:
        return EXIT_WARN
    return EXIT_OK


def format_text(results: Iterable[Result]) -> str:
    """One line per check: `status  name: what it saw (see docs/RECOVERY.md#anchor)`."""
    lines = []
    for r in results:
        see = f" (see {r.remedy_link})" if r.remedy and r.status in (WARN, FAIL) else ""
        lines.append(f"{r.status:<7} {r.name}: {r.saw}{see}")
    return "\n".join(lines) + "\n"


def format_json(results: Iterable[Result]) -> str:
    """`--output json`: {"checks": [{name, status, saw, remedy}...], "exit": N}."""
    results = list(results)
    checks = [{**asdict(r), "remedy": r.remedy_link} for r in results]
    return json.dumps({"checks": checks, "exit": exit_status(results)}, indent=2) + "\n"
