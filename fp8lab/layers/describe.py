"""describe: what precision every GEMM layer of a model runs in, on which backend, and why.

Invariant: describe reads plans and never changes a layer. A row is produced for every
``fp8lab.Linear`` (from its backend plan), for every plain ``nn.Linear`` or transformers
``Conv1D`` left in the model (with the reason ``fp8lab.convert`` recorded, if it skipped
the layer) and for every other linear-like module (``convert_hf.unconverted_reason``: a
2-D weight that is not an embedding or a convolution, nn.MultiheadAttention's packed
in-projection), so nothing runs outside FP8 without showing up here; and a row
``<attention>.dpa`` for every ``MultiheadAttention`` built with ``fp8_dpa=True``, saying
whether its core runs in FP8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fp8lab.gemm.backends.select import DeviceFacts, Plan, TEFacts, probe_te
from fp8lab.layers.attention import DPA_BACKENDS, MultiheadAttention
from fp8lab.layers.convert import SKIP_REASON_ATTR
from fp8lab.layers.convert_hf import is_hf_conv1d, unconverted_reason
from fp8lab.layers.linear import Linear

UNCONVERTED = "torch"  # precision and backend of an nn.Linear fp8lab does not run


@dataclass(frozen=True)
class LayerRow:
    name: str  # qualified layer name from named_modules
    precision: str  # "fp8", "bf16", or "torch" for a layer fp8lab does not run
    backend: str  # "te", "scaled_mm", "emulated", "bf16" or "torch"
    reason: str


class Description(list):
    """A list of LayerRow that prints as an aligned table."""

    def __str__(self) -> str:
        header = ("layer", "precision", "backend", "reason")
        cells = [header] + [(r.name, r.precision, r.backend, r.reason) for r in self]
        widths = [max(len(row[i]) for row in cells) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3] for row in cells]
        return "\n".join(line.rstrip() for line in lines)


def plan_for(linear: Linear, device: DeviceFacts, te: TEFacts | None = None) -> Plan:
    """The plan ``linear`` would get on a device with these facts; no device is touched.

    The same decision as ``Linear.plan`` (it is ``Linear.plan_for``), so a CUDA plan can
    be checked on a machine without a GPU.

    Args:
        linear: the layer.
        device: facts of the device, e.g. ``DeviceFacts("cuda", (9, 0), "H100")``.
        te: Transformer Engine facts (default: probed on this machine).
    """
    return linear.plan_for(device, te if te is not None else probe_te())


def describe(
    model: nn.Module,
    device: torch.device | str | DeviceFacts | None = None,
    *,
    te: TEFacts | None = None,
) -> Description:
    """One row per GEMM layer: name, precision, backend, reason (fields of LayerRow).

    Args:
        model: any module containing fp8lab (or plain torch) Linear layers.
        device: where to plan for: None (each layer's weight device), a torch device,
            or ``DeviceFacts`` to plan for hardware this machine does not have.
        te: Transformer Engine facts, used with ``DeviceFacts`` only (default: probed).
    """
    rows = Description()

    def plan_of(linear: Linear) -> Plan:
        if isinstance(device, DeviceFacts):
            return plan_for(linear, device, te)
        return linear.plan(torch.device(device) if device is not None else None)

    for name, module in model.named_modules():
        if isinstance(module, Linear):
            plan = plan_of(module)
            rows.append(LayerRow(name, plan.precision, plan.backend, plan.reason))
        elif isinstance(module, MultiheadAttention) and module.dpa is not None:
            rows.append(_dpa_row(name, plan_of(module.qkv)))
        elif isinstance(module, nn.Linear) or is_hf_conv1d(module):
            kind = "torch.nn.Linear" if isinstance(module, nn.Linear) else "transformers Conv1D"
            reason = getattr(module, SKIP_REASON_ATTR, f"plain {kind} (not converted)")
            rows.append(LayerRow(name, UNCONVERTED, UNCONVERTED, reason))
        elif (reason := unconverted_reason(module)) is not None:
            rows.append(LayerRow(name, UNCONVERTED, UNCONVERTED, reason))
    return rows


def _dpa_row(name: str, qkv_plan: Plan) -> LayerRow:
    """The row of an attention core built with fp8_dpa, from its QKV projection's plan."""
    core = f"{name}.dpa" if name else "dpa"
    if qkv_plan.backend in DPA_BACKENDS:
        reason = "fp8_dpa: QK^T and PV as FP8 GEMMs, fp8lab's model of TE's FP8 attention (fp32 accumulation)"
        return LayerRow(core, "fp8", "emulated", reason)
    reason = f"fp8_dpa, but the QKV projection runs on {qkv_plan.backend}: the attention core is not quantized"
    return LayerRow(core, qkv_plan.precision, qkv_plan.backend, reason)
