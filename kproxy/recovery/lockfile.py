"""One kproxy writer at a time: an advisory lock on a file (flock), with a clear message.

`kproxy sync`, `restore` and `cleanup` hold it for their whole run, the daemon for each apply,
so two of them never interleave their changes to the kernel.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_LOCK_FILE = "/run/kproxy.lock"


class LockHeld(Exception):
    """Another process holds the lock; str() says which and what to do."""


@contextmanager
def locked(path: str, timeout: float = 5.0, what: str = "kproxy") -> Iterator[None]:
    """Hold the lock on `path` for the block; wait at most `timeout` seconds for it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    raise LockHeld(
                        f"another kproxy command (pid {holder}) holds {path}; {what} not run "
                        "— wait for it to finish, or pass --lock-file for a separate lock"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock
