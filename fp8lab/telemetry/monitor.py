"""Monitor: the recipes' FP8 telemetry for any training loop (plain PyTorch, HF Trainer, Lightning).

Invariant: the same rule as the recipes. Between log steps the monitor does only host
bookkeeping and on-device adds (the loss and skip counters) and calls
``fp8lab.update_scales``; it never reads a device tensor. On a log step it arms every FP8
layer's telemetry slot before the forward (``begin_step``), snapshots the scaling before
``update_scales`` rolls row 0 away and reads everything in one copy (``end_step``), then
writes the recipes' tags to one TensorBoard run folder:

    scaling/<layer>/<role>/<stat>        accuracy/<layer>/<fprop|dgrad|wgrad>_sqnr_db
    faults/nonfinite_amax/<layer>/<role> faults/skipped_steps faults/consecutive_skips
    loss/train (if given)
    accuracy/<layer>/weight_rel_diff (with a BF16 ``reference`` model)
    amax_history/<layer>/<role> (histograms)   overview/scaling (heatmap image)

plus the Custom Scalars layout and the layer table (Text) once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fp8lab.formats import ROLE_NAMES
from fp8lab.scaling.update import update_scales
from fp8lab.telemetry.accuracy import WeightDrift
from fp8lab.telemetry.collector import NONFINITE, ScalingCollector
from fp8lab.telemetry.overview import ScalingOverview
from fp8lab.telemetry.tensorboard import VariantWriter


class Monitor:
    """FP8 scaling, accuracy and fault telemetry of ``model`` for a loop you own.

    Call ``begin_step()`` before the forward of each optimizer step and ``end_step()``
    after ``optimizer.step()``, in place of ``fp8lab.update_scales(model)`` (it calls it).
    With gradient accumulation, call each once per optimizer step.

    Args:
        model: the model with fp8lab layers (converted or built).
        log_dir: the TensorBoard run folder to write (e.g. ``logs/my_run/fp8``).
        log_interval: optimizer steps between log steps (the recipes' ``train.log_interval``).
        reference: optionally, the BF16 twin trained on the same batches from the same
            initial weights; adds ``accuracy/<layer>/weight_rel_diff``.
        histogram_interval: optimizer steps between amax-history histograms (a multiple
            of ``log_interval`` to land on log steps).
        whatif_interval: optimizer steps between what-if statistics (every scaling
            recipe's cast of each operand, about three extra casts each): None on every
            log step, else a multiple of ``log_interval``.
        group: the data-parallel process group passed to ``update_scales``.
    """

    def __init__(self, model: nn.Module, log_dir: str | Path, *, log_interval: int = 10,
                 reference: nn.Module | None = None, histogram_interval: int = 100,
                 whatif_interval: int | None = None, group=None):
        if isinstance(log_interval, bool) or not isinstance(log_interval, int) or log_interval < 1:
            raise ValueError(f"log_interval must be an int >= 1, got {log_interval!r}")
        if whatif_interval is not None and (isinstance(whatif_interval, bool) or not isinstance(whatif_interval, int)
                                            or whatif_interval < 1 or whatif_interval % log_interval):
            raise ValueError(f"whatif_interval must be None (every log step) or a positive multiple of "
                             f"log_interval ({log_interval}), got {whatif_interval!r}")
        self.whatif_interval = whatif_interval
        self.model, self.log_interval, self.histogram_interval, self.group = model, log_interval, histogram_interval, group
        self.collector = ScalingCollector(model)
        self.drift = WeightDrift(model, reference) if reference is not None else None
        log_dir = Path(log_dir)
        self.writer = VariantWriter(log_dir.parent, log_dir.name)
        self.png_path = log_dir / "scaling.png"
        self.overview = ScalingOverview(str(log_dir))
        self.step = 0  # optimizer steps completed
        self._log = False
        self._device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._loss_sum = torch.zeros((), device=self._device)
        self._loss_steps = 0
        self._skipped = torch.zeros((), device=self._device)
        self._consecutive = torch.zeros((), device=self._device)
        self._nonfinite: dict[str, float] = {}
        self._write_header()

    def _write_header(self) -> None:
        from fp8lab.layers.describe import describe

        rows = ["| layer | precision | backend | reason |", "|---|---|---|---|"]
        rows += [f"| {r.name} | {r.precision} | {r.backend} | {r.reason} |" for r in describe(self.model)]
        self.writer.layout()
        self.writer.text("layers", "\n".join(rows))

    @property
    def log_step(self) -> bool:
        """Whether the optimizer step under way is a log step."""
        return (self.step + 1) % self.log_interval == 0

    def begin_step(self, step: int | None = None) -> None:
        """Before the step's first forward: on a log step, arm the FP8 layers (host flags).

        Args:
            step: the optimizer steps completed so far, when the loop counts them itself
                (e.g. a resumed Trainer's ``global_step``); None: the monitor's own count.
        """
        if step is not None:
            self.step = step
        self._log = self.log_step
        if self._log:
            whatif = self.whatif_interval is None or (self.step + 1) % self.whatif_interval == 0
            self.collector.arm(whatif=whatif)

    def end_step(self, loss: torch.Tensor | None = None, skip: torch.Tensor | None = None) -> dict[str, float] | None:
        """After ``optimizer.step()``: update the scales; on a log step, write the tags.

        Args:
            loss: this step's loss (a tensor: added on the device, averaged over the steps
                since the last log step and written as ``loss/train``), or None.
            skip: 0-dim bool tensor, True when the step was skipped for a non-finite loss
                or gradient (passed to ``update_scales``; counted in ``faults/skipped_steps``).
        Returns:
            the scalars written, on a log step; None otherwise.
        """
        snapshot = self.collector.snapshot() if self._log else None  # before row 0 rolls away
        update_scales(self.model, self.group, skip=skip)
        if loss is not None:
            self._loss_sum += loss.detach().float() if skip is None else torch.where(skip, 0.0, loss.detach().float())
            self._loss_steps += 1
        if skip is not None:
            self._skipped += skip.float()
            self._consecutive = torch.where(skip, self._consecutive + 1, 0.0)
        self.step += 1
        if not self._log:
            return None
        self._log = False
        return self._write(self.collector.read(snapshot))

    def _write(self, stats) -> dict[str, float]:
        """One log step: every value in one event (reads here are the log step's copies)."""
        for i, layer in enumerate(stats.layers):
            for r, role in enumerate(ROLE_NAMES):
                count = float(stats.values[NONFINITE][i, r])
                if count:
                    key = f"faults/nonfinite_amax/{layer}/{role}"
                    self._nonfinite[key] = self._nonfinite.get(key, 0.0) + count
        loss_sum, skipped, consecutive = torch.stack([self._loss_sum, self._skipped, self._consecutive]).tolist()  # one copy
        values = {**stats.scalars(), **self._nonfinite, "faults/skipped_steps": skipped,
                  "faults/consecutive_skips": consecutive}
        if self._loss_steps:
            values["loss/train"] = loss_sum / self._loss_steps
            self._loss_sum.zero_()
            self._loss_steps = 0
        if self.drift is not None:
            values.update(self.drift.read())
        self.writer.scalars(self.step, values)
        if self.step % self.histogram_interval == 0:
            self.writer.histories(self.step, self.collector.histories())
        self.overview.add(self.step, stats)
        if self.overview:
            self.writer.image("overview/scaling", self.overview.png(), self.step)
        return values

    def flush(self) -> None:
        """Write the heatmap of the steps so far as ``<log_dir>/scaling.png``; flush the events."""
        if self.overview:
            self.png_path.write_bytes(self.overview.png())
        self.writer.flush()

    def close(self) -> None:
        """``flush``, then close the event file (a later log step opens a new one)."""
        self.flush()
        self.writer.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def hf_callback(self):
        """A ``transformers.TrainerCallback`` that drives this monitor from ``Trainer``
        (``Trainer(..., callbacks=[monitor.hf_callback()])``); the Trainer must not call
        ``update_scales`` itself."""
        from fp8lab.telemetry.integrations import hf_callback

        return hf_callback(self)

    def lightning_callback(self):
        """A Lightning ``Callback`` that drives this monitor from ``Trainer.fit``."""
        from fp8lab.telemetry.integrations import lightning_callback

        return lightning_callback(self)
