"""LayerNormMLP: norm, fc1, activation, fc2, with both GEMMs in FP8.

Invariant: fc1 and fc2 are separate ``fp8lab.Linear`` layers, each with its own
ScalingState; the activation runs in the GEMM's output dtype (BF16 under autocast),
between the two quantized GEMMs.

Activations, as in Transformer Engine:
- "gelu": GELU with the tanh approximation (TE's ``gelu`` is the tanh form);
- "swiglu": fc1 emits 2 * ffn_hidden_size features, split in half as ``(a, b)``,
  and the activation is ``silu(a) * b`` (TE's ``swiglu``: the first half is gated).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fp8lab.layers import choices
from fp8lab.layers.choices import one_of
from fp8lab.layers.linear import Linear
from fp8lab.layers.norm import Norm
from fp8lab.options import FP8Options

ACTIVATIONS = ("gelu", "swiglu")


def check_activation(activation: str) -> str:
    """``activation`` itself, or ValueError naming the allowed values."""
    return one_of("activation", activation, ACTIVATIONS)


class LayerNormMLP(nn.Module):
    """``fc2(act(fc1(Norm(x))))``; the residual is added by the caller.

    Args:
        hidden_size: size of the input and output features.
        ffn_hidden_size: size of the intermediate features (per half under SwiGLU).
        normalization: "LayerNorm" or "RMSNorm".
        activation: "gelu" (tanh approximation) or "swiglu".
        bias: learn additive biases in fc1 and fc2.
        eps: the norm's epsilon.
        fp8: the FP8 options of both GEMMs, as ``fp8lab.Linear`` takes them (an FP8Options,
            a scaling recipe alone, or None: ``FP8Options()``).
        device: where parameters and scaling state are created.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        *,
        normalization: str = "LayerNorm",
        activation: str = "gelu",
        bias: bool = True,
        eps: float = 1e-5,
        fp8: FP8Options | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        choices.size("hidden_size", hidden_size)
        choices.size("ffn_hidden_size", ffn_hidden_size)
        self.activation = check_activation(activation)
        fc1_out = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        gemm = dict(fp8=fp8, device=device)
        self.norm = Norm(hidden_size, normalization, eps, device=device)
        self.fc1 = Linear(hidden_size, fc1_out, bias, **gemm)
        self.fc2 = Linear(ffn_hidden_size, hidden_size, bias, **gemm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.norm(x))  # (B, T, F) or (B, T, 2F)
        if self.activation == "gelu":
            h = F.gelu(h, approximate="tanh")
        else:
            a, b = h.chunk(2, dim=-1)  # (B, T, F) each
            h = F.silu(a) * b
        return self.fc2(h)  # (B, T, C)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
