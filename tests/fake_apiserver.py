"""A test Kubernetes API server speaking the real list/watch protocol over plain HTTP.

Only the standard library: `ThreadingHTTPServer` serves Services, EndpointSlices and Nodes
(cluster-wide and per-namespace lists), with one global resourceVersion counter across kinds as
etcd keeps it, `limit`/`continue` paging, and watches: chunked JSON lines, replay from a bounded
history, BOOKMARK events, and 410 "Expired" for a resourceVersion older than the history.
Failures are injected with `set_fail()`, `set_kind_fail()` (one kind only: 403, 500, or a list
held until released) and `cut_watches()`; `requests` logs every request, with the time it
arrived (for client-side rate limits).

Events can be created (POST, core v1 and events.k8s.io/v1 alike) and read back with `events()`;
they are not listed or watched. MicroTime fields are checked as strictly as the real server
parses them (exactly six fractional digits and a zone), since that is what clients get wrong.

    server = FakeApiServer()      # FakeApiServer(host="10.0.0.1") to bind inside a netns
    server.start()
    server.apply({"kind": "Service", "metadata": {"name": "a", "namespace": "x"}, ...})
    ... kubernetes.client.Configuration(host=server.url) ...
    server.stop()

As a command, it serves the objects of a kubectl-style List (YAML or JSON) for manual use:
    python tests/fake_apiserver.py --port 8080 --state examples/cluster.yaml
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import random
import re
import socket
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class _Kind:
    kind: str
    api_version: str
    plural: str
    namespaced: bool

    @property
    def prefix(self) -> str:
        # Core ("v1") objects live under /api, grouped ones under /apis.
        return "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"


KINDS = {
    k.kind: k
    for k in (
        _Kind("Service", "v1", "services", True),
        _Kind("EndpointSlice", "discovery.k8s.io/v1", "endpointslices", True),
        _Kind("Node", "v1", "nodes", False),
    )
}


# Where Events are created: path prefix -> the apiVersion of the objects posted there.
EVENT_APIS = {"/api/v1": "v1", "/apis/events.k8s.io/v1": "events.k8s.io/v1"}
# metav1.MicroTime is parsed with Go's layout "2006-01-02T15:04:05.000000Z07:00": exactly six
# fractional digits and a zone; anything else is a 400 before validation even runs.
_MICRO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})")


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]
    code: int  # 0: the connection was dropped without an answer
    at: float = 0.0  # time.monotonic() when the request arrived (its line was read)


@dataclass(frozen=True)
class _Event:
    rv: int
    kind: str
    type: str
    obj: dict[str, Any]


class _HTTPError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    """A `Status` as the API server sends it for errors (HTTP body or watch ERROR event)."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeApiServer:
    """An in-process API server for Services, EndpointSlices and Nodes (and created Events)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        history: int = 1000,
        bookmark_interval: float = 1.0,
        default_watch_timeout: float = 1800.0,
    ) -> None:
        self.host = host
        self.port = port
        self.history_size = history
        self.bookmark_interval = bookmark_interval
        self.default_watch_timeout = default_watch_timeout
        self.requests: list[RequestRecord] = []
        self._cond = threading.Condition()  # guards everything below; notified on any change
        self._rv = 1
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in KINDS}
        # Created Events in order; both API versions share one store, as in the real server.
        self._events: list[dict[str, Any]] = []
        self._history: deque[_Event] = deque()
        # A watch may start at any RV >= this one: all later events are still in _history.
        self._compacted_rv = 1
        self._fail: str | None = None
        self._kind_fail: dict[str, str] = {}  # kind -> "403" | "500" | "hold"
        self._cut_gen = 0  # bumped by cut_watches(); a watch that sees a new value is cut
        self._stopping = False
        # Snapshots of paged lists, by (kind, rv), so `continue` pages stay consistent.
        self._snapshots: OrderedDict[tuple[str, int], list[dict[str, Any]]] = OrderedDict()
        self._connections: set[socket.socket] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---

    def start(self) -> FakeApiServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_cls = type("_Server", (ThreadingHTTPServer,), {"address_family": family})
        httpd = server_cls((self.host, self.port), _make_handler(self))
        httpd.daemon_threads = True
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        self._close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- state, for tests ---

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or update an object; returns the stored copy (with kind, RV, uid set)."""
        spec = self._kind_of(obj.get("kind"))
        stored = copy.deepcopy(obj)
        stored["kind"] = spec.kind
        stored["apiVersion"] = spec.api_version
        meta = stored.setdefault("metadata", {})
        if spec.namespaced:
            meta.setdefault("namespace", "default")
        key = (meta.get("namespace", ""), meta["name"])
        with self._cond:
            old = self._objects[spec.kind].get(key)
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            if old is not None:
                meta["uid"] = old["metadata"]["uid"]
                meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            else:
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", _now())
            self._objects[spec.kind][key] = stored
            self._record(spec.kind, "MODIFIED" if old is not None else "ADDED", stored)
            return copy.deepcopy(stored)

    def delete(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """Delete an object; returns it as last stored, or None when it did not exist."""
        spec = self._kind_of(kind)
        key = ((namespace or "default") if spec.namespaced else "", name)
        with self._cond:
            old = self._objects[spec.kind].pop(key, None)
            if old is None:
                return None
            self._rv += 1
            # The DELETED event carries the deletion's resourceVersion, as the real API does.
            old["metadata"]["resourceVersion"] = str(self._rv)
            self._record(spec.kind, "DELETED", old)
            return copy.deepcopy(old)

    def objects(self, kind: str) -> list[dict[str, Any]]:
        with self._cond:
            return [copy.deepcopy(o) for _, o in sorted(self._objects[kind].items())]

    def events(self) -> list[dict[str, Any]]:
        """Copies of the Events created by POST so far, in order of creation."""
        with self._cond:
            return copy.deepcopy(self._events)

    def compact(self) -> None:
        """Forget the history: a watch or list from any older resourceVersion gets 410."""
        with self._cond:
            self._history.clear()
            self._compacted_rv = self._rv
            self._snapshots.clear()
            self._cond.notify_all()

    def set_fail(self, mode: str | None) -> None:
        """None: healthy; "500": answer every request (GET or POST) 500; "drop": close every
        new request's connection unanswered. Open watches are not touched: see cut_watches()."""
        if mode not in (None, "500", "drop"):
            raise ValueError(f"unknown fail mode {mode!r}")
        with self._cond:
            self._fail = mode

    def set_kind_fail(self, kind: str, mode: str | None) -> None:
        """Fail the lists and watches of one kind only, as a missing RBAC rule or one slow
        resource does: None healthy; "403" Forbidden; "500"; "hold" keeps each request
        waiting, unanswered, until the mode changes (then it is answered as the new mode
        says) or the server stops."""
        if mode not in (None, "403", "500", "hold"):
            raise ValueError(f"unknown fail mode {mode!r}")
        spec = self._kind_of(kind)
        with self._cond:
            if mode is None:
                self._kind_fail.pop(spec.kind, None)
            else:
                self._kind_fail[spec.kind] = mode
            self._cond.notify_all()

    def cut_watches(self) -> None:
        """Abort every open watch stream now, without the final chunk (a network cut)."""
        with self._cond:
            self._cut_gen += 1
            self._cond.notify_all()

    def watch_count(self) -> int:
        """How many watch requests were answered 200 so far (a convenience for tests)."""
        return sum(1 for r in list(self.requests) if _is_watch(r.query) and r.code == 200)

    # --- internals ---

    @staticmethod
    def _kind_of(kind: Any) -> _Kind:
        if kind not in KINDS:
            raise ValueError(f"unsupported kind {kind!r}; known: {', '.join(KINDS)}")
        return KINDS[kind]

    def _record(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        # Caller holds self._cond.
        self._history.append(_Event(self._rv, kind, type_, copy.deepcopy(obj)))
        while len(self._history) > self.history_size:
            self._compacted_rv = self._history.popleft().rv
        self._cond.notify_all()

    def _create_event(self, api_version: str, namespace: str, body: Any) -> dict[str, Any]:
        """Store a POSTed Event as the real server would and return a copy of what was
        stored; raise _HTTPError for what the real server refuses."""
        if not isinstance(body, dict):
            raise _HTTPError(400, "BadRequest", "the body is not a JSON object")
        kind, version = body.get("kind", "Event"), body.get("apiVersion", api_version)
        if (kind, version) != ("Event", api_version):
            raise _HTTPError(
                400,
                "BadRequest",
                f"{version}/{kind} posted where {api_version}/Event is expected",
            )
        stored = copy.deepcopy(body)
        stored["kind"], stored["apiVersion"] = "Event", api_version
        meta = stored.get("metadata")
        if not isinstance(meta, dict):
            meta = stored["metadata"] = {}
        if meta.setdefault("namespace", namespace) != namespace:
            raise _HTTPError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on "
                "the request",
            )
        _check_event(api_version, stored)
        with self._cond:
            if not meta.get("name"):
                if not meta.get("generateName"):
                    raise _HTTPError(
                        422,
                        "Invalid",
                        "Event is invalid: metadata.name: name or generateName is required",
                    )
                # The real server's alphabet for generated suffixes: no vowels, no look-alikes.
                suffix = "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
                meta["name"] = meta["generateName"] + suffix
            if any(
                e["metadata"]["namespace"] == namespace and e["metadata"]["name"] == meta["name"]
                for e in self._events
            ):
                raise _HTTPError(409, "AlreadyExists", f'events "{meta["name"]}" already exists')
            # One resourceVersion counter across all kinds, as etcd keeps it.
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            self._events.append(stored)
            return copy.deepcopy(stored)

    def _close_connections(self) -> None:
        with self._cond:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _is_watch(query: dict[str, str]) -> bool:
    return query.get("watch", "").lower() in ("1", "true")


def _parse_field_selector(selector: str) -> dict[str, str]:
    wanted: dict[str, str] = {}
    for term in filter(None, selector.split(",")):
        if "!=" in term:
            raise _HTTPError(400, "BadRequest", f"field selector {term!r} not supported")
        field, _, value = term.replace("==", "=").partition("=")
        if field not in ("metadata.name", "metadata.namespace"):
            raise _HTTPError(400, "BadRequest", f'field label not supported: "{field}"')
        wanted[field] = value
    return wanted


def _matches(obj: dict[str, Any], namespace: str | None, fields: dict[str, str]) -> bool:
    meta = obj.get("metadata", {})
    if namespace is not None and meta.get("namespace") != namespace:
        return False
    return all(meta.get(f.split(".", 1)[1], "") == v for f, v in fields.items())


def _route(path: str) -> tuple[_Kind, str | None] | None:
    """(kind, namespace or None for all namespaces) for a list/watch path, else None."""
    for spec in KINDS.values():
        if path == f"{spec.prefix}/{spec.plural}":
            return spec, None
        head = f"{spec.prefix}/namespaces/"
        if spec.namespaced and path.startswith(head):
            ns, _, rest = path[len(head) :].partition("/")
            if rest == spec.plural and ns:
                return spec, ns
    return None


def _event_route(path: str) -> tuple[str, str] | None:
    """(apiVersion, namespace) for a path where Events are created, else None."""
    for prefix, api_version in EVENT_APIS.items():
        head = f"{prefix}/namespaces/"
        if path.startswith(head):
            ns, _, rest = path[len(head) :].partition("/")
            if rest == "events" and ns:
                return api_version, ns
    return None


def _check_event(api_version: str, event: dict[str, Any]) -> None:
    """The real server's checks that a client can fail: the MicroTime syntax of eventTime (a
    decoding error, 400) and, for events.k8s.io/v1, what a new Event requires (422). Lengths
    are in bytes, as Go's len() counts them."""
    when = event.get("eventTime")
    if when is not None and not (isinstance(when, str) and _MICRO_TIME.fullmatch(when)):
        raise _HTTPError(
            400,
            "BadRequest",
            f'Event in version "{api_version.rpartition("/")[2]}" cannot be handled as a '
            f'Event: parsing time "{when}" as "2006-01-02T15:04:05.000000Z07:00"',
        )
    if api_version != "events.k8s.io/v1":
        return
    problems = [
        f"{f}: Required value"
        for f in ("eventTime", "reportingController", "reportingInstance", "action", "reason")
        if not event.get(f)
    ]
    if event.get("type") not in ("Normal", "Warning"):
        problems.append(f"type: Unsupported value: {event.get('type')!r}")
    limits = {"reportingInstance": 128, "action": 128, "reason": 128, "note": 1024}
    for f, limit in limits.items():
        if len(str(event.get(f) or "").encode()) > limit:
            problems.append(f"{f}: Too long: may not be more than {limit} bytes")
    if problems:
        raise _HTTPError(422, "Invalid", f"Event is invalid: {'; '.join(problems)}")


def _discovery(path: str) -> dict[str, Any] | None:
    if path == "/version":
        return {
            "major": "1",
            "minor": "31",
            "gitVersion": "v1.31.0-fake",
            "platform": "linux/amd64",
        }
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
    if path == "/apis":
        version = {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}
        group = {"name": "discovery.k8s.io", "versions": [version], "preferredVersion": version}
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]}
    for group_version in {k.api_version for k in KINDS.values()}:
        spec_prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        if path == spec_prefix:
            resources = [
                {
                    "name": k.plural,
                    "namespaced": k.namespaced,
                    "kind": k.kind,
                    "verbs": ["get", "list", "watch"],
                }
                for k in KINDS.values()
                if k.api_version == group_version
            ]
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": group_version,
                "resources": resources,
            }
    return None


def _make_handler(server: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        api = server

    return Handler


class _Handler(BaseHTTPRequestHandler):
    api: FakeApiServer
    protocol_version = "HTTP/1.1"  # keep-alive and chunked watch streams, as the real server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is self.api.requests

    def setup(self) -> None:
        super().setup()
        with self.api._cond:
            self.api._connections.add(self.connection)

    def finish(self) -> None:
        with self.api._cond:
            self.api._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def _parse(self) -> tuple[str, dict[str, str]]:
        self._arrived = time.monotonic()  # every request's handler starts here
        split = urlsplit(self.path)
        path = split.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        return path, query

    def _injected_failure(self, path: str, query: dict[str, str]) -> bool:
        """Answer as set_fail() asks; True when the request was thereby dealt with."""
        with self.api._cond:
            fail = self.api._fail
        if fail == "drop":
            self._log(path, query, 0)
            self._cut()
            return True
        if fail == "500":
            self._send_json(path, query, 500, status_object(500, "InternalError", "fake failure"))
            return True
        return False

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        path, query = self._parse()
        if self._injected_failure(path, query):
            return
        try:
            if path in ("/healthz", "/readyz", "/livez"):
                self._send_raw(path, query, 200, b"ok", "text/plain")
                return
            body = _discovery(path)
            if body is not None:
                self._send_json(path, query, 200, body)
                return
            routed = _route(path)
            if routed is None:
                raise _HTTPError(404, "NotFound", f"the server could not find {path}")
            spec, namespace = routed
            self._kind_failure(spec)
            fields = _parse_field_selector(query.get("fieldSelector", ""))
            if query.get("labelSelector"):
                raise _HTTPError(400, "BadRequest", "labelSelector is not supported here")
            if _is_watch(query):
                self._watch(path, query, spec, namespace, fields)
            else:
                self._send_json(path, query, 200, self._list(query, spec, namespace, fields))
        except _HTTPError as err:
            self._send_json(path, query, err.code, status_object(err.code, err.reason, err.message))
        except OSError:  # the client went away (or cut_watches/stop shut the socket)
            self.close_connection = True

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        path, query = self._parse()
        # The body is read first, whatever the answer: left unread on a kept-alive connection
        # it would be taken for the next request.
        try:
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length) if length > 0 else b""
        except (OSError, ValueError):
            self.close_connection = True
            return
        if self._injected_failure(path, query):
            return
        try:
            routed = _event_route(path)
            if routed is None:
                raise _HTTPError(404, "NotFound", f"the server could not find {path}")
            try:
                body = json.loads(data)
            except ValueError as err:
                raise _HTTPError(400, "BadRequest", f"invalid JSON body: {err}") from None
            self._send_json(path, query, 201, self.api._create_event(*routed, body))
        except _HTTPError as err:
            self._send_json(path, query, err.code, status_object(err.code, err.reason, err.message))
        except OSError:
            self.close_connection = True

    def _kind_failure(self, spec: _Kind) -> None:
        """Raise the failure set_kind_fail() asked for this kind; wait while it is "hold"."""
        api = self.api
        with api._cond:
            while api._kind_fail.get(spec.kind) == "hold" and not api._stopping:
                api._cond.wait()
            mode = api._kind_fail.get(spec.kind)
        if mode == "403":
            raise _HTTPError(
                403,
                "Forbidden",
                f'{spec.plural} is forbidden: User "system:serviceaccount:kube-system:kproxy" '
                f"cannot list resource {spec.plural!r} at the cluster scope",
            )
        if mode == "500":
            raise _HTTPError(500, "InternalError", f"fake failure of {spec.plural}")

    # --- list ---

    def _list(
        self,
        query: dict[str, str],
        spec: _Kind,
        namespace: str | None,
        fields: dict[str, str],
    ) -> dict[str, Any]:
        api = self.api
        limit = int(query.get("limit") or 0)
        token = query.get("continue", "")
        with api._cond:
            rv_param = query.get("resourceVersion", "")
            if rv_param not in ("", "0"):
                rv = _parse_rv(rv_param)
                if rv < api._compacted_rv:
                    raise _HTTPError(
                        410, "Expired", f"too old resource version: {rv} ({api._compacted_rv})"
                    )
            if token:
                rv, start = _decode_continue(token)
                items = api._snapshots.get((spec.kind, rv))
                if items is None:
                    raise _HTTPError(410, "Expired", "the provided continue parameter is too old")
            else:
                rv, start = api._rv, 0
                items = [
                    _strip(o)
                    for _, o in sorted(api._objects[spec.kind].items())
                    if _matches(o, namespace, fields)
                ]
                if limit and len(items) > limit:
                    api._snapshots[(spec.kind, rv)] = items
                    while len(api._snapshots) > 16:
                        api._snapshots.popitem(last=False)
        page = items[start : start + limit] if limit else items[start:]
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if limit and start + limit < len(items):
            meta["continue"] = _encode_continue(rv, start + limit)
            meta["remainingItemCount"] = len(items) - start - limit
        return {
            "kind": f"{spec.kind}List",
            "apiVersion": spec.api_version,
            "metadata": meta,
            "items": page,
        }

    # --- watch ---

    def _watch(
        self,
        path: str,
        query: dict[str, str],
        spec: _Kind,
        namespace: str | None,
        fields: dict[str, str],
    ) -> None:
        api = self.api
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("1", "true")
        timeout = float(query.get("timeoutSeconds") or api.default_watch_timeout)
        rv_param = query.get("resourceVersion", "")
        start = time.monotonic()
        deadline = start + timeout
        next_bookmark = start + api.bookmark_interval
        with api._cond:
            gen = api._cut_gen
            if rv_param in ("", "0"):
                # No RV: synthetic ADDED events for what exists now, then live ones.
                last = api._rv
                pending = [
                    ("ADDED", o)
                    for _, o in sorted(api._objects[spec.kind].items())
                    if _matches(o, namespace, fields)
                ]
            else:
                last = _parse_rv(rv_param)
                pending = []
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._log(path, query, 200)
        expired = False
        while True:
            for type_, obj in pending:
                self._chunk({"type": type_, "object": obj})
            if expired:
                break
            now = time.monotonic()
            if now >= deadline:
                self.wfile.write(b"0\r\n\r\n")  # a normal end, as at the server's timeout
                return
            if bookmarks and now >= next_bookmark:
                bookmark = {"resourceVersion": str(last)}
                obj = {"kind": spec.kind, "apiVersion": spec.api_version, "metadata": bookmark}
                self._chunk({"type": "BOOKMARK", "object": obj})
                next_bookmark = now + api.bookmark_interval
            with api._cond:
                pending = []
                while True:
                    if api._stopping or api._cut_gen != gen:
                        self._cut()
                        return
                    if last < api._compacted_rv:
                        message = f"too old resource version: {last} ({api._compacted_rv})"
                        pending = [("ERROR", status_object(410, "Expired", message))]
                        expired = True
                        break
                    # Everything up to the current RV is now considered, matched or not.
                    for event in api._history:
                        if event.rv > last and event.kind == spec.kind:
                            if _matches(event.obj, namespace, fields):
                                pending.append((event.type, event.obj))
                    last = api._rv
                    now = time.monotonic()
                    wake = min(deadline, next_bookmark if bookmarks else deadline)
                    if pending or now >= wake:
                        break
                    api._cond.wait(wake - now)
        # After an ERROR the real server ends the stream normally.
        self.wfile.write(b"0\r\n\r\n")

    def _cut(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _chunk(self, event: dict[str, Any]) -> None:
        data = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    # --- plain responses ---

    def _send_json(self, path: str, query: dict[str, str], code: int, body: Any) -> None:
        self._send_raw(path, query, code, json.dumps(body).encode(), "application/json")

    def _send_raw(
        self, path: str, query: dict[str, str], code: int, data: bytes, ctype: str
    ) -> None:
        # Logged before the answer goes out: a client that has its answer finds it logged.
        self._log(path, query, code)
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _log(self, path: str, query: dict[str, str], code: int) -> None:
        at = getattr(self, "_arrived", None) or time.monotonic()
        self.api.requests.append(RequestRecord(self.command, path, query, code, at))


def _strip(obj: dict[str, Any]) -> dict[str, Any]:
    # List items carry no kind/apiVersion in the real API; consumers must not need them.
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _parse_rv(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise _HTTPError(400, "BadRequest", f"invalid resource version {value!r}") from None


def _encode_continue(rv: int, start: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"rv": rv, "start": start}).encode()).decode()


def _decode_continue(token: str) -> tuple[int, int]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        return int(data["rv"]), int(data["start"])
    except (ValueError, KeyError, TypeError):
        raise _HTTPError(400, "BadRequest", "invalid continue token") from None


def _load_state(path: str) -> list[dict[str, Any]]:
    import yaml  # only the CLI needs it

    with open(path, encoding="utf-8") as f:
        docs = list(yaml.safe_load_all(f))
    out: list[dict[str, Any]] = []
    while docs:
        doc = docs.pop(0)
        if isinstance(doc, dict) and isinstance(doc.get("items"), list):
            docs[0:0] = doc["items"]
        elif isinstance(doc, dict) and doc.get("kind") in KINDS:
            out.append(doc)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="serve Services/EndpointSlices/Nodes over HTTP")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--state", help="a kubectl-style List (YAML or JSON) to serve")
    parser.add_argument("--bookmark-interval", type=float, default=10.0)
    args = parser.parse_args(argv)
    server = FakeApiServer(args.host, args.port, bookmark_interval=args.bookmark_interval)
    for obj in _load_state(args.state) if args.state else []:
        server.apply(obj)
    server.start()
    print(f"serving on {server.url} (resourceVersion {server.resource_version})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
