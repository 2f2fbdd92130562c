"""The command line outside the kernel: version, help, usage and input errors (the kernel is
never reached for these)."""

import re
import subprocess
import sys
import threading

import pytest

from kproxy import __version__
from kproxy.recovery.lockfile import locked


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


@pytest.fixture
def held_lock(tmp_path):
    """A lock file held (as the daemon holds it) for the test's duration."""
    path = tmp_path / "kproxy.lock"
    holding, release = threading.Event(), threading.Event()

    def hold():
        with locked(str(path), command="kproxy run"):
            holding.set()
            release.wait(120)

    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(10)
    yield path
    release.set()
    thread.join()


@pytest.mark.parametrize(
    "args",
    [
        ["sync", "--state", "{tmp}/nope.yaml"],
        ["restore", "{tmp}/nope.snap"],
        ["snapshot", "--out", "{tmp}/no-such-dir/snap"],
    ],
)
def test_missing_input_is_reported_before_waiting_for_a_held_lock(args, tmp_path, held_lock):
    # The lock is held and the wait long: a missing input must be reported as missing, at
    # once, never as a held lock (the kernel is never reached: the command stops first).
    args = [a.format(tmp=tmp_path) for a in args]
    res = kproxy(*args, "--lock-file", str(held_lock), "--lock-wait", "100s")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "nope" in lines[0] or "no-such-dir" in lines[0]
    assert "holds" not in lines[0] and "waiting" not in lines[0]


def test_lock_wait_is_a_duration_flag_with_a_default():
    res = kproxy("sync", "--help")
    assert "--lock-wait DURATION" in res.stdout and "120s" in res.stdout
    res = kproxy("sync", "--state", "x.yaml", "--lock-wait", "soon")
    assert res.returncode == 2 and "is not a duration" in res.stderr


RUN_GROUPS = {
    "API server": {"--kubeconfig", "--master", "--api-timeout", "--api-wait", "--node-name"},
    "modes and iptables": {
        "--mode",
        "--cluster-cidr",
        "--masquerade-all",
        "--iptables-masquerade-bit",
        "--node-ip",
        "--nodeport-addresses",
        "--iptables-localhost-nodeports",
        "--iptables-backend",
        "--iptables-sync-period",
        "--iptables-min-sync-period",
        "--canary-interval",
        "--conntrack-cleanup",
    },
    "nftables": set(),
    "health and metrics": {"--metrics-bind-address", "--healthz-bind-address"},
    "recovery": {
        "--state-cache",
        "--no-cache-fallback",
        "--state-cache-max-age",
        "--snapshot-dir",
        "--snapshot-keep",
        "--lock-file",
    },
    "logging": {"--verbose", "--log-format"},
    "kube-proxy's own flags": {
        "--config",
        "--v",
        "--feature-gates",
        "--oom-score-adj",
        "--bind-address",
        "--cleanup",
        "--logging-format",
        "--conntrack-max-per-core",
        "--ipvs-scheduler",
        "--kube-api-qps",
        "--write-config-to",
    },
}


def help_sections(text: str) -> dict[str, dict[str, str]]:
    """`--help` output -> {section title: {each long flag of an entry: the entry's text}}. A
    group's description is the paragraph between its title and a blank line."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
            blocks[current] = []
        elif current is not None:
            blocks[current].append(line)
    sections: dict[str, dict[str, str]] = {}
    for title, lines in blocks.items():
        while lines and not lines[-1].strip():
            lines.pop()
        if lines and not lines[0].startswith("  -"):  # a description, then any options
            lines = lines[lines.index("") + 1 :] if "" in lines else []
        entries: list[list[str]] = []
        for line in lines:
            if line.startswith("  -"):
                entries.append([line])
            elif entries:
                entries[-1].append(line)
        sections[title] = {}
        for entry in entries:
            invocation = entry[0].strip().split("  ")[0]
            for flag in re.findall(r"(?<![\w-])(--[a-z0-9-]+)", invocation):
                sections[title][flag] = " ".join(" ".join(entry).split())
    return sections


def test_run_help_is_grouped_as_kube_proxy_documents_it_and_gives_every_default():
    res = kproxy("run", "--help")
    assert res.returncode == 0
    sections = help_sections(res.stdout)
    titles = [t for t in sections if t in RUN_GROUPS]
    assert titles == list(RUN_GROUPS), list(sections)
    for title, flags in RUN_GROUPS.items():
        assert flags <= set(sections[title]), (title, sorted(flags - set(sections[title])))
    for title, entries in sections.items():
        for flag, entry in entries.items():
            if flag != "--help":
                assert "default" in entry, f"{title}: {flag} gives no default: {entry}"
