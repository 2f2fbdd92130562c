"""The `kproxy` command line: every subcommand's flags, spelled as kube-proxy spells them where
kube-proxy has one (see ../shared/DESIGN.md for the contract)."""

from __future__ import annotations

import argparse
import ipaddress
import socket

from kproxy import __version__
from kproxy.localdetect import INTERFACE_NAME, MODES
from kproxy.nftables.table import KUBE_PROXY_TABLE, TABLE
from kproxy.recovery.lockfile import DEFAULT_LOCK_FILE, DEFAULT_LOCK_WAIT
from kproxy.recovery.restore import DEFAULT_SNAPSHOT_DIR
from kproxy.sources.cache import DEFAULT_STATE_CACHE

# `run --help` groups its flags as kube-proxy's documentation does: key -> (title, description).
NFT_TABLES = (TABLE, KUBE_PROXY_TABLE)
NFT_TABLE_HELP = (
    "nftables mode's table (default: the one kproxy's daemon writes on this node, else kproxy)"
)

RUN_GROUPS = {
    "api": ("API server", "where the cluster's Services and EndpointSlices are read"),
    "proxy": ("modes and iptables", "what the rules do, and how often they are synced"),
    "nft": (
        "nftables",
        "In nftables mode (--mode nftables) kproxy programs one table (ip and ip6) in one "
        "transaction per sync: `kproxy`, or `kube-proxy` in kube-proxy's place. Its sync "
        "periods are --iptables-sync-period and --iptables-min-sync-period, and the flags "
        "above apply to it unless they say iptables mode only",
    ),
    "serve": ("health and metrics", None),
    "recovery": ("recovery", "what kproxy keeps to rebuild the rules without the API server"),
    "log": ("logging", None),
    "kube-proxy": (
        "kube-proxy's own flags",
        "accepted under kube-proxy's names so that kube-proxy's command line runs kproxy "
        '(README "Replacing kube-proxy"); one with no meaning for kproxy is logged once and '
        "ignored. With --config the file wins over every flag but --hostname-override, "
        "--master, the logging flags and --cleanup, as in kube-proxy",
    ),
}


class _Groups:
    """Where each flag goes: with `titles`, the argument group of its kind (for `run --help`);
    else the parser itself, as a one-shot command's flags are few."""

    def __init__(
        self, p: argparse.ArgumentParser, titles: dict[str, tuple[str, str | None]] | None = None
    ) -> None:
        self.p = p
        self.groups = {k: p.add_argument_group(t, d) for k, (t, d) in (titles or {}).items()}

    def __call__(self, key: str) -> argparse._ActionsContainer:
        return self.groups.get(key, self.p)


def _cidr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CIDR") from None


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _nodeport_specs(text: str) -> list[str]:
    return [p.strip() if p.strip() == "primary" else _cidr(p) for p in text.split(",") if p]


def _cidrs(text: str) -> list[str]:
    """Comma-separated CIDRs, as kube-proxy spells a dual-stack --cluster-cidr."""
    return [_cidr(p) for p in text.split(",") if p]


def _bind(default_port: int):
    """host:port for a listening address, checked as the daemon will read it; "" (kube-proxy's
    "Set empty to disable") turns that server off."""

    def check(text: str) -> str:
        from kproxy.daemon.metrics import split_host_port  # pure, but its module is not light

        if not text.strip():
            return ""
        try:
            split_host_port(text, default_port)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text

    return check


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _add_node_flags(p: argparse.ArgumentParser, state_required: bool = True) -> None:
    p.add_argument(
        "--state",
        metavar="FILE",
        required=state_required,
        help="Services/EndpointSlices (and optionally this Node) as a Kubernetes "
        "List, multi-document YAML or JSON (default: read them from the API server, or from "
        "the last-known-good cache when it cannot be reached)",
    )
    p.add_argument("--mode", choices=("iptables", "nftables"), default="iptables")
    _add_proxy_flags(p)


def _add_proxy_flags(p: argparse.ArgumentParser, g: _Groups | None = None) -> None:
    """Flags of how this node proxies, shared by every command (spelled as kube-proxy's)."""
    g = g or _Groups(p)
    g("api").add_argument(
        "--node-name",
        "--hostname-override",
        dest="node_name",
        default=socket.gethostname(),
        help="this node's name (default: hostname)",
    )
    g("proxy").add_argument(
        "--cluster-cidr",
        action="extend",
        type=_cidrs,
        default=[],
        metavar="CIDR[,CIDR]",
        help="pod CIDRs, one per IP family (repeat or comma-separate); traffic to a ClusterIP "
        "from outside them is masqueraded (default: none)",
    )
    g("proxy").add_argument(
        "--detect-local-mode",
        choices=MODES,
        default="ClusterCIDR",
        help="how traffic from this node's pods is told (not masqueraded to ClusterIPs; to an "
        "externalTrafficPolicy Local address, sent to every endpoint): by --cluster-cidr, by "
        "the Node's spec.podCIDRs, by --pod-bridge-interface or --pod-interface-name-prefix "
        "(default ClusterCIDR)",
    )
    g("proxy").add_argument(
        "--pod-bridge-interface",
        dest="bridge_interface",
        default="",
        metavar="NAME",
        help="--detect-local-mode BridgeInterface: the pods' bridge (default: none)",
    )
    g("proxy").add_argument(
        "--pod-interface-name-prefix",
        dest="interface_name_prefix",
        default="",
        metavar="PREFIX",
        help="--detect-local-mode InterfaceNamePrefix: the start of the pods' interface names "
        "(default: none)",
    )
    g("proxy").add_argument(
        "--masquerade-all",
        action="store_true",
        help="masquerade all traffic sent to Service cluster IPs (default off)",
    )
    g("proxy").add_argument(
        "--iptables-masquerade-bit",
        dest="masquerade_bit",
        type=int,
        default=14,
        choices=range(32),
        metavar="0-31",
        help="fwmark bit marking packets to masquerade (default 14: 0x4000)",
    )
    g("proxy").add_argument(
        "--node-ip",
        action="append",
        default=[],
        type=_ip,
        metavar="IP",
        help="this node's IP (repeat per family; default: the Node's first InternalIP, else "
        "ExternalIP, of each family: from the state, or the watched Node for `run`)",
    )
    g("proxy").add_argument(
        "--nodeport-addresses",
        action="extend",
        default=[],
        type=_nodeport_specs,
        metavar="CIDR|primary",
        help="answer NodePorts only on local addresses in these CIDRs, or on the node's own "
        "IPs with 'primary' (default: every local address)",
    )
    g("proxy").add_argument(
        "--iptables-localhost-nodeports",
        dest="localhost_nodeports",
        type=_boolean,
        default=True,
        metavar="true|false",
        help="iptables mode: IPv4 NodePorts also answer on 127.0.0.1 (sets route_localnet, as "
        "upstream does; default true); nftables mode never answers there and ignores it",
    )
    g("proxy").add_argument(
        "--iptables-backend",
        choices=("auto", "nft", "legacy"),
        default="auto",
        help="iptables variant to drive (default: detect as iptables-wrappers does)",
    )
    g("proxy").add_argument(
        "--nftables-datapath",
        choices=("netlink", "nft"),
        default="netlink",
        help="nftables mode: write and read the kproxy table over netlink (default; one change "
        "in milliseconds) or through the nft binary (the reference, and the fallback)",
    )
    g("nft").add_argument(
        "--nft-table",
        choices=NFT_TABLES,
        default=None,
        help="nftables mode's table: kproxy's own, or kube-proxy's (kube-proxy's start then "
        "takes it over or removes it: the way back is one image swap) (default: kube-proxy "
        "in kube-proxy's place, --config or run as kube-proxy; else kproxy)",
    )
    g("log").add_argument("-v", "--verbose", action="store_true", help="debug logs (default off)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kproxy",
        description="kube-proxy's job on a Linux node: Services and EndpointSlices in, "
        "iptables rules out.",
    )
    parser.add_argument("--version", action="version", version=f"kproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_sync = sub.add_parser(
        "sync",
        help="program this network namespace's rules once from a state file",
        description="Read the cluster state from FILE and program the kernel of the current "
        "network namespace once. Exit 0 on success, 1 when the kernel refused "
        "the change (previous rules stay), 2 on unusable input (kernel untouched).",
    )
    _add_node_flags(p_sync, state_required=False)
    _add_api_flags(p_sync)
    _add_lock_flag(p_sync)
    p_diff = sub.add_parser(
        "diff",
        help="print what a sync would change",
        description="Print the change a sync would apply. Exit 0 when the kernel already "
        "matches, 1 when a sync would change something, 2 on error.",
    )
    _add_node_flags(p_diff, state_required=False)
    _add_api_flags(p_diff)
    _add_lock_flag(p_diff)  # accepted for symmetry: diff changes nothing, takes no lock
    p_trace = sub.add_parser(
        "trace",
        help="show the path a new connection takes through the rules",
        description="Follow a new connection through the rules kproxy renders from --state "
        "(or, with --live, the rules in this network namespace): chains visited, endpoints "
        "with their probability, masquerading, DROP or REJECT. Reads nothing else and "
        "changes nothing.",
    )
    _add_node_flags(p_trace, state_required=False)
    p_trace.add_argument(
        "--live",
        action="store_true",
        help="trace the kernel's current rules instead of a render of --state",
    )
    p_trace.add_argument("--src", type=_ip, required=True, help="client address")
    p_trace.add_argument("--dst", type=_ip, required=True, help="address connected to")
    p_trace.add_argument("--dport", type=int, required=True, help="port connected to")
    p_trace.add_argument("--proto", choices=("tcp", "udp", "sctp"), default="tcp")
    p_trace.add_argument(
        "--from",
        dest="origin",
        choices=("auto", "pod", "node", "external"),
        default="auto",
        help="where the connection starts (default: the node when --src is one of its "
        "addresses, a pod when it is in --cluster-cidr, else external)",
    )
    p_trace.add_argument(
        "--in-interface",
        dest="iif",
        metavar="NAME",
        help="the interface the connection comes in on (default: for a pod, the one "
        "--detect-local-mode names: --pod-bridge-interface, or --pod-interface-name-prefix "
        "followed by 0; otherwise none)",
    )
    p_trace.add_argument(
        "--local-ip",
        action="append",
        default=[],
        type=_ip,
        metavar="IP",
        help="an address of this node, for `-m addrtype LOCAL` (default: --node-ip, and with "
        "--live the namespace's addresses)",
    )
    p_run = sub.add_parser(
        "run",
        help="the daemon: watch the API server and keep the rules in sync",
        description="Watch Services, EndpointSlices and this Node through the API server and "
        "keep this network namespace's rules equal to them; serve metrics and health.",
    )
    run = _Groups(p_run, RUN_GROUPS)
    run("proxy").add_argument(
        "--mode",
        "--proxy-mode",
        dest="mode",
        choices=("iptables", "nftables", "ipvs", ""),
        default="iptables",
        help="iptables: kube-proxy's chains; nftables: one `kproxy` table; ipvs runs nftables "
        "mode, with a warning (default iptables)",
    )
    _add_proxy_flags(p_run, run)
    # Set by the image's kube-proxy entry point: kproxy then runs in kube-proxy's place.
    p_run.add_argument("--as-kube-proxy", action="store_true", help=argparse.SUPPRESS)
    _add_api_flags(p_run, run)
    _add_lock_flag(p_run, wait=False, g=run)  # the daemon postpones a sync it cannot lock
    run("recovery").add_argument(
        "--snapshot-dir",
        metavar="DIR",
        default=DEFAULT_SNAPSHOT_DIR,
        help=f"where a snapshot is written after each full sync (default {DEFAULT_SNAPSHOT_DIR})",
    )
    run("recovery").add_argument(
        "--snapshot-keep", metavar="N", type=int, default=5, help="snapshots kept (default 5)"
    )
    run("api").add_argument(
        "--api-wait",
        type=_duration,
        default=10.0,
        metavar="DURATION",
        help="how long to wait at start for the API server before programming the rules from "
        "the state cache (default 10s)",
    )
    run("proxy").add_argument(
        "--iptables-sync-period",
        dest="sync_period",
        type=_duration,
        default=30.0,
        metavar="DURATION",
        help="verify and repair the kernel's rules at least this often (default 30s)",
    )
    run("proxy").add_argument(
        "--iptables-min-sync-period",
        dest="min_sync_period",
        type=_duration,
        default=1.0,
        metavar="DURATION",
        help="apply changes at most this often (default 1s)",
    )
    run("proxy").add_argument(
        "--canary-interval",
        type=_duration,
        default=5.0,
        metavar="DURATION",
        help="check the canary chains in mangle, nat and filter this often (default 5s)",
    )
    run("serve").add_argument(
        "--metrics-bind-address",
        metavar="HOST:PORT",
        default="127.0.0.1:10249",
        type=_bind(10249),
        help="host:port for /metrics; empty: no metrics server (default 127.0.0.1:10249)",
    )
    run("serve").add_argument(
        "--healthz-bind-address",
        metavar="HOST:PORT",
        default="0.0.0.0:10256",
        type=_bind(10256),
        help="host:port for /healthz, /livez and /readyz; empty: no health server (the "
        "Services' health check node ports stay) (default 0.0.0.0:10256)",
    )
    run("proxy").add_argument(
        "--conntrack-cleanup",
        type=_boolean,
        default=True,
        metavar="true|false",
        help="delete stale UDP conntrack entries after endpoint changes (default true)",
    )
    run("log").add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="one line of text, or one JSON object, per log record (default text)",
    )

    _add_kube_proxy_flags(run)
    # The client-side rate limit on API requests: none unless kube-proxy's --config or
    # --kube-api-qps/--kube-api-burst set one (cli/dropin.py).
    p_run.set_defaults(api_qps=0.0, api_burst=10)

    p_snap = sub.add_parser(
        "snapshot",
        help="save kproxy's own rules to a file",
        description="Write the rules kproxy owns (both families) with a checksummed header.",
    )
    p_snap.add_argument("--out", required=True, metavar="FILE")
    p_snap.add_argument(
        "--mode",
        choices=("all", "iptables", "nftables"),
        default="all",
        help="which mode's rules to save (default: whatever kproxy owns)",
    )
    _add_backend_flags(p_snap)
    _add_lock_flag(p_snap)
    p_restore = sub.add_parser(
        "restore",
        help="put a snapshot back, atomically",
        description="Verify a snapshot (format, checksum, only kproxy's chains) and apply it "
        "with the same minimal, atomic path as a sync. A refused file changes nothing: exit "
        "2 with the reason; exit 1 when the kernel refused the change.",
    )
    which = p_restore.add_mutually_exclusive_group(required=True)
    which.add_argument("file", nargs="?", metavar="FILE")
    which.add_argument(
        "--latest", action="store_true", help="the newest valid snapshot in --snapshot-dir"
    )
    p_restore.add_argument("--snapshot-dir", default=DEFAULT_SNAPSHOT_DIR)
    p_restore.add_argument("--dry-run", action="store_true", help="print what would change")
    _add_backend_flags(p_restore)
    _add_lock_flag(p_restore)
    p_clean = sub.add_parser(
        "cleanup",
        help="remove every rule and chain kproxy owns",
        description="Remove kproxy's chains and the jumps into them, in both families; "
        "everything else stays.",
    )
    p_clean.add_argument("--dry-run", action="store_true", help="print what would be removed")
    p_clean.add_argument(
        "--mode",
        choices=("all", "iptables", "nftables"),
        default="all",
        help="which mode's rules to remove (default: both)",
    )
    _add_backend_flags(p_clean)
    _add_lock_flag(p_clean)
    add_doctor_parser(sub)
    return parser


# kube-proxy's flags (cmd/kube-proxy/app/options.go AddFlags, logsapi.AddFlags, and the klog
# flags older kube-proxy manifests still pass) that kproxy has under no other name: name ->
# (takes a value, what kproxy does with it). "" means cli/dropin.py maps it onto kproxy's own
# options; any other text is why it has no effect (logged once, then ignored).
KUBE_PROXY_FLAGS: dict[str, tuple[bool, str]] = {
    "config": (True, ""),
    "v": (True, ""),
    "logging-format": (True, ""),
    "bind-address": (True, ""),
    "cleanup": (False, ""),
    "healthz-port": (True, ""),
    "metrics-port": (True, ""),
    "conntrack-max-per-core": (True, ""),
    "conntrack-min": (True, ""),
    "conntrack-tcp-timeout-established": (True, ""),
    "conntrack-tcp-timeout-close-wait": (True, ""),
    "conntrack-tcp-be-liberal": (False, ""),
    "conntrack-udp-timeout": (True, ""),
    "conntrack-udp-timeout-stream": (True, ""),
    "feature-gates": (True, "no feature gate changes what kproxy does"),
    "oom-score-adj": (True, "set it in the pod: kproxy does not change its own OOM score"),
    "kube-api-qps": (True, ""),
    "kube-api-burst": (True, ""),
    "kube-api-content-type": (True, "kproxy's client speaks JSON only (no protobuf decoder)"),
    "bind-address-hard-fail": (False, "kproxy always exits 2 when it cannot listen"),
    "profiling": (False, "kproxy serves no /debug/pprof"),
    "show-hidden-metrics-for-version": (True, "kproxy hides no metric"),
    "init-only": (False, ""),
    "write-config-to": (True, ""),
    "config-sync-period": (True, "kproxy's watches never resync by period"),
    "proxy-port-range": (True, "the userspace proxy is gone"),
    "ipvs-sync-period": (True, "ipvs runs as nftables mode: --iptables-sync-period is used"),
    "ipvs-min-sync-period": (True, "ipvs runs as nftables mode: --iptables-min-sync-period is"),
    "ipvs-scheduler": (True, "ipvs runs as nftables mode (random choice, as upstream's)"),
    "ipvs-exclude-cidrs": (True, "ipvs runs as nftables mode, which owns only its own table"),
    "ipvs-strict-arp": (False, "ipvs runs as nftables mode: no kube-ipvs0 interface"),
    "ipvs-tcp-timeout": (True, "ipvs runs as nftables mode: no IPVS timeouts"),
    "ipvs-tcpfin-timeout": (True, "ipvs runs as nftables mode: no IPVS timeouts"),
    "ipvs-udp-timeout": (True, "ipvs runs as nftables mode: no IPVS timeouts"),
    "vmodule": (True, "kproxy has one verbosity"),
    "log-flush-frequency": (True, "kproxy's log lines are written unbuffered"),
    "log-json-info-buffer-size": (True, "kproxy's log lines are written unbuffered"),
    "log-json-split-stream": (False, "kproxy writes every log line to stderr"),
    "log-text-info-buffer-size": (True, "kproxy's log lines are written unbuffered"),
    "log-text-split-stream": (False, "kproxy writes every log line to stderr"),
    "add_dir_header": (False, "a klog flag"),
    "alsologtostderr": (False, "a klog flag: kproxy logs to stderr"),
    "log_backtrace_at": (True, "a klog flag"),
    "log_dir": (True, "a klog flag: kproxy logs to stderr"),
    "log_file": (True, "a klog flag: kproxy logs to stderr"),
    "log_file_max_size": (True, "a klog flag"),
    "logtostderr": (False, "a klog flag: kproxy logs to stderr"),
    "one_output": (False, "a klog flag"),
    "skip_headers": (False, "a klog flag"),
    "skip_log_headers": (False, "a klog flag"),
    "stderrthreshold": (True, "a klog flag: kproxy logs to stderr"),
    "boot-id-file": (True, "kproxy reads no boot id"),
    "machine-id-file": (True, "kproxy reads no machine id"),
    "windows-service": (False, "Windows only"),
}


def kube_proxy_dest(name: str) -> str:
    return "kp_" + name.replace("-", "_")


def _add_kube_proxy_flags(g: _Groups) -> None:
    group = g("kube-proxy")
    for name, (takes_value, why) in KUBE_PROXY_FLAGS.items():
        extra: dict = {"metavar": "VALUE"}
        if not takes_value:
            extra = {"nargs": "?", "const": "true", "metavar": "true|false"}
        if name == "config":
            extra["metavar"] = "FILE"
        group.add_argument(
            f"--{name}",
            dest=kube_proxy_dest(name),
            default=None,
            help=(
                f"accepted, ignored: {why}" if why else _KUBE_PROXY_HELP.get(name, _CONNTRACK_HELP)
            )
            + " (default: none)",
            **extra,
        )


_CONNTRACK_HELP = "the conntrack sysctls are then set as kube-proxy sets them (README, Conntrack)"
_KUBE_PROXY_HELP = {
    "config": "a KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) file: it wins over "
    "kube-proxy's flags but --hostname-override, --master, the logging flags and --cleanup",
    "v": "kube-proxy's log verbosity: 4 or more is kproxy's -v",
    "logging-format": "text or json: --log-format",
    "bind-address": "this node's primary IP unless 0.0.0.0 or ::: --node-ip",
    "cleanup": "remove the rules of every mode and exit: `kproxy cleanup`",
    "init-only": "set the sysctls kube-proxy's privileged start sets, then exit",
    "write-config-to": "write the configuration in use as a KubeProxyConfiguration, then exit",
    "healthz-port": "the port of --healthz-bind-address; 0: no health server",
    "metrics-port": "the port of --metrics-bind-address; 0: no metrics server",
    "kube-api-qps": "requests per second to the API server, client-go's token bucket (0: "
    "client-go's 5, negative: no limit; kproxy's own default without it or --config: no limit)",
    "kube-api-burst": "requests at once above --kube-api-qps (0: client-go's 10)",
}


def detect_local_error(args: argparse.Namespace) -> str | None:
    """What is missing for --detect-local-mode, as upstream's validation says it."""
    mode = getattr(args, "detect_local_mode", "ClusterCIDR")
    for wanted, flag, dest in (
        ("BridgeInterface", "--pod-bridge-interface", "bridge_interface"),
        ("InterfaceNamePrefix", "--pod-interface-name-prefix", "interface_name_prefix"),
    ):
        value = getattr(args, dest, "")
        if mode == wanted and not value:
            return f"--detect-local-mode {mode} needs {flag}"
        if value and not INTERFACE_NAME.fullmatch(value):
            return f"{flag}: {value!r} is not an interface name (at most 15 characters)"
    return None


def _add_backend_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--node-name", "--hostname-override", dest="node_name", default=socket.gethostname()
    )
    p.add_argument("--iptables-backend", choices=("auto", "nft", "legacy"), default="auto")
    p.add_argument("--nftables-datapath", choices=("netlink", "nft"), default="netlink")
    p.add_argument("--nft-table", choices=NFT_TABLES, default=None, help=NFT_TABLE_HELP)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs (default off)")


def _add_lock_flag(p: argparse.ArgumentParser, wait: bool = True, g: _Groups | None = None) -> None:
    g = g or _Groups(p)
    g("recovery").add_argument(
        "--lock-file",
        metavar="FILE",
        default=DEFAULT_LOCK_FILE,
        help=f"kproxy commands that change rules hold this lock (default {DEFAULT_LOCK_FILE})",
    )
    if wait:
        g("recovery").add_argument(
            "--lock-wait",
            type=_duration,
            default=DEFAULT_LOCK_WAIT,
            metavar="DURATION",
            help="wait this long for another kproxy command (or the daemon's sync) to release "
            f"the lock, then exit 2 (default {DEFAULT_LOCK_WAIT:g}s: longer than a full sync of "
            "10k Services)",
        )


def _add_api_flags(p: argparse.ArgumentParser, g: _Groups | None = None) -> None:
    g = g or _Groups(p)
    g("api").add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="kubeconfig file (default: in-cluster, then $KUBECONFIG or ~/.kube/config)",
    )
    g("api").add_argument(
        "--master",
        action="extend",
        type=_urls,
        default=[],
        metavar="URL[,URL]",
        help="API server address(es); several give failover, tried in order (default: the "
        "kubeconfig's, or in-cluster)",
    )
    g("api").add_argument(
        "--api-timeout",
        type=_duration,
        default=10.0,
        metavar="DURATION",
        help="give up on the API server after this long (one-shot commands; default 10s)",
    )
    g("recovery").add_argument(
        "--state-cache",
        metavar="FILE",
        default=DEFAULT_STATE_CACHE,
        help=f"last-known-good cluster state (default {DEFAULT_STATE_CACHE})",
    )
    g("recovery").add_argument(
        "--no-cache-fallback",
        action="store_true",
        help="fail (exit 2) when the API server cannot be read, instead of using the cache "
        "(default off)",
    )
    g("recovery").add_argument(
        "--state-cache-max-age",
        type=_duration,
        default=3600.0,
        metavar="DURATION",
        help="a cache older than this is still used, but flagged (default 1h)",
    )


def _urls(text: str) -> list[str]:
    return [u.strip() for u in text.split(",") if u.strip()]


def _duration(text: str) -> float:
    """A Go-style duration (`500ms`, `30s`, `1m`, `1h30m`) or plain seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    total, number, i = 0.0, "", 0
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    while i < len(text):
        if text[i].isdigit() or text[i] == ".":
            number += text[i]
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else text[i]
        if unit not in units or not number:
            raise argparse.ArgumentTypeError(f"{text!r} is not a duration (like 30s, 1m)")
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    if number:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (like 30s, 1m)")
    return total


def add_doctor_parser(sub: argparse._SubParsersAction) -> None:
    """`kproxy doctor`: the node's own causes of Service failures (kproxy/doctor/)."""
    from kproxy.doctor.checks import CHECK_NAMES  # light: the checks import their tools late

    p = sub.add_parser(
        "doctor",
        help="check this node for what breaks Services outside the proxy",
        description="Check the node, in the current network namespace: one line per check "
        "(ok, warn, fail or skipped), what it saw, and the section of docs/RECOVERY.md with "
        "the remedy. Exit 0 when every check is ok or skipped, 1 on a warning, 2 on a "
        "failure. Takes `kproxy run`'s flags, to check the node as the daemon runs there.",
    )
    p.add_argument(
        "--output",
        choices=("text", "json"),
        default="text",
        help="one line per check, or one JSON document (default text)",
    )
    p.add_argument(
        "--check",
        action="append",
        default=[],
        choices=CHECK_NAMES,
        metavar="NAME",
        help="run only this check (repeat; default all): " + ", ".join(CHECK_NAMES),
    )
    p.add_argument(
        "--mode",
        choices=("iptables", "nftables"),
        default="iptables",
        help="the mode kproxy runs in on this node (default iptables)",
    )
    p.add_argument("--iptables-backend", choices=("auto", "nft", "legacy"), default="auto")
    p.add_argument("--master", action="extend", type=_urls, default=[], metavar="URL[,URL]")
    p.add_argument("--kubeconfig", metavar="FILE")
    p.add_argument("--api-timeout", type=_duration, default=5.0, metavar="DURATION")
    p.add_argument(
        "--state-cache",
        metavar="FILE",
        default=DEFAULT_STATE_CACHE,
        help="the daemon's state cache, for the endpoints and the last sync "
        f"(default {DEFAULT_STATE_CACHE}; empty: none)",
    )
    p.add_argument("--state-cache-max-age", type=_duration, default=3600.0, metavar="DURATION")
    p.add_argument(
        "--iptables-sync-period",
        dest="sync_period",
        type=_duration,
        default=30.0,
        metavar="DURATION",
    )
    p.add_argument(
        "--healthz-bind-address", default="0.0.0.0:10256", type=_bind(10256), metavar="HOST:PORT"
    )
    p.add_argument(
        "--metrics-bind-address", default="127.0.0.1:10249", type=_bind(10249), metavar="HOST:PORT"
    )
    p.add_argument(
        "--conntrack-warn-percent",
        type=float,
        default=80.0,
        metavar="PERCENT",
        help="warn when the conntrack table is this full (default 80; fails from 95)",
    )
    p.add_argument(
        "--ufw-conf",
        default="/etc/ufw/ufw.conf",
        metavar="FILE",
        help="ufw's configuration (default /etc/ufw/ufw.conf)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs (default off)")
