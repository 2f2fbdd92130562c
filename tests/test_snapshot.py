"""Snapshots: round trip, and every corruption or foreign content refused before applying."""

import hashlib
import os

import pytest

from kproxy.iptables.plan import owned_ruleset, plan
from kproxy.iptables.render import render
from kproxy.iptables.sync import applied_tables
from kproxy.model import NodeConfig, build_state
from kproxy.recovery.restore import SnapshotStore, latest_snapshot, read_snapshot
from kproxy.recovery.snapshot import SnapshotError, dump, parse
from tests.synthetic import generate


def families():
    state, _ = build_state(generate(5, 2))
    rs = render(state, NodeConfig(cluster_cidrs=("10.244.0.0/16",))).ruleset
    return {"IPv4": rs}


def text():
    return dump(families(), node="node-1", backend="iptables-nft", now=0)


def resign(snapshot: str, body: str) -> str:
    """A snapshot with `body` and a checksum that matches it (to reach the ownership checks)."""
    header = snapshot.split("\n")[:6]
    header[5] = f"# sha256 {hashlib.sha256(body.encode()).hexdigest()}"
    return "\n".join(header) + "\n" + body


def body_of(snapshot: str) -> str:
    return snapshot.split("\n", 6)[6]


def test_round_trip_gives_back_the_same_rules():
    snap = parse(text())
    assert snap.meta["node"] == "node-1" and snap.meta["backend"] == "iptables-nft"
    original = families()["IPv4"]
    restored = snap.families["IPv4"]
    # Applying the snapshot where the original rules are in place changes nothing...
    assert plan(restored, applied_tables(original)).empty()
    # ...and applying the original where the snapshot's are changes nothing either.
    assert plan(original, applied_tables(restored)).empty()
    assert restored.unordered[("nat", "KUBE-SERVICES")] == 1


def test_owned_view_of_live_tables_ignores_foreign_rules():
    tables = applied_tables(families()["IPv4"])
    tables["nat"].chains["DOCKER"] = ["-j RETURN"]
    tables["nat"].chains["PREROUTING"].append("-j DOCKER")
    rs = owned_ruleset(tables)
    assert "DOCKER" not in rs.tables["nat"].chains
    assert all("DOCKER" not in j.rule for j in rs.jumps)


def flip_byte(t: str) -> str:
    i = len(t) // 2
    return t[:i] + chr(ord(t[i]) ^ 1) + t[i + 1 :]


CORRUPTIONS = {
    "flipped byte": (flip_byte, "checksum mismatch"),
    "truncated": (lambda t: t[: len(t) * 2 // 3], "checksum mismatch"),
    "wrong checksum": (lambda t: t.replace("# sha256 ", "# sha256 0"), "checksum mismatch"),
    "future version": (
        lambda t: t.replace("# kproxy-snapshot 1", "# kproxy-snapshot 2"),
        "format version 2 is newer",
    ),
    "empty": (lambda t: "", "empty file"),
    "not a snapshot": (lambda t: "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n", "not a kproxy snapshot"),
    "no checksum line": (lambda t: t.replace("# sha256", "# sha1"), "no 'sha256' line"),
    "foreign chain": (
        lambda t: resign(
            t, body_of(t).replace("*nat\n", "*nat\n:EVIL - [0:0]\n-A EVIL -j ACCEPT\n")
        ),
        "chain EVIL is not kproxy's",
    ),
    "ACCEPT in INPUT": (
        lambda t: resign(t, body_of(t).replace("*filter\n", "*filter\n-A INPUT -j ACCEPT\n")),
        "rule in built-in chain INPUT jumps to ACCEPT",
    ),
    "built-in policy": (
        lambda t: resign(t, body_of(t).replace("*filter\n", "*filter\n:FORWARD DROP [0:0]\n")),
        "sets the policy of FORWARD to DROP",
    ),
    "owned chain jumping out": (
        lambda t: resign(
            t,
            body_of(t).replace(
                "-A KUBE-MARK-MASQ -j MARK",
                "-A KUBE-MARK-MASQ -j DOCKER\n-A KUBE-MARK-MASQ -j MARK",
            ),
        ),
        "jumps to DOCKER",
    ),
    "raw table": (
        lambda t: resign(t, body_of(t) + "*raw\n-A PREROUTING -j NOTRACK\nCOMMIT\n"),
        "table 'raw' is not one kproxy writes",
    ),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_is_refused_with_a_reason(name):
    change, reason = CORRUPTIONS[name]
    with pytest.raises(SnapshotError) as err:
        parse(change(text()))
    assert reason in str(err.value)
    assert "\n" not in str(err.value)


def test_a_directory_or_missing_file_is_refused(tmp_path):
    with pytest.raises(SnapshotError, match="is a directory"):
        read_snapshot(tmp_path)
    with pytest.raises(SnapshotError, match="cannot read"):
        read_snapshot(tmp_path / "nope")


def test_store_keeps_the_newest_and_latest_skips_corrupted(tmp_path):
    store = SnapshotStore(tmp_path, keep=3)
    paths = []
    for i in range(5):
        state, _ = build_state(generate(2 + i, 1))
        rs = render(state, NodeConfig()).ruleset
        path = store.save({"IPv4": rs}, "node-1", "iptables-nft")
        os.utime(path, (1000 + i, 1000 + i))
        paths.append(path)
    # An unchanged ruleset writes nothing.
    assert store.save({"IPv4": rs}, "node-1", "iptables-nft") is None
    kept = sorted(tmp_path.glob("*.snapshot"))
    assert kept == sorted(paths[2:])
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in kept)
    newest, snap = latest_snapshot(tmp_path)
    assert newest == paths[4]
    # The newest is corrupted: the one before it is taken instead.
    paths[4].write_text(flip_byte(paths[4].read_text()))
    os.utime(paths[4], (1004, 1004))
    assert latest_snapshot(tmp_path)[0] == paths[3]
    for p in paths[2:4]:
        p.write_text("garbage")
    with pytest.raises(SnapshotError, match="no valid snapshot"):
        latest_snapshot(tmp_path)


NFT_TABLE = """table ip kproxy {
	comment "rules for kproxy"
	chain nat-prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		jump services
	}

	chain services {
	}
}"""


def test_nftables_table_round_trip_and_checks():
    good = dump({}, node="n", backend="iptables-nft", nft={"ip": NFT_TABLE})
    snap = parse(good)
    assert set(snap.nft) == {"ip"} and "nat-prerouting" in snap.nft["ip"].chains
    bad_policy = dump({}, "n", "x", nft={"ip": NFT_TABLE.replace("policy accept", "policy drop")})
    with pytest.raises(SnapshotError, match="policy other than accept"):
        parse(bad_policy)
    foreign = dump({}, "n", "x", nft={"ip": NFT_TABLE.replace("table ip kproxy", "table ip nat")})
    with pytest.raises(SnapshotError, match="exactly the table ip kproxy"):
        parse(foreign)
    hooked = dump({}, "n", "x", nft={"ip": NFT_TABLE.replace("nat-prerouting", "sneaky")})
    with pytest.raises(SnapshotError, match="base chain sneaky"):
        parse(hooked)
