"""Per Service port, the output of the last render and the inputs it came from.

The daemon's store hands out the same model objects until they change, so an unchanged
Service port is recognised by identity and its output reused: a sync after one change renders
one Service, not all of them. A render with the cache equals one without. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class RenderCache:
    """Endpoints and rendered output per Service port, reused while the inputs are the same."""

    def __init__(self) -> None:
        self._endpoints: dict[tuple, tuple[tuple, list]] = {}
        self._fragments: dict[tuple, tuple[tuple, Any]] = {}
        self.hits = 0
        self.misses = 0

    def endpoints(self, key: tuple, inputs: tuple, compute: Callable[[], list]) -> list:
        entry = self._endpoints.get(key)
        if entry is not None and _same(entry[0], inputs):
            return entry[1]
        value = compute()
        self._endpoints[key] = (inputs, value)
        return value

    def fragment(self, key: tuple, inputs: tuple, compute: Callable[[], Any]) -> Any:
        entry = self._fragments.get(key)
        if entry is not None and _same(entry[0], inputs):
            self.hits += 1
            return entry[1]
        self.misses += 1
        value = compute()
        self._fragments[key] = (inputs, value)
        return value

    def retain(self, keys: set[tuple]) -> None:
        """Forget Service ports that are gone."""
        for cache in (self._endpoints, self._fragments):
            for key in [k for k in cache if k not in keys]:
                del cache[key]


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y or x == y for x, y in zip(a, b, strict=True))
