"""The log-step protocol: one optimizer step's telemetry, for ``fp8lab run`` and ``Monitor`` alike.

Invariant: this is the only code that decides log steps, arms the FP8 layers, calls
``fp8lab.update_scales`` around the snapshot and keeps the loss and skip counters; the
runner's variants and the ``Monitor`` each own one ``StepTelemetry`` and add only their
writers. Between log steps it makes no device-to-host copy: the counters are device
tensors, added on the device. One step:

    begin(log, whatif)   before the first forward: on a log step, arm every FP8 layer
    ... forward, backward, optimizer.step() ...
    end(loss, skip)      snapshot (log step; before row 0 rolls away) -> update_scales
                         -> counters -> on a log step, ONE device-to-host copy of the
                         snapshot, the fault counts and the counters: a ``LogRecord``
    take()               the counters outside a log step, one copy (on demand only)

Counters (device, float32): ``loss_sum`` and ``good_steps`` over the steps that were not
skipped, ``skipped`` in total, and ``consecutive_skips``, the current run of faulty steps.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from fp8lab.formats import ROLE_NAMES
from fp8lab.scaling.update import update_scales
from fp8lab.telemetry.collector import ATTENTION_TENSORS, NONFINITE, LayerStats, ScalingCollector
from fp8lab.telemetry.keys import NONFINITE as NONFINITE_GROUP
from fp8lab.telemetry.keys import Key

COUNTERS = ("loss_sum", "good_steps", "skipped", "consecutive_skips")


def check_intervals(log_interval, whatif_interval, prefix: str = "") -> None:
    """Raise ``ValueError`` naming the field (after ``prefix``, e.g. "train.") unless
    ``log_interval`` is an int >= 1 and ``whatif_interval`` is None (every log step) or a
    positive multiple of it. The one check of these intervals, for runs and Monitors."""
    if isinstance(log_interval, bool) or not isinstance(log_interval, int) or log_interval < 1:
        raise ValueError(f"{prefix}log_interval must be an int >= 1, got {log_interval!r}")
    if whatif_interval is not None and (
        isinstance(whatif_interval, bool)
        or not isinstance(whatif_interval, int)
        or whatif_interval < 1
        or whatif_interval % log_interval
    ):
        raise ValueError(
            f"{prefix}whatif_interval must be None (every log step) or a positive multiple of "
            f"{prefix}log_interval ({log_interval}), got {whatif_interval!r}"
        )


def is_log_step(step: int, log_interval: int, *, last: bool = False) -> bool:
    """Whether the optimizer step ``step`` (0-based: the steps completed before it) is a log
    step; ``last``: a run's final step always is."""
    return (step + 1) % log_interval == 0 or last


def is_whatif_step(step: int, whatif_interval: int | None) -> bool:
    """Whether a log step ``step`` also computes the what-if statistics."""
    return whatif_interval is None or (step + 1) % whatif_interval == 0


class FaultTotals:
    """Casts that met NaN or inf, per layer and role (per tensor for an FP8 attention core:
    ``faults/nonfinite_amax/<layer>.dpa/<qkv|s|o|dqkv|do|dp>``), summed over the log steps so far."""

    def __init__(self) -> None:
        self.counts: dict[Key, float] = defaultdict(float)

    def add(self, stats: LayerStats) -> None:
        """Add one log step's counts (``LayerStats.values[NONFINITE]``)."""
        for i, layer in enumerate(stats.layers):
            for r, role in enumerate(ROLE_NAMES):
                count = float(stats.values[NONFINITE][i, r])
                if count:
                    self.counts[Key(NONFINITE_GROUP, layer, role)] += count
        for core, counts in stats.attention_faults.items():  # FP8 attention: per tensor (qkv, s, o, ...)
            for tensor, count in zip(ATTENTION_TENSORS, counts):
                if count:
                    self.counts[Key(NONFINITE_GROUP, core, tensor)] += float(count)

    def scalars(self) -> dict[str, float]:
        """{"faults/nonfinite_amax/<layer>/<role>": total} of the layers/roles that had any."""
        return {key.tag: count for key, count in self.counts.items()}

    def by_layer_role(self) -> dict[str, float]:
        """{"<layer>/<role>": total}: summary.json's and the checkpoints' form."""
        return {f"{key.layer}/{key.role}": count for key, count in self.counts.items()}

    def load(self, by_layer_role: dict[str, float]) -> None:
        self.counts = defaultdict(float)
        for name, count in by_layer_role.items():
            layer, role = name.rsplit("/", 1)
            self.counts[Key(NONFINITE_GROUP, layer, role)] = count


@dataclass(frozen=True)
class LogRecord:
    """What a log step read, in its one copy: the layers' statistics, the counters since the
    previous log step ({name in COUNTERS: value}) and any extra values asked for."""

    stats: LayerStats
    counters: dict[str, float]
    extra: list[float]

    @property
    def mean_loss(self) -> float:
        """The mean loss of the good steps since the previous log step (NaN if none)."""
        c = self.counters
        return c["loss_sum"] / c["good_steps"] if c["good_steps"] else float("nan")


class StepTelemetry:
    """The log-step protocol for one model (see the module docstring).

    Args:
        model: the model with fp8lab layers (un-wrapped: the layers' own modules).
        log_interval: optimizer steps between log steps.
        whatif_interval: optimizer steps between what-if statistics (every scaling recipe's
            cast of each operand, about three extra casts each): None on every log step,
            else a positive multiple of ``log_interval``.
        group: the data-parallel process group passed to ``update_scales``.
    """

    def __init__(self, model: nn.Module, *, log_interval: int = 1, whatif_interval: int | None = None, group=None):
        check_intervals(log_interval, whatif_interval)
        self.model, self.group = model, group
        self.log_interval, self.whatif_interval = log_interval, whatif_interval
        self.collector = ScalingCollector(model)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.counters = {name: torch.zeros((), device=device) for name in COUNTERS}
        self.steps_since_take = 0  # host count
        self._log = False

    def begin(self, log: bool, whatif: bool = True) -> None:
        """Before the step's first forward: on a log step, arm the FP8 layers (host flags)."""
        self._log = log
        if log:
            self.collector.arm(whatif=whatif)

    def end(
        self,
        *,
        loss: torch.Tensor | None = None,
        skip: torch.Tensor | None = None,
        fault: torch.Tensor | None = None,
        extra: tuple[torch.Tensor, ...] = (),
    ) -> LogRecord | None:
        """After ``optimizer.step()``: update the scales and the counters; on a log step,
        return what it read (one device-to-host copy); None between log steps.

        Args:
            loss: this step's loss (a 0-dim tensor, added on the device), or None.
            skip: 0-dim bool tensor, True when the step was skipped (non-finite loss or
                gradient): ``update_scales`` then discards the step's amaxes.
            fault: 0-dim bool tensor, True when the skip is a fault (default: ``skip``); a
                skip that is loss scaling at work (an overflow at a scale above 1) is not.
            extra: 0-dim tensors to read in the same copy on a log step (e.g. the loss scale).
        """
        snapshot = self.collector.snapshot() if self._log else None  # before row 0 rolls away
        update_scales(self.model, self.group, skip=skip)
        self._count(loss, skip, fault)
        if not self._log:
            return None
        self._log = False
        counters = tuple(self.counters[name] for name in COUNTERS)
        stats, host = self.collector.read_with(snapshot, counters + tuple(extra))
        self._restart()
        return LogRecord(stats, dict(zip(COUNTERS, host)), host[len(COUNTERS) :])

    def _count(self, loss, skip, fault) -> None:
        """The device counters (no host read)."""
        c = self.counters
        if loss is not None:
            loss = loss.detach().float()
            c["loss_sum"] += loss if skip is None else torch.where(skip, 0.0, loss)
            c["good_steps"] += 1.0 if skip is None else (~skip).float()
        if skip is not None:
            fault = skip if fault is None else fault
            c["skipped"] += skip.float()
            c["consecutive_skips"] = torch.where(
                fault, c["consecutive_skips"] + 1, torch.where(skip, c["consecutive_skips"], 0.0)
            )
        self.steps_since_take += 1

    def _restart(self) -> None:
        """After the counters were read: the loss sum and good-step count start again."""
        self.counters["loss_sum"].zero_()
        self.counters["good_steps"].zero_()
        self.steps_since_take = 0

    def take(self, extra: tuple[torch.Tensor, ...] = ()) -> LogRecord:
        """The counters (and ``extra``) now, outside a log step, in one device-to-host copy;
        the loss sum and good-step count start again. Its ``stats`` are empty."""
        _, host = self.collector.read_with(None, tuple(self.counters[name] for name in COUNTERS) + tuple(extra))
        self._restart()
        return LogRecord(LayerStats.empty(), dict(zip(COUNTERS, host)), host[len(COUNTERS) :])

    def state_dict(self) -> dict:
        """Counters (device tensors, cloned) and the fault counts not yet collected."""
        return {
            "counters": {n: t.detach().clone() for n, t in self.counters.items()},
            "faults": self.collector.faults(),
            "steps_since_take": self.steps_since_take,
        }

    def load_state_dict(self, state: dict) -> None:
        for name, value in state["counters"].items():
            self.counters[name].copy_(value)
        self.collector.load_faults(state["faults"])
        self.steps_since_take = state["steps_since_take"]
