"""The run log: every variant's TensorBoard event files under the run folder.

Invariant: only rank 0 writes events (other ranks hold ``NullWriter``s); every value
written is a host value handed in. On a fresh run each variant's folder starts with the
Custom Scalars layout, the layer table (``fp8lab.describe``) and the data fingerprint; on
a resume, events the dead process wrote after its checkpoint are purged (``purge_step``),
after waiting until the clock is past its event files' names (``records``).
"""

from __future__ import annotations

from pathlib import Path

from fp8lab.run.distributed import NullWriter
from fp8lab.run.records import hparams_of, wait_past_event_files
from fp8lab.telemetry.tensorboard import VariantWriter, layers_markdown


class RunLog:
    """One writer per variant, by name.

    Args:
        run_dir: the run folder (claimed).
        variants: the ``VariantRun``s.
        start_step: the step the run starts from (0, or the checkpoint's on resume).
        is_main: whether this process writes (rank 0).
        data_line: the "data" Text: the corpus, its fingerprint and the device.
    """

    def __init__(self, run_dir: Path, variants, start_step: int, is_main: bool, data_line: str):
        purge = start_step + 1 if start_step else None
        if not is_main:
            self.writers = {run.variant.name: NullWriter() for run in variants}
            return
        if purge is not None:
            wait_past_event_files(run_dir)
        self.writers = {
            run.variant.name: VariantWriter(run_dir, run.variant.name, purge_step=purge) for run in variants
        }
        if start_step == 0:
            for run in variants:
                writer = self.writers[run.variant.name]
                writer.layout()
                writer.text("layers", layers_markdown(run.model))
                writer.text("data", data_line)

    def __getitem__(self, variant: str) -> VariantWriter:
        return self.writers[variant]

    def hparams(self, config, variants, result: dict) -> None:
        """Each variant's hparams with its final val loss and gap (the HParams tab)."""
        for run in variants:
            final = result["variants"][run.variant.name]
            metrics = {k: v for k, v in final.items() if k in ("final_val_loss", "val_loss_rel_gap") and v is not None}
            self.writers[run.variant.name].hparams(
                hparams_of(config, run.variant), {f"hparam/{k}": v for k, v in metrics.items()}
            )

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def close_after_fault(self) -> None:
        """Close the event files after a failed write; their own flush may fail the same way."""
        for writer in self.writers.values():
            try:
                writer.close()
            except OSError:
                pass  # the fault is being reported; the events written so far stay readable
