"""The shadow GEMM: each FP8 GEMM's output against the BF16 GEMM of the same operands.

Invariant: runs only while the layer's TelemetrySlot is armed (log steps); between log
steps the quantized GEMM calls nothing here and keeps no extra tensor. On a log step it
takes the high-precision operands of each of the layer's three GEMMs,

    fprop:  x_hp, w_hp      (y = x @ w^T + b, the bias included: the layer's output)
    dgrad:  grad_out, w_hp  (grad_x = grad_out @ w)
    wgrad:  grad_out, x_hp  (grad_w = grad_out^T @ x)

runs them through the BF16 GEMM of the hardware model (``fp8lab.gemm.exact``, as the BF16
backend does: operands rounded to bf16, fp32 accumulation, one rounding to the same output
dtype), and writes
``10 * log10(|ref|^2 / |out - ref|^2)`` of the FP8 output into the slot's
``shadow_sqnr[gemm]`` (order ``fp8lab.formats.GEMM_NAMES``), on the device. The cost, on
log steps only: one more GEMM per GEMM, and the forward keeps ``x_hp`` for the backward.
"""

from __future__ import annotations

import torch

from fp8lab.formats import DGRAD, FPROP, WGRAD  # noqa: F401 (columns of TelemetrySlot.shadow_sqnr)
from fp8lab.gemm.exact import epilogue_bias, round_operand, rounded_gemm_path, scaled_gemm
from fp8lab.quantize.tensor import CPU_CHUNK


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """0-dim float32 ``10*log10(|ref|^2 / |out - ref|^2)`` on the device (no host read).

    Equal tensors give a large finite value (the noise is clamped to float32's tiny), so
    TensorBoard never meets inf. On CPU it runs over CPU_CHUNK slices (see ``cast_stats``).
    """
    ref_flat, out_flat = ref.reshape(-1), out.reshape(-1)
    chunk = CPU_CHUNK if ref.device.type == "cpu" else max(ref_flat.numel(), 1)
    sums = torch.zeros(2, dtype=torch.float32, device=ref.device)  # signal, noise
    for ref_part, out_part in zip(ref_flat.split(chunk), out_flat.split(chunk)):
        r = ref_part.to(torch.float32, copy=True)
        err = out_part.to(torch.float32, copy=True).sub_(r)
        sums += torch.stack([torch.dot(r, r), torch.dot(err, err)])
    return 10.0 * torch.log10(sums[0] / sums[1].clamp_min(torch.finfo(torch.float32).tiny))


def record(
    slot,
    gemm: int,
    a_hp: torch.Tensor,
    b_hp: torch.Tensor,
    out: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> None:
    """Write the SQNR of ``out`` (an FP8 GEMM's result) against the BF16 ``a_hp @ b_hp``.

    Args:
        slot: the layer's armed TelemetrySlot.
        gemm: FPROP, DGRAD or WGRAD.
        a_hp: (M, K) high-precision left operand.
        b_hp: (K, N) high-precision right operand (any strides).
        out: (M, N) the FP8 GEMM's output, in ``out_dtype``.
        out_dtype: the dtype both GEMMs round to.
        bias: (N,) the layer's bias (fprop only), added as the BF16 layer adds it.
    """
    path = rounded_gemm_path(out.device.type, "bf16")
    a, b = round_operand(a_hp, "bf16", path), round_operand(b_hp, "bf16", path)
    ref = scaled_gemm(a, b, None, out_dtype, epilogue_bias(bias, out_dtype, False), path=path)
    slot.shadow_sqnr[gemm] = sqnr_db(ref, out)
