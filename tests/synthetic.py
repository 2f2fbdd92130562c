"""Synthetic clusters: N Services x M endpoints as Kubernetes objects (for tests and benches).

Run as a script to write one as a state file:
    python tests/synthetic.py --services 1000 --endpoints 10 --out /tmp/1k.yaml
"""

from __future__ import annotations

import argparse
import ipaddress
import json
from typing import Any


def generate(
    services: int, endpoints: int, node_ports: bool = True, first: int = 0, mix: bool = False
) -> list[dict[str, Any]]:
    """Services `svc-<i>` in namespace `bench`: ClusterIPs from 10.96.0.0/12 (past 10.96.0.255
    so they never clash with hand-written test Services), endpoints from 10.128.0.0/9, every
    fourth Service a NodePort (30000 + i // 4). With `mix`, every tenth NodePort Service has
    externalTrafficPolicy Local and every seventh Service ClientIP affinity (a benchmark's
    blend of kinds)."""
    objects: list[dict[str, Any]] = []
    cluster_base = int(ipaddress.ip_address("10.96.1.0"))
    pod_base = int(ipaddress.ip_address("10.128.0.0"))
    for i in range(first, first + services):
        name = f"svc-{i}"
        port: dict[str, Any] = {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}
        svc_type = "ClusterIP"
        if node_ports and i % 4 == 0 and i // 4 < 2768:
            svc_type = "NodePort"
            port["nodePort"] = 30000 + i // 4
        spec: dict[str, Any] = {
            "type": svc_type,
            "clusterIP": str(ipaddress.ip_address(cluster_base + i)),
            "ports": [port],
        }
        if mix and svc_type == "NodePort" and i % 40 == 0:
            spec["externalTrafficPolicy"] = "Local"
        if mix and i % 7 == 3:
            spec["sessionAffinity"] = "ClientIP"
            spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 10800}}
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"namespace": "bench", "name": name},
                "spec": spec,
            }
        )
        objects.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "namespace": "bench",
                    "name": f"{name}-x",
                    "labels": {"kubernetes.io/service-name": name},
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [
                    {
                        "addresses": [str(ipaddress.ip_address(pod_base + i * endpoints + j))],
                        "conditions": {"ready": True},
                        "nodeName": f"node-{j % 50}",
                    }
                    for j in range(endpoints)
                ],
            }
        )
    return objects


def as_list(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": objects}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--services", type=int, required=True)
    parser.add_argument("--endpoints", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.out, "w") as f:
        # JSON is valid YAML and far faster to write and read at this size.
        json.dump(as_list(generate(args.services, args.endpoints)), f)


if __name__ == "__main__":
    main()
