"""The emulated backend: FP8 numerics in software, on any device.

Invariant: operands are the exact FP8 values (rounded by ``fp8lab.quantize.tensor`` with the
scale it is given; it never computes one), held in the dtype of the machine's exact GEMM
path (bf16 or fp32), and the GEMM is ``fp8lab.gemm.exact.scaled_gemm``: the hardware
model, ``round(fp32(a @ b) * (a_inv * b_inv) + bias)`` in the output dtype. Block-scaled
operands arrive dequantized (exact: their scales are powers of two) with no inverse scale.
"""

from __future__ import annotations

import torch

from fp8lab.formats import FP8Format
from fp8lab.gemm.backends.base import QuantizedGemmBackend
from fp8lab.gemm.exact import GemmPath, scaled_gemm
from fp8lab.quantize.blocks import cast_blocks_dequantized
from fp8lab.quantize.tensor import cast_to_fp8_grid


def _inv_product(a_inv: torch.Tensor | None, b_inv: torch.Tensor | None) -> torch.Tensor | None:
    """``scale_inv_a * scale_inv_b`` in float32 (one rounding), as the GEMM epilogue forms it."""
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

    def quantize(self, x_hp: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
        return cast_to_fp8_grid(x_hp, scale, fmt, dtype=self.path.operand_dtype)

    def quantize_blocks(self, x2d: torch.Tensor, block, scale, scale_inv, fmt: FP8Format) -> torch.Tensor:
        """``x2d`` cast block by block with the given power-of-2 scales, dequantized exactly."""
        return cast_blocks_dequantized(x2d, block, scale, scale_inv, fmt, dtype=self.path.operand_dtype)

    def gemm(self, a, b, a_inv, b_inv, out_dtype: torch.dtype, bias=None) -> torch.Tensor:
        return scaled_gemm(a, b, _inv_product(a_inv, b_inv), out_dtype, bias, path=self.path)
