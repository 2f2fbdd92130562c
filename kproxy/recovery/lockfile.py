"""One kproxy writer at a time: an advisory lock on a file (flock), with a clear message.

`kproxy sync`, `restore` and `cleanup` hold it for their whole run, the daemon for each apply,
so two of them never interleave their changes to the kernel. The holder writes its pid and
command into the file, so whoever waits can say for whom.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

DEFAULT_LOCK_FILE = "/run/kproxy.lock"
# A one-shot command's default wait: the daemon holds the lock for a whole full sync, ~26 s at
# 10k Services in iptables mode and ~80 s in nftables mode (BENCHMARKS.md), so an operator's
# `kproxy sync` during an incident outlasts it instead of failing.
DEFAULT_LOCK_WAIT = 120.0


class LockError(Exception):
    """The lock cannot be had; str() says why and what to do."""


class LockHeld(LockError):
    """Another process holds the lock; str() says which and what to do."""


def open_lock_file(path: str) -> int:
    """The lock file's descriptor (created if need be); LockError naming it when it cannot be
    opened (a missing directory, no permission)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise LockError(
            f"cannot open the lock file {path}: {err.strerror or err}; pass --lock-file"
        ) from None


def holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it: "pid 123, kproxy sync" ("unknown" when the
    file is empty: an older kproxy, or a holder between open and write)."""
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    pid, _, command = text.partition(" ")
    if not pid:
        return "pid unknown"
    return f"pid {pid}, {command}" if command else f"pid {pid}"


@contextmanager
def locked(
    path: str,
    timeout: float = 5.0,
    what: str = "kproxy",
    on_wait: Callable[[str], None] | None = None,
    command: str | None = None,
) -> Iterator[None]:
    """Hold the lock on `path` for the block; wait at most `timeout` seconds for it.

    `on_wait(holder)` is called once when the lock is taken and waiting begins; `command` is
    what this process writes beside its pid for others to see (default "kproxy <what>")."""
    fd = open_lock_file(path)
    try:
        deadline = time.monotonic() + timeout
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if not waiting and on_wait is not None and timeout > 0:
                    on_wait(holder(fd))
                waiting = True
                if time.monotonic() >= deadline:
                    raise LockHeld(
                        f"another kproxy command ({holder(fd)}) holds {path}"
                        + (f" after {timeout:g}s" if timeout > 0 else "")
                        + f"; {what} not run — wait for it to finish, pass a longer "
                        "--lock-wait, or --lock-file for a separate lock"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command or 'kproxy ' + what}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock
