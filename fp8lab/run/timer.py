"""Step timing without host syncs between log steps.

Invariant: on CUDA a step is timed by a pair of events and read only when the runner asks
(``take``, at log and checkpoint steps: a sync by design); on CPU by the host clock.
Training steps and log steps (which also compute the telemetry: cast statistics, shadow
GEMMs, what-if casts) are timed apart, so throughput says what training costs and the log
steps' own cost is reported beside it. The times and step counts travel in checkpoints, so
the first interval after a resume divides the tokens of the steps it timed by the time
they took.
"""

from __future__ import annotations

import contextlib
import time

import torch

KINDS = ("train", "log")


class StepTimer:
    """Accumulates, per kind of step ("train" or "log"), the time and the number of timed
    steps since the last ``take``, without syncing (events on CUDA)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: dict[str, list[tuple]] = {kind: [] for kind in KINDS}
        self.seconds = dict.fromkeys(KINDS, 0.0)
        self.steps = dict.fromkeys(KINDS, 0)

    @contextlib.contextmanager
    def measure(self, log: bool = False):
        kind = "log" if log else "train"
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events[kind].append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.seconds[kind] += time.perf_counter() - t0
        self.steps[kind] += 1

    def _fold(self) -> None:
        if self.cuda and any(self.events.values()):  # a sync: log and checkpoint steps only
            torch.cuda.synchronize()
            for kind, events in self.events.items():
                self.seconds[kind] += sum(s.elapsed_time(e) for s, e in events) / 1e3
                events.clear()

    def take(self) -> dict[str, tuple[float, int]]:
        """{kind: (seconds, steps)} timed since the last take (syncs on CUDA: call at log steps only)."""
        self._fold()
        taken = {kind: (self.seconds[kind], self.steps[kind]) for kind in KINDS}
        self.seconds, self.steps = dict.fromkeys(KINDS, 0.0), dict.fromkeys(KINDS, 0)
        return taken

    def state_dict(self) -> dict:
        self._fold()
        return {
            "seconds": self.seconds["train"],
            "steps": self.steps["train"],
            "log_seconds": self.seconds["log"],
            "log_steps": self.steps["log"],
        }

    def load_state_dict(self, state: dict) -> None:
        self.seconds = {"train": float(state["seconds"]), "log": float(state.get("log_seconds", 0.0))}
        self.steps = {"train": int(state["steps"]), "log": int(state.get("log_steps", 0))}
