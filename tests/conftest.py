"""Fixtures for the kernel tests (``@pytest.mark.kernel``): real network namespaces.

Kernel tests are skipped, with the reason, when not running as root, when ``ip netns add``
or a veth pair inside a namespace fails, or when iptables/iptables-restore are missing; the
nftables half of the ``proxy_mode`` tests also when ``nft`` is missing.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import netns  # noqa: E402


@pytest.fixture(scope="session")
def kernel_support() -> None:
    """Skips the test unless namespaces, veth pairs and iptables work on this machine."""
    reason = netns.probe_netns_support()
    if reason is not None:
        pytest.skip(f"kernel test skipped: {reason}")


PROXY_MODES = ("iptables", "nftables")


@pytest.fixture
def nft_oracle(kernel_support: None, monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[str]:
    """Every netlink transaction kproxy makes while the test runs (also in the daemons it
    starts) is checked against nft: the same starting table and transaction applied with
    `nft -f` in a namespace of its own must list identically (kproxy.nftables.oracle). A
    mismatch fails the test here, at teardown, even when the daemon went on."""
    name = f"kpt-{secrets.token_hex(3)}-oracle"
    log = tmp_path / "nft-oracle.log"
    subprocess.run([netns.which("ip") or "ip", "netns", "add", name], check=True)
    monkeypatch.setenv("KPROXY_NFT_ORACLE_NETNS", name)
    monkeypatch.setenv("KPROXY_NFT_ORACLE_LOG", str(log))
    try:
        yield name
    finally:
        subprocess.run([netns.which("ip") or "ip", "netns", "delete", name], check=False)
    mismatches = log.read_text() if log.exists() else ""
    assert not mismatches, mismatches[:5000]


@pytest.fixture(params=PROXY_MODES)
def proxy_mode(request: pytest.FixtureRequest, kernel_support: None) -> str:
    """The ``kproxy --mode`` a conformance test runs with: every such test runs once per mode.

    The helpers that run ``kproxy`` pass it on as ``--mode``; assertions that read rules look
    at iptables-save or at ``nft list table ip kproxy`` accordingly.
    """
    mode = request.param
    if mode == "nftables" and netns.which("nft") is None:
        pytest.skip("kernel test skipped: `nft` is not installed (needed for --mode nftables)")
    if mode == "nftables":
        request.getfixturevalue("nft_oracle")
    return mode


@pytest.fixture
def topology(kernel_support: None) -> Iterator[netns.Topology]:
    """A node namespace, pods a (10.244.1.2), b (.3), c (.4) and one external client (.2).

    Each pod runs tests/podserver.py answering on TCP 8080 and UDP 5353 with its own name.
    Everything (servers, by pid; namespaces) is torn down after the test, pass or fail.
    """
    topo = netns.build(pods=(("a", 2), ("b", 3), ("c", 4)), clients=1)
    try:
        for pod in topo.pods.values():
            topo.start_server(pod, tcp=[8080], udp=[5353])
        yield topo
    finally:
        topo.close()


@pytest.fixture
def write_state(tmp_path: Path) -> Callable[..., Path]:
    """write_state(objects, name="state.yaml") -> path of a ``kind: List`` YAML file."""

    def _write(objects: list[dict[str, Any]], name: str = "state.yaml") -> Path:
        path = tmp_path / name
        doc = {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}}
        doc["items"] = objects
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    return _write
