"""A plain-Python reference of Transformer Engine's current, block and MXFP8 quantization,
written from TE's kernels (recipe_common.cuh ``compute_scale_from_amax``, ptx
``float_to_e8m0``/``exp2f_rcp``, the blockwise cast kernels) independently of fp8lab's
torch code, element by element on Python floats. Used by tests/test_scaling_recipes.py."""

from __future__ import annotations

import math
import struct

import numpy as np

F32_MAX = float(np.finfo(np.float32).max)
BF16_MAX = 3.3895313892515355e38


def f32(x: float) -> float:
    return float(np.float32(x))


def bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", np.float32(x)))[0]


def from_bits(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]


def scale_from_amax(amax: float, fp8_max: float, pow2: bool, eps: float = 0.0, value_for_inf: float = F32_MAX) -> float:
    amax = f32(amax)
    if amax < eps:
        amax = f32(eps)
    if math.isinf(amax) or amax == 0.0 or math.isnan(amax):
        return 1.0
    with np.errstate(over="ignore", divide="ignore"):
        s = float(np.float32(fp8_max) / np.float32(amax))
    if math.isinf(s):
        s = f32(value_for_inf)
    if pow2:
        s = from_bits(bits(s) & 0xFF800000)
    return s


def e8m0(val: float) -> int:
    val = f32(val)
    if math.isnan(val):
        return 255
    if math.isinf(val):
        return 254
    if val == 0.0:
        return 0
    b = bits(val)
    exponent, mantissa = (b >> 23) & 0xFF, b & 0x7FFFFF
    if mantissa > 0 and exponent != 0xFE and not (exponent == 0 and mantissa <= 0x400000):
        exponent += 1
    return exponent


def fp8_value(v: float, fp8_max: float, mantissa_bits: int, min_exp: int) -> float:
    """float32 ``v`` clamped to +-fp8_max and rounded to nearest even on the FP8 grid."""
    if math.isnan(v):
        return v
    v = max(-fp8_max, min(fp8_max, v))
    if v == 0.0:
        return 0.0
    e = max(math.floor(math.log2(abs(v))), min_exp)
    step = 2.0 ** (e - mantissa_bits)
    return round(v / step) * step  # Python's round: ties to even


FORMATS = {"e4m3": (448.0, 3, -6), "e5m2": (57344.0, 2, -14)}


def quantize_blocks(x: np.ndarray, block: tuple[int, int], fmt: str, scale_of) -> np.ndarray:
    """Dequantized values of x (R, C) cast block by block; ``scale_of(amax) -> (scale, scale_inv)``."""
    fp8_max, mbits, min_exp = FORMATS[fmt]
    r, c = x.shape
    br, bc = block
    out = np.empty_like(x, dtype=np.float64)
    for i0 in range(0, r, br):
        for j0 in range(0, c, bc):
            tile = x[i0 : i0 + br, j0 : j0 + bc].astype(np.float32)
            amax = 0.0
            for v in tile.flat:  # fmaxf(|v|, amax): NaN ignored
                if not math.isnan(v):
                    amax = max(amax, abs(float(v)))
            scale, scale_inv = scale_of(amax)
            for (di, dj), v in np.ndenumerate(tile):
                scaled = f32(float(np.float32(v) * np.float32(scale)))
                out[i0 + di, j0 + dj] = fp8_value(scaled, fp8_max, mbits, min_exp) * scale_inv
    return out
