"""LayerNormLinear: a norm followed by one FP8 GEMM (Transformer Engine's LayerNormLinear).

Invariant: the GEMM is an ``fp8lab.Linear`` (``self.linear``), so it has its own
ScalingState and backend plan; the norm (``self.norm``) runs in float32 and is never
quantized.
"""

from __future__ import annotations

import torch
from torch import nn

from fp8lab.layers import choices
from fp8lab.layers.linear import Linear
from fp8lab.layers.norm import Norm
from fp8lab.options import FP8Options


class LayerNormLinear(nn.Module):
    """``y = Linear(Norm(x))`` with the Linear's GEMMs in FP8.

    Args:
        in_features: size of each input sample (the normalized dimension).
        out_features: size of each output sample.
        bias: learn an additive bias in the Linear.
        normalization: "LayerNorm" or "RMSNorm".
        eps: the norm's epsilon.
        fp8: the FP8 options of the GEMM, as ``fp8lab.Linear`` takes them (an FP8Options,
            a scaling recipe alone, or None: ``FP8Options()``).
        device: where parameters and scaling state are created.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        normalization: str = "LayerNorm",
        eps: float = 1e-5,
        fp8: FP8Options | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        choices.size("in_features", in_features)  # a norm over no features is undefined
        self.norm = Norm(in_features, normalization, eps, device=device)
        self.linear = Linear(in_features, out_features, bias, fp8=fp8, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))  # (..., in) -> (..., out)
