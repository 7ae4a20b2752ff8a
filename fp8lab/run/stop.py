"""Stopping a run on request: SIGTERM (what clusters send before pre-emption) and Ctrl-C.

Invariant: a signal never interrupts a step; it only sets a flag that the runner reads
between steps, after which it writes a checkpoint and exits with 128 + the signal number.
A signal during the final checkpoint and summary lets them finish. Before training starts
(recipe, validation, model building: nothing written yet) a signal interrupts at once
through ``StopBeforeStart``, so a hanging recipe can still be stopped.
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


class StopBeforeStart(BaseException):
    """SIGTERM or SIGINT arrived before training started; nothing was written.

    A BaseException (like KeyboardInterrupt), so no ``except Exception`` swallows it.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"{signal.Signals(self.signum).name} received before training started; nothing was written"


@contextlib.contextmanager
def stop_before_start():
    """While the block runs, SIGTERM and SIGINT raise ``StopBeforeStart`` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise StopBeforeStart(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
