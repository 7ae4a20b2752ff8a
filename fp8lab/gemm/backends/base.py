"""The backend interface: what an ``fp8lab.Linear`` asks of the backend its plan names.

Invariant: a backend object holds no per-layer state; one is shared by every layer with
the same plan on the same device type (``fp8lab.gemm.backends.backend_for``). What a
backend needs from a layer it reads from the layer's declared attributes: ``weight``,
``bias``, ``training``, ``fp8`` (FP8Options), ``fp8_state`` (ScalingState) and, for the
Transformer Engine backend, ``te_handle``.

Two kinds of backend implement it:
- ``QuantizedGemmBackend`` subclasses (``emulated``, ``scaled_mm``) run fp8lab's own
  quantized GEMM (``fp8lab.gemm.qlinear``) with the layer's ScalingState: they supply
  ``quantize`` (cast with a given scale) and ``gemm`` (the hardware model); the BF16
  backend does the same with ``round`` and no scaling;
- the ``te`` backend runs the whole layer in a Transformer Engine module.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from fp8lab.gemm.qlinear import output_dtype, quantized_linear


class Backend(Protocol):
    """One way to run a layer's GEMMs."""

    name: str  # "te", "scaled_mm", "emulated" or "bf16", as in the layer's Plan
    fp8: bool  # whether the GEMMs run in FP8

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)``: (..., in_features) -> (..., out_features)."""
        ...


class QuantizedGemmBackend:
    """Base of the FP8 backends whose scaling fp8lab owns: it records amaxes into the
    layer's ScalingState in training, and ``fp8lab.update_scales`` updates the scales."""

    name: str
    fp8 = True

    def quantize(self, x_hp: torch.Tensor, scale: torch.Tensor, fmt) -> torch.Tensor:
        raise NotImplementedError

    def gemm(self, a, b, a_inv, b_inv, out_dtype: torch.dtype, bias=None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        record = layer.training  # eval forwards leave the amax history alone
        if record:
            layer.note_training_forward()
        return quantized_linear(x, layer.weight, layer.bias, layer.fp8_state, self, output_dtype(x), record)
