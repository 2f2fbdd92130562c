"""Kubernetes Events about this node, posted without ever blocking the caller.

What kproxy did to the node ("nat KUBE-SERVICES flushed by iptables (pid 5122); repaired in
40 ms") belongs where an operator looks first: `kubectl describe node` and `kubectl get events`.
The Events are made as kube-proxy's recorder (client-go tools/events) makes them: events.k8s.io/v1,
in the "default" namespace (a Node has none), named "<node>.<nanoseconds in hex>", regarding the
Node.

Events are best effort, as in client-go: post() only queues (a full queue drops), one daemon
thread posts in order, a failed post is logged once per distinct error and not retried, and the
same (reason, note) is posted at most once per dedupe window, so that a loop repairing the same
damage does not fill the node's event list with copies.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

NAMESPACE = "default"  # where the API wants Events about cluster-scoped objects
NOTE_LIMIT = 1024  # bytes (the API counts with Go's len): a longer note is refused
FIELD_LIMIT = 128  # bytes, for reason, action and reportingInstance
_MAX_RECENT = 1024  # distinct notes remembered for dedupe; beyond that the oldest is forgotten
_MAX_ERRORS = 100  # distinct error texts remembered as already logged


@dataclass(frozen=True)
class _Pending:
    reason: str
    note: str
    type: str
    action: str
    when: datetime  # when post() was called: the time of what happened, not of the send
    queued: float  # monotonic time of post(): the dedupe entry that this event made


def _utcnow() -> datetime:
    return datetime.now(UTC)


class NodeEventPoster:
    """Posts Events regarding the Node `node_name` from a daemon thread named "node-events".

    `api_client_factory` is called for every post (pass `KubeSource.api_client`, so Events
    follow a failover); None means no client now, and the post fails. `node_uid`, when given,
    is called likewise: the Node's uid, or None when not known yet.

    The thread starts at once; stop() ends it. Counters, for metrics and tests: `posted`
    (created on the server), `failed` (refused, or no answer), `dropped` (queue full, or
    posted after stop()), `suppressed` (a repeat within `dedupe_seconds`).
    """

    def __init__(
        self,
        node_name: str,
        api_client_factory: Callable[[], client.ApiClient | None],
        *,
        node_uid: Callable[[], str | None] | None = None,
        max_queue: int = 100,
        component: str = "kproxy",
        dedupe_seconds: float = 60.0,
        request_timeout: float = 5.0,
    ) -> None:
        self.node_name = node_name
        self.component = component
        self.max_queue = max_queue
        self.dedupe_seconds = dedupe_seconds
        self.request_timeout = request_timeout
        self.posted = 0
        self.failed = 0
        self.dropped = 0
        self.suppressed = 0
        self._factory = api_client_factory
        self._node_uid = node_uid
        self._cond = threading.Condition()  # guards the fields below
        self._queue: deque[_Pending] = deque()
        # (reason, note) -> monotonic time it was queued; in insertion order, so the oldest
        # entries are first and expiring them is cheap.
        self._recent: dict[tuple[str, str], float] = {}
        self._dropping = False  # this run of drops was logged; reset when one is queued
        self._stopping = False
        self._deadline: float | None = None  # set by stop(): no send starts after it
        # Only the poster thread uses these.
        self._logged_errors: set[str] = set()
        self._last_stamp = 0
        self._thread = threading.Thread(target=self._run, name="node-events", daemon=True)
        self._thread.start()

    def post(self, reason: str, note: str, type_: str = "Warning", action: str = "Repair") -> None:
        """Queue an Event ("Normal" or "Warning" `type_`); returns at once, never raises."""
        now = time.monotonic()
        key = (reason, note)
        with self._cond:
            if self._stopping:
                self.dropped += 1
                return
            self._expire(now)
            if key in self._recent:
                self.suppressed += 1
                return
            if len(self._queue) >= self.max_queue:
                self.dropped += 1
                if not self._dropping:
                    self._dropping = True
                    log.debug("node event queue full (%d); dropping events", self.max_queue)
                return
            self._dropping = False
            self._recent[key] = now
            if len(self._recent) > _MAX_RECENT:
                del self._recent[next(iter(self._recent))]
            self._queue.append(_Pending(reason, note, type_, action, _utcnow(), now))
            self._cond.notify()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread, posting what is queued if that fits in `timeout`; what does not
        is dropped. Returns within `timeout`."""
        with self._cond:
            self._stopping = True
            self._deadline = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join(timeout)

    def _expire(self, now: float) -> None:
        # Forget notes older than the window. Caller holds self._cond.
        while self._recent:
            key, queued = next(iter(self._recent.items()))
            if now - queued < self.dedupe_seconds:
                break
            del self._recent[key]

    # --- the poster thread ---

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    self.dropped += len(self._queue)
                    self._queue.clear()
                    return
                item = self._queue.popleft()
                deadline = self._deadline
            timeout = self.request_timeout
            if deadline is not None:
                timeout = max(0.01, min(timeout, deadline - time.monotonic()))
            self._send(item, timeout)

    def _send(self, item: _Pending, timeout: float) -> None:
        name = self._name()
        try:
            api_client = self._factory()
            if api_client is None:
                raise _NoClient("no API client configured")
            resp = client.EventsV1Api(api_client).create_namespaced_event(
                NAMESPACE,
                self._body(item, name),
                _preload_content=False,  # only the status matters: no model built from it
                _request_timeout=timeout,
            )
            try:
                resp.read()  # drained, so the connection goes back to the pool reusable
            finally:
                resp.release_conn()
        except Exception as err:  # the thread must outlive any failure, a bug's included
            self.failed += 1
            with self._cond:
                # Not posted after all: the same note may go again without waiting.
                if self._recent.get((item.reason, item.note)) == item.queued:
                    del self._recent[(item.reason, item.note)]
            text = _describe(err, name)
            if text not in self._logged_errors:
                if len(self._logged_errors) >= _MAX_ERRORS:
                    self._logged_errors.clear()
                self._logged_errors.add(text)
                log.warning(
                    "posting node event %s failed (repeats of this error are not logged): %s",
                    item.reason,
                    text,
                )
            return
        self.posted += 1
        if self._logged_errors:
            # Posting works again: a later failure is news, log it again.
            log.info("posting node events works again (%d failed so far)", self.failed)
            self._logged_errors.clear()

    def _name(self) -> str:
        # client-go's name: the object's, then the time in nanoseconds in hex. Kept strictly
        # increasing, so two events in one nanosecond (or across a clock step back) differ.
        stamp = max(time.time_ns(), self._last_stamp + 1)
        self._last_stamp = stamp
        return f"{self.node_name}.{stamp & 0xFFFF_FFFF_FFFF_FFFF:016x}"

    def _body(self, item: _Pending, name: str) -> client.EventsV1Event:
        uid = None
        if self._node_uid is not None:
            try:
                uid = self._node_uid()
            except Exception:  # the uid is a nicety; the event goes without it
                log.debug("node uid lookup failed", exc_info=True)
        return client.EventsV1Event(
            api_version="events.k8s.io/v1",
            kind="Event",
            metadata=client.V1ObjectMeta(name=name, namespace=NAMESPACE),
            event_time=_micro_time(item.when),
            reporting_controller=self.component,
            reporting_instance=_truncate(f"{self.component}-{self.node_name}", FIELD_LIMIT),
            action=_truncate(item.action, FIELD_LIMIT),
            reason=_truncate(item.reason, FIELD_LIMIT),
            note=_truncate(item.note, NOTE_LIMIT),
            type=item.type,
            regarding=client.V1ObjectReference(
                api_version="v1", kind="Node", name=self.node_name, uid=uid or None
            ),
        )


class _NoClient(Exception):
    """The factory had no API client to give."""


def _micro_time(when: datetime) -> datetime:
    """`when` (timezone-aware), as the API server will take it.

    The client writes datetimes with isoformat(), which leaves the fraction out when it is
    zero ("12:00:05+00:00"); the server parses MicroTime with exactly six fractional digits
    and refuses that event with a 400. One microsecond later is as true, and always has them.
    """
    return when if when.microsecond else when.replace(microsecond=1)


def _truncate(text: str, limit: int) -> str:
    """At most `limit` UTF-8 bytes (the API counts bytes), without cutting a character."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", errors="ignore") + "..."


def _describe(err: Exception, name: str) -> str:
    """One line that is the same for the same failure: the event's name and object
    addresses (urllib3 puts them in its messages) are taken out."""
    if isinstance(err, ApiException):
        text = f"HTTP {err.status} {err.reason}"
        message = _status_message(err.body)
        if message:
            text += f": {message}"
    else:
        text = f"{type(err).__name__}: {err}"
    text = re.sub(r" object at 0x[0-9a-fA-F]+", "", text.replace(name, "<event>"))
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def _status_message(body: object) -> str:
    """The message of a Status in an error answer's body; "" when there is none."""
    try:
        status = json.loads(body) if isinstance(body, str | bytes) else None
    except ValueError:
        return ""
    return str(status.get("message") or "") if isinstance(status, dict) else ""
