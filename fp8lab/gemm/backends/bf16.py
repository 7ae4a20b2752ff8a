"""The BF16 backend: no FP8, the BF16 hardware model, on any device.

Invariant: operands are rounded to bf16 (nearest even) with no scale, and the GEMM is the
same exact ``fp8lab.gemm.exact.scaled_gemm`` as the emulation's (fp32 accumulation, bias
in fp32, one rounding to the output dtype), so the BF16 baseline differs from an FP8
variant only in its operands. It reads and writes no scaling state.
"""

from __future__ import annotations

import torch
from torch import nn

from fp8lab.gemm.exact import GemmPath, scaled_gemm
from fp8lab.gemm.qlinear import output_dtype, quantized_linear


class BF16Backend:
    """A BF16 GEMM: operands rounded to bf16 (no scale), the exact GEMM of ``path``.

    Args:
        path: the exact GEMM path of the device type (``fp8lab.gemm.exact.gemm_path``).
    """

    name = "bf16"
    fp8 = False

    def __init__(self, path: GemmPath):
        self.path = path

    def round(self, x_hp: torch.Tensor) -> torch.Tensor:
        """x rounded to bf16 (nearest even), held in the path's operand dtype."""
        return x_hp.to(torch.bfloat16).to(self.path.operand_dtype)

    def gemm(self, a, b, a_inv, b_inv, out_dtype: torch.dtype, bias=None) -> torch.Tensor:
        return scaled_gemm(a, b, None, out_dtype, bias, path=self.path)

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, layer.gemm_weight(), layer.bias, None, None, self, output_dtype(x), record=False)

    def scaling_view(self, layer: nn.Module) -> None:
        return None  # no FP8, no scaling to read
