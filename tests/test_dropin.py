"""kproxy with kube-proxy's command line (kproxy/cli/dropin.py): kube-proxy's flags, --config
and upstream's precedence between them, the conntrack sysctls, where state goes. No kernel:
sysctls are written under a temporary directory standing for /proc/sys."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from kproxy import nodeinfo
from kproxy.cli import dropin
from kproxy.cli.flags import KUBE_PROXY_FLAGS, build_parser
from kproxy.cli.proxyconfig import NF_CONNTRACK_MAX, ConfigError
from kproxy.nftables.mode import NftablesMode
from kproxy.nftables.nft import NftBackend

ROOT = Path(__file__).resolve().parent.parent
HEAD = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
ESTABLISHED = "net/netfilter/nf_conntrack_tcp_timeout_established"


def run_args(*argv: str, ncpu: int = 2):
    argv = ["run", *argv]
    args = build_parser().parse_args(argv)
    resolved = dropin.resolve(args, argv, ncpu=ncpu)
    return args, resolved


def notes(resolved: dropin.Resolved, level: int | None = None) -> list[str]:
    return [n for lvl, n in resolved.notes if level is None or lvl == level]


@pytest.fixture
def isolated():
    """A command prefix that runs a process in a network namespace of its own, deleted after:
    `kproxy run` is expected to exit before it touches anything, and if a bug made it start,
    it must start there, never in this machine's namespace."""
    import secrets
    import shutil

    ip = shutil.which("ip") or "/usr/sbin/ip"
    name = f"kpt-{secrets.token_hex(3)}-dropin"
    if subprocess.run([ip, "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    try:
        yield [ip, "netns", "exec", name]
    finally:
        subprocess.run([ip, "netns", "delete", name], capture_output=True)


@pytest.fixture
def config(tmp_path):
    def write(body: str) -> str:
        path = tmp_path / "config.conf"
        path.write_text(HEAD + body)
        return str(path)

    return write


def test_without_config_kube_proxys_flags_map_onto_kproxys_options():
    args, res = run_args(
        "--proxy-mode=nftables",
        "--cluster-cidr=10.244.0.0/16",
        "--hostname-override=Node-1",
        "--bind-address=192.168.1.5",
        "--healthz-port=12345",
        "--metrics-port=12346",
        "--v=4",
        "--logging-format=json",
        "--iptables-sync-period=10s",
    )
    assert args.mode == "nftables"
    assert args.cluster_cidr == ["10.244.0.0/16"]
    assert args.node_name == "node-1"  # lower-cased, as upstream
    assert args.node_ip == ["192.168.1.5"]
    assert args.healthz_bind_address == "0.0.0.0:12345"
    assert args.metrics_bind_address == "127.0.0.1:12346"
    assert args.verbose is True
    assert args.log_format == "json"
    assert args.sync_period == 10.0
    assert res.notes == [] and res.conntrack_sysctls == {} and not res.cleanup
    args, _ = run_args("--v=2", "--bind-address=0.0.0.0")
    assert args.verbose is False and args.node_ip == []


def test_proxy_mode_ipvs_is_nftables_with_one_warning_and_empty_is_iptables():
    args, res = run_args("--proxy-mode", "ipvs")
    assert args.mode == "nftables"
    assert len(notes(res, logging.WARNING)) == 1 and "ipvs" in notes(res)[0]
    args, res = run_args("--proxy-mode=")
    assert args.mode == "iptables" and res.notes == []


def test_every_kube_proxy_flag_is_accepted_and_one_without_meaning_is_one_line():
    argv = []
    for name, (takes_value, _) in KUBE_PROXY_FLAGS.items():
        if name in ("config", "cleanup"):
            continue
        value = {
            "v": "2",
            "logging-format": "text",
            "bind-address": "0.0.0.0",
            "healthz-port": "10256",
            "metrics-port": "10249",
            "conntrack-max-per-core": "0",
            "conntrack-min": "0",
            "kube-api-qps": "20",
            "kube-api-burst": "30",
        }.get(name, "1s" if "timeout" in name or "period" in name else "x")
        argv.append(f"--{name}={value}" if takes_value else f"--{name}")
    args, res = run_args(*argv)
    ignored = sorted(n for n, (_, why) in KUBE_PROXY_FLAGS.items() if why)
    said = notes(res, logging.INFO)
    assert len(said) == len(ignored)
    for name in ignored:
        assert sum(line.startswith(f"--{name} accepted, no effect: ") for line in said) == 1, name


def test_cleanup_is_taken_and_a_bad_kube_proxy_value_is_one_line():
    assert run_args("--cleanup")[1].cleanup
    assert run_args("--cleanup=true")[1].cleanup
    assert not run_args("--cleanup=false")[1].cleanup
    for argv, named in (
        (["--v=loud"], "--v"),
        (["--bind-address=node"], "--bind-address"),
        (["--healthz-port=http"], "--healthz-port"),
        (["--conntrack-min=many"], "--conntrack-min"),
        (["--conntrack-udp-timeout=5"], "--conntrack-udp-timeout"),
        (["--hostname-override= "], "--hostname-override"),
    ):
        with pytest.raises(ConfigError, match=f"^{named}: "):
            run_args(*argv)


def test_conntrack_flags_without_config_are_the_sysctls_kube_proxy_sets():
    _, res = run_args("--conntrack-max-per-core=1000", "--conntrack-min=10", ncpu=4)
    assert res.conntrack_sysctls == {
        NF_CONNTRACK_MAX: "4000",
        ESTABLISHED: "86400",
        "net/netfilter/nf_conntrack_tcp_timeout_close_wait": "3600",
    }


def test_with_config_the_file_wins_over_flags_but_hostname_master_and_logging(config):
    path = config(
        "clusterCIDR: 10.244.0.0/16\nhostnameOverride: from-file\nmode: nftables\n"
        "iptables: {syncPeriod: 1m}\nnftables: {syncPeriod: 20s, minSyncPeriod: 2s}\n"
        "metricsBindAddress: 127.0.0.1:20249\nhealthzBindAddress: 127.0.0.1:20256\n"
        "clientConnection: {kubeconfig: /file/kubeconfig}\nlogging: {verbosity: 0}\n"
    )
    args, res = run_args(
        f"--config={path}",
        "--cluster-cidr=10.0.0.0/8",
        "--proxy-mode=iptables",
        "--iptables-sync-period=5s",
        "--metrics-bind-address=0.0.0.0:10249",
        "--kubeconfig=/flag/kubeconfig",
        "--healthz-port=1",
        "--feature-gates=A=true",
        "--hostname-override=NODE-1",
        "--master=http://127.0.0.1:8080",
        "--v=5",
        "--state-cache=/tmp/x/state.json",
        "--oom-score-adj=-999",
    )
    # The file's values...
    assert args.cluster_cidr == ["10.244.0.0/16"]
    assert args.mode == "nftables"
    assert (args.sync_period, args.min_sync_period) == (20.0, 2.0)
    assert args.metrics_bind_address == "127.0.0.1:20249"
    assert args.healthz_bind_address == "127.0.0.1:20256"
    assert args.kubeconfig == "/file/kubeconfig"
    # ...but these flags win, as upstream's Complete() keeps them.
    assert args.node_name == "node-1"
    assert args.master == ["http://127.0.0.1:8080"]
    assert args.verbose is True
    # kproxy's own flags have no field in the file: kept.
    assert args.state_cache == "/tmp/x/state.json"
    warned = notes(res, logging.WARNING)
    for flag in (
        "--cluster-cidr",
        "--proxy-mode",
        "--iptables-sync-period",
        "--metrics-bind-address",
        "--kubeconfig",
        "--healthz-port",
        "--feature-gates",
        "--oom-score-adj",
    ):
        assert f"{flag} ignored: --config is given, its value is used" in warned, flag
    assert not any(n.startswith(("--hostname-override", "--master", "--v ")) for n in warned)


def test_with_config_the_files_hostname_and_logging_apply_when_no_flag_says(config):
    path = config("hostnameOverride: Node-2\nlogging: {verbosity: 4, format: json}\n")
    args, res = run_args(f"--config={path}")
    assert args.node_name == "node-2"
    assert args.verbose is True and args.log_format == "json"
    assert res.notes == []
    assert res.conntrack_sysctls[ESTABLISHED] == "86400"


def test_config_ipvs_warns_once(config):
    path = config("mode: ipvs\n")
    args, res = run_args(f"--config={path}")
    assert args.mode == "nftables"
    assert [n for n in notes(res, logging.WARNING) if "ipvs" in n] == [
        "mode ipvs: kproxy runs its nftables mode instead (the same O(1) lookup; IPVS is "
        "deprecated upstream since 1.35)"
    ]


def test_a_config_that_cannot_be_read_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^--config /no/such/file: cannot read it: "):
        run_args("--config=/no/such/file")


@pytest.mark.parametrize(
    "entry",
    [
        [sys.executable, "-m", "kproxy", "run"],
        [
            sys.executable,
            "-c",
            "import sys; from kproxy.cli import kube_proxy_main; sys.exit(kube_proxy_main())",
        ],
    ],
    ids=["kproxy-run", "kube-proxy"],
)
def test_an_unknown_field_stops_the_start_with_one_line_naming_it(config, entry, isolated):
    path = config("clusterCIDR: 10.244.0.0/16\niptables:\n  minSyncPeriodd: 1s\n")
    res = subprocess.run(
        [*isolated, *entry, f"--config={path}", "--hostname-override=node-1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].endswith(f'--config {path}: unknown field "iptables.minSyncPeriodd"')


def test_kube_proxy_entry_point_and_version():
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from kproxy.cli import kube_proxy_main; "
            "sys.exit(kube_proxy_main(['--version']))",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert res.returncode == 0 and "as kube-proxy" in res.stdout
    text = (ROOT / "pyproject.toml").read_text()
    assert 'kube-proxy = "kproxy.cli:kube_proxy_main"' in text


# -- the conntrack sysctls


@pytest.fixture
def proc_sys(tmp_path, monkeypatch):
    root = tmp_path / "proc-sys"
    (root / "net/netfilter").mkdir(parents=True)
    monkeypatch.setattr(nodeinfo, "PROC_SYS", root)
    return root


def test_sysctls_are_set_when_they_differ_and_max_only_in_the_nodes_namespace(proc_sys):
    (proc_sys / NF_CONNTRACK_MAX).write_text("65536\n")
    (proc_sys / ESTABLISHED).write_text("432000\n")
    wanted = {NF_CONNTRACK_MAX: "131072", ESTABLISHED: "86400"}
    dropin.set_conntrack_sysctls(wanted, init_netns=False)
    assert (proc_sys / NF_CONNTRACK_MAX).read_text().strip() == "65536"  # global: not ours
    assert (proc_sys / ESTABLISHED).read_text().strip() == "86400"
    dropin.set_conntrack_sysctls(wanted, init_netns=True)
    assert (proc_sys / NF_CONNTRACK_MAX).read_text().strip() == "131072"


def test_a_sysctl_that_cannot_be_set_is_a_warning_not_a_failure(proc_sys, caplog):
    missing = "net/netfilter/no/such/dir/nf_conntrack_udp_timeout"
    with caplog.at_level(logging.WARNING):
        dropin.set_conntrack_sysctls({missing: "30"}, init_netns=True)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "cannot set net.netfilter.no.such.dir.nf_conntrack_udp_timeout=30"
    ]


# -- where the state cache and snapshots go


@pytest.fixture
def defaults(tmp_path, monkeypatch):
    """The default paths under a directory that cannot be made (a regular file's child:
    root can write anywhere else)."""
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    cache, snaps = str(blocked / "kproxy/state.json"), str(blocked / "kproxy/snapshots")
    monkeypatch.setattr(dropin, "DEFAULT_STATE_CACHE", cache)
    monkeypatch.setattr(dropin, "DEFAULT_SNAPSHOT_DIR", snaps)
    return cache, snaps, blocked


def test_an_unwritable_default_moves_to_the_first_writable_fallback(defaults, tmp_path):
    cache, snaps, blocked = defaults
    run = tmp_path / "run" / "kproxy"
    got = dropin.state_paths(cache, snaps, fallbacks=(str(blocked / "x"), str(run)))
    assert got[:2] == (str(run / "state.json"), str(run / "snapshots"))
    assert len(got[2]) == 1 and str(run) in got[2][0]


def test_nowhere_writable_runs_without_cache_and_snapshots_with_one_warning(defaults):
    cache, snaps, blocked = defaults
    got = dropin.state_paths(cache, snaps, fallbacks=(str(blocked / "x"),))
    assert got[:2] == (None, None)
    assert len(got[2]) == 1 and "running without the state cache and snapshots" in got[2][0]


def test_a_writable_default_or_a_path_given_is_kept(defaults, tmp_path, monkeypatch):
    cache, snaps, blocked = defaults
    given = (str(blocked / "mine/state.json"), str(blocked / "mine/snaps"))
    assert dropin.state_paths(*given, fallbacks=(str(tmp_path),)) == (*given, [])
    ok_cache, ok_snaps = str(tmp_path / "lib/state.json"), str(tmp_path / "lib/snapshots")
    monkeypatch.setattr(dropin, "DEFAULT_STATE_CACHE", ok_cache)
    monkeypatch.setattr(dropin, "DEFAULT_SNAPSHOT_DIR", ok_snaps)
    assert dropin.state_paths(ok_cache, ok_snaps, fallbacks=()) == (ok_cache, ok_snaps, [])


def test_run_defaults_are_the_paths_the_fallback_watches():
    args = build_parser().parse_args(["run"])
    assert args.state_cache == dropin.DEFAULT_STATE_CACHE == "/var/lib/kproxy/state.json"
    assert args.snapshot_dir == dropin.DEFAULT_SNAPSHOT_DIR == "/var/lib/kproxy/snapshots"
    assert dropin.FALLBACK_DIRS[0] == "/run/kproxy"


# -- --write-config-to, --init-only


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(30.0, "30s"), (60.0, "1m0s"), (0.5, "500ms"), (5400.0, "1h30m0s"), (1.0, "1s"), (0, "0s")],
)
def test_go_duration_text(seconds, text):
    assert dropin.go_duration_text(seconds) == text


def test_write_config_to_writes_the_settings_in_use_and_exits(config, tmp_path, isolated):
    """Upstream writes its configuration and exits, starting nothing: so does kproxy, and
    the file it writes reads back as the same settings."""
    path = config(
        "mode: nftables\nclusterCIDR: 10.244.0.0/16\nnftables: {syncPeriod: 1m, "
        "minSyncPeriod: 500ms, masqueradeBit: 3}\nmetricsBindAddress: 127.0.0.1:20249\n"
        "detectLocalMode: InterfaceNamePrefix\ndetectLocal: {interfaceNamePrefix: cali}\n"
    )
    out = tmp_path / "written.yaml"
    res = subprocess.run(
        [
            *isolated,
            sys.executable,
            "-m",
            "kproxy",
            "run",
            f"--config={path}",
            f"--write-config-to={out}",
            "--hostname-override=node-1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert f"wrote the configuration to {out}" in res.stderr
    from kproxy.cli.proxyconfig import parse

    back = parse(out.read_text())
    assert back.mode == "nftables" and back.cluster_cidrs == ("10.244.0.0/16",)
    assert (back.sync_period, back.min_sync_period, back.masquerade_bit) == (60.0, 0.5, 3)
    assert back.metrics_bind_address == "127.0.0.1:20249"
    assert back.hostname_override == "node-1"
    assert (back.detect_local_mode, back.interface_name_prefix) == ("InterfaceNamePrefix", "cali")


def test_detect_local_mode_flags_reach_the_node_config():
    from kproxy.cli.commands import node_config
    from kproxy.model import ClusterState

    args, res = run_args(
        "--detect-local-mode=InterfaceNamePrefix", "--pod-interface-name-prefix=veth"
    )
    cfg = node_config(args, ClusterState(), apply=False)
    assert (cfg.detect_local_mode, cfg.interface_name_prefix) == ("InterfaceNamePrefix", "veth")
    assert res.notes == []
    args, _ = run_args("--detect-local-mode", "BridgeInterface", "--pod-bridge-interface", "cbr0")
    cfg = node_config(args, ClusterState(), apply=False)
    assert (cfg.detect_local_mode, cfg.bridge_interface) == ("BridgeInterface", "cbr0")


def test_with_config_the_files_detect_local_mode_wins(config):
    path = config("detectLocalMode: BridgeInterface\ndetectLocal: {bridgeInterface: cbr0}\n")
    args, res = run_args(f"--config={path}", "--detect-local-mode=NodeCIDR")
    assert (args.detect_local_mode, args.bridge_interface) == ("BridgeInterface", "cbr0")
    assert "--detect-local-mode ignored: --config is given, its value is used" in notes(
        res, logging.WARNING
    )


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--detect-local-mode", "BridgeInterface"], "needs --pod-bridge-interface"),
        (["--detect-local-mode", "InterfaceNamePrefix"], "needs --pod-interface-name-prefix"),
        (["--pod-interface-name-prefix", "a*"], "is not an interface name"),
    ],
)
def test_a_detect_local_mode_without_its_interface_is_one_line(flags, line, tmp_path, isolated):
    state = tmp_path / "state.yaml"
    state.write_text("kind: List\nitems: []\n")
    res = subprocess.run(
        [*isolated, sys.executable, "-m", "kproxy", "sync", "--state", str(state), *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert res.returncode == 2 and line in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_init_only_and_write_config_to_are_taken():
    _, res = run_args("--init-only")
    assert res.init_only and res.notes == []
    _, res = run_args("--write-config-to=/tmp/x.yaml")
    assert res.write_config_to == "/tmp/x.yaml" and res.notes == []


def test_a_zero_port_or_an_empty_address_turns_that_server_off():
    # kube-proxy's deprecated --healthz-port/--metrics-port: 0 is off (addressFromDeprecatedFlags).
    args, res = run_args("--healthz-port=0")
    assert args.healthz_bind_address == "" and args.metrics_bind_address == "127.0.0.1:10249"
    assert res.notes == []
    args, res = run_args("--metrics-port=0", "--healthz-port=10300")
    assert (args.healthz_bind_address, args.metrics_bind_address) == ("0.0.0.0:10300", "")
    # --*-bind-address "" ("Set empty to disable"), with a space or =, as a shell passes it.
    args, _ = run_args("--healthz-bind-address", "", "--metrics-bind-address=")
    assert (args.healthz_bind_address, args.metrics_bind_address) == ("", "")
    # kproxy's own bind addresses with port 0 stay an ephemeral port, not off.
    args, _ = run_args("--healthz-bind-address=127.0.0.1:0", "--metrics-bind-address=127.0.0.1:0")
    assert (args.healthz_bind_address, args.metrics_bind_address) == ("127.0.0.1:0",) * 2
    # `kproxy doctor` takes the daemon's "" too.
    doctor = build_parser().parse_args(["doctor", "--healthz-bind-address", ""])
    assert doctor.healthz_bind_address == ""


def test_a_file_cannot_turn_the_servers_off(config):
    # Upstream's defaulting fills an empty address: the file cannot turn them off.
    path = config('healthzBindAddress: ""\nmetricsBindAddress: ""\n')
    args, _ = run_args(f"--config={path}", "--healthz-port=0")
    assert (args.healthz_bind_address, args.metrics_bind_address) == (
        "0.0.0.0:10256",
        "127.0.0.1:10249",
    )


def test_api_rate_limit_none_by_default_the_files_or_the_flags():
    args, _ = run_args()
    assert (args.api_qps, args.api_burst) == (0.0, 10)  # kproxy's own default: no limit
    args, res = run_args("--kube-api-qps=20", "--kube-api-burst=40")
    assert (args.api_qps, args.api_burst) == (20.0, 40) and res.notes == []
    args, _ = run_args("--kube-api-qps=2.5")
    assert (args.api_qps, args.api_burst) == (2.5, 10)  # upstream's flag default for burst
    args, _ = run_args("--kube-api-burst=3")
    assert (args.api_qps, args.api_burst) == (5.0, 3)
    args, _ = run_args("--kube-api-qps=0", "--kube-api-burst=0")
    assert (args.api_qps, args.api_burst) == (5.0, 10)  # client-go's: zero is its default
    args, _ = run_args("--kube-api-qps=-1")
    assert args.api_qps == -1.0  # client-go: no limiter
    for argv, named in (
        (["--kube-api-qps=fast"], "--kube-api-qps"),
        (["--kube-api-burst=1.5"], "--kube-api-burst"),
        (["--kube-api-burst=-1"], "--kube-api-burst"),
    ):
        with pytest.raises(ConfigError, match=f"^{named}: "):
            run_args(*argv)


def test_with_config_the_files_rate_limit_wins(config):
    args, res = run_args(f"--config={config('')}", "--kube-api-qps=100")
    assert (args.api_qps, args.api_burst) == (5.0, 10)  # upstream's defaults for the file
    assert "--kube-api-qps ignored: --config is given, its value is used" in notes(res)
    path = config("clientConnection: {qps: 3, burst: 4, kubeconfig: /k}\n")
    args, res = run_args(f"--config={path}")
    assert (args.api_qps, args.api_burst) == (3.0, 4)
    assert not [n for n in notes(res) if "qps" in n or "burst" in n]


def test_the_rate_limit_reaches_the_daemons_source(config, monkeypatch):
    """What resolve() took reaches DaemonOptions and the KubeSource's token bucket."""
    from kproxy.cli import commands
    from kproxy.daemon import daemon as daemon_mod
    from kproxy.sources.kube import SourceUnavailable

    seen = {}

    class FakeDaemon:
        def __init__(self, opts):
            seen["opts"] = opts
            raise SourceUnavailable("stop here")

    monkeypatch.setattr(daemon_mod, "Daemon", FakeDaemon)
    monkeypatch.setattr(commands, "node_config", lambda *a, **k: None)
    monkeypatch.setattr(dropin, "prepare", lambda *a, **k: None)
    path = config("clientConnection: {qps: 3, burst: 4}\n")
    argv = ["run", f"--config={path}", "--lock-file="]
    args = build_parser().parse_args(argv)
    args.dropin = dropin.resolve(args, argv)
    assert commands.run_daemon(args) == commands.EXIT_ERROR
    assert (seen["opts"].api_qps, seen["opts"].api_burst) == (3.0, 4)

    # ...and the Daemon built from them hands them to its source, whose every client (and the
    # node checks' API request) waits on that one bucket.
    import dataclasses

    from kproxy.model import NodeConfig

    monkeypatch.undo()
    opts = dataclasses.replace(
        seen["opts"],
        config=NodeConfig(node_name="n"),
        servers=["http://127.0.0.1:1"],
        mode="nftables",  # no iptables detection: nothing runs at construction
    )
    daemon = daemon_mod.Daemon(opts)
    try:
        limiter = daemon.source.limiter
        assert (limiter.qps, limiter.burst) == (3.0, 4)
        assert all(c.limiter is limiter for _, c in daemon.source._clients)
        assert daemon.node_checks.ctx.api_limiter is limiter
    finally:
        daemon.events.stop()
        daemon.source.stop()


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["-v=2"], ["--v=2"]),
        (["-v4"], ["--v=4"]),
        (["-v", "3", "--cleanup"], ["--v=3", "--cleanup"]),
        (["-v", "--cleanup"], ["-v", "--cleanup"]),
        (["--masquerade-all=true"], ["--masquerade-all"]),
        (["--masquerade-all=false"], []),
        (["--masquerade-all"], ["--masquerade-all"]),
        (["--iptables-localhost-nodeports=false"], ["--iptables-localhost-nodeports=false"]),
    ],
)
def test_kube_proxys_spellings_of_v_and_booleans(argv, want):
    assert dropin.kube_proxy_argv(argv) == want


def test_kube_proxy_spellings_reach_run_through_main(tmp_path, isolated):
    """`kproxy run -v=2 --masquerade-all=true` is not refused (argparse alone would): the
    --write-config-to file shows what run took."""
    out = tmp_path / "c.yaml"
    res = subprocess.run(
        [
            *isolated,
            sys.executable,
            "-m",
            "kproxy",
            "run",
            "-v=4",
            "--masquerade-all=true",
            f"--write-config-to={out}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    from kproxy.cli.proxyconfig import parse

    back = parse(out.read_text())
    assert back.masquerade_all is True and back.verbosity == 4


def test_the_daemon_writes_kube_proxys_table_in_its_place_and_kproxys_elsewhere(monkeypatch):
    """Started as the image's kube-proxy (its entry point), the daemon's nftables table is
    kube-proxy's; as `kproxy run`, kproxy's; --nft-table wins over both."""
    import importlib

    from kproxy.cli import commands

    cli = importlib.import_module("kproxy.cli.main")  # the package's `main` is the function
    seen = []
    monkeypatch.setattr(
        commands, "run_daemon", lambda args: seen.append(commands.daemon_nft_table(args)) or 0
    )
    assert cli.kube_proxy_main(["--proxy-mode=nftables", "--hostname-override=node-1"]) == 0
    assert cli.main(["run", "--mode", "nftables"]) == 0
    assert cli.kube_proxy_main(["--proxy-mode=nftables", "--nft-table=kproxy"]) == 0
    assert cli.main(["run", "--mode", "nftables", "--nft-table", "kube-proxy"]) == 0
    assert seen == ["kube-proxy", "kproxy", "kproxy", "kube-proxy"]


def test_a_changed_config_file_stops_the_daemon_as_kube_proxys_does(tmp_path):
    import threading
    import time

    path = tmp_path / "config.conf"
    path.write_text(HEAD)
    stop = threading.Event()
    watch = dropin.ConfigWatch(str(path), stop, interval=0.05)
    time.sleep(0.3)
    assert not stop.is_set() and not watch.changed  # unchanged: keeps running
    path.write_text(HEAD + "mode: nftables\n")
    assert stop.wait(5) and watch.changed
    # A daemon stopping for another reason is not a change.
    other = threading.Event()
    watch = dropin.ConfigWatch(str(path), other, interval=0.05)
    other.set()
    time.sleep(0.2)
    assert not watch.changed


def fake_nft(tmp_path: Path, present: set[str]) -> tuple[str, Path]:
    """An `nft` that has only the tables `present` ("ip6 kube-proxy", ...) and records its
    calls."""
    calls = tmp_path / "calls"
    nft = tmp_path / "nft"
    cases = " | ".join(f'"list table {t}"' for t in sorted(present)) or '"none"'
    nft.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        f'case "$*" in {cases}) exit 0 ;; list*) exit 1 ;; esac\n'
        "exit 0\n"
    )
    nft.chmod(0o755)
    return str(nft), calls


def test_the_nftables_tables_the_proxy_before_left_are_removed_and_nothing_else(tmp_path):
    nft, calls = fake_nft(tmp_path, {"ip6 kube-proxy", "ip kproxy", "ip other"})
    assert dropin.remove_nft_tables(nft) == ["ip kproxy", "ip6 kube-proxy"]
    assert calls.read_text().splitlines() == [
        "list table ip kube-proxy",
        "list table ip kproxy",
        "delete table ip kproxy",
        "list table ip6 kube-proxy",
        "delete table ip6 kube-proxy",
        "list table ip6 kproxy",
    ]
    assert dropin.remove_nft_tables(str(tmp_path / "no-nft")) == []


def test_the_table_the_daemon_writes_in_kube_proxys_place_stays(tmp_path):
    nft, calls = fake_nft(tmp_path, {"ip kube-proxy", "ip kproxy"})
    keep = frozenset({("ip", "kube-proxy"), ("ip6", "kube-proxy")})
    assert dropin.remove_nft_tables(nft, keep) == ["ip kproxy"]
    assert "delete table ip kube-proxy" not in calls.read_text()


def test_kube_proxys_tables_wait_for_the_first_full_sync(tmp_path, monkeypatch):
    import threading
    import time

    removed = threading.Event()
    kept = []
    monkeypatch.setattr(
        dropin, "remove_nft_tables", lambda keep: (kept.append(keep), removed.set())
    )

    class Health:
        ready = False

    health, stop = Health(), threading.Event()
    mode = NftablesMode(NftBackend("ip", "kube-proxy"))
    thread = dropin.after_first_sync(health, stop, [mode], interval=0.02)
    time.sleep(0.2)
    assert not removed.is_set()  # no sync yet: kube-proxy's rules still serve
    health.ready = True
    assert removed.wait(5)
    thread.join(5)
    assert kept == [frozenset({("ip", "kube-proxy")})]  # its own table is not a leftover
    # Stopped before any sync: nothing removed.
    removed.clear()
    health.ready = False
    thread = dropin.after_first_sync(health, stop, [], interval=0.02)
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and not removed.is_set()
