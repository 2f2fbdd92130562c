"""The `kproxy` subcommands: sync and diff, trace, run (the daemon), snapshot, restore,
cleanup. Each takes the parsed command line (cli/flags.py) and returns the exit status."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import time
from contextlib import AbstractContextManager

from kproxy import nodeinfo
from kproxy.errors import ApplyError, NoFamilyError
from kproxy.families import (
    all_nft_tables,
    family_backends,
    modes_for,
    nft_table_here,
    remove_other_mode,
)
from kproxy.iptables.plan import full_table
from kproxy.iptables.render import IPV4, IPV6, Family, render
from kproxy.iptables.restore import IptablesBackend, IptablesError, detect_variant
from kproxy.iptables.rules import Table
from kproxy.iptables.sync import read_live
from kproxy.iptables.trace import Tracer
from kproxy.mode import sync_families
from kproxy.model import ClusterState, NodeConfig
from kproxy.nftables.nft import NftBackend
from kproxy.nftables.render import NFT_IPV4, NFT_IPV6, render_nft
from kproxy.nftables.table import KUBE_PROXY_TABLE, TABLE, NftTable
from kproxy.nftables.trace import NftTracer
from kproxy.recovery import restore as recovery
from kproxy.recovery.cleanup import cleanup
from kproxy.recovery.fileio import write_atomically
from kproxy.recovery.lockfile import LockError, locked, open_lock_file
from kproxy.recovery.snapshot import SnapshotError
from kproxy.sources.oneshot import read_cluster
from kproxy.sources.statefile import StateFileError, load_state
from kproxy.tracecore import Address, Packet, format_outcomes

log = logging.getLogger("kproxy")

EXIT_OK = 0
EXIT_CHANGES = 1  # diff: a sync would change something
EXIT_FAILED = 1  # sync: the kernel refused the change (nothing half-applied)
EXIT_ERROR = 2  # bad input or usage; the kernel was not touched


def _locked(args: argparse.Namespace, what: str) -> AbstractContextManager[None]:
    """The lock of a one-shot command: wait up to --lock-wait, saying once for whom."""

    def waiting(holder: str) -> None:
        log.info(
            "waiting up to %gs for %s, held by %s (--lock-wait)",
            args.lock_wait,
            args.lock_file,
            holder,
        )

    return locked(args.lock_file, timeout=args.lock_wait, what=what, on_wait=waiting)


def run_sync(args: argparse.Namespace, dry_run: bool) -> int:
    """`kproxy sync`, or with `dry_run` `kproxy diff` (which changes nothing, so takes no
    lock)."""
    if dry_run:
        return _sync_once(args, dry_run)
    started = time.perf_counter()
    loaded = None
    if args.state:
        # A state file is read before waiting for the lock: a missing or broken one is
        # reported at once, not after a wait or as a held lock. The API server is read once
        # the lock is held, so the state applied is the freshest.
        loaded = _load(args, dry_run)
        if isinstance(loaded, int):
            return loaded
    try:
        with _locked(args, "sync"):
            return _sync_once(args, dry_run, started, loaded)
    except LockError as err:
        log.error("%s", err)
        return EXIT_ERROR


def _load(args: argparse.Namespace, dry_run: bool) -> tuple[ClusterState, list[str], float] | int:
    """(state, warnings, when it was loaded) from --state or the API server, or the exit
    status when it cannot be read."""
    try:
        state, warnings = read_cluster(
            args.state,
            args.node_name,
            servers=args.master,
            kubeconfig=args.kubeconfig,
            api_timeout=args.api_timeout,
            state_cache=args.state_cache,
            state_cache_max_age=args.state_cache_max_age,
            cache_fallback=not args.no_cache_fallback,
            save_cache=not dry_run,
        )
    except StateFileError as err:
        log.error("%s", err)
        return EXIT_ERROR
    return state, warnings, time.perf_counter()


def _sync_once(
    args: argparse.Namespace,
    dry_run: bool,
    started: float | None = None,
    read: tuple[ClusterState, list[str], float] | None = None,
) -> int:
    started = time.perf_counter() if started is None else started
    if read is None:
        result = _load(args, dry_run)
        if isinstance(result, int):
            return result
        read = result
    state, warnings, loaded = read
    for warning in warnings:
        log.warning("%s", warning)
    config = node_config(args, state, apply=not dry_run)

    try:
        families = modes_for(
            args.mode,
            args.iptables_backend,
            dry_run=dry_run,
            nft_datapath=args.nftables_datapath,
            nft_table=args.nft_table,
        )
    except NoFamilyError as err:
        log.error("%s", err)
        return EXIT_ERROR
    failed = changes = False
    # One family failing never blocks the other: each is reported and the next one synced.
    for result in sync_families(families, state, config, verify=True):
        fam = result.mode
        if isinstance(result.error, ApplyError):
            log.error("%s: %s", fam.name, result.error)
            if result.error.detail:
                log.error("input around the failing line:\n%s", result.error.detail)
            failed = True
            continue
        outcome, rendered = result.outcome, result.rendered
        for warning in rendered.warnings:
            log.warning("%s", warning)
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
            rendered.seconds,
        )
    if failed:
        return EXIT_ERROR if dry_run else EXIT_FAILED
    if not dry_run:
        remove_other_mode(args.mode, args.iptables_backend)
    return EXIT_CHANGES if changes else EXIT_OK


def resolve_run(args: argparse.Namespace, argv: list[str]) -> str | None:
    """`run`'s kube-proxy flags and --config applied to `args` (cli/dropin.py); the error
    line when they cannot be."""
    from kproxy.cli import dropin
    from kproxy.cli.proxyconfig import ConfigError

    try:
        args.dropin = dropin.resolve(args, argv)
    except ConfigError as err:
        return str(err)
    return None


def run_daemon(args: argparse.Namespace) -> int:
    # These import the kubernetes client (slow): only the daemon needs them.
    from kproxy.cli import dropin
    from kproxy.daemon.daemon import Daemon, DaemonOptions
    from kproxy.recovery.lockfile import DEFAULT_LOCK_WAIT
    from kproxy.sources.kube import SourceUnavailable

    resolved = getattr(args, "dropin", None) or dropin.Resolved()
    for level, note in resolved.notes:
        log.log(level, "%s", note)
    if resolved.cleanup:  # kube-proxy --cleanup: remove every mode's rules and exit
        vars(args).update(mode="all", dry_run=False, lock_wait=DEFAULT_LOCK_WAIT)
        status = run_cleanup(args)
        # And kube-proxy's own nftables tables, as its --cleanup deletes them.
        dropin.remove_nft_tables()
        return status
    if resolved.write_config_to:  # kube-proxy --write-config-to: write, then exit
        try:
            write_atomically(resolved.write_config_to, dropin.config_text(args))
        except OSError as err:
            log.error("cannot write %s: %s", resolved.write_config_to, err.strerror or err)
            return EXIT_ERROR
        log.info("wrote the configuration to %s", resolved.write_config_to)
        return EXIT_OK
    dropin.prepare(args, resolved.conntrack_sysctls)
    if resolved.init_only:  # kube-proxy --init-only: the privileged part (sysctls), then exit
        node_config(args, ClusterState(), apply=True, resolve_nodeports=False)
        return EXIT_OK
    in_place = in_kube_proxys_place(args)
    opts = DaemonOptions(
        node_name=args.node_name,
        # The node IPs and NodePort addresses are the daemon's to work out at each full sync.
        config=node_config(args, ClusterState(), apply=True, resolve_nodeports=False),
        nodeport_addresses=tuple(args.nodeport_addresses),
        servers=args.master,
        kubeconfig=args.kubeconfig,
        backend=args.iptables_backend,
        nft_datapath=args.nftables_datapath,
        min_sync_period=args.min_sync_period,
        sync_period=args.sync_period,
        canary_interval=args.canary_interval,
        metrics_bind=args.metrics_bind_address,
        healthz_bind=args.healthz_bind_address,
        api_qps=args.api_qps,
        api_burst=args.api_burst,
        conntrack=args.conntrack_cleanup,
        snapshot_dir=args.snapshot_dir or None,
        snapshot_keep=args.snapshot_keep,
        state_cache=args.state_cache or None,
        state_cache_max_age=args.state_cache_max_age,
        api_wait=args.api_wait,
        lock_file=args.lock_file or None,
        mode=args.mode,
        nft_table=daemon_nft_table(args),
    )
    try:
        if opts.lock_file:
            # Opened at each apply: a path that cannot be is said now, not at every sync.
            os.close(open_lock_file(opts.lock_file))
        daemon = Daemon(opts)
    except (NoFamilyError, LockError, SourceUnavailable) as err:
        log.error("%s", err)
        return EXIT_ERROR
    watch = None
    if args.kp_config:
        watch = dropin.ConfigWatch(args.kp_config, daemon.stop_event)
    if in_place:
        dropin.after_first_sync(daemon.health, daemon.stop_event, daemon.reconciler.families)
    status = daemon.run()
    return EXIT_FAILED if watch is not None and watch.changed else status


def in_kube_proxys_place(args: argparse.Namespace) -> bool:
    """`kproxy run` in kube-proxy's place (README "Replacing kube-proxy"): with its --config,
    or started as its entry point."""
    return bool(args.kp_config) or args.as_kube_proxy


def daemon_nft_table(args: argparse.Namespace) -> str:
    """The table the daemon writes in nftables mode: --nft-table, else kube-proxy's in its
    place (kube-proxy's start then removes or takes it over), else kproxy's."""
    return args.nft_table or (KUBE_PROXY_TABLE if in_kube_proxys_place(args) else TABLE)


def node_config(
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
        detect_local_mode=args.detect_local_mode,
        bridge_interface=args.bridge_interface,
        interface_name_prefix=args.interface_name_prefix,
    )


def run_snapshot(args: argparse.Namespace) -> int:
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        # Said before waiting for the lock: the wait would only delay this error.
        log.error("cannot write %s: no directory %s", args.out, out_dir)
        return EXIT_ERROR
    backends = family_backends(args.iptables_backend)
    try:
        with _locked(args, "snapshot"):
            text = recovery.take_snapshot(
                backends if args.mode != "nftables" else [],
                args.node_name,
                nft_mode=args.mode != "iptables",
                nft_table=args.nft_table,
            )
        write_atomically(args.out, text)
    except (LockError, IptablesError) as err:
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


def run_restore(args: argparse.Namespace) -> int:
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
        with _locked(args, "restore"):
            results = recovery.restore(
                snap, backends, dry_run=args.dry_run, nft_table=args.nft_table
            )
    except LockError as err:
        log.error("%s", err)
        return EXIT_ERROR
    except ApplyError as err:
        log.error("restore of %s failed, rules unchanged: %s", path, err)
        return EXIT_FAILED
    for family, outcome in results.items():
        if args.dry_run:
            sys.stdout.write(f"# {family}\n{outcome.payload}")
        else:
            log.info(
                "restored %s from %s (created %s on %s): %s",
                family,
                path,
                snap.meta["created"],
                snap.meta["node"],
                outcome.summary,
            )
    return EXIT_OK


def run_cleanup(args: argparse.Namespace) -> int:
    families = []
    if args.mode != "nftables":
        families += modes_for(
            "iptables", args.iptables_backend, require=False, dry_run=args.dry_run
        )
    if args.mode != "iptables":
        # nftables mode's tables are looked for on any node that can have them; one that
        # cannot has none to remove, which is no news.
        if args.nft_table:
            families += modes_for(
                "nftables",
                report=False,
                require=False,
                dry_run=args.dry_run,
                nft_table=args.nft_table,
            )
        else:  # every table kproxy made here, under either name
            families += all_nft_tables(dry_run=args.dry_run)
    # kube-proxy's IPVS-mode leftovers go in every mode, as `kube-proxy --cleanup` removes them.
    ipvs_backends = family_backends(args.iptables_backend, report=False)
    try:
        with _locked(args, "cleanup"):
            results = cleanup(families, ipvs_backends, dry_run=args.dry_run)
    except LockError as err:
        log.error("%s", err)
        return EXIT_ERROR
    except ApplyError as err:
        log.error("cleanup failed, rules unchanged: %s", err)
        return EXIT_FAILED
    for family, sent in results.items():
        if args.dry_run:
            sys.stdout.write(f"# {family}\n{sent}")
        else:
            removed = (
                sent.strip().removeprefix("delete ")  # "table ip kproxy"
                if "delete table" in sent
                else (f"{sent.count(chr(10) + '-X ')} chains")
            )
            log.info("cleanup %s: removed %s", family, removed)
    return EXIT_OK


def _tracer(
    args: argparse.Namespace,
    state: ClusterState,
    config: NodeConfig,
    family: Family,
    local: set[Address],
) -> Tracer | NftTracer:
    """The rules to trace: the kernel's (--live) or a render of the state, in --mode."""
    if args.mode == "nftables":
        nft_family = NFT_IPV4 if family.version == 4 else NFT_IPV6
        if args.live:
            name = args.nft_table or nft_table_here(nft_family.name)
            table = NftBackend(nft_family.name, name).read() or NftTable(nft_family.name)
        else:
            inline = args.nft_table == KUBE_PROXY_TABLE  # kube-proxy's layout in its table
            table = render_nft(state, config, nft_family, inline_dispatch=inline).table
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


def run_trace(args: argparse.Namespace) -> int:
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
    config = node_config(args, state, apply=False)
    local = {ipaddress.ip_address(ip) for ip in (*args.local_ip, *config.node_ips)}
    if args.live:
        local |= {ipaddress.ip_address(ip) for ip in nodeinfo.local_addresses()}
    try:
        tracer = _tracer(args, state, config, family, local)
    except ApplyError as err:
        log.error("%s", err)
        return EXIT_ERROR
    origin = args.origin
    if origin == "auto":
        pod_cidrs = config.cluster_cidrs
        if config.detect_local_mode == "NodeCIDR" and state.node:
            pod_cidrs = state.node.pod_cidrs
        in_cluster = any(
            src in ipaddress.ip_network(c)
            for c in pod_cidrs
            if ipaddress.ip_network(c).version == src.version
        )
        origin = "node" if src in local or src.is_loopback else "pod" if in_cluster else "external"
    iif = args.iif
    if iif is None:
        iif = ""
        if origin == "pod" and config.detect_local_mode == "BridgeInterface":
            iif = config.bridge_interface
        elif origin == "pod" and config.detect_local_mode == "InterfaceNamePrefix":
            iif = config.interface_name_prefix + "0"
    packet = Packet(src, dst, args.proto, args.dport, iif=iif)
    outcomes = tracer.trace(packet, origin)
    print(format_outcomes(packet, origin, outcomes))
    return EXIT_OK


def run_doctor(args: argparse.Namespace) -> int:
    """`kproxy doctor`: every check of kproxy/doctor/, printed; 0 all ok, 1 a warning, 2 a
    failure."""
    from kproxy.doctor.checks import run_checks
    from kproxy.doctor.context import Context
    from kproxy.doctor.result import exit_status, format_json, format_text

    ctx = Context(
        mode=args.mode,
        iptables_backend=args.iptables_backend,
        healthz_bind=args.healthz_bind_address,
        metrics_bind=args.metrics_bind_address,
        servers=args.master,
        kubeconfig=args.kubeconfig,
        api_timeout=args.api_timeout,
        state_cache=args.state_cache or None,
        state_cache_max_age=args.state_cache_max_age,
        sync_period=args.sync_period,
        conntrack_warn=args.conntrack_warn_percent / 100,
        ufw_conf=args.ufw_conf,
    )
    results = run_checks(ctx, tuple(args.check))
    sys.stdout.write(format_json(results) if args.output == "json" else format_text(results))
    return exit_status(results)
