"""The runner: every variant trained step by step on the same batches, logged side by side.

Invariant: config errors, data errors, device errors, an unwritable output folder, a
run folder another process holds and a model too large for memory are raised before
anything is written under the output folder; a write that fails later for lack of space
or permission is a ``StorageError`` naming the newest intact checkpoint. In the loop,
each step fetches one batch (a pure function of seed and step) and gives the same
tensors to every variant; device-to-host copies happen only on log and eval steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fp8lab.run.data import BatchSampler, Corpus, DataError, load_corpus
from fp8lab.run import checkpoint as ckpt
from fp8lab.run import storage
from fp8lab.run.config import ConfigError, RunConfig
from fp8lab.run.distributed import Distributed, NullWriter
from fp8lab.run.lock import RunFolderBusy, RunLock
from fp8lab.run.preflight import preflight
from fp8lab.run.progress import Progress
from fp8lab.run.stop import StopRequest, TrainingDiverged
from fp8lab.run.records import hparams_of, layers_markdown, wait_past_event_files
from fp8lab.run.schedule import learning_rate
from fp8lab.run.summary import RunSummary
from fp8lab.run.variant import VariantRun, build_model
from fp8lab.telemetry.accuracy import WeightDrift
from fp8lab.telemetry.overview import ScalingOverview
from fp8lab.telemetry.tensorboard import VariantWriter


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


class Runner:
    """Builds the variants of ``config`` and trains them; ``run()`` returns the summary.

    Args:
        config: the resolved run config.
        out_root: the logs folder (``logs/``); the run goes to ``out_root/<name>/<run_id>/``.
        progress: print a progress line at log steps (to stderr).
        resume: a run folder to continue from its newest checkpoint (same config).
        dist: the data-parallel job (``Distributed.from_env()`` under torchrun); each rank
            trains on its slice of every global batch and only rank 0 writes files.
        run_dir: the folder of a fresh run (default: a new one under ``out_root``, named
            by rank 0).
    Raises:
        CheckpointError: ``resume`` has no usable checkpoint for this config.
        ConfigError: ``train.batch_size`` is not divisible by the number of processes, or
            a variant's backend cannot run here.
        StorageError: the output (or resumed) folder cannot be written, or has no room
            for one checkpoint.
        RunFolderBusy: another process is writing into ``resume``.
        ResourceError: the run's memory estimate exceeds the device's free memory.
    """

    def __init__(self, config: RunConfig, out_root: str | Path = "logs", *, progress: bool = True,
                 resume: str | Path | None = None, dist: Distributed | None = None,
                 run_dir: str | Path | None = None):
        self.config = config
        self.dist = dist if dist is not None else Distributed(device=resolve_device(config.train.device))
        check_world_size(config, self.dist.world_size)
        self.lock: RunLock | None = None
        resume = Path(resume) if resume is not None else None
        preflight(config, self.dist.device, world_size=self.dist.world_size, is_main=self.dist.is_main,
                  out_root=Path(out_root), resume=resume, run_dir=Path(run_dir) if run_dir is not None else None)
        self.device = self.dist.device
        self.corpus: Corpus = load_corpus(config.data.source, val_fraction=config.data.val_fraction)
        torch.manual_seed(config.train.seed)
        reference = build_model(config, config.variants[0], self.device)
        if self.corpus.vocab_size > reference.config.vocab_size:
            raise DataError(
                f"data.source has token ids up to {self.corpus.vocab_size - 1} but model.preset "
                f"{config.model.preset!r} has vocab_size {reference.config.vocab_size}"
            )
        init_params = {name: p.detach() for name, p in reference.named_parameters()}
        self.variants = [VariantRun(v, config, init_params, self.device, self.dist) for v in config.variants]
        # Accuracy against the BF16 twin and the heatmap overview, per FP8 variant (log steps only).
        baseline = next(run for run in self.variants if run.variant.name == config.baseline)
        self.drifts = {run.variant.name: WeightDrift(run.model, baseline.model)
                       for run in self.variants if run.variant.precision == "fp8"}
        self.overviews = {run.variant.name: ScalingOverview(f"variant {run.variant.name}") for run in self.variants}
        t = config.train
        self.sampler = BatchSampler(self.corpus.train, t.batch_size, t.block_size, t.seed)
        val = BatchSampler(self.corpus.val, t.batch_size, t.block_size, t.seed + 1)
        self.val_batches = [tuple(a.to(self.device) for a in val.batch(i)) for i in range(t.eval_batches)]
        self.out_root = Path(out_root)
        self.run_dir: Path | None = Path(run_dir) if run_dir is not None else None
        self.start_step = 0
        self.progress = Progress(t.steps, enabled=progress and self.dist.is_main, main=self.dist.is_main)
        self.summary = RunSummary(config, [v.name for v in config.variants])
        self.stop = StopRequest()
        self.last_checkpoint: Path | None = None
        self.checkpoint_path: Path | None = None
        if resume is not None:
            self.checkpoint_path, payload = ckpt.newest_usable(resume, config.hash(), config.to_dict(), self._validate)
            self._restore(payload)
            self.run_dir, self.last_checkpoint = resume, self.checkpoint_path

    def _validate(self, path: Path, payload: dict) -> None:
        """The checkpoint holds every variant, with exactly the state keys of its model."""
        for run in self.variants:
            state = payload["variants"].get(run.variant.name)
            if state is None:
                raise ckpt.CheckpointError(f"checkpoint {path} has no variant {run.variant.name!r}")
            expected, saved = set(run.model.state_dict()), set(state["model"])
            missing = sorted(expected - saved)
            if missing:
                what = "FP8 scaling state" if any("fp8_state" in k for k in missing) else "model state"
                raise ckpt.CheckpointError(f"checkpoint {path}: variant {run.variant.name!r} has no {what} for {missing[:3]}")
            if saved - expected:
                raise ckpt.CheckpointError(f"checkpoint {path}: variant {run.variant.name!r} has unexpected keys {sorted(saved - expected)[:3]}")

    def _restore(self, payload: dict) -> None:
        for run in self.variants:
            try:
                run.load_state_dict(payload["variants"][run.variant.name])
            except (KeyError, ValueError, RuntimeError) as err:
                raise ckpt.CheckpointError(f"checkpoint {self.checkpoint_path}: variant {run.variant.name!r}: {err}") from None
        self.summary.load_state_dict(payload["summary"])
        for name, state in payload.get("overview", {}).items():  # older checkpoints have none
            self.overviews[name].load_state_dict(state)
        torch.set_rng_state(payload["rng"]["torch"])
        if self.device.type == "cuda" and payload["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(payload["rng"]["cuda"], self.device)
        self.start_step = payload["step"]

    def save_checkpoint(self, step: int) -> Path:
        """Flush the event files (so nothing logged before ``step`` can be lost), then
        write the checkpoint of ``step`` atomically. Rank 0 only (ranks hold the same state)."""
        if not self.dist.is_main:
            return None
        for writer in self.writers.values():
            writer.flush()
        payload = {
            "format_version": ckpt.FORMAT_VERSION,
            "step": step,
            "config_hash": self.config.hash(),
            "config": self.config.to_dict(),
            "variants": {run.variant.name: run.state_dict() for run in self.variants},
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
            "summary": self.summary.state_dict(),
            "overview": {name: overview.state_dict() for name, overview in self.overviews.items() if overview},
        }
        self.last_checkpoint = ckpt.save_checkpoint(self.run_dir, step, payload, self.config.train.keep_checkpoints)
        return self.last_checkpoint

    def _open_writers(self) -> None:
        # On resume, events the dead process wrote after its checkpoint carry steps >
        # start_step; purge_step makes TensorBoard drop them.
        purge = self.start_step + 1 if self.start_step else None
        if self.dist.is_main:
            if purge is not None:
                wait_past_event_files(self.run_dir)
            self.writers = {v.variant.name: VariantWriter(self.run_dir, v.variant.name, purge_step=purge) for v in self.variants}
        else:
            self.writers = {v.variant.name: NullWriter() for v in self.variants}
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

    def run(self) -> dict | None:
        """Train every variant for ``train.steps`` steps; write events and summary.json.

        Returns the summary, or None when stopped by SIGTERM/SIGINT (after a checkpoint);
        a signal during the final writes lets them finish, and ``self.stop`` names it.
        Raises TrainingDiverged after ``train.max_consecutive_skips`` skipped steps,
        StorageError when a write fails for lack of space or permission, and
        RunFolderBusy when another process holds the run folder.
        """
        # SIGTERM/SIGINT only set a flag from here to the end, final writes included.
        with self.stop.installed():
            try:
                self._claim_folder()
                result = self._train()
            except OSError as err:  # disk full, quota, read-only: named, with the intact checkpoint
                if not storage.is_storage_fault(err):
                    raise
                self._close_writers_after_fault()
                raise storage.storage_error(err, self.run_dir, self.last_checkpoint) from err
            finally:
                if self.lock is not None:
                    self.lock.release()
        if result is not None and self.stop:
            self.progress.stopped_at_end(self.stop.name, self.run_dir)
        return result

    def _close_writers_after_fault(self) -> None:
        """Close the event files after a failed write; their own flush may fail the same way."""
        for writer in getattr(self, "writers", {}).values():
            try:
                writer.close()
            except OSError:
                pass  # the fault is being reported; the events written so far stay readable

    def _claim_folder(self) -> None:
        """Create (fresh run) and lock the run folder; rank 0 writes config.json."""
        cfg = self.config
        if self.run_dir is None:  # rank 0 creates a fresh run's folder; every rank uses that name
            claimed = storage.claim_run_dir(self.out_root, cfg.name, cfg.hash()) if self.dist.is_main else None
            self.run_dir = self.dist.broadcast(claimed)
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)  # named by the --nproc launcher, or resumed
        self.lock = RunLock(self.run_dir).acquire()
        found = ckpt.list_checkpoints(self.run_dir)
        if self.checkpoint_path is not None and (not found or found[-1][1] != self.checkpoint_path):
            raise RunFolderBusy(f"run folder {self.run_dir} changed while this process loaded {self.checkpoint_path} "
                                "(another process wrote into it); resume again")
        if not (self.run_dir / "config.json").exists():
            storage.write_atomic(self.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2, default=str))

    def _train(self) -> dict | None:
        cfg = self.config
        self._open_writers()
        if self.dist.enabled:  # a job that dies is resumed from this folder
            self.progress.note(f"run folder: {self.run_dir} ({self.dist.world_size} processes)")
        for step in range(self.start_step, cfg.train.steps):
            self._step(step)
            # Ranks stop together, after the same step (a host-side flag exchange).
            if self.dist.any_rank(bool(self.stop)):
                path = self.save_checkpoint(step + 1)
                for writer in self.writers.values():
                    writer.close()
                self.progress.stopped(self.stop.name, step + 1, path, self.run_dir)
                return None
        return self.finish()

    def _step(self, step: int) -> None:
        cfg, t = self.config, self.config.train
        tokens_per_step = t.batch_size * t.block_size
        # host tensors, this rank's slice of the global batch; each variant copies them to its device
        x, y = self.sampler.batch(step, self.dist.rank, self.dist.world_size)
        lr = learning_rate(step, cfg)
        log = (step + 1) % t.log_interval == 0 or step == t.steps - 1
        whatif = log and (t.whatif_interval is None or (step + 1) % t.whatif_interval == 0)
        stats = {run.variant.name: run.train_step(x, y, lr, log, whatif=whatif) for run in self.variants}
        if log:  # every variant took this step: weights compare at the same step
            for run in self.variants:
                name = run.variant.name
                writer = self.writers[name]
                metrics = run.take_train_metrics(tokens_per_step)
                metrics["perf/peak_mem_mb"] = run.peak_mem_mb()
                drift = self.drifts[name].read() if name in self.drifts else {}
                self.summary.record_train(name, step + 1, metrics, stats[name])
                writer.scalars(step + 1, {**metrics, **self.summary.fault_scalars(name), **stats[name].scalars(), **drift})
                self._log_overview(name, step + 1, stats[name])
                self._check_diverged(run, step + 1, metrics)
        if log:
            self.progress.update(step + 1, {r.variant.name: self.summary.last_train(r.variant.name) for r in self.variants})
        if (step + 1) % t.eval_interval == 0 or step == t.steps - 1:
            self._evaluate(step + 1)
            for run in self.variants:
                self.writers[run.variant.name].histories(step + 1, run.collector.histories())
        interval = t.checkpoint_interval
        if interval and (step + 1) % interval == 0 and step + 1 < t.steps:
            # A checkpoint inside a run of skipped steps would only replay the fault on
            # resume: keep the last good one instead (one sync, on checkpoint steps only).
            if any(bool(run.counters["consecutive_skips"]) for run in self.variants):
                self.progress.note(f"checkpoint at step {step + 1} deferred: that step was skipped (non-finite)")
            else:
                self.save_checkpoint(step + 1)

    def _log_overview(self, name: str, step: int, stats) -> None:
        """The heatmap of every log step so far, in the Images tab (rank 0 draws it)."""
        overview = self.overviews[name]
        overview.add(step, stats)
        if overview and self.dist.is_main:
            self.writers[name].image("overview/scaling", overview.png(), step)

    def _check_diverged(self, run: VariantRun, step: int, metrics: dict) -> None:
        """At log steps: stop when the run of skipped steps reached the limit."""
        limit = self.config.train.max_consecutive_skips
        if metrics["faults/consecutive_skips"] < limit:
            return
        layers = sorted(self.summary.nonfinite[run.variant.name]) or ["none (the loss itself was non-finite)"]
        last = f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"variant {run.variant.name!r}: {int(metrics['faults/consecutive_skips'])} consecutive steps up to step "
            f"{step} had a non-finite loss or gradient (train.max_consecutive_skips={limit}); layers whose amax "
            f"went non-finite: {', '.join(layers)}; {last}"
        )

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
        if self.dist.is_main:
            self.save_checkpoint(self.config.train.steps)
            for name, overview in self.overviews.items():
                if overview:  # the heatmap of the whole run, beside summary.json
                    storage.write_atomic(self.run_dir / f"scaling_{name}.png", overview.png())
            storage.write_atomic(self.run_dir / "summary.json", json.dumps(result, indent=2))
        self.dist.barrier()  # the job ends when rank 0's files are written
        self.progress.finish(self.summary.table(result), self.run_dir)
        return result


def check_world_size(config: RunConfig, world_size: int) -> None:
    if config.train.batch_size % world_size:
        raise ConfigError(
            f"train.batch_size must be divisible by the number of processes ({world_size}), "
            f"got {config.train.batch_size}: every rank trains on an equal slice of the global batch"
        )
