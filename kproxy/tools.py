"""Running the tools that program the kernel, for both modes: a payload streamed to a
command's stdin, the first line of what it said, the payload lines around the one its error
names; and the benchmarks' switch to keep every payload sent."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import deque
from collections.abc import Callable, Iterable

# Keep the text of every payload sent in the sync's `sent` (benchmarks replay it with the bare
# tool); off by default: a whole 10k-Service table is 37 MB of text.
RECORD_PAYLOADS = False

# The tools this process started last (iptables-restore, nft): nf_tables names the task that
# committed each change, and the drift watch must tell kproxy's own commits from other
# processes' (kproxy.daemon.driftwatch).
_STARTED: deque[int] = deque(maxlen=256)


def started(pid: int) -> None:
    """Remember a tool started to change the kernel (before it is given its input)."""
    _STARTED.append(pid)


# The netlink ports of kproxy's own nf_tables sockets, lately (see own_task).
_PORTS: deque[int] = deque(maxlen=256)


def own_socket(portid: int) -> None:
    """Remember the port id of a netlink socket kproxy commits through."""
    _PORTS.append(portid)


def own_task(pid: int, portid: int = 0) -> bool:
    """Whether the task that committed a change is kproxy's: one of this process's threads
    (netlink batches), or one of the tools it started lately.

    The kernel names the task by its id in the outermost pid namespace (task_pid_nr). In a pod
    without hostPID kproxy sees other ids, so the committing socket's netlink port is compared
    too: kproxy's own sockets', and a tool's, which binds to its own pid (as kproxy sees it)."""
    if pid in _STARTED or os.path.exists(f"/proc/self/task/{pid}"):
        return True
    return portid != 0 and (portid in _PORTS or portid in _STARTED)


def stream_to(argv: list[str], payload: str | Callable[[], Iterable[str]]) -> tuple[int, str]:
    """Run argv with `payload` (or its pieces, written as they are made) on stdin; (exit
    status, stderr)."""
    pieces = [payload] if isinstance(payload, str) else payload()
    # stderr to a file: a tool that fails early and writes much must not block our writes.
    with tempfile.TemporaryFile() as errfile:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errfile
        )
        started(proc.pid)  # before it reads anything, so before it can commit
        assert proc.stdin is not None
        try:
            with proc.stdin:
                for piece in pieces:
                    proc.stdin.write(piece.encode())
        except BrokenPipeError:
            pass  # the tool stopped reading (an error): its exit status and stderr tell
        returncode = proc.wait()
        errfile.seek(0)
        return returncode, errfile.read().decode(errors="replace")


def first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


def failing_context(
    payload: str | Iterable[str], stderr: str, pattern: str = r"line:? (\d+)"
) -> str:
    """The payload lines around the one the tool's error names (as upstream logs them);
    `pattern` finds the line number in the error. `payload` may be an iterable of lines (an
    open file): only the lines shown are kept."""
    m = re.search(pattern, stderr)
    if not m:
        return ""
    n = int(m.group(1))
    lines = payload.splitlines() if isinstance(payload, str) else payload
    shown = []
    for i, line in enumerate(lines, 1):
        if i > n + 3:
            break
        if i >= n - 3:
            shown.append(f"{i:6d}{'>' if i == n else ' '} {line.rstrip(chr(10))}")
    return "\n".join(shown)
