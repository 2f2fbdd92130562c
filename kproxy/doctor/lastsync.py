"""The last sync: the running daemon's /healthz (per family lastUpdated) and the state
cache's age."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from datetime import datetime

from kproxy.daemon.metrics import split_host_port
from kproxy.doctor.context import Context
from kproxy.doctor.result import FAIL, OK, SKIPPED, WARN, Result


def _epoch(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def healthz_url(bind: str) -> str:
    host, port = split_host_port(bind, 10256)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/healthz"


def fetch_healthz(url: str, timeout: float = 3.0) -> tuple[int, dict] | None:
    """(status, JSON body) of /healthz; None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        try:
            return err.code, json.loads(err.read() or b"{}")
        except ValueError:
            return err.code, {}
    except (OSError, ValueError):
        return None


def last_sync(ctx: Context) -> Result:
    """How long ago each family last synced, as the daemon's /healthz says (its per-family
    lastUpdated), and the state cache's age; unhealthy or older than two sync periods fails,
    a missing or old state cache warns."""
    name = "last_sync"
    notes, status = [], OK
    url = healthz_url(ctx.healthz_bind) if ctx.healthz_bind else ""
    answer = fetch_healthz(url) if url else None
    if not url:  # the daemon runs with its health server off: only the state cache tells
        notes.append("no /healthz to ask (--healthz-bind-address is empty)")
        status = SKIPPED
    elif answer is None:
        notes.append(f"no daemon answers on {url}")
        status = SKIPPED
    else:
        code, body = answer
        now = _epoch(body.get("currentTime")) or time.time()
        families = body.get("status") or {}
        for fam, info in sorted(families.items()):
            last = _epoch((info or {}).get("lastUpdated"))
            if last is None:
                # Just started (the daemon's own first round runs before its first sync):
                # unhealthy only once /healthz says so.
                notes.append(f"{fam} not synced yet")
                healthy = (info or {}).get("healthy", True)
                status = FAIL if not healthy else (WARN if status == OK else status)
                continue
            age = max(0.0, now - last)
            notes.append(f"{fam} synced {age:.0f}s ago")
            if age > 2 * ctx.sync_period or not (info or {}).get("healthy", True):
                status = FAIL
        if code != 200 and status == OK:
            status = WARN
            notes.append(f"/healthz answers {code}")
        if body.get("stateCacheAgeSeconds") is not None:
            notes.append(
                f"running from the state cache saved {body['stateCacheAgeSeconds']:.0f}s ago"
            )
            status = FAIL if status == FAIL else WARN
    if ctx.state_cache:
        from kproxy.sources import cache

        try:
            age = cache.load(ctx.state_cache).age()
        except (OSError, ValueError) as err:
            why = getattr(err, "strerror", None) or err
            notes.append(f"no state cache at {ctx.state_cache} ({why})")
        else:
            notes.append(f"state cache saved {age:.0f}s ago")
            if age > ctx.state_cache_max_age and status in (OK, SKIPPED):
                status = WARN
    remedy = "last-sync" if status in (WARN, FAIL) else ""
    return Result(name, status, "; ".join(notes), remedy)
