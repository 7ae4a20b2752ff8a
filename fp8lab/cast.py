"""Casting high-precision tensors into FP8 with a given scale.

Invariant: casting takes the scale as an input and never computes one (delayed scaling
lives in ``fp8lab.scaling`` / ``fp8lab.update``). Every cast clamps to +-fp8_max before
rounding to nearest even, so finite input never becomes NaN (older torch turns E4M3
overflow into NaN). The product ``x * scale`` is formed in float32, as TE's kernels do.

Two outputs of the same rounding:
- ``cast_to_fp8`` returns a real float8 tensor (for ``torch._scaled_mm`` on CUDA);
- ``cast_to_fp8_grid`` returns the same values held in bfloat16, which is exact (bf16 has
  more exponent and mantissa bits than either FP8 format). It rounds with float32
  arithmetic instead of the float8 dtype because torch's CPU float8 -> bf16 conversion is
  scalar code (38 ms for a 2048x3072 tensor here, three times the GEMM it feeds). The
  values equal ``cast_to_fp8(...).to(bfloat16)`` exactly; only the sign of a value that
  rounds to zero may differ (+0 for -0), which no GEMM can observe.
"""

from __future__ import annotations

import torch

from fp8lab.formats import FP8Format

_EXPONENT_MASK = 0x7F800000


def _scaled_clamped_fp32(x_hp: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """A new float32 tensor ``clamp(x * scale, -max, max)``; ``x_hp`` is not modified."""
    if x_hp.dtype == torch.float32:
        v = torch.mul(x_hp, scale)
    else:
        v = x_hp.to(torch.float32).mul_(scale)
    return v.clamp_(-fmt.max, fmt.max)


def cast_to_fp8(x_hp: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """``clamp(x * scale, -max, max)`` rounded to nearest even into ``fmt.dtype``."""
    return _scaled_clamped_fp32(x_hp, scale, fmt).to(fmt.dtype)


def round_fp32_to_fp8_grid_(v: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """Round float32 values already inside +-fmt.max onto the FP8 grid, in place.

    Magic-number rounding: for |v| in [2^e, 2^(e+1)) the FP8 grid spacing is
    2^(max(e, e_min) - mantissa_bits). Adding M = 1.5 * 2^(max(e, e_min) + 23 - mbits)
    puts v + M in a binade whose float32 spacing is exactly that, so IEEE addition rounds
    v to nearest even on the FP8 grid; subtracting M is then exact. Subnormals come out
    right because e is clamped to the smallest normal exponent.
    """
    magic = (v.view(torch.int32) & _EXPONENT_MASK).view(torch.float32)  # 2^floor(log2|v|)
    magic.clamp_(min=fmt.min_normal).mul_(1.5 * 2.0 ** (23 - fmt.mantissa_bits))
    return v.add_(magic).sub_(magic)


def cast_to_fp8_grid(x_hp: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """The values of ``cast_to_fp8(x_hp, scale, fmt)`` as an exact bfloat16 tensor."""
    v = _scaled_clamped_fp32(x_hp, scale, fmt)
    return round_fp32_to_fp8_grid_(v, fmt).to(torch.bfloat16)


def amax_of(x: torch.Tensor) -> torch.Tensor:
    """max(|x|) as a float32 0-dim tensor, in one pass and without an |x| temporary.

    NaN anywhere in ``x`` gives NaN (so the scale update keeps the previous scale).
    """
    lo, hi = torch.aminmax(x)
    return torch.maximum(-lo, hi).to(torch.float32)


def cast_stats(
    x_hp: torch.Tensor, x_fp8_values: torch.Tensor, scale: torch.Tensor, fmt: FP8Format
) -> torch.Tensor:
    """[overflow %, underflow %, SQNR dB] of one cast, computed on the tensor's device.

    overflow: elements with |x * scale| > fmt.max (clamped); underflow: non-zero elements
    that became zero; SQNR: 10*log10(|x|^2 / |x - dequant(x_fp8)|^2) in float32.
    Costs several passes over ``x``: called only on telemetry steps.
    """
    x32 = x_hp.to(torch.float32)
    scaled = x32 * scale
    q32 = x_fp8_values.to(torch.float32)
    numel = max(x32.numel(), 1)
    overflow = (scaled.abs() > fmt.max).sum() * (100.0 / numel)
    underflow = ((q32 == 0) & (x32 != 0)).sum() * (100.0 / numel)
    noise = (x32 - q32 / scale).pow(2).sum()
    signal = x32.pow(2).sum()
    sqnr = 10.0 * torch.log10(signal / noise.clamp_min(torch.finfo(torch.float32).tiny))
    return torch.stack([overflow, underflow, sqnr]).to(torch.float32)
