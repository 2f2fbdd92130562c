"""The last-known-good cluster state: what the daemon (or `kproxy sync`) last applied from the
API server, kept on disk so the node's rules can be rebuilt with no API server at all.

The file is a Kubernetes `List` of the raw objects, so it is also a valid `--state` file.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kproxy.recovery.fileio import write_atomically

DEFAULT_STATE_CACHE = "/var/lib/kproxy/state.json"
SAVED_AT = "kproxy.io/saved-at"


@dataclass
class CachedState:
    objects: list[dict[str, Any]]
    saved_at: float  # epoch seconds

    def age(self, now: float | None = None) -> float:
        return max(0.0, (now if now is not None else time.time()) - self.saved_at)


def save(path: str | Path, objects: list[dict[str, Any]] | list[str], node: str = "") -> None:
    """Write `objects` (dicts, or JSON texts as the daemon's store keeps them) as the cache."""
    head = {
        "apiVersion": "v1",
        "kind": "List",
        "metadata": {"annotations": {SAVED_AT: f"{time.time():.3f}", "kproxy.io/node": node}},
    }
    items = ",".join(
        o if isinstance(o, str) else json.dumps(o, separators=(",", ":")) for o in objects
    )
    write_atomically(
        path, json.dumps(head, separators=(",", ":"))[:-1] + ',"items":[' + items + "]}"
    )


def load(path: str | Path) -> CachedState:
    """Raises OSError or ValueError when there is no usable cache."""
    text = Path(path).read_text(encoding="utf-8")
    doc = json.loads(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise ValueError(f"{path} is not a kproxy state cache")
    annotations = (doc.get("metadata") or {}).get("annotations") or {}
    try:
        saved_at = float(annotations[SAVED_AT])
    except (KeyError, TypeError, ValueError):
        saved_at = Path(path).stat().st_mtime
    return CachedState(doc["items"], saved_at)
