"""TensorBoard writing for one variant: the tag layout the README documents.

Invariant: this module only formats and writes host values it is given; it never reads
a device tensor. Tags (per-layer ones are built by ``fp8lab.telemetry.keys``):
    loss/train loss/val metrics/val_ppl metrics/val_token_acc compare/val_loss_rel_gap
    perf/tokens_per_s (training steps) perf/log_step_ms (log steps, telemetry included) perf/peak_mem_mb
    scaling/<layer>/<role>/<scale|amax|overflow_pct|underflow_pct|sqnr_db>
    accuracy/<layer>/<fprop|dgrad|wgrad>_sqnr_db  accuracy/<layer>/weight_rel_diff
    amax_history/<layer>/<role> (histogram)   overview/scaling (image)
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from fp8lab.formats import ROLE_NAMES
from fp8lab.layers.describe import describe
from fp8lab.telemetry.collector import ATTENTION_TENSORS, LayerStats
from fp8lab.telemetry.keys import AMAX_HISTORY, Key
from fp8lab.telemetry.overview import LAYOUT

CUSTOM_LAYOUT = {
    "FP8 vs BF16": {
        "train loss": ["Multiline", [r"loss/train"]],
        "validation loss": ["Multiline", [r"loss/val"]],
        "relative val-loss gap to the baseline (BF16, or the FP32 reference)": [
            "Multiline",
            [r"compare/val_loss_rel_gap"],
        ],
        "tokens/s": ["Multiline", [r"perf/tokens_per_s"]],
        "log step ms": ["Multiline", [r"perf/log_step_ms"]],
    }
}


def layers_markdown(model: nn.Module) -> str:
    """``fp8lab.describe(model)`` as a Markdown table (the "layers" Text tag)."""
    lines = ["| layer | precision | backend | reason |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.precision} | {r.backend} | {r.reason} |" for r in describe(model)]
    return "\n".join(lines)


class VariantWriter:
    """Event files of one variant under ``run_dir/<variant>/``."""

    def __init__(self, run_dir: Path, variant: str, purge_step: int | None = None):
        self.dir = Path(run_dir) / variant
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """All ``values`` as ONE event (a Summary with many values): TensorBoard reads
        them as separate tags; add_scalar would write one event each (~0.1 ms apiece,
        16 ms for the 120 scalars of an 8-layer model's log step)."""
        if values:
            summary = Summary(value=[Summary.Value(tag=t, simple_value=float(v)) for t, v in values.items()])
            self.writer._get_file_writer().add_summary(summary, step)

    def layer_stats(self, step: int, stats: LayerStats) -> None:
        self.scalars(step, stats.scalars())

    def histories(self, step: int, histories: dict[str, np.ndarray]) -> None:
        for layer, history in histories.items():
            columns = ROLE_NAMES if history.shape[1] == len(ROLE_NAMES) else ATTENTION_TENSORS  # a .dpa core: 6
            for r, role in enumerate(columns):
                column = history[:, r]
                column = column[column > 0]  # unfilled slots of a young history are zeros
                if column.size:
                    self.writer.add_histogram(Key(AMAX_HISTORY, layer, role).tag, column, step)

    def image(self, tag: str, png: bytes, step: int) -> None:
        """A PNG picture (the Images tab); its size is read from the PNG header."""
        width, height = struct.unpack(">II", png[16:24])
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def text(self, tag: str, markdown: str, step: int = 0) -> None:
        self.writer.add_text(tag, markdown, step)

    def layout(self) -> None:
        self.writer.add_custom_scalars({**CUSTOM_LAYOUT, **LAYOUT})  # LAYOUT: every layer on one chart

    def hparams(self, hparams: dict, metrics: dict) -> None:
        self.writer.add_hparams(hparams, metrics, run_name=".")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
