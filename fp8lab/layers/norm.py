"""Norm: LayerNorm or RMSNorm over the last dimension, always computed in float32.

Invariant: the statistics and the affine transform run in float32 (float64 for float64
input) whatever the input dtype and whether autocast is on (BF16 variance loses too much for long hidden sizes);
the output has the input's dtype. Parameters are float32 like every other parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fp8lab.layers import choices
from fp8lab.layers.choices import one_of

NORMALIZATIONS = ("LayerNorm", "RMSNorm")


def check_normalization(normalization: str) -> str:
    """``normalization`` itself, or ValueError naming the allowed values."""
    return one_of("normalization", normalization, NORMALIZATIONS)


class Norm(nn.Module):
    """LayerNorm (weight and bias) or RMSNorm (weight only), Transformer Engine's names.

    Args:
        hidden_size: size of the normalized last dimension.
        normalization: "LayerNorm" or "RMSNorm".
        eps: added to the variance (LayerNorm) or mean square (RMSNorm).
        device: where the parameters are created.
    """

    def __init__(
        self,
        hidden_size: int,
        normalization: str = "LayerNorm",
        eps: float = 1e-5,
        *,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        hidden_size = choices.size("hidden_size", hidden_size)
        self.normalization = check_normalization(normalization)
        eps = choices.positive_float("eps", eps)
        device = choices.device(device)
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device))
        if normalization == "LayerNorm":
            self.bias = nn.Parameter(torch.zeros(hidden_size, device=device))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)
            x_hp, w_hp = x.to(dtype), self.weight.to(dtype)
            if self.normalization == "LayerNorm":
                y_hp = F.layer_norm(x_hp, (self.hidden_size,), w_hp, self.bias.to(dtype), self.eps)
            else:
                y_hp = F.rms_norm(x_hp, (self.hidden_size,), w_hp, self.eps)
        return y_hp.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, normalization={self.normalization}, eps={self.eps}"
