"""Graceful stops of long jobs: SIGTERM and SIGINT are recorded, and the job stops at its next safe point.

The handler only records the signal (no writes inside a handler: it may interrupt one) and puts the previous
handlers back, so a second signal acts as before (SIGINT raises KeyboardInterrupt, SIGTERM kills): a user who
cannot wait for the safe point is never stuck. The job checks `signum` between units of work (an optimizer step:
`potstill.train.stopping`; a cache shard: `potstill.teacher.cache.writer`) and raises `stopped(...)`, which the CLI
prints as one line, exiting with 128 + the signal.
"""

from __future__ import annotations

import signal
import threading

from potstill.errors import Stopped

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """`with StopSignals() as stop:` ... `if stop.signum: raise stop.stopped("after shard 3 (...)")`."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        self._restore()

    def stopped(self, progress: str) -> Stopped:
        """The error to raise: `progress` says what was saved (e.g. "after step 37 (saved OUT/checkpoint-37)")."""
        name = signal.Signals(self.signum).name
        return Stopped(f"stopped by {name} {progress}; rerun the same command to resume", 128 + self.signum)
