"""The daemon's object store: change tracking, relists without churn, bad updates."""

import copy
import json

from kproxy.sources.store import ObjectStore


def service(name, ip="10.96.0.1", rv="1", port=80):
    return {
        "kind": "Service",
        "metadata": {"namespace": "ns", "name": name, "resourceVersion": rv},
        "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": port}]},
    }


def eps(name, svc, *ips, rv="1", trigger=None):
    meta = {
        "namespace": "ns",
        "name": name,
        "resourceVersion": rv,
        "labels": {"kubernetes.io/service-name": svc},
    }
    if trigger:
        meta["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": trigger}
    return {
        "kind": "EndpointSlice",
        "metadata": meta,
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080}],
        "endpoints": [{"addresses": [ip]} for ip in ips],
    }


def test_changes_name_the_services_touched():
    store = ObjectStore("node-1")
    store.resync("Service", [service("a"), service("b", "10.96.0.2")])
    store.resync("EndpointSlice", [eps("a-1", "a", "10.1.0.1")])
    state, changes = store.snapshot()
    assert set(state.services) == {("ns", "a"), ("ns", "b")}
    assert changes.services == {("ns", "a"), ("ns", "b")}
    # An endpoint change marks its Service only.
    store.apply(
        "EndpointSlice",
        "MODIFIED",
        eps("a-1", "a", "10.1.0.2", rv="2", trigger="2026-11-30T00:00:00Z"),
    )
    _, changes = store.snapshot()
    assert changes.services == {("ns", "a")}
    assert changes.endpoint_events == 1 and len(changes.trigger_times) == 1
    # Nothing since: an empty change set.
    _, changes = store.snapshot()
    assert not changes.any()


def test_relist_with_nothing_new_changes_nothing():
    store = ObjectStore("node-1")
    objs = [service("a"), service("b", "10.96.0.2")]
    assert store.resync("Service", objs)
    store.snapshot()
    assert not store.resync("Service", copy.deepcopy(objs))
    assert not store.snapshot()[1].any()
    # A relist that lost one object is its deletion.
    assert store.resync("Service", objs[:1])
    state, changes = store.snapshot()
    assert set(state.services) == {("ns", "a")} and changes.services == {("ns", "b")}


def test_new_resource_version_with_equal_content_is_no_change():
    store = ObjectStore("node-1")
    store.apply("Service", "ADDED", service("a"))
    store.snapshot()
    assert not store.apply("Service", "MODIFIED", service("a", rv="7"))


def test_invalid_update_keeps_last_valid_version_and_warns_once():
    warnings = []
    store = ObjectStore("node-1", warn=warnings.append)
    store.apply("Service", "ADDED", service("a"))
    store.snapshot()
    assert not store.apply("Service", "MODIFIED", service("a", rv="2", port=70000))
    state, changes = store.snapshot()
    assert state.services[("ns", "a")].ports[0].port == 80
    assert not changes.services
    assert len(warnings) == 1 and "Service ns/a: spec.ports[0].port" in warnings[0]


def test_only_this_node_is_kept():
    store = ObjectStore("node-1")
    store.apply("Node", "ADDED", {"kind": "Node", "metadata": {"name": "node-2"}})
    assert store.snapshot()[0].node is None
    store.apply(
        "Node",
        "ADDED",
        {
            "kind": "Node",
            "metadata": {"name": "node-1"},
            "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]},
        },
    )
    state, changes = store.snapshot()
    assert state.node.name == "node-1" and state.node.tainted_for_deletion and changes.node


def test_deleted_slice_marks_its_service():
    store = ObjectStore("node-1")
    store.apply("EndpointSlice", "ADDED", eps("a-1", "a", "10.1.0.1"))
    store.snapshot()
    store.apply("EndpointSlice", "DELETED", eps("a-1", "a", "10.1.0.1"))
    state, changes = store.snapshot()
    assert not state.slices and changes.services == {("ns", "a")}


def test_cache_copy_is_the_objects_without_managed_fields(tmp_path):
    """The store keeps each object as compact JSON for the last-known-good cache; the cache
    file written from it loads back as the objects the API sent, minus managedFields."""
    from kproxy.sources import cache

    store = ObjectStore("node-1")
    svc = service("web")
    svc["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    slice_ = eps("web-x", "web", "10.1.0.1")
    store.resync("Service", [svc])
    store.resync("EndpointSlice", [slice_])
    path = tmp_path / "state.json"
    cache.save(path, store.raw_objects(), "node-1")
    loaded = cache.load(path).objects
    expected = copy.deepcopy(svc)
    del expected["metadata"]["managedFields"]
    assert loaded == [expected, slice_]
    assert svc["metadata"]["managedFields"], "the caller's object must not be changed"

    # A relist without the slice deletes it from the copy too.
    store.resync("EndpointSlice", [])
    assert [json.loads(o)["kind"] for o in store.raw_objects()] == ["Service"]


def test_slice_port_without_a_number_warns_once_and_keeps_the_slice():
    warnings = []
    store = ObjectStore("node-1", warn=warnings.append)
    bad = eps("a-1", "a", "10.1.0.1")
    bad["ports"] = [{"name": "q", "port": None}, {"name": "p", "port": 8080}]
    store.resync("EndpointSlice", [bad])
    state, _ = store.snapshot()
    assert [p.name for p in state.slices[("ns", "a-1")].ports] == ["p"]
    assert len(warnings) == 1 and "EndpointSlice ns/a-1: ports[0].port" in warnings[0]
    # The same version listed again is no change and no second warning.
    assert not store.resync("EndpointSlice", [copy.deepcopy(bad)])
    assert len(warnings) == 1


def test_cache_fills_only_kinds_the_api_has_not_listed():
    """Start-up with one list late: the state cache fills the kinds not yet listed, never
    a kind the API has listed (its watch would not send the newer objects again)."""
    store = ObjectStore("node-1")
    store.resync("Service", [service("a", "10.96.0.1", rv="9")])
    assert not store.seed("Service", [service("a", "10.96.0.99", rv="3"), service("old")])
    assert store.seed("EndpointSlice", [eps("a-1", "a", "10.1.0.1", rv="4")])
    assert not store.seed("Node", [])  # nothing cached for a kind: nothing from the cache
    state, _ = store.snapshot()
    assert set(state.services) == {("ns", "a")}
    assert state.services[("ns", "a")].cluster_ips == ("10.96.0.1",)
    assert set(state.slices) == {("ns", "a-1")}
    assert store.cached_kinds() == {"EndpointSlice"}
    # Half cache, half API: not a state to save as the API's.
    assert store.api_objects() is None


def test_api_list_replaces_what_the_cache_filled():
    store = ObjectStore("node-1")
    store.seed("Service", [service("a", rv="3"), service("gone", "10.96.0.2", rv="2")])
    store.seed("EndpointSlice", [eps("a-1", "a", "10.1.0.1", rv="4")])
    store.snapshot()
    # The real lists: a changed, `gone` deleted meanwhile, a-1 replaced by a-2.
    assert store.resync("Service", [service("a", "10.96.0.3", rv="7")])
    assert store.cached_kinds() == {"EndpointSlice"}
    assert store.resync("EndpointSlice", [eps("a-2", "a", "10.1.0.2", rv="8")])
    state, changes = store.snapshot()
    assert set(state.services) == {("ns", "a")}
    assert state.services[("ns", "a")].cluster_ips == ("10.96.0.3",)
    assert set(state.slices) == {("ns", "a-2")}
    assert changes.services == {("ns", "a"), ("ns", "gone")}
    assert store.cached_kinds() == set()
    saved = [json.loads(o) for o in store.api_objects()]
    assert [o["metadata"]["resourceVersion"] for o in saved] == ["7", "8"]
    # Listed once, a kind is never filled from the cache again.
    assert not store.seed("EndpointSlice", [eps("a-1", "a", "10.1.0.1", rv="4")])
