"""`kproxy doctor`'s plumbing, without root: exit statuses, the text and JSON output, the
JWT expiry, and every remedy a check names being a section of docs/RECOVERY.md. (The checks
themselves: tests/test_kernel_doctor.py.)"""

from __future__ import annotations

import ast
import base64
import json
from pathlib import Path

import pytest
from test_manifests import github_anchors

from kproxy.cli.flags import build_parser
from kproxy.doctor.apiserver import jwt_expiry
from kproxy.doctor.checks import CHECK_NAMES
from kproxy.doctor.result import Result, exit_status, format_json, format_text

ROOT = Path(__file__).resolve().parent.parent


def test_exit_status():
    assert exit_status([Result("a", "ok", ""), Result("b", "skipped", "")]) == 0
    assert exit_status([Result("a", "ok", ""), Result("b", "warn", "x", "forwarding")]) == 1
    assert (
        exit_status([Result("a", "warn", ""), Result("b", "fail", ""), Result("c", "ok", "")]) == 2
    )
    assert exit_status([]) == 0


def test_text_and_json_output():
    results = [
        Result("forwarding", "fail", "net.ipv4.ip_forward=0", "forwarding"),
        Result("apiserver", "skipped", "no --master", "apiserver"),
    ]
    text = format_text(results).splitlines()
    assert text[0] == (
        "fail    forwarding: net.ipv4.ip_forward=0 (see docs/RECOVERY.md#forwarding)"
    )
    assert text[1] == "skipped apiserver: no --master"  # no remedy shown for what is not wrong
    doc = json.loads(format_json(results))
    assert doc["exit"] == 2
    assert doc["checks"][0] == {
        "name": "forwarding",
        "status": "fail",
        "saw": "net.ipv4.ip_forward=0",
        "remedy": "docs/RECOVERY.md#forwarding",
    }


def test_jwt_expiry():
    def part(doc):
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    assert jwt_expiry(f"{part({'alg': 'RS256'})}.{part({'exp': 1700000000})}.sig") == 1.7e9
    assert jwt_expiry(f"{part({'alg': 'RS256'})}.{part({'sub': 'x'})}.sig") is None
    assert jwt_expiry("not-a-jwt") is None
    assert jwt_expiry("a.!!!.c") is None


def test_every_remedy_is_a_section_of_the_runbook():
    anchors = github_anchors((ROOT / "docs" / "RECOVERY.md").read_text())
    used = set()
    for path in (ROOT / "kproxy" / "doctor").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            # Result(name, status, saw, remedy), or `remedy = ...`: every string it can be.
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "remedy":
                used |= {
                    c.value
                    for c in ast.walk(node.value)
                    if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value
                }
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Result":
                if len(node.args) == 4:
                    used |= {
                        c.value
                        for c in ast.walk(node.args[3])
                        if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value
                    }
    assert len(used) == 12, used
    assert used <= anchors, used - anchors


def test_doctor_flags():
    args = build_parser().parse_args(
        ["doctor", "--output", "json", "--check", "forwarding", "--check", "last_sync"]
    )
    assert args.output == "json" and args.check == ["forwarding", "last_sync"]
    assert len(CHECK_NAMES) == 12 and len(set(CHECK_NAMES)) == 12


def test_the_images_kube_proxy_link_is_recognised(tmp_path):
    """The image links /usr/local/bin/kube-proxy to kproxy's script: the listener's process is
    then `python /usr/local/bin/kube-proxy ...` (comm kube-proxy), and must not be taken for
    another proxy (it once was: `kproxy doctor` failed every drop-in node)."""
    from kproxy.doctor.processes import Listener, runs_kproxy

    script = tmp_path / "kproxy"
    script.write_text("#!/usr/bin/python3\n")
    (tmp_path / "kube-proxy").symlink_to("kproxy")
    (tmp_path / "real-kube-proxy").write_text("")
    cmdline = f"/usr/bin/python3 {tmp_path}/kube-proxy --config=/var/lib/kube-proxy/config.conf"
    assert runs_kproxy(cmdline)
    assert Listener(10256, 7, "kube-proxy", cmdline).is_kproxy
    other = f"{tmp_path}/real-kube-proxy --config=/var/lib/kube-proxy/config.conf"
    assert not runs_kproxy(other)
    assert not Listener(10256, 8, "kube-proxy", other).is_kproxy


def test_a_daemon_without_health_or_metrics_server(tmp_path):
    """`--healthz-bind-address ""`/`--metrics-bind-address ""` (the daemon runs without that
    server): last_sync has no /healthz to ask and says so; other_proxy looks for another proxy
    on kube-proxy's own ports, and in the daemon does not take its own canary for one."""
    from kproxy.doctor import processes
    from kproxy.doctor.context import Context
    from kproxy.doctor.lastsync import last_sync
    from kproxy.doctor.result import OK, SKIPPED

    args = build_parser().parse_args(
        ["doctor", "--healthz-bind-address", "", "--metrics-bind-address="]
    )
    assert (args.healthz_bind_address, args.metrics_bind_address) == ("", "")
    ctx = Context(healthz_bind="", metrics_bind="", state_cache=str(tmp_path / "none.json"))
    result = last_sync(ctx)
    assert result.status == SKIPPED
    assert result.saw.startswith("no /healthz to ask (--healthz-bind-address is empty)")
    assert processes._ports(ctx) == {10256, 10249}
    assert processes._ports(Context(healthz_bind="", metrics_bind="127.0.0.1:0")) == {10256, 0}

    seen = {}

    def no_listeners(ports):
        seen["ports"] = ports
        return []

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(processes, "listeners", no_listeners)
        mp.setattr(processes, "_canary_present", lambda ctx: True)
        inside = processes.other_proxy(Context(healthz_bind="", metrics_bind="", own_pid=1))
        assert inside.status == OK and seen["ports"] == {10256, 10249}
        # From the command line, a canary chain with nothing listening is still worth a warn.
        assert processes.other_proxy(Context(healthz_bind="", metrics_bind="")).status != OK


def test_a_fight_over_kproxys_rules_names_another_proxy():
    """In the daemon: the drift limiter's fights. A proxy's tools (iptables-restore, nft)
    rewriting kproxy's rules is another proxy; another program fighting is a warning."""
    from kproxy.doctor.context import Context
    from kproxy.doctor.processes import other_proxy
    from kproxy.doctor.result import FAIL, WARN

    got = other_proxy(Context(fought_by=lambda: ["iptables-restor (pid 4242)"]))
    assert (got.status, got.remedy) == (FAIL, "another-proxy")
    assert "iptables-restor (pid 4242)" in got.saw
    assert other_proxy(Context(fought_by=lambda: ["nft (pid 7)"])).status == FAIL
    got = other_proxy(Context(fought_by=lambda: ["firewall-cmd (pid 9)"]))
    assert (got.status, got.remedy) == (WARN, "another-proxy")
