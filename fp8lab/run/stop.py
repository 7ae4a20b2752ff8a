"""Stopping a run on request: SIGTERM (what clusters send before pre-emption) and Ctrl-C.

Invariant: a signal never interrupts a step; it only sets a flag that the runner reads
between steps, after which it writes a checkpoint and exits with 128 + the signal number.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class StopRequest:
    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @contextlib.contextmanager
    def installed(self):
        """Catch SIGTERM and SIGINT while the block runs (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum, frame):
            self.signum = signum

        for s in previous:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""
