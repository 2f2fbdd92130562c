"""iptables mode, in kube-proxy's chain layout (upstream's pkg/proxy/iptables).

render.py (ClusterState -> RuleSet), rules.py (tables, chains, rules; iptables-save/-restore
text), plan.py (desired vs the kernel's tables -> the smallest change): pure. restore.py runs
iptables-save/-restore (backend variant, xtables lock), foreign_watch.py sees other tools'
changes during a whole-table restore, sync.py is one family's sync, trace.py follows a
packet through the rules, mode.py is the Mode (kproxy/mode.py) the reconciler drives.
Nothing here imports kproxy.nftables (tests/test_layout.py).
"""
