"""The daemon's view of the cluster: model objects kept up to date from API events.

Objects are validated once, when they change (so a bad object is reported once per change, not
once per sync), and the store remembers which Services changed since the last sync. Thread
safe: the API source's threads write, the reconciler reads. No I/O.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from kproxy.model import (
    ClusterState,
    EndpointSlice,
    InvalidObject,
    Node,
    Service,
    endpoint_slice_from_k8s,
    node_from_k8s,
    service_from_k8s,
)

TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"


@dataclass
class Changes:
    """What changed between two snapshots."""

    services: set[tuple[str, str]] = field(default_factory=set)
    service_events: int = 0
    endpoint_events: int = 0
    node: bool = False
    # Epoch seconds of the EndpointSlice trigger-time annotations seen, for the
    # network-programming latency metric.
    trigger_times: list[float] = field(default_factory=list)

    def any(self) -> bool:
        return bool(self.services or self.node)


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace", "default")), str(meta.get("name", "")))


def _rv(obj: Mapping[str, Any]) -> str | None:
    return (obj.get("metadata") or {}).get("resourceVersion")


class _Raw(NamedTuple):
    """An object as the API sent it, kept for the last-known-good cache as compact JSON (a
    fifth of the memory of the parsed dict: 87 MB -> 14 MB at 10k Services x 10), without
    metadata.managedFields (field ownership bookkeeping, often the largest part; kube-proxy's
    informers drop it too)."""

    rv: str | None
    json: str

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> _Raw:
        meta = obj.get("metadata")
        if isinstance(meta, Mapping) and "managedFields" in meta:
            meta = {k: v for k, v in meta.items() if k != "managedFields"}
            obj = {**obj, "metadata": meta}
        return cls(_rv(obj), json.dumps(obj, separators=(",", ":")))


def parse_time(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


class ObjectStore:
    def __init__(self, node_name: str, warn: Any = None) -> None:
        self.node_name = node_name
        self._warn = warn or (lambda message: None)
        self._lock = threading.Lock()
        self._raw: dict[str, dict[tuple[str, str], _Raw]] = {
            "Service": {},
            "EndpointSlice": {},
            "Node": {},
        }
        self._services: dict[tuple[str, str], Service] = {}
        self._slices: dict[tuple[str, str], EndpointSlice] = {}
        self._node: Node | None = None
        self._changes = Changes()
        # The last version of each object that failed validation: a relist carrying it again
        # (same resourceVersion) is not a change, so it is not reported again.
        self._rejected: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
            kind: {} for kind in self._raw
        }
        # Where each kind's objects came from: a kind listed from the API is never filled
        # from the state cache again, and a kind filled from the cache and not listed since
        # keeps the store's state from being saved as the API's.
        self._listed: set[str] = set()
        self._from_cache: set[str] = set()

    # --- writers (API source threads) ---

    def apply(self, kind: str, event: str, obj: dict[str, Any]) -> bool:
        """Record one watch event. True when the cluster state changed."""
        with self._lock:
            return self._apply(kind, event, obj)

    def resync(self, kind: str, items: list[dict[str, Any]]) -> bool:
        """Replace the whole view of `kind` by a fresh list from the API (initial list, relist
        after 410): only real differences count as changes, so a relist with nothing new
        churns nothing. What the state cache put there is replaced: an object of another
        resourceVersion is taken again, one missing from the list is deleted."""
        with self._lock:
            self._listed.add(kind)
            self._from_cache.discard(kind)
            return self._resync(kind, items)

    def seed(self, kind: str, items: list[dict[str, Any]]) -> bool:
        """Fill `kind` from the last-known-good cache, unless the API has listed it already:
        the watch that follows a list sends an object again only when it changes, so an older
        cached version put over a listed one would stay. True when the state changed."""
        with self._lock:
            if kind in self._listed:
                return False
            changed = self._resync(kind, items)
            if self._raw[kind]:  # objects of this kind now come from the cache
                self._from_cache.add(kind)
            return changed

    def cached_kinds(self) -> set[str]:
        """The kinds whose objects came from the state cache and have not been listed since."""
        with self._lock:
            return set(self._from_cache)

    def _resync(self, kind: str, items: list[dict[str, Any]]) -> bool:
        changed = False
        current = self._raw[kind]
        seen = set()
        rejected = self._rejected[kind]
        for obj in items:
            key = _key(obj)
            seen.add(key)
            old = current.get(key)
            bad = rejected.get(key)
            if bad is not None and _rv(bad) is not None and _rv(bad) == _rv(obj):
                continue  # the same invalid version, already reported
            if old is None or old.rv != _rv(obj) or old.rv is None:
                changed |= self._apply(kind, "MODIFIED" if old else "ADDED", obj)
        for ns, name in [k for k in current if k not in seen]:
            gone = {"metadata": {"namespace": ns, "name": name}}
            changed |= self._apply(kind, "DELETED", gone)
        for key in [k for k in rejected if k not in seen]:
            del rejected[key]
        return changed

    def _apply(self, kind: str, event: str, obj: dict[str, Any]) -> bool:
        key = _key(obj)
        if event == "DELETED" and kind in self._rejected:
            self._rejected[kind].pop(key, None)
        if kind == "Node":
            if key[1] != self.node_name:
                return False
            if event == "DELETED":
                self._raw["Node"].pop(key, None)
                self._node = None
            else:
                try:
                    node = node_from_k8s(obj)
                except InvalidObject as err:
                    self._reject(kind, key, obj, err)
                    return False
                self._rejected[kind].pop(key, None)
                self._raw["Node"][key] = _Raw.of(obj)
                if node == self._node:
                    return False
                self._node = node
            self._changes.node = True
            return True

        if kind == "Service":
            self._changes.service_events += 1
            if event == "DELETED":
                self._raw[kind].pop(key, None)
                if self._services.pop(key, None) is None:
                    return False
            else:
                warnings: list[str] = []
                try:
                    svc = service_from_k8s(obj, warnings)
                except InvalidObject as err:
                    # Keep serving the last valid version rather than dropping its traffic.
                    self._reject(kind, key, obj, err)
                    return False
                self._rejected[kind].pop(key, None)
                for warning in warnings:
                    self._warn(warning)
                self._raw[kind][key] = _Raw.of(obj)
                if svc is None:  # headless or ExternalName: not proxied
                    if self._services.pop(key, None) is None:
                        return False
                elif self._services.get(key) == svc:
                    return False
                else:
                    self._services[key] = svc
            self._changes.services.add(key)
            return True

        if kind == "EndpointSlice":
            self._changes.endpoint_events += 1
            old = self._slices.get(key)
            if event == "DELETED":
                self._raw[kind].pop(key, None)
                if self._slices.pop(key, None) is None:
                    return False
                self._changes.services.add((old.namespace, old.service_name))
                return True
            slice_warnings: list[str] = []
            try:
                eps = endpoint_slice_from_k8s(obj, slice_warnings)
            except InvalidObject as err:
                self._reject(kind, key, obj, err)
                return False
            self._rejected[kind].pop(key, None)
            for warning in slice_warnings:
                self._warn(warning)
            self._raw[kind][key] = _Raw.of(obj)
            if eps is None:
                self._slices.pop(key, None)
            elif eps == old:
                return False
            else:
                self._slices[key] = eps
                if eps.trigger_time and (t := parse_time(eps.trigger_time)) is not None:
                    self._changes.trigger_times.append(t)
                self._changes.services.add((eps.namespace, eps.service_name))
            if old is not None:
                self._changes.services.add((old.namespace, old.service_name))
            return True
        return False

    def _reject(self, kind: str, key: tuple[str, str], obj: dict[str, Any], err: Exception) -> None:
        self._rejected[kind][key] = obj
        self._warn(f"{err}; keeping the last valid version")

    # --- readers (reconciler) ---

    def snapshot(self) -> tuple[ClusterState, Changes]:
        """The current state and the changes since the previous snapshot."""
        with self._lock:
            changes, self._changes = self._changes, Changes()
            state = ClusterState(dict(self._services), dict(self._slices), self._node)
            return state, changes

    def snapshot_node(self) -> Node | None:
        with self._lock:
            return self._node

    def pending(self) -> Changes:
        with self._lock:
            return self._changes

    def raw_objects(self) -> list[str]:
        """Every object as the API sent it, as JSON text (for the last-known-good cache)."""
        with self._lock:
            return [raw.json for objs in self._raw.values() for raw in objs.values()]

    def api_objects(self) -> list[str] | None:
        """raw_objects() when they all came from the API; None while any kind still holds
        objects from the state cache (saving that mix would make old objects look fresh)."""
        with self._lock:
            if self._from_cache:
                return None
            return [raw.json for objs in self._raw.values() for raw in objs.values()]
