"""One variant of a run: its model, optimizer, train step, evaluation and telemetry.

Invariant: every variant starts from the same initial weights and is fed the batches
the runner gives it. A training step makes no device-to-host copy: the loss is summed
on the device, timings use CUDA events (or the host clock on CPU), the loss scale lives
on the device, and the collector, the FP16 flush probe, the optimizer-state probe and the memory counts only run
when the runner asks for a log step. What the variant's precision changes (autocast,
GEMM precision, parameter dtype, loss scaling) comes from its ``Rung``
(``fp8lab.run.precision``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math

import torch
import torch.nn.functional as F

from fp8lab.gemm.fp8_all_gather import whole_tensor
from fp8lab.optim import LowPrecisionAdamW
from fp8lab.optim.fp8_weights import fp8_primary_weights
from fp8lab.run import footprint, sharded_state
from fp8lab.run.config import ConfigError, RunConfig, Variant
from fp8lab.run.distributed import Distributed, token_loss
from fp8lab.run.loss_scale import DynamicLossScaler, clip_scaled_
from fp8lab.run.precision import rung_of
from fp8lab.run.timer import StepTimer
from fp8lab.run.variant_build import build_model, build_optimizer, check_backends
from fp8lab.telemetry.collector import LayerStats
from fp8lab.telemetry.fp16_flush import FP16FlushProbe
from fp8lab.telemetry.optimizer_state import OptimizerStateProbe, StoredMomentProbe
from fp8lab.telemetry.step import StepTelemetry
from fp8lab.telemetry.weight_updates import LostUpdateProbe


class VariantRun:
    """Model, optimizer and bookkeeping of one variant.

    Args:
        variant: what to train.
        config: the run config (model shape, optimizer settings).
        init_params: the shared initial parameters by name (identical weights in every
            variant; each variant keeps its own fresh scaling state).
        device: where to train.
        dist: the data-parallel job this process is part of (default: a single process);
            the step then runs DDP (or FSDP2, ``train.parallel="fsdp"``: ``self.model`` is
            then sharded in place) on this rank's slice of the global batch.
    """

    def __init__(
        self,
        variant: Variant,
        config: RunConfig,
        init_params: dict,
        device: torch.device,
        dist: Distributed | None = None,
    ):
        self.variant, self.config, self.device = variant, config, device
        self.dist = dist if dist is not None else Distributed(device=device)
        self.rung = rung_of(variant)
        self.model = build_model(config, variant, device)  # un-wrapped: checkpoints, eval, telemetry
        check_backends(self.model, variant, device)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                param.copy_(init_params[name])
        self.rung.cast_parameters_(self.model)  # no master weights: the training dtype (rounded once)
        self.fp8_weights = None  # variants.<v>.weights "fp8"/"fp8-master": FP8 primary weights
        if variant.weights != "hp":
            if self.dist.enabled:
                raise ConfigError(f"variants.{variant.name}.weights={variant.weights!r}: single-process runs only")
            try:
                self.fp8_weights = fp8_primary_weights(self.model, master=variant.weights == "fp8-master")
            except ValueError as err:
                raise ConfigError(f"variants.{variant.name}.weights={variant.weights!r}: {err}") from None
        t = config.train
        self.sharded = t.parallel == "fsdp" and self.dist.enabled
        if self.sharded:  # FSDP2 in place: self.model's parameters become this rank's shards
            self.model = self.dist.shard(self.model, fp8_all_gather=t.fp8_all_gather, param_dtype=self.rung.param_dtype)
            self.train_model = self.model
        self.optimizer = build_optimizer(self.model, variant, config, self.fp8_weights)  # the shards under FSDP
        if not self.sharded:
            self.train_model = self.dist.wrap(self.model)  # DDP under torchrun, else the model itself
        # The log-step protocol (shared with fp8lab.Monitor): arming, update_scales, the counters.
        self.telemetry = StepTelemetry(self.model, log_interval=t.log_interval, whatif_interval=t.whatif_interval)
        self.collector = self.telemetry.collector
        self.timer = StepTimer(device)
        self._record = None  # what the last log step read, until take_train_metrics uses it
        self.first_batch_sha: str | None = None
        self.loss_scaler = DynamicLossScaler(variant.loss_scale, device) if self.rung.loss_scaling else None
        self.flush_probe = FP16FlushProbe(self.model) if self.rung.loss_scaling else None
        # AdamW state in 16 bits (no master weights), or moments stored in FP8/FP16: how much of
        # it underflows (log steps only)
        self.low_precision_state = isinstance(self.optimizer, LowPrecisionAdamW)
        if self.low_precision_state:
            self.state_probe = StoredMomentProbe(self.model, self.optimizer)
        else:
            self.state_probe = None if self.rung.master_weights else OptimizerStateProbe(self.model, self.optimizer)
        self.weight_probe = LostUpdateProbe(self.fp8_weights) if self.fp8_weights is not None else None
        self.saved_counter = footprint.SavedTensorCounter(self.model)
        self.memory: dict[str, int] = {}  # perf/mem_* of the last log step (host values)
        self.cuda_peak = 0  # bytes: the allocator's peak during this variant's steps since the last log

    def autocast(self):
        return self.rung.autocast(self.device)

    def train_step(
        self, x_host: torch.Tensor, y_host: torch.Tensor, lr: float, log: bool, whatif: bool = True
    ) -> LayerStats | None:
        """One optimizer step on the host batch (x, y); returns the layers' statistics on log
        steps, with the what-if statistics when ``whatif`` (else they are NaN, not logged)."""
        if self.first_batch_sha is None:  # once: proves every variant trained on the same tokens
            self.first_batch_sha = hashlib.sha256(x_host.numpy().tobytes() + y_host.numpy().tobytes()).hexdigest()[:16]
        x, y = x_host.to(self.device, non_blocking=True), y_host.to(self.device, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        scaler = self.loss_scaler
        self.telemetry.begin(log, whatif)
        if log and self.flush_probe is not None:
            self.flush_probe.arm(scaler.scale)
        if self.device.type == "cuda":  # host-side allocator statistics, no sync
            torch.cuda.reset_peak_memory_stats(self.device)
        gathered = self.model.all_gather_counter.bytes if self.sharded else 0
        with self.timer.measure(log=log):
            loss, skip = self._optimizer_step(self._forward_backward(x, y, log), log)
            # An overflow at a loss scale above 1 is loss scaling at work (the scale backs
            # off); only a non-finite loss, or gradients that overflow unscaled, is a fault.
            fault = skip if scaler is None else skip & (~torch.isfinite(loss) | (scaler.scale <= 1))
            if scaler is not None:
                scaler.update(skip)
            # On a log step: the layers, the counters and the (updated) loss scale in one copy.
            record = self.telemetry.end(loss=loss, skip=skip, fault=fault, extra=self._loss_scale())
            self._record = record if record is not None else self._record
        if log and self.sharded:  # FSDP's all-gathers of this step (forward and backward), per rank
            self.memory["perf/all_gather_bytes_per_step"] = self.model.all_gather_counter.bytes - gathered
        if log and self.flush_probe is not None:
            self.flush_probe.disarm()
        if self.device.type == "cuda":
            self.cuda_peak = max(self.cuda_peak, torch.cuda.max_memory_allocated(self.device))
        return record.stats if record is not None else None

    def _loss_scale(self) -> tuple[torch.Tensor, ...]:
        return (self.loss_scaler.scale,) if self.loss_scaler is not None else ()

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, log: bool) -> torch.Tensor:
        """Forward under the rung's autocast (saved tensors counted on log steps), then the
        backward of this rank's share of the global batch's mean loss (``run/distributed.py``:
        the ranks' shares add up to it, and DDP sums the gradients), scaled when loss scaling."""
        self.model.train()
        counting = self.saved_counter.counting() if log else contextlib.nullcontext()
        with self.autocast(), counting:
            logits = self.train_model(x)  # (B_local, T, V)
        loss = token_loss(logits, y, self.config.train.batch_size * y.shape[1])  # this rank's share
        (self.loss_scaler.scaled(loss) if self.loss_scaler is not None else loss).backward()
        return loss

    def _optimizer_step(self, local_loss: torch.Tensor, log: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip, step and zero the gradients; returns (the global mean loss, skip), both on the
        device. A non-finite loss or gradient skips the step, decided from values every rank
        shares (never one rank's own loss): fused AdamW skips itself when found_inf is 1."""
        params = list(self.model.parameters())  # after DDP's all-reduce: the same norm on every rank
        if self.rung.plain_gradients:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.train.grad_clip, foreach=True)
            grad_norm = whole_tensor(grad_norm)  # FSDP: the shards' norms combined (a replicated DTensor)
        else:  # scaled or 16-bit gradients: fp32 norm, unscaled inside the fused AdamW
            scale = self.loss_scaler.scale if self.loss_scaler is not None else None
            grad_norm = clip_scaled_(self.optimizer, params, self.config.train.grad_clip, scale)
        loss = self.dist.all_reduce_sum(local_loss.detach())  # the global mean loss, on every rank
        skip = ~(torch.isfinite(grad_norm) & torch.isfinite(loss))
        self.optimizer.found_inf = skip.float()
        if self.low_precision_state:  # count the moments stored as zero on log steps only
            self.optimizer.track_underflow = log
        if self.fp8_weights is not None:  # FP8 weights' stand-ins take their gradients (and values)
            self.fp8_weights.prepare(track=log)
        self.optimizer.step()
        if self.fp8_weights is not None:  # cast into the FP8 weights (kept on a skipped step)
            self.fp8_weights.finish(skip)
        if log:  # exact bytes, from tensor metadata only (gradients are still held here)
            self.memory = footprint.training_bytes(params, self.optimizer, self.saved_counter)
        self.optimizer.zero_grad(set_to_none=True)
        if self.fp8_weights is not None:  # the FP8 weights' own gradients (the optimizer holds stand-ins)
            self.model.zero_grad(set_to_none=True)
        return loss, skip

    def take_train_metrics(self, tokens_per_step: int) -> dict[str, float]:
        """Train loss, throughput and skip counts since the last log step (one sync).

        ``perf/tokens_per_s`` counts the training steps between log steps (all steps when
        every step logs); ``perf/log_step_ms`` is what a log step took, telemetry included."""
        timed = self.timer.take()
        seconds, timed_steps = timed["train"] if timed["train"][1] else timed["log"]
        log_seconds, log_steps = timed["log"]
        # The last log step's record, or (no log step since the last call) the counters now.
        record, self._record = self._record or self.telemetry.take(self._loss_scale()), None
        counters, extra = record.counters, record.extra
        tokens = tokens_per_step * timed_steps  # steps before a resume were timed by the dead process
        metrics = {
            "loss/train": record.mean_loss,
            "perf/tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            **({"perf/log_step_ms": 1e3 * log_seconds / log_steps} if log_steps else {}),
            "faults/skipped_steps": counters["skipped"],
            "faults/consecutive_skips": counters["consecutive_skips"],
            **self.memory,
        }
        if self.loss_scaler is not None:
            metrics["precision/loss_scale"] = extra[0]
            metrics.update(self.flush_probe.read())
        if self.state_probe is not None:
            metrics.update(self.state_probe.read())
        if self.weight_probe is not None:
            metrics.update(self.weight_probe.read())
        return metrics

    def sharding(self) -> dict:
        """How this FSDP variant is sharded: world size, and per FP8-capable layer whether its
        weight is all-gathered as FP8 or in its own dtype (and why)."""
        return {
            "world_size": self.dist.world_size,
            "fp8_all_gather": self.config.train.fp8_all_gather,
            "weights_gathered": dict(self.model.fp8_all_gather),
        }

    @property
    def consecutive_skips(self) -> torch.Tensor:
        """The current run of faulty steps (a 0-dim device tensor)."""
        return self.telemetry.counters["consecutive_skips"]

    def state_dict(self, *, weights: bool = True) -> dict:
        """Everything a checkpoint needs to continue this variant bit for bit. Under FSDP every
        rank must call it (the shards are gathered: whole tensors, the format DDP writes).
        ``weights=False``: without "model" and "optimizer" (a sharded checkpoint's DCP part
        holds them); no collective then."""
        if not weights:
            return self._bookkeeping_state()
        return {
            "model": sharded_state.whole_model_state(self.model) if self.sharded else self.model.state_dict(),
            "optimizer": sharded_state.whole_optimizer_state(self.optimizer)
            if self.sharded
            else self.optimizer.state_dict(),
            **self._bookkeeping_state(),
        }

    def _load_weights(self, state: dict) -> None:
        if self.sharded:  # whole tensors in: each rank keeps its shard
            sharded_state.load_whole_model_state(self.model, state["model"])
            sharded_state.load_whole_optimizer_state(self.optimizer, state["optimizer"])
        else:
            self.model.load_state_dict(state["model"])  # raises if scaling state is missing
            self.optimizer.load_state_dict(state["optimizer"])

    def _bookkeeping_state(self) -> dict:
        telemetry = self.telemetry.state_dict()
        return {
            "counters": telemetry["counters"],
            "faults": telemetry["faults"],
            "steps_since_log": telemetry["steps_since_take"],
            "first_batch_sha": self.first_batch_sha,
            "timer": self.timer.state_dict(),
            "loss_scale": self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
            **({"fp8_weights": self.fp8_weights.state_dict()} if self.fp8_weights is not None else {}),
        }

    def load_state_dict(self, state: dict, *, weights: bool = True) -> None:
        """``weights=False``: all but the model and optimizer (loaded from DCP before)."""
        if weights:
            self._load_weights(state)
        if self.fp8_weights is not None:  # the master copies (the FP8 codes are in the model's)
            self.fp8_weights.load_state_dict(state["fp8_weights"])
        self.telemetry.load_state_dict(
            {"counters": state["counters"], "faults": state["faults"], "steps_since_take": state["steps_since_log"]}
        )
        self.first_batch_sha = state["first_batch_sha"]
        if "timer" in state:  # older checkpoints: the interval counts the steps timed after the resume
            self.timer.load_state_dict(state["timer"])
        if self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(state["loss_scale"])

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Validation loss, perplexity and next-token accuracy over fixed batches."""
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        count = 0
        for x, y in batches:
            with self.autocast():
                logits = self.model(x)
            loss_sum += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
            correct += (logits.argmax(-1) == y).sum()
            count += y.numel()
        self.model.train()
        val_loss = float(loss_sum) / count
        return {
            "loss/val": val_loss,
            "metrics/val_ppl": math.exp(min(val_loss, 50.0)),
            "metrics/val_token_acc": float(correct) / count,
        }

    def peak_mem_mb(self) -> float:
        """CUDA: the allocator's peak during this variant's steps since the last call (all
        variants' resident tensors included); CPU: the process's max RSS."""
        if self.device.type == "cuda":
            peak, self.cuda_peak = self.cuda_peak, 0
            return peak / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process-wide on CPU
