"""What the checks need to know about how kproxy runs on this node: the same settings
`kproxy run` takes (doctor accepts them under the same flags)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Context:
    mode: str = "iptables"  # the mode kproxy runs (or is to run) in
    iptables_backend: str = "auto"
    # The running daemon's /healthz and /metrics (host:port, as `kproxy run` takes them; "":
    # that server is off).
    healthz_bind: str = "0.0.0.0:10256"
    metrics_bind: str = "127.0.0.1:10249"
    servers: list[str] = field(default_factory=list)  # --master
    kubeconfig: str | None = None
    api_timeout: float = 5.0
    state_cache: str | None = None
    state_cache_max_age: float = 3600.0
    sync_period: float = 30.0
    # conntrack table: warn from this share of nf_conntrack_max, fail from the second.
    conntrack_warn: float = 0.8
    conntrack_fail: float = 0.95
    # Where ufw keeps its switch.
    ufw_conf: str = "/etc/ufw/ufw.conf"
    # The pid of the process running the checks (the daemon's own listeners are kproxy's).
    own_pid: int | None = None
    # In the daemon: who fought kproxy over its rules lately (its drift repairs' limiter
    # stepped in), each "process (pid N)"; another proxy writes the same chains.
    fought_by: Callable[[], list[str]] | None = None
    # In the daemon: its client-side rate limit (sources/ratelimit.TokenBucket), taken before
    # each request the apiserver check sends, as every other request of the daemon's.
    api_limiter: Any = None
