"""The `kproxy` command (see ../shared/DESIGN.md for the contract)."""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import logging
import socket
import sys
import time

from kproxy import __version__, nodeinfo
from kproxy.iptables.plan import full_table
from kproxy.iptables.render import IPV4, IPV6, render
from kproxy.iptables.restore import (
    IptablesBackend,
    IptablesError,
    detect_variant,
    family_backends,
)
from kproxy.iptables.rules import Table
from kproxy.iptables.sync import NftSyncResult, describe, describe_nft, read_live
from kproxy.iptables.trace import Packet, Tracer, format_outcomes
from kproxy.mode import NoFamilyError, modes_for, remove_other_mode
from kproxy.model import ClusterState, NodeConfig, build_state
from kproxy.nftables.nft import NftBackend
from kproxy.nftables.render import NFT_IPV4, NFT_IPV6, render_nft
from kproxy.nftables.table import NftTable
from kproxy.nftables.trace import NftTracer
from kproxy.recovery import restore as recovery
from kproxy.recovery.fileio import write_atomically
from kproxy.recovery.lockfile import DEFAULT_LOCK_FILE, LockHeld, locked
from kproxy.recovery.restore import DEFAULT_SNAPSHOT_DIR
from kproxy.recovery.snapshot import SnapshotError
from kproxy.sources.cache import DEFAULT_STATE_CACHE
from kproxy.sources.statefile import StateFileError, load_state

log = logging.getLogger("kproxy")

EXIT_OK = 0
EXIT_CHANGES = 1  # diff: a sync would change something
EXIT_FAILED = 1  # sync: the kernel refused the change (nothing half-applied)
EXIT_ERROR = 2  # bad input or usage; the kernel was not touched


class _Formatter(logging.Formatter):
    """One-shot commands: `kproxy: [level: ]message`."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "kproxy: " + (
            "" if record.levelno == logging.INFO else record.levelname.lower() + ": "
        )
        return prefix + record.getMessage()


class _DaemonFormatter(logging.Formatter):
    """The daemon: a UTC timestamp and the level on every line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{ts}.{int(record.msecs):03d}Z {record.levelname.lower():<7} {record.getMessage()}"


class _JsonFormatter(logging.Formatter):
    """`--log-format json`: one JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(verbose: bool, fmt: str = "oneshot") -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = {"json": _JsonFormatter, "text": _DaemonFormatter}.get(fmt, _Formatter)
    handler.setFormatter(formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


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


def _add_proxy_flags(p: argparse.ArgumentParser) -> None:
    """Flags of how this node proxies, shared by every command (spelled as kube-proxy's)."""
    p.add_argument(
        "--node-name",
        "--hostname-override",
        dest="node_name",
        default=socket.gethostname(),
        help="this node's name (default: hostname)",
    )
    p.add_argument(
        "--cluster-cidr",
        action="extend",
        type=_cidrs,
        default=[],
        metavar="CIDR[,CIDR]",
        help="pod CIDRs, one per IP family (repeat or comma-separate); traffic to a ClusterIP "
        "from outside them is masqueraded",
    )
    p.add_argument(
        "--masquerade-all",
        action="store_true",
        help="masquerade all traffic sent to Service cluster IPs",
    )
    p.add_argument(
        "--iptables-masquerade-bit",
        dest="masquerade_bit",
        type=int,
        default=14,
        choices=range(32),
        metavar="0-31",
        help="fwmark bit marking packets to masquerade (default 14: 0x4000)",
    )
    p.add_argument(
        "--node-ip",
        action="append",
        default=[],
        type=_ip,
        metavar="IP",
        help="this node's IP (repeat per family; default: the Node's first InternalIP, else "
        "ExternalIP, of each family: from the state, or the watched Node for `run`)",
    )
    p.add_argument(
        "--nodeport-addresses",
        action="extend",
        default=[],
        type=_nodeport_specs,
        metavar="CIDR|primary",
        help="answer NodePorts only on local addresses in these CIDRs, or on the node's own "
        "IPs with 'primary' (default: every local address)",
    )
    p.add_argument(
        "--iptables-localhost-nodeports",
        dest="localhost_nodeports",
        type=_boolean,
        default=True,
        metavar="true|false",
        help="iptables mode: IPv4 NodePorts also answer on 127.0.0.1 (sets route_localnet, as "
        "upstream does; default true); nftables mode never answers there and ignores it",
    )
    p.add_argument(
        "--iptables-backend",
        choices=("auto", "nft", "legacy"),
        default="auto",
        help="iptables variant to drive (default: detect as iptables-wrappers does)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs")


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
    p_run.add_argument("--mode", choices=("iptables", "nftables"), default="iptables")
    _add_proxy_flags(p_run)
    _add_api_flags(p_run)
    _add_lock_flag(p_run)
    p_run.add_argument(
        "--snapshot-dir",
        default=DEFAULT_SNAPSHOT_DIR,
        help=f"where a snapshot is written after each full sync (default {DEFAULT_SNAPSHOT_DIR})",
    )
    p_run.add_argument("--snapshot-keep", type=int, default=5, help="snapshots kept (default 5)")
    p_run.add_argument(
        "--api-wait",
        type=_duration,
        default=10.0,
        metavar="DURATION",
        help="how long to wait at start for the API server before programming the rules from "
        "the state cache (default 10s)",
    )
    p_run.add_argument(
        "--iptables-sync-period",
        dest="sync_period",
        type=_duration,
        default=30.0,
        metavar="DURATION",
        help="verify and repair the kernel's rules at least this often (default 30s)",
    )
    p_run.add_argument(
        "--iptables-min-sync-period",
        dest="min_sync_period",
        type=_duration,
        default=1.0,
        metavar="DURATION",
        help="apply changes at most this often (default 1s)",
    )
    p_run.add_argument(
        "--canary-interval",
        type=_duration,
        default=5.0,
        metavar="DURATION",
        help="check the canary chains in mangle, nat and filter this often (default 5s)",
    )
    p_run.add_argument(
        "--metrics-bind-address",
        default="127.0.0.1:10249",
        help="host:port for /metrics (default 127.0.0.1:10249)",
    )
    p_run.add_argument(
        "--healthz-bind-address",
        default="0.0.0.0:10256",
        help="host:port for /healthz, /livez and /readyz (default 0.0.0.0:10256)",
    )
    p_run.add_argument(
        "--conntrack-cleanup",
        type=_boolean,
        default=True,
        metavar="true|false",
        help="delete stale UDP conntrack entries after endpoint changes (default true)",
    )
    p_run.add_argument("--log-format", choices=("text", "json"), default="text")

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
    return parser


def _add_backend_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--node-name", "--hostname-override", dest="node_name", default=socket.gethostname()
    )
    p.add_argument("--iptables-backend", choices=("auto", "nft", "legacy"), default="auto")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs")


def _add_lock_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lock-file",
        default=DEFAULT_LOCK_FILE,
        help=f"kproxy commands that change rules hold this lock (default {DEFAULT_LOCK_FILE})",
    )


def _add_api_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then ~/.kube)")
    p.add_argument(
        "--master",
        action="extend",
        type=_urls,
        default=[],
        metavar="URL[,URL]",
        help="API server address(es); several give failover, tried in order",
    )
    p.add_argument(
        "--api-timeout",
        type=_duration,
        default=10.0,
        metavar="DURATION",
        help="give up on the API server after this long (one-shot commands; default 10s)",
    )
    p.add_argument(
        "--state-cache",
        default=DEFAULT_STATE_CACHE,
        help=f"last-known-good cluster state (default {DEFAULT_STATE_CACHE})",
    )
    p.add_argument(
        "--no-cache-fallback",
        action="store_true",
        help="fail (exit 2) when the API server cannot be read, instead of using the cache",
    )
    p.add_argument(
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


def _run_daemon(args: argparse.Namespace) -> int:
    from kproxy.daemon.daemon import Daemon, DaemonOptions  # imports the kubernetes client (slow)

    opts = DaemonOptions(
        node_name=args.node_name,
        # The node IPs and NodePort addresses are the daemon's to work out at each full sync.
        config=_node_config(args, ClusterState(), apply=True, resolve_nodeports=False),
        nodeport_addresses=tuple(args.nodeport_addresses),
        servers=args.master,
        kubeconfig=args.kubeconfig,
        backend=args.iptables_backend,
        min_sync_period=args.min_sync_period,
        sync_period=args.sync_period,
        canary_interval=args.canary_interval,
        metrics_bind=args.metrics_bind_address,
        healthz_bind=args.healthz_bind_address,
        conntrack=args.conntrack_cleanup,
        snapshot_dir=args.snapshot_dir or None,
        snapshot_keep=args.snapshot_keep,
        state_cache=args.state_cache or None,
        state_cache_max_age=args.state_cache_max_age,
        api_wait=args.api_wait,
        lock_file=args.lock_file or None,
        mode=args.mode,
    )
    try:
        daemon = Daemon(opts)
    except NoFamilyError as err:
        log.error("%s", err)
        return EXIT_ERROR
    return daemon.run()


def _node_config(
    args: argparse.Namespace, state: ClusterState, apply: bool, resolve_nodeports: bool = True
) -> NodeConfig:
    node_ips = tuple(args.node_ip) or (state.node.host_ips if state.node else ())
    nodeport_ips = None
    if args.nodeport_addresses and resolve_nodeports:
        nodeport_ips = nodeinfo.nodeport_addresses(args.nodeport_addresses, node_ips)
    # Only iptables mode answers NodePorts on 127.0.0.1; nftables mode never does (as
    # upstream's), so it leaves route_localnet, and the hole it opens in 127/8, alone.
    if args.localhost_nodeports and apply and getattr(args, "mode", "iptables") == "iptables":
        nodeinfo.ensure_route_localnet()
    return NodeConfig(
        node_name=args.node_name,
        cluster_cidrs=tuple(args.cluster_cidr),
        masquerade_all=args.masquerade_all,
        masquerade_bit=args.masquerade_bit,
        node_ips=node_ips,
        nodeport_ips=nodeport_ips,
        localhost_nodeports=args.localhost_nodeports,
        conntrack_tcp_liberal=nodeinfo.conntrack_tcp_liberal(),
    )


def _run_sync(args: argparse.Namespace, dry_run: bool) -> int:
    if dry_run:
        return _sync_families(args, dry_run)
    try:
        with locked(args.lock_file, what="sync"):
            return _sync_families(args, dry_run)
    except LockHeld as err:
        log.error("%s", err)
        return EXIT_ERROR


def _load_cluster(args: argparse.Namespace, dry_run: bool) -> tuple[ClusterState, list[str]]:
    """From --state, else from the API server, else from the last-known-good cache.
    Raises StateFileError when none can be used."""
    if args.state:
        return load_state(args.state, args.node_name)
    from kproxy.sources import cache
    from kproxy.sources.kube import KubeSource, SourceUnavailable  # loads the client: slow

    try:
        source = KubeSource(
            args.master or None,
            args.kubeconfig,
            args.node_name,
            on_event=lambda e: None,
            on_resync=lambda k, i: None,
        )
        objects = source.list_once(timeout=args.api_timeout)
    except SourceUnavailable as err:
        if getattr(args, "no_cache_fallback", False):
            raise StateFileError(f"API server unreachable ({err})") from None
        try:
            cached = cache.load(args.state_cache)
        except (OSError, ValueError) as cache_err:
            raise StateFileError(
                f"API server unreachable ({err}) and no usable state cache at "
                f"{args.state_cache} ({getattr(cache_err, 'strerror', None) or cache_err})"
            ) from None
        age = cached.age()
        flag = " — older than --state-cache-max-age" if age > args.state_cache_max_age else ""
        log.warning(
            "API server unreachable (%s); using the last-known-good state from %s, "
            "saved %.0fs ago%s",
            err,
            args.state_cache,
            age,
            flag,
        )
        return build_state(cached.objects, args.node_name)
    state, warnings = build_state(objects, args.node_name)
    if not dry_run:
        try:
            cache.save(args.state_cache, objects, args.node_name)
        except OSError as err:
            log.warning(
                "could not refresh the state cache %s: %s", args.state_cache, err.strerror or err
            )
    return state, warnings


def _sync_families(args: argparse.Namespace, dry_run: bool) -> int:
    started = time.perf_counter()
    try:
        state, warnings = _load_cluster(args, dry_run)
    except StateFileError as err:
        log.error("%s", err)
        return EXIT_ERROR
    loaded = time.perf_counter()
    for warning in warnings:
        log.warning("%s", warning)
    config = _node_config(args, state, apply=not dry_run)

    try:
        families = modes_for(args.mode, args.iptables_backend)
    except NoFamilyError as err:
        log.error("%s", err)
        return EXIT_ERROR
    failed = changes = False
    for fam in families:
        t0 = time.perf_counter()
        rendered = fam.render(state, config)
        rendered_at = time.perf_counter()
        for warning in rendered.warnings:
            log.warning("%s", warning)
        try:
            outcome = fam.sync(rendered.desired, verify=True, dry_run=dry_run)
        except IptablesError as err:  # NftError too
            # One family failing never blocks the other: report and go on.
            log.error("%s: %s", fam.name, err)
            if err.detail:
                log.error("input around the failing line:\n%s", err.detail)
            failed = True
            continue
        if dry_run:
            if outcome.changed:
                sys.stdout.write(f"# {fam.name} ({fam.label})\n{outcome.payload}")
                changes = True
            continue
        log.info(
            "synced %s (%s): %d services, %s; load %.3fs render %.3fs",
            fam.name,
            fam.label,
            len(state.services),
            outcome.summary,
            loaded - started,
            rendered_at - t0,
        )
    if failed:
        return EXIT_ERROR if dry_run else EXIT_FAILED
    if not dry_run:
        remove_other_mode(args.mode, args.iptables_backend)
    return EXIT_CHANGES if changes else EXIT_OK


def _run_snapshot(args: argparse.Namespace) -> int:
    backends = family_backends(args.iptables_backend)
    try:
        with locked(args.lock_file, what="snapshot"):
            text = recovery.take_snapshot(
                backends if args.mode != "nftables" else [],
                args.node_name,
                nft_mode=args.mode != "iptables",
            )
        write_atomically(args.out, text)
    except (LockHeld, IptablesError) as err:
        log.error("%s", err)
        return EXIT_ERROR
    except OSError as err:
        log.error("cannot write %s: %s", args.out, err.strerror or err)
        return EXIT_ERROR
    nft_part = text.split("\n# nft ", 1)[1] if "\n# nft " in text else ""
    log.info(
        "snapshot written to %s: iptables mode %d rules (%s), nftables mode %s",
        args.out,
        text.count("\n-A "),
        ", ".join(recovery.family_name(b) for b in backends),
        f"{nft_part.count(chr(10))} lines" if nft_part else "not in use",
    )
    return EXIT_OK


def _run_restore(args: argparse.Namespace) -> int:
    try:
        if args.latest:
            path, snap = recovery.latest_snapshot(args.snapshot_dir)
        else:
            path, snap = args.file, recovery.read_snapshot(args.file)
    except SnapshotError as err:
        log.error("refused: %s", err)
        return EXIT_ERROR
    backends = family_backends(args.iptables_backend)
    try:
        with locked(args.lock_file, what="restore"):
            results = recovery.restore(snap, backends, dry_run=args.dry_run)
    except LockHeld as err:
        log.error("%s", err)
        return EXIT_ERROR
    except IptablesError as err:
        log.error("restore of %s failed, rules unchanged: %s", path, err)
        return EXIT_FAILED
    for family, result in results.items():
        nft = isinstance(result, NftSyncResult)
        if args.dry_run:
            text = result.plan.text() if nft else result.plan.restore_text()
            sys.stdout.write(f"# {family}\n{text}")
        else:
            log.info(
                "restored %s from %s (created %s on %s): %s",
                family,
                path,
                snap.meta["created"],
                snap.meta["node"],
                describe_nft(result) if nft else describe(result),
            )
    return EXIT_OK


def _run_cleanup(args: argparse.Namespace) -> int:
    backends = family_backends(args.iptables_backend)
    try:
        with locked(args.lock_file, what="cleanup"):
            results = recovery.cleanup(
                backends if args.mode != "nftables" else [],
                dry_run=args.dry_run,
                nft_mode=args.mode != "iptables",
            )
    except LockHeld as err:
        log.error("%s", err)
        return EXIT_ERROR
    except IptablesError as err:
        log.error("cleanup failed, rules unchanged: %s", err)
        return EXIT_FAILED
    for family, sent in results.items():
        if args.dry_run:
            sys.stdout.write(f"# {family}\n{sent}")
        else:
            removed = (
                "the kproxy table"
                if "delete table" in sent
                else (f"{sent.count(chr(10) + '-X ')} chains")
            )
            log.info("cleanup %s: removed %s", family, removed)
    return EXIT_OK


def _tracer(args: argparse.Namespace, state: ClusterState, config: NodeConfig, family, local):
    """The rules to trace: the kernel's (--live) or a render of the state, in --mode."""
    if args.mode == "nftables":
        nft_family = NFT_IPV4 if family.version == 4 else NFT_IPV6
        if args.live:
            table = NftBackend(nft_family.name).read() or NftTable(nft_family.name)
        else:
            table = render_nft(state, config, nft_family).table
        return NftTracer(table, local)
    if args.live:
        variant = args.iptables_backend
        backend = IptablesBackend(
            family.version, detect_variant(family.version) if variant == "auto" else variant
        )
        tables = read_live(backend, ["nat", "filter"])
    else:
        ruleset = render(state, config, family).ruleset
        tables = {name: full_table(ruleset, name, Table(name)) for name in ("nat", "filter")}
    return Tracer(tables, local)


def _run_trace(args: argparse.Namespace) -> int:
    if not args.live and not args.state:
        log.error("trace needs --state FILE or --live")
        return EXIT_ERROR
    src, dst = ipaddress.ip_address(args.src), ipaddress.ip_address(args.dst)
    if src.version != dst.version:
        log.error("--src and --dst must be of one IP family")
        return EXIT_ERROR
    family = IPV4 if dst.version == 4 else IPV6
    state = ClusterState()
    if args.state:
        try:
            state, warnings = load_state(args.state, args.node_name)
        except StateFileError as err:
            log.error("%s", err)
            return EXIT_ERROR
        for warning in warnings:
            log.warning("%s", warning)
    config = _node_config(args, state, apply=False)
    local = {ipaddress.ip_address(ip) for ip in (*args.local_ip, *config.node_ips)}
    if args.live:
        local |= {ipaddress.ip_address(ip) for ip in nodeinfo.local_addresses()}
    try:
        tracer = _tracer(args, state, config, family, local)
    except IptablesError as err:  # NftError too
        log.error("%s", err)
        return EXIT_ERROR
    origin = args.origin
    if origin == "auto":
        in_cluster = any(
            src in ipaddress.ip_network(c)
            for c in config.cluster_cidrs
            if ipaddress.ip_network(c).version == src.version
        )
        origin = "node" if src in local or src.is_loopback else "pod" if in_cluster else "external"
    packet = Packet(src, dst, args.proto, args.dport)
    outcomes = tracer.trace(packet, origin)
    print(format_outcomes(packet, origin, outcomes))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(
        getattr(args, "verbose", False),
        getattr(args, "log_format", "text") if args.command == "run" else "oneshot",
    )
    collecting = gc.isenabled()
    if args.command != "run":
        # A one-shot command builds millions of small objects (100k endpoints: model, rules,
        # payload) and holds them to the end; the cyclic collector's passes over them cost
        # ~40% of load + render at that size and would free nothing. The daemon instead
        # freezes what it holds after its first sync (daemon.py).
        gc.disable()
    try:
        return _dispatch(parser, args)
    finally:
        if collecting:
            gc.enable()


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "sync":
        return _run_sync(args, dry_run=False)
    if args.command == "diff":
        return _run_sync(args, dry_run=True)
    if args.command == "trace":
        return _run_trace(args)
    if args.command == "run":
        return _run_daemon(args)
    if args.command == "snapshot":
        return _run_snapshot(args)
    if args.command == "restore":
        return _run_restore(args)
    if args.command == "cleanup":
        return _run_cleanup(args)
    parser.error(f"unknown command {args.command}")
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
