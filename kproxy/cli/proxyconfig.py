"""kube-proxy's `--config FILE`: a KubeProxyConfiguration (`kubeproxy.config.k8s.io/v1alpha1`)
read into what kproxy does with each field. Pure: `parse(text)` reads no file and touches
nothing; cli/dropin.py reads the file and applies the result to `kproxy run`'s options.

Decoding is strict, as upstream's first decoder is: an unknown field or a wrong type is a
ConfigError naming the field's path (`iptables.minSyncPeriodd`). A null, and a zero value where
upstream's defaulting treats zero as unset (pkg/proxy/apis/config/v1alpha1/defaults.go), takes
upstream's default, as kubeadm writes every field, most of them null, 0 or "".
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from kproxy.localdetect import INTERFACE_NAME, MODES

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"

# Field types: str, bool, int, float, "duration" (a Go duration string), "strlist",
# "boolmap" (map[string]bool), "quantity" (a string or an int), "any" (not looked into), or a
# dict for a nested object.
_DURATION, _STRLIST, _BOOLMAP, _QUANTITY, _ANY = "duration", "strlist", "boolmap", "quantity", "any"
_LOG_OPTS = {"splitStream": bool, "infoBufferSize": _QUANTITY}
SCHEMA: dict[str, Any] = {
    "apiVersion": str,
    "kind": str,
    "featureGates": _BOOLMAP,
    "clientConnection": {
        "kubeconfig": str,
        "acceptContentTypes": str,
        "contentType": str,
        "qps": float,
        "burst": int,
    },
    "logging": {
        "format": str,
        "flushFrequency": _QUANTITY,  # nanoseconds or a duration string (TimeOrMetaDuration)
        "verbosity": int,
        "vmodule": _ANY,
        "options": {"json": _LOG_OPTS, "text": _LOG_OPTS},
    },
    "hostnameOverride": str,
    "bindAddress": str,
    "healthzBindAddress": str,
    "metricsBindAddress": str,
    "bindAddressHardFail": bool,
    "enableProfiling": bool,
    "showHiddenMetricsForVersion": str,
    "mode": str,
    "iptables": {
        "masqueradeBit": int,
        "masqueradeAll": bool,
        "localhostNodePorts": bool,
        "syncPeriod": _DURATION,
        "minSyncPeriod": _DURATION,
    },
    "ipvs": {
        "syncPeriod": _DURATION,
        "minSyncPeriod": _DURATION,
        "scheduler": str,
        "excludeCIDRs": _STRLIST,
        "strictARP": bool,
        "tcpTimeout": _DURATION,
        "tcpFinTimeout": _DURATION,
        "udpTimeout": _DURATION,
    },
    "nftables": {
        "masqueradeBit": int,
        "masqueradeAll": bool,
        "syncPeriod": _DURATION,
        "minSyncPeriod": _DURATION,
    },
    "winkernel": {
        "networkName": str,
        "sourceVip": str,
        "enableDSR": bool,
        "rootHnsEndpointName": str,
        "forwardHealthCheckVip": bool,
    },
    "detectLocalMode": str,
    "detectLocal": {"bridgeInterface": str, "interfaceNamePrefix": str},
    "clusterCIDR": str,
    "nodePortAddresses": _STRLIST,
    "oomScoreAdj": int,
    "conntrack": {
        "maxPerCore": int,
        "min": int,
        "tcpEstablishedTimeout": _DURATION,
        "tcpCloseWaitTimeout": _DURATION,
        "tcpBeLiberal": bool,
        "udpTimeout": _DURATION,
        "udpStreamTimeout": _DURATION,
    },
    "configSyncPeriod": _DURATION,
    "portRange": str,
    "windowsRunAsService": bool,
}

# Fields read and accepted but with nothing for kproxy to do: logged once each when set.
NO_EFFECT = {
    # kproxy's client (the Python `kubernetes` client) speaks JSON only: it has no protobuf
    # decoder. Said only when the file asks for something other than JSON.
    "clientConnection.acceptContentTypes": "kproxy's client speaks JSON only",
    "clientConnection.contentType": "kproxy's client speaks JSON only",
    "bindAddressHardFail": "kproxy always exits 2 when it cannot listen",
    "enableProfiling": "kproxy serves no /debug/pprof",
    "showHiddenMetricsForVersion": "kproxy hides no metric",
    "featureGates": "no feature gate changes what kproxy does",
    "oomScoreAdj": "set it in the pod (kproxy does not change its own OOM score)",
    "configSyncPeriod": "kproxy's watches never resync by period",
    "portRange": "the userspace proxy it configured is gone upstream too",
    "logging.vmodule": "kproxy has one verbosity",
    "logging.flushFrequency": "kproxy's log lines are written unbuffered",
    "logging.options": "kproxy's log lines are written unbuffered",
    "ipvs": "mode ipvs runs kproxy's nftables mode, which has no IPVS settings",
    "winkernel": "Windows only",
    "windowsRunAsService": "Windows only",
}

_JSON = "application/json"

_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_GO_UNITS["h"] = 3600.0
_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


class ConfigError(ValueError):
    """A KubeProxyConfiguration kproxy cannot use; the message names the field."""


def go_duration(text: str) -> float:
    """Seconds in a Go duration (time.ParseDuration): `1m0s`, `500ms`, `1h2m3.5s`, `0`."""
    s = text.strip()
    sign = -1.0 if s.startswith("-") else 1.0
    s = s.lstrip("+-")
    if s == "0":
        return 0.0
    total, pos = 0.0, 0
    while pos < len(s):
        m = _GO_DURATION.match(s, pos)
        if not m:
            raise ValueError(f"{text!r} is not a duration (like 1s, 30s, 1m0s)")
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    if not s:
        raise ValueError(f"{text!r} is not a duration (like 1s, 30s, 1m0s)")
    return sign * total


@dataclass(frozen=True)
class ProxyConfig:
    """What kproxy does with a KubeProxyConfiguration; every value is upstream's default when
    the file leaves the field out (null or zero where upstream defaults those)."""

    mode: str = "iptables"  # kproxy's mode: iptables or nftables
    cluster_cidrs: tuple[str, ...] = ()
    detect_local_mode: str = "ClusterCIDR"
    bridge_interface: str = ""
    interface_name_prefix: str = ""
    kubeconfig: str | None = None
    qps: float = 5.0
    burst: int = 10
    content_type: str = "application/vnd.kubernetes.protobuf"
    hostname_override: str = ""
    bind_address: str = "0.0.0.0"
    node_ip: str | None = None  # bindAddress, when it names one (upstream: the primary node IP)
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    nodeport_addresses: tuple[str, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    sync_period: float = 30.0
    min_sync_period: float = 1.0
    localhost_nodeports: bool = True
    # The conntrack sysctls kube-proxy would set (name under /proc/sys -> value), and the
    # per-core maximum they came from (0: leave nf_conntrack_max alone).
    conntrack_sysctls: dict[str, str] = field(default_factory=dict)
    verbosity: int = 0
    log_format: str = "text"
    feature_gates: dict[str, bool] = field(default_factory=dict)
    show_hidden_metrics_for_version: str = ""
    # One line each, for the log: a field kproxy reads but does nothing with, ipvs, ...
    notes: tuple[str, ...] = ()


def parse(text: str, source: str = "--config", ncpu: int = 1) -> ProxyConfig:
    """The KubeProxyConfiguration in `text` (YAML or JSON). `ncpu` is the node's CPU count
    (for conntrack.maxPerCore). Raises ConfigError naming the field at fault."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}: not YAML or JSON{where}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: not a KubeProxyConfiguration (a mapping is expected)")
    _check(doc, SCHEMA, "", source)
    if doc.get("apiVersion") != API_VERSION:
        raise ConfigError(f"{source}: apiVersion {doc.get('apiVersion')!r} is not {API_VERSION!r}")
    if doc.get("kind") != KIND:
        raise ConfigError(f"{source}: kind {doc.get('kind')!r} is not {KIND!r}")
    return _interpret(doc, source, ncpu)


def _check(doc: dict, schema: dict, prefix: str, source: str) -> None:
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if not isinstance(key, str) or key not in schema:
            raise ConfigError(f'{source}: unknown field "{path}"')
        kind = schema[key]
        if value is None or kind == _ANY:
            continue
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise ConfigError(f'{source}: field "{path}" must be an object')
            _check(value, kind, path + ".", source)
            continue
        error = _type_error(value, kind)
        if error:
            raise ConfigError(f'{source}: field "{path}" {error}, not {value!r}')


def _type_error(value: Any, kind: Any) -> str | None:
    if kind is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "must be an integer"
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "must be a number"
    if kind is str:
        return None if isinstance(value, str) else "must be a string"
    if kind == _DURATION:
        if not isinstance(value, str):
            return "must be a duration string (like 1s, 30s, 1m0s)"
        try:
            go_duration(value)
        except ValueError:
            return "must be a duration (like 1s, 30s, 1m0s)"
        return None
    if kind == _STRLIST:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return None if ok else "must be a list of strings"
    if kind == _BOOLMAP:
        ok = isinstance(value, dict) and all(isinstance(v, bool) for v in value.values())
        return None if ok else "must be a map of names to true or false"
    if kind == _QUANTITY:
        ok = isinstance(value, (str, int)) and not isinstance(value, bool)
        return None if ok else "must be a string or an integer"
    return None


def _get(doc: dict, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(doc, dict):
            return None
        doc = doc.get(part)  # type: ignore[assignment]
    return doc


def _set(doc: dict, path: str) -> bool:
    """Whether the field holds a value upstream would not default: not null, not zero."""
    value = _get(doc, path)
    if isinstance(value, dict):
        return any(_set(value, k) for k in value)
    if isinstance(value, str) and _looks_like_duration(value):
        return go_duration(value) != 0
    return value not in (None, "", 0, False, [], {}) or value is True


def _looks_like_duration(value: str) -> bool:
    try:
        go_duration(value)
    except ValueError:
        return False
    return True


def _duration(doc: dict, path: str, default: float) -> float:
    value = _get(doc, path)
    seconds = go_duration(value) if value is not None else 0.0
    return seconds if seconds > 0 else default


def _interpret(doc: dict, source: str, ncpu: int) -> ProxyConfig:
    notes: list[str] = []

    def bad(path: str, why: str) -> ConfigError:
        return ConfigError(f'{source}: field "{path}" {why}')

    # mode: "" is upstream's default on Linux, iptables. ipvs: nftables mode (same O(1)
    # lookup by set/map; upstream deprecated IPVS; no ip_vs to test against).
    mode = _get(doc, "mode") or "iptables"
    if mode == "ipvs":
        notes.append(
            "mode ipvs: kproxy runs its nftables mode instead (the same O(1) lookup; IPVS is "
            "deprecated upstream since 1.35)"
        )
        mode = "nftables"
    elif mode not in ("iptables", "nftables"):
        raise bad("mode", f"is {mode!r}: kproxy runs iptables, nftables (or ipvs as nftables)")
    section = "nftables" if mode == "nftables" else "iptables"

    cidrs: list[str] = []
    for part in (_get(doc, "clusterCIDR") or "").split(","):
        if part.strip():
            try:
                cidrs.append(str(ipaddress.ip_network(part.strip(), strict=False)))
            except ValueError:
                raise bad("clusterCIDR", f"has {part.strip()!r}, not a CIDR") from None
    detect = _get(doc, "detectLocalMode") or "ClusterCIDR"
    if detect not in MODES:
        raise bad("detectLocalMode", f"is {detect!r}, not one of {', '.join(MODES)}")
    # As upstream's validation: the mode's own field must be there (and name an interface).
    local_names = {}
    for field_name, wanted in (
        ("bridgeInterface", "BridgeInterface"),
        ("interfaceNamePrefix", "InterfaceNamePrefix"),
    ):
        value = _get(doc, f"detectLocal.{field_name}") or ""
        if detect == wanted and not value:
            raise bad(f"detectLocal.{field_name}", f"must be set for detectLocalMode {detect}")
        if value and not INTERFACE_NAME.fullmatch(value):
            raise bad(f"detectLocal.{field_name}", f"is {value!r}, not an interface name")
        local_names[field_name] = value
    if detect == "NodeCIDR":
        notes.append(
            "detectLocalMode NodeCIDR: pod traffic is told by this Node's spec.podCIDRs once "
            "the Node is read"
        )

    bind = _get(doc, "bindAddress") or "0.0.0.0"
    try:
        bind_ip = ipaddress.ip_address(bind)
    except ValueError:
        raise bad("bindAddress", f"is {bind!r}, not an IP address") from None
    node_ip = None if bind_ip.is_unspecified or bind_ip.is_loopback else str(bind_ip)
    v6 = bind_ip.version == 6
    healthz = _bind_address(
        _get(doc, "healthzBindAddress"),
        "[::]" if v6 else "0.0.0.0",
        10256,
        "healthzBindAddress",
        bad,
    )
    metrics = _bind_address(
        _get(doc, "metricsBindAddress"),
        "[::1]" if v6 else "127.0.0.1",
        10249,
        "metricsBindAddress",
        bad,
    )

    nodeports: list[str] = []
    for i, spec in enumerate(_get(doc, "nodePortAddresses") or []):
        if spec == "primary":
            nodeports.append(spec)
            continue
        try:
            nodeports.append(str(ipaddress.ip_network(spec.strip(), strict=False)))
        except ValueError:
            raise bad(f"nodePortAddresses[{i}]", f"is {spec!r}, not a CIDR or primary") from None

    bit = _get(doc, f"{section}.masqueradeBit")
    bit = 14 if bit is None else bit
    if not 0 <= bit <= 31:
        raise bad(f"{section}.masqueradeBit", f"is {bit}, not in 0-31")
    localhost = _get(doc, "iptables.localhostNodePorts")

    fmt = _get(doc, "logging.format") or "text"
    if fmt not in ("text", "json"):
        raise bad("logging.format", f"is {fmt!r}, not text or json")
    verbosity = _get(doc, "logging.verbosity") or 0
    if verbosity < 0:
        raise bad("logging.verbosity", f"is {verbosity}, not 0 or more")

    burst = _get(doc, "clientConnection.burst")
    if burst is not None and burst < 0:  # upstream's validation: ValidateNonnegativeField
        raise bad("clientConnection.burst", f"is {burst}, not 0 or more")

    for path, why in NO_EFFECT.items():
        if path.startswith("clientConnection."):  # the content types: JSON is no news
            value = _get(doc, path)
            if value and value.strip() != _JSON:
                notes.append(f"{path} {value}: not used, {why}")
            continue
        if _set(doc, path):
            notes.append(f"{path}: read, no effect ({why})")
    if mode == "nftables":
        for key in ("masqueradeBit", "masqueradeAll", "syncPeriod", "minSyncPeriod"):
            if _set(doc, f"iptables.{key}"):
                notes.append(f"iptables.{key}: not used in nftables mode (nftables.{key} is)")
    else:
        if _set(doc, "nftables"):
            notes.append("nftables: not used in iptables mode (the iptables section is)")

    return ProxyConfig(
        mode=mode,
        cluster_cidrs=tuple(cidrs),
        detect_local_mode=detect,
        bridge_interface=local_names["bridgeInterface"],
        interface_name_prefix=local_names["interfaceNamePrefix"],
        kubeconfig=_get(doc, "clientConnection.kubeconfig") or None,
        qps=float(_get(doc, "clientConnection.qps") or 5.0),
        burst=int(_get(doc, "clientConnection.burst") or 10),
        content_type=_get(doc, "clientConnection.contentType")
        or "application/vnd.kubernetes.protobuf",
        hostname_override=(_get(doc, "hostnameOverride") or "").strip().lower(),
        bind_address=bind,
        node_ip=node_ip,
        healthz_bind_address=healthz,
        metrics_bind_address=metrics,
        nodeport_addresses=tuple(nodeports),
        masquerade_all=bool(_get(doc, f"{section}.masqueradeAll")),
        masquerade_bit=bit,
        sync_period=_duration(doc, f"{section}.syncPeriod", 30.0),
        min_sync_period=_duration(doc, f"{section}.minSyncPeriod", 1.0),
        localhost_nodeports=True if localhost is None else localhost,
        conntrack_sysctls=conntrack_sysctls(doc, ncpu),
        verbosity=verbosity,
        log_format=fmt,
        feature_gates=dict(_get(doc, "featureGates") or {}),
        show_hidden_metrics_for_version=_get(doc, "showHiddenMetricsForVersion") or "",
        notes=tuple(notes),
    )


def _bind_address(value: str | None, host: str, port: int, path: str, bad) -> str:
    """host:port as upstream defaults it: empty -> the default address; no port -> the
    default port (proxyutil.AppendPortIfNeeded)."""
    if not value:
        return f"{host}:{port}"
    try:
        ipaddress.ip_address(value.strip("[]"))
        return f"[{value.strip('[]')}]:{port}" if ":" in value else f"{value}:{port}"
    except ValueError:
        pass
    hostpart, sep, portpart = value.rpartition(":")
    try:
        ipaddress.ip_address(hostpart.strip("[]"))
        if not sep or not 0 <= int(portpart) <= 65535:
            raise ValueError
    except ValueError:
        raise bad(path, f"is {value!r}, not IP:port") from None
    return value


# Upstream's conntrack defaults (v1alpha1 defaults.go) and the sysctls its conntracker writes
# (pkg/proxy/conntrack/sysctls.go, cmd/kube-proxy/app/server_linux.go setupConntrack).
CONNTRACK_DEFAULTS = {
    "maxPerCore": 32 * 1024,
    "min": 128 * 1024,
    "tcpEstablishedTimeout": 24 * 3600.0,
    "tcpCloseWaitTimeout": 3600.0,
}
NF_CONNTRACK_MAX = "net/netfilter/nf_conntrack_max"


def conntrack_sysctls(doc: dict, ncpu: int) -> dict[str, str]:
    """The sysctls kube-proxy would set from the conntrack section: nf_conntrack_max =
    max(maxPerCore * CPUs, min) unless maxPerCore is 0; each timeout unless 0; tcp_be_liberal
    when tcpBeLiberal."""

    def get(key: str) -> Any:
        value = _get(doc, f"conntrack.{key}")
        return CONNTRACK_DEFAULTS.get(key) if value is None else value

    out: dict[str, str] = {}
    per_core = get("maxPerCore")
    if per_core and per_core > 0:
        out[NF_CONNTRACK_MAX] = str(max(per_core * ncpu, get("min") or 0))
    for key, sysctl in (
        ("tcpEstablishedTimeout", "nf_conntrack_tcp_timeout_established"),
        ("tcpCloseWaitTimeout", "nf_conntrack_tcp_timeout_close_wait"),
        ("udpTimeout", "nf_conntrack_udp_timeout"),
        ("udpStreamTimeout", "nf_conntrack_udp_timeout_stream"),
    ):
        value = get(key)
        seconds = go_duration(value) if isinstance(value, str) else (value or 0)
        if seconds > 0:
            out[f"net/netfilter/{sysctl}"] = str(int(seconds))
    if get("tcpBeLiberal"):
        out["net/netfilter/nf_conntrack_tcp_be_liberal"] = "1"
    return out
