"""Which traffic comes from this node's pods: upstream's LocalTrafficDetector
(pkg/proxy/util/localdetector.go, chosen in cmd/kube-proxy/app/server.go getLocalDetectors).

Pod traffic to a ClusterIP is not masqueraded (the rest is), and pod traffic to a Service's
external address with externalTrafficPolicy Local goes to every endpoint, as if it had gone out
to the load balancer and come back. The four ways to tell it (`--detect-local-mode`):
  ClusterCIDR          the source is in the cluster CIDR (the first of the family)
  NodeCIDR             the source is in this node's pod CIDR (the Node's spec.podCIDRs)
  BridgeInterface      the packet came in on the pods' bridge (`-i cbr0`)
  InterfaceNamePrefix  it came in on an interface whose name starts so (`-i veth+`)
None of them (no CIDR known yet, say) means no rule depends on it, as upstream's no-op detector.
Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from kproxy.model import Node, NodeConfig
from kproxy.policy import family_cidrs

MODES = ("ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")
# What Linux takes as an interface name (dev_valid_name), less the rules' wildcards and quotes.
INTERFACE_NAME = re.compile(r"[^\s/:\"'*+]{1,15}")


@dataclass(frozen=True, slots=True)
class LocalMatch:
    """A source CIDR, or an input interface (`prefix`: any name starting with `name`)."""

    cidr: str = ""
    interface: str = ""
    prefix: bool = False

    def iptables(self, negate: bool = False) -> tuple[str, str]:
        """(source part, interface part) of an iptables rule: iptables-save prints `-s` first,
        then `-d`, then `-i`, then `-p`, so the renderer places them apart."""
        bang = "! " if negate else ""
        if self.cidr:
            return f"{bang}-s {self.cidr}", ""
        return "", f"{bang}-i {self.interface}{'+' if self.prefix else ''}"

    def nft(self, ip: str, negate: bool = False) -> str:
        """The nftables match. `iifname`, not upstream's `iif`: `iif` is an interface index
        looked up when the rule is loaded, which fails for a bridge not there yet and cannot
        take a wildcard."""
        op = "!= " if negate else ""
        if self.cidr:
            return f"{ip} saddr {op}{self.cidr}"
        return f'iifname {op}"{self.interface}{"*" if self.prefix else ""}"'


def local_match(
    config: NodeConfig, node: Node | None, version: int, warnings: list[str] | None = None
) -> LocalMatch | None:
    """This family's detector, as upstream picks it; `warnings` gets what an operator should
    know (several CIDRs of a family: only the first is used, as upstream)."""
    mode = config.detect_local_mode
    if mode == "BridgeInterface":
        return LocalMatch(interface=config.bridge_interface) if config.bridge_interface else None
    if mode == "InterfaceNamePrefix":
        prefix = config.interface_name_prefix
        return LocalMatch(interface=prefix, prefix=True) if prefix else None
    if mode == "NodeCIDR":
        cidrs, source = (node.pod_cidrs if node else ()), "the Node's spec.podCIDRs"
        if node is not None and not cidrs and warnings is not None:
            # Upstream waits for them at start; kproxy applies them when the Node gets them.
            warnings.append(
                f"--detect-local-mode NodeCIDR: Node {node.name} has no spec.podCIDRs yet; "
                "until it has, no traffic is told as a pod's"
            )
    else:
        cidrs, source = config.cluster_cidrs, "--cluster-cidr"
    mine = [str(ipaddress.ip_network(c, strict=False)) for c in family_cidrs(cidrs, version)]
    if len(mine) > 1 and warnings is not None:
        warnings.append(
            f"{source}: several IPv{version} CIDRs; only {mine[0]} is used to tell pod traffic "
            "apart, as kube-proxy does"
        )
    return LocalMatch(cidr=mine[0]) if mine else None
