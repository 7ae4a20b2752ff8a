"""The runner: every variant trained step by step on the same batches, logged side by side.

Invariant: config errors, data errors, device errors, an unwritable output folder, a
run folder another process holds and a model too large for memory are raised before
anything is written under the output folder; a write that fails later for lack of space
or permission is a ``StorageError`` naming the newest intact checkpoint. In the loop,
each step fetches one batch (a pure function of seed and step) and gives the same
tensors to every variant; device-to-host copies happen only on log and eval steps.

The runner composes the pieces and reads top to bottom: the run folder (``folder``: claim,
lock, checkpoints, summary), the run log (``runlog``: event files), the variants
(``variant``: model, optimizer, the log-step protocol) and the summary (``summary``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fp8lab.run import memory, storage
from fp8lab.run.config import RunConfig
from fp8lab.run.data import BatchSampler, DataError, load_corpus
from fp8lab.run.distributed import Distributed, check_world_size, resolve_device
from fp8lab.run.folder import RunFolder, check_variants_fit
from fp8lab.run.loss_scale import flushing_scale
from fp8lab.run.preflight import preflight
from fp8lab.run.progress import Progress
from fp8lab.run.runlog import RunLog
from fp8lab.run.schedule import learning_rate
from fp8lab.run.stop import StopRequest, TrainingDiverged
from fp8lab.run.summary import RunSummary
from fp8lab.run.variant import VariantRun, build_model
from fp8lab.telemetry.accuracy import WeightDrift
from fp8lab.telemetry.overview import ScalingOverview
from fp8lab.telemetry.step import is_log_step, is_whatif_step


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
        stop: the flag a signal sets (``fp8lab run`` installs it before building the
            runner and keeps it to the end); default a fresh one, installed by ``run``.
    Raises:
        CheckpointError: ``resume`` has no usable checkpoint for this config.
        ConfigError: ``train.batch_size`` is not divisible by the number of processes, or
            a variant's backend cannot run here.
        StorageError: the output (or resumed) folder cannot be written, or has no room
            for one checkpoint.
        RunFolderBusy: another process is writing into ``resume``.
        ResourceError: the run's memory estimate exceeds the device's free memory.
    """

    def __init__(
        self,
        config: RunConfig,
        out_root: str | Path = "logs",
        *,
        progress: bool = True,
        resume: str | Path | None = None,
        dist: Distributed | None = None,
        run_dir: str | Path | None = None,
        stop: StopRequest | None = None,
    ):
        self.config, t = config, config.train
        self.dist = dist if dist is not None else Distributed(device=resolve_device(t.device))
        check_world_size(config, self.dist.world_size)
        storage.check_out(out_root)  # before Path(""), which is the working folder
        resume = Path(resume) if resume is not None else None
        run_dir = Path(run_dir) if run_dir is not None else None
        preflight(
            config,
            self.dist.device,
            world_size=self.dist.world_size,
            is_main=self.dist.is_main,
            out_root=Path(out_root),
            resume=resume,
            run_dir=run_dir,
        )
        self.device = self.dist.device
        self.corpus = load_corpus(config.data.source, val_fraction=config.data.val_fraction)
        self.variants = self._build_variants()
        # Accuracy against the baseline twin and the heatmap overview, per variant (log steps only).
        baseline = next(run for run in self.variants if run.variant.name == config.baseline)
        self.drifts = {
            run.variant.name: WeightDrift(run.model, baseline.model)
            for run in self.variants
            if run.variant.precision == "fp8"
        }
        self.overviews = {run.variant.name: ScalingOverview(f"variant {run.variant.name}") for run in self.variants}
        self.sampler = BatchSampler(self.corpus.train, t.batch_size, t.block_size, t.seed)
        val = BatchSampler(self.corpus.val, t.batch_size, t.block_size, t.seed + 1)
        self.val_batches = [tuple(a.to(self.device) for a in val.batch(i)) for i in range(t.eval_batches)]
        self.progress = Progress(t.steps, enabled=progress and self.dist.is_main, main=self.dist.is_main)
        self.summary = RunSummary(config, [v.name for v in config.variants])
        self.stop = stop if stop is not None else StopRequest()
        self.flushing: set[str] = set()  # variants whose loss scale flushes every FP16 gradient (said once)
        self.folder = RunFolder(config, Path(out_root), self.dist, run_dir)
        self.log: RunLog | None = None
        self.start_step = 0
        if resume is not None:
            payload = self.folder.load_newest(resume, lambda path, p: check_variants_fit(path, p, self.variants))
            self.start_step = self.folder.restore(payload, self.variants, self.summary, self.overviews)

    @property
    def run_dir(self) -> Path | None:
        return self.folder.path

    def _build_variants(self) -> list[VariantRun]:
        """Every variant from the same initial weights (the first variant's model, seeded)."""
        torch.manual_seed(self.config.train.seed)
        reference = build_model(self.config, self.config.variants[0], self.device)
        if self.corpus.vocab_size > reference.config.vocab_size:
            raise DataError(
                f"data.source has token ids up to {self.corpus.vocab_size - 1} but model.preset "
                f"{self.config.model.preset!r} has vocab_size {reference.config.vocab_size}"
            )
        init_params = {name: p.detach() for name, p in reference.named_parameters()}
        return [VariantRun(v, self.config, init_params, self.device, self.dist) for v in self.config.variants]

    def run(self) -> dict | None:
        """Train every variant for ``train.steps`` steps; write events and summary.json.

        Returns the summary, or None when stopped by a signal (after a checkpoint); a signal
        during the final writes lets them finish, and ``self.stop`` names it (the caller
        says so: ``Progress.stopped_at_end``).
        Raises TrainingDiverged after ``train.max_consecutive_skips`` skipped steps,
        StorageError when a write fails for lack of space or permission, and
        RunFolderBusy when another process holds the run folder.
        """
        with self.stop.installed():  # signals only set a flag from here to the end, final writes included
            try:
                self.folder.claim()
                result = self._train()
            except OSError as err:  # disk full, quota, read-only: named, with the intact checkpoint
                if not storage.is_storage_fault(err):
                    raise
                if self.log is not None:
                    self.log.close_after_fault()
                raise self.folder.storage_error(err) from err
            except (MemoryError, RuntimeError) as err:  # out of memory before a checkpoint: keep nothing
                if not memory.is_out_of_memory(err) or self.folder.last_checkpoint is not None:
                    raise
                if self.log is not None:
                    self.log.close_after_fault()
                self.folder.release()
                if not self.folder.discard():
                    raise
                raise memory.ResourceError(
                    f"{memory.out_of_memory_message(err)}. Nothing was kept: the run folder it had started was removed"
                ) from err
            finally:
                self.folder.release()
        return result

    def _train(self) -> dict | None:
        cfg = self.config
        if self.start_step >= cfg.train.steps:  # resumed from the final checkpoint
            return self._finished_already()
        self.log = RunLog(
            self.run_dir,
            self.variants,
            self.start_step,
            self.dist.is_main,
            f"source `{self.corpus.source}`, fingerprint `{self.corpus.fingerprint}`, device `{self.device}`",
        )
        if self.dist.enabled:  # a job that dies is resumed from this folder
            self.progress.note(f"run folder: {self.run_dir} ({self.dist.world_size} processes)")
        for run in self.variants:
            if run.sharded:  # which weights travel as FP8 (summary.json has the reasons)
                gathered = run.model.fp8_all_gather.values()
                fp8 = sum(way == "fp8" for way in gathered)
                how = (
                    f"{fp8} of {len(gathered)} GEMM weights all-gathered in FP8"
                    if self.config.train.fp8_all_gather
                    else "weights all-gathered in their own dtype (train.fp8_all_gather=false)"
                )
                self.progress.note(f"variant {run.variant.name}: FSDP over {self.dist.world_size} ranks; {how}")
        for step in range(self.start_step, cfg.train.steps):
            self._step(step)
            if self.dist.any_rank(bool(self.stop)):  # ranks stop together, after the same step (host flags)
                path = self._save_checkpoint(step + 1)
                self.log.close()
                self.progress.stopped(self.stop.name, step + 1, path, self.run_dir)
                return None
        return self._finish()

    def _step(self, step: int) -> None:
        t = self.config.train
        # host tensors, this rank's slice of the global batch; each variant copies them to its device
        x, y = self.sampler.batch(step, self.dist.rank, self.dist.world_size)
        lr = learning_rate(step, self.config)
        log = is_log_step(step, t.log_interval, last=step == t.steps - 1)
        whatif = log and is_whatif_step(step, t.whatif_interval)
        stats = {run.variant.name: run.train_step(x, y, lr, log, whatif=whatif) for run in self.variants}
        if log:  # every variant took this step: weights compare at the same step
            for run in self.variants:
                self._log_train(run, step + 1, stats[run.variant.name])
            self.progress.update(
                step + 1, {r.variant.name: self.summary.last_train(r.variant.name) for r in self.variants}
            )
        if (step + 1) % t.eval_interval == 0 or step == t.steps - 1:
            self._evaluate(step + 1)
        if t.checkpoint_interval and (step + 1) % t.checkpoint_interval == 0 and step + 1 < t.steps:
            # A checkpoint inside a run of skipped steps would only replay the fault on
            # resume: keep the last good one instead (one sync, on checkpoint steps only).
            if any(bool(run.consecutive_skips) for run in self.variants):
                self.progress.note(f"checkpoint at step {step + 1} deferred: that step was skipped (non-finite)")
            else:
                self._save_checkpoint(step + 1)

    def _log_train(self, run: VariantRun, step: int, stats) -> None:
        """One variant's log step: metrics, layer statistics, drift and the heatmap; then the
        divergence check."""
        name = run.variant.name
        metrics = run.take_train_metrics(self.config.train.batch_size * self.config.train.block_size)
        metrics["perf/peak_mem_mb"] = run.peak_mem_mb()
        drift = self.drifts[name].read() if name in self.drifts else {}
        self.summary.record_train(name, step, metrics, stats)
        self.log[name].scalars(step, {**metrics, **self.summary.fault_scalars(name), **stats.scalars(), **drift})
        overview = self.overviews[name]
        overview.add(step, stats)
        if overview and self.dist.is_main:  # the heatmap of every log step so far (Images tab)
            self.log[name].image("overview/scaling", overview.png(), step)
        self._check_diverged(run, step, metrics)
        self._check_loss_scale(run, step, metrics)

    def _evaluate(self, step: int) -> None:
        results = {run.variant.name: run.evaluate(self.val_batches) for run in self.variants}
        base = results[self.config.baseline]["loss/val"]
        for name, metrics in results.items():
            if name != self.config.baseline:
                metrics["compare/val_loss_rel_gap"] = (metrics["loss/val"] - base) / base
            self.log[name].scalars(step, metrics)
            self.summary.record_eval(name, step, metrics)
        self.progress.note_eval(results)
        for run in self.variants:
            self.log[run.variant.name].histories(step, run.collector.histories())

    def _check_loss_scale(self, run: VariantRun, step: int, metrics: dict) -> None:
        """At log steps: say once per variant when its loss scale has decayed to where every FP16
        gradient flushes to zero (``loss_scale.flushing_scale``): it no longer learns."""
        scale, name = metrics.get("precision/loss_scale"), run.variant.name
        tokens = self.config.train.batch_size * self.config.train.block_size
        if scale is None or scale > flushing_scale(tokens) or name in self.flushing:
            return
        self.flushing.add(name)
        c = run.variant.loss_scale
        self.progress.warn(
            f"variant {name!r} stopped learning at step {step}: its loss scale fell to {scale:.3g}, at or below "
            f"{flushing_scale(tokens):.3g} ({tokens} tokens x 2**-25), where every FP16 gradient rounds to zero; "
            f"{int(metrics['faults/skipped_steps'])} skipped steps each multiplied it by loss_scale_backoff_factor="
            f"{c.backoff_factor:g}. Raise variants.{name}.loss_scale_backoff_factor (GradScaler's is 0.5)"
        )

    def _check_diverged(self, run: VariantRun, step: int, metrics: dict) -> None:
        """At log steps: stop when the run of skipped steps reached the limit."""
        limit = self.config.train.max_consecutive_skips
        if metrics["faults/consecutive_skips"] < limit:
            return
        layers = sorted(self.summary.nonfinite[run.variant.name].by_layer_role()) or [
            "none (the loss itself was non-finite)"
        ]
        last = self.folder.last_checkpoint
        last = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"variant {run.variant.name!r}: {int(metrics['faults/consecutive_skips'])} consecutive steps up to step "
            f"{step} had a non-finite loss or gradient (train.max_consecutive_skips={limit}); layers whose amax "
            f"went non-finite: {', '.join(layers)}; {last}"
        )

    def _save_checkpoint(self, step: int) -> Path | None:
        """Flush the event files (so nothing logged before ``step`` can be lost), then write
        the checkpoint of ``step`` atomically (rank 0)."""
        if self.dist.is_main:
            self.log.flush()
        return self.folder.save_checkpoint(step, self.variants, self.summary, self.overviews)

    def _result(self) -> dict:
        for run in self.variants:
            self.summary.first_batch[run.variant.name] = run.first_batch_sha
            if run.sharded:
                self.summary.sharding[run.variant.name] = run.sharding()
        return self.summary.to_dict(self.corpus.fingerprint, str(self.device))

    def _finish(self) -> dict:
        result = self._result()
        self.log.hparams(self.config, self.variants, result)
        self.log.close()
        self._save_checkpoint(self.config.train.steps)
        self._write_summary(result)
        return result

    def _write_summary(self, result: dict) -> None:
        if self.dist.is_main:  # the heatmap of the whole run, beside summary.json
            self.folder.finish(result, {name: view.png() for name, view in self.overviews.items() if view})
        self.dist.barrier()  # the job ends when rank 0's files are written
        self.progress.finish(self.summary.table(result), self.run_dir)

    def _finished_already(self) -> dict:
        """A resume from the final checkpoint writes no event (the hparams and every event
        were closed before that checkpoint was written) and no checkpoint; summary.json and
        the heatmaps are written only when summary.json is missing or not this run's (the
        process died in its final writes). So resuming a finished run changes no file, and
        resuming it again, none either."""
        result = self._result()
        if self.dist.broadcast(self.folder.has_summary(result) if self.dist.is_main else None):  # rank 0 decides
            self.progress.note(f"the run already finished all {self.config.train.steps} steps; nothing to do")
            self.progress.finish(self.summary.table(result), self.run_dir)
            return result
        self._write_summary(result)
        return result
