"""The `kproxy` command (see ../shared/DESIGN.md for the contract)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
import time

from kproxy import __version__
from kproxy.backends.iptables import IptablesBackend, IptablesError, detect_variant
from kproxy.model import NodeConfig
from kproxy.render.iptables import render
from kproxy.sources.statefile import StateFileError, load_state
from kproxy.syncer import sync_family

log = logging.getLogger("kproxy")

EXIT_OK = 0
EXIT_CHANGES = 1  # diff: a sync would change something
EXIT_FAILED = 1  # sync: the kernel refused the change (nothing half-applied)
EXIT_ERROR = 2  # bad input or usage; the kernel was not touched


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "kproxy: " + (
            "" if record.levelno == logging.INFO else record.levelname.lower() + ": "
        )
        return prefix + record.getMessage()


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _cidr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CIDR") from None


def _add_node_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state",
        metavar="FILE",
        required=True,
        help="Services/EndpointSlices (and optionally this Node) as a Kubernetes "
        "List, multi-document YAML or JSON",
    )
    p.add_argument("--mode", choices=("iptables", "nftables"), default="iptables")
    p.add_argument(
        "--node-name",
        "--hostname-override",
        dest="node_name",
        default=socket.gethostname(),
        help="this node's name (default: hostname)",
    )
    p.add_argument(
        "--cluster-cidr",
        action="append",
        type=_cidr,
        default=[],
        metavar="CIDR",
        help="pod CIDR; traffic to a ClusterIP from outside it is masqueraded "
        "(repeat once per IP family)",
    )
    p.add_argument(
        "--masquerade-all",
        action="store_true",
        help="masquerade all traffic sent to Service cluster IPs",
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
    _add_node_flags(p_sync)
    p_diff = sub.add_parser(
        "diff",
        help="print what a sync would change",
        description="Print the change a sync would apply. Exit 0 when the kernel already "
        "matches, 1 when a sync would change something, 2 on error.",
    )
    _add_node_flags(p_diff)
    return parser


def _run_sync(args: argparse.Namespace, dry_run: bool) -> int:
    if args.mode != "iptables":
        log.error("--mode %s: not available yet; use --mode iptables", args.mode)
        return EXIT_ERROR
    started = time.perf_counter()
    try:
        state, warnings = load_state(args.state, args.node_name)
    except StateFileError as err:
        log.error("%s", err)
        return EXIT_ERROR
    loaded = time.perf_counter()
    config = NodeConfig(
        node_name=args.node_name,
        cluster_cidrs=tuple(args.cluster_cidr),
        masquerade_all=args.masquerade_all,
    )
    rendered = render(state, config)
    rendered_at = time.perf_counter()
    for warning in warnings + rendered.warnings:
        log.warning("%s", warning)

    variant = args.iptables_backend
    if variant == "auto":
        variant = detect_variant(4)
    backend = IptablesBackend(4, variant)
    try:
        result = sync_family(backend, rendered.ruleset, dry_run=dry_run)
    except IptablesError as err:
        log.error("%s", err)
        return EXIT_FAILED if not dry_run else EXIT_ERROR
    if dry_run:
        text = result.plan.restore_text()
        sys.stdout.write(text)
        return EXIT_CHANGES if text else EXIT_OK

    changed = {t: c.summary for t, c in result.plan.changes.items() if c.summary}
    how = f"whole {'+'.join(result.full_tables)} restored, " if result.full_tables else ""
    log.info(
        "synced IPv4 (iptables-%s): %d services, %d lines sent, %s%s; load %.3fs render "
        "%.3fs read %.3fs plan %.3fs apply %.3fs",
        variant,
        len(state.services),
        result.lines_sent,
        how,
        ", ".join(f"{t}: {len(s)} chain(s) changed" for t, s in changed.items()) or "no change",
        loaded - started,
        rendered_at - loaded,
        result.timings.get("read", 0.0),
        result.timings.get("plan", 0.0),
        result.timings.get("apply", 0.0),
    )
    for table, summary in changed.items():
        for chain, what in summary.items():
            log.debug("%s %s: %s", table, chain, what)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    if args.command == "sync":
        return _run_sync(args, dry_run=False)
    if args.command == "diff":
        return _run_sync(args, dry_run=True)
    parser.error(f"unknown command {args.command}")
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
