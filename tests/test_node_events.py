"""NodeEventPoster against tests/fake_apiserver.py over real HTTP, with the real kubernetes client.

No root needed: the fake server runs on 127.0.0.1 in this process. It parses eventTime as
strictly as the real API server does, so a badly serialised Event fails here too.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fake_apiserver import FakeApiServer
from kubernetes import client

from kproxy.daemon import nodeevents
from kproxy.daemon.nodeevents import NodeEventPoster
from kproxy.sources.kube import KubeSource

EVENTS_V1 = "/apis/events.k8s.io/v1/namespaces/default/events"
LOGGER = "kproxy.daemon.nodeevents"


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout}s")


def dead_url() -> str:
    """An address where nothing listens: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    srv = FakeApiServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def source(server: FakeApiServer) -> Iterator[KubeSource]:
    """A KubeSource configured for the fake server (never started): the daemon's api_client."""
    src = KubeSource([server.url], None, "node-1", lambda e: None, lambda k, i: None)
    yield src
    src.stop()


@pytest.fixture
def make_poster() -> Iterator[Callable[..., NodeEventPoster]]:
    posters: list[NodeEventPoster] = []

    def make(factory: Callable[[], client.ApiClient | None], **kw: Any) -> NodeEventPoster:
        poster = NodeEventPoster("node-1", factory, **kw)
        posters.append(poster)
        return poster

    yield make
    for poster in posters:
        poster.stop(1.0)


def raw_request(
    server: FakeApiServer, method: str, path: str, body: bytes = b""
) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


# --- the fake server takes Events ---


def test_core_v1_event_created_with_the_core_api(server: FakeApiServer) -> None:
    api = client.CoreV1Api(client.ApiClient(client.Configuration(host=server.url)))
    rv_before = server.resource_version
    created = api.create_namespaced_event(
        "kube-system",
        client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name="node-1."),
            involved_object=client.V1ObjectReference(kind="Node", name="node-1"),
            reason="Test",
            message="hello",
            type="Normal",
        ),
    )
    assert re.fullmatch(r"node-1\.[a-z0-9]{5}", created.metadata.name)
    assert created.metadata.namespace == "kube-system"
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert created.metadata.resource_version == str(rv_before + 1) == str(server.resource_version)

    [stored] = server.events()
    assert stored["apiVersion"] == "v1" and stored["kind"] == "Event"
    assert stored["metadata"]["name"] == created.metadata.name
    assert stored["involvedObject"] == {"kind": "Node", "name": "node-1"}
    assert (stored["reason"], stored["message"], stored["type"]) == ("Test", "hello", "Normal")
    path = "/api/v1/namespaces/kube-system/events"
    assert [(r.method, r.path, r.code) for r in server.requests] == [("POST", path, 201)]
    # A copy: the caller cannot change the server's store.
    server.events()[0]["reason"] = "changed"
    assert server.events()[0]["reason"] == "Test"


def test_fake_server_refuses_what_the_real_one_refuses(server: FakeApiServer) -> None:
    event = {
        "metadata": {"name": "e1"},
        "eventTime": "2024-01-02T03:04:05.000001Z",
        "reportingController": "kproxy",
        "reportingInstance": "kproxy-node-1",
        "action": "Repair",
        "reason": "Test",
        "type": "Normal",
        "regarding": {"kind": "Node", "name": "node-1", "apiVersion": "v1"},
    }
    assert raw_request(server, "POST", EVENTS_V1, json.dumps(event).encode())[0] == 201
    status, body = raw_request(server, "POST", EVENTS_V1, json.dumps(event).encode())
    assert (status, body["reason"]) == (409, "AlreadyExists")
    status, body = raw_request(server, "POST", "/api/v1/namespaces/default/pods", b"{}")
    assert (status, body["kind"], body["reason"]) == (404, "Status", "NotFound")
    status, body = raw_request(server, "POST", EVENTS_V1, b"{not json")
    assert (status, body["reason"]) == (400, "BadRequest")
    other_ns = {**event, "metadata": {"name": "e2", "namespace": "other"}}
    assert raw_request(server, "POST", EVENTS_V1, json.dumps(other_ns).encode())[0] == 400
    # MicroTime: exactly six fractional digits and a zone, or the server cannot decode it.
    for bad in ("2024-01-02T03:04:05+00:00", "2024-01-02T03:04:05.123Z", "2024-01-02T03:04:05"):
        wrong = {**event, "metadata": {"name": "e3"}, "eventTime": bad}
        status, body = raw_request(server, "POST", EVENTS_V1, json.dumps(wrong).encode())
        assert (status, body["reason"]) == (400, "BadRequest"), bad
    no_action = {k: v for k, v in event.items() if k != "action"} | {"metadata": {"name": "e4"}}
    status, body = raw_request(server, "POST", EVENTS_V1, json.dumps(no_action).encode())
    assert (status, body["reason"]) == (422, "Invalid") and "action" in body["message"]
    assert [e["metadata"]["name"] for e in server.events()] == ["e1"]
    assert [r.code for r in server.requests] == [201, 409, 404, 400, 400, 400, 400, 400, 422]
    assert {r.method for r in server.requests} == {"POST"}


def test_fake_server_failure_modes_apply_to_posts(server: FakeApiServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    server.set_fail("500")
    conn.request("POST", EVENTS_V1, body=b'{"metadata": {"name": "x"}}')
    resp = conn.getresponse()
    assert resp.status == 500 and json.loads(resp.read())["code"] == 500
    server.set_fail(None)
    # The same kept-alive connection still works: the failed POST's body was read, not left
    # to be taken for the next request.
    conn.request("GET", "/api/v1/services")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["kind"] == "ServiceList"
    conn.close()

    server.set_fail("drop")
    with pytest.raises((http.client.HTTPException, OSError)):
        raw_request(server, "POST", EVENTS_V1, b"{}")
    server.set_fail(None)
    assert [(r.method, r.code) for r in server.requests] == [
        ("POST", 500),
        ("GET", 200),
        ("POST", 0),
    ]
    assert server.events() == []


# --- NodeEventPoster ---


def test_post_arrives_as_an_events_v1_event(
    server: FakeApiServer, source: KubeSource, make_poster: Callable[..., NodeEventPoster]
) -> None:
    node = server.apply({"kind": "Node", "metadata": {"name": "node-1"}})
    poster = make_poster(source.api_client, node_uid=lambda: node["metadata"]["uid"])
    before = datetime.now(UTC)
    note = "nat KUBE-SERVICES flushed by iptables (pid 5122); repaired in 40 ms"
    poster.post("RulesFlushed", note)
    wait_for(lambda: poster.posted == 1)

    [event] = server.events()
    assert event["apiVersion"] == "events.k8s.io/v1" and event["kind"] == "Event"
    assert re.fullmatch(r"node-1\.[0-9a-f]{16}", event["metadata"]["name"])
    assert event["metadata"]["namespace"] == "default"
    assert event["regarding"] == {
        "kind": "Node",
        "name": "node-1",
        "apiVersion": "v1",
        "uid": node["metadata"]["uid"],
    }
    assert (event["reason"], event["note"], event["type"], event["action"]) == (
        "RulesFlushed",
        note,
        "Warning",
        "Repair",
    )
    assert event["reportingController"] == "kproxy"
    assert event["reportingInstance"] == "kproxy-node-1"
    assert re.fullmatch(r".*T.*\.\d{6}(Z|[+-]\d\d:\d\d)", event["eventTime"])
    when = datetime.fromisoformat(event["eventTime"])
    assert before - timedelta(seconds=1) <= when <= datetime.now(UTC)
    assert [(r.method, r.path, r.code) for r in server.requests] == [("POST", EVENTS_V1, 201)]
    assert (poster.failed, poster.dropped, poster.suppressed) == (0, 0, 0)


def test_events_go_in_order_with_unique_names_and_limits(
    server: FakeApiServer, source: KubeSource, make_poster: Callable[..., NodeEventPoster]
) -> None:
    poster = make_poster(source.api_client, component="kproxy-test")
    for i in range(5):
        poster.post("Step", f"note {i}", type_="Normal", action="Sync")
    long_note = "é" * 1000  # 2000 bytes: the API's 1024 limit counts bytes
    poster.post("Long", long_note)
    wait_for(lambda: poster.posted == 6)
    events = server.events()
    assert [e["note"] for e in events[:5]] == [f"note {i}" for i in range(5)]
    assert len({e["metadata"]["name"] for e in events}) == 6
    assert {(e["type"], e["action"]) for e in events[:5]} == {("Normal", "Sync")}
    assert events[0]["reportingController"] == "kproxy-test"
    assert events[0]["reportingInstance"] == "kproxy-test-node-1"
    assert "uid" not in events[0]["regarding"]
    assert len(events[5]["note"].encode()) <= 1024 and events[5]["note"].startswith("éé")


def test_event_time_on_a_whole_second_is_still_a_micro_time(
    server: FakeApiServer,
    source: KubeSource,
    make_poster: Callable[..., NodeEventPoster],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The client writes datetimes with isoformat(), which leaves out a zero fraction; the
    # server then refuses the Event (400), about once in a million posts.
    monkeypatch.setattr(nodeevents, "_utcnow", lambda: datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC))
    poster = make_poster(source.api_client)
    poster.post("Whole", "second")
    wait_for(lambda: poster.posted or poster.failed)
    assert (poster.posted, poster.failed) == (1, 0)
    assert server.events()[0]["eventTime"] == "2024-01-02T03:04:05.000001+00:00"


def test_failed_posts_are_counted_and_logged_once(
    server: FakeApiServer,
    source: KubeSource,
    make_poster: Callable[..., NodeEventPoster],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    poster = make_poster(source.api_client)
    server.set_fail("500")
    for i in range(3):
        poster.post("Repair", f"failing {i}")  # distinct notes: none is suppressed
    wait_for(lambda: poster.failed == 3)
    server.set_fail("drop")
    poster.post("Repair", "dropped 1")
    poster.post("Repair", "dropped 2")
    wait_for(lambda: poster.failed == 5)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # one per distinct error
    assert "HTTP 500" in warnings[0].getMessage() and "fake failure" in warnings[0].getMessage()
    assert all("\n" not in r.getMessage() and r.exc_info is None for r in warnings)

    server.set_fail(None)
    # The very note that failed first: a failed post does not hold it back as a duplicate.
    poster.post("Repair", "failing 0")
    wait_for(lambda: poster.posted == 1)
    assert [e["note"] for e in server.events()] == ["failing 0"]
    assert (poster.failed, poster.suppressed) == (5, 0)
    assert any("works again" in r.getMessage() for r in caplog.records)
    codes = [r.code for r in server.requests if r.method == "POST"]
    assert codes == [500, 500, 500, 0, 0, 201]


def test_unreachable_server_and_missing_client_fail_quietly(
    make_poster: Callable[..., NodeEventPoster], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    cfg = client.Configuration(host=dead_url())
    cfg.retries = False
    dead = client.ApiClient(cfg)
    poster = make_poster(lambda: dead)
    for i in range(3):
        poster.post("Repair", f"refused {i}")
    wait_for(lambda: poster.failed == 3)
    # Connection errors name a fresh connection object each time; still one line in all.
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
    assert "refused" in caplog.records[0].getMessage().lower()

    caplog.clear()
    no_client = make_poster(lambda: None)
    no_client.post("Repair", "nowhere")
    no_client.post("Repair", "nowhere else")
    wait_for(lambda: no_client.failed == 2)
    assert len(caplog.records) == 1 and "no API client" in caplog.records[0].getMessage()


def test_same_note_within_the_window_is_suppressed(
    server: FakeApiServer, source: KubeSource, make_poster: Callable[..., NodeEventPoster]
) -> None:
    poster = make_poster(source.api_client, dedupe_seconds=60)
    poster.post("Flushed", "nat flushed")
    poster.post("Flushed", "nat flushed")
    poster.post("Flushed", "filter flushed")  # another note
    poster.post("Other", "nat flushed")  # another reason
    wait_for(lambda: poster.posted == 3)
    poster.post("Flushed", "nat flushed")
    time.sleep(0.1)
    assert poster.suppressed == 2 and poster.posted == 3
    assert [(e["reason"], e["note"]) for e in server.events()] == [
        ("Flushed", "nat flushed"),
        ("Flushed", "filter flushed"),
        ("Other", "nat flushed"),
    ]

    short = make_poster(source.api_client, dedupe_seconds=0.2)
    short.post("Flushed", "mangle flushed")
    short.post("Flushed", "mangle flushed")
    time.sleep(0.3)  # the window has passed: the same note is news again
    short.post("Flushed", "mangle flushed")
    wait_for(lambda: short.posted == 2)
    assert short.suppressed == 1


def test_post_never_blocks_and_a_full_queue_drops(
    server: FakeApiServer,
    source: KubeSource,
    make_poster: Callable[..., NodeEventPoster],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    entered, gate = threading.Event(), threading.Event()

    def stuck() -> client.ApiClient:
        # The poster thread waits here as in a request to a server that does not answer.
        entered.set()
        gate.wait(10)
        return source.api_client()

    poster = make_poster(stuck, max_queue=1)
    poster.post("Repair", "first")  # taken by the thread, which then hangs
    assert entered.wait(5)
    start = time.monotonic()
    poster.post("Repair", "second")  # fills the queue
    for i in range(3):
        poster.post("Repair", f"extra {i}")
    assert time.monotonic() - start < 0.5
    assert poster.dropped == 3
    assert sum("queue full" in r.getMessage() for r in caplog.records) == 1

    gate.set()
    wait_for(lambda: poster.posted == 2)
    time.sleep(0.1)
    assert [e["note"] for e in server.events()] == ["first", "second"]
    # Drained: the queue takes events again.
    poster.post("Repair", "third")
    wait_for(lambda: poster.posted == 3)
    assert poster.dropped == 3


def test_stop_posts_what_is_queued(
    server: FakeApiServer, source: KubeSource, make_poster: Callable[..., NodeEventPoster]
) -> None:
    poster = make_poster(source.api_client)
    for i in range(3):
        poster.post("Repair", f"n{i}")
    poster.stop(5.0)
    assert poster.posted == 3 and not poster._thread.is_alive()
    assert [e["note"] for e in server.events()] == ["n0", "n1", "n2"]
    poster.post("Repair", "after stop")  # ignored, not an error
    assert poster.dropped == 1


def test_stop_returns_within_its_timeout(make_poster: Callable[..., NodeEventPoster]) -> None:
    gate = threading.Event()
    poster = make_poster(lambda: gate.wait(10) and None)
    for i in range(5):
        poster.post("Repair", f"n{i}")
    start = time.monotonic()
    poster.stop(0.3)
    assert time.monotonic() - start < 0.6
    gate.set()
    # Once unblocked, the thread gives up on what is left instead of posting past the stop.
    wait_for(lambda: not poster._thread.is_alive())
    assert poster.failed == 1 and poster.dropped == 4 and poster.posted == 0

    idle = make_poster(lambda: None)
    start = time.monotonic()
    idle.stop(2.0)
    assert time.monotonic() - start < 0.5 and not idle._thread.is_alive()


def test_error_text_is_the_same_for_the_same_failure() -> None:
    # urllib3 1.x names the connection object, at a new address each time.
    def refused(address: str, name: str) -> str:
        err = OSError(f"<urllib3.connection.HTTPConnection object at {address}>: refused ({name})")
        return nodeevents._describe(err, name)

    assert refused("0x7f3a1c", "node-1.1") == refused("0x7f9e00", "node-1.2")
    assert "node-1.1" not in refused("0x7f3a1c", "node-1.1")
