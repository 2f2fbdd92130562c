"""`kproxy doctor`: checks of the node's own network that break Services outside the proxy
(kproxy/doctor/checks.py lists them, in the order they are printed). Every check inspects the
node it runs on, in the current network namespace, and returns a Result
(kproxy/doctor/result.py); cli/commands.py prints them, daemon/nodecheck.py exports them as
kproxy_node_check."""
