"""Immutable cluster model and its construction from Kubernetes objects.

Everything the renderers need is here, already validated: a Service or EndpointSlice that
fails validation never becomes a model object. Builders raise `InvalidObject`, whose message
is the one-line warning an operator sees (kind, namespace/name, field, reason); callers skip
the object and carry on. No I/O happens in this module.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

PROTOCOLS = ("TCP", "UDP", "SCTP")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
ADDRESS_TYPES = ("IPv4", "IPv6", "FQDN")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ZONE_LABEL = "topology.kubernetes.io/zone"


class InvalidObject(ValueError):
    """An object that cannot be used; str() is the one-line warning naming object and field."""

    def __init__(self, kind: str, ref: str, field_path: str, reason: str) -> None:
        self.kind = kind
        self.ref = ref
        self.field_path = field_path
        self.reason = reason
        super().__init__(f"{kind} {ref}: {field_path}: {reason}")


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    protocol: str  # "TCP", "UDP" or "SCTP"
    port: int
    target_port: int | str | None = None
    node_port: int = 0  # 0: none


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    type: str
    cluster_ips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    # ClientIP affinity timeout in seconds; None when sessionAffinity is None.
    affinity_timeout: int | None = None
    external_policy_local: bool = False
    internal_policy_local: bool = False
    health_check_node_port: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: str
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    zone_hints: tuple[str, ...] | None = None
    node_hints: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str
    address_type: str  # "IPv4" or "IPv6"
    ports: tuple[EndpointPort, ...]
    endpoints: tuple[Endpoint, ...]
    # endpoints.kubernetes.io/last-change-trigger-time, kept for the latency metric.
    trigger_time: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    # InternalIPs first, then ExternalIPs, each in the order the Node lists them.
    addresses: tuple[str, ...] = ()
    deleting: bool = False
    # Tainted ToBeDeletedByClusterAutoscaler: /healthz fails so load balancers drain the node.
    tainted_for_deletion: bool = False
    # spec.podCIDRs (else spec.podCIDR): this node's pods, for --detect-local-mode NodeCIDR.
    pod_cidrs: tuple[str, ...] = ()

    @property
    def host_ips(self) -> tuple[str, ...]:
        """The node's IPs as upstream's GetNodeHostIPs picks them: the first address (an
        InternalIP when there is one), then the first of the other IP family, if any."""
        if not self.addresses:
            return ()
        first = self.addresses[0]
        other = next((a for a in self.addresses if (":" in a) != (":" in first)), None)
        return (first, other) if other else (first,)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """How this node proxies: what kube-proxy takes from its flags."""

    node_name: str = ""
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    # This node's IPs (Node InternalIPs or --node-ip): LB source-range checks, "primary".
    node_ips: tuple[str, ...] = ()
    # Addresses NodePorts answer on; None means every local address (addrtype LOCAL).
    nodeport_ips: tuple[str, ...] | None = None
    # IPv4 NodePorts on 127.0.0.1 (upstream's --iptables-localhost-nodeports, default true).
    localhost_nodeports: bool = True
    # nf_conntrack_tcp_be_liberal is set: no INVALID drop rule needed (upstream PR 120412).
    conntrack_tcp_liberal: bool = False
    # How pod traffic is told (kproxy/localdetect.py): ClusterCIDR (cluster_cidrs), NodeCIDR
    # (the Node's pod CIDRs), BridgeInterface or InterfaceNamePrefix (these two names).
    detect_local_mode: str = "ClusterCIDR"
    bridge_interface: str = ""
    interface_name_prefix: str = ""

    @property
    def masquerade_mark(self) -> str:
        return f"{1 << self.masquerade_bit:#x}"


@dataclass(frozen=True)
class ClusterState:
    services: Mapping[tuple[str, str], Service] = field(default_factory=dict)
    slices: Mapping[tuple[str, str], EndpointSlice] = field(default_factory=dict)
    node: Node | None = None

    def slices_by_service(self) -> dict[tuple[str, str], list[EndpointSlice]]:
        """EndpointSlices grouped by the (namespace, name) of the Service they belong to."""
        grouped: dict[tuple[str, str], list[EndpointSlice]] = {}
        for key in sorted(self.slices):
            s = self.slices[key]
            grouped.setdefault((s.namespace, s.service_name), []).append(s)
        return grouped


# --- building model objects from Kubernetes objects (plain dicts as the API returns them) ---


class _Checker:
    """Field access with errors that name the object and the field path."""

    def __init__(self, kind: str, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata")
        if not isinstance(meta, Mapping):
            raise InvalidObject(kind, "<unnamed>", "metadata", "missing")
        name = meta.get("name")
        namespace = meta.get("namespace", "default")
        self.kind = kind
        shown = name if isinstance(name, str) and name else "<unnamed>"
        if not shown.isprintable():  # a newline in a name must not split the warning line
            shown = repr(shown)
        if isinstance(namespace, str) and not namespace.isprintable():
            namespace = repr(namespace)
        self.ref = f"{namespace}/{shown}" if kind != "Node" else shown
        if not isinstance(name, str) or not name:
            raise InvalidObject(kind, self.ref, "metadata.name", "missing")
        if not isinstance(namespace, str) or not namespace:
            raise InvalidObject(kind, self.ref, "metadata.namespace", "must be a non-empty string")
        self.name = name
        self.namespace = namespace
        self.warnings: list[str] = []  # problems that cost a field, not the object

    def fail(self, path: str, reason: str) -> InvalidObject:
        return InvalidObject(self.kind, self.ref, path, reason)

    def mapping(self, value: Any, path: str, required: bool = False) -> Mapping[str, Any]:
        if value is None:
            if required:
                raise self.fail(path, "missing")
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(path, f"must be an object, got {type(value).__name__}")
        return value

    def sequence(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(path, f"must be a list, got {type(value).__name__}")
        return value

    def string(self, value: Any, path: str, default: str | None = None) -> str:
        if value is None:
            if default is None:
                raise self.fail(path, "missing")
            return default
        if not isinstance(value, str):
            raise self.fail(path, f"must be a string, got {value!r}")
        return value

    def port(self, value: Any, path: str, allow_zero: bool = False) -> int:
        if value is None:
            if allow_zero:
                return 0
            raise self.fail(path, "missing")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"{value!r} is not a port number")
        if allow_zero and value == 0:
            return 0
        if not 1 <= value <= 65535:
            raise self.fail(path, f"{value} is not a valid port number (1-65535)")
        return value

    def protocol(self, value: Any, path: str) -> str:
        proto = self.string(value, path, "TCP")
        if proto not in PROTOCOLS:
            raise self.fail(path, f"{proto!r} is not a supported protocol (TCP, UDP, SCTP)")
        return proto

    def ip(self, value: Any, path: str, version: int | None = None) -> str:
        text = self.string(value, path)
        if version != 6 and _is_canonical_ipv4(text):
            return text  # the common case, ~5x faster than ipaddress (100k endpoints at scale)
        try:
            addr = ipaddress.ip_address(text.strip())
        except ValueError:
            raise self.fail(path, f"{text!r} is not a valid IP address") from None
        if getattr(addr, "scope_id", None) is not None:
            # ipaddress accepts "fe80::1%<anything>" (spaces, newlines): no rule can use it.
            raise self.fail(path, f"{text!r} is not a valid IP address (zone index)")
        if version is not None and addr.version != version:
            raise self.fail(path, f"{text!r} is not an IPv{version} address")
        return str(addr)

    def cidr(self, value: Any, path: str) -> str:
        text = self.string(value, path)
        cidr = parse_cidr_sloppy(text)
        if cidr is None:
            raise self.fail(path, f"{text!r} is not a valid CIDR")
        return cidr

    def boolean(self, value: Any, path: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(path, f"must be true or false, got {value!r}")
        return value


def parse_cidr_sloppy(text: str) -> str | None:
    """A CIDR as upstream's ParseCIDRSloppy reads it: surrounding space and IPv4 leading zeros
    tolerated, host bits cleared. None when it is not a CIDR."""
    text = text.strip()
    if "/" in text and ":" not in text:
        addr, _, prefix = text.partition("/")
        octets = addr.split(".")
        if len(octets) == 4 and all(o.isdigit() for o in octets):
            text = ".".join(str(int(o)) for o in octets) + "/" + prefix
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        return None


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


_DNS1035_LABEL = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
_DNS1123_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")


def _is_canonical_ipv4(text: str) -> bool:
    """A dotted quad exactly as ipaddress would print it (no leading zeros, no spaces)."""
    return _CANONICAL_IPV4.fullmatch(text) is not None


def service_from_k8s(obj: Mapping[str, Any], warnings: list[str] | None = None) -> Service | None:
    """A Service, or None for one kube-proxy does not proxy (headless, ExternalName).

    Raises InvalidObject for a Service that cannot be used; problems that only cost one field
    (an invalid source range) are appended to `warnings`.
    """
    c = _Checker("Service", obj)
    if warnings is not None:
        c.warnings = warnings
    # The namespace, name and port names end up in rule comments and chain-name hashes: hold
    # them to the API server's own rules (a newline or a 300-character name breaks a restore).
    if not _DNS1035_LABEL.fullmatch(c.name):
        raise c.fail("metadata.name", "not a valid Service name (RFC 1035 label)")
    if not _DNS1123_LABEL.fullmatch(c.namespace):
        raise c.fail("metadata.namespace", "not a valid namespace name (RFC 1123 label)")
    spec = c.mapping(obj.get("spec"), "spec", required=True)
    svc_type = c.string(spec.get("type"), "spec.type", "ClusterIP")
    if svc_type not in SERVICE_TYPES:
        raise c.fail(
            "spec.type", f"{svc_type!r} is not a Service type ({', '.join(SERVICE_TYPES)})"
        )
    if svc_type == "ExternalName":
        return None

    raw_ips = c.sequence(spec.get("clusterIPs"), "spec.clusterIPs")
    ips_path = "spec.clusterIPs"
    if not raw_ips:
        raw_ips = [spec.get("clusterIP")] if spec.get("clusterIP") is not None else []
        ips_path = "spec.clusterIP"
    if not raw_ips or raw_ips[0] in ("None", ""):
        return None  # headless: no virtual IP to proxy
    cluster_ips = tuple(
        c.ip(ip, f"{ips_path}[{i}]" if ips_path.endswith("s") else ips_path)
        for i, ip in enumerate(raw_ips)
    )

    ports = []
    for i, raw in enumerate(c.sequence(spec.get("ports"), "spec.ports")):
        path = f"spec.ports[{i}]"
        p = c.mapping(raw, path, required=True)
        target = p.get("targetPort")
        if target is not None:
            # Only ASCII digits make a number: "²".isdigit() is true but int() refuses it.
            if isinstance(target, str) and not (target.isascii() and target.isdigit()):
                if not target:
                    raise c.fail(f"{path}.targetPort", "must not be empty")
            else:
                target = c.port(
                    int(target) if isinstance(target, str) else target, f"{path}.targetPort"
                )
        port_name = c.string(p.get("name"), f"{path}.name", "")
        if port_name and not _DNS1123_LABEL.fullmatch(port_name):
            raise c.fail(f"{path}.name", f"{port_name!r} is not a valid port name (RFC 1123 label)")
        ports.append(
            ServicePort(
                name=port_name,
                protocol=c.protocol(p.get("protocol"), f"{path}.protocol"),
                port=c.port(p.get("port"), f"{path}.port"),
                target_port=target,
                node_port=c.port(p.get("nodePort"), f"{path}.nodePort", allow_zero=True),
            )
        )

    external_ips = tuple(
        c.ip(ip, f"spec.externalIPs[{i}]")
        for i, ip in enumerate(c.sequence(spec.get("externalIPs"), "spec.externalIPs"))
    )
    status = c.mapping(obj.get("status"), "status")
    lb = c.mapping(status.get("loadBalancer"), "status.loadBalancer")
    lb_ips = []
    for i, raw in enumerate(c.sequence(lb.get("ingress"), "status.loadBalancer.ingress")):
        ing = c.mapping(raw, f"status.loadBalancer.ingress[{i}]")
        if ing.get("ip") is not None and ing.get("ipMode") != "Proxy":
            lb_ips.append(c.ip(ing.get("ip"), f"status.loadBalancer.ingress[{i}].ip"))
    source_ranges = []
    for i, raw in enumerate(
        c.sequence(spec.get("loadBalancerSourceRanges"), "spec.loadBalancerSourceRanges")
    ):
        path = f"spec.loadBalancerSourceRanges[{i}]"
        cidr = parse_cidr_sloppy(c.string(raw, path))
        if cidr is None:
            # Upstream ignores a bad range (the API validates them); skip it, keep the rest.
            c.warnings.append(f"{c.fail(path, f'{raw!r} is not a CIDR')}; range ignored")
        elif cidr not in source_ranges:
            source_ranges.append(cidr)

    affinity = c.string(spec.get("sessionAffinity"), "spec.sessionAffinity", "None")
    if affinity not in ("None", "ClientIP"):
        raise c.fail("spec.sessionAffinity", f"{affinity!r} is not None or ClientIP")
    timeout = None
    if affinity == "ClientIP":
        cfg = c.mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
        client = c.mapping(cfg.get("clientIP"), "spec.sessionAffinityConfig.clientIP")
        timeout = client.get("timeoutSeconds", 10800)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 < timeout <= 86400:
            raise c.fail(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                f"{timeout!r} is not a number of seconds in 1-86400",
            )

    def policy(key: str) -> bool:
        value = c.string(spec.get(key), f"spec.{key}", "Cluster")
        if value not in ("Cluster", "Local"):
            raise c.fail(f"spec.{key}", f"{value!r} is not Cluster or Local")
        return value == "Local"

    return Service(
        namespace=c.namespace,
        name=c.name,
        type=svc_type,
        cluster_ips=cluster_ips,
        ports=tuple(ports),
        external_ips=external_ips,
        load_balancer_ips=tuple(lb_ips),
        load_balancer_source_ranges=tuple(source_ranges),
        affinity_timeout=timeout,
        external_policy_local=policy("externalTrafficPolicy"),
        internal_policy_local=policy("internalTrafficPolicy"),
        health_check_node_port=c.port(
            spec.get("healthCheckNodePort"), "spec.healthCheckNodePort", allow_zero=True
        ),
    )


def endpoint_slice_from_k8s(
    obj: Mapping[str, Any], warnings: list[str] | None = None
) -> EndpointSlice | None:
    """An EndpointSlice, or None for an FQDN slice (kube-proxy ignores those).

    Raises InvalidObject for a slice that cannot be used; problems that only cost one port
    (a port without a number) are appended to `warnings`.
    """
    c = _Checker("EndpointSlice", obj)
    if warnings is not None:
        c.warnings = warnings
    meta = c.mapping(obj.get("metadata"), "metadata")
    labels = c.mapping(meta.get("labels"), "metadata.labels")
    service_name = labels.get(SERVICE_NAME_LABEL)
    if not isinstance(service_name, str) or not service_name:
        raise c.fail(f"metadata.labels[{SERVICE_NAME_LABEL}]", "missing")
    address_type = c.string(obj.get("addressType"), "addressType")
    if address_type not in ADDRESS_TYPES:
        raise c.fail("addressType", f"{address_type!r} is not IPv4, IPv6 or FQDN")
    if address_type == "FQDN":
        return None
    version = 4 if address_type == "IPv4" else 6

    ports = []
    for i, raw in enumerate(c.sequence(obj.get("ports"), "ports")):
        p = c.mapping(raw, f"ports[{i}]", required=True)
        if p.get("port") is None:
            # The API allows it ("all ports", never implemented); upstream skips the port and
            # keeps the slice's others, so one odd port must not take the whole slice down.
            c.warnings.append(f"{c.fail(f'ports[{i}].port', 'missing')}; port ignored")
            continue
        ports.append(
            EndpointPort(
                name=c.string(p.get("name"), f"ports[{i}].name", ""),
                port=c.port(p.get("port"), f"ports[{i}].port"),
                protocol=c.protocol(p.get("protocol"), f"ports[{i}].protocol"),
            )
        )

    endpoints = []
    for i, raw in enumerate(c.sequence(obj.get("endpoints"), "endpoints")):
        fast = _plain_ipv4_endpoint(raw) if version == 4 else None
        if fast is not None:
            endpoints.append(fast)
            continue
        path = f"endpoints[{i}]"
        e = c.mapping(raw, path, required=True)
        addresses = c.sequence(e.get("addresses"), f"{path}.addresses")
        if not addresses:
            raise c.fail(f"{path}.addresses", "missing")
        # Like kube-proxy, only the first address of an endpoint is used.
        ip = c.ip(addresses[0], f"{path}.addresses[0]", version)
        cond = c.mapping(e.get("conditions"), f"{path}.conditions")
        ready = c.boolean(cond.get("ready"), f"{path}.conditions.ready", True)
        hints = c.mapping(e.get("hints"), f"{path}.hints")
        endpoints.append(
            Endpoint(
                ip=ip,
                ready=ready,
                # Absent means serving, not "as ready" (upstream's EndpointSliceCache): a
                # terminating endpoint whose slice omits it is still the fallback.
                serving=c.boolean(cond.get("serving"), f"{path}.conditions.serving", True),
                terminating=c.boolean(
                    cond.get("terminating"), f"{path}.conditions.terminating", False
                ),
                node_name=_optional_string(c, e.get("nodeName"), f"{path}.nodeName"),
                zone=_optional_string(c, e.get("zone"), f"{path}.zone"),
                zone_hints=_hint_names(c, hints.get("forZones"), f"{path}.hints.forZones"),
                node_hints=_hint_names(c, hints.get("forNodes"), f"{path}.hints.forNodes"),
            )
        )
    annotations = c.mapping(meta.get("annotations"), "metadata.annotations")
    trigger = annotations.get("endpoints.kubernetes.io/last-change-trigger-time")
    return EndpointSlice(
        namespace=c.namespace,
        name=c.name,
        service_name=service_name,
        address_type=address_type,
        ports=tuple(ports),
        endpoints=tuple(endpoints),
        trigger_time=trigger if isinstance(trigger, str) else None,
    )


def node_from_k8s(obj: Mapping[str, Any]) -> Node:
    c = _Checker("Node", obj)
    meta = c.mapping(obj.get("metadata"), "metadata")
    labels = {str(k): str(v) for k, v in c.mapping(meta.get("labels"), "metadata.labels").items()}
    status = c.mapping(obj.get("status"), "status")
    by_type: dict[str, list[str]] = {"InternalIP": [], "ExternalIP": []}
    for i, raw in enumerate(c.sequence(status.get("addresses"), "status.addresses")):
        a = c.mapping(raw, f"status.addresses[{i}]")
        if a.get("type") in by_type and a.get("address"):
            by_type[a["type"]].append(c.ip(a.get("address"), f"status.addresses[{i}].address"))
    # InternalIPs before ExternalIPs, whatever the order listed, as upstream re-sorts them.
    addresses = by_type["InternalIP"] + by_type["ExternalIP"]
    spec = c.mapping(obj.get("spec"), "spec")
    taints = c.sequence(spec.get("taints"), "spec.taints")
    pod_cidrs = c.sequence(spec.get("podCIDRs"), "spec.podCIDRs") or (
        [spec["podCIDR"]] if spec.get("podCIDR") else []
    )
    return Node(
        name=c.name,
        labels=labels,
        addresses=tuple(addresses),
        deleting=meta.get("deletionTimestamp") is not None,
        tainted_for_deletion=any(
            isinstance(t, Mapping) and t.get("key") == "ToBeDeletedByClusterAutoscaler"
            for t in taints
        ),
        pod_cidrs=tuple(c.cidr(cidr, f"spec.podCIDRs[{i}]") for i, cidr in enumerate(pod_cidrs)),
    )


def _plain_ipv4_endpoint(e: Any) -> Endpoint | None:
    """The common endpoint (plain JSON types, a canonical IPv4 address, no hints) read without
    building a field path per check: 100k endpoints at scale. None sends the endpoint down the
    careful path, which gives the same result or names the bad field."""
    if type(e) is not dict or e.get("hints") is not None:
        return None
    addresses = e.get("addresses")
    if type(addresses) is not list or not addresses:
        return None
    ip = addresses[0]
    if type(ip) is not str or _CANONICAL_IPV4.fullmatch(ip) is None:
        return None
    cond = e.get("conditions")
    if cond is None:
        cond = {}
    elif type(cond) is not dict:
        return None
    ready = cond.get("ready")
    ready = True if ready is None else ready
    serving = cond.get("serving")
    serving = True if serving is None else serving
    terminating = cond.get("terminating")
    terminating = False if terminating is None else terminating
    node_name, zone = e.get("nodeName"), e.get("zone")
    if (
        type(ready) is not bool
        or type(serving) is not bool
        or type(terminating) is not bool
        or (node_name is not None and type(node_name) is not str)
        or (zone is not None and type(zone) is not str)
    ):
        return None
    return Endpoint(ip, ready, serving, terminating, node_name, zone)


def _optional_string(c: _Checker, value: Any, path: str) -> str | None:
    return None if value is None else c.string(value, path)


def _hint_names(c: _Checker, value: Any, path: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = []
    for i, raw in enumerate(c.sequence(value, path)):
        entry = c.mapping(raw, f"{path}[{i}]")
        names.append(c.string(entry.get("name"), f"{path}[{i}].name"))
    return tuple(names)


def build_state(
    objects: Iterable[Mapping[str, Any]], node_name: str = ""
) -> tuple[ClusterState, list[str]]:
    """ClusterState from Kubernetes objects, and the warnings for the objects skipped.

    A Node object is kept only when it is this node (or when no node name is given and the
    input holds exactly one Node).
    """
    services: dict[tuple[str, str], Service] = {}
    slices: dict[tuple[str, str], EndpointSlice] = {}
    nodes: list[Node] = []
    warnings: list[str] = []
    for index, obj in enumerate(objects):
        if not isinstance(obj, Mapping):
            warnings.append(f"object #{index + 1}: not a Kubernetes object, skipped")
            continue
        kind = obj.get("kind")
        try:
            if kind == "Service":
                svc = service_from_k8s(obj, warnings)
                if svc is not None:
                    services[svc.key] = svc
            elif kind == "EndpointSlice":
                eps = endpoint_slice_from_k8s(obj, warnings)
                if eps is not None:
                    slices[eps.key] = eps
            elif kind == "Node":
                nodes.append(node_from_k8s(obj))
            else:
                meta = obj.get("metadata") if isinstance(obj.get("metadata"), Mapping) else {}
                name = f"{meta.get('namespace', '')}/{meta.get('name', '')}".strip("/")
                warnings.append(
                    f"{kind or 'object #' + str(index + 1)} {name or '<unnamed>'}: kind: "
                    "not a Service, EndpointSlice or Node, skipped"
                )
        except InvalidObject as err:
            warnings.append(f"{err}; skipped")
    node = None
    if node_name:
        node = next((n for n in nodes if n.name == node_name), None)
    elif len(nodes) == 1:
        node = nodes[0]
    return ClusterState(services=services, slices=slices, node=node), warnings
