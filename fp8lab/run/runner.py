"""The runner: every variant trained step by step on the same batches, logged side by side.

Invariant: config errors, data errors and device errors are raised before anything is
written under the output folder. In the loop, each step fetches one batch (a pure
function of seed and step) and gives the same tensors to every variant; device-to-host
copies happen only on log and eval steps.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from fp8lab.data import BatchSampler, Corpus, load_corpus
from fp8lab.run.config import RunConfig
from fp8lab.run.progress import Progress
from fp8lab.run.summary import RunSummary
from fp8lab.run.variant import VariantRun, build_model
from fp8lab.telemetry.tensorboard import VariantWriter


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def learning_rate(step: int, config: RunConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr at the last step."""
    t = config.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def new_run_dir(out_root: Path, config: RunConfig) -> Path:
    base = out_root / config.name / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.hash()[:6]}"
    run_dir, n = base, 1
    while run_dir.exists():
        run_dir, n = Path(f"{base}-{n}"), n + 1
    return run_dir


def layers_markdown(run: VariantRun) -> str:
    from fp8lab.describe import describe

    lines = ["| layer | precision | backend | reason |", "|---|---|---|---|"]
    lines += [f"| {r.layer} | {r.precision} | {r.backend} | {r.reason} |" for r in describe(run.model)]
    return "\n".join(lines)


class Runner:
    """Builds the variants of ``config`` and trains them; ``run()`` returns the summary.

    Args:
        config: the resolved run config.
        out_root: the logs folder (``logs/``); the run goes to ``out_root/<name>/<run_id>/``.
        progress: print a progress line at log steps (to stderr).
    """

    def __init__(self, config: RunConfig, out_root: str | Path = "logs", *, progress: bool = True):
        self.config = config
        self.device = resolve_device(config.train.device)
        self.corpus: Corpus = load_corpus(config.data.source, val_fraction=config.data.val_fraction)
        torch.manual_seed(config.train.seed)
        reference = build_model(config, config.variants[0], self.device)
        if self.corpus.vocab_size > reference.config.vocab_size:
            raise ValueError(
                f"data.source has token ids up to {self.corpus.vocab_size - 1} but model.preset "
                f"{config.model.preset!r} has vocab_size {reference.config.vocab_size}"
            )
        init_params = {name: p.detach() for name, p in reference.named_parameters()}
        self.variants = [VariantRun(v, config, init_params, self.device) for v in config.variants]
        t = config.train
        self.sampler = BatchSampler(self.corpus.train, t.batch_size, t.block_size, t.seed)
        val = BatchSampler(self.corpus.val, t.batch_size, t.block_size, t.seed + 1)
        self.val_batches = [tuple(a.to(self.device) for a in val.batch(i)) for i in range(t.eval_batches)]
        self.out_root = Path(out_root)
        self.run_dir: Path | None = None
        self.start_step = 0
        self.progress = Progress(t.steps, enabled=progress)
        self.summary = RunSummary(config, [v.name for v in config.variants])

    def _open_writers(self) -> None:
        purge = self.start_step if self.start_step else None
        self.writers = {v.variant.name: VariantWriter(self.run_dir, v.variant.name, purge_step=purge) for v in self.variants}
        if self.start_step == 0:
            for run in self.variants:
                writer = self.writers[run.variant.name]
                writer.layout()
                writer.text("layers", layers_markdown(run))
                writer.text("data", f"source `{self.corpus.source}`, fingerprint `{self.corpus.fingerprint}`, device `{self.device}`")

    def _evaluate(self, step: int) -> None:
        results = {run.variant.name: run.evaluate(self.val_batches) for run in self.variants}
        base = results[self.config.baseline]["loss/val"]
        for name, metrics in results.items():
            if name != self.config.baseline:
                metrics["compare/val_loss_rel_gap"] = (metrics["loss/val"] - base) / base
            self.writers[name].scalars(step, metrics)
            self.summary.record_eval(name, step, metrics)
        self.progress.note_eval(results)

    def run(self) -> dict:
        """Train every variant for ``train.steps`` steps; write events and summary.json."""
        cfg, t = self.config, self.config.train
        if self.run_dir is None:
            self.run_dir = new_run_dir(self.out_root, cfg)
            self.run_dir.mkdir(parents=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
        self._open_writers()
        tokens_per_step = t.batch_size * t.block_size
        for step in range(self.start_step, t.steps):
            x, y = self.sampler.batch(step)  # host tensors; each variant copies them to its device
            lr = learning_rate(step, cfg)
            log = (step + 1) % t.log_interval == 0 or step == t.steps - 1
            for run in self.variants:
                stats = run.train_step(x, y, lr, log)
                if log:
                    writer = self.writers[run.variant.name]
                    metrics = run.take_train_metrics(tokens_per_step)
                    metrics["perf/peak_mem_mb"] = run.peak_mem_mb()
                    writer.scalars(step + 1, metrics)
                    writer.layer_stats(step + 1, stats)
                    self.summary.record_train(run.variant.name, step + 1, metrics, stats)
            if log:
                self.progress.update(step + 1, {r.variant.name: self.summary.last_train(r.variant.name) for r in self.variants})
            if (step + 1) % t.eval_interval == 0 or step == t.steps - 1:
                self._evaluate(step + 1)
                for run in self.variants:
                    self.writers[run.variant.name].histories(step + 1, run.collector.histories())
            self.after_step(step + 1)
        return self.finish()

    def after_step(self, step: int) -> None:
        """Hook for checkpointing (a no-op here)."""

    def finish(self) -> dict:
        for run in self.variants:
            self.summary.first_batch[run.variant.name] = run.first_batch_sha
        result = self.summary.to_dict(self.corpus.fingerprint, str(self.device))
        for run in self.variants:
            name = run.variant.name
            final = result["variants"][name]
            metrics = {k: v for k, v in final.items() if k in ("final_val_loss", "val_loss_rel_gap") and v is not None}
            self.writers[name].hparams(hparams_of(self.config, run.variant), {f"hparam/{k}": v for k, v in metrics.items()})
            self.writers[name].close()
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, self.run_dir / "summary.json")
        self.progress.finish(self.summary.table(result), self.run_dir)
        return result


def hparams_of(config: RunConfig, variant) -> dict:
    r = variant.recipe
    return {
        "variant": variant.name, "precision": variant.precision, "fp8_format": r.fp8_format,
        "amax_history_len": r.amax_history_len, "amax_compute_algo": r.amax_compute_algo,
        "margin": r.margin, "first_last_bf16": variant.first_last_bf16,
        "steps": config.train.steps, "lr": config.train.lr, "batch_size": config.train.batch_size,
    }
