"""Facts about FP8 hardware that backends and the backend choice share, and its error.

Invariant: constants and plain data only (no device probing, no import of a backend; the one
probe, of the installed torch's API, imports it lazily), so the choice (``backends.select``)
and the backends that run on the hardware (``scaled_mm``, ``te``) can all read them without
importing each other.
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
    # torch offers the blockwise (1x128 / 128x128 float32 scales) scaled GEMM,
    # ``torch.nn.functional.scaled_mm`` with ``ScalingType.BlockWise1x128`` (torch 2.13 has it)
    torch_blockwise: bool = False


def torch_has_blockwise_mm() -> bool:
    """Whether the installed torch has ``torch.nn.functional.scaled_mm`` with 1x128 and 128x128
    block scales (what ``DeviceFacts.torch_blockwise`` records)."""
    import torch.nn.functional as F

    kinds = getattr(F, "ScalingType", None)
    return hasattr(F, "scaled_mm") and hasattr(kinds, "BlockWise1x128") and hasattr(kinds, "BlockWise128x128")
