"""GEMM operands: a high-precision tensor made into what one GEMM multiplies, per scaling.

Invariant: every scaling produces, for a 2-D tensor, its role and its *usage* (which
dimension the GEMM contracts: the last, "rowwise", or the first, "columnwise"), an
``Operand``: exact values the backend's GEMM multiplies, and the per-tensor inverse scale
its epilogue applies (None when the values are already dequantized, as for block scales).
Scales come from ``fp8lab.scaling`` and casts from ``fp8lab.quantize.tensor``/``quantize_blocks``;
this module only connects them:

- DelayedScaling: the ScalingState's scale; the tensor's amax goes into row 0 in training;
- Float8CurrentScaling: a scale from this tensor's own amax, now;
- Float8BlockScaling / MXFP8BlockScaling: a scale per block along the contracted
  dimension, values dequantized exactly (the scales are powers of two).

Per-tensor operands are the same whatever the usage; block operands are cast again from
the high-precision tensor for each usage, as Transformer Engine does.

While the layer's TelemetrySlot is armed (log steps), the rowwise cast of each role also
leaves its statistics there, with what every other recipe would have done to the same
tensor (``fp8lab.gemm.whatif``); between log steps nothing is measured.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fp8lab.formats import Role
from fp8lab.gemm.telemetry_slot import TelemetrySlot
from fp8lab.gemm.whatif import whatif_stats
from fp8lab.quantize.tensor import amaxes_of, cast_stats
from fp8lab.quantize.blocks import block_cast_stats
from fp8lab.scaling.block import COLUMNWISE, ROWWISE, Float8BlockScaling
from fp8lab.quantize.blocks import blocks_amax
from fp8lab.scaling.current import Float8CurrentScaling
from fp8lab.scaling.delayed import DelayedScaling
from fp8lab.scaling.mxfp8 import MXFP8BlockScaling
from fp8lab.scaling.state import ScalingState

__all__ = ["COLUMNWISE", "ROWWISE", "Operand", "make_operand", "per_tensor"]


class Operand(NamedTuple):
    values: torch.Tensor  # exact values in the backend's operand dtype
    inv_scale: torch.Tensor | None  # 0-dim float32 scale_inv for the epilogue, or None


def per_tensor(scaling) -> bool:
    """Whether one scale covers the whole tensor (its operand serves every usage)."""
    return isinstance(scaling, (DelayedScaling, Float8CurrentScaling))


def make_operand(
    x2d: torch.Tensor,
    role: Role,
    usage: str,
    *,
    scaling,
    state: ScalingState | None,
    backend,
    record: bool,
    slot: TelemetrySlot | None,
) -> Operand:
    """The operand of ``x2d`` (2-D) in ``role`` for a GEMM contracting it as ``usage`` says.

    Args:
        scaling: the layer's scaling (``fp8.scaling``).
        state: the layer's ScalingState (DelayedScaling), else None.
        backend: quantizes with given scales (``quantize``, ``quantize_blocks``).
        record: training: take amaxes into the state and count NaN/inf casts.
        slot: the layer's TelemetrySlot (statistics while armed; fault counts).
    """
    measure = slot is not None and slot.armed and usage == ROWWISE
    fmt = scaling.format_for(role)
    if isinstance(scaling, DelayedScaling):
        scale = state.scale[role]
        if record:
            state.record_amax(role, amaxes_of(x2d))
        values = backend.quantize(x2d, scale, fmt)
        if measure:
            slot.cast_stats[role] = cast_stats(x2d, values, scale, fmt)
            if slot.whatif_armed:
                slot.whatif[role] = whatif_stats(x2d, role, fmt, delayed_scale=None,
                                                 known={"delayed": slot.cast_stats[role]})
        return Operand(values, scale.reciprocal())
    if isinstance(scaling, Float8CurrentScaling):
        amaxes = amaxes_of(x2d)
        scale = scaling.scale(amaxes[1], fmt)
        if record:
            slot.count_faults(role, amaxes[0])
        values = backend.quantize(x2d, scale, fmt)
        if measure:
            slot.cast_stats[role] = cast_stats(x2d, values, scale, fmt)
            slot.record_scale(role, scale, amaxes[1])
            if slot.whatif_armed:
                slot.whatif[role] = whatif_stats(x2d, role, fmt, delayed_scale=None,
                                                 known={"current": slot.cast_stats[role]})
        return Operand(values, scale.reciprocal())
    if isinstance(scaling, (Float8BlockScaling, MXFP8BlockScaling)):
        block = scaling.block(role, usage)
        amax = blocks_amax(x2d, block)
        scale, scale_inv = scaling.block_scales(amax, fmt, x2d.dtype)
        if record and usage == ROWWISE:
            slot.count_faults(role, amaxes_of(x2d)[0])
        values = backend.quantize_blocks(x2d, block, scale, scale_inv, fmt)
        if measure:
            stats = block_cast_stats(x2d, values, block, scale, fmt)
            slot.cast_stats[role] = stats[:3]
            slot.record_blocks(role, stats[3:], amax.max())
            if slot.whatif_armed:
                slot.whatif[role] = whatif_stats(x2d, role, fmt, delayed_scale=None,
                                                 known={scaling.name: slot.cast_stats[role]})
        return Operand(values, None)
    raise TypeError(f"no operand for scaling {type(scaling).__name__}")
