"""The scale arithmetic of Transformer Engine's current, block and MXFP8 recipes.

Invariant: pure functions of their tensor arguments (new tensors out), transliterated from
TE's kernels so that fp8lab quantizes exactly as they do:

- ``te_scale_from_amax``: ``compute_scale_from_amax`` (common/recipe/recipe_common.cuh),
  used per tensor by Float8CurrentScaling and per block by Float8BlockScaling;
- ``float_to_e8m0``, ``e8m0_scale``, ``e8m0_scale_inv``: MXFP8's power-of-2 block scales
  (common/util/ptx_arch_spec.cuh ``float_to_e8m0``, ptx.cuh ``exp2f_rcp``);

The amaxes they start from are taken by ``fp8lab.quantize.tensor`` (``amaxes_of`` per tensor,
``blocks.blocks_amax`` per block), as TE's cast kernels take them.
"""

from __future__ import annotations

import torch

F32_MAX = torch.finfo(torch.float32).max
_SIGN_AND_EXPONENT = 0xFF800000 - (1 << 32)  # as a signed int32: clears the mantissa bits


def te_scale_from_amax(
    amax: torch.Tensor, fp8_max: float, *, pow2: bool, epsilon: float = 0.0, value_for_inf: float = F32_MAX
) -> torch.Tensor:
    """TE's ``compute_scale_from_amax``, element-wise, in float32.

    - amax < epsilon: amax = epsilon;
    - amax 0, inf or NaN: scale 1 (there is no previous scale to keep);
    - otherwise ``fp8_max / amax``, one rounding; a quotient that overflows float32 is
      ``value_for_inf`` (float32 max for current scaling, the input dtype's largest finite
      value for block scaling);
    - ``pow2``: the scale's mantissa bits cleared (rounded down to a power of two).
    """
    amax = amax.float()
    amax = torch.where(amax < epsilon, torch.full_like(amax, epsilon), amax)  # NaN < eps is False
    scale = torch.full_like(amax, fp8_max) / amax
    unusable = torch.isinf(amax) | (amax == 0) | torch.isnan(amax)
    scale = torch.where(unusable, torch.ones_like(scale), scale)
    scale = torch.where(torch.isinf(scale), torch.full_like(scale, value_for_inf), scale)
    if pow2:
        scale = (scale.view(torch.int32) & _SIGN_AND_EXPONENT).view(torch.float32)
    return scale


def float_to_e8m0(value: torch.Tensor) -> torch.Tensor:
    """TE's ``float_to_e8m0``: the biased exponent (0..255, int32) of the smallest power of
    two >= ``value``; NaN gives 255, inf 254, 0 gives 0, and a float32 subnormal <= 2^-127
    keeps exponent 0 (TE's rule)."""
    value = value.float()
    bits = value.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    round_up = (mantissa > 0) & (exponent != 0xFE) & ~((exponent == 0) & (mantissa <= 0x400000))
    out = exponent + round_up.to(torch.int32)
    out = torch.where(torch.isinf(value), torch.full_like(out, 0xFE), out)
    out = torch.where(torch.isnan(value), torch.full_like(out, 0xFF), out)
    return torch.where(value == 0, torch.zeros_like(out), out)


def e8m0_scale(e8m0: torch.Tensor) -> torch.Tensor:
    """TE's ``exp2f_rcp``: 2^(127 - e), what values are multiplied by before the cast."""
    e = e8m0.to(torch.int32)
    out = ((254 - e) << 23).view(torch.float32)
    out = torch.where(e == 254, torch.full_like(e, 0x00400000).view(torch.float32), out)  # 2^-127
    return torch.where(e == 255, torch.full_like(out, float("nan")), out)


def e8m0_scale_inv(e8m0: torch.Tensor) -> torch.Tensor:
    """2^(e - 127), what the GEMM multiplies a block's FP8 values by (255: NaN)."""
    e = e8m0.to(torch.int32)
    out = torch.where(e > 0, e << 23, torch.full_like(e, 0x00400000)).view(torch.float32)
    return torch.where(e == 255, torch.full_like(out, float("nan")), out)
