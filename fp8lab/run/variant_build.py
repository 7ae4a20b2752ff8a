"""How a variant's model and optimizer are built: the GPT with the variant's precision policy
and scaling, the backends it may use, and its AdamW (torch's fused one or LowPrecisionAdamW).

Invariant: every variant is built from the same config the same way, so the runner can give
each the same initial weights; nothing here trains or reads a tensor's values.
"""

from __future__ import annotations

import dataclasses
import importlib

import torch

import fp8lab
from fp8lab.gemm.hardware import BackendUnavailable
from fp8lab.layers.gpt import GPT
from fp8lab.layers.policy import PrecisionPolicy
from fp8lab.optim import OPTIMIZER_STATES, LowPrecisionAdamW
from fp8lab.optim.fp8_weights import FP8WeightUpdate
from fp8lab.run.config import ConfigError, RunConfig, Variant
from fp8lab.run.precision import rung_of


def build_model(config: RunConfig, variant: Variant, device: torch.device) -> GPT:
    """The GPT of ``config.model`` with the variant's GEMM precisions: FP8 with its policy's
    kept layers in the activations' precision, or every GEMM in the rung's precision.
    Parameters are fp32 here (the shared initial weights); ``VariantRun`` casts them when
    the variant has no master weights."""
    rung = rung_of(variant)
    fp8 = variant.precision == "fp8"
    policy = PrecisionPolicy(
        keep_bf16=variant.keep_bf16, first_last_bf16=variant.first_last_bf16, precision=rung.activations
    )
    model = GPT.from_preset(
        config.model.preset,
        **config.model.overrides(),
        block_size=config.train.block_size,
        fp8=variant.fp8 if fp8 else dataclasses.replace(variant.fp8, backend="bf16"),
        policy=policy if fp8 else None,
        fp8_dpa=variant.fp8_dpa,  # False for every other precision (check_variant)
    )
    model = rung.prepare_gemms(model)  # built on the CPU: moved only to another device
    return model if device.type == "cpu" else model.to(device)


def check_backends(model: torch.nn.Module, variant: Variant, device: torch.device) -> None:
    """Choose every FP8 layer's backend now, so that one which cannot run here (e.g.
    ``backend='te'`` without Transformer Engine) is refused before anything is written
    rather than at the first forward."""
    key = f"variants.{variant.name}.backend"
    plans = []
    for layer in model.modules():
        if isinstance(layer, fp8lab.Linear):
            try:
                plans.append(layer.plan(device))
            except BackendUnavailable as err:
                raise ConfigError(f"{key}={variant.backend!r} cannot run here: {err}") from None
    if any(plan.backend == "te" for plan in plans):
        try:  # found installed; an import that fails (ABI, CUDA) would otherwise stop the first step
            importlib.import_module("transformer_engine.pytorch")
        except Exception as err:
            raise ConfigError(
                f"{key}: Transformer Engine is installed but `import transformer_engine.pytorch` "
                f"failed ({type(err).__name__}: {err}); reinstall it for this torch "
                "(pip install 'fp8lab[te]') or set backend='scaled_mm'"
            ) from None


def param_groups(model: torch.nn.Module, weight_decay: float, fp8_weights: FP8WeightUpdate | None = None) -> list[dict]:
    """AdamW groups: matrices decay, vectors (norms, biases) and embeddings' peers don't. An
    FP8 primary weight is stepped through its stand-in (``fp8lab.optim.fp8_weights``)."""
    swap = fp8_weights.substitute if fp8_weights is not None else (lambda p: p)
    decay = [swap(p) for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [swap(p) for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: torch.nn.Module, variant: Variant, config: RunConfig, fp8_weights: FP8WeightUpdate | None = None
) -> torch.optim.Optimizer:
    """The variant's AdamW: torch's fused one (fp32 moments, or the parameters' dtype without
    master weights), or ``LowPrecisionAdamW`` for ``optimizer_state`` "fp8-lm"/"fp8-block"."""
    groups, t = param_groups(model, config.train.weight_decay, fp8_weights), config.train
    if variant.optimizer_state == "fp32":
        # fused: one kernel per step, and its step counters never leave the device
        # (the default single-tensor path calls .item() on them every step).
        return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95), fused=True)
    return LowPrecisionAdamW(groups, lr=t.lr, betas=(0.9, 0.95), **OPTIMIZER_STATES[variant.optimizer_state])
