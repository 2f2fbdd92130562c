"""nftables mode: one `kproxy` table per family (upstream's pkg/proxy/nftables).

render.py (ClusterState -> NftTable), table.py (the table model and `nft list` parser),
plan.py (the smallest transaction between two tables): pure. nft.py runs the `nft` binary
(the table's I/O: read, apply, exists, delete); another datapath (netlink) goes beside it
with the same methods. sync.py is one family's sync, trace.py follows a packet through the
table, mode.py is the Mode (kproxy/mode.py) the reconciler drives. Nothing here imports
kproxy.iptables (tests/test_layout.py).
"""
