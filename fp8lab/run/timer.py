"""Step timing without host syncs between log steps.

Invariant: on CUDA a step is timed by a pair of events and read only when the runner asks
(``take``, at log and checkpoint steps: a sync by design); on CPU by the host clock. The
time and step count travel in checkpoints, so the first interval after a resume divides
the tokens of the steps it timed by the time they took.
"""

from __future__ import annotations

import contextlib
import time

import torch


class StepTimer:
    """Accumulates step time and the number of timed steps between log steps without
    syncing (events on CUDA). Both travel in checkpoints, so the first interval after a
    resume divides the tokens of the steps it timed by the time they took."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list[tuple] = []
        self.seconds = 0.0
        self.steps = 0

    @contextlib.contextmanager
    def measure(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - t0
        self.steps += 1

    def _fold(self) -> None:
        if self.cuda:  # a sync: log and checkpoint steps only
            torch.cuda.synchronize()
            self.seconds += sum(s.elapsed_time(e) for s, e in self.events) / 1e3
            self.events.clear()

    def take(self) -> tuple[float, int]:
        """(seconds, steps) timed since the last take (syncs on CUDA: call at log steps only)."""
        self._fold()
        taken = (self.seconds, self.steps)
        self.seconds, self.steps = 0.0, 0
        return taken

    def state_dict(self) -> dict:
        self._fold()
        return {"seconds": self.seconds, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.seconds, self.steps = float(state["seconds"]), int(state["steps"])
