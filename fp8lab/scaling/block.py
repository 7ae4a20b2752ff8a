"""Block scaling (DeepSeek-V3 style): one scale per 1x128 tile or 128x128 block.

Invariant: ``Float8BlockScaling`` is immutable and valid once constructed, with Transformer
Engine's names and defaults: E4M3 everywhere, 1-D tiles (1 x 128 along the dimension the
GEMM contracts) for activations and gradients, 2-D 128 x 128 blocks for weights. Each
block's scale is TE's ``compute_scale_from_amax`` of the block's amax (fp8_max / amax in
float32, after the ``amax_epsilon`` floor), rounded down to a power of two by default; a
block of zeros gets scale 1; its inverse scale is the float32 ``1 / scale``
(``fp8lab.scaling.blockwise`` does the rest).

With power-of-2 scales (TE's default) the dequantized values of a block are exact, so the
emulation's one GEMM on them equals the hardware's per-block accumulation. With
``use_f32_scales`` (TE's field, NVTE_FP8_BLOCK_SCALING_FP32_SCALES) the scale keeps its
float32 mantissa and dequantizing is no longer exact: the GEMM then always takes the FP8
values with their group scales, applied at each promotion as the hardware does
(``fp8lab.gemm.accumulate``: ``acc = fma(partial, sA * sB, acc)``, with "fp32" accumulation too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8lab.formats import FP8Format, Role, check_fp8_format
from fp8lab.scaling.blockwise import BlockwiseScaling, tile
from fp8lab.scaling.current import check_epsilon
from fp8lab.scaling.protocol import KEEP_BF16, TE_PINNED, te_format
from fp8lab.scaling.te_scales import te_scale_from_amax

BLOCK = 128


def _check_dim(name: str, value) -> None:
    if value not in (1, 2) or isinstance(value, bool):
        raise ValueError(f"{name} must be 1 (1x128 tiles) or 2 (128x128 blocks), got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Float8BlockScaling(BlockwiseScaling):
    """Blockwise FP8 scaling (TE's ``Float8BlockScaling``).

    Args:
        fp8_format: "e4m3" (TE's default here) or "hybrid" (E5M2 gradients).
        x_block_scaling_dim: 1 (1x128 tiles) or 2 (128x128 blocks) for inputs.
        w_block_scaling_dim: the same for weights (default 2).
        grad_block_scaling_dim: the same for output gradients (default 1).
        amax_epsilon: a floor under every block's amax.
        use_f32_scales: float32 block scales (fp8_max / amax, not rounded to a power of two;
            TE's ``QParams(power_2_scale=False)``), default False (powers of two).
    """

    fp8_format: str = "e4m3"
    x_block_scaling_dim: int = 1
    w_block_scaling_dim: int = 2
    grad_block_scaling_dim: int = 1
    amax_epsilon: float = 0.0
    use_f32_scales: bool = False

    name = "block"

    def __post_init__(self) -> None:
        check_fp8_format(self.fp8_format)
        for name in ("x_block_scaling_dim", "w_block_scaling_dim", "grad_block_scaling_dim"):
            _check_dim(name, getattr(self, name))
        dims = (self.x_block_scaling_dim, self.w_block_scaling_dim, self.grad_block_scaling_dim)
        if sum(d == 2 for d in dims) > 1:  # a GEMM of two 2-D blocked operands (TE refuses it too)
            raise ValueError(f"at most one of x/w/grad_block_scaling_dim may be 2 (2D by 2D block GEMM), got {dims}")
        check_epsilon(self.amax_epsilon)
        if not isinstance(self.use_f32_scales, bool):
            raise ValueError(f"use_f32_scales must be a bool, got {self.use_f32_scales!r}")

    @property
    def exact_dequantization(self) -> bool:
        """Power-of-2 scales dequantize exactly; float32 scales go to the GEMM with the values."""
        return not self.use_f32_scales

    def block(self, role: Role, usage: str) -> tuple[int, int]:
        dim = (self.x_block_scaling_dim, self.w_block_scaling_dim, self.grad_block_scaling_dim)[role]
        return tile(dim, usage, BLOCK)

    def block_scales(self, amax: torch.Tensor, fmt: FP8Format, input_dtype: torch.dtype):
        """(scale, scale_inv) of blocks with these amaxes; scale_inv = 1 / scale in float32
        (exact for power-of-2 scales; TE's ``1.0 / scale``, one rounding, for float32 ones)."""
        value_for_inf = (
            torch.finfo(input_dtype).max if input_dtype.is_floating_point else torch.finfo(torch.float32).max
        )
        scale = te_scale_from_amax(
            amax, fmt.max, pow2=not self.use_f32_scales, epsilon=float(self.amax_epsilon), value_for_inf=value_for_inf
        )
        return scale, scale.reciprocal()

    def te_accumulation(self, gemm: int) -> str:
        """Float8BlockScaling fixes ``use_split_accumulator=True`` for all three GEMMs (TE's
        ``__post_init__`` asserts it): promoted, the 1x128 / 128x128 scales applied at each
        promotion."""
        return "promoted"

    def accumulation_error(self, acc) -> str | None:
        if acc.kind == "promoted" and acc.group_k != BLOCK:
            return (
                f"block scaling applies its {BLOCK}-wide block scales at each promotion: promote_every x chunk "
                f"must be {BLOCK}, got {acc.promote_every} x {acc.chunk}"
            )
        if self.use_f32_scales and acc.kind == "fp32" and acc.group_k != BLOCK:
            return (
                f"float32 block scales are applied per {BLOCK}-wide K group even in fp32 accumulation: "
                f"promote_every x chunk must be {BLOCK}, got {acc.promote_every} x {acc.chunk}"
            )
        return super().accumulation_error(acc)

    def unsupported(self, backend: str, device) -> str | None:
        """TE's ``check_recipe_support``: block scaling from sm_90 with CUDA 12.9. torch's
        blockwise scaled GEMM (``ScaledBlas.cpp`` ``_check_deepseek_support``): Hopper (sm_9x)
        only, cuBLAS 12.9 or newer, and a torch that has it (``DeviceFacts.torch_blockwise``)."""
        capability, cuda = device.capability or (0, 0), device.cuda or (0, 0)
        if backend == "te" and not (capability >= (9, 0) and cuda >= (12, 9)):
            return "Transformer Engine's Float8BlockScaling needs sm_90 or newer and CUDA 12.9 or newer"
        if backend == "scaled_mm":
            gemm = "torch's blockwise scaled GEMM (1x128/128x128 scales)"
            if capability[0] != 9:
                return f"{gemm} runs on Hopper (sm_90) only, not sm_{capability[0]}{capability[1]}"
            if cuda < (12, 9):
                return f"{gemm} needs cuBLAS 12.9 or newer; this torch was built with CUDA {cuda[0]}.{cuda[1]}"
            if not device.torch_blockwise:
                return "this torch lacks the blockwise scaled GEMM (F.scaled_mm, ScalingType.BlockWise1x128)"
            return None
        return super().unsupported(backend, device)

    @classmethod
    def advice(cls, problem: str) -> str:
        """Each block's own amax sets its (power-of-2, rounded down) scale, so only inf clamps;
        flushed values lie more than E4M3's range below their block's amax."""
        if problem == "overflow":
            return (
                "each block's scale maps its own amax to at most fp8_max, so only inf clamps: see faults/nonfinite_amax"
            )
        return (
            "the flushed values lie more than E4M3's range below their block's amax: use smaller blocks "
            f"(variants.<name>.scaling=mxfp8, 1x32), lower amax_epsilon if it is set, or {KEEP_BF16}"
        )

    def te_recipe(self) -> dict:
        dims = {
            name: getattr(self, name)
            for name in ("x_block_scaling_dim", "w_block_scaling_dim", "grad_block_scaling_dim")
        }
        kwargs = {
            "fp8_format": te_format(self.fp8_format),
            **dims,
            "use_f32_scales": self.use_f32_scales,
            **TE_PINNED,
        }
        return {
            "recipe": "Float8BlockScaling",
            "kwargs": kwargs,
            "mmparams": self.te_split_accumulator(),
            "qparams": {"power_2_scale": not self.use_f32_scales, "amax_epsilon": float(self.amax_epsilon)},
        }
