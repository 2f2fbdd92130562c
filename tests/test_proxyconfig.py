"""kube-proxy's --config file, parsed (kproxy/cli/proxyconfig.py: pure, no I/O)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from kproxy.cli import proxyconfig
from kproxy.cli.proxyconfig import ConfigError, ProxyConfig, go_duration, parse

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_manifests as tm  # noqa: E402

HEAD = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
MAX = "net/netfilter/nf_conntrack_max"
ESTABLISHED = "net/netfilter/nf_conntrack_tcp_timeout_established"
CLOSE_WAIT = "net/netfilter/nf_conntrack_tcp_timeout_close_wait"


def kubeadm_config() -> str:
    cm = tm.find(tm.load_docs(tm.KUBEADM), "ConfigMap", "kube-proxy")
    return cm["data"]["config.conf"]


def conf(body: str = "", ncpu: int = 2) -> ProxyConfig:
    return parse(HEAD + body, "--config /etc/kp.yaml", ncpu=ncpu)


def error(body: str, head: str = HEAD) -> str:
    with pytest.raises(ConfigError) as err:
        parse(head + body, "--config /etc/kp.yaml")
    message = str(err.value)
    assert "\n" not in message
    return message


UPSTREAM_DEFAULTS = {
    "mode": "iptables",
    "cluster_cidrs": (),
    "detect_local_mode": "ClusterCIDR",
    "kubeconfig": None,
    "qps": 5.0,
    "burst": 10,
    "content_type": "application/vnd.kubernetes.protobuf",
    "hostname_override": "",
    "bind_address": "0.0.0.0",
    "node_ip": None,
    "healthz_bind_address": "0.0.0.0:10256",
    "metrics_bind_address": "127.0.0.1:10249",
    "nodeport_addresses": (),
    "masquerade_all": False,
    "masquerade_bit": 14,
    "sync_period": 30.0,
    "min_sync_period": 1.0,
    "localhost_nodeports": True,
    "verbosity": 0,
    "log_format": "text",
    "feature_gates": {},
    "show_hidden_metrics_for_version": "",
    # 32768 per core, at least 131072: two CPUs -> the minimum; 24h and 1h timeouts.
    "conntrack_sysctls": {MAX: "131072", ESTABLISHED: "86400", CLOSE_WAIT: "3600"},
    "notes": (),
}


def test_an_empty_file_takes_every_upstream_default():
    got = conf()
    assert {k: getattr(got, k) for k in UPSTREAM_DEFAULTS} == UPSTREAM_DEFAULTS


def test_kubeadms_config_conf_nulls_and_zeros_take_the_defaults_and_say_nothing():
    got = parse(kubeadm_config(), ncpu=2)
    want = dict(
        UPSTREAM_DEFAULTS,
        cluster_cidrs=("10.244.0.0/16",),
        kubeconfig="/var/lib/kube-proxy/kubeconfig.conf",
    )
    assert {k: getattr(got, k) for k in want} == want


def test_every_field_with_a_meaning_is_mapped():
    got = conf(
        """
mode: iptables
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
detectLocalMode: ClusterCIDR
clientConnection: {kubeconfig: /k.conf, qps: 50, burst: 100, contentType: application/json}
hostnameOverride: " Node-7 "
bindAddress: 192.168.1.5
healthzBindAddress: 127.0.0.1:20256
metricsBindAddress: 0.0.0.0:20249
nodePortAddresses: [192.168.0.0/16, primary]
iptables:
  masqueradeAll: true
  masqueradeBit: 5
  minSyncPeriod: 500ms
  syncPeriod: 1m0s
  localhostNodePorts: false
conntrack:
  maxPerCore: 100000
  min: 10
  tcpEstablishedTimeout: 2h
  tcpCloseWaitTimeout: 30m
  tcpBeLiberal: true
  udpTimeout: 30s
  udpStreamTimeout: 2m
showHiddenMetricsForVersion: "1.30"
featureGates: {SomeGate: true}
logging: {format: json, verbosity: 4}
""",
        ncpu=4,
    )
    assert got.mode == "iptables"
    assert got.cluster_cidrs == ("10.244.0.0/16", "fd00:10:244::/56")
    assert (got.kubeconfig, got.qps, got.burst) == ("/k.conf", 50.0, 100)
    assert got.content_type == "application/json"
    assert got.hostname_override == "node-7"  # trimmed and lower-cased, as upstream
    assert (got.bind_address, got.node_ip) == ("192.168.1.5", "192.168.1.5")
    assert got.healthz_bind_address == "127.0.0.1:20256"
    assert got.metrics_bind_address == "0.0.0.0:20249"
    assert got.nodeport_addresses == ("192.168.0.0/16", "primary")
    assert (got.masquerade_all, got.masquerade_bit) == (True, 5)
    assert (got.min_sync_period, got.sync_period) == (0.5, 60.0)
    assert got.localhost_nodeports is False
    assert got.conntrack_sysctls == {
        MAX: "400000",
        ESTABLISHED: "7200",
        CLOSE_WAIT: "1800",
        "net/netfilter/nf_conntrack_udp_timeout": "30",
        "net/netfilter/nf_conntrack_udp_timeout_stream": "120",
        "net/netfilter/nf_conntrack_tcp_be_liberal": "1",
    }
    assert (got.verbosity, got.log_format) == (4, "json")
    assert got.feature_gates == {"SomeGate": True}
    assert got.show_hidden_metrics_for_version == "1.30"
    # Read, and said to do nothing: one note each, naming the field.
    for path in ("featureGates", "showHiddenMetricsForVersion"):
        assert sum(n.startswith(path + ":") for n in got.notes) == 1, (path, got.notes)
    # Applied (the client-side rate limit), or what kproxy does anyway (JSON): no note.
    assert not [n for n in got.notes if n.startswith("clientConnection")], got.notes


def test_client_rate_limit_takes_upstreams_defaults_and_a_negative_burst_stops():
    assert (conf().qps, conf().burst) == (5.0, 10)
    zeros = conf("clientConnection: {qps: 0, burst: 0}\n")
    assert (zeros.qps, zeros.burst) == (5.0, 10)  # upstream's defaulting: zero is unset
    got = conf("clientConnection: {qps: 2.5, burst: 3}\n")
    assert (got.qps, got.burst) == (2.5, 3)
    assert conf("clientConnection: {qps: -1}\n").qps == -1.0  # client-go: no limit
    assert error("clientConnection: {burst: -1}\n") == (
        '--config /etc/kp.yaml: field "clientConnection.burst" is -1, not 0 or more'
    )


def test_asking_for_protobuf_is_one_info_note_json_none():
    got = conf("clientConnection: {contentType: application/vnd.kubernetes.protobuf}\n")
    assert got.notes == (
        "clientConnection.contentType application/vnd.kubernetes.protobuf: not used, "
        "kproxy's client speaks JSON only",
    )
    assert conf("clientConnection: {contentType: application/json}\n").notes == ()
    assert conf('clientConnection: {contentType: ""}\n').notes == ()  # kubeadm's: silent


def test_conntrack_zero_leaves_the_sysctls_alone():
    got = conf("conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}\n")
    assert got.conntrack_sysctls == {}
    # maxPerCore * CPUs above min wins.
    assert conf("conntrack: {maxPerCore: 1000, min: 5}\n", ncpu=3).conntrack_sysctls[MAX] == "3000"


def test_mode_ipvs_runs_nftables_mode_with_one_note_and_reads_the_nftables_section():
    got = conf(
        "mode: ipvs\nnftables: {masqueradeBit: 3, masqueradeAll: true, syncPeriod: 10s, "
        "minSyncPeriod: 2s}\niptables: {masqueradeBit: 9}\nipvs: {scheduler: rr}\n"
    )
    assert got.mode == "nftables"
    assert [n for n in got.notes if n.startswith("mode ipvs")] == [
        "mode ipvs: kproxy runs its nftables mode instead (the same O(1) lookup; IPVS is "
        "deprecated upstream since 1.35)"
    ]
    assert (got.masquerade_bit, got.masquerade_all) == (3, True)
    assert (got.sync_period, got.min_sync_period) == (10.0, 2.0)
    assert any(n.startswith("iptables.masqueradeBit: not used in nftables mode") for n in got.notes)
    assert any(n.startswith("ipvs:") for n in got.notes)


def test_mode_nftables_and_the_empty_mode():
    assert conf("mode: nftables\n").mode == "nftables"
    assert conf('mode: ""\n').mode == "iptables"  # upstream's default on Linux
    assert conf("mode: nftables\n").notes == ()
    assert "is 'userspace'" in error("mode: userspace\n")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("30s", 30.0),
        ("1m0s", 60.0),
        ("1h2m3.5s", 3723.5),
        ("500ms", 0.5),
        ("1.5m", 90.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("250us", 0.00025),
    ],
)
def test_go_durations(text, seconds):
    assert go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["1", "1x", "", "s", "1 s", "1s2"])
def test_not_go_durations(text):
    with pytest.raises(ValueError):
        go_duration(text)


def test_a_duration_field_takes_go_durations_only():
    assert conf("iptables: {syncPeriod: 1m30s}\n").sync_period == 90.0
    assert conf("iptables: {minSyncPeriod: 0s}\n").min_sync_period == 1.0  # 0: the default
    assert 'field "iptables.syncPeriod" must be a duration' in error("iptables: {syncPeriod: 30}\n")
    assert 'field "iptables.minSyncPeriod" must be a duration' in error(
        "iptables: {minSyncPeriod: soon}\n"
    )


def test_an_unknown_field_is_one_line_naming_it():
    assert (
        error("iptables:\n  minSyncPeriodd: 1s\n")
        == '--config /etc/kp.yaml: unknown field "iptables.minSyncPeriodd"'
    )
    assert error("clusterCidr: 10.0.0.0/8\n") == (
        '--config /etc/kp.yaml: unknown field "clusterCidr"'
    )
    assert error("logging: {options: {yaml: {}}}\n").endswith(
        'unknown field "logging.options.yaml"'
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("iptables: {masqueradeAll: 'yes'}\n", "iptables.masqueradeAll"),
        ("iptables: {masqueradeBit: '14'}\n", "iptables.masqueradeBit"),
        ("iptables: {masqueradeBit: true}\n", "iptables.masqueradeBit"),
        ("clusterCIDR: 10\n", "clusterCIDR"),
        ("nodePortAddresses: 10.0.0.0/8\n", "nodePortAddresses"),
        ("clientConnection: {qps: fast}\n", "clientConnection.qps"),
        ("featureGates: {A: 1}\n", "featureGates"),
        ("iptables: [a]\n", "iptables"),
        ("conntrack: {maxPerCore: 1.5}\n", "conntrack.maxPerCore"),
    ],
)
def test_a_wrong_type_is_one_line_naming_the_field(body, field):
    assert error(body).startswith(f'--config /etc/kp.yaml: field "{field}" must be')


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("clusterCIDR: 10.244.0.0/33\n", "clusterCIDR"),
        ("iptables: {masqueradeBit: 32}\n", "iptables.masqueradeBit"),
        ("bindAddress: node-1\n", "bindAddress"),
        ("healthzBindAddress: 'localhost:1'\n", "healthzBindAddress"),
        ("metricsBindAddress: '127.0.0.1:99999'\n", "metricsBindAddress"),
        ("nodePortAddresses: [10.0.0.0/8, secondary]\n", "nodePortAddresses[1]"),
        ("detectLocalMode: Magic\n", "detectLocalMode"),
        ("logging: {format: xml}\n", "logging.format"),
    ],
)
def test_a_bad_value_names_the_field(body, field):
    assert error(body).startswith(f'--config /etc/kp.yaml: field "{field}" ')


def test_api_version_kind_and_shape_are_checked():
    assert "apiVersion" in error("", head="apiVersion: v1\nkind: KubeProxyConfiguration\n")
    assert "kind" in error(
        "", head="apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n"
    )
    assert "a mapping" in error("", head="- a\n")
    assert "not YAML" in error("", head="a: [\n")


def test_bind_addresses_as_upstream_defaults_them():
    v6 = conf("bindAddress: '::'\n")
    assert (v6.healthz_bind_address, v6.metrics_bind_address) == ("[::]:10256", "[::1]:10249")
    assert v6.node_ip is None
    # An address without a port gets the default port (AppendPortIfNeeded).
    got = conf("healthzBindAddress: 127.0.0.1\nmetricsBindAddress: '::1'\n")
    assert (got.healthz_bind_address, got.metrics_bind_address) == (
        "127.0.0.1:10256",
        "[::1]:10249",
    )


def test_detect_local_modes_are_read_with_their_interface():
    got = conf(
        "clusterCIDR: 10.244.0.0/16\ndetectLocalMode: BridgeInterface\n"
        "detectLocal: {bridgeInterface: cbr0, interfaceNamePrefix: veth}\n"
    )
    assert (got.detect_local_mode, got.bridge_interface, got.interface_name_prefix) == (
        "BridgeInterface",
        "cbr0",
        "veth",
    )
    assert got.cluster_cidrs == ("10.244.0.0/16",)
    assert got.notes == ()
    got = conf("detectLocalMode: InterfaceNamePrefix\ndetectLocal: {interfaceNamePrefix: cali}\n")
    assert (got.detect_local_mode, got.interface_name_prefix) == ("InterfaceNamePrefix", "cali")
    assert conf("detectLocalMode: NodeCIDR\n").detect_local_mode == "NodeCIDR"


@pytest.mark.parametrize(
    ("text", "field_path"),
    [
        ("detectLocalMode: BridgeInterface\n", "detectLocal.bridgeInterface"),
        ("detectLocalMode: InterfaceNamePrefix\n", "detectLocal.interfaceNamePrefix"),
        (
            "detectLocalMode: BridgeInterface\ndetectLocal: {bridgeInterface: 'a b'}\n",
            "detectLocal.bridgeInterface",
        ),
        (
            "detectLocalMode: InterfaceNamePrefix\n"
            "detectLocal: {interfaceNamePrefix: waytoolonginterfacename}\n",
            "detectLocal.interfaceNamePrefix",
        ),
        ("detectLocalMode: Bridge\n", "detectLocalMode"),
    ],
)
def test_a_detect_local_mode_without_its_interface_is_refused(text, field_path):
    with pytest.raises(ConfigError, match=f'field "{field_path}"'):
        conf(text)


def test_json_is_yaml_too():
    text = '{"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",'
    text += ' "mode": "nftables", "clusterCIDR": "10.1.0.0/16"}'
    got = parse(text)
    assert (got.mode, got.cluster_cidrs) == ("nftables", ("10.1.0.0/16",))


def test_every_schema_field_is_accepted_in_kubeadms_file():
    """The schema and kubeadm's file agree: every field kubeadm writes is known, and the
    file covers every top-level field but the ones kubeadm leaves out."""
    doc = yaml.safe_load(kubeadm_config())
    assert set(doc) <= set(proxyconfig.SCHEMA)
    assert set(proxyconfig.SCHEMA) - set(doc) == {"featureGates", "windowsRunAsService"}
