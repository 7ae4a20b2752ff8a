"""Rowwise FP8 as torchao defines it: one scale per row of the left operand, per column of the right.

Invariant: ``Float8RowwiseScaling`` is immutable and valid once constructed, with torchao 0.18's
names (``Float8LinearRecipeName.ROWWISE`` and ``ROWWISE_WITH_GW_HP``, built by
``Float8LinearConfig.from_recipe_name``); it keeps no state. Every operand is E4M3, gradients
included. Each GEMM operand gets one scale per slice along the dimension the GEMM contracts
(torchao's "axiswise" casts): x and grad_out per row in fprop and dgrad, w per output row in
fprop and per input column in dgrad, x and grad_out per column in wgrad:

    fprop:  y      = x_fp8 (per row)        @ w_fp8^T (per row of w)     (fast accumulation)
    dgrad:  grad_x = grad_out_fp8 (per row) @ w_fp8 (per column of w)    "rowwise"
                                            @ w_fp8 (one scale)          "rowwise_with_gw_hp"
    wgrad:  grad_w = grad_out_fp8^T (per column) @ x_fp8 (per column)    "rowwise"
                   = grad_out^T @ x in high precision, no cast           "rowwise_with_gw_hp"
            y += bias after the GEMM's rounding, in y's dtype (torchao's ``output + bias``)

A scale is torchao's ``amax_to_scale``: ``fp8_max / max(amax, 1e-12)`` in float64, rounded to
float32, then ``exp2(floor(log2(scale)))`` in float32 (both recipes set
``round_scales_to_power_of_2``): a zero slice gets 2^48; a slice holding inf gets scale 0 (its
finite values cast to 0, inf to NaN); NaN propagates (torch's ``amax``). The amax is torch's
``abs().amax`` over the slice (NaN propagates). Scales are powers of two, so dequantized
values are exact: with an fp32 accumulator the GEMM takes them (``x_fp8 / scale``, torchao's
``emulate=True``: one fp32 GEMM, then the output dtype); a fast or promoted accumulator takes
the FP8 values and the epilogue multiplies its fp32 accumulator by ``1/sA[i] * 1/sB[j]`` (the
product formed first; for powers of two any order gives the same result, barring subnormals).
Not modelled: torchao's GPU path writes rowwise GEMMs of fp32 and fp16 models in bf16 first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8lab.formats import E4M3, FPROP, WGRAD, FP8Format, Role
from fp8lab.quantize.blocks import block_cast_stats
from fp8lab.scaling.protocol import COLUMNWISE, KEEP_BF16, ROWWISE, Operand, Scaling

# torchao 0.18's Float8LinearRecipeName values this recipe implements.
RECIPE_NAMES = ("rowwise", "rowwise_with_gw_hp")
EPS = 1e-12  # torchao.float8.float8_utils.EPS, the floor under every amax


def torchao_scale(amax: torch.Tensor, fp8_max: float) -> torch.Tensor:
    """torchao 0.18's ``amax_to_scale(amax, dtype, round_scales_to_power_of_2=True)``, element-wise.

    ``fp8_max / max(amax, 1e-12)`` in float64, rounded once to float32, then
    ``exp2(floor(log2(.)))`` in float32, torch's own ops, so a float32 quotient just below a power
    of two whose log2 rounds up to an integer keeps that power (as torchao's does). amax 0 (or
    below 1e-12): 2^48 for E4M3; amax inf: 0; amax NaN: NaN.
    """
    scale = (fp8_max / torch.clamp(amax.to(torch.float64), min=EPS)).to(torch.float32)
    return torch.exp2(torch.floor(torch.log2(scale)))


@dataclass(frozen=True, kw_only=True)
class Float8RowwiseScaling(Scaling):
    """torchao's rowwise FP8 training recipes (``Float8LinearConfig.from_recipe_name``).

    Args:
        recipe_name: one of ``RECIPE_NAMES``: "rowwise" (all three GEMMs in FP8 with axiswise
            scales, the default) or "rowwise_with_gw_hp" (the weight one scale in dgrad, the
            weight-gradient GEMM in high precision).
    """

    recipe_name: str = "rowwise"

    name = "rowwise"
    per_tensor = False
    bias_after_gemm = True
    fp8_format = "e4m3"  # every operand, gradients included (not a field: torchao fixes it)

    def __post_init__(self) -> None:
        if not isinstance(self.recipe_name, str) or self.recipe_name not in RECIPE_NAMES:
            raise ValueError(f"recipe_name must be one of {RECIPE_NAMES}, got {self.recipe_name!r}")

    @property
    def hp_wgrad(self) -> bool:
        """Whether the weight-gradient GEMM runs in high precision ("rowwise_with_gw_hp")."""
        return self.recipe_name == "rowwise_with_gw_hp"

    def format_for(self, role: Role) -> FP8Format:
        return E4M3

    def block(self, x2d: torch.Tensor, role: Role, usage: str) -> tuple[int, int] | None:
        """The slice one scale covers: a whole row (rowwise usage) or column (columnwise), the
        whole tensor for the weight of "rowwise_with_gw_hp"'s dgrad, or None: not cast at all
        (that recipe's wgrad operands)."""
        r, c = x2d.shape
        if self.hp_wgrad and usage == COLUMNWISE:
            return (r, c) if role == Role.WEIGHT else None
        return (1, c) if usage == ROWWISE else (r, 1)

    def scales(self, x2d: torch.Tensor, block: tuple[int, int], fmt: FP8Format) -> tuple[torch.Tensor, torch.Tensor]:
        """(amax, scale) of every slice, (ceil(R/br), ceil(C/bc)) float32."""
        magnitude = x2d.abs()
        if block == tuple(x2d.shape):
            amax = magnitude.amax().reshape(1, 1)
        else:
            amax = magnitude.amax(dim=1 if block[0] == 1 else 0, keepdim=True)
        return amax.float(), torchao_scale(amax, fmt.max)

    def operand(
        self, x2d: torch.Tensor, role: Role, usage: str, *, state, backend, record: bool, slot, raw: bool = False
    ) -> Operand:
        """Cast with one scale per slice along the contracted dimension. Values dequantized
        exactly, or (``raw``, for a fast or promoted accumulator) the FP8 values with their
        inverse scales, (R, 1) per row or (1, C) per column, for the epilogue. The rowwise cast
        counts NaN/inf faults in training and leaves cast and per-row statistics on log steps."""
        fmt, block = self.format_for(role), self.block(x2d, role, usage)
        if block is None:
            return Operand(x2d, None)  # high precision: the tensor itself, as torchao's wgrad takes it
        amax, scale = self.scales(x2d, block, fmt)
        scale_inv = scale.reciprocal()  # exact: a power of two
        if record and usage == ROWWISE:
            slot.count_faults(role, amax.max())
        values = backend.quantize_blocks(x2d, block, scale, None if raw else scale_inv, fmt)
        if slot is not None and slot.armed and usage == ROWWISE:
            stats = block_cast_stats(x2d, None if raw else values, block, scale, fmt)  # None: the same cast, redone
            slot.cast_stats[role] = stats[:3]
            slot.record_blocks(role, stats[3:], amax.max())
        return Operand(values, scale_inv if raw else None, fmt)

    @classmethod
    def whatif_stats(cls, x2d: torch.Tensor, role: Role, fmt: FP8Format) -> torch.Tensor:
        block = (1, x2d.shape[1])
        _, scale = cls().scales(x2d, block, fmt)
        return block_cast_stats(x2d, None, block, scale, fmt, block_stats=False)

    def te_accumulation(self, gemm: int) -> str:
        """What torchao asks of the GPU (``Float8LinearConfig``'s ``gemm_config_*``):
        ``use_fast_accum=True`` for the output GEMM (fast), False for grad_input and grad_weight
        (promoted); "rowwise_with_gw_hp"'s wgrad is no FP8 GEMM ("fp32": the high-precision GEMM)."""
        if gemm == WGRAD and self.hp_wgrad:
            return "fp32"
        return "fast" if gemm == FPROP else "promoted"

    def unsupported(self, backend: str, device) -> str | None:
        if backend == "te":
            return "Transformer Engine has no recipe for torchao's rowwise scaling"
        if backend == "scaled_mm":
            return "fp8lab does not drive torch._scaled_mm's rowwise-scaled kernel yet"
        return None

    @classmethod
    def advice(cls, problem: str) -> str:
        """Each row's scale maps its own amax to at most fp8_max (a power of two rounded down), so
        only inf clamps; flushed values lie more than E4M3's range below their row's amax."""
        if problem == "overflow":
            return (
                "each row's scale maps its own amax to at most fp8_max, so only inf clamps: see faults/nonfinite_amax"
            )
        return (
            "the flushed values lie more than E4M3's range below their row's amax: use smaller blocks "
            f"(variants.<name>.scaling=block or mxfp8), or {KEEP_BF16}"
        )

    def te_recipe(self) -> dict:
        """Raises ValueError: Transformer Engine has no rowwise recipe (torchao's own)."""
        raise ValueError("Transformer Engine has no recipe for torchao's rowwise scaling (Float8RowwiseScaling)")
