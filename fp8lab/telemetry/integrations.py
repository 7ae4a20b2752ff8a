"""Callbacks that drive a ``Monitor`` from other libraries' trainers, imported only when asked.

Invariant: fp8lab depends on neither library; each callback only calls the monitor's
``begin_step`` before an optimizer step's first forward and ``end_step`` after its
``optimizer.step()``, so the monitor's no-host-read rule holds between log steps.

- Hugging Face ``Trainer``: ``on_step_begin`` / ``on_step_end`` fire once per optimizer
  step (gradient accumulation included), after ``optimizer.step()``, the scheduler and
  ``zero_grad``; ``global_step`` keeps the monitor's count across a resume.
- Lightning: ``global_step`` counts optimizer steps; a change of it seen at the end of a
  batch means the optimizer stepped, whatever ``accumulate_grad_batches`` is.
"""

from __future__ import annotations


def hf_callback(monitor):
    """A ``transformers.TrainerCallback`` driving ``monitor`` (closed at the end of training)."""
    from transformers import TrainerCallback

    class FP8MonitorCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            monitor.begin_step(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            monitor.end_step()

        def on_train_end(self, args, state, control, **kwargs):
            monitor.close()

    return FP8MonitorCallback()


def lightning_callback(monitor):
    """A Lightning ``Callback`` (``lightning`` or ``pytorch_lightning``) driving ``monitor``."""
    try:
        from lightning.pytorch import Callback
    except ImportError:
        from pytorch_lightning import Callback

    class FP8MonitorCallback(Callback):
        def __init__(self):
            self.started_at: int | None = None  # global_step when the optimizer step began

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.started_at is None:  # the first micro-batch of an optimizer step
                self.started_at = trainer.global_step
                monitor.begin_step(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.started_at is not None and trainer.global_step != self.started_at:  # it stepped
                self.started_at = None
                loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
                monitor.end_step(loss=loss if hasattr(loss, "detach") else None)

        def on_train_end(self, trainer, pl_module):
            monitor.close()

    return FP8MonitorCallback()
