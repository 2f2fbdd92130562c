"""`kproxy run`: daemon.py puts the API source, the store, the reconciler (reconciler.py),
health (health.py), metrics (metrics.py), conntrack cleanup (conntrack.py) and the state
cache writer (cachewriter.py) together."""
