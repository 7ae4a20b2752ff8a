"""Monitor: the recipes' FP8 telemetry for any training loop (plain PyTorch, HF Trainer, Lightning).

Invariant: the Monitor is the log-step protocol (``fp8lab.telemetry.step.StepTelemetry``,
the same one ``fp8lab run`` uses) plus a TensorBoard writer. Between log steps it does only
host bookkeeping and on-device adds and calls ``fp8lab.update_scales``; it never reads a
device tensor. On a log step it writes the recipes' tags to one TensorBoard run folder:

    scaling/<layer>/<role>/<stat>        accuracy/<layer>/<fprop|dgrad|wgrad>_sqnr_db
    whatif/<layer>/<role>/<scaling>/<stat>
    faults/nonfinite_amax/<layer>/<role> faults/skipped_steps faults/consecutive_skips
    (an FP8 attention core, fp8_dpa: scaling/<layer>.dpa/<tensor>/<stat>, accuracy/<layer>.dpa/
    <gemm>_sqnr_db and faults/nonfinite_amax/<layer>.dpa/<tensor>, tensor in qkv s o dqkv do dp)
    loss/train (if given: the mean over the steps since the last log step that were not skipped)
    accuracy/<layer>/weight_rel_diff (with a BF16 ``reference`` model)
    amax_history/<layer>/<role> (histograms)   overview/scaling (heatmap image)

plus the Custom Scalars layout and the layer table (Text) once.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from fp8lab.layers import choices
from fp8lab.paths import folder_problem
from fp8lab.telemetry.accuracy import WeightDrift
from fp8lab.telemetry.overview import ScalingOverview
from fp8lab.telemetry.step import FaultTotals, StepTelemetry, is_log_step, is_whatif_step
from fp8lab.telemetry.tensorboard import VariantWriter, layers_markdown


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

    Raises (before anything is written): TypeError for an argument of the wrong type,
    ValueError for a value out of range or a ``log_dir`` no folder can have (empty, not
    UTF-8, a dangling symlink or a loop, a name longer than the file system allows, a
    file in the way); each message starts with the argument's name.
    """

    def __init__(
        self,
        model: nn.Module,
        log_dir: str | Path,
        *,
        log_interval: int = 10,
        reference: nn.Module | None = None,
        histogram_interval: int = 100,
        whatif_interval: int | None = None,
        group=None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if reference is not None and not isinstance(reference, nn.Module):
            raise TypeError(f"reference must be a torch.nn.Module or None, got {type(reference).__name__}")
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a str or os.PathLike folder, got {type(log_dir).__name__}")
        problem = folder_problem(log_dir)
        if problem is not None:
            raise ValueError(f"log_dir: {problem}")
        choices.size("histogram_interval", histogram_interval)
        self.telemetry = StepTelemetry(model, log_interval=log_interval, whatif_interval=whatif_interval, group=group)
        self.model, self.histogram_interval = model, histogram_interval
        self.drift = WeightDrift(model, reference) if reference is not None else None
        log_dir = Path(log_dir)
        self.writer = VariantWriter(log_dir.parent, log_dir.name)
        self.png_path = log_dir / "scaling.png"
        self.overview = ScalingOverview(str(log_dir))
        self.faults = FaultTotals()
        self.step = 0  # optimizer steps completed
        self._log = False
        self._loss_given = False  # since the last log step (a host flag)
        self.writer.layout()
        self.writer.text("layers", layers_markdown(model))

    @property
    def log_step(self) -> bool:
        """Whether the optimizer step under way is a log step."""
        return is_log_step(self.step, self.telemetry.log_interval)

    def begin_step(self, step: int | None = None) -> None:
        """Before the step's first forward: on a log step, arm the FP8 layers (host flags).

        Args:
            step: the optimizer steps completed so far, when the loop counts them itself
                (e.g. a resumed Trainer's ``global_step``); None: the monitor's own count.
        """
        if step is not None:
            self.step = step
        self._log = self.log_step
        self.telemetry.begin(self._log, whatif=is_whatif_step(self.step, self.telemetry.whatif_interval))

    def end_step(self, loss: torch.Tensor | None = None, skip: torch.Tensor | None = None) -> dict[str, float] | None:
        """After ``optimizer.step()``: update the scales; on a log step, write the tags.

        Args:
            loss: this step's loss (a tensor: added on the device, averaged over the steps
                since the last log step that were not skipped, and written as ``loss/train``),
                or None.
            skip: 0-dim bool tensor, True when the step was skipped for a non-finite loss
                or gradient (passed to ``update_scales``; counted in ``faults/skipped_steps``).
        Returns:
            the scalars written, on a log step; None otherwise.
        """
        record = self.telemetry.end(loss=loss, skip=skip)
        self._loss_given |= loss is not None
        self.step += 1
        self._log = False
        return None if record is None else self._write(record)

    def _write(self, record) -> dict[str, float]:
        """One log step: every value in one event (the record is the log step's one copy)."""
        stats = record.stats
        self.faults.add(stats)
        values = {
            **stats.scalars(),
            **self.faults.scalars(),
            "faults/skipped_steps": record.counters["skipped"],
            "faults/consecutive_skips": record.counters["consecutive_skips"],
        }
        if self._loss_given:
            values["loss/train"] = record.mean_loss
            self._loss_given = False
        if self.drift is not None:
            values.update(self.drift.read())
        self.writer.scalars(self.step, values)
        if self.step % self.histogram_interval == 0:
            self.writer.histories(self.step, self.telemetry.collector.histories())
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
