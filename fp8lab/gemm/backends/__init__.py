"""GEMM backends: who runs a layer's GEMMs, one interface (``base``), chosen per device.

Reading order: ``select`` (the plan: a pure function of device facts) -> ``base`` (the
interface a layer calls) -> ``bf16``, ``emulated``, ``scaled_mm`` (fp8lab's quantized GEMM)
-> ``te`` (the whole layer in a Transformer Engine module).
"""

from __future__ import annotations

import functools

from fp8lab.gemm.backends.base import Backend
from fp8lab.gemm.backends.bf16 import BF16Backend
from fp8lab.gemm.backends.emulated import EmulatedBackend
from fp8lab.gemm.backends.scaled_mm import ScaledMMBackend
from fp8lab.gemm.exact import gemm_path


@functools.lru_cache(maxsize=None)
def backend_for(name: str, device_type: str) -> Backend:
    """The backend a plan names ("te", "scaled_mm", "emulated", "bf16") on a device type.

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
    if name == "bf16":
        return BF16Backend(gemm_path(device_type))
    raise ValueError(f"no backend named {name!r}")
