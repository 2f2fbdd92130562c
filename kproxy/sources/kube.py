"""The Kubernetes source: list+watch Services, EndpointSlices and this node's Node.

One daemon thread per resource runs the reflector loop client-go runs:

    LIST (paged) ──► on_resync(kind, every object) ──► WATCH from the list's resourceVersion
       ▲                                                   │ ADDED/MODIFIED/DELETED ─► on_event
       └── 410 Gone (ERROR event or HTTP 410) ◄────────────┤ BOOKMARK: only advances the RV
                                                           │ normal end: WATCH again from the RV
                                                           └ failure: back off, fail over, WATCH

How the consumer learns of changes (one mechanism each, never both for the same change):
- `on_resync(kind, items)` after every complete LIST (the first one and every relist after a 410
  or a callback failure) with *all* objects of that kind. The consumer replaces its whole view of
  that kind; what disappeared during a missed window is gone from `items`, so diffing against
  its previous view turns a relist into adds, updates and deletes. No KubeEvent is emitted for
  a list.
- `on_event(KubeEvent)` for each ADDED/MODIFIED/DELETED watch event, in the server's order.

Callbacks run on the resource threads: in order for one kind, concurrently across kinds, so
the consumer must be thread-safe. Objects are the raw JSON dicts (camelCase keys) with `kind`
set, since list items come without it.

The watch stream is read by hand instead of through `kubernetes.watch.Watch`: Watch.stream
turns each object into a client model (CPU we do not need: the model layer reads dicts), its
automatic "retry once" after a 410 re-watches from the same expired resourceVersion, and with
`deserialize=False` it fails with a KeyError on ERROR events.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import tenacity
import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from kproxy.sources.ratelimit import DEFAULT_BURST, TokenBucket

log = logging.getLogger(__name__)

SYNC_KINDS = frozenset({"Service", "EndpointSlice"})  # `synced` waits for these two lists
# client-go's reflector treats a watch closed within a second with no event as a failure, so a
# server that ends every watch at once is retried with backoff rather than in a tight loop.
MIN_WATCH_DURATION = 1.0


class SourceUnavailable(Exception):
    """The API server could not be read (no configuration, or no server answered in time)."""


class NoConfiguration(SourceUnavailable):
    """No usable client configuration: what was tried and what to pass, in one line."""


class SourceMetrics(Protocol):
    """What the source reports; the daemon passes Prometheus counters. Every method is
    optional: one the object lacks is simply not called."""

    def request(self, verb: str, code: str) -> None:
        """One API request done: verb "LIST" or "WATCH"; code the HTTP status, or "<error>"
        when no answer came (client-go's rest_client_requests_total convention)."""

    def watch_restart(self, resource: str) -> None:
        """A watch of `resource` ("Service", ...) ended other than by stop(): re-watch/relist."""

    def reachable(self, address: str, up: bool) -> None:
        """The server at `address` answered (True) or failed (False) its last request."""

    def failover(self, from_address: str, to_address: str) -> None:
        """The source left a failing server for the next one in the list."""


@dataclass(frozen=True)
class KubeEvent:
    kind: str  # "Service" | "EndpointSlice" | "Node"
    type: str  # "ADDED" | "MODIFIED" | "DELETED"
    obj: dict[str, Any]  # the raw API object as a JSON dict (camelCase keys, with kind set)


@dataclass(frozen=True)
class _Resource:
    kind: str
    api_version: str
    api: str  # "core" or "discovery": which API class of the client lists it
    method: str  # the client's list method (the same method watches, with watch=True)
    field_selector: str | None = None


class _Failure(Exception):
    """A request or stream failed; `server` is the index of the server to fail over from,
    None when the server itself is fine (a 4xx, a callback error, a very short watch)."""

    def __init__(self, message: str, server: int | None = None) -> None:
        super().__init__(message)
        self.server = server


@dataclass
class _Cursor:
    rv: str | None = None  # where the next watch starts; None: list first


class _HandlerFailed(Exception):
    """A consumer callback raised."""


class _Gone(Exception):
    """410: the resourceVersion (or continue token) is too old; list again."""


def wait_strategy(initial: float, maximum: float) -> tenacity.wait.wait_base:
    """initial * 2^(n-1) capped at maximum, plus up to `initial` of random jitter, so that
    nodes that lost the API server together do not come back in lockstep. (Composed by hand:
    wait_exponential_jitter's `initial` is deprecated in tenacity 9 and `multiplier` is
    missing in tenacity 8.)"""
    return tenacity.wait_exponential(multiplier=initial, max=maximum) + tenacity.wait_random(
        0, initial
    )


class LimitedApiClient(client.ApiClient):
    """An ApiClient whose every request first takes a token of `limiter` (client-go's
    client-side rate limit, kube-proxy's clientConnection.qps/burst). `call_api` is where
    every generated API method sends its request, a list page, a watch's start and an
    Event's post alike; a watch's stream, read afterwards, costs nothing more."""

    def __init__(
        self, configuration: client.Configuration, limiter: TokenBucket | None = None
    ) -> None:
        super().__init__(configuration=configuration)
        self.limiter = limiter

    def call_api(self, *args: Any, **kwargs: Any) -> Any:
        url = kwargs.get("url") or (args[1] if len(args) > 1 else "")  # (method, url, ...)
        # A list's next page is free: client-go's informers list with resourceVersion 0, which
        # the API server answers from its cache in one response whatever the limit, so
        # kube-proxy's first list costs one request per resource; kproxy pages (500 objects
        # each) and pays for the first page only. Otherwise 10k Services and their slices
        # would take 40 requests, 7 s at upstream's default 5/s.
        if self.limiter is not None and "continue" not in parse_qs(urlsplit(str(url)).query):
            waited = self.limiter.take()
            # client-go's thresholds: a wait over 1s is said at its default verbosity.
            if waited > 1.0:
                log.info(
                    "waited %.2fs for the client-side rate limit (%s)",
                    waited,
                    self.limiter.describe(),
                )
            elif waited > 0.05:
                log.debug("waited %.3fs for the client-side rate limit", waited)
        return super().call_api(*args, **kwargs)


class _Backoff:
    """Exponential backoff with jitter (see wait_strategy), reset by the loop
    whenever a watch delivers an event, so a healthy stream starts again from `initial`."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._wait = wait_strategy(initial, maximum)
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
        state.attempt_number = self.failures
        return self._wait(state)

    def reset(self) -> None:
        self.failures = 0


class KubeSource:
    """Lists and watches Services, EndpointSlices and this node through one or more API servers.

    Single use: start() once, stop() once. `synced` is set once both Services and
    EndpointSlices have been listed completely.
    """

    def __init__(
        self,
        servers: list[str] | None,
        kubeconfig: str | None,
        node_name: str,
        on_event: Callable[[KubeEvent], None],
        on_resync: Callable[[str, list[dict[str, Any]]], None],
        metrics: SourceMetrics | None = None,
        *,
        watch_timeout: float = 300.0,
        request_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 30.0,
        page_size: int = 500,
        list_attempts: int = 5,
        qps: float = 0.0,
        burst: int = DEFAULT_BURST,
    ) -> None:
        """Raises SourceUnavailable when no client configuration can be loaded. `qps` and
        `burst`: the client-side rate limit every request to the API server waits on, shared
        by the clients of every server (one client at a time is in use); qps <= 0: none."""
        self.node_name = node_name
        self._on_event = on_event
        self._on_resync = on_resync
        self._metrics = metrics
        self.watch_timeout = watch_timeout
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.page_size = page_size
        self.list_attempts = list_attempts
        self.synced = threading.Event()
        self.failovers = 0
        self._stopping = threading.Event()
        # Its waits end early at stop(), so a thread waiting out a low qps does not hold it up.
        self.limiter = TokenBucket(qps, burst, sleep=self._stopping.wait)
        self._clients = [
            (cfg.host, LimitedApiClient(cfg, self.limiter))
            for cfg in _configurations(servers, kubeconfig)
        ]
        self._current = 0
        self._lock = threading.Lock()  # guards _current, _listed, _open and failovers
        self._listed: set[str] = set()
        self._open: set[Any] = set()  # watch responses being read, shut down by stop()
        self._threads: list[threading.Thread] = []
        self.resources = [
            _Resource("Service", "v1", "core", "list_service_for_all_namespaces"),
            _Resource(
                "EndpointSlice",
                "discovery.k8s.io/v1",
                "discovery",
                "list_endpoint_slice_for_all_namespaces",
            ),
        ]
        if node_name:
            self.resources.append(
                _Resource("Node", "v1", "core", "list_node", f"metadata.name={node_name}")
            )

    @property
    def servers(self) -> list[str]:
        return [address for address, _ in self._clients]

    @property
    def current_server(self) -> str:
        with self._lock:
            return self._clients[self._current][0]

    def api_client(self) -> client.ApiClient:
        """The client of the server in use now (failover changes it), for the daemon's other
        requests, such as posting Events: they go where the watches go."""
        with self._lock:
            return self._clients[self._current][1]

    # --- daemon mode ---

    def start(self) -> None:
        log.info("API server requests: client-side rate limit %s", self.limiter.describe())
        for res in self.resources:
            thread = threading.Thread(
                target=self._run, args=(res,), name=f"kube-{res.kind}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        with self._lock:
            streams = list(self._open)
        for resp in streams:
            _shutdown(resp)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for _, api_client in self._clients:
            api_client.close()

    def _run(self, res: _Resource) -> None:
        backoff = _Backoff(self.backoff_initial, self.backoff_max)
        cursor = _Cursor()
        while not self._stopping.is_set():
            try:
                if cursor.rv is None:
                    items, cursor.rv = self._list(res, self.request_timeout)
                    self._resync(res.kind, items)
                self._watch(res, cursor, backoff)
                # Ended normally (the server's timeoutSeconds): watch again from where it was.
                if not self._stopping.is_set():
                    self._metric("watch_restart", res.kind)
            except _Gone:
                self._metric("watch_restart", res.kind)
                cursor.rv = None
                delay = backoff.next_delay()
                # The first 410 after a healthy stream relists at once; repeated ones back off.
                delay = 0.0 if backoff.failures == 1 else delay
                log.info("%s: resourceVersion expired (410), listing again", res.kind)
                self._stopping.wait(delay)
            except _Failure as err:
                if self._stopping.is_set():
                    break
                if cursor.rv is not None:  # a watch broke (not a failed list)
                    self._metric("watch_restart", res.kind)
                delay = backoff.next_delay()
                log.warning("%s: %s; retrying in %.2fs", res.kind, err, delay)
                self._stopping.wait(delay)
            except Exception:
                # A consumer callback raised (or an object we could not handle): the consumer's
                # view may now be wrong, so relist, with backoff so that a callback that always
                # fails cannot make us spin.
                cursor.rv = None
                delay = backoff.next_delay()
                log.exception("%s: failed; listing again in %.2fs", res.kind, delay)
                self._stopping.wait(delay)

    def _resync(self, kind: str, items: list[dict[str, Any]]) -> None:
        self._on_resync(kind, items)
        with self._lock:
            self._listed.add(kind)
            if SYNC_KINDS <= self._listed:
                self.synced.set()

    def _watch(self, res: _Resource, cursor: _Cursor, backoff: _Backoff) -> None:
        """Stream one watch from `cursor.rv` until the server ends it; returns on a normal end,
        raises _Gone or _Failure otherwise. `cursor.rv` follows every event (bookmarks too), so
        whatever ends the stream, the next watch resumes after the last event delivered."""
        params: dict[str, Any] = {
            "watch": True,
            "resource_version": cursor.rv,
            "allow_watch_bookmarks": True,
            # client-go's spread: between one and two watch_timeouts, so the watches of many
            # nodes do not all end and reconnect in the same second.
            "timeout_seconds": max(1, int(self.watch_timeout * (1 + random.random()))),
        }
        if res.field_selector:
            params["field_selector"] = res.field_selector
        # Client-side read timeout: bookmarks or the server's own timeout end every healthy
        # stream well before it, so it only fires on a dead (half-open) connection.
        read_timeout = params["timeout_seconds"] + max(30.0, self.request_timeout)
        server, resp = self._request(res, "WATCH", (self.connect_timeout, read_timeout), params)
        with self._lock:
            self._open.add(resp)
            if self._stopping.is_set():  # stop() ran while we connected: it missed this one
                _shutdown(resp)
        started, events = time.monotonic(), 0
        try:
            for line in _lines(resp):
                event = json.loads(line)
                type_ = event.get("type")
                obj = event.get("object") or {}
                if type_ == "ERROR":
                    code = obj.get("code")
                    if code == 410:
                        raise _Gone()
                    message = f"watch ERROR {code}: {obj.get('message', '')}"
                    if isinstance(code, int) and code >= 500:
                        self._server_failed(server, message)
                        raise _Failure(message, server)
                    raise _Failure(message)
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if new_rv:
                    cursor.rv = new_rv
                events += 1
                backoff.reset()
                if type_ in ("ADDED", "MODIFIED", "DELETED"):
                    obj.setdefault("kind", res.kind)
                    obj.setdefault("apiVersion", res.api_version)
                    try:
                        self._on_event(KubeEvent(res.kind, type_, obj))
                    except Exception as err:
                        # Not a stream failure: _run relists so the consumer's view is rebuilt.
                        raise _HandlerFailed(f"on_event failed: {err!r}") from err
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as err:
            if self._stopping.is_set():
                return
            address = self._clients[server][0]
            self._server_failed(server, f"watch stream from {address} broke: {err}")
            raise _Failure(f"watch stream from {address} broke: {_short(err)}", server) from None
        finally:
            with self._lock:
                self._open.discard(resp)
            # Closed, not returned to the pool as is: a stream left mid-way (410, error, stop)
            # still holds unread bytes that would corrupt the next request on the connection.
            resp.close()
            resp.release_conn()
        if not self._stopping.is_set() and events == 0:
            if time.monotonic() - started < MIN_WATCH_DURATION:
                raise _Failure("very short watch: closed at once with no event")

    # --- one-shot ---

    def list_once(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every Service and EndpointSlice, and this node's Node, listed once (`kproxy sync`
        without --state). Retries with backoff, failing over between servers, for at most
        `timeout` seconds or `list_attempts` attempts; then raises SourceUnavailable."""
        deadline = time.monotonic() + timeout
        retrying = tenacity.Retrying(
            stop=tenacity.stop_before_delay(timeout)
            | tenacity.stop_after_attempt(self.list_attempts),
            wait=wait_strategy(self.backoff_initial, self.backoff_max),
            retry=tenacity.retry_if_exception_type((_Failure, _Gone)),
            before_sleep=lambda state: log.warning(
                "listing from the API server failed: %s; retrying", state.outcome.exception()
            ),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    items: list[dict[str, Any]] = []
                    for res in self.resources:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise _Failure(f"timed out after {timeout:g}s")
                        items += self._list(res, min(self.request_timeout, remaining))[0]
                    return items
        except (_Failure, _Gone) as err:
            raise SourceUnavailable(f"cannot list from the API server: {err}") from None
        raise AssertionError("unreachable")  # tenacity either returns or reraises

    # --- requests ---

    def _list(self, res: _Resource, timeout: float) -> tuple[list[dict[str, Any]], str]:
        """All objects of `res` (pages joined) and the list's resourceVersion."""
        try:
            return self._list_pages(res, timeout, self.page_size)
        except _Gone:
            # The continue token expired between pages: one consistent unpaged list instead.
            return self._list_pages(res, timeout, 0)

    def _list_pages(
        self, res: _Resource, timeout: float, limit: int
    ) -> tuple[list[dict[str, Any]], str]:
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            params: dict[str, Any] = {}
            if limit:
                params["limit"] = limit
            if token:
                params["_continue"] = token
            if res.field_selector:
                params["field_selector"] = res.field_selector
            server, resp = self._request(res, "LIST", (self.connect_timeout, timeout), params)
            try:
                body = json.loads(resp.data)
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as err:
                resp.close()  # half-read: never reuse this connection
                self._server_failed(server, f"bad LIST answer: {err}")
                raise _Failure(f"LIST {res.kind}: {_short(err)}", server) from None
            finally:
                resp.release_conn()
            for item in body.get("items") or []:
                item.setdefault("kind", res.kind)
                item.setdefault("apiVersion", res.api_version)
                items.append(item)
            meta = body.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    def _request(
        self, res: _Resource, verb: str, timeout: tuple[float, float], params: dict[str, Any]
    ) -> tuple[int, Any]:
        """Send one request to the current server: (its index, the raw urllib3 response)."""
        with self._lock:
            server = self._current
        address, api_client = self._clients[server]
        api = (
            client.CoreV1Api(api_client) if res.api == "core" else client.DiscoveryV1Api(api_client)
        )
        try:
            resp = getattr(api, res.method)(
                _preload_content=False, _request_timeout=timeout, **params
            )
        except ApiException as err:
            # status 0: the client's own errors (TLS); 5xx and 429: the server is in trouble.
            code = err.status or 0
            self._metric("request", verb, str(code) if code else "<error>")
            if code == 410:
                self._metric("reachable", address, True)
                raise _Gone() from None
            message = f"{verb} {res.kind} at {address}: HTTP {code} {err.reason}"
            if code == 0 or code >= 500 or code == 429:
                self._server_failed(server, message)
                raise _Failure(message, server) from None
            self._metric("reachable", address, True)
            raise _Failure(message) from None
        except (urllib3.exceptions.HTTPError, OSError) as err:
            self._metric("request", verb, "<error>")
            message = f"{verb} {res.kind} at {address}: {_short(err)}"
            self._server_failed(server, message)
            raise _Failure(message, server) from None
        self._metric("request", verb, str(resp.status))
        self._metric("reachable", address, True)
        return server, resp

    def _server_failed(self, server: int, why: str) -> None:
        """Mark `server` down and move to the next one (round robin), once per failure: two
        threads failing on the same server advance the index only once."""
        address = self._clients[server][0]
        self._metric("reachable", address, False)
        with self._lock:
            if self._current != server or len(self._clients) < 2:
                return
            self._current = (server + 1) % len(self._clients)
            self.failovers += 1
            to = self._clients[self._current][0]
        log.warning("API server %s failed (%s); switching to %s", address, _short(why), to)
        self._metric("failover", address, to)

    def _metric(self, name: str, *args: Any) -> None:
        fn = getattr(self._metrics, name, None)
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:  # metrics must never break the source
            log.debug("metrics %s%r failed", name, args, exc_info=True)


def _configurations(
    servers: list[str] | None, kubeconfig: str | None
) -> list[client.Configuration]:
    """One client configuration per API server address.

    As kube-proxy's --master/--kubeconfig: `servers` override the kubeconfig's server address
    (keeping its credentials). Without a kubeconfig, `servers` take the pod's service account
    credentials when there are any (a DaemonSet pointed at the API server's real address, not
    the `kubernetes` Service that needs proxy rules first), else none. Without `servers`: the
    kubeconfig, else the in-cluster service account, else the default kubeconfig location.
    """
    base: client.Configuration | None = None
    # The client's errors may span lines (a YAML parser's marks): one line for the operator.
    broken = (ConfigException, OSError, ValueError, yaml.YAMLError, TypeError, AttributeError)
    if kubeconfig:
        base = client.Configuration()
        try:
            if not os.path.isfile(kubeconfig):
                raise ConfigException("no such file")
            config.load_kube_config(config_file=kubeconfig, client_configuration=base)
        except broken as err:
            raise NoConfiguration(
                f"cannot use --kubeconfig {kubeconfig}: {_one_line(err)}; pass a valid "
                "kubeconfig file, or --master URL"
            ) from None
    elif servers:
        base = _service_account()
    else:
        base = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=base)
        except ConfigException as in_cluster:
            # $KUBECONFIG, else ~/.kube/config, as the client reads it.
            default = os.path.expanduser(config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION)
            base = client.Configuration()
            try:
                config.load_kube_config(client_configuration=base)
            except broken as err:
                raise NoConfiguration(
                    "no API server configuration: tried in-cluster (not in a pod: "
                    f"{_one_line(in_cluster)}) and {default} ({_one_line(err)}); pass "
                    "--kubeconfig FILE or --master URL"
                ) from None
    configs = []
    addresses = servers or [base.host if base is not None else ""]
    for address in addresses:
        cfg = copy.deepcopy(base) if base is not None else client.Configuration()
        cfg.host = address if "://" in address else f"https://{address}"
        cfg.host = cfg.host.rstrip("/")
        # No hidden urllib3 retries (3 by default): we retry, back off and fail over ourselves,
        # and a dead server must be noticed at the first refused connection.
        cfg.retries = False
        configs.append(cfg)
    return configs


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()).rstrip(".") or type(err).__name__


def _service_account(
    token_file: str = config.incluster_config.SERVICE_TOKEN_FILENAME,
    cert_file: str = config.incluster_config.SERVICE_CERT_FILENAME,
) -> client.Configuration | None:
    """The pod's service account credentials (token, re-read as the kubelet rotates it, and
    CA) for an address given with --master; None outside a pod."""
    loader = config.incluster_config.InClusterConfigLoader(
        token_filename=token_file,
        cert_filename=cert_file,
        # The loader insists on the `kubernetes` Service's address; --master replaces it.
        environ={
            config.incluster_config.SERVICE_HOST_ENV_NAME: "kubernetes.default.svc",
            config.incluster_config.SERVICE_PORT_ENV_NAME: "443",
        },
    )
    base = client.Configuration()
    try:
        loader.load_and_set(base)
    except ConfigException:
        return None
    refresh = base.refresh_api_key_hook

    def keep_address(cfg: client.Configuration) -> None:
        # The loader's token refresh also resets the address to the Service's, and puts its
        # own hook back.
        host = cfg.host
        refresh(cfg)
        cfg.host = host
        cfg.refresh_api_key_hook = keep_address
        _strip_token(cfg)

    base.refresh_api_key_hook = keep_address
    _strip_token(base)
    return base


def _strip_token(cfg: client.Configuration) -> None:
    # A token file written with a trailing newline would make an invalid header.
    token = cfg.api_key.get("BearerToken")
    if token:
        cfg.api_key["BearerToken"] = token.strip()


def _lines(resp: Any) -> Iterator[str]:
    """The non-empty lines of a streamed (chunked) response, as they arrive."""
    buffer = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield line.decode("utf-8", errors="replace")


def _shutdown(resp: Any) -> None:
    """Unblock a thread reading `resp` now: shut its socket down (closing it from another
    thread would not wake a blocked recv)."""
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _short(err: object) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."
