"""The chaos scenarios' short versions (`make chaos` runs the long ones, scripts/chaos/run.py):
each asserts that every promise held (`problems` empty) and prints its figures."""

from __future__ import annotations

import json

import pytest

from tests.chaos import scenarios

pytestmark = pytest.mark.kernel


def check(result: dict) -> None:
    print(json.dumps(result, indent=1, default=str))
    assert result["problems"] == [], json.dumps(result, indent=1, default=str)


def test_kill9_never_leaves_half_applied_tables(kernel_support):
    check(scenarios.kill9(kills=3, short=True))


@pytest.mark.parametrize("datapath", ["nft", "netlink"])
def test_kill9_mid_nft_transaction_leaves_the_old_or_the_new_table(kernel_support, datapath):
    check(scenarios.kill9_nft_apply(short=True, datapath=datapath))


def test_drift_is_repaired_and_counted(kernel_support):
    check(scenarios.drift(short=True))


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_foreign_changes_are_repaired_from_events_and_attributed(kernel_support, mode):
    check(scenarios.foreign_change(mode, short=True))


def test_api_outage_with_a_restart_keeps_traffic_and_converges(kernel_support):
    check(scenarios.api_outage(short=True))


def test_xtables_lock_held_apply_retries_without_spinning(kernel_support):
    check(scenarios.xtables_lock(short=True))


def test_gone_storm_churns_nothing(kernel_support):
    check(scenarios.gone_storm(short=True, duration=5.0))


def test_endpoint_churn_is_applied_with_bounded_memory(kernel_support):
    check(scenarios.churn(short=True))


def test_full_disk_keeps_the_previous_files(kernel_support):
    check(scenarios.full_disk(short=True))


def test_api_reconnect_backoff_stays_inside_a_sync_period():
    # The chaos API-outage run converged 24.4s after a 180s outage with a 30s sync period: the
    # watch backoff was capped at 30s (+ jitter), so a change made during the outage could land
    # later than one sync period after the API server returned.
    from kproxy.daemon.daemon import Daemon, DaemonOptions
    from kproxy.model import NodeConfig

    for period, cap in ((30.0, 24.0), (10.0, 8.0), (120.0, 30.0), (0.5, 1.0)):
        opts = DaemonOptions(
            node_name="node-1",
            config=NodeConfig(node_name="node-1"),
            servers=["http://127.0.0.1:1"],
            kubeconfig=None,
            sync_period=period,
            mode="nftables",  # no iptables detection: nothing runs at construction
            metrics_bind="127.0.0.1:0",
        )
        daemon = Daemon(opts)
        assert daemon.source.backoff_max == cap
