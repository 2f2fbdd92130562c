"""The last-known-good cluster state: what the daemon (or `kproxy sync`) last applied from the
API server, kept on disk so the node's rules can be rebuilt with no API server at all.

The file is a Kubernetes `List` of the raw objects, so it is also a valid `--state` file.
`fallback` is the one policy for using it, `kproxy run`'s and `kproxy sync`'s alike.
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


class CacheUnusable(Exception):
    """There is no usable state cache; str() says why."""


@dataclass
class CachedState:
    objects: list[dict[str, Any]]
    saved_at: float  # epoch seconds
    stale: bool = False  # older than the max age it was loaded with (fallback)

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


def fallback(path: str | Path, max_age: float) -> CachedState:
    """The cached state to program from while the API server cannot be listed: used however
    old it is (the rules of an older state beat no rules, or the rules of no state), and
    flagged `stale` past `max_age` for the caller to say so. Only the kinds the API server
    has not listed come from it: a listed kind is the API's (the daemon's store refuses to
    seed one; a one-shot list is all or nothing). Raises CacheUnusable."""
    try:
        cached = load(path)
    except (OSError, ValueError) as err:
        raise CacheUnusable(getattr(err, "strerror", None) or str(err)) from None
    cached.stale = cached.age() > max_age
    return cached
