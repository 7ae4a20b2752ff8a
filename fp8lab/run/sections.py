"""The sections of a run config: data, model, training, and each variant, frozen and validated.

Invariant: a section that exists is valid; every field is checked in ``__post_init__`` and
a bad one raises ``ConfigError`` naming its dotted key (``train.steps``,
``variants.fp8.backend``) and what is allowed. ``fp8lab.run.config.RunConfig`` holds them
and checks the rules that span sections (``validate``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from fp8lab.layers.attention import ATTENTION_CORES
from fp8lab.layers.fp8_weight import SCALINGS as FP8_WEIGHT_SCALINGS
from fp8lab.layers.fp8_weight import WEIGHT_SETTINGS
from fp8lab.layers.gpt import PRESETS
from fp8lab.optim import OPTIMIZER_STATES
from fp8lab.options import FP8Options
from fp8lab.run.checks import ConfigError, check, check_int
from fp8lab.run.loss_scale import LossScaleConfig
from fp8lab.run.precision import check_variant
from fp8lab.scaling import DelayedScaling, Scaling
from fp8lab.telemetry.step import check_intervals

PRECISIONS = ("bf16", "fp8", "fp32", "fp16")
DEVICES = ("auto", "cpu", "cuda")
PARALLEL = ("ddp", "fsdp")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes of a command line (surrogateescape)
        return False


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    source: str = "stdlib"  # "stdlib" | "text:PATH" | "tokens:PATH"
    val_fraction: float = 0.1

    def __post_init__(self):
        check(
            isinstance(self.source, str) and (self.source == "stdlib" or self.source.startswith(("text:", "tokens:"))),
            "data.source",
            "'stdlib', 'text:PATH' or 'tokens:PATH'",
            self.source,
        )
        check(
            _utf8(self.source),
            "data.source",
            "a path in UTF-8 (the run's config.json and TensorBoard text record it; rename the file)",
            self.source,
        )
        check(
            isinstance(self.val_fraction, float) and 0 < self.val_fraction <= 0.5,
            "data.val_fraction",
            "a float in (0, 0.5]",
            self.val_fraction,
        )


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    preset: str = "tiny"
    num_layers: int | None = None  # None: the preset's value
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    ffn_hidden_size: int | None = None
    attention_core: str = "auto"  # "auto" (float32 on CPU), "native" or "fp32"

    def __post_init__(self):
        check(
            isinstance(self.preset, str) and self.preset in PRESETS,
            "model.preset",
            f"one of {tuple(PRESETS)}",
            self.preset,
        )
        check(
            self.attention_core in ATTENTION_CORES,
            "model.attention_core",
            f"one of {ATTENTION_CORES}",
            self.attention_core,
        )
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
            value = getattr(self, name)
            if value is not None:
                check_int(value, f"model.{name}")
                # far beyond any model that fits a machine, and what C sizes (ssize_t) can hold
                check(value < 2**31, f"model.{name}", "an int < 2**31", value)

    def overrides(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "preset" and v is not None}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    block_size: int = 128
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_interval: int = 10
    # What-if statistics (every scaling recipe's cast of each FP8 operand) cost about three
    # extra casts per operand on a log step: None computes them on every log step, an int
    # (a multiple of log_interval) on every whatif_interval-th step only.
    whatif_interval: int | None = None
    eval_interval: int = 100
    eval_batches: int = 8
    seed: int = 1337
    device: str = "auto"
    checkpoint_interval: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    max_consecutive_skips: int = 5
    # How N processes (--nproc, torchrun) share the model: "ddp" replicates it (gradients
    # all-reduced), "fsdp" shards parameters, gradients and optimizer state per block and at the
    # root (FSDP2); one process trains the whole model either way.
    parallel: str = "ddp"
    # FSDP only: FP8 layers' weight shards are cast to FP8 before the all-gather (1 byte an
    # element; bit-identical for per-tensor recipes, which alone use it: fp8lab.gemm.fp8_all_gather)
    fp8_all_gather: bool = True

    def __post_init__(self):
        for name in (
            "steps",
            "batch_size",
            "block_size",
            "log_interval",
            "eval_interval",
            "eval_batches",
            "keep_checkpoints",
            "max_consecutive_skips",
        ):
            check_int(getattr(self, name), f"train.{name}")
        for name in ("warmup_steps", "seed", "checkpoint_interval"):
            check_int(getattr(self, name), f"train.{name}", low=0)
        try:
            check_intervals(self.log_interval, self.whatif_interval, prefix="train.")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        check(self.seed < 2**64, "train.seed", "an int in [0, 2**64 - 1] (torch seeds are 64-bit)", self.seed)
        for name in ("lr", "min_lr", "weight_decay"):
            value = getattr(self, name)
            check(
                isinstance(value, float) and math.isfinite(value) and value >= 0,
                f"train.{name}",
                "a float >= 0 (finite)",
                value,
            )
        # Degenerate values that train nothing: AdamW moves a weight by up to lr per step,
        # and multiplies it by (1 - lr * weight_decay); a gradient clipped to norm 0 is zero.
        check(
            0 < self.lr <= 1, "train.lr", "a float in (0, 1] (AdamW moves every weight by up to lr per step)", self.lr
        )
        check(self.min_lr <= self.lr, "train.min_lr", f"<= train.lr ({self.lr})", self.min_lr)
        check(
            self.lr * self.weight_decay < 1,
            "train.weight_decay",
            f"< 1 / train.lr ({1 / self.lr:.4g}): AdamW multiplies every weight by 1 - lr * weight_decay per step",
            self.weight_decay,
        )
        check(
            isinstance(self.grad_clip, float) and self.grad_clip > 0,
            "train.grad_clip",
            "a float > 0 (inf: no clipping; 0 would zero every gradient)",
            self.grad_clip,
        )
        check(self.device in DEVICES, "train.device", f"one of {DEVICES}", self.device)
        check(self.parallel in PARALLEL, "train.parallel", f"one of {PARALLEL}", self.parallel)
        check(isinstance(self.fp8_all_gather, bool), "train.fp8_all_gather", "a bool", self.fp8_all_gather)


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One model trained in the run: a rung of the precision ladder (fp32, fp16, bf16, fp8;
    ``fp8lab.run.precision`` says what each means), with its settings.

    The FP8 fields are flat (``--set variants.<name>.backend=...`` sets one) and are
    checked by building the variant's ``FP8Options`` once, exposed as ``fp8``; the loss-
    scaling fields likewise build ``loss_scale``. A field the precision does not use must
    keep its default (``fp8lab.run.precision.check_variant``).
    """

    name: str
    precision: str = "fp8"
    scaling: Scaling = field(default_factory=DelayedScaling)  # any of fp8lab.scaling.SCALINGS
    backend: str = "auto"
    fallback: str = "emulated"
    # How the tensor cores accumulate the FP8 GEMMs (fp8lab.accumulation): "te", "fast", "promoted", "fp32"
    accumulation: str = "te"
    keep_bf16: tuple[str, ...] = ("lm_head",)  # layer-name patterns kept in BF16
    first_last_bf16: int = 0  # Megatron-style: first N and last N blocks in BF16
    activations: str | None = None  # fp8 only: "bf16" (None) or "fp16"; other precisions: their own
    master_weights: bool = True  # False: parameters and AdamW state in the activations' dtype
    # How AdamW stores its moments between steps (fp8lab.optim.OPTIMIZER_STATES): "fp32" (torch's
    # fused AdamW), "fp8-lm" (exp_avg E4M3 + exp_avg_sq FP16, per-tensor scales), "fp8-block"
    # (both E4M3, blocks of 256); the low-precision ones need master weights (FP8-LM's O2 setting).
    optimizer_state: str = "fp32"
    # FP8 attention (Transformer Engine's recipe field of that name): QK^T and PV as FP8 GEMMs with their own
    # delayed-scaling states (fp8lab.layers.fp8_attention); fp8 variants with delayed scaling only
    fp8_dpa: bool = False
    # How the FP8 Linears' weights are stored (fp8lab.layers.fp8_weight): "hp" (fp32 parameters, cast to
    # FP8 at every forward), "fp8" (FP8 codes + scale are the parameter, TE's quantized_model_init; the
    # update is applied to the dequantized weight and cast back) or "fp8-master" (the same with an fp32
    # master copy the optimizer updates, cast after each step); fp8 variants with delayed or current scaling
    weights: str = "hp"
    # Dynamic loss scaling (FP16 activations only; torch.amp.GradScaler's defaults)
    loss_scale_init: float = 2.0**16
    loss_scale_growth_factor: float = 2.0
    loss_scale_backoff_factor: float = 0.5
    loss_scale_growth_interval: int = 2000

    def __post_init__(self):
        check(
            isinstance(self.name, str) and self.name.replace("_", "").replace("-", "").isalnum(),
            "variant.name",
            "letters, digits, '_' or '-'",
            self.name,
        )
        check(self.precision in PRECISIONS, f"variants.{self.name}.precision", f"one of {PRECISIONS}", self.precision)
        try:  # FP8Options names the bad field first in its message
            fp8 = FP8Options(
                scaling=self.scaling, backend=self.backend, fallback=self.fallback, accumulation=self.accumulation
            )
        except ValueError as err:
            raise ConfigError(f"variants.{self.name}.{err}") from None
        object.__setattr__(self, "fallback", fp8.fallback)  # a legacy spelling is stored normalised
        object.__setattr__(self, "_fp8", fp8)  # not a field: no second copy in to_dict() or the hash
        check(
            isinstance(self.keep_bf16, tuple),
            f"variants.{self.name}.keep_bf16",
            "a tuple of name patterns",
            self.keep_bf16,
        )
        check_int(self.first_last_bf16, f"variants.{self.name}.first_last_bf16", low=0)
        check_variant(self)
        check(
            isinstance(self.optimizer_state, str) and self.optimizer_state in OPTIMIZER_STATES,
            f"variants.{self.name}.optimizer_state",
            f"one of {tuple(OPTIMIZER_STATES)}",
            self.optimizer_state,
        )
        check(isinstance(self.fp8_dpa, bool), f"variants.{self.name}.fp8_dpa", "a bool", self.fp8_dpa)
        check(
            not self.fp8_dpa or getattr(self.scaling, "name", None) == "delayed",
            f"variants.{self.name}.fp8_dpa",
            "False unless the variant's scaling is 'delayed' (FP8 attention keeps amax histories, as TE's does)",
            self.fp8_dpa,
        )
        check(
            isinstance(self.weights, str) and self.weights in WEIGHT_SETTINGS,
            f"variants.{self.name}.weights",
            f"one of {WEIGHT_SETTINGS}",
            self.weights,
        )
        check(
            self.weights == "hp" or getattr(self.scaling, "name", None) in FP8_WEIGHT_SCALINGS,
            f"variants.{self.name}.weights",
            f"'hp' unless the variant's scaling is one of {FP8_WEIGHT_SCALINGS} (one scale per weight tensor)",
            self.weights,
        )
        check(
            self.weights == "hp" or self.master_weights is True,
            f"variants.{self.name}.weights",
            "'hp' when master_weights is false (the other parameters' dtype; 'fp8' is FP8 weights without master)",
            self.weights,
        )
        check(
            self.optimizer_state == "fp32" or self.master_weights is True,
            f"variants.{self.name}.optimizer_state",
            "'fp32' when master_weights is false (FP8/FP16 moments update fp32 master weights)",
            self.optimizer_state,
        )
        try:  # LossScaleConfig names its field first: init, growth_factor, ...
            loss_scale = LossScaleConfig(
                init=self.loss_scale_init,
                growth_factor=self.loss_scale_growth_factor,
                backoff_factor=self.loss_scale_backoff_factor,
                growth_interval=self.loss_scale_growth_interval,
            )
        except ValueError as err:
            raise ConfigError(f"variants.{self.name}.loss_scale_{err}") from None
        object.__setattr__(self, "_loss_scale", loss_scale)

    @property
    def fp8(self) -> FP8Options:
        """The FP8 options every GEMM of this variant's model gets (precision "fp8")."""
        return self._fp8

    @property
    def loss_scale(self):
        """The ``LossScaleConfig`` of this variant (used when its activations are FP16)."""
        return self._loss_scale
