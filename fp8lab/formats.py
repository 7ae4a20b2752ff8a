"""FP8 formats: the numbers that define E4M3 and E5M2.

Invariant: every constant here is read from ``torch.finfo`` of the real float8 dtype,
so the emulation and the hardware path can never disagree about a format's range.
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


class Role(enum.IntEnum):
    """Which GEMM operand a scale belongs to; the value is its column in ScalingState."""

    INPUT = 0
    WEIGHT = 1
    GRAD_OUTPUT = 2


ROLE_NAMES = ("input", "weight", "grad_output")
GEMM_NAMES = ("fprop", "dgrad", "wgrad")  # the three GEMMs of a layer, as telemetry names them
