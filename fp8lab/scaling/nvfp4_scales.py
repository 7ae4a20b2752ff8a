"""NVFP4's two-level scale arithmetic, as Transformer Engine's cast kernels and GEMM compute it.

Invariant: pure float32 functions of their tensor arguments (new tensors out), written from TE's
kernels (common/cast/nvfp4/core_nvfp4.cuh, quantize_transpose_nvfp4.cuh; recipe/nvfp4.cu), each
step one float32 rounding in TE's order:

- ``global_encode_scale(amax)``: ``S_enc = fminf(448 * 6 / amax, FLT_MAX)``; amax 0 or inf (S_enc
  0) gives 1; a NaN amax gives FLT_MAX (``fminf`` ignores NaN; TE's amaxes never are NaN: they
  are taken with ``fmaxf``, NaN elements ignored). ``S_dec = 1 / S_enc``.
- ``block_decode_scale(block_amax, s_enc)``: the E4M3 block scale stored with the data,
  ``e4m3_satfinite(block_amax * (S_enc * fp32(1/6)))``: the product rounded to nearest even onto
  E4M3, clamped to 448; a block of zeros (or one whose scale underflows E4M3) gets 0.
- ``block_encode_scale(s_dec_b, s_dec)``: what the block's elements are multiplied by before
  the E2M1 conversion, ``fminf(1 / (s_dec_b * S_dec), FLT_MAX)`` (a zero block scale gives FLT_MAX).
- ``block_scales(block_amax, amax)``: both block scales of a cast from the tensor amax (its global
  scales) and the block amaxes; on the CPU in one call of the block-cast C kernel, the same values.
- ``gemm_alpha(amax_a, amax_b)``: the GEMM's output multiplier, ``amax_a * amax_b * fp32(1 /
  (6 * 6 * 448 * 448))`` (TE's ``compute_nvfp4_per_tensor_scale_kernel``), from the amaxes, not
  from ``S_dec``: the two differ in the last bits, as on the hardware.
"""

from __future__ import annotations

import torch

from fp8lab.quantize import block_cast_native

FP4_MAX = 6.0
E4M3_MAX = 448.0
F32_MAX = torch.finfo(torch.float32).max
# fp32(1/6): TE's ``fp4_max_inv``, a float32 constant (rounded once).
FP4_MAX_INV = float(torch.tensor(1.0 / 6.0, dtype=torch.float32))
# fp32(1 / (6*6*448*448)): TE's ``factor_inv`` (the denominator, 7225344, is exact in float32).
ALPHA_FACTOR_INV = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(7225344.0, dtype=torch.float32))


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((), value, dtype=torch.float32, device=like.device)


def global_encode_scale(amax: torch.Tensor) -> torch.Tensor:
    """TE's ``compute_global_encode_scaling_factor_FP4`` (float32): 2688 / amax, at most FLT_MAX;
    1 for amax 0 or inf; FLT_MAX for NaN (``fminf``)."""
    amax = amax.float()
    s_enc = _f32(E4M3_MAX * FP4_MAX, amax) / amax
    s_enc = torch.where(torch.isnan(s_enc) | (s_enc > F32_MAX), _f32(F32_MAX, amax), s_enc)
    return torch.where((amax == 0) | (s_enc == 0), torch.ones_like(s_enc), s_enc)


def global_decode_scale(s_enc: torch.Tensor) -> torch.Tensor:
    """``1.0 / S_enc``: TE divides in double and rounds to float32, which is the float32 quotient."""
    return (1.0 / s_enc.double()).float()


def block_decode_scale(block_amax: torch.Tensor, s_enc: torch.Tensor) -> torch.Tensor:
    """The E4M3 scale of each block (as float32 values): ``block_amax * (S_enc * fp32(1/6))``, two
    float32 roundings, then ``fminf(., FLT_MAX)`` and the saturating round-to-nearest-even
    conversion to E4M3 (448 at most; below E4M3's smallest subnormal, 2^-9, half-way or less: 0)."""
    multiplier = s_enc.float() * _f32(FP4_MAX_INV, s_enc)
    s_dec_b = block_amax.float() * multiplier
    s_dec_b = s_dec_b.clamp(max=F32_MAX).clamp(-E4M3_MAX, E4M3_MAX)
    return s_dec_b.to(torch.float8_e4m3fn).float()


def block_encode_scale(s_dec_b: torch.Tensor, s_dec: torch.Tensor) -> torch.Tensor:
    """``fminf(1.0f / (s_dec_b * S_dec), FLT_MAX)``: two float32 roundings; a zero block scale
    (a block of zeros) gives FLT_MAX, which leaves its zeros zero."""
    encode = torch.reciprocal(s_dec_b.float() * s_dec.float())
    return encode.clamp(max=F32_MAX)


def block_scales(block_amax: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 decode scales, float32 encode scales) of blocks with these amaxes in a tensor with
    this amax: ``block_decode_scale(block_amax, global_encode_scale(amax))`` and its
    ``block_encode_scale``. On the CPU one pass of the block-cast C kernel over the grid (a dozen
    small tensor operations otherwise, which at the quickstart's sizes cost more than the cast)."""
    if (k := block_cast_native.scale_kernel(block_amax)) is not None and amax.device.type == "cpu":
        return block_cast_native.nvfp4_scales(k, block_amax, amax)
    s_enc = global_encode_scale(amax)
    decode = block_decode_scale(block_amax, s_enc)
    return decode, block_encode_scale(decode, global_decode_scale(s_enc))


def gemm_alpha(amax_a: torch.Tensor, amax_b: torch.Tensor) -> torch.Tensor:
    """The NVFP4 GEMM's alpha: ``(amax_a * amax_b) * fp32(1 / 7225344)`` in float32, TE's order."""
    return (amax_a.float() * amax_b.float()) * _f32(ALPHA_FACTOR_INV, amax_a)
