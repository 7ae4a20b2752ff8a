"""The precision ladder: what a variant's precision means for its model and training step.

Invariant: one ``Rung``, derived from a variant's fields, decides everything precision does
to a variant: the autocast dtype, the precision of every GEMM that is not FP8, the dtype of
parameters, gradients and AdamW state, and whether the loss is scaled. ``check_variant``
refuses, with a ``ConfigError`` naming the key, any field set to something its precision
does not use, so no variant trains differently from what its config says.

| precision | activations (autocast) | GEMMs                  | params, grads, AdamW state | loss scaling |
|-----------|------------------------|------------------------|----------------------------|--------------|
| fp32      | fp32 (no autocast)     | fp32                   | fp32                       | no           |
| fp16      | fp16                   | fp16                   | fp32, or fp16 without master weights | dynamic |
| bf16      | bf16                   | bf16                   | fp32, or bf16 without master weights | no      |
| fp8       | bf16, or fp16          | FP8 (kept layers: *)   | fp32, or the activations'  | with fp16    |

(*) kept layers (the LM head) run in the activations' precision. Every GEMM follows the
hardware model of ``fp8lab.gemm.exact`` (one rounding to the output dtype), FP8 GEMMs with
the variant's ``accumulation`` (``fp8lab.accumulation``), the others with fp32 accumulation.
Norms compute in fp32 on every rung. The attention core (``model.attention_core="auto"``)
computes in fp32 on CPU for every rung (on the fp16/bf16
values of q, k and v, the output rounded to the activations' dtype) and in the
activations' dtype on a GPU; the fp32 rung's core is fp32 everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from fp8lab.gemm.exact import ROUNDED_DTYPES
from fp8lab.layers.linear import Linear
from fp8lab.run.checks import ConfigError

ACTIVATIONS = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "fp8": "bf16"}  # precision -> default
FP8_ACTIVATIONS = ("bf16", "fp16")  # what an FP8 variant's activations may be (Transformer Engine's)
FP8_FIELDS = ("scaling", "backend", "fallback", "accumulation", "keep_bf16", "first_last_bf16", "fp8_dpa", "weights")
LOSS_SCALE_FIELDS = (
    "loss_scale_init",
    "loss_scale_growth_factor",
    "loss_scale_backoff_factor",
    "loss_scale_growth_interval",
)


@dataclass(frozen=True)
class Rung:
    """What one variant's precision means (see the module docstring's table).

    Attributes:
        precision: the variant's precision ("fp32", "fp16", "bf16", "fp8").
        activations: the activations' precision, also that of every non-FP8 GEMM.
        master_weights: parameters and AdamW state in fp32 (else in the activations' dtype).
    """

    precision: str
    activations: str
    master_weights: bool

    @property
    def activation_dtype(self) -> torch.dtype:
        return ROUNDED_DTYPES[self.activations]

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.float32 if self.master_weights else self.activation_dtype

    @property
    def loss_scaling(self) -> bool:
        """FP16 activations: gradients below 2**-24 would flush to zero without it."""
        return self.activations == "fp16"

    @property
    def plain_gradients(self) -> bool:
        """fp32 gradients that are not scaled: torch's own clip_grad_norm_ applies."""
        return self.master_weights and not self.loss_scaling

    def autocast(self, device: torch.device):
        """The forward's autocast region (none for fp32: every op in fp32)."""
        if self.activations == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.activation_dtype)

    def prepare_gemms(self, model: nn.Module) -> nn.Module:
        """Every fp8lab Linear of a non-FP8 variant runs its GEMMs in this rung's precision
        (an FP8 variant's kept layers are set by its PrecisionPolicy)."""
        if self.precision != "fp8":
            reason = f"variant precision {self.precision!r}: no FP8 GEMMs"
            for module in model.modules():
                if isinstance(module, Linear):
                    module.keep_out_of_fp8(reason, self.activations)
        return model

    @torch.no_grad()
    def cast_parameters_(self, model: nn.Module) -> nn.Module:
        """Parameters to ``param_dtype`` in place (identity kept: ties and the optimizer see
        the same objects); buffers such as FP8 scaling state stay fp32."""
        for param in model.parameters():
            if param.dtype != self.param_dtype:
                param.data = param.data.to(self.param_dtype)
        return model


def rung_of(variant) -> Rung:
    """The Rung of a (validated) ``fp8lab.run.config.Variant``."""
    return Rung(variant.precision, variant.activations or ACTIVATIONS[variant.precision], variant.master_weights)


def check_variant(variant) -> None:
    """Raise ConfigError for a field ``variant``'s precision does not use (set to a value
    other than its default), or an FP8 activation precision not allowed.

    Args:
        variant: the Variant being validated (its precision is one of ACTIVATIONS).
    """
    key, precision = f"variants.{variant.name}", variant.precision
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(variant)
        if f.name in FP8_FIELDS + LOSS_SCALE_FIELDS
    }

    def refuse(field: str, why: str) -> None:
        raise ConfigError(
            f"{key}.{field} does not apply to precision {precision!r} ({why}); got "
            f"{getattr(variant, field)!r}: remove it, or change {key}.precision"
        )

    if variant.activations is not None:
        if precision != "fp8":
            refuse(
                "activations",
                f"precision {precision!r} runs its activations in {ACTIVATIONS[precision]}; only 'fp8' chooses them",
            )
        if variant.activations not in FP8_ACTIVATIONS:
            raise ConfigError(
                f"{key}.activations must be one of {FP8_ACTIVATIONS} or None (bf16), got {variant.activations!r}"
            )
    if not isinstance(variant.master_weights, bool):
        raise ConfigError(f"{key}.master_weights must be a bool, got {variant.master_weights!r}")
    if precision == "fp32" and not variant.master_weights:
        refuse("master_weights", "fp32 parameters are the master weights; there is no lower copy to drop")
    if precision != "fp8":
        for field in FP8_FIELDS:
            if getattr(variant, field) != defaults[field]:
                refuse(field, "it sets how FP8 GEMMs run, and this variant has none")
    if not rung_of(variant).loss_scaling:
        for field in LOSS_SCALE_FIELDS:
            if getattr(variant, field) != defaults[field]:
                refuse(
                    field,
                    "loss scaling is for FP16 activations: precision 'fp16', or 'fp8' with "
                    "activations='fp16'; bf16 and fp32 have fp32's exponent range",
                )
