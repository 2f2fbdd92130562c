"""`make bench` at toy size, so the benchmark cannot rot (timings are not asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_runs_and_reports(kernel_support, tmp_path):
    out = tmp_path / "BENCH.md"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--smoke", "--write", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    for mode in ("iptables", "nftables", "nftables-nft"):
        assert f"| {mode} | 50 × 3 |" in text
    assert "endpoint added" in text and "First-packet latency" in text
    # EndpointSlice change -> packets, through `kproxy run`, over both nftables datapaths.
    assert "| nftables | 30 |" in text and "| nftables-nft | 30 |" in text
    assert "<!-- bench:start -->" in text and "<!-- bench:end -->" in text
