"""Executors: who runs a GEMM whose operands are FP8-quantized.

Invariant: an executor receives scales (and their inverses) as inputs and never
computes them. ``quantize`` turns a high-precision tensor into the executor's operand
type; ``gemm(a, b, a_inv, b_inv)`` returns ``(a @ b) * a_inv * b_inv`` in ``out_dtype``.

- ``emulated`` (any device): operands are exact FP8 values held in bfloat16, the GEMM
  accumulates in float32 (oneDNN/AMX on CPU, cuBLAS on GPU). The CPU bf16 GEMM can only
  emit bf16, so its output is rounded to bf16 once before the inverse scales are applied
  (relative error <= 2^-9, small next to E4M3's 2^-4 step); the hardware rounds once.
- ``scaled_mm`` (CUDA, compute capability >= 8.9): real float8 operands through
  ``torch._scaled_mm``. Never used on CPU, where its kernel runs at a few GFLOP/s.
"""

from __future__ import annotations

import torch

from fp8lab.cast import cast_to_fp8, cast_to_fp8_grid
from fp8lab.formats import FP8Format


class EmulatedExecutor:
    name = "emulated"

    @staticmethod
    def quantize(x_hp: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
        return cast_to_fp8_grid(x_hp, scale, fmt)

    @staticmethod
    def gemm(
        a: torch.Tensor,
        b: torch.Tensor,
        a_inv: torch.Tensor,
        b_inv: torch.Tensor,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        out = torch.mm(a, b)  # bf16 x bf16, fp32 accumulation, bf16 out
        if out_dtype == torch.bfloat16:
            return out.mul_(a_inv * b_inv)  # computed in fp32, rounded once
        return out.to(out_dtype).mul_(a_inv * b_inv)


class ScaledMMExecutor:
    name = "scaled_mm"

    @staticmethod
    def quantize(x_hp: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
        return cast_to_fp8(x_hp, scale, fmt)

    @staticmethod
    def gemm(
        a: torch.Tensor,
        b: torch.Tensor,
        a_inv: torch.Tensor,
        b_inv: torch.Tensor,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        if a.device.type != "cuda":
            raise RuntimeError("the scaled_mm executor runs on CUDA only; use 'emulated' elsewhere")
        # cuBLASLt FP8 wants A row-major and B column-major (copies of 1-byte data).
        a = a if a.is_contiguous() else a.contiguous()
        b = b if b.t().is_contiguous() else b.t().contiguous().t()
        out_dtype_mm = out_dtype if out_dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
        out = torch._scaled_mm(
            a, b, scale_a=a_inv.reshape(()), scale_b=b_inv.reshape(()), out_dtype=out_dtype_mm
        )
        return out if out.dtype == out_dtype else out.to(out_dtype)


EXECUTORS = {"emulated": EmulatedExecutor, "scaled_mm": ScaledMMExecutor}
