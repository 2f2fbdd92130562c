"""What an operator applies and looks at, checked without a cluster.

- Every Kubernetes object in manifests/ validates against the Kubernetes OpenAPI schemas
  (kubernetes-validate, strict: unknown fields are errors), as written and as built by
  `kubectl kustomize` (skipped, with the reason, when kubectl is missing).
- The DaemonSet's security and scheduling properties, RBAC down to the verb, the flags (parsed by
  kproxy's own parser after the ConfigMap's values are substituted), probes, ports, the metrics
  Service and ServiceMonitor wiring (job="kube-proxy").
- The beside-kube-proxy overlay's patches, kube-proxy-off.yaml / kube-proxy-on.json applied to
  kubeadm's kube-proxy DaemonSet, and the replace-kube-proxy overlay (the image swap) merged
  into it.
- Alert rules: `promtool check rules` and `promtool test rules`
  (tests/data/kproxy-alerts-test.yaml); every runbook_url names a section of docs/RECOVERY.md;
  every PromQL expression of the alerts and the dashboard uses only series kproxy exports
  (here: its metrics registry; tests/test_kernel_manifests.py: a live /metrics scrape) and is
  valid PromQL (promtool).
- The Dockerfile: base image, packages, entrypoint, and every COPY source exists.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
BASE = MANIFESTS / "base"
BESIDE = MANIFESTS / "overlays" / "beside-kube-proxy"
REPLACE = MANIFESTS / "overlays" / "replace-kube-proxy"
MONITORING = MANIFESTS / "monitoring"
DATA = Path(__file__).resolve().parent / "data"
KUBEADM = DATA / "kube-proxy-kubeadm.yaml"

# Oldest Kubernetes still maintained when this was written, and the newest schemas shipped.
K8S_VERSIONS = ("1.30.0", "latest")

# Labels Prometheus itself puts on every series of a target.
TARGET_LABELS = {"job", "instance"}
# Series Prometheus makes itself, not kproxy.
PROMETHEUS_SERIES = {"up"}


# --------------------------------------------------------------------------- helpers


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomize_resources(directory: Path) -> list[Path]:
    """The resource files a kustomization lists (directories excluded)."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return [directory / r for r in k.get("resources", []) if (directory / r).is_file()]


def base_objects() -> list[dict[str, Any]]:
    return [d for p in kustomize_resources(BASE) for d in load_docs(p)]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("`kubectl` is not installed: no `kubectl kustomize` build of the overlays")
    return path


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def validate(obj: dict[str, Any]) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for version in K8S_VERSIONS:
        v = kv.latest_version() if version == "latest" else version
        try:
            kv.validate(obj, v, strict=True)
        except kv.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            raise AssertionError(
                f"{obj['kind']}/{obj['metadata'].get('name')} invalid for Kubernetes {v} "
                f"at {path or '<root>'}: {err.message}"
            ) from None


def container(ds: dict[str, Any]) -> dict[str, Any]:
    containers = ds["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def expand_args(ds: dict[str, Any], configmap: dict[str, Any], node: str) -> list[str]:
    """The container's args as the kubelet expands them: $(VAR) from env and envFrom."""
    c = container(ds)
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        assert src["configMapRef"]["name"] == configmap["metadata"]["name"]
        env.update(configmap["data"])
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            env[e["name"]] = node

    def sub(match: re.Match[str]) -> str:
        assert match.group(1) in env, f"$({match.group(1)}) is defined nowhere"
        return env[match.group(1)]

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, a) for a in c.get("args", [])]


def parse_run_args(argv: list[str]):
    """kproxy's own parser on `kproxy run ARGS` (argparse exits 2 on an unknown flag or value)."""
    from kproxy.cli.flags import build_parser

    try:
        return build_parser().parse_args(["run", *argv])
    except SystemExit as err:
        raise AssertionError(f"kproxy run rejects {argv}") from err


def flag(args: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    assert len(values) <= 1, f"{name} given {len(values)} times"
    return values[0] if values else None


# --------------------------------------------------------------------------- Kubernetes objects


def test_every_manifest_parses_and_validates_against_the_kubernetes_schemas():
    checked = 0
    for path in kustomize_resources(BASE):
        for obj in load_docs(path):
            validate(obj)
            checked += 1
    assert checked >= 6


def test_the_validator_rejects_a_wrong_manifest():
    """The schema check is not a no-op: an unknown field and a wrong type are caught."""
    ds = copy.deepcopy(find(base_objects(), "DaemonSet", "kproxy"))
    container(ds)["securityContext"]["capabilties"] = {"add": ["NET_ADMIN"]}
    with pytest.raises(AssertionError, match="capabilties"):
        validate(ds)
    ds = copy.deepcopy(find(base_objects(), "DaemonSet", "kproxy"))
    ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] = [1]
    with pytest.raises(AssertionError, match="maxUnavailable"):
        validate(ds)


def test_rbac_reads_services_endpointslices_nodes_and_writes_only_events():
    objs = base_objects()
    role = find(objs, "ClusterRole", "kproxy")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    read = {"get", "list", "watch"}
    expected = (
        {("", r, v) for r in ("services", "nodes") for v in read}
        | {("discovery.k8s.io", "endpointslices", v) for v in read}
        | {(g, "events", v) for g in ("", "events.k8s.io") for v in ("create", "patch")}
    )
    assert granted == expected
    assert not any("resourceNames" in r or "nonResourceURLs" in r for r in role["rules"])
    binding = find(objs, "ClusterRoleBinding", "kproxy")
    sa = find(objs, "ServiceAccount", "kproxy")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "kproxy",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kproxy", "namespace": sa["metadata"]["namespace"]}
    ]
    ds = find(objs, "DaemonSet", "kproxy")
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == "kproxy"


def test_daemonset_runs_on_every_node_in_the_host_network():
    ds = find(base_objects(), "DaemonSet", "kproxy")
    assert ds["metadata"]["namespace"] == "kube-system"
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    # Tolerates every taint: one toleration with operator Exists and no key nor effect.
    assert {"operator": "Exists"} in pod["tolerations"]
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    labels = pod.get("nodeSelector", {})
    assert set(labels) <= {"kubernetes.io/os"}, "kproxy must not skip any Linux node"
    selector = ds["spec"]["selector"]["matchLabels"]
    assert selector.items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert "k8s-app" not in ds["spec"]["template"]["metadata"]["labels"], (
        "k8s-app=kube-proxy is kube-proxy's DaemonSet selector"
    )


def test_container_is_unprivileged_with_only_net_admin_and_net_raw():
    c = container(find(base_objects(), "DaemonSet", "kproxy"))
    sc = c["securityContext"]
    assert sc.get("privileged", False) is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == ["NET_ADMIN", "NET_RAW"]
    pod_sc = find(base_objects(), "DaemonSet", "kproxy")["spec"]["template"]["spec"]
    assert "securityContext" not in pod_sc or not pod_sc["securityContext"].get("privileged")


def test_host_paths_and_mounts():
    ds = find(base_objects(), "DaemonSet", "kproxy")
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container(ds)["volumeMounts"]}
    expected = {
        "/run/xtables.lock": ("/run/xtables.lock", "FileOrCreate", False),
        "/run/kproxy.lock": ("/run/kproxy.lock", "FileOrCreate", False),
        "/var/lib/kproxy": ("/var/lib/kproxy", "DirectoryOrCreate", False),
        "/lib/modules": ("/lib/modules", "Directory", True),
    }
    for mount_path, (host_path, type_, read_only) in expected.items():
        assert mount_path in mounts, f"{mount_path} not mounted"
        m = mounts[mount_path]
        v = volumes[m["name"]]
        assert v["hostPath"] == {"path": host_path, "type": type_}
        assert m.get("readOnly", False) is read_only, mount_path
    # Everything else kproxy writes is in a volume too (read-only root filesystem).
    args = container(ds)["args"]
    for name in ("--state-cache", "--snapshot-dir", "--lock-file"):
        path = flag(args, name)
        assert path is not None, f"{name} not set"
        assert any(path == mp or path.startswith(mp.rstrip("/") + "/") for mp in mounts), (
            f"{name}={path} is not on a mounted volume"
        )
    # Every hostPath is mounted; none is the host's root or /etc.
    for v in volumes.values():
        if "hostPath" in v:
            assert v["hostPath"]["path"] not in ("/", "/etc", "/var", "/run")


def test_flags_come_from_the_configmap_and_kproxy_accepts_them():
    objs = base_objects()
    ds, cm = find(objs, "DaemonSet", "kproxy"), find(objs, "ConfigMap", "kproxy-config")
    c = container(ds)
    assert c["envFrom"] == [{"configMapRef": {"name": "kproxy-config"}}]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in c[
        "env"
    ]
    assert "--hostname-override=$(NODE_NAME)" in c["args"]
    args = expand_args(ds, cm, node="node-7")
    ns = parse_run_args(args)
    assert ns.command == "run"
    assert ns.node_name == "node-7"
    assert ns.cluster_cidr == [cm["data"]["KPROXY_CLUSTER_CIDR"]]
    # Every KPROXY_ key of the ConfigMap is used by the args: no setting is silently ignored.
    unused = [k for k in cm["data"] if k.startswith("KPROXY_") and f"$({k})" not in str(c["args"])]
    assert not unused, f"ConfigMap keys no flag uses: {unused}"
    # The image's entrypoint is `kproxy run`: the DaemonSet does not replace it.
    assert "command" not in c


def test_a_flag_kproxy_does_not_have_is_caught():
    objs = base_objects()
    ds, cm = find(objs, "DaemonSet", "kproxy"), find(objs, "ConfigMap", "kproxy-config")
    bad = copy.deepcopy(cm)
    bad["data"]["KPROXY_MODE"] = "userspace"  # ipvs is taken (as nftables mode)
    with pytest.raises(AssertionError, match="rejects"):
        parse_run_args(expand_args(ds, bad, node="n"))
    ds2 = copy.deepcopy(ds)
    container(ds2)["args"].append("--proxy-modes=iptables")  # kube-proxy's is --proxy-mode
    with pytest.raises(AssertionError, match="rejects"):
        parse_run_args(expand_args(ds2, cm, node="n"))


def test_probes_ports_and_resources_match_the_flags():
    objs = base_objects()
    ds, cm = find(objs, "DaemonSet", "kproxy"), find(objs, "ConfigMap", "kproxy-config")
    c = container(ds)
    args = expand_args(ds, cm, node="n")
    healthz_port = int(flag(args, "--healthz-bind-address").rsplit(":", 1)[1])
    metrics_bind = flag(args, "--metrics-bind-address")
    metrics_host, metrics_port = metrics_bind.rsplit(":", 1)
    # Prometheus scrapes the node's address: not only loopback.
    assert metrics_host in ("0.0.0.0", "::", "[::]", "")
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": healthz_port}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": healthz_port}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": int(metrics_port), "healthz": healthz_port}
    res = c["resources"]
    assert {"cpu", "memory"} <= set(res["requests"])
    assert "memory" in res["limits"]


def test_metrics_service_and_servicemonitor_give_job_kube_proxy():
    objs = base_objects()
    ds, svc = find(objs, "DaemonSet", "kproxy"), find(objs, "Service", "kproxy-metrics")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["clusterIP"] == "None"
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container(ds)["ports"]}
    (sm,) = load_docs(MONITORING / "servicemonitor.yaml")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
    # The Service's labels as kustomize writes them (base adds the common labels).
    k = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    svc_labels = {**svc["metadata"].get("labels", {})}
    for entry in k.get("labels", []):
        svc_labels.update(entry["pairs"])
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc_labels.items()
    assert svc_labels[sm["spec"]["jobLabel"]] == "kube-proxy"  # -> job="kube-proxy"
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == port["name"]


def test_kustomize_builds_base_overlay_and_monitoring_and_they_validate():
    base = kustomize_build(BASE)
    overlay = kustomize_build(BESIDE)
    monitoring = kustomize_build(MONITORING)
    for obj in base + overlay:
        validate(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "kproxy"
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == "kube-system"
    assert sorted(o["kind"] for o in base) == sorted(o["kind"] for o in overlay)
    kinds = sorted(o["kind"] for o in monitoring)
    assert kinds == ["ConfigMap", "PrometheusRule", "ServiceMonitor"]
    dashboard = find(monitoring, "ConfigMap", "kproxy-dashboard")
    validate(dashboard)
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["kproxy-dashboard.json"])["uid"] == "kproxy"


def test_overlay_uses_kube_proxys_kubeconfig_and_keeps_everything_else():
    base_ds = find(kustomize_build(BASE), "DaemonSet", "kproxy")
    built = kustomize_build(BESIDE)
    ds, cm = find(built, "DaemonSet", "kproxy"), find(built, "ConfigMap", "kproxy-config")
    c = container(ds)
    # JSON 6902 patch: one flag appended, every base flag kept in order.
    assert c["args"] == container(base_ds)["args"] + [
        "--kubeconfig=/var/lib/kube-proxy/kubeconfig.conf"
    ]
    # Strategic merge: the kubeconfig volume added next to the base's (merged by name).
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    base_volumes = {v["name"] for v in base_ds["spec"]["template"]["spec"]["volumes"]}
    assert set(volumes) == base_volumes | {"kube-proxy-kubeconfig"}
    assert volumes["kube-proxy-kubeconfig"]["configMap"]["name"] == "kube-proxy"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/var/lib/kube-proxy"] == {
        "name": "kube-proxy-kubeconfig",
        "mountPath": "/var/lib/kube-proxy",
        "readOnly": True,
    }
    assert len(mounts) == len(container(base_ds)["volumeMounts"]) + 1
    # The security context is the base's, untouched.
    assert c["securityContext"] == container(base_ds)["securityContext"]
    # The key it reads exists in kubeadm's kube-proxy ConfigMap.
    kubeadm_cm = find(load_docs(KUBEADM), "ConfigMap", "kube-proxy")
    item = volumes["kube-proxy-kubeconfig"]["configMap"]["items"][0]
    assert item["key"] in kubeadm_cm["data"]
    ns = parse_run_args(expand_args(ds, cm, node="n"))
    assert ns.kubeconfig == "/var/lib/kube-proxy/" + item["path"]


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 `remove` and `add` (the only operations used here), on a copy."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        if op["op"] == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                del parent[last]  # KeyError: the path must exist, as RFC 6902 requires
        elif op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), op["value"])
            else:
                parent[last] = op["value"]
        else:
            raise ValueError(op["op"])
    return doc


def test_kube_proxy_off_and_on_patches_on_kubeadms_daemonset(tmp_path):
    """kube-proxy-off.yaml (a strategic merge patch) applied by kustomize to kubeadm's
    kube-proxy DaemonSet: still valid, now scheduled only on nodes labelled
    kproxy/kube-proxy=on; kube-proxy-on.json (JSON patch) gives back the original."""
    original = find(load_docs(KUBEADM), "DaemonSet", "kube-proxy")
    (tmp_path / "ds.yaml").write_text(yaml.safe_dump(original))
    # `kubectl patch` takes the bare patch; kustomize wants the object's header with it.
    off = yaml.safe_load((BESIDE / "kube-proxy-off.yaml").read_text())
    assert set(off) == {"spec"}
    header = {k: original[k] for k in ("apiVersion", "kind")}
    header["metadata"] = {k: original["metadata"][k] for k in ("name", "namespace")}
    (tmp_path / "off.yaml").write_text(yaml.safe_dump({**header, **off}))
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": ["ds.yaml"],
                "patches": [
                    {"path": "off.yaml", "target": {"kind": "DaemonSet", "name": "kube-proxy"}}
                ],
            }
        )
    )
    (patched,) = kustomize_build(tmp_path)
    validate(patched)
    selector = patched["spec"]["template"]["spec"]["nodeSelector"]
    assert selector == {"kubernetes.io/os": "linux", "kproxy/kube-proxy": "on"}
    # Nothing but the node selector changed.
    without = copy.deepcopy(patched)
    del without["spec"]["template"]["spec"]["nodeSelector"]["kproxy/kube-proxy"]
    assert without == original
    ops = json.loads((BESIDE / "kube-proxy-on.json").read_text())
    assert json_patch(patched, ops) == original
    # A node without the label (every node, unless labelled for a rollback) runs no kube-proxy.
    node_labels = {"kubernetes.io/os": "linux", "kubernetes.io/hostname": "n1"}
    assert not selector.items() <= node_labels.items()


def test_replace_overlay_is_kubeadms_daemonset_with_kproxys_image_and_nothing_else(tmp_path):
    """manifests/overlays/replace-kube-proxy: a partial kube-proxy DaemonSet whose only value is
    the image (kustomize `images:`), merged into kubeadm's DaemonSet as `kubectl apply
    --server-side` or `kubectl patch` would: the image is kproxy's (the base's), the command,
    volumes and everything else kube-proxy's; and that command line is one kproxy takes."""
    built = kustomize_build(REPLACE)
    assert [(o["kind"], o["metadata"]["name"], o["metadata"]["namespace"]) for o in built] == [
        ("DaemonSet", "kube-proxy", "kube-system")
    ]
    (partial,) = built
    (c,) = partial["spec"]["template"]["spec"]["containers"]
    kproxy_image = container(find(base_objects(), "DaemonSet", "kproxy"))["image"]
    assert c == {"name": "kube-proxy", "image": kproxy_image}
    original = find(load_docs(KUBEADM), "DaemonSet", "kube-proxy")
    (tmp_path / "ds.yaml").write_text(yaml.safe_dump(original))
    (tmp_path / "swap.yaml").write_text(yaml.safe_dump(partial))
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": ["ds.yaml"], "patches": [{"path": "swap.yaml"}]})
    )
    (swapped,) = kustomize_build(tmp_path)
    validate(swapped)
    assert container(swapped)["image"] == kproxy_image
    back = copy.deepcopy(swapped)
    container(back)["image"] = container(original)["image"]
    assert back == original  # the switch back is `set image` to the old one
    # kubeadm's command line, as the image's /usr/local/bin/kube-proxy gets it.
    command = container(swapped)["command"]
    assert command[0] == "/usr/local/bin/kube-proxy"
    args = parse_run_args([a.replace("$(NODE_NAME)", "node-1") for a in command[1:]])
    assert args.kp_config == "/var/lib/kube-proxy/config.conf"
    assert args.node_name == "node-1"
    # The file it names is the ConfigMap's config.conf, mounted there, and kproxy reads it.
    mounts = {m["mountPath"]: m["name"] for m in container(swapped)["volumeMounts"]}
    volumes = {v["name"]: v for v in swapped["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts["/var/lib/kube-proxy"]]["configMap"]["name"] == "kube-proxy"
    from kproxy.cli.proxyconfig import parse

    kubeadm_cm = find(load_docs(KUBEADM), "ConfigMap", "kube-proxy")
    conf = parse(kubeadm_cm["data"]["config.conf"])
    assert conf.kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"
    assert "kubeconfig.conf" in kubeadm_cm["data"]


def test_image_has_kube_proxy_as_kproxy():
    ins = dockerfile_instructions(ROOT / "Dockerfile")
    runs = [rest for word, rest in ins if word == "RUN"]
    assert "ln -sf kproxy /usr/local/bin/kube-proxy" in runs
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["kube-proxy"] == "kproxy.cli:kube_proxy_main"


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends in a continuation line"
    return out


def test_dockerfile_static():
    ins = dockerfile_instructions(ROOT / "Dockerfile")
    froms = [rest.split()[0] for word, rest in ins if word == "FROM"]
    assert froms and all(re.fullmatch(r"python:3\.11-slim(-\w+)?", f) for f in froms), froms
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    installs = re.findall(r"apt-get install ([^&;]*)", runs)
    packages = {w for i in installs for w in i.split() if not w.startswith("-")}
    assert {"iptables", "nftables", "conntrack"} <= packages
    assert "--no-install-recommends" in runs and "rm -rf /var/lib/apt/lists" in runs
    assert "pip wheel" in runs and "--no-index" in runs  # the wheel built, then installed
    (entry,) = [rest for word, rest in ins if word == "ENTRYPOINT"]
    assert json.loads(entry) == ["kproxy", "run"]
    env = " ".join(rest for word, rest in ins if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # the root filesystem is read-only
    # Every COPY from the build context exists and is let through .dockerignore.
    ignore = (ROOT / ".dockerignore").read_text().split()
    allowed = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    sources = []
    for word, rest in ins:
        if word == "COPY" and "--from=" not in rest:
            *srcs, _dest = rest.split()
            sources += srcs
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file"
        assert src.rstrip("/") in allowed, f"COPY {src}: excluded by .dockerignore"
    # The package the wheel is built from is the one the entrypoint runs.
    assert "kproxy" in sources and (ROOT / "kproxy" / "cli" / "__init__.py").exists()


def test_image_entrypoint_is_the_project_script():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["kproxy"] == "kproxy.cli:main"
    assert project["requires-python"].lstrip(">=") == "3.11"


# --------------------------------------------------------------------------- PromQL


PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "inf", "nan",
}  # fmt: skip


def promql_selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of each vector selector in `expr`."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\[[^\]]*\]", "", s)  # ranges, subqueries, Grafana's [$__rate_interval]
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    out = []
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", s):
        word = m.group()
        before = s[m.start() - 1] if m.start() else " "
        if before.isdigit() or before in ".$" or word in PROMQL_WORDS:
            continue  # 1e3, $instance, keywords
        after = s[m.end() :].lstrip()
        if after.startswith("("):
            continue  # a function or an aggregation
        labels: set[str] = set()
        if after.startswith("{"):
            inner = after[1 : after.index("}")]
            labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", inner))
            if s[m.start() - 1 : m.start()] == "{" or _inside_braces(s, m.start()):
                continue
        elif _inside_braces(s, m.start()):
            continue  # a label name
        out.append((word, labels))
    return out


def _inside_braces(s: str, pos: int) -> bool:
    return s.rfind("{", 0, pos) > s.rfind("}", 0, pos)


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
        for label in clause.split(",")
        if label.strip()
    }


def alert_rules() -> list[dict[str, Any]]:
    (rule,) = load_docs(MONITORING / "prometheusrule.yaml")
    return [r for g in rule["spec"]["groups"] for r in g["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads((MONITORING / "kproxy-dashboard.json").read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for panel in dashboard()["panels"]:
        for t in panel.get("targets", []):
            out.append((panel["title"], t["expr"]))
    return out


def all_exprs() -> list[tuple[str, str]]:
    return [(r["alert"], r["expr"]) for r in alert_rules()] + dashboard_exprs()


def grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "5m").replace("$instance", ".*")


def exported_from_text(text: str) -> dict[str, set[str]]:
    """Series names in a /metrics exposition and the label names seen on each."""
    series: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            series.setdefault(name, set())
            if kind == "histogram":
                for suffix in ("_bucket", "_sum", "_count"):
                    series.setdefault(name + suffix, set())
                series[name + "_bucket"].add("le")
        elif line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?", line)
            assert m, line
            labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(2) or ""))
            series.setdefault(m.group(1), set()).update(labels)
    return series


def declared_labels() -> dict[str, set[str]]:
    """Label names kproxy declares on each series (labelled metrics expose no series until a
    label value is used: a registry where each labelled metric has one child)."""
    from prometheus_client import generate_latest

    from kproxy.daemon.metrics import Metrics

    metrics = Metrics()
    for attr in vars(metrics).values():
        names = getattr(attr, "_labelnames", ())
        if names:
            attr.labels(**{n: "x" for n in names})
    return exported_from_text(generate_latest(metrics.registry).decode())


def check_exprs_against(exported: dict[str, set[str]]) -> list[str]:
    """Problems: series not exported, label names a series does not have."""
    problems = []
    for where, expr in all_exprs():
        selectors = promql_selectors(expr)
        assert selectors, f"{where}: no series found in {expr!r}"
        known_labels = set(TARGET_LABELS) | {"le"}
        for name, labels in selectors:
            if name in PROMETHEUS_SERIES:
                continue
            if name not in exported:
                problems.append(f"{where}: {name} is not exported by kproxy")
                continue
            known_labels |= exported[name]
            missing = labels - exported[name] - TARGET_LABELS
            if missing:
                problems.append(f"{where}: {name} has no label {sorted(missing)}")
        extra = grouping_labels(expr) - known_labels
        if extra:
            problems.append(f"{where}: grouping by {sorted(extra)}, which no series has")
    return problems


MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def promql_matchers(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric name, [(label, op, value)]) of each vector selector in `expr`, the target's
    own labels (job, instance: Prometheus adds them) left out."""
    out = []
    for name, _labels in promql_selectors(expr):
        m = re.search(rf"(?<![a-zA-Z0-9_:]){re.escape(name)}\s*(\{{[^}}]*\}})?", expr)
        assert m, (name, expr)
        matchers = [
            (label, op, value)
            for label, op, value in MATCHER.findall(m.group(1) or "")
            if label not in TARGET_LABELS
        ]
        out.append((name, matchers))
    return out


def exposed_series(text: str) -> dict[str, list[dict[str, str]]]:
    """Each sample name of a /metrics exposition and the label sets it is exposed with."""
    out: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?", line)
            assert m, line
            labels = dict(
                re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or "")
            )
            out.setdefault(m.group(1), []).append(labels)
    return out


def _matches(labels: dict[str, str], label: str, op: str, value: str) -> bool:
    have = labels.get(label, "")
    hit = re.fullmatch(value, have) is not None if "~" in op else have == value
    return hit if op in ("=", "=~") else not hit


def missing_series(text: str) -> list[str]:
    """Each series an alert or a dashboard panel selects that the exposition `text` lacks. A
    regex of plain alternatives (reason=~"flush|periodic") needs a series for each of them."""
    exposed = exposed_series(text)
    problems = []
    for where, expr in all_exprs():
        for name, matchers in promql_matchers(expr):
            if name in PROMETHEUS_SERIES:
                continue
            wanted = [matchers]
            for i, (label, op, value) in enumerate(matchers):
                if op == "=~" and re.fullmatch(r"[\w-]+(\|[\w-]+)+", value):
                    rest = matchers[:i] + matchers[i + 1 :]
                    wanted = [[*rest, (label, "=", v)] for v in value.split("|")]
                    break
            for want in wanted:
                if not any(
                    all(_matches(labels, *m) for m in want) for labels in exposed.get(name, [])
                ):
                    shown = ",".join(f'{lb}{op}"{v}"' for lb, op, v in want)
                    problems.append(f"{where}: no {name}{{{shown}}}")
    return problems


def test_promql_matchers_and_missing_series():
    expr = 'increase(a_total{job="kube-proxy", reason=~"flush|periodic"}[1h]) > 3 and b{x!="y"}'
    assert promql_matchers(expr) == [
        ("a_total", [("reason", "=~", "flush|periodic")]),
        ("b", [("x", "!=", "y")]),
    ]
    text = 'a_total{reason="flush"} 0.0\nb{x="z"} 1.0\n'
    assert exposed_series(text) == {"a_total": [{"reason": "flush"}], "b": [{"x": "z"}]}
    assert _matches({"x": "z"}, "x", "!=", "y") and not _matches({"x": "y"}, "x", "!=", "y")


def test_promql_selector_extraction():
    expr = (
        'histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{job="x", le!=""}'
        '[$__rate_interval]))) > 1e3 and on (job) b{table="nat"} offset 5m or time() - c'
    )
    assert promql_selectors(expr) == [("a_bucket", {"job", "le"}), ("b", {"table"}), ("c", set())]
    assert grouping_labels(expr) == {"instance", "le", "job"}


def test_every_series_used_is_one_kproxy_declares():
    assert check_exprs_against(declared_labels()) == []


def test_a_series_kproxy_does_not_export_is_caught():
    exported = declared_labels()
    del exported["kproxy_last_snapshot_timestamp_seconds"]
    del exported["kproxy_drift_backoffs_total"]
    exported["kproxy_drift_repairs_total"] = set()  # no `reason` nor `process` label
    problems = check_exprs_against(exported)
    assert (
        "KproxySnapshotTooOld: kproxy_last_snapshot_timestamp_seconds is not exported by kproxy"
        in problems
    )
    assert "KproxyRulesFought: kproxy_drift_backoffs_total is not exported by kproxy" in problems
    assert (
        "KproxyDriftRepairsRecurring: kproxy_drift_repairs_total has no label ['reason']"
        in problems
    )
    assert any(p.startswith("Drift repairs: grouping by ['process', 'reason']") for p in problems)


# --------------------------------------------------------------------------- alerts, dashboard


REQUIRED_ALERTS = {
    "KproxyDown",
    "KproxyAbsent",
    "KproxySyncStalled",
    "KproxyRestoreFailures",
    "KproxyDriftRepairsRecurring",
    "KproxyRulesFought",
    "KproxyAPIServerUnreachable",
    "KproxyRunningFromStateCache",
    "KproxySnapshotTooOld",
    "KproxyStateWritesFailing",
    "KproxyNodeCheckFailed",
}


def github_anchors(markdown: str) -> set[str]:
    anchors = set(re.findall(r'<a (?:id|name)="([^"]+)"', markdown))
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_alerts_have_severity_runbook_and_select_job_kube_proxy():
    rules = alert_rules()
    assert {r["alert"] for r in rules} == REQUIRED_ALERTS
    anchors = github_anchors((ROOT / "docs" / "RECOVERY.md").read_text())
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        ann = r["annotations"]
        assert ann["summary"] and ann["description"], r["alert"]
        path, _, anchor = ann["runbook_url"].partition("#")
        assert path == "docs/RECOVERY.md", r["alert"]
        assert anchor == r["alert"].lower() and anchor in anchors, (
            f"{r['alert']}: no section #{anchor} in docs/RECOVERY.md"
        )
        for name, labels in promql_selectors(r["expr"]):
            assert "job" in labels, f'{r["alert"]}: {name} without job="kube-proxy"'
        assert 'job="kube-proxy"' in r["expr"]


def test_recovery_links_between_sections_resolve():
    """The alert sections send the reader to other sections: every #link has its heading."""
    text = (ROOT / "docs" / "RECOVERY.md").read_text()
    anchors = github_anchors(text)
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links
    assert [link for link in links if link not in anchors] == []


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "`promtool` is not installed (Debian's prometheus package; "
            "scripts/install-system-deps.sh installs it as root)"
        )
    return path


def write_rules(path: Path, annotations: bool = True) -> None:
    (rule,) = load_docs(MONITORING / "prometheusrule.yaml")
    spec = copy.deepcopy(rule["spec"])
    if not annotations:
        for g in spec["groups"]:
            for r in g["rules"]:
                r.pop("annotations", None)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_promtool_check_rules(tmp_path):
    write_rules(tmp_path / "kproxy-rules.yaml")
    proc = run_promtool("check", "rules", "kproxy-rules.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(REQUIRED_ALERTS)} rules found" in proc.stdout


def test_promtool_check_rules_catches_a_broken_expression(tmp_path):
    (rule,) = load_docs(MONITORING / "prometheusrule.yaml")
    rule["spec"]["groups"][0]["rules"][0]["expr"] = 'up{job="kube-proxy"} ==== 0'
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rule["spec"]))
    assert run_promtool("check", "rules", "r.yaml", cwd=tmp_path).returncode != 0


def test_promtool_unit_tests_of_the_alerts(tmp_path):
    write_rules(tmp_path / "kproxy-rules.yaml", annotations=False)
    shutil.copy(DATA / "kproxy-alerts-test.yaml", tmp_path)
    proc = run_promtool("test", "rules", "kproxy-alerts-test.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Every alert has a test that expects it to fire.
    tests = yaml.safe_load((DATA / "kproxy-alerts-test.yaml").read_text())["tests"]
    fired = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert fired == REQUIRED_ALERTS


def test_promtool_unit_tests_fail_when_an_alert_is_wrong(tmp_path):
    """The unit tests would catch a broken alert: sync-stalled compared the wrong way round."""
    write_rules(tmp_path / "kproxy-rules.yaml", annotations=False)
    path = tmp_path / "kproxy-rules.yaml"
    spec = yaml.safe_load(path.read_text())
    for g in spec["groups"]:
        for r in g["rules"]:
            if r["alert"] == "KproxySyncStalled":
                wrong = r["expr"].replace("\n  > ", "\n  < ", 1)
                assert wrong != r["expr"]
                r["expr"] = wrong
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copy(DATA / "kproxy-alerts-test.yaml", tmp_path)
    proc = run_promtool("test", "rules", "kproxy-alerts-test.yaml", cwd=tmp_path)
    assert proc.returncode != 0 and "KproxySyncStalled" in proc.stdout + proc.stderr


def test_dashboard_covers_what_the_issue_asks():
    d = dashboard()
    assert d["uid"] == "kproxy" and d["schemaVersion"] >= 36
    titles = " | ".join(p["title"] for p in d["panels"]).lower()
    for words in (
        "sync duration p50 / p99",
        "network programming latency",
        "rules by table",
        "restore failures",
        "drift repairs",
        "api server reachable",
        "snapshot age",
        "memory",
        "cpu",
    ):
        assert words in titles, words
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in d["templating"]["list"]}
    assert variables == {"datasource", "instance"}
    for title, expr in dashboard_exprs():
        for name, labels in promql_selectors(expr):
            assert {"job", "instance"} <= labels, f"{title}: {name} not filtered by job, instance"
    refs = " ".join(json.dumps(p.get("datasource")) for p in d["panels"] if p["type"] != "row")
    assert "${datasource}" in refs


def test_dashboard_expressions_are_valid_promql(tmp_path):
    """promtool parses every panel expression (as a recording rule of a throwaway file)."""
    rules = [
        {"record": f"panel:{i}", "expr": grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(dashboard_exprs())
    ]
    (tmp_path / "panels.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]})
    )
    proc = run_promtool("check", "rules", "panels.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("title", ["Run it in a cluster", "Replacing kube-proxy"])
def test_readme_commands_use_flags_kproxy_has(title):
    """Every `kproxy run` flag the README's cluster sections name exists."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {title}", 1)
    assert len(section) == 2, f"README has no '{title}' section"
    body = section[1].split("\n## ", 1)[0]
    from kproxy.cli.flags import build_parser

    run = build_parser()._subparsers._group_actions[0].choices["run"]  # noqa: SLF001
    known = {o for a in run._actions for o in a.option_strings}  # noqa: SLF001
    used = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]+\*?)", body))
    used = {f for f in used if not f.endswith("*")}  # `--conntrack-*`: a family of flags
    # kubectl's; `kproxy cleanup --mode`.
    other_tools = {"--patch-file", "--type", "--server-side", "--force-conflicts"}
    other_tools |= {"--field-manager", "--mode"}
    unknown = used - known - other_tools
    assert not unknown, f"README names flags kproxy run does not have: {sorted(unknown)}"
    for path in re.findall(r"manifests/[\w./-]+", body):
        assert (ROOT / path.rstrip(".")).exists(), path


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
