"""The backend interface: what an ``fp8lab.Linear`` asks of the backend its plan names.

Invariant: a backend object holds no per-layer state; one is shared by every layer with
the same plan on the same device type (``fp8lab.gemm.backends.backend_for``). What a
backend needs from a layer it reads from the layer's declared attributes: ``weight``,
``bias``, ``training``, ``fp8`` (FP8Options), ``gemm_weight()`` (the (out, in) weight the
GEMM takes), ``fp8_state`` (ScalingState), ``telemetry`` (TelemetrySlot) and, for the
Transformer Engine backend, ``te_handle``. Telemetry reads a layer only through
``scaling_view``, so it never needs to know which backend runs it.

Implementations:
- ``QuantizedGemmBackend`` subclasses (``emulated``, ``scaled_mm``) run fp8lab's own
  quantized GEMM (``fp8lab.gemm.qlinear``) with the layer's ScalingState: they supply
  ``quantize`` (cast with a given scale) and ``gemm`` (the hardware model);
- the rounded backends (``bf16``, ``fp16``, ``fp32``) run the same GEMM with ``round`` (to
  their precision) and no scaling;
- the ``te`` backend runs the whole layer in a Transformer Engine module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from fp8lab.accumulation import FP32
from fp8lab.formats import DGRAD, FPROP, WGRAD, FP8Format
from fp8lab.gemm.accumulate import tensor_core_accumulate
from fp8lab.gemm.exact import epilogue, gemm_path, scaled_gemm
from fp8lab.gemm.qlinear import output_dtype, quantized_linear
from fp8lab.quantize.blocks import BLOCK_STAT_NAMES
from fp8lab.quantize.tensor import STAT_NAMES
from fp8lab.scaling.state import ScalingState


@dataclass(frozen=True)
class ScalingView:
    """One FP8 layer's scaling as telemetry reads it: the live tensors, not copies.

    Read-only for telemetry, except ``faults``, whose contract is "counts since telemetry
    last drained it": the collector zeroes it after reading (and restores it on resume).
    A value a scaling does not have is NaN (the scale of a block scaling, the cast
    statistics of a layer never armed or whose casts fp8lab cannot see).
    """

    scale: torch.Tensor  # (3,) float32: the scale of each role's cast (input, weight, grad_output)
    amax: torch.Tensor  # (3,) float32: the amax recorded this step
    cast_stats: torch.Tensor  # (3, len(STAT_NAMES)) of the last armed step
    faults: torch.Tensor  # (3,) casts that met NaN or inf since telemetry last drained them
    amax_history: torch.Tensor | None = None  # (H, 3) under delayed scaling; row 0 = this step
    block_stats: torch.Tensor | None = None  # (3, len(BLOCK_STAT_NAMES)) under block scalings
    whatif: torch.Tensor | None = None  # (3, len(WHATIF_RECIPES), len(STAT_NAMES)) of the last armed step
    # (3,) fprop, dgrad, wgrad output SQNR (dB) against the BF16 GEMM of the same operands,
    # of the last armed step (fp8lab.gemm.shadow); None or NaN: not measured
    shadow_sqnr: torch.Tensor | None = None
    # (3,) the same GEMMs' output SQNR (dB) against their fp32-accumulated twins (the accumulator
    # model's own cost); None or NaN: not measured (an fp32 accumulator, or TE)
    accum_sqnr: torch.Tensor | None = None


def not_measured(device: torch.device, columns: int = len(STAT_NAMES)) -> torch.Tensor:
    """Statistics fp8lab has not measured (or cannot see): all NaN, (3, columns)."""
    return torch.full((3, columns), float("nan"), dtype=torch.float32, device=device)


class Backend(Protocol):
    """One way to run a layer's GEMMs."""

    name: str  # "te", "scaled_mm", "emulated", "bf16", "fp16" or "fp32", as in the layer's Plan
    fp8: bool  # whether the GEMMs run in FP8

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)``: (..., in_features) -> (..., out_features)."""
        ...

    def scaling_view(self, layer: nn.Module) -> ScalingView | None:
        """The layer's scaling for telemetry; None when the GEMMs do not run in FP8."""
        ...


class QuantizedGemmBackend:
    """Base of the FP8 backends whose scaling fp8lab owns: it records amaxes into the
    layer's ScalingState in training, and ``fp8lab.update_scales`` updates the scales."""

    name: str
    fp8 = True
    # Whether block-scaled operands reach ``gemm`` as FP8 values with their block scales (the
    # hardware's blockwise GEMM applies them), whatever the accumulator; else dequantized
    # values unless the accumulator model applies the scales (``fp8lab.gemm.qlinear``).
    block_scales_in_gemm = False

    def quantize(self, x_hp: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
        """``x_hp`` cast onto ``fmt``'s grid with ``scale`` (given, never computed here)."""
        raise NotImplementedError

    def fp8_values(self, codes: torch.Tensor) -> torch.Tensor:
        """FP8 ``codes`` (a float8 tensor: an FP8 primary weight) as this backend's GEMM takes
        the values ``quantize`` returns (exact: no rounding)."""
        raise NotImplementedError

    def quantize_blocks(self, x2d: torch.Tensor, block, scale, scale_inv, fmt: FP8Format) -> torch.Tensor:
        """``x2d`` cast block by block with the given power-of-2 ``scale``s, then multiplied by
        ``scale_inv`` (exact dequantized values), or left as the FP8 values when ``scale_inv``
        is None (their scales then go to the GEMM as ``group_scales``)."""
        raise NotImplementedError

    def gemm(self, a, b, a_inv, b_inv, out_dtype: torch.dtype, bias=None, **block_operands) -> torch.Tensor:
        """``round(fp32(a @ b) * (a_inv * b_inv) + bias)`` in ``out_dtype``. With block-scaled
        operands (``fp8lab.gemm.qlinear._gemm``) also ``accumulator``, the operands'
        ``formats``, ``group_scales`` and ``blocks``: each backend reads those its GEMM needs."""
        raise NotImplementedError

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        record = layer.training  # eval forwards leave the amax history alone
        if record:
            layer.note_training_forward()
        return quantized_linear(
            x,
            layer.gemm_weight(),
            layer.bias,
            layer.fp8.scaling,
            layer.fp8_state,
            self,
            output_dtype(x),
            record,
            layer.telemetry,
            self.accumulators(layer.fp8),
        )

    def fp32_reference(
        self, a, b, a_inv, b_inv, out_dtype: torch.dtype, bias=None, *, formats=(None, None), group_scales=(None, None)
    ) -> torch.Tensor:
        """The same GEMM with an ideal fp32 accumulator (the hardware model of ``exact`` on this
        device), the reference of the accumulator telemetry; log steps only."""
        inv = a_inv if b_inv is None else (b_inv if a_inv is None else a_inv * b_inv)
        if group_scales == (None, None):
            return scaled_gemm(a, b, inv, out_dtype, bias, path=gemm_path(a.device.type))
        acc = tensor_core_accumulate(a, b, *formats, FP32, a_group_scale=group_scales[0], b_group_scale=group_scales[1])
        return epilogue(acc, inv, out_dtype, bias)

    def accumulators(self, fp8) -> tuple:
        """The accumulator of fprop, dgrad and wgrad this backend runs for options ``fp8``."""
        return (fp8.accumulator(FPROP), fp8.accumulator(DGRAD), fp8.accumulator(WGRAD))

    def scaling_view(self, layer: nn.Module) -> ScalingView:
        slot, state, device = layer.telemetry, layer.fp8_state, layer.weight.device
        stats = slot.cast_stats if slot.cast_stats is not None else not_measured(device)
        if isinstance(state, ScalingState):  # delayed scaling: the ScalingState holds scale, amax, faults
            return ScalingView(
                state.scale,
                state.amax_history[0],
                stats,
                state.faults,
                state.amax_history,
                whatif=slot.whatif,
                shadow_sqnr=slot.shadow_sqnr,
                accum_sqnr=slot.accum_sqnr,
            )
        scale_amax = slot.scale_amax if slot.scale_amax is not None else not_measured(device, 2)
        blocks = None
        if not layer.fp8.scaling.per_tensor:
            blocks = slot.block_stats if slot.block_stats is not None else not_measured(device, len(BLOCK_STAT_NAMES))
        return ScalingView(
            scale_amax[:, 0],
            scale_amax[:, 1],
            stats,
            slot.fault_counts(device),
            None,
            blocks,
            slot.whatif,
            slot.shadow_sqnr,
            slot.accum_sqnr,
        )
