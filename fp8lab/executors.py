"""Executors: who runs a GEMM whose operands are FP8-quantized.

Invariant: an executor receives scales (and their inverses) as inputs and never
computes them. ``quantize`` turns a high-precision tensor into the executor's operand
type; ``gemm(a, b, a_inv, b_inv)`` returns ``(a @ b) * a_inv * b_inv`` in ``out_dtype``.

- ``emulated`` (any device): operands are exact FP8 values held in bfloat16, the GEMM
  accumulates in float32 (oneDNN/AMX on CPU, cuBLAS on GPU). The CPU bf16 GEMM can only
  emit bf16, so its output is rounded to bf16 once before the inverse scales are applied
  (relative error <= 2^-9, small next to E4M3's 2^-4 step); the hardware rounds once.
- ``scaled_mm`` (CUDA, compute capability >= 8.9): real float8 operands through
  ``torch._scaled_mm``. Never used on CPU, where its kernel runs at a few GFLOP/s. It
  re-lays out and zero-pads its operands to cuBLASLt's contract (see the class).
"""

from __future__ import annotations

import torch

from fp8lab.cast import cast_to_fp8, cast_to_fp8_grid
from fp8lab.backends.select import HW_GEMM_MULTIPLE
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


def _is_row_major(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and t.stride(0) > 1  # torch's meta_scaled_mm test, exactly


def _is_col_major(t: torch.Tensor) -> bool:
    return t.stride(0) == 1 and t.stride(1) > 1


def _a_operand(a: torch.Tensor, k_pad: int) -> torch.Tensor:
    """A as cuBLASLt takes it: row-major (M, k_pad), zero columns appended."""
    m, k = a.shape
    if k == k_pad and _is_row_major(a):
        return a
    # Built through uint8 views: zero bits are +0.0 in both FP8 formats, and uint8
    # fill/copy kernels exist everywhere (float8 ones need not).
    out = (torch.zeros if k < k_pad else torch.empty)(m, k_pad, dtype=torch.uint8, device=a.device)
    out[:, :k].copy_(a.view(torch.uint8))
    return out.view(a.dtype)


def _b_operand(b: torch.Tensor, k_pad: int) -> torch.Tensor:
    """B as cuBLASLt takes it: column-major (k_pad, N), zero rows appended."""
    k, n = b.shape
    if k == k_pad and _is_col_major(b):
        return b
    out = (torch.zeros if k < k_pad else torch.empty)(n, k_pad, dtype=torch.uint8, device=b.device)
    out[:, :k].copy_(b.t().view(torch.uint8))
    return out.view(b.dtype).t()


class ScaledMMExecutor:
    """``torch._scaled_mm`` with per-tensor scales (torch 2.13 contract, see meta_scaled_mm).

    A must be row-major and B column-major; K (A's columns) and both dimensions of B must
    be multiples of 16; M is free; scales are float32 with one element; E5M2 x E5M2 is
    refused by cuBLASLt (never asked for: "hybrid" pairs E5M2 gradients with E4M3).
    fprop (x @ w^T) and dgrad (g @ w) have K, N in {in_features, out_features}, which
    select_backend guarantees are multiples of 16. The wgrad (g^T @ x) contracts over
    the token count M, which is dynamic: it is zero-padded to a multiple of 16 here
    (exact: zero rows add nothing), costing one copy of each operand when M % 16 != 0.
    """

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
        # "meta" only checks shapes and layouts against torch's meta function (no compute).
        if a.device.type not in ("cuda", "meta"):
            raise RuntimeError("the scaled_mm executor runs on CUDA only; use 'emulated' elsewhere")
        k_pad = -(-a.shape[1] // HW_GEMM_MULTIPLE) * HW_GEMM_MULTIPLE
        # Layout copies (1-byte data): dgrad's B = w (N, K) and both wgrad operands
        # (g^T, x) arrive row-major/transposed and are re-laid out here.
        a = _a_operand(a, k_pad)
        b = _b_operand(b, k_pad)
        out_dtype_mm = out_dtype if out_dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
        out = torch._scaled_mm(
            a, b, scale_a=a_inv.reshape(()), scale_b=b_inv.reshape(()), out_dtype=out_dtype_mm
        )
        return out if out.dtype == out_dtype else out.to(out_dtype)


EXECUTORS = {"emulated": EmulatedExecutor, "scaled_mm": ScaledMMExecutor}
