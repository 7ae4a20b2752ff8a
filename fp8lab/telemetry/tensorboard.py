"""TensorBoard writing for one variant: the tag layout of DESIGN.md.

Invariant: this module only formats and writes host values it is given; it never reads
a device tensor. Tags:
    loss/train loss/val metrics/val_ppl metrics/val_token_acc compare/val_loss_rel_gap
    perf/tokens_per_s perf/peak_mem_mb
    scaling/<layer>/<role>/<scale|amax|overflow_pct|underflow_pct|sqnr_db>
    amax_history/<layer>/<role> (histogram)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from fp8lab.formats import ROLE_NAMES
from fp8lab.telemetry.collector import LayerStats

CUSTOM_LAYOUT = {
    "FP8 vs BF16": {
        "train loss": ["Multiline", [r"loss/train"]],
        "validation loss": ["Multiline", [r"loss/val"]],
        "relative val-loss gap to BF16": ["Multiline", [r"compare/val_loss_rel_gap"]],
        "tokens/s": ["Multiline", [r"perf/tokens_per_s"]],
    }
}


class VariantWriter:
    """Event files of one variant under ``run_dir/<variant>/``."""

    def __init__(self, run_dir: Path, variant: str, purge_step: int | None = None):
        self.dir = Path(run_dir) / variant
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def layer_stats(self, step: int, stats: LayerStats) -> None:
        for layer, role, field, value in stats.rows():
            self.writer.add_scalar(f"scaling/{layer}/{role}/{field}", value, step)

    def histories(self, step: int, histories: dict[str, np.ndarray]) -> None:
        for layer, history in histories.items():
            for r, role in enumerate(ROLE_NAMES):
                column = history[:, r]
                column = column[column > 0]  # unfilled slots of a young history are zeros
                if column.size:
                    self.writer.add_histogram(f"amax_history/{layer}/{role}", column, step)

    def text(self, tag: str, markdown: str, step: int = 0) -> None:
        self.writer.add_text(tag, markdown, step)

    def layout(self) -> None:
        self.writer.add_custom_scalars(CUSTOM_LAYOUT)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        self.writer.add_hparams(hparams, metrics, run_name=".")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
