"""GEMM backends: who runs a layer's GEMMs, chosen per device by ``select``.

Reading order: ``select`` (the decision, a pure function of device facts) -> ``bf16``,
``emulated``, ``scaled_mm`` (executors of fp8lab's quantized GEMM) -> ``te`` (the whole
layer in a Transformer Engine module).
"""

from __future__ import annotations

import functools

from fp8lab.gemm.backends.bf16 import BF16Executor
from fp8lab.gemm.backends.emulated import EmulatedExecutor
from fp8lab.gemm.backends.scaled_mm import ScaledMMExecutor
from fp8lab.gemm.exact import gemm_path


@functools.lru_cache(maxsize=None)
def executor_for(backend: str, device_type: str):
    """The executor of ``backend`` ("emulated", "bf16", "scaled_mm") on a device type."""
    if backend == "scaled_mm":
        return ScaledMMExecutor()
    path = gemm_path(device_type)
    if backend == "emulated":
        return EmulatedExecutor(path)
    if backend == "bf16":
        return BF16Executor(path)
    raise ValueError(f"no executor for backend {backend!r}")
