"""MXFP8: one E8M0 (power-of-2) scale per 32 consecutive values along the contraction dim.

Invariant: ``MXFP8BlockScaling`` is immutable and valid once constructed, with Transformer
Engine's names and defaults (E4M3 everywhere). A block's E8M0 code ``e`` is, by
``scale_calculation_mode`` (torchao's ``ScaleCalculationMode`` names):

- "rceil" (the default, TE's and cuBLAS's only rule): TE's ``float_to_e8m0(amax * (1 / fp8_max))``,
  the float32 product rounded up to a power of two, ``2^ceil(log2(amax / fp8_max))``;
- "floor" (the OCP MX spec's), "ceil", "even": torchao's rules from amax's own exponent
  (``te_scales.torchao_e8m0``); "floor" and "even" can clamp a block's largest values.

Values are multiplied by ``2^(127 - e)`` before the cast and the GEMM multiplies them back by
``2^(e - 127)``, so a dequantized block is exact (``fp8lab.scaling.blockwise`` does the rest).
A block with code 0 (amax below about fp8_max * 2^-127: zeros or float32-subnormal-range
values) is multiplied by 1, as TE's ``exp2f_rcp`` and torchao's "rceil" do, so its nonzero
values flush to zero; torchao's other modes multiply it by 2^126 (dividing by their
float32-normal floor), which fp8lab does not model (such blocks differ from torchao there). No
state persists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fp8lab.formats import FP8Format, Role, check_fp8_format
from fp8lab.scaling.blockwise import BlockwiseScaling, tile
from fp8lab.scaling.protocol import KEEP_BF16, TE_PINNED, te_format
from fp8lab.scaling.te_scales import e8m0_scale, e8m0_scale_inv, e8m0_scales, float_to_e8m0, torchao_e8m0

BLOCK = 32
# torchao 0.18's ScaleCalculationMode values; only "rceil" exists in Transformer Engine.
SCALE_CALCULATION_MODES = ("rceil", "floor", "ceil", "even")


@dataclass(frozen=True, kw_only=True)
class MXFP8BlockScaling(BlockwiseScaling):
    """Microscaling FP8 (TE's ``MXFP8BlockScaling``; on hardware: Blackwell, sm_100).

    Args:
        fp8_format: "e4m3" (TE's default) or "hybrid" (E5M2 gradients).
        enable_2d_quantization: 32x32 blocks for weights (TE's option), instead of 1x32.
        scale_calculation_mode: how a block's amax becomes its E8M0 scale, one of
            ``SCALE_CALCULATION_MODES`` (torchao's names): "rceil" (TE's, the default), or
            torchao's "floor", "ceil", "even", which Transformer Engine cannot run.
    """

    fp8_format: str = "e4m3"
    enable_2d_quantization: bool = False
    scale_calculation_mode: str = "rceil"

    name = "mxfp8"

    def __post_init__(self) -> None:
        check_fp8_format(self.fp8_format)
        if not isinstance(self.enable_2d_quantization, bool):
            raise ValueError(f"enable_2d_quantization must be a bool, got {self.enable_2d_quantization!r}")
        if self.scale_calculation_mode not in SCALE_CALCULATION_MODES:
            raise ValueError(
                f"scale_calculation_mode must be one of {SCALE_CALCULATION_MODES}, got {self.scale_calculation_mode!r}"
            )

    def block(self, role: Role, usage: str) -> tuple[int, int]:
        dim = 2 if role == Role.WEIGHT and self.enable_2d_quantization else 1
        return tile(dim, usage, BLOCK)

    def block_codes(self, amax: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
        """The E8M0 codes (int32, 0..255) of blocks with these amaxes, by ``scale_calculation_mode``."""
        if self.scale_calculation_mode != "rceil":
            return torchao_e8m0(amax, self.scale_calculation_mode, math.floor(math.log2(fmt.max)), fmt.mantissa_bits)
        # TE's max_norm_rcp, filled on the device: torch.tensor(v, device="cuda") would be a
        # blocking host-to-device copy, which synchronises the stream at every cast.
        rcp = torch.full((), 1.0 / fmt.max, dtype=torch.float32, device=amax.device)
        return float_to_e8m0(amax.float() * rcp)

    def block_scales(self, amax: torch.Tensor, fmt: FP8Format, input_dtype: torch.dtype):
        """(scale, scale_inv) of blocks with these amaxes: powers of two from E8M0 codes."""
        if self.scale_calculation_mode == "rceil":
            return e8m0_scales(amax, fmt.max)
        code = self.block_codes(amax, fmt)
        return e8m0_scale(code), e8m0_scale_inv(code)

    def te_accumulation(self, gemm: int) -> str:
        """MXFP8 runs on Blackwell (sm_100), whose block-scaled MMA applies the E8M0 scales
        inside the instruction; that accumulator is not Hopper's and no bit-exact model of it
        is published, so fp8lab accumulates MXFP8 GEMMs in fp32 (a named limit of the model)."""
        return "fp32"

    def accumulation_error(self, acc) -> str | None:
        if acc.kind != "fp32":
            return (
                "MXFP8's 32-element block scales are applied inside Blackwell's MMA, whose accumulator is not "
                "modelled; only 'fp32' (or 'te') accumulation applies"
            )
        return None

    def unsupported(self, backend: str, device) -> str | None:
        """TE's ``check_recipe_support``: MXFP8 on sm_100 up to, not including, sm_120."""
        if backend == "te" and self.scale_calculation_mode != "rceil":
            return self._te_mode_refusal()
        if backend == "te" and not ((10, 0) <= (device.capability or (0, 0)) < (12, 0)):
            return "Transformer Engine's MXFP8BlockScaling needs sm_100 (Blackwell; not sm_120)"
        return super().unsupported(backend, device)

    @classmethod
    def advice(cls, problem: str) -> str:
        """E8M0 scales rounded up (TE's and the default "rceil") keep each 1x32 block's amax
        within fp8_max, so only inf clamps; the other rounding modes can clamp a block's largest
        values. Flushed values lie more than E4M3's range below their block's amax, in the
        finest blocks TE offers."""
        if problem == "overflow":
            return (
                "with scale_calculation_mode='rceil' (the default, TE's) each block's E8M0 scale keeps its amax "
                "within fp8_max and only inf clamps (see faults/nonfinite_amax); 'floor' and 'even' round some "
                "scales down and clamp those blocks' largest values: use 'rceil'"
            )
        return f"the flushed values lie more than E4M3's range below their 1x32 block's amax (TE's finest): {KEEP_BF16}"

    def _te_mode_refusal(self) -> str:
        return (
            f"Transformer Engine's MXFP8BlockScaling rounds block scales up ('rceil') only; "
            f"scale_calculation_mode={self.scale_calculation_mode!r} has no TE equivalent"
        )

    def te_recipe(self) -> dict:
        """TE's MXFP8BlockScaling; raises ValueError for a ``scale_calculation_mode`` TE lacks
        (TE has no such field, so building its recipe anyway would silently run "rceil")."""
        if self.scale_calculation_mode != "rceil":
            raise ValueError(self._te_mode_refusal())
        kwargs = {
            "fp8_format": te_format(self.fp8_format),
            "margin": 0,
            "enable_2d_quantization": self.enable_2d_quantization,
            **TE_PINNED,
        }
        return {"recipe": "MXFP8BlockScaling", "kwargs": kwargs, "mmparams": None, "qparams": None}
