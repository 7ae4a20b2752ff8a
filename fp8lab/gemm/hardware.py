"""Facts about FP8 hardware that backends and the backend choice share, and its error.

Invariant: constants and plain data only (no probing, no import of a backend), so the
choice (``backends.select``) and the backends that run on the hardware (``scaled_mm``,
``te``) can all read them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

FP8_MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have FP8 tensor cores
HW_GEMM_MULTIPLE = 16  # cuBLASLt FP8 GEMMs need K and N divisible by 16


class BackendUnavailable(RuntimeError):
    """A backend was asked for explicitly and cannot run here; the message says why."""


@dataclass(frozen=True)
class DeviceFacts:
    """What the backend choice needs to know about a device (``select.probe_device``)."""

    type: str  # "cpu", "cuda", ...
    capability: tuple[int, int] | None = None
    name: str | None = None
    cuda: tuple[int, int] | None = None  # the CUDA version torch was built with
