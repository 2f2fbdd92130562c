"""The daemon's watch of nf_tables events: other processes' changes to kproxy's rules, handed
to the reconciler as they are committed (issue 16).

A thread subscribes in the daemon's own network namespace (kproxy.daemon.nfevents) and
sleeps in the kernel until a transaction is committed. Transactions that touch nothing of any
family's rules, and those kproxy's own threads committed, are dropped here; the rest, and any
loss of events, go to Reconciler.foreign_change, which decides in its own thread whether a
tool kproxy started made them (it started them there) and repairs what they changed.

Where the backend has no events (iptables-legacy), nothing is watched: the canaries and the
periodic verify find drift, and the log says so once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from kproxy import tools
from kproxy.daemon.nfevents import NfEventWatcher, Overflow, Transaction
from kproxy.daemon.reconciler import Reconciler
from kproxy.mode import Mode

log = logging.getLogger(__name__)


class DriftWatch:
    def __init__(self, reconciler: Reconciler, families: Sequence[Mode]) -> None:
        self.reconciler = reconciler
        self.families = [fam for fam in families if fam.drift_events]
        self._watcher: NfEventWatcher | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> bool:
        """Subscribe and start the thread; False (logged once) where drift is polled."""
        if not self.families:
            log.info(
                "drift detection is polling: the iptables legacy backend sends no change "
                "events (canaries every --canary-interval, a verify every sync period)"
            )
            return False
        try:
            self._watcher = NfEventWatcher()
        except OSError as err:
            log.warning("nf_tables events unavailable (%s): drift detection is polling", err)
            return False
        self._thread = threading.Thread(target=self._run, name="nf-events", daemon=True)
        self._thread.start()
        return True

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.wake()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    def _run(self) -> None:
        assert self._watcher is not None
        # The kernel's name for the thread too, so `top -H` (and a test) can tell it apart.
        with contextlib.suppress(OSError):
            Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text("nf-events")
        while not self._stop.is_set():
            try:
                for item in self._watcher.read(timeout=None):
                    self._hand_over(item)
            except Exception as err:  # a parse error must not end the watch
                if self._stop.is_set():
                    return
                log.error("nf_tables event watch: %s: %s", type(err).__name__, err)
                # What that read held is unknown: verified whole (limited like a fight).
                self.reconciler.foreign_change(Overflow())
                self._stop.wait(1.0)

    def _hand_over(self, item: Transaction | Overflow) -> None:
        if isinstance(item, Overflow):
            self.reconciler.foreign_change(item)
            return
        if tools.own_task(item.pid, item.portid):  # kproxy's threads, sockets, tools
            return
        if any(fam.drift_scope(item.changes) for fam in self.families):
            self.reconciler.foreign_change(item)
