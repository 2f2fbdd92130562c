"""Every command, given each kind of bad start-up input, says so in one line and exits 2: no
Python traceback (issue 18.1). Each runs in a network namespace of its own, so a command
that wrongly went ahead could only touch that namespace; its files are the test's own."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests import netns

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parent.parent
NO_DIR = "/nonexistent-kproxy-test-dir"
MASTER = ["--master", "http://127.0.0.1:1"]  # nothing listens there: the daemon would wait

# (id, command line, a word the error line must hold). {tmp} is the test's directory; every
# command gets the test's own lock file, state cache and snapshot directory unless it sets one.
CASES = [
    ("run-no-config", ["run"], "--kubeconfig"),
    ("run-missing-kubeconfig", ["run", "--kubeconfig", "{tmp}/nope.conf"], "nope.conf"),
    ("run-invalid-kubeconfig", ["run", "--kubeconfig", "{tmp}/garbage.conf"], "garbage.conf"),
    ("run-bad-bind", ["run", *MASTER, "--metrics-bind-address", "nonsense:1"], "nonsense"),
    ("run-foreign-bind", ["run", *MASTER, "--healthz-bind-address", "10.9.9.9:1"], "10.9.9.9"),
    ("run-lock-dir", ["run", *MASTER, "--lock-file", f"{NO_DIR}/lock"], NO_DIR),
    ("sync-no-config", ["sync", "--no-cache-fallback"], "--kubeconfig"),
    ("sync-invalid-kubeconfig", ["sync", "--kubeconfig", "{tmp}/garbage.conf"], "garbage"),
    ("sync-missing-state", ["sync", "--state", "{tmp}/nope.yaml"], "nope.yaml"),
    ("sync-lock-dir", ["sync", "--state", "{tmp}/ok.yaml", "--lock-file", f"{NO_DIR}/l"], NO_DIR),
    ("diff-missing-state", ["diff", "--state", "{tmp}/nope.yaml"], "nope.yaml"),
    ("diff-no-config", ["diff", "--kubeconfig", "{tmp}/nope.conf"], "nope.conf"),
    (
        "trace-missing-state",
        ["trace", "--state", "{tmp}/nope.yaml", "--src", "10.0.0.1", "--dst", "10.96.0.1"]
        + ["--dport", "80"],
        "nope.yaml",
    ),
    ("snapshot-out-dir", ["snapshot", "--out", f"{NO_DIR}/snap"], NO_DIR),
    ("snapshot-lock-dir", ["snapshot", "--out", "{tmp}/s", "--lock-file", f"{NO_DIR}/l"], NO_DIR),
    ("restore-missing", ["restore", "{tmp}/nope.snapshot"], "nope.snapshot"),
    ("restore-garbage", ["restore", "{tmp}/garbage.conf"], "garbage.conf"),
    ("restore-latest-none", ["restore", "--latest", "--snapshot-dir", "{tmp}/none"], "none"),
    ("cleanup-lock-dir", ["cleanup", "--lock-file", f"{NO_DIR}/l"], NO_DIR),
]


@pytest.fixture(scope="module")
def node(kernel_support):
    topo = netns.build(pods=(), clients=0)
    try:
        yield topo.node
    finally:
        topo.close()


@pytest.mark.parametrize("argv,word", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_start_up_input_is_one_line_and_exit_2(node, tmp_path, argv, word):
    (tmp_path / "garbage.conf").write_text("this: [is not\n a kubeconfig nor a snapshot\n")
    (tmp_path / "ok.yaml").write_text("kind: List\nitems: []\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    own = {
        "--lock-file": str(tmp_path / "lock"),
        "--state-cache": str(tmp_path / "state.json"),
        "--snapshot-dir": str(tmp_path / "snapshots"),
    }
    accepted = {
        "run": own,
        "sync": own,
        "diff": own,
        "snapshot": ["--lock-file"],
        "restore": ["--lock-file"],
        "cleanup": ["--lock-file"],
    }.get(argv[0], [])
    for flag in accepted:
        if flag not in argv and not (flag == "--snapshot-dir" and argv[0] != "run"):
            argv += [flag, own[flag]]
    # No kubeconfig anywhere: not in a pod, and a HOME without ~/.kube.
    env = ["env", "-u", "KUBECONFIG", "-u", "KUBERNETES_SERVICE_HOST", f"HOME={tmp_path}"]
    res = netns.run(
        node,
        [*env, f"PYTHONPATH={ROOT}", sys.executable, "-m", "kproxy", *argv],
        check=False,
        timeout=60,
    )
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    assert res.returncode == 2, out
    lines = res.stderr.strip().splitlines()
    assert lines, out
    # argparse's own errors print the usage line first; everything else is one line.
    if not lines[0].startswith("usage:"):
        assert len(lines) == 1, out
    assert word in lines[-1], out
