"""The partial-update path under 120 seeded random changes, in both modes: after every change
the kernel's rules must equal a full render of the current state (tests/random_changes.py,
run inside a namespace made here)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns  # noqa: E402

pytestmark = pytest.mark.kernel

SCRIPT = Path(__file__).resolve().parent / "random_changes.py"
# Enough to reach every kind of change several times (random_changes.py); each datapath
# costs about 0.08 s a change, and `make test` must stay under 15 minutes.
STEPS = 120


@pytest.mark.parametrize(
    "mode,datapath",
    [
        ("iptables", "-"),
        ("nftables", "netlink"),
        ("nftables", "nft"),
        ("nftables", "netlink+inline"),  # upstream's inline endpoint dispatch
    ],
)
def test_random_changes_keep_the_kernel_equal_to_a_full_render(
    request, kernel_support, mode, datapath
):
    """In nftables mode over netlink, every one of the transactions is also checked against
    nft (the nft_oracle fixture): the same table and transaction applied with `nft -f` must
    list identically."""
    datapath, _, inline = datapath.partition("+")
    if datapath == "netlink":
        request.getfixturevalue("nft_oracle")
    topo = netns.Topology()
    try:
        argv = [sys.executable, str(SCRIPT), "--mode", mode, "--steps", str(STEPS), "--seed", "7"]
        if datapath != "-":
            argv += ["--nft-datapath", datapath]
        if inline:
            argv.append("--inline-dispatch")
        res = netns.run(
            topo.node,
            argv,
            timeout=600,
            check=False,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        report = json.loads(res.stdout.strip().splitlines()[-1])
        assert report["failure"] is None, report["failure"]
        assert report["steps"] == STEPS
        # Most changes went through the delta path (nothing read from the kernel).
        assert report["partial"] >= STEPS * 3 // 4, report
    finally:
        topo.close()
