"""``fp8lab info``: what this machine offers for FP8 and what ``backend="auto"`` would pick.

Invariant: ``collect_info`` only gathers facts (it never runs a GEMM) and returns plain
Python values; ``format_info`` is a pure function of that dict, so both the CLI text and
the JSON-able dict come from the same facts.
"""

from __future__ import annotations

import importlib

import torch

import fp8lab
from fp8lab.accumulation import describe_gemms
from fp8lab.gemm.accumulate import accumulate_path
from fp8lab.gemm.backends.select import (
    FP8_MIN_CAPABILITY,
    BackendUnavailable,
    DeviceFacts,
    TEFacts,
    probe_device,
    probe_te,
    select_backend,
)
from fp8lab.gemm.exact import gemm_path
from fp8lab.options import FALLBACKS, FP8Options
from fp8lab.quantize import block_cast_native
from fp8lab.scaling import SCALINGS

PROBE_DIMS = (4096, 4096)  # a typical transformer Linear: in_features x out_features


def _te_status(import_te: bool) -> dict:
    facts = probe_te()
    status = {"version": facts.version, "importable": None, "why_not": facts.why_not}
    if facts.version is not None and import_te:
        try:
            importlib.import_module("transformer_engine.pytorch")
            status["importable"] = True
        except Exception as exc:  # ImportError, OSError, RuntimeError: report, never crash
            status["importable"] = False
            status["why_not"] = f"import transformer_engine.pytorch failed: {type(exc).__name__}: {exc}"
    return status


def auto_choices(device: DeviceFacts, te: TEFacts) -> list[dict]:
    """What ``backend="auto"`` picks for a PROBE_DIMS Linear on ``device``, per fallback."""
    choices = []
    for fallback in FALLBACKS:
        try:
            plan = select_backend(device=device, te=te, requested="auto", fallback=fallback, dims=PROBE_DIMS)
            choices.append({"fallback": fallback, "backend": plan.backend, "reason": plan.reason})
        except BackendUnavailable as exc:  # "auto" never raises today; report it if it ever does
            choices.append({"fallback": fallback, "backend": None, "reason": str(exc)})
    return choices


def collect_info(import_te: bool = True) -> dict:
    """Versions, devices, Transformer Engine status and the ``auto`` backend per device.

    Args:
        import_te: also try ``import transformer_engine.pytorch`` when TE is installed, to
            report an import error (slow: TE loads its CUDA libraries).
    """
    cuda = torch.cuda.is_available()
    devices = [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count() if cuda else 0)]
    te_facts = probe_te()
    rows = []
    for device in devices:
        facts = probe_device(device)
        path = gemm_path(device.type)
        rows.append(
            {
                "device": str(device),
                "name": facts.name or "CPU",
                "gemm_path": {"name": path.name, "reason": path.reason},
                "capability": list(facts.capability) if facts.capability else None,
                "fp8_tensor_cores": facts.capability is not None and facts.capability >= FP8_MIN_CAPABILITY,
                "auto": auto_choices(facts, te_facts),
            }
        )
    path = accumulate_path()
    te_accumulation = {
        name: describe_gemms([FP8Options(scaling=cls()).accumulator(g) for g in range(3)])
        for name, cls in SCALINGS.items()
    }
    return {
        "accumulation": {"path": path.name, "reason": path.reason, "te": te_accumulation},
        "block_casts": _block_casts(),
        "fp8lab": fp8lab.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,  # None for a CPU-only build of torch
        "cuda_available": cuda,
        "transformer_engine": _te_status(import_te),
        "probe_dims": list(PROBE_DIMS),
        "devices": rows,
    }


def _block_casts() -> dict:
    """Where the block recipes' casts run on the CPU: the C kernel, or torch operations."""
    kernel = block_cast_native.kernel()
    if kernel is None:
        return {"path": "torch", "reason": "block casts: torch operations (no C kernel could be built)"}
    flags = " ".join(kernel.flags[4:]) or "no ISA flags"
    return {"path": "c", "reason": f"block casts: C kernel built by {kernel.compiler} with {flags}"}


def format_info(info: dict) -> str:
    """The text ``fp8lab info`` prints for a ``collect_info()`` dict."""
    cuda = info["cuda"] or "none (CPU-only build)"
    lines = [f"fp8lab {info['fp8lab']}  torch {info['torch']}  CUDA {cuda}"]
    te = info["transformer_engine"]
    if te["version"] is None:
        lines.append(f"Transformer Engine: no ({te['why_not']}; pip install 'fp8lab[te]')")
    elif te["importable"] is False:
        lines.append(
            f"Transformer Engine {te['version']}: installed but unusable ({te['why_not']}); "
            "layers that choose 'te' will raise at their first forward: fix the install or "
            "use backend='scaled_mm'"
        )
    else:
        lines.append(f"Transformer Engine {te['version']}: installed")
    dims = "x".join(str(d) for d in info["probe_dims"])
    for row in info["devices"]:
        cap = row["capability"]
        hw = (
            f"sm_{cap[0]}{cap[1]}, FP8 tensor cores: {'yes' if row['fp8_tensor_cores'] else 'no'}"
            if cap
            else "no FP8 hardware"
        )
        lines.append(f"{row['device']}: {row['name']} ({hw})")
        if "gemm_path" in row:
            lines.append(f"  emulated FP8 and BF16 GEMMs: {row['gemm_path']['name']} ({row['gemm_path']['reason']})")
        for choice in row["auto"]:
            lines.append(
                f"  backend='auto', fallback={choice['fallback']!r}, {dims} Linear -> "
                f"{choice['backend']}: {choice['reason']}"
            )
    acc = info["accumulation"]
    lines.append(f"{acc['reason']}; accumulation='te' (the default) per scaling:")
    lines += [f"  {name}: {text}" for name, text in acc["te"].items()]
    lines.append(info["block_casts"]["reason"])
    return "\n".join(lines)
