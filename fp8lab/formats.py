"""FP8 formats: the numbers that define E4M3 and E5M2 (and FP4 E2M1), and which operand gets which.

Invariant: every FP8 constant here is read from ``torch.finfo`` of the real float8 dtype,
so the emulation and the hardware path can never disagree about a format's range; the
recipe-level format names ("hybrid", "e4m3") and what they give each role are defined
here once for every scaling.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FP8Format:
    """One FP8 encoding: its torch dtype and the constants casting needs."""

    name: str
    dtype: torch.dtype
    max: float  # largest finite value (448 for E4M3, 57344 for E5M2)
    min_normal: float  # smallest normal value; below it the grid is uniform (subnormals)
    mantissa_bits: int


def _fmt(name: str, dtype: torch.dtype, mantissa_bits: int) -> FP8Format:
    info = torch.finfo(dtype)
    return FP8Format(name, dtype, float(info.max), float(info.smallest_normal), mantissa_bits)


E4M3 = _fmt("e4m3", torch.float8_e4m3fn, 3)
E5M2 = _fmt("e5m2", torch.float8_e5m2, 2)
# FP4 E2M1 (NVFP4's element format): 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives. torch has
# only the packed dtype (two values a byte, no finfo), so the constants are written out: max 6,
# smallest normal 1 (below it the one subnormal, 0.5), one mantissa bit.
E2M1 = FP8Format("e2m1", torch.float4_e2m1fn_x2, 6.0, 1.0, 1)


class Role(enum.IntEnum):
    """Which GEMM operand a scale belongs to; the value is its column in ScalingState."""

    INPUT = 0
    WEIGHT = 1
    GRAD_OUTPUT = 2


ROLE_NAMES = ("input", "weight", "grad_output")
GEMM_NAMES = ("fprop", "dgrad", "wgrad")  # the three GEMMs of a layer, as telemetry names them
FPROP, DGRAD, WGRAD = 0, 1, 2  # their indices in GEMM_NAMES


# A scaling's ``fp8_format``, as Transformer Engine names it: "hybrid" is E4M3 forward and
# E5M2 gradients, "e4m3" is E4M3 everywhere (pure E5M2 training is not offered, as in TE).
FP8_FORMATS = ("hybrid", "e4m3")


def check_fp8_format(fp8_format) -> None:
    """Raise ``ValueError`` naming ``fp8_format`` unless it is one of ``FP8_FORMATS``."""
    if fp8_format not in FP8_FORMATS:
        raise ValueError(
            f"fp8_format must be one of {FP8_FORMATS}, got {fp8_format!r} "
            "(pure E5M2 training is not supported, as in Transformer Engine)"
        )


def format_for(fp8_format: str, role: Role) -> FP8Format:
    """The FP8 format of a GEMM operand: E4M3, except gradients under "hybrid" (E5M2)."""
    return E5M2 if role == Role.GRAD_OUTPUT and fp8_format == "hybrid" else E4M3
