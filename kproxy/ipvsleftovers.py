"""What kube-proxy in IPVS mode leaves on a node, found and removed.

kproxy never runs IPVS (`mode: ipvs` runs its nftables mode), so on a node whose kube-proxy
ran in IPVS mode these are nobody's after the switch, and some are harmful: `kube-ipvs0` holds
every ClusterIP and external IP as a local address, so the node itself answers on them on any
port no Service names. Removed as upstream's ipvs `CleanupLeftovers` does when kube-proxy
leaves IPVS mode (pkg/proxy/ipvs/cleanup.go), in its order: the IPVS virtual servers, the
dummy interface, the iptables chains, and last the ipsets (a set named by a rule cannot be
destroyed). Only kube-proxy's names are touched: its interface, its fixed list of ipsets
(`ipsetInfo`), its IPVS-only chains (kproxy/iptables/ipvs.py); never another set or chain.

Netlink sockets are opened here, in the network namespace of the calling thread.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field

from kproxy.iptables.ipvs import IPVS_CHAINS, IPVS_TABLES, ipvs_removal
from kproxy.iptables.restore import IptablesBackend
from kproxy.iptables.sync import read_live

log = logging.getLogger(__name__)

# Upstream's defaultDummyDevice, and the kinds of link taken for it: upstream's
# DeleteDummyDevice refuses any other kind ("expect dummy device"), and so does kproxy.
IPVS_LINK = "kube-ipvs0"
LINK_KINDS: tuple[str, ...] = ("dummy",)

# Upstream's ipsetInfo (pkg/proxy/ipvs/proxier.go, the names in ipset.go), in its order.
_IPV4_SETS = (
    "KUBE-LOOP-BACK",
    "KUBE-CLUSTER-IP",
    "KUBE-EXTERNAL-IP",
    "KUBE-EXTERNAL-IP-LOCAL",
    "KUBE-LOAD-BALANCER",
    "KUBE-LOAD-BALANCER-FW",
    "KUBE-LOAD-BALANCER-LOCAL",
    "KUBE-LOAD-BALANCER-SOURCE-IP",
    "KUBE-LOAD-BALANCER-SOURCE-CIDR",
    "KUBE-NODE-PORT-TCP",
    "KUBE-NODE-PORT-LOCAL-TCP",
    "KUBE-NODE-PORT-UDP",
    "KUBE-NODE-PORT-LOCAL-UDP",
    "KUBE-NODE-PORT-SCTP-HASH",
    "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
    "KUBE-HEALTH-CHECK-NODE-PORT",
    "KUBE-IPVS-IPS",
)
IPSET_NAME_MAX = 31  # the kernel's IPSET_MAXNAMELEN less its NUL


def ipv6_set_name(name: str) -> str:
    """The IPv6 proxier's name for a set: "KUBE-" becomes "KUBE-6-", cut to 31 characters
    (upstream's NewIPSet)."""
    return name.replace("KUBE-", "KUBE-6-", 1)[:IPSET_NAME_MAX]


IPSET_NAMES: tuple[str, ...] = _IPV4_SETS + tuple(ipv6_set_name(n) for n in _IPV4_SETS)


@dataclass
class Found:
    """IPVS mode's leftovers on this node. `link`: kube-ipvs0's addresses, None when there is
    no such link (of a kind in LINK_KINDS); `chains`: per iptables family ("IPv4"), the IPVS
    chains present ("nat/KUBE-NODE-PORT"); `virtual_servers`: None when the kernel has no
    ip_vs loaded (then there are none)."""

    link: list[str] | None = None
    ipsets: list[str] = field(default_factory=list)
    chains: dict[str, list[str]] = field(default_factory=dict)
    virtual_servers: int | None = None

    def kube_proxy_ran_ipvs(self) -> bool:
        """kube-proxy's own traces: its interface, sets or chains (not the virtual servers,
        which any IPVS user may have)."""
        return self.link is not None or bool(self.ipsets) or any(self.chains.values())

    def empty(self) -> bool:
        return not self.kube_proxy_ran_ipvs()

    def describe(self) -> list[str]:
        """One phrase per kind of leftover."""
        out = []
        if self.link is not None:
            out.append(f"{IPVS_LINK} ({len(self.link)} addresses)")
        if self.virtual_servers and self.kube_proxy_ran_ipvs():
            out.append(f"{self.virtual_servers} IPVS virtual servers")
        if self.ipsets:
            out.append("ipsets " + ", ".join(self.ipsets))
        for family, chains in self.chains.items():
            if chains:
                out.append(f"{family} chains " + ", ".join(chains))
        return out


# -- the interface


def _link(ipr) -> tuple[int, list[str]] | None:
    """(index, addresses) of kube-ipvs0, or None when there is none of a kind it may be."""
    indices = ipr.link_lookup(ifname=IPVS_LINK)
    if not indices:
        return None
    (msg,) = ipr.get_links(indices[0])
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    if kind not in LINK_KINDS:
        log.debug("%s is a %s link, not kube-proxy's dummy: not its leftover", IPVS_LINK, kind)
        return None
    addresses = [m.get_attr("IFA_ADDRESS") for m in ipr.get_addr(index=indices[0])]
    return indices[0], [a for a in addresses if a]


def find_link() -> list[str] | None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = _link(ipr)
    return None if found is None else found[1]


def remove_link() -> list[str] | None:
    """Delete kube-ipvs0: the addresses it held, None when there was none."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = _link(ipr)
        if found is None:
            return None
        ipr.link("del", index=found[0])
    return found[1]


# -- the ipsets


def _ipset():
    """An IPSet socket, None when the kernel has no ip_set (then no set exists either)."""
    from pyroute2 import IPSet
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return IPSet()
    except (NetlinkError, OSError) as err:
        log.debug("no ipset support: %s", err)
        return None


def find_ipsets() -> list[str]:
    """Which of kube-proxy's sets exist (by name: a whole listing would carry every member)."""
    from pyroute2.netlink.exceptions import NetlinkError

    ips = _ipset()
    if ips is None:
        return []
    present = []
    try:
        for name in IPSET_NAMES:
            try:
                list(ips.headers(name))
            except NetlinkError as err:
                if err.code != errno.ENOENT:
                    raise
                continue
            present.append(name)
    finally:
        ips.close()
    return present


def remove_ipsets() -> tuple[list[str], list[str]]:
    """Destroy kube-proxy's sets: (those destroyed, those that could not be: still named by
    a rule, each said in a warning)."""
    from pyroute2.netlink.exceptions import NetlinkError

    ips = _ipset()
    if ips is None:
        return [], []
    destroyed, busy = [], []
    try:
        for name in IPSET_NAMES:
            try:
                ips.destroy(name)
            except NetlinkError as err:
                if err.code == errno.ENOENT:
                    continue
                log.warning("could not destroy kube-proxy's ipset %s: %s", name, err)
                busy.append(name)
                continue
            destroyed.append(name)
    finally:
        ips.close()
    return destroyed, busy


# -- the IPVS virtual servers
#
# UNTESTED in kproxy's test environment: its kernel has no ip_vs. Only when the kernel has
# ip_vs loaded (its /proc/net/ip_vs exists in this namespace) is the IPVS generic netlink
# family asked for: asking for an unknown family could load the module as a side effect.


def _ip_vs_loaded() -> bool:
    return os.path.exists("/proc/thread-self/net/ip_vs")


def find_virtual_servers() -> int | None:
    """How many IPVS virtual servers there are; None without ip_vs."""
    return _virtual_servers(remove=False)


def remove_virtual_servers() -> int | None:
    """Delete every IPVS virtual server, as upstream's `ipvs.Flush()` does (kube-proxy
    assumes it is IPVS's only user on a node); how many there were, None without ip_vs."""
    return _virtual_servers(remove=True)


def _virtual_servers(remove: bool) -> int | None:
    if not _ip_vs_loaded():
        return None
    from pyroute2 import IPVS
    from pyroute2.ipvs import IPVSService
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        sock = IPVS()
    except NetlinkError as err:
        if err.code == errno.ENOENT:
            return None
        raise
    try:
        services = list(sock.service("dump"))
        if remove:
            for msg in services:
                sock.service("del", service=IPVSService.from_message(msg))
        return len(services)
    finally:
        sock.close()


# -- the iptables chains


def find_chains(backend: IptablesBackend) -> list[str]:
    """The IPVS chains in `backend`'s tables: one `iptables -S CHAIN` each, a few ms even in
    a large table (doctor runs this every sync period)."""
    return [
        f"{table}/{chain}"
        for table, chains in IPVS_CHAINS.items()
        for chain in chains
        if backend.chain_exists(table, chain)
    ]


def remove_chains(backend: IptablesBackend) -> list[str]:
    """Delete the IPVS chains of `backend`'s family, and the jumps into them, in one
    transaction per table: the chains removed."""
    if not find_chains(backend):
        return []
    removal = ipvs_removal(read_live(backend, list(IPVS_TABLES)))
    for chain in removal.kept:
        log.warning(
            "kube-proxy's IPVS-mode chain %s (IPv%d) kept: a rule of another chain jumps to it",
            chain,
            backend.family,
        )
    if removal.text:
        backend.restore(removal.text, noflush=True)
    return removal.removed


# -- all of it


def find(backends: list[IptablesBackend]) -> Found:
    """Every IPVS-mode leftover on this node (nothing is changed)."""
    return Found(
        link=find_link(),
        ipsets=find_ipsets(),
        chains={f"IPv{b.family}": find_chains(b) for b in backends},
        virtual_servers=find_virtual_servers(),
    )


def remove_first(backends: list[IptablesBackend]) -> bool:
    """The first part of the removal, before kproxy removes the other mode's chains (IPVS
    chains jump into them: KUBE-NODE-PORT to KUBE-MARK-MASQ): the virtual servers, kube-ipvs0,
    the IPVS chains. One line logged per thing removed; whether kube-proxy's IPVS mode had left
    anything (then the virtual servers went too)."""
    ran_ipvs = False
    for backend in backends:
        try:
            chains = remove_chains(backend)
        except Exception as err:  # never fatal: the Services have their rules already
            log.warning("could not remove kube-proxy's IPVS-mode chains: %s", err)
            continue
        if chains:
            ran_ipvs = True
            log.info(
                "removed kube-proxy's IPVS-mode chains (IPv%d): %s",
                backend.family,
                ", ".join(chains),
            )
    try:
        addresses = remove_link()
    except Exception as err:
        log.warning("could not remove %s: %s", IPVS_LINK, err)
    else:
        if addresses is not None:
            ran_ipvs = True
            log.info(
                "removed kube-proxy's IPVS-mode interface %s (%d addresses: %s)",
                IPVS_LINK,
                len(addresses),
                ", ".join(addresses[:5]) + (" ..." if len(addresses) > 5 else ""),
            )
    ran_ipvs = ran_ipvs or bool(find_ipsets())
    if ran_ipvs:
        try:
            count = remove_virtual_servers()
        except Exception as err:
            log.warning("could not remove the IPVS virtual servers: %s", err)
        else:
            if count:
                log.info("removed kube-proxy's IPVS virtual servers (%d)", count)
    return ran_ipvs


def remove_last() -> list[str]:
    """The last part: kube-proxy's ipsets, once no rule names them (after iptables mode's
    full sync rewrote, or nftables mode removed, the chains they share with kproxy)."""
    try:
        destroyed, _ = remove_ipsets()
    except Exception as err:
        log.warning("could not remove kube-proxy's IPVS-mode ipsets: %s", err)
        return []
    if destroyed:
        log.info("removed kube-proxy's IPVS-mode ipsets: %s", ", ".join(destroyed))
    return destroyed
