"""Checks of other programs on the node: another proxy on kube-proxy's ports, firewall
managers that flush rules on reload."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from kproxy.daemon.metrics import split_host_port
from kproxy.doctor.context import Context
from kproxy.doctor.result import FAIL, OK, WARN, Result

TCP_LISTEN = "0A"
# The process names (the kernel's comm, 15 characters) a proxy's rule writes come from:
# iptables-restore and its variants, nft, kube-proxy itself (its nftables mode's netlink).
PROXY_WRITER = re.compile(r"(ip6?tables(-nft|-legacy)?-re|nft\b|kube-proxy|kproxy)")
CANARY = "KUBE-PROXY-CANARY"


@dataclass(frozen=True)
class Listener:
    port: int
    pid: int | None  # None: the socket's owner was not found (another pid namespace)
    comm: str
    cmdline: str

    @property
    def is_kproxy(self) -> bool:
        return "kproxy" in self.cmdline or self.comm == "kproxy" or runs_kproxy(self.cmdline)

    def __str__(self) -> str:
        who = f"{self.comm} (pid {self.pid})" if self.pid else "a process of another pid namespace"
        return f"{who} on port {self.port}"


def runs_kproxy(cmdline: str) -> bool:
    """kproxy under another name: the image's /usr/local/bin/kube-proxy is a link to kproxy's
    script (the image swap), which its interpreter runs as `python /usr/local/bin/kube-proxy
    ...`, so neither the process's name nor its command line says kproxy; the link does."""
    for arg in cmdline.split()[:2]:
        if arg.startswith("/") and os.path.basename(os.path.realpath(arg)) == "kproxy":
            return True
    return False


def listening_inodes(ports: set[int]) -> dict[int, int]:
    """{socket inode: port} of the TCP sockets listening on `ports` in this network namespace
    (/proc/net/tcp and tcp6 show the namespace of the process reading them)."""
    out = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != TCP_LISTEN:
                continue
            port = int(f[1].rsplit(":", 1)[1], 16)
            if port in ports:
                out[int(f[9])] = port
    return out


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def listeners(ports: set[int]) -> list[Listener]:
    """Who listens on `ports`: the process holding each listening socket (/proc/*/fd)."""
    inodes = listening_inodes(ports)
    found: dict[int, Listener] = {}
    if not inodes:
        return []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in inodes and inode not in found:
                    found[inode] = Listener(
                        inodes[inode],
                        pid,
                        _read(f"/proc/{pid}/comm"),
                        _read(f"/proc/{pid}/cmdline"),
                    )
    for inode, port in inodes.items():
        found.setdefault(inode, Listener(port, None, "?", ""))
    return sorted(found.values(), key=lambda x: (x.port, x.pid or 0))


def _ports(ctx: Context) -> set[int]:
    """The health and metrics ports; a server kproxy runs without ("") is looked for on
    kube-proxy's own port, where another proxy would listen."""
    return {
        split_host_port(ctx.healthz_bind, 10256)[1] if ctx.healthz_bind else 10256,
        split_host_port(ctx.metrics_bind, 10249)[1] if ctx.metrics_bind else 10249,
    }


def other_proxy(ctx: Context) -> Result:
    """Another proxy writing the same rules: a process other than kproxy listening on the
    health or metrics port (kube-proxy's 10256 and 10249), or kube-proxy's canary chain on a
    node where no kproxy serves health."""
    name = "other_proxy"
    fights = ctx.fought_by() if ctx.fought_by is not None else []
    writers = [who for who in fights if PROXY_WRITER.match(who)]
    if writers:
        return Result(
            name,
            FAIL,
            "kproxy's rules keep being rewritten by " + ", ".join(writers) + ": the tools a "
            "proxy writes its rules with (another kube-proxy or kproxy?)",
            "another-proxy",
        )
    if fights:
        return Result(
            name,
            WARN,
            "kproxy's rules keep being changed by " + ", ".join(fights),
            "another-proxy",
        )
    ports = _ports(ctx)
    found = listeners(ports)
    others = [x for x in found if not x.is_kproxy and x.pid != ctx.own_pid and x.pid is not None]
    if others:
        return Result(
            name,
            FAIL,
            "not kproxy: " + "; ".join(f"{x} ({x.cmdline[:60]})" for x in others),
            "another-proxy",
        )
    unknown = [x for x in found if x.pid is None]
    if unknown:
        # Owned by a process this pid namespace cannot see (a pod without hostPID).
        return Result(
            name,
            WARN,
            "cannot tell who listens: " + "; ".join(str(x) for x in unknown),
            "another-proxy",
        )
    kproxy = [x for x in found if x.is_kproxy or (ctx.own_pid and x.pid == ctx.own_pid)]
    if kproxy:
        return Result(name, OK, "kproxy listens on " + ", ".join(str(x.port) for x in kproxy))
    if ctx.own_pid is not None and not (ctx.healthz_bind and ctx.metrics_bind):
        # In the daemon, which serves neither port here: the canary chain is its own.
        return Result(name, OK, f"nothing else listens on {sorted(ports)}")
    if _canary_present(ctx):
        return Result(
            name,
            WARN,
            f"{CANARY} chain present and no kproxy listening on {sorted(ports)}: kube-proxy's "
            "or a stopped kproxy's rules",
            "another-proxy",
        )
    return Result(name, OK, f"nothing listens on {sorted(ports)} and no {CANARY} chain")


def _canary_present(ctx: Context) -> bool:
    from kproxy.doctor.rules import _backend

    backend = _backend(ctx)
    return backend is not None and backend.chain_exists("mangle", CANARY)


FIREWALL_DAEMONS = ("firewalld",)


def running(comm: str) -> list[int]:
    """The pids of the processes whose name (comm) is `comm`."""
    out = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        if _read(f"/proc/{pid}/comm") == comm:
            out.append(int(pid))
    return sorted(out)


def ufw_enabled(path: str) -> bool:
    """ufw's switch: ENABLED=yes in /etc/ufw/ufw.conf."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        key, _, value = line.strip().partition("=")
        if key.strip() == "ENABLED":
            return value.strip().strip("'\"").lower() == "yes"
    return False


def firewall_managers(ctx: Context) -> Result:
    """firewalld running or ufw enabled: their reload flushes (firewalld) or rewrites (ufw)
    the tables, taking kproxy's rules until its next repair, and their own DROP rules may
    drop Service traffic."""
    name = "firewall_managers"
    seen = [
        f"firewalld (pid {', '.join(map(str, pids))})"
        for d in FIREWALL_DAEMONS
        if (pids := running(d))
    ]
    if ufw_enabled(ctx.ufw_conf):
        seen.append(f"ufw (ENABLED=yes in {ctx.ufw_conf})")
    if seen:
        return Result(name, WARN, " and ".join(seen) + " active", "firewall-managers")
    return Result(name, OK, "no firewalld running, ufw not enabled")
