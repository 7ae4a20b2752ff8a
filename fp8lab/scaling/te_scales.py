"""The scale arithmetic of Transformer Engine's current, block and MXFP8 recipes.

Invariant: pure functions of their tensor arguments (new tensors out), transliterated from
TE's kernels so that fp8lab quantizes exactly as they do:

- ``te_scale_from_amax``: ``compute_scale_from_amax`` (common/recipe/recipe_common.cuh),
  used per tensor by Float8CurrentScaling and per block by Float8BlockScaling;
- ``float_to_e8m0``, ``e8m0_scale``, ``e8m0_scale_inv``: MXFP8's power-of-2 block scales
  (common/util/ptx_arch_spec.cuh ``float_to_e8m0``, ptx.cuh ``exp2f_rcp``);
- ``torchao_e8m0``: the E8M0 codes of torchao's other MX scale modes (``ScaleCalculationMode``
  FLOOR, CEIL, EVEN of torchao 0.18's ``mx_formats.mx_tensor.to_mx``), which TE does not have;

The amaxes they start from are taken by ``fp8lab.quantize.tensor`` (``amaxes_of`` per tensor,
``blocks.blocks_amax`` per block), as TE's cast kernels take them.
"""

from __future__ import annotations

import functools

import torch

from fp8lab.quantize import block_cast_native

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

    On the CPU one pass of the block-cast C kernel (the same float32 operations; a block grid's
    eight tensor operations cost more than its cast at the quickstart's sizes).
    """
    if (k := block_cast_native.scale_kernel(amax)) is not None:
        return block_cast_native.te_scales(k, amax, fp8_max, epsilon, value_for_inf, pow2)
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
    keeps exponent 0 (TE's rule). The sign is ignored.

    On the bits b of |value|: (b + 0x7FFFFF) >> 23 is the exponent plus one when the mantissa is
    not zero; TE does not round 254 up (nor inf, whose code is 254), so the code stops at 254;
    subnormals up to 0x400000 (2^-127) and zero give 0."""
    value = value.float()
    bits = value.view(torch.int32) & 0x7FFFFFFF
    out = ((bits + 0x7FFFFF) >> 23).clamp_(max=0xFE)  # NaN's sum wraps negative: replaced below
    out.masked_fill_(bits <= 0x400000, 0)
    return out.masked_fill_(torch.isnan(value), 0xFF)


def _e8m0_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(2^(127 - e), 2^(e - 127)) for every code e, with TE's special cases: code 0 scales by 1
    (``exp2f_rcp``), 254 by 2^-127, 255 (NaN) is NaN. Made on the device itself (no copy from the
    host, which would block a GPU's stream); kept once made on the CPU."""
    return _cpu_e8m0_tables() if device.type == "cpu" else _make_e8m0_tables(device)


@functools.cache
def _cpu_e8m0_tables() -> tuple[torch.Tensor, torch.Tensor]:
    return _make_e8m0_tables(torch.device("cpu"))


def _make_e8m0_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    e = torch.arange(256, dtype=torch.int32, device=device)
    scale = ((254 - e).clamp(min=0) << 23).view(torch.float32)
    scale = torch.where(e == 254, 2.0**-127, torch.where(e == 0, 1.0, scale))
    inv = torch.where(e == 0, 2.0**-127, (e << 23).view(torch.float32))
    nan = e == 255
    return scale.masked_fill(nan, float("nan")), inv.masked_fill(nan, float("nan"))


def e8m0_scale(e8m0: torch.Tensor) -> torch.Tensor:
    """TE's ``exp2f_rcp``: 2^(127 - e), what values are multiplied by before the cast, and 1 for
    code 0 (TE's own special case: a block whose amax is below about fp8_max * 2^-127 is cast
    unscaled, so its nonzero values flush to zero rather than being multiplied by 2^127)."""
    return _e8m0_tables(e8m0.device)[0][e8m0.to(torch.int32)]


def e8m0_scale_inv(e8m0: torch.Tensor) -> torch.Tensor:
    """2^(e - 127), what the GEMM multiplies a block's FP8 values by (255: NaN)."""
    return _e8m0_tables(e8m0.device)[1][e8m0.to(torch.int32)]


def e8m0_scales(amax: torch.Tensor, fp8_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(``e8m0_scale``, ``e8m0_scale_inv``) of TE's code ``float_to_e8m0(amax * fp32(1 / fp8_max))``
    (MXFP8's "rceil" scales of blocks with these amaxes); on the CPU one pass of the block-cast C
    kernel (the same values)."""
    if (k := block_cast_native.scale_kernel(amax)) is not None:
        return block_cast_native.e8m0_scales(k, amax, 1.0 / fp8_max)
    # TE's max_norm_rcp, filled on the device: torch.tensor(v, device="cuda") would be a
    # blocking host-to-device copy, which synchronises the stream at every cast.
    rcp = torch.full((), 1.0 / fp8_max, dtype=torch.float32, device=amax.device)
    code = float_to_e8m0(amax.float() * rcp)
    return e8m0_scale(code), e8m0_scale_inv(code)


def torchao_e8m0(amax: torch.Tensor, mode: str, max_pow2: int, mantissa_bits: int) -> torch.Tensor:
    """torchao's E8M0 block code (int32, 0..255) for ``ScaleCalculationMode`` "floor", "ceil" or
    "even" (torchao 0.18 ``to_mx``, bit for bit): from the float32 bits of ``amax``,

    - "even": first round amax's significand to ``mantissa_bits`` bits, half up (add half an
      ulp of the element format, clear the fraction bits);
    - the unbiased exponent ``e`` of amax (a float32 subnormal or 0 counts as -127, inf as 128);
      "ceil" adds 1 when amax's fraction is not 0 (before "even"'s rounding none remains);
    - code = clamp(e - max_pow2, -127, 128) + 127, where ``max_pow2`` = floor(log2(fp8_max))
      (8 for E4M3, 15 for E5M2); a NaN amax gives 255.

    So a block of zeros gets code 0, an inf amax 128 - max_pow2 + 127 (its elements clamp).
    """
    amax = amax.float()
    bits = amax.view(torch.int32)
    if mode == "even":  # amax >= 0, so the sign bit stays clear except for NaN (masked below)
        bits = (bits + (1 << (23 - mantissa_bits - 1))) & _SIGN_AND_EXPONENT
    exponent = ((bits >> 23) & 0xFF) - 127
    if mode == "ceil":
        exponent = exponent + ((bits & 0x7FFFFF) > 0).to(torch.int32)
    elif mode not in ("floor", "even"):
        raise ValueError(f"mode must be 'floor', 'ceil' or 'even', got {mode!r}")
    code = (exponent - max_pow2).clamp(-127, 128) + 127
    return torch.where(torch.isnan(amax), torch.full_like(code, 255), code)
