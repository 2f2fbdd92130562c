"""The command line outside the kernel: version, help, usage and input errors (the kernel is
never reached for these)."""

import subprocess
import sys

import pytest

from kproxy import __version__


def kproxy(*args):
    return subprocess.run(
        [sys.executable, "-m", "kproxy", *args], capture_output=True, text=True, timeout=60
    )


def test_version():
    res = kproxy("--version")
    assert res.returncode == 0
    assert res.stdout.strip() == f"kproxy {__version__}"


@pytest.mark.parametrize("command", [[], ["sync"], ["diff"]])
def test_help_on_every_command(command):
    res = kproxy(*command, "--help")
    assert res.returncode == 0
    assert "usage: kproxy" in res.stdout
    if command:
        assert "--state" in res.stdout and "--cluster-cidr" in res.stdout


@pytest.mark.parametrize("command", ["sync", "diff"])
def test_missing_file_is_one_line_error_exit_2(command, tmp_path):
    res = kproxy(command, "--state", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "cannot read state file" in lines[0] and "nope.yaml" in lines[0]


def test_broken_yaml_is_one_line_error_exit_2(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("kind: List\nitems:\n  - {kind: Service\n")
    res = kproxy("sync", "--state", str(path))
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1
    assert "cannot parse state file" in res.stderr


def test_bad_cidr_is_a_usage_error(tmp_path):
    res = kproxy("sync", "--state", "x.yaml", "--cluster-cidr", "10.0.0.0/33")
    assert res.returncode == 2
    assert "is not a CIDR" in res.stderr


def test_trace_from_a_state_file(tmp_path):
    state = tmp_path / "s.yaml"
    state.write_text(
        """
kind: List
items:
- kind: Service
  metadata: {name: web, namespace: default}
  spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
- kind: EndpointSlice
  metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  ports: [{name: http, port: 8080}]
  endpoints: [{addresses: [10.244.1.2]}, {addresses: [10.244.1.3]}]
"""
    )
    res = kproxy(
        "trace",
        "--state",
        str(state),
        "--cluster-cidr",
        "10.244.0.0/16",
        "--src",
        "10.244.1.9",
        "--dst",
        "10.96.0.10",
        "--dport",
        "80",
    )
    assert res.returncode == 0, res.stderr
    assert "(from a pod)" in res.stdout
    assert res.stdout.count("50.00%  ACCEPT DNAT to 10.244.1.") == 2
    assert "source kept" in res.stdout
    res = kproxy("trace", "--src", "10.0.0.1", "--dst", "10.96.0.10", "--dport", "80")
    assert res.returncode == 2 and "--state FILE or --live" in res.stderr


def test_json_log_format_is_one_object_per_line():
    import json
    import logging

    from kproxy.cli.main import _JsonFormatter

    record = logging.LogRecord(
        "kproxy.daemon.reconciler", logging.WARNING, __file__, 1, 'synced "x"\nnext', None, None
    )
    line = _JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "warning" and entry["msg"] == 'synced "x"\nnext'
    assert entry["logger"] == "kproxy.daemon.reconciler" and entry["ts"].endswith("Z")


def test_durations_are_spelled_as_kube_proxy_spells_them():
    from kproxy.cli.flags import _duration

    assert _duration("30s") == 30 and _duration("1m") == 60 and _duration("500ms") == 0.5
    assert _duration("1h30m") == 5400 and _duration("2.5") == 2.5
    with pytest.raises(Exception, match="not a duration"):
        _duration("10 parsecs")
