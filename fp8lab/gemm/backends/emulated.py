"""The emulated backend: FP8 numerics in software, on any device.

Invariant: operands are the exact FP8 values (rounded by ``fp8lab.quantize.tensor`` with the
scale it is given; it never computes one), held in the dtype of the machine's exact GEMM
path (bf16 or fp32), and the GEMM is the hardware model: the tensor cores' accumulator of
the GEMM's ``Accumulator`` (``fp8lab.gemm.accumulate``: fast, promoted; "fp32" is
``fp8lab.gemm.exact.scaled_gemm``'s exact fp32 GEMM), then the epilogue
``round(acc * (a_inv * b_inv) + bias)`` in the output dtype. Block-scaled operands arrive
dequantized (exact: their scales are powers of two) with no inverse scale for an fp32
accumulator, or as FP8 values with per-group scales that a promoting accumulator applies.
"""

from __future__ import annotations

import torch

from fp8lab.accumulation import FP32, Accumulator
from fp8lab.formats import FP8Format
from fp8lab.gemm.accumulate import tensor_core_accumulate, tensor_core_gemm
from fp8lab.gemm.backends.base import QuantizedGemmBackend
from fp8lab.gemm.exact import GemmPath, epilogue, scaled_gemm
from fp8lab.quantize.blocks import cast_blocks_dequantized
from fp8lab.quantize.tensor import cast_to_fp8_grid


def _inv_product(a_inv: torch.Tensor | None, b_inv: torch.Tensor | None) -> torch.Tensor | None:
    """``scale_inv_a * scale_inv_b`` in float32 (one rounding), as the GEMM epilogue forms it; per-row
    (M, 1) and per-column (1, N) inverse scales (rowwise scaling) give their (M, N) outer product."""
    if a_inv is None:
        return b_inv
    return a_inv if b_inv is None else a_inv * b_inv


class EmulatedBackend(QuantizedGemmBackend):
    """FP8 numerics in software: exact FP8 values, the exact GEMM of ``path``.

    Args:
        path: the exact GEMM path of the device type (``fp8lab.gemm.exact.gemm_path``).
    """

    name = "emulated"

    def __init__(self, path: GemmPath):
        self.path = path

    @property
    def models_accumulation(self) -> bool:
        """The tensor-core accumulator model runs on the CPU only (a C kernel); an accelerator's
        emulation would copy every GEMM there, so it accumulates in fp32 instead (and says so)."""
        return self.path.name != "cuda"

    def accumulators(self, fp8) -> tuple:
        return super().accumulators(fp8) if self.models_accumulation else (FP32, FP32, FP32)

    def quantize(self, x_hp: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
        return cast_to_fp8_grid(x_hp, scale, fmt, dtype=self.path.operand_dtype)

    def fp8_values(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(self.path.operand_dtype)  # every FP8 value is exact in bf16 and fp32

    def quantize_blocks(self, x2d: torch.Tensor, block, scale, scale_inv, fmt: FP8Format) -> torch.Tensor:
        """``x2d`` cast block by block with the given power-of-2 scales, dequantized exactly
        (``scale_inv`` None: the FP8 values, held in the exact path's dtype)."""
        unscale = torch.ones_like(scale) if scale_inv is None else scale_inv
        return cast_blocks_dequantized(x2d, block, scale, unscale, fmt, dtype=self.path.operand_dtype)

    def gemm(
        self,
        a,
        b,
        a_inv,
        b_inv,
        out_dtype: torch.dtype,
        bias=None,
        *,
        accumulator: Accumulator = FP32,
        formats=(None, None),
        group_scales=(None, None),
        **_hardware,
    ) -> torch.Tensor:
        """The hardware model of ``a @ b`` with ``accumulator``; ``formats`` are the operands'
        FP8 formats and ``group_scales`` their per-group block scales (both for a fast or
        promoted accumulator, see ``fp8lab.gemm.accumulate``). The block shapes (``blocks``)
        only a hardware GEMM needs: the group scales already say everything per K group."""
        inv = _inv_product(a_inv, b_inv)
        if accumulator.kind == "fp32" and group_scales == (None, None):
            return scaled_gemm(a, b, inv, out_dtype, bias, path=self.path)
        if inv is not None and inv.dim() > 0:  # per-row/column scales (rowwise): an (M, N) epilogue
            acc = tensor_core_accumulate(
                a, b, *formats, accumulator, a_group_scale=group_scales[0], b_group_scale=group_scales[1]
            )
            return epilogue(acc, inv, out_dtype, bias)
        return tensor_core_gemm(
            a,
            b,
            *formats,
            accumulator,
            _inv_product(a_inv, b_inv),
            out_dtype,
            bias,
            a_group_scale=group_scales[0],
            b_group_scale=group_scales[1],
        )
