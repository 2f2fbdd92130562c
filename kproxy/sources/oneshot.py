"""The cluster state of a one-shot command (`kproxy sync`, `diff`): a state file when one is
given, else one list from the API server, else the last-known-good cache (cache.fallback,
the daemon's policy too)."""

from __future__ import annotations

import logging

from kproxy.model import ClusterState, build_state
from kproxy.sources import cache
from kproxy.sources.statefile import StateFileError, load_state

log = logging.getLogger(__name__)


def read_cluster(
    state_file: str | None,
    node_name: str,
    *,
    servers: list[str],
    kubeconfig: str | None,
    api_timeout: float,
    state_cache: str,
    state_cache_max_age: float,
    cache_fallback: bool = True,
    save_cache: bool = True,
) -> tuple[ClusterState, list[str]]:
    """From `state_file`, else from the API server (then saved as the cache when
    `save_cache`), else from the cache at `state_cache`. Raises StateFileError when none can
    be used."""
    if state_file:
        return load_state(state_file, node_name)
    from kproxy.sources.kube import (  # loads the client: slow
        KubeSource,
        NoConfiguration,
        SourceUnavailable,
    )

    try:
        source = KubeSource(
            servers or None,
            kubeconfig,
            node_name,
            on_event=lambda e: None,
            on_resync=lambda k, i: None,
        )
        objects = source.list_once(timeout=api_timeout)
    except SourceUnavailable as err:
        # No configuration says itself what was tried and what to pass.
        why = str(err) if isinstance(err, NoConfiguration) else f"API server unreachable ({err})"
        if not cache_fallback:
            raise StateFileError(why) from None
        try:
            cached = cache.fallback(state_cache, state_cache_max_age)
        except cache.CacheUnusable as cache_err:
            raise StateFileError(
                f"{why}; and no usable state cache at {state_cache} ({cache_err})"
            ) from None
        log.warning(
            "API server unreachable (%s); using the last-known-good state from %s, "
            "saved %.0fs ago%s",
            err,
            state_cache,
            cached.age(),
            " — older than --state-cache-max-age" if cached.stale else "",
        )
        return build_state(cached.objects, node_name)
    state, warnings = build_state(objects, node_name)
    if save_cache:
        try:
            cache.save(state_cache, objects, node_name)
        except OSError as err:
            log.warning(
                "could not refresh the state cache %s: %s", state_cache, err.strerror or err
            )
    return state, warnings
