"""The API server: reachable with the configured credentials (as `kproxy run` reads them),
and the bearer token's expiry."""

from __future__ import annotations

import base64
import json
import time

from kproxy.doctor.context import Context
from kproxy.doctor.result import FAIL, OK, SKIPPED, WARN, Result

TOKEN_WARN_SECONDS = 24 * 3600


def jwt_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT (epoch seconds), decoded without verification; None for a
    token that is not a JWT or has none."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, TypeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, (int, float)) else None


def _token(cfg) -> str | None:
    if cfg.refresh_api_key_hook is not None:
        try:
            cfg.refresh_api_key_hook(cfg)
        except Exception:  # a token file that went away: the request below says so
            pass
    value = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
    if not value:
        return None
    return value.split(" ", 1)[1] if value.lower().startswith("bearer ") else value


def apiserver(ctx: Context) -> Result:
    """List Services (limit 1) at each configured address with the configured credentials
    (`--master`, `--kubeconfig`, else in-cluster, else $KUBECONFIG or ~/.kube/config, as
    `kproxy run` reads them), as the daemon's first request does; the token's exp claim:
    expired fails, within a day warns. Skipped when there is no configuration at all."""
    name = "apiserver"
    from kubernetes import client

    from kproxy.sources.kube import NoConfiguration, SourceUnavailable, _configurations

    try:
        configs = _configurations(ctx.servers or None, ctx.kubeconfig)
    except NoConfiguration as err:
        if not ctx.servers and not ctx.kubeconfig:
            # Not in a pod, no kubeconfig: nothing to check against.
            return Result(name, SKIPPED, f"no API server configured ({err})")
        return Result(name, FAIL, str(err), "apiserver")
    except SourceUnavailable as err:
        return Result(name, FAIL, str(err), "apiserver")
    notes, status = [], OK
    for cfg in configs:
        if ctx.api_limiter is not None:
            ctx.api_limiter.take()
        try:
            with client.ApiClient(cfg) as api:
                # What the daemon does first, with its credentials: list Services (one).
                resp = client.CoreV1Api(api).list_service_for_all_namespaces(
                    limit=1, _preload_content=False, _request_timeout=ctx.api_timeout
                )
                resp.release_conn()
            notes.append(f"{cfg.host} lists Services (HTTP {resp.status})")
        except client.ApiException as err:
            notes.append(f"{cfg.host} answers {err.status} {err.reason}")
            status = FAIL
        except Exception as err:  # refused, TLS, timeout: one line
            notes.append(f"{cfg.host} unreachable: {' '.join(str(err).split())[:160]}")
            status = FAIL
    token = _token(configs[0]) if configs else None  # one set of credentials for every address
    exp = jwt_expiry(token) if token else None
    if exp is not None:
        left = exp - time.time()
        if left <= 0:
            notes.append(f"token expired {-left:.0f}s ago")
            status = FAIL
        else:
            notes.append(f"token expires in {left / 3600:.1f}h")
            if left < TOKEN_WARN_SECONDS and status == OK:
                status = WARN
    return Result(name, status, "; ".join(notes), "" if status == OK else "apiserver")
