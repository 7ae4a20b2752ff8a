"""The rounded backends: no FP8, a BF16, FP16 or FP32 GEMM by the hardware model, on any device.

Invariant: operands are rounded to the backend's precision (nearest even) with no scale,
and the GEMM is the same exact ``fp8lab.gemm.exact.scaled_gemm`` as the emulation's (fp32
accumulation, bias in fp32, one rounding to the output dtype), so a BF16 (FP16, FP32) model
differs from an FP8 one only in its operands. It reads and writes no scaling state.

One class for the three precisions, told apart by ``precision``; the path holding the
operands comes from ``fp8lab.gemm.exact.rounded_gemm_path`` (bf16: the machine's BF16
path; fp16 and fp32: an fp32 GEMM on the exact operand values).
"""

from __future__ import annotations

import torch
from torch import nn

from fp8lab.gemm.exact import ROUNDED_DTYPES, GemmPath, round_operand, scaled_gemm
from fp8lab.gemm.qlinear import output_dtype, quantized_linear


class RoundedBackend:
    """A GEMM on operands rounded to ``precision`` (no scale), the exact GEMM of ``path``.

    Args:
        path: the exact GEMM path (``fp8lab.gemm.exact.rounded_gemm_path``); its
            ``operand_dtype`` must hold every value of ``precision`` exactly.
        precision: "bf16", "fp16" or "fp32" (also the backend's name, as plans name it).
    """

    fp8 = False

    def __init__(self, path: GemmPath, precision: str = "bf16"):
        if precision not in ROUNDED_DTYPES:
            raise ValueError(f"precision must be one of {tuple(ROUNDED_DTYPES)}, got {precision!r}")
        self.path, self.name, self.dtype = path, precision, ROUNDED_DTYPES[precision]

    def round(self, x_hp: torch.Tensor) -> torch.Tensor:
        """x rounded to the backend's dtype (nearest even), held in the path's operand dtype."""
        return round_operand(x_hp, self.name, self.path)

    def gemm(self, a, b, a_inv, b_inv, out_dtype: torch.dtype, bias=None, **fp8_only) -> torch.Tensor:
        """The exact fp32-accumulated GEMM (the accumulator options of FP8 GEMMs do not apply)."""
        return scaled_gemm(a, b, None, out_dtype, bias, path=self.path)

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, layer.gemm_weight(), layer.bias, None, None, self, output_dtype(x), record=False)

    def scaling_view(self, layer: nn.Module) -> None:
        return None  # no FP8, no scaling to read
