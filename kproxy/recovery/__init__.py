"""When things break: the snapshot format (snapshot.py, pure), snapshots taken and put back
(restore.py), `kproxy cleanup` (cleanup.py), the lock every writer holds (lockfile.py),
files written whole or not at all (fileio.py)."""
