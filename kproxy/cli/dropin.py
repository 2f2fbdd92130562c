"""kproxy as a drop-in for kube-proxy: `kproxy run` (or the `kube-proxy` entry point) with
kube-proxy's command line, `--config FILE` included, and kube-proxy's DaemonSet around it.

`resolve` turns kube-proxy's flags and the KubeProxyConfiguration (cli/proxyconfig.py) into
`kproxy run`'s own options; `prepare` does, at the daemon's start, what the file asks of the
node (the conntrack sysctls) and finds where the state cache and snapshots can be written.

Which wins when a flag and the file disagree is upstream's rule (cmd/kube-proxy/app/options.go,
`Options.Complete`): with --config the loaded file replaces the whole configuration the flags
were parsed into, so every flag that sets a configuration field is ignored; what stays from the
command line is what upstream keeps outside that configuration or copies over it after loading:
  - --hostname-override (`processHostnameOverrideFlag`, run after loading: the flag wins,
    trimmed and lower-cased);
  - the logging flags, -v/--v and --logging-format (`copyLogsFromFlags`: flags win);
  - --master (`o.master`, passed to `createClient` apart from the file's kubeconfig);
  - --cleanup, --init-only, --write-config-to (Options fields, not configuration);
  - and kproxy's own flags, which have no field in the file (--state-cache, --snapshot-dir,
    --lock-file, --node-ip, --iptables-backend, --api-wait, ...).
--healthz-port and --metrics-port count only without --config, as upstream's
`addressFromDeprecatedFlags` (0 turns that server off, as an empty --*-bind-address does).
kproxy logs each flag --config made it ignore (upstream is silent).

The client-side rate limit on API requests (`args.api_qps`, `args.api_burst`): with --config,
the file's clientConnection.qps/burst (upstream's 5 and 10 when left out); without it,
--kube-api-qps/--kube-api-burst when either is given (client-go's 5 and 10 for the other);
with neither, none: kproxy's own default (its few requests are one list and one watch per
resource, and Event posts).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field

from kproxy.cli import proxyconfig
from kproxy.cli.flags import KUBE_PROXY_FLAGS, kube_proxy_dest
from kproxy.nftables.table import KUBE_PROXY_TABLE, TABLE
from kproxy.recovery.restore import DEFAULT_SNAPSHOT_DIR
from kproxy.sources.cache import DEFAULT_STATE_CACHE
from kproxy.sources.ratelimit import client_go_limits

log = logging.getLogger("kproxy")

# kproxy run's flags that set a KubeProxyConfiguration field: ignored when --config is given.
FILE_COVERED = {
    "mode": ("--mode", "--proxy-mode"),
    "cluster_cidr": ("--cluster-cidr",),
    "masquerade_all": ("--masquerade-all",),
    "masquerade_bit": ("--iptables-masquerade-bit",),
    "nodeport_addresses": ("--nodeport-addresses",),
    "localhost_nodeports": ("--iptables-localhost-nodeports",),
    "kubeconfig": ("--kubeconfig",),
    "sync_period": ("--iptables-sync-period",),
    "min_sync_period": ("--iptables-min-sync-period",),
    "metrics_bind_address": ("--metrics-bind-address",),
    "healthz_bind_address": ("--healthz-bind-address",),
    "detect_local_mode": ("--detect-local-mode",),
    "bridge_interface": ("--pod-bridge-interface",),
    "interface_name_prefix": ("--pod-interface-name-prefix",),
}
# kube-proxy flags that set a configuration field too (the rest of KUBE_PROXY_FLAGS).
_KP_COVERED = {
    "bind-address",
    "feature-gates",
    "oom-score-adj",
    "kube-api-qps",
    "kube-api-burst",
    "kube-api-content-type",
    "bind-address-hard-fail",
    "profiling",
    "show-hidden-metrics-for-version",
    "config-sync-period",
    "proxy-port-range",
    "healthz-port",
    "metrics-port",
} | {n for n in KUBE_PROXY_FLAGS if n.startswith(("ipvs-", "conntrack-"))}
_CONNTRACK_FLAGS = {
    "conntrack-max-per-core": "maxPerCore",
    "conntrack-min": "min",
    "conntrack-tcp-timeout-established": "tcpEstablishedTimeout",
    "conntrack-tcp-timeout-close-wait": "tcpCloseWaitTimeout",
    "conntrack-tcp-be-liberal": "tcpBeLiberal",
    "conntrack-udp-timeout": "udpTimeout",
    "conntrack-udp-timeout-stream": "udpStreamTimeout",
}
# Where the state cache and snapshots go when the default /var/lib/kproxy cannot be written
# (kube-proxy's DaemonSet mounts no such directory, and may have a read-only root): the
# container's /run, then the temporary directory. Neither survives the pod.
FALLBACK_DIRS = ("/run/kproxy", os.path.join(tempfile.gettempdir(), "kproxy"))


@dataclass
class Resolved:
    """What resolve() found: lines to log once logging is set up, and the sysctls to set."""

    notes: list[tuple[int, str]] = field(default_factory=list)
    conntrack_sysctls: dict[str, str] = field(default_factory=dict)
    cleanup: bool = False
    init_only: bool = False  # --init-only: the node's sysctls, then exit
    write_config_to: str | None = None  # --write-config-to: the settings as a file, then exit


_LEVEL = re.compile(r"^-v=?(\d+)$")
# kproxy's switches (store_true) that kube-proxy spells as pflag booleans, `--name=true`.
_SWITCHES = ("--masquerade-all",)


def kube_proxy_argv(argv: list[str]) -> list[str]:
    """kube-proxy's (pflag's) spellings argparse does not take, in `run`'s arguments:
    `-v=2`, `-v2`, `-v 2` (a level: `--v=2`) and `--masquerade-all=true|false`."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name, eq, value = token.partition("=")
        if token == "--":
            out += argv[i:]
            break
        if m := _LEVEL.match(token):
            out.append(f"--v={m.group(1)}")
        elif token == "-v" and i + 1 < len(argv) and argv[i + 1].isdigit():
            out.append(f"--v={argv[i + 1]}")
            i += 1
        elif eq and name in _SWITCHES and value.lower() in ("true", "false", "1", "0", "t", "f"):
            if _bool(value):
                out.append(name)
        else:
            out.append(token)
        i += 1
    return out


def given(argv: list[str]) -> set[str]:
    """The long options present on a command line (`--name` or `--name=value`)."""
    out = set()
    for token in argv:
        if token == "--":
            break
        if token.startswith("--"):
            out.add(token.split("=", 1)[0])
    return out


def _bool(value: str | None) -> bool:
    return str(value).lower() in ("true", "1", "yes", "t")


def _with_port(address: str, port: str) -> str:
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or "]" in address else address
    return f"{host}:{port}"


def resolve(args: argparse.Namespace, argv: list[str], ncpu: int | None = None) -> Resolved:
    """Apply kube-proxy's flags and --config to `run`'s options in `args`, upstream's
    precedence (module docstring). Raises ConfigError (one line naming the field)."""
    ncpu = ncpu or os.cpu_count() or 1
    on_line = given(argv)
    out = Resolved()
    kp = {name: getattr(args, kube_proxy_dest(name), None) for name in KUBE_PROXY_FLAGS}
    config_file = kp["config"]

    # Logging flags win in both cases (copyLogsFromFlags).
    if kp["v"] is not None:
        try:
            level = int(kp["v"])
        except ValueError:
            raise proxyconfig.ConfigError(f"--v: {kp['v']!r} is not a number") from None
        args.verbose = args.verbose or level >= 4
    if kp["logging-format"] is not None:
        if kp["logging-format"] not in ("text", "json"):
            raise proxyconfig.ConfigError(
                f"--logging-format: {kp['logging-format']!r} is not text or json"
            )
        args.log_format = kp["logging-format"]
    out.cleanup = kp["cleanup"] is not None and _bool(kp["cleanup"])
    out.init_only = kp["init-only"] is not None and _bool(kp["init-only"])
    out.write_config_to = kp["write-config-to"] or None
    if "--hostname-override" in on_line:  # processHostnameOverrideFlag: trimmed, lower-cased
        args.node_name = args.node_name.strip().lower()
        if not args.node_name:
            raise proxyconfig.ConfigError("--hostname-override: empty hostname-override is invalid")

    if config_file:
        try:
            with open(config_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as err:
            raise proxyconfig.ConfigError(
                f"--config {config_file}: cannot read it: {err.strerror or err}"
            ) from None
        conf = proxyconfig.parse(text, f"--config {config_file}", ncpu=ncpu)
        _apply_file(args, conf, on_line, out)
        for names in FILE_COVERED.values():
            for name in names:
                if name in on_line:
                    out.notes.append(
                        (logging.WARNING, f"{name} ignored: --config is given, its value is used")
                    )
        for name in sorted(_KP_COVERED):
            if kp[name] is not None:
                out.notes.append(
                    (logging.WARNING, f"--{name} ignored: --config is given, its value is used")
                )
        # The rest of kube-proxy's flags (no field in the file): said once each below.
        rest = {n for n in KUBE_PROXY_FLAGS if n not in _KP_COVERED}
    else:
        _apply_flags(args, kp, out, ncpu)
        rest = set(KUBE_PROXY_FLAGS)

    for name in sorted(rest):
        why = KUBE_PROXY_FLAGS[name][1]
        if why and kp[name] is not None:
            out.notes.append((logging.INFO, f"--{name} accepted, no effect: {why}"))
    if args.mode == "ipvs":
        out.notes.append(
            (
                logging.WARNING,
                "--proxy-mode ipvs: kproxy runs its nftables mode instead (the same O(1) "
                "lookup; IPVS is deprecated upstream since 1.35)",
            )
        )
        args.mode = "nftables"
    elif args.mode == "":
        args.mode = "iptables"  # upstream's default on Linux
    return out


def _apply_file(
    args: argparse.Namespace, conf: proxyconfig.ProxyConfig, on_line: set[str], out: Resolved
) -> None:
    args.mode = conf.mode
    args.cluster_cidr = list(conf.cluster_cidrs)
    args.masquerade_all = conf.masquerade_all
    args.masquerade_bit = conf.masquerade_bit
    args.nodeport_addresses = list(conf.nodeport_addresses)
    args.localhost_nodeports = conf.localhost_nodeports
    args.kubeconfig = conf.kubeconfig
    args.sync_period = conf.sync_period
    args.min_sync_period = conf.min_sync_period
    args.metrics_bind_address = conf.metrics_bind_address
    args.healthz_bind_address = conf.healthz_bind_address
    args.detect_local_mode = conf.detect_local_mode
    args.bridge_interface = conf.bridge_interface
    args.interface_name_prefix = conf.interface_name_prefix
    args.api_qps, args.api_burst = client_go_limits(conf.qps, conf.burst)
    if conf.node_ip and not args.node_ip:
        args.node_ip = [conf.node_ip]
    if not ({"--hostname-override", "--node-name"} & on_line) and conf.hostname_override:
        args.node_name = conf.hostname_override
    if not ({"-v", "--verbose", "--v"} & on_line):
        args.verbose = args.verbose or conf.verbosity >= 4
    if not ({"--log-format", "--logging-format"} & on_line):
        args.log_format = conf.log_format
    out.conntrack_sysctls = dict(conf.conntrack_sysctls)
    warn = {"mode ipvs"}
    for note in conf.notes:
        level = logging.WARNING if note.startswith(tuple(warn)) else logging.INFO
        out.notes.append((level, note))


def _apply_flags(args: argparse.Namespace, kp: dict, out: Resolved, ncpu: int) -> None:
    """kube-proxy's flags without --config: those with a meaning onto kproxy's options."""
    if kp["bind-address"] is not None:
        try:
            ip = ipaddress.ip_address(kp["bind-address"])
        except ValueError:
            raise proxyconfig.ConfigError(
                f"--bind-address: {kp['bind-address']!r} is not an IP address"
            ) from None
        if not (ip.is_unspecified or ip.is_loopback) and not args.node_ip:
            args.node_ip = [str(ip)]
    for name, dest in (
        ("healthz-port", "healthz_bind_address"),
        ("metrics-port", "metrics_bind_address"),
    ):
        port = kp[name]
        if port is None:
            continue
        if not port.isdigit() or not 0 <= int(port) < 65536:
            raise proxyconfig.ConfigError(f"--{name}: {port!r} is not a port (0-65535)")
        # upstream's addressFromDeprecatedFlags: 0 turns the server off (an empty address).
        setattr(args, dest, "" if int(port) == 0 else _with_port(getattr(args, dest), port))
    _apply_api_limits(args, kp)
    # The conntrack flags: the sysctls kube-proxy would set, from its defaults and these.
    fields = {}
    for name, key in _CONNTRACK_FLAGS.items():
        value = kp[name]
        if value is None:
            continue
        if key == "tcpBeLiberal":
            fields[key] = _bool(value)
        elif key in ("maxPerCore", "min"):
            if not value.lstrip("-").isdigit():
                raise proxyconfig.ConfigError(f"--{name}: {value!r} is not an integer")
            fields[key] = int(value)
        else:
            try:
                proxyconfig.go_duration(value)
            except ValueError as err:
                raise proxyconfig.ConfigError(f"--{name}: {err}") from None
            fields[key] = value
    if fields:
        out.conntrack_sysctls = proxyconfig.conntrack_sysctls({"conntrack": fields}, ncpu)


def _apply_api_limits(args: argparse.Namespace, kp: dict) -> None:
    """--kube-api-qps/--kube-api-burst without --config: either one given sets the limit, the
    other taking upstream's flag default (5, 10); 0 is client-go's default, a negative qps no
    limit; a negative burst is refused, as upstream's validation does."""
    qps_text, burst_text = kp["kube-api-qps"], kp["kube-api-burst"]
    if qps_text is None and burst_text is None:
        return  # kproxy's own default: no limit
    try:
        qps = float(qps_text) if qps_text is not None else 5.0
    except ValueError:
        raise proxyconfig.ConfigError(f"--kube-api-qps: {qps_text!r} is not a number") from None
    if burst_text is not None and not burst_text.lstrip("-").isdigit():
        raise proxyconfig.ConfigError(f"--kube-api-burst: {burst_text!r} is not an integer")
    burst = int(burst_text) if burst_text is not None else 10
    if burst < 0:
        raise proxyconfig.ConfigError(f"--kube-api-burst: {burst} is not 0 or more")
    args.api_qps, args.api_burst = client_go_limits(qps, burst)


# -- at the daemon's start


def in_init_netns() -> bool:
    """Whether this process is in the node's own network namespace (pid 1's): only there is a
    kernel-global sysctl (nf_conntrack_max) kproxy's to set."""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return False


def set_conntrack_sysctls(sysctls: dict[str, str], init_netns: bool | None = None) -> None:
    """Set what kube-proxy would (values that differ only). nf_conntrack_max is global to the
    kernel: set from the node's own namespace only. One that cannot be set (a read-only
    /proc/sys, an unprivileged pod) is one warning, never a failure."""
    from kproxy import nodeinfo

    init_netns = in_init_netns() if init_netns is None else init_netns
    for key, value in sysctls.items():
        if key == proxyconfig.NF_CONNTRACK_MAX and not init_netns:
            log.info(
                "%s=%s not set: not the node's own network namespace",
                key.replace("/", "."),
                value,
            )
            continue
        if nodeinfo.read_sysctl(key) != value and nodeinfo.write_sysctl(key, value):
            log.info("set %s=%s", key.replace("/", "."), value)


def writable_dir(path: str) -> bool:
    """Whether files can be created in `path` (created when missing)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".kproxy-probe-"):
            pass
    except OSError:
        return False
    return True


def state_paths(
    state_cache: str | None,
    snapshot_dir: str | None,
    fallbacks: tuple[str, ...] = FALLBACK_DIRS,
) -> tuple[str | None, str | None, list[str]]:
    """(state cache, snapshot dir, warnings): a default path that cannot be written moves to
    the first writable fallback directory, or is turned off with one warning. A path given on
    the command line is kept as given."""
    notes: list[str] = []
    targets = []
    if state_cache == DEFAULT_STATE_CACHE and not writable_dir(os.path.dirname(state_cache)):
        targets.append("cache")
    if snapshot_dir == DEFAULT_SNAPSHOT_DIR and not writable_dir(snapshot_dir):
        targets.append("snapshots")
    if not targets:
        return state_cache, snapshot_dir, notes
    base = next((d for d in fallbacks if writable_dir(d)), None)
    wanted = os.path.dirname(DEFAULT_STATE_CACHE)
    if base is None:
        notes.append(
            f"{wanted} and {', '.join(fallbacks)} cannot be written: running without the "
            "state cache and snapshots (no rebuild without the API server after a restart)"
        )
        return (
            None if "cache" in targets else state_cache,
            None if "snapshots" in targets else snapshot_dir,
            notes,
        )
    if "cache" in targets:
        state_cache = os.path.join(base, "state.json")
    if "snapshots" in targets:
        snapshot_dir = os.path.join(base, "snapshots")
    notes.append(
        f"{wanted} cannot be written: state cache and snapshots go to {base} (kept while "
        "the pod lives; mount a hostPath at /var/lib/kproxy to keep them across restarts)"
    )
    return state_cache, snapshot_dir, notes


def go_duration_text(seconds: float) -> str:
    """Seconds as Go prints a duration: 500ms, 30s, 1m0s, 1h30m0s."""
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:g}s"
    if hours or minutes:
        text = f"{int(minutes)}m" + text
    if hours:
        text = f"{int(hours)}h" + text
    return text


def config_text(args: argparse.Namespace) -> str:
    """The settings `run` would use, as a KubeProxyConfiguration (--write-config-to)."""
    import yaml

    section = {
        "masqueradeAll": args.masquerade_all,
        "masqueradeBit": args.masquerade_bit,
        "syncPeriod": go_duration_text(args.sync_period),
        "minSyncPeriod": go_duration_text(args.min_sync_period),
    }
    doc = {
        "apiVersion": proxyconfig.API_VERSION,
        "kind": proxyconfig.KIND,
        "mode": args.mode,
        "clusterCIDR": ",".join(args.cluster_cidr),
        "detectLocalMode": args.detect_local_mode,
        "detectLocal": {
            "bridgeInterface": args.bridge_interface,
            "interfaceNamePrefix": args.interface_name_prefix,
        },
        "hostnameOverride": args.node_name,
        "bindAddress": args.node_ip[0] if args.node_ip else "0.0.0.0",
        "healthzBindAddress": args.healthz_bind_address,
        "metricsBindAddress": args.metrics_bind_address,
        "nodePortAddresses": list(args.nodeport_addresses) or None,
        "clientConnection": {
            "kubeconfig": args.kubeconfig or "",
            # kproxy's client speaks JSON; no limit is a negative qps (0 would be upstream's 5).
            "contentType": "application/json",
            "qps": args.api_qps if args.api_qps > 0 else -1,
            "burst": args.api_burst,
        },
        "iptables": {**section, "localhostNodePorts": args.localhost_nodeports},
        "nftables": section,
        "logging": {"format": args.log_format, "verbosity": 4 if args.verbose else 0},
    }
    return yaml.safe_dump(doc, sort_keys=False)


def prepare(args: argparse.Namespace, sysctls: dict[str, str]) -> None:
    """At the daemon's start: the conntrack sysctls, and where state can be written."""
    if sysctls:
        set_conntrack_sysctls(sysctls)
    args.state_cache, args.snapshot_dir, notes = state_paths(args.state_cache, args.snapshot_dir)
    for note in notes:
        log.warning("%s", note)


class ConfigWatch:
    """kube-proxy exits when its --config file changes (options.go `eventHandler`: "content
    of the proxy server's configuration file was updated"), so that its pod restarts with the
    new one; kproxy does the same: a thread compares the file's content every `interval`
    seconds (a ConfigMap update swaps a symlink, which content catches) and sets `stop`."""

    def __init__(self, path: str, stop: threading.Event, interval: float = 2.0) -> None:
        self.path, self.stop, self.interval = path, stop, interval
        self.changed = False
        self._seen = self._read()
        self._thread = threading.Thread(target=self._run, name="config-watch", daemon=True)
        self._thread.start()

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except OSError:
            return None

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            if self._read() != self._seen:
                log.warning(
                    "--config %s changed: exiting, to be restarted with it (as kube-proxy)",
                    self.path,
                )
                self.changed = True
                self.stop.set()
                return


def remove_nft_tables(
    nft: str = "nft", keep: frozenset[tuple[str, str]] = frozenset()
) -> list[str]:
    """Delete the nftables tables `kube-proxy` (kube-proxy's nftables mode's) and `kproxy`
    (kproxy's own, outside kube-proxy's place) of both families, but those in `keep` (the
    (family, name) the daemon writes): "family name" of each removed. As upstream's
    platformCleanup removes the other mode's rules, for a node whose proxy ran nftables."""
    removed = []
    for family in ("ip", "ip6"):
        for name in (KUBE_PROXY_TABLE, TABLE):
            if (family, name) in keep:
                continue
            try:
                probe = subprocess.run(
                    [nft, "list", "table", family, name], capture_output=True, timeout=60
                )
            except (OSError, subprocess.SubprocessError):
                return removed  # no nft on this node: no such table either
            if probe.returncode != 0:
                continue
            res = subprocess.run(
                [nft, "delete", "table", family, name],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if res.returncode == 0:
                removed.append(f"{family} {name}")
                log.info("removed the nftables table %s %s, left by the proxy before", family, name)
            else:
                log.warning(
                    "could not remove the nftables table %s %s: %s",
                    family,
                    name,
                    " ".join(res.stderr.split()),
                )
    return removed


def after_first_sync(
    health, stop: threading.Event, families: list, interval: float = 0.5
) -> threading.Thread:
    """Once the daemon's first full sync is done (`health.ready`: its rules are in place),
    remove the nftables tables kube-proxy (or kproxy outside kube-proxy's place) left, but
    the one the daemon's `families` write: never before, so no Service is ever without
    rules."""
    keep = frozenset((f.backend.family, f.table) for f in families if f.mode == "nftables")

    def run() -> None:
        while not health.ready:
            if stop.wait(interval):
                return
        remove_nft_tables(keep=keep)

    thread = threading.Thread(target=run, name="kube-proxy-leftovers", daemon=True)
    thread.start()
    return thread
