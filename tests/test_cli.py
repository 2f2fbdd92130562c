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
