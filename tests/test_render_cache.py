"""A render that reuses cached Service ports equals a render from scratch, after any change."""

import random

from kproxy.iptables.render import render
from kproxy.model import NodeConfig
from kproxy.rendercache import RenderCache
from kproxy.sources.store import ObjectStore
from tests.synthetic import generate


def tables_of(result):
    return {name: dict(t.chains) for name, t in result.ruleset.tables.items()}


def test_cached_render_equals_fresh_render_through_random_changes():
    rng = random.Random(7)
    store = ObjectStore("node-1")
    objects = generate(40, 3)
    store.resync("Service", [o for o in objects if o["kind"] == "Service"])
    store.resync("EndpointSlice", [o for o in objects if o["kind"] == "EndpointSlice"])
    config = NodeConfig(node_name="node-1", cluster_cidrs=("10.244.0.0/16",))
    cache = RenderCache()
    for step in range(60):
        state, _ = store.snapshot()
        cached = render(state, config, cache=cache)
        fresh = render(state, config)
        assert tables_of(cached) == tables_of(fresh), f"step {step}"
        assert cached.no_local_endpoints == fresh.no_local_endpoints
        slices = [o for o in objects if o["kind"] == "EndpointSlice"]
        target = rng.choice(slices)
        action = rng.choice(["add", "remove", "ready", "node"])
        eps = target["endpoints"]
        if action == "add":
            eps.append({"addresses": [f"10.200.{step}.{rng.randint(1, 250)}"]})
        elif action == "remove" and eps:
            eps.pop(rng.randrange(len(eps)))
        elif action == "ready" and eps:
            e = rng.choice(eps)
            e["conditions"] = {"ready": not e.get("conditions", {}).get("ready", True)}
        elif eps:
            rng.choice(eps)["nodeName"] = rng.choice(["node-1", "node-2"])
        target["metadata"]["resourceVersion"] = str(step + 100)
        store.apply("EndpointSlice", "MODIFIED", {**target, "endpoints": list(eps)})


def test_unchanged_service_ports_are_not_rendered_again():
    store = ObjectStore("node-1")
    objects = generate(20, 2)
    store.resync("Service", [o for o in objects if o["kind"] == "Service"])
    store.resync("EndpointSlice", [o for o in objects if o["kind"] == "EndpointSlice"])
    cache = RenderCache()
    render(store.snapshot()[0], NodeConfig(), cache=cache)
    assert cache.misses == 20
    slice_ = next(o for o in objects if o["metadata"]["name"] == "svc-3-x")
    slice_["endpoints"] = slice_["endpoints"][:1]
    slice_["metadata"]["resourceVersion"] = "9"
    store.apply("EndpointSlice", "MODIFIED", slice_)
    render(store.snapshot()[0], NodeConfig(), cache=cache)
    assert (cache.misses, cache.hits) == (21, 19)
