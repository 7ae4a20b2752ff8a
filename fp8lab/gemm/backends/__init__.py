"""GEMM backends: who runs a layer's GEMMs, one interface (``base``), chosen per device.

Invariant: backends hold no per-layer state (``backend_for`` shares one per name and
device type), and the choice among them is a pure function of device facts (``select``).

Reading order: ``select`` (the plan: a pure function of device facts) -> ``base`` (the
interface a layer calls) -> ``rounded`` (bf16, fp16, fp32), ``emulated``, ``scaled_mm``
(fp8lab's quantized GEMM) -> ``te`` (the whole layer in a Transformer Engine module).
"""

from __future__ import annotations

import functools

from fp8lab.gemm.backends.base import Backend
from fp8lab.gemm.backends.emulated import EmulatedBackend
from fp8lab.gemm.backends.rounded import RoundedBackend
from fp8lab.gemm.backends.scaled_mm import ScaledMMBackend
from fp8lab.gemm.exact import ROUNDED_DTYPES, gemm_path, rounded_gemm_path


@functools.cache
def backend_for(name: str, device_type: str) -> Backend:
    """The backend a plan names ("te", "scaled_mm", "emulated", or a rounded "bf16", "fp16",
    "fp32") on a device type.

    One object per (name, device type), shared by every layer: backends hold no
    per-layer state.
    """
    if name == "te":
        from fp8lab.gemm.backends.te import TEBackend  # TE itself is imported at the first forward

        return TEBackend()
    if name == "scaled_mm":
        return ScaledMMBackend()
    if name == "emulated":
        return EmulatedBackend(gemm_path(device_type))
    if name in ROUNDED_DTYPES:
        return RoundedBackend(rounded_gemm_path(device_type, name), name)
    raise ValueError(f"no backend named {name!r}")
