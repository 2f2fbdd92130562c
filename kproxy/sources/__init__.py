"""Where ClusterState comes from: a state file (statefile.py), the API server (kube.py), the
last-known-good cache (cache.py); the daemon's view kept up to date (store.py); a one-shot
command's read of them (oneshot.py)."""
