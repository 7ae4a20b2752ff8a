"""The scaled_mm backend: real float8 operands through ``torch._scaled_mm``.

Invariant: it receives scales (and their inverses) as inputs and never computes them;
``gemm`` returns ``round(fp32(a @ b) * (a_inv * b_inv) + bias)`` in the output dtype, the
hardware model of ``fp8lab.gemm.exact``, computed by cuBLASLt. For users it runs on CUDA
with compute capability >= 8.9; tests also run it on CPU at small sizes (``select_backend``
never picks it there: torch's CPU kernel runs at a few hundredths of a GFLOP/s). Operands
are re-laid out and zero-padded to cuBLASLt's contract (see ``ScaledMMBackend``).
"""

from __future__ import annotations

import torch

from fp8lab.accumulation import FP32, Accumulator
from fp8lab.formats import FP8Format
from fp8lab.gemm.backends.base import QuantizedGemmBackend
from fp8lab.gemm.hardware import HW_GEMM_MULTIPLE
from fp8lab.quantize.tensor import cast_to_fp8


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


class ScaledMMBackend(QuantizedGemmBackend):
    """``torch._scaled_mm`` with per-tensor scales (torch 2.13 contract, see meta_scaled_mm).

    A must be row-major and B column-major; K (A's columns) and both dimensions of B must
    be multiples of 16; M is free; scales are float32 with one element; E5M2 x E5M2 is
    refused by cuBLASLt (never asked for: "hybrid" pairs E5M2 gradients with E4M3).
    fprop (x @ w^T) and dgrad (g @ w) have K, N in {in_features, out_features}, which
    select_backend guarantees are multiples of 16. The wgrad (g^T @ x) contracts over
    the token count M, which is dynamic: it is zero-padded to a multiple of 16 here
    (exact: zero rows add nothing), costing one copy of each operand when M % 16 != 0.
    The bias goes to cuBLASLt's epilogue (bf16/fp16 outputs); an fp32 output, for which
    cuBLASLt takes no bias, gets it added in fp32 afterwards, which is the same sum.
    """

    name = "scaled_mm"

    @staticmethod
    def quantize(x_hp: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
        return cast_to_fp8(x_hp, scale, fmt)

    @staticmethod
    def gemm(a, b, a_inv, b_inv, out_dtype: torch.dtype, bias=None, *, accumulator: Accumulator = FP32, **_emulation):
        """cuBLASLt's FP8 GEMM; a "fast" accumulator is its FAST_ACCUM (``use_fast_accum``),
        any other its split accumulator, promoted at cuBLASLt's own (unpublished) interval:
        an ideal "fp32" accumulation does not exist on the hardware. Per-tensor scales only
        (the operands' formats and block scales the emulation takes are not needed here)."""
        k_pad = -(-a.shape[1] // HW_GEMM_MULTIPLE) * HW_GEMM_MULTIPLE
        # Layout copies (1-byte data): dgrad's B = w (N, K) and both wgrad operands
        # (g^T, x) arrive row-major/transposed and are re-laid out here.
        a = _a_operand(a, k_pad)
        b = _b_operand(b, k_pad)
        mm_dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
        epilogue = bias if bias is not None and mm_dtype != torch.float32 else None
        out = torch._scaled_mm(
            a,
            b,
            scale_a=a_inv.reshape(()),
            scale_b=b_inv.reshape(()),
            bias=epilogue,
            out_dtype=mm_dtype,
            use_fast_accum=accumulator.kind == "fast",
        )
        if bias is not None and epilogue is None:
            out = out.add_(bias)
        return out if out.dtype == out_dtype else out.to(out_dtype)
