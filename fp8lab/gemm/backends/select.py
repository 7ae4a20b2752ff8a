"""Choosing a layer's GEMM backend: one pure function of the facts, plus the probes.

Invariant: ``select_backend`` reads nothing from the environment; everything it depends
on is an argument, so the whole decision table is tested on CPU. ``probe_*`` gather the
facts; Transformer Engine is located without being imported.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass

import torch

from fp8lab.gemm.exact import ROUNDED_DTYPES
from fp8lab.gemm.hardware import (
    FP8_MIN_CAPABILITY,
    HW_GEMM_MULTIPLE,
    BackendUnavailable,
    DeviceFacts,
    torch_has_blockwise_mm,
)
from fp8lab.scaling.delayed import DelayedScaling
from fp8lab.scaling.protocol import Scaling

__all__ = ["BackendUnavailable", "DeviceFacts", "Plan", "TEFacts", "probe_device", "probe_te", "select_backend"]


@dataclass(frozen=True)
class TEFacts:
    version: str | None  # None: not importable
    why_not: str = ""


@dataclass(frozen=True)
class Plan:
    backend: str  # "te" | "scaled_mm" | "emulated" | "bf16" | "fp16" | "fp32"
    reason: str

    @property
    def precision(self) -> str:
        """ "fp8", or the precision of a rounded backend ("bf16", "fp16", "fp32")."""
        return self.backend if self.backend in ROUNDED_DTYPES else "fp8"


def _fallback(fallback: str, why: str) -> Plan:
    if fallback == "emulated":
        return Plan("emulated", f"{why}; FP8 emulated in software")
    return Plan("bf16", why)


def _fp8_hardware(device: DeviceFacts) -> bool:
    return device.type == "cuda" and device.capability is not None and device.capability >= FP8_MIN_CAPABILITY


def _sm(device: DeviceFacts) -> str:
    major, minor = device.capability or (0, 0)
    return f"sm_{major}{minor}"


def select_backend(
    *,
    device: DeviceFacts,
    te: TEFacts,
    requested: str = "auto",
    fallback: str = "bf16",
    dims: tuple[int, int] | None = None,
    scaling: Scaling | None = None,
    accumulation: object = "te",
) -> Plan:
    """The backend a layer runs on, with a one-line human reason.

    Args:
        device: the layer's device facts (type, compute capability, name, CUDA version).
        te: whether Transformer Engine is importable, and its version.
        requested: a backend name of ``fp8lab.options.BACKENDS`` (FP8Options validated it).
        fallback: what "auto" uses without FP8 hardware, one of ``fp8lab.options.FALLBACKS``.
        dims: the GEMM's (in_features, out_features); hardware FP8 needs multiples of 16.
        scaling: the layer's scaling (default ``DelayedScaling()``); each says which
            hardware backend cannot run it where (``Scaling.unsupported``): Transformer
            Engine runs each recipe on some GPUs only, torch._scaled_mm the per-tensor
            ones; a layer that no hardware path can run falls back, saying why.
        accumulation: the layer's ``FP8Options.accumulation``: Transformer Engine accumulates
            as it decides ("te"), so any other setting rules it out.
    Raises:
        BackendUnavailable: an explicitly requested backend cannot run here.
    """
    if requested == "bf16":
        return Plan("bf16", "backend='bf16' requested")
    if requested == "emulated":
        return Plan("emulated", "backend='emulated' requested; FP8 emulated in software")

    scaling = scaling if scaling is not None else DelayedScaling()
    gpu = f"{device.name or 'GPU'} ({_sm(device)})" if device.type == "cuda" else device.type
    te_why_not = scaling.unsupported("te", device) if te.version is not None else None
    if te.version is not None and accumulation != "te":
        te_why_not = (
            f"Transformer Engine accumulates as it sets itself (accumulation='te'), not accumulation={accumulation!r}"
        )
    mm_why_not = scaling.unsupported("scaled_mm", device)
    if requested in ("te", "scaled_mm"):
        if device.type != "cuda":
            hint = (
                "torch._scaled_mm is never run on CPU (a few GFLOP/s)"
                if requested == "scaled_mm"
                else "Transformer Engine needs an NVIDIA GPU"
            )
            raise BackendUnavailable(
                f"backend={requested!r} needs a CUDA device, got {device.type}: {hint}; "
                "use backend='emulated' or 'auto'"
            )
        if not _fp8_hardware(device):
            raise BackendUnavailable(
                f"backend={requested!r} needs FP8 tensor cores (sm_89 or newer); {gpu} has none; "
                "use backend='auto' for the BF16 fallback"
            )
        if requested == "te" and te.version is None:
            raise BackendUnavailable(
                f"backend='te' needs Transformer Engine: pip install 'fp8lab[te]' ({te.why_not or 'not installed'})"
            )
        if requested == "te" and te_why_not:
            raise BackendUnavailable(
                f"backend='te' with {scaling.name} scaling on {gpu}: {te_why_not}; "
                "use backend='emulated' (or 'scaled_mm')"
            )
        if requested == "scaled_mm" and mm_why_not:
            raise BackendUnavailable(
                f"backend='scaled_mm' with {scaling.name} scaling on {gpu}: {mm_why_not}; "
                "use backend='te' (or 'emulated')"
            )

    if device.type != "cuda":
        return _fallback(fallback, f"no FP8 hardware on {device.type.upper()}")
    if not _fp8_hardware(device):
        return _fallback(fallback, f"{gpu} has no FP8 tensor cores")
    if dims is not None and any(d % HW_GEMM_MULTIPLE for d in dims):
        why = f"dimensions {dims[0]}x{dims[1]} are not multiples of {HW_GEMM_MULTIPLE}, which a hardware FP8 GEMM needs"
        # An explicit request that cannot be honoured for this one layer says so in the reason.
        return _fallback(fallback, why if requested == "auto" else f"backend={requested!r} requested, but {why}")
    if requested == "te" or (requested == "auto" and te.version is not None and not te_why_not):
        return Plan("te", f"Transformer Engine {te.version} on {gpu}")
    if requested == "scaled_mm":
        return Plan("scaled_mm", f"torch._scaled_mm on {gpu} (requested)")
    if mm_why_not:  # auto, and neither TE nor torch._scaled_mm can run it here
        why = te_why_not or "Transformer Engine is not installed"
        return _fallback(fallback, f"{scaling.name} scaling on {gpu}: {why}, and {mm_why_not}")
    return Plan("scaled_mm", f"torch._scaled_mm on {gpu}; install fp8lab[te] for fused kernels")


def probe_device(device: torch.device) -> DeviceFacts:
    """The facts ``select_backend`` needs about ``device`` (no CUDA call on CPU)."""
    if device.type != "cuda":
        return DeviceFacts(device.type)
    index = device.index if device.index is not None else torch.cuda.current_device()
    cuda = tuple(int(p) for p in torch.version.cuda.split(".")[:2]) if torch.version.cuda else None
    return DeviceFacts(
        "cuda",
        torch.cuda.get_device_capability(index),
        torch.cuda.get_device_name(index),
        cuda,
        torch_has_blockwise_mm(),
    )


def probe_te() -> TEFacts:
    """Whether Transformer Engine for PyTorch is installed, located without importing it.

    Both the Python package and its compiled PyTorch extension (``transformer_engine_torch``)
    must be present: a TE installed for JAX only, or without its torch wheel, cannot run.
    An installed TE whose import fails (e.g. built against another torch) is only found at
    the first forward, which raises ``BackendUnavailable`` with the import error.
    """
    if importlib.util.find_spec("transformer_engine") is None:
        return TEFacts(None, "transformer_engine is not installed")
    if importlib.util.find_spec("transformer_engine_torch") is None:
        return TEFacts(None, "transformer_engine is installed without its PyTorch extension (transformer_engine_torch)")
    try:
        return TEFacts(importlib.metadata.version("transformer_engine"))
    except importlib.metadata.PackageNotFoundError:
        return TEFacts("unknown")
