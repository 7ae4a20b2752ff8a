"""The size of a run's checkpoint file, measured before anything is allocated.

Invariant: nothing here allocates a tensor's data or writes a file. The variants are
built as the run builds them (``VariantRun``), under ``FakeTensorMode``: every tensor has
its real shape and dtype and no storage. One optimizer step populates AdamW's state, the
summary and heatmap history are filled for the run's log and eval steps with values of
the run's shapes, and ``folder.checkpoint_payload`` assembles the same payload the run
writes. ``torch.save`` then serializes it under ``skip_data`` into a sink that only counts
bytes: the pickle, the zip records and their 64-byte alignment are torch's own, so the
container and metadata overhead is measured, not modelled. Only the values a run fills
in later are stand-ins: floats of the summary (zeros), hex digests of the right length.

A new field of the payload is counted when it is added in ``checkpoint_payload`` (or a
``state_dict`` it calls) from objects the fake variants have; a field whose value depends
on tensor data (a digest, a checksum) must be given a stand-in of its real size here
(``_stand_ins``), because fake tensors have no data to compute it from.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fp8lab.quantize.tensor import STAT_NAMES
from fp8lab.run import digest
from fp8lab.run.distributed import Distributed
from fp8lab.run.summary import MEMORY_TAGS, RunSummary
from fp8lab.scaling.whatif import WHATIF_RECIPES
from fp8lab.telemetry.collector import FIELDS, NONFINITE, LayerStats
from fp8lab.telemetry.overview import ScalingOverview
from fp8lab.telemetry.step import is_log_step, is_whatif_step

# The host metrics a log step records per variant (``VariantRun.take_train_metrics`` and the
# runner's peak memory); loss-scaled variants add the loss scale. Values are floats.
TRAIN_METRICS = (
    "loss/train",
    "perf/tokens_per_s",
    "perf/log_step_ms",
    "faults/skipped_steps",
    "faults/consecutive_skips",
    *MEMORY_TAGS,
    "perf/peak_mem_mb",
)
EVAL_METRICS = ("loss/val", "metrics/val_ppl", "metrics/val_token_acc", "compare/val_loss_rel_gap")


class _CountingSink:
    """A write-only, seekable file that keeps no bytes: its ``size`` is the file's."""

    name = "<checkpoint size>"  # what a file object has (wrappers of torch.save may read it)

    def __init__(self) -> None:
        self.pos = self.size = 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.pos += n
        self.size = max(self.size, self.pos)
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        self.size = max(self.size, self.pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass


def _stats(layers: tuple[str, ...], whatif: bool) -> LayerStats:
    """A log step's statistics of these layers: finite values (what a healthy run records)."""
    if not layers:
        return LayerStats.empty()
    n = len(layers)
    rows = (
        np.zeros((n, 3, len(WHATIF_RECIPES), len(STAT_NAMES)))
        if whatif
        else np.full((n, 3, len(WHATIF_RECIPES), len(STAT_NAMES)), np.nan)
    )
    return LayerStats(
        layers, {f: np.zeros((n, 3)) for f in FIELDS + (NONFINITE,)}, rows, np.zeros((n, 3)), np.zeros((n, 3))
    )


def _history(config, runs, summary: RunSummary, overviews: dict) -> None:
    """Fill the summary and heatmaps as the run's last checkpoint has them (every log and eval step)."""
    t = config.train
    for step in range(t.steps):
        last = step == t.steps - 1
        if is_log_step(step, t.log_interval, last=last):
            whatif = is_whatif_step(step, t.whatif_interval)
            for run in runs:
                metrics = dict.fromkeys(TRAIN_METRICS, 0.0)
                if run.loss_scaler is not None:
                    metrics["precision/loss_scale"] = 0.0
                stats = _stats(run.collector.names, whatif)
                summary.record_train(run.variant.name, step + 1, metrics, stats)
                overviews[run.variant.name].add(step + 1, stats)
        if (step + 1) % t.eval_interval == 0 or last:
            for run in runs:
                summary.record_eval(run.variant.name, step + 1, dict.fromkeys(EVAL_METRICS, 0.0))


def _stand_ins(runs) -> None:
    """Values a run fills in from data, at their real size."""
    for run in runs:
        run.first_batch_sha = "0" * 16  # a sha256 prefix (VariantRun.train_step)


GPU_BACKENDS = ("scaled_mm", "te")


def checkpoint_bytes(config, device: torch.device | None = None) -> int:
    """The size in bytes of the run's largest checkpoint file (its last one), exact up to
    the float values the summary records.

    Args:
        config: the resolved run config.
        device: where the run trains (a CUDA run's checkpoint also holds the CUDA RNG state);
            the variants are built as CPU fake tensors either way (same shapes and dtypes).
    """
    from fp8lab.run.folder import checkpoint_payload  # the app's payload, one definition
    from fp8lab.run.variant import VariantRun, build_model

    cpu = torch.device("cpu")
    with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True):
        warnings.simplefilter("ignore")
        reference = build_model(config, config.variants[0], cpu)
        init = {name: p.detach() for name, p in reference.named_parameters()}
        # A backend that needs the run's GPU (scaled_mm, te) cannot plan on the CPU: the stand-in runs emulated,
        # whose state has the same shapes and dtypes (the run itself checks its backends where it trains)
        stand_ins = [
            dataclasses.replace(v, backend="emulated") if v.backend in GPU_BACKENDS else v for v in config.variants
        ]
        runs = [VariantRun(v, config, init, cpu, Distributed(device=cpu)) for v in stand_ins]
        for run in runs:  # one step: AdamW's moments and step counters exist from then on
            for p in run.model.parameters():
                p.grad = torch.zeros_like(p)
            if run.fp8_weights is not None:  # FP8 weights: the optimizer steps their stand-ins
                run.fp8_weights.prepare()
            run.optimizer.step()
            if run.fp8_weights is not None:
                run.fp8_weights.finish()
            run.optimizer.zero_grad(set_to_none=True)
        _stand_ins(runs)
        summary = RunSummary(config, [v.name for v in config.variants])
        overviews = {v.name: ScalingOverview(f"variant {v.name}") for v in config.variants}
        _history(config, runs, summary, overviews)
        payload = checkpoint_payload(config, config.train.steps, runs, summary, overviews)
    if device is not None and device.type == "cuda":
        payload["rng"]["cuda"] = torch.empty(16, dtype=torch.uint8)  # torch.cuda.get_rng_state's size
    payload[digest.KEY] = "sha256:" + "0" * 64  # checkpoint.save_checkpoint seals the payload with its digest
    sink = _CountingSink()
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(payload, sink)
    return sink.size
