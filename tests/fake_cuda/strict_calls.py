"""Crafted torch._scaled_mm calls, one per CUDA rule the planted bugs break, and good ones.

Shared by tests/test_strict_scaled_mm.py (the CPU model's verdicts, on fake CUDA tensors)
and tests/test_gpu_strict_checker.py (the same calls on a real GPU: the model must refuse
exactly what CUDA refuses). ``EXPECTED_RULE`` is the model's intended verdict per call.
"""

from __future__ import annotations

import torch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2

EXPECTED_RULE = {
    "fprop-like, bf16 out, bf16 bias": None,
    "fp32 out, no bias": None,
    "M=1": None,
    "M=21 (A rows free)": None,
    "e5m2 x e4m3": None,
    "inner dims differ (64 vs 80)": "R-inner",
    "fp32 bias, bf16 out": "R-bias",
    "bias with fp32 out": "R-bias",
    "scales on the CPU": "R-device",
    "e5m2 x e5m2": "R-dtype",
    "A 8 bytes off alignment": "R-align",
    "A leading dim 72 bytes": "R-align",
}


def _fp8(device, rows, cols, dtype=E4M3, col_major=False, offset=0):
    if col_major:  # (rows, cols) column-major: the transpose of a row-major (cols, rows)
        return _fp8(device, cols, rows, dtype, offset=offset).t()
    base = torch.zeros(rows * cols + offset, device=device, dtype=torch.uint8).view(dtype)  # values are irrelevant
    return base[offset:].view(rows, cols)


def calls(device="cuda") -> dict:
    """{name: torch._scaled_mm keyword arguments} on ``device`` ("cuda", or "cuda" under FakeTensorMode)."""
    one = torch.ones((), device=device)
    a, b = _fp8(device, 32, 64), _fp8(device, 64, 48, col_major=True)
    bias16, bias32 = torch.zeros(48, device=device, dtype=torch.bfloat16), torch.zeros(48, device=device)
    return {
        "fprop-like, bf16 out, bf16 bias": dict(
            mat1=a, mat2=b, scale_a=one, scale_b=one, bias=bias16, out_dtype=torch.bfloat16
        ),
        "fp32 out, no bias": dict(mat1=a, mat2=b, scale_a=one, scale_b=one, out_dtype=torch.float32),
        "M=1": dict(mat1=_fp8(device, 1, 64), mat2=b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
        "M=21 (A rows free)": dict(
            mat1=_fp8(device, 21, 64), mat2=b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16
        ),
        "e5m2 x e4m3": dict(
            mat1=_fp8(device, 32, 64, E5M2), mat2=b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16
        ),
        "inner dims differ (64 vs 80)": dict(
            mat1=a, mat2=_fp8(device, 80, 48, col_major=True), scale_a=one, scale_b=one, out_dtype=torch.bfloat16
        ),
        "fp32 bias, bf16 out": dict(mat1=a, mat2=b, scale_a=one, scale_b=one, bias=bias32, out_dtype=torch.bfloat16),
        "bias with fp32 out": dict(mat1=a, mat2=b, scale_a=one, scale_b=one, bias=bias16, out_dtype=torch.float32),
        "scales on the CPU": dict(
            mat1=a,
            mat2=b,
            scale_a=torch.ones((), device="cpu"),
            scale_b=torch.ones((), device="cpu"),
            out_dtype=torch.bfloat16,
        ),
        "e5m2 x e5m2": dict(
            mat1=_fp8(device, 32, 64, E5M2),
            mat2=_fp8(device, 64, 48, E5M2, col_major=True),
            scale_a=one,
            scale_b=one,
            out_dtype=torch.bfloat16,
        ),
        "A 8 bytes off alignment": dict(
            mat1=_fp8(device, 32, 64, offset=8), mat2=b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16
        ),
        "A leading dim 72 bytes": dict(
            mat1=_fp8(device, 32, 72)[:, :64], mat2=b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16
        ),
    }
