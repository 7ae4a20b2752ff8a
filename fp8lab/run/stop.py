"""Stopping a run on request: SIGTERM (what clusters send before pre-emption), Ctrl-C
(SIGINT) and SIGHUP (the terminal closed).

Invariant: a signal never interrupts a step; it only sets a flag that the runner reads
between steps, after which it writes a checkpoint and exits with 128 + the signal number.
A signal during the final checkpoint and summary lets them finish. Before training starts
(recipe, validation, model building: nothing written yet) a signal interrupts at once
through ``StopBeforeStart``, so a hanging recipe can still be stopped. The ``fp8lab run``
command installs the flag before anything else and, when it is the process's own command,
keeps it until the process exits: no moment of a run leaves a signal's default action
(death without a message) in place.
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopRequest:
    """The first of ``SIGNALS`` received while installed (falsy until one arrives)."""

    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @contextlib.contextmanager
    def installed(self, *, until_exit: bool = False):
        """Catch ``SIGNALS`` while the block runs (main thread only).

        Args:
            until_exit: leave the handler in place after the block (the caller is the
                process's command, and what follows the block is only the process's exit:
                a signal then is recorded and the exit code stays the run's).
        """
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.signum is None:  # the first one names the stop
                self.signum = signum

        previous = {s: signal.signal(s, handler) for s in SIGNALS}
        try:
            yield self
        finally:
            if not until_exit:
                for s, h in previous.items():
                    signal.signal(s, h)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class StopBeforeStart(BaseException):
    """One of ``SIGNALS`` arrived before training started; nothing was written.

    A BaseException (like KeyboardInterrupt), so no ``except Exception`` swallows it.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"{signal.Signals(self.signum).name} received before training started; nothing was written"


@contextlib.contextmanager
def stop_before_start():
    """While the block runs, ``SIGNALS`` raise ``StopBeforeStart`` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise StopBeforeStart(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
