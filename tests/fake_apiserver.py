"""A test Kubernetes API server speaking the real list/watch protocol over plain HTTP.

Only the standard library: `ThreadingHTTPServer` serves Services, EndpointSlices and Nodes
(cluster-wide and per-namespace lists), with one global resourceVersion counter across kinds as
etcd keeps it, `limit`/`continue` paging, and watches: chunked JSON lines, replay from a bounded
history, BOOKMARK events, and 410 "Expired" for a resourceVersion older than the history.
Failures are injected with `set_fail()`, `set_kind_fail()` (one kind only: 403, 500, or a list
held until released) and `cut_watches()`; `requests` logs every request.

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


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]
    code: int  # 0: the connection was dropped without an answer


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
    """An in-process API server for Services, EndpointSlices and Nodes."""

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

    def compact(self) -> None:
        """Forget the history: a watch or list from any older resourceVersion gets 410."""
        with self._cond:
            self._history.clear()
            self._compacted_rv = self._rv
            self._snapshots.clear()
            self._cond.notify_all()

    def set_fail(self, mode: str | None) -> None:
        """None: healthy; "500": answer every request 500; "drop": close every new
        connection's request unanswered. Open watches are not touched: see cut_watches()."""
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

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        split = urlsplit(self.path)
        path = split.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        with self.api._cond:
            fail = self.api._fail
        if fail == "drop":
            self._log(path, query, 0)
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if fail == "500":
            self._send_json(path, query, 500, status_object(500, "InternalError", "fake failure"))
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
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self._log(path, query, code)

    def _log(self, path: str, query: dict[str, str], code: int) -> None:
        self.api.requests.append(RequestRecord("GET", path, query, code))


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
