"""Bad input (scenario 7): malformed objects never crash kproxy nor reach the kernel.

The hypothesis properties run without root; the kernel test runs the short scenario (objects
through the API server into `kproxy run` and through a state file into `kproxy sync`, every
render checked by iptables-restore --test)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kproxy.iptables.render import IPV4, IPV6, render
from kproxy.model import (
    InvalidObject,
    NodeConfig,
    build_state,
    endpoint_slice_from_k8s,
    service_from_k8s,
)
from kproxy.nftables.render import NFT_IPV4, NFT_IPV6, render_nft
from kproxy.sources.store import ObjectStore
from tests.chaos import badinput

CONFIG = NodeConfig(node_name="node-1", cluster_cidrs=("10.244.0.0/16",))


def svc(svc_name="web", namespace="default", **port):
    return {
        "kind": "Service",
        "metadata": {"name": svc_name, "namespace": namespace},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, **port}]},
    }


def eps(ip, address_type="IPv6"):
    return {
        "kind": "EndpointSlice",
        "metadata": {"name": "s", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": address_type,
        "endpoints": [{"addresses": [ip]}],
    }


# --- regressions: each of these crashed kproxy or broke a restore before


@pytest.mark.parametrize("target", ["²", "٣", "①"])
def test_a_non_ascii_digit_target_port_is_not_a_crash(target):
    # "²".isdigit() is true and int("²") raised ValueError, which nobody caught: the watch
    # relisted forever and `kproxy sync --state` died with a traceback.
    svc_ = service_from_k8s(svc(targetPort=target))
    assert svc_ is not None and svc_.ports[0].target_port == target  # a (named) port
    state, warnings = build_state([svc(targetPort=target)])
    assert len(state.services) == 1


@pytest.mark.parametrize(
    "ip", ["fe80::1%eth0", "fd00::1%\n-A KUBE-SERVICES -j DROP", "fd00::1%a b"]
)
def test_an_address_with_a_zone_index_is_rejected(ip):
    # ipaddress accepts "addr%<anything>"; it went into rules verbatim (a newline in it split
    # the iptables-restore payload).
    with pytest.raises(InvalidObject, match="zone index"):
        endpoint_slice_from_k8s(eps(ip))
    with pytest.raises(InvalidObject, match="zone index"):
        service_from_k8s({**svc(), "spec": {"clusterIP": ip, "ports": [{"port": 80}]}})


@pytest.mark.parametrize(
    "name, namespace, port_name, field",
    [
        ("new\nline", "default", None, "metadata.name"),
        ('q"uote', "default", None, "metadata.name"),
        ("space name", "default", None, "metadata.name"),
        ("x" * 64, "default", None, "metadata.name"),
        ("UPPER", "default", None, "metadata.name"),
        ("web", "ns\n", None, "metadata.namespace"),
        ("web", "ünï", None, "metadata.namespace"),
        ("web", "default", 'a"b\nc', "spec.ports[0].name"),
    ],
)
def test_names_that_the_api_server_would_refuse_are_rejected(name, namespace, port_name, field):
    # A newline in a name went into a rule comment and broke the whole restore: no Service of
    # the family was updated any more.
    obj = svc(name, namespace, **({"name": port_name} if port_name else {}))
    with pytest.raises(InvalidObject) as err:
        service_from_k8s(obj)
    assert err.value.field_path == field
    assert "\n" not in str(err.value)  # one warning line


def test_valid_names_still_pass():
    assert service_from_k8s(svc("a-b-1", "kube-system", name="dns-tcp")) is not None


# --- properties


@settings(max_examples=300, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(badinput.objects(), max_size=6))
def test_no_object_crashes_the_store_the_loader_or_the_renderers(objs):
    store = ObjectStore("node-1")
    for obj in objs:
        store.apply(obj["kind"], "ADDED", obj)
    store.resync("Service", [o for o in objs if o["kind"] == "Service"])
    state, _ = store.snapshot()
    for fam in (IPV4, IPV6):
        render(state, CONFIG, fam)
    for fam in (NFT_IPV4, NFT_IPV6):
        render_nft(state, CONFIG, fam)
    build_state(objs, "node-1")


@settings(max_examples=150, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(badinput.objects())
def test_a_bad_object_is_reported_once_per_change(obj):
    warned: list[str] = []
    store = ObjectStore("node-1", warn=warned.append)
    store.apply(obj["kind"], "ADDED", obj)
    first = len(warned)
    assert first <= 1 + len(json.dumps(obj, default=str))  # bounded, and...
    store.snapshot()
    # ...a relist with the same object (same resourceVersion) reports nothing again.
    obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": "7"}}
    store.resync(obj["kind"], [obj])
    after_change = len(warned)
    store.resync(obj["kind"], [obj])
    store.snapshot()
    assert len(warned) == after_change


# --- the kernel


@pytest.mark.kernel
def test_bad_input_never_reaches_the_kernel(kernel_support):
    result = badinput.bad_input(short=True)
    print(json.dumps(result, indent=1, default=str))
    assert result["problems"] == [], json.dumps(result, indent=1, default=str)


def test_a_relist_does_not_report_a_bad_object_again():
    # Invalid objects were not remembered, so every relist (each 410 Gone) warned again.
    warned: list[str] = []
    store = ObjectStore("node-1", warn=warned.append)
    bad = svc(targetPort=0)
    bad["metadata"]["resourceVersion"] = "5"
    store.resync("Service", [bad])
    store.resync("Service", [bad])
    store.apply("Service", "MODIFIED", bad)  # a watch replaying the same version
    assert len(warned) == 2  # the list, then the watch event (an event counts as a change)
    bad = {**bad, "metadata": {**bad["metadata"], "resourceVersion": "6"}}
    store.resync("Service", [bad])
    assert len(warned) == 3
    store.resync("Service", [])  # gone: forgotten
    store.resync("Service", [bad])
    assert len(warned) == 4
