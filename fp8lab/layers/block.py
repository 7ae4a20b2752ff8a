"""TransformerBlock: a pre-norm GPT block built from MultiheadAttention and LayerNormMLP.

Invariant: the residual stream is never normalized or quantized in place:
``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``, with each norm fused into the
module that follows it (``attn.norm``, ``mlp.norm``); the four GEMMs are the
``fp8lab.Linear`` layers ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2``.
"""

from __future__ import annotations

import torch
from torch import nn

from fp8lab.layers.attention import MultiheadAttention
from fp8lab.layers.mlp import LayerNormMLP
from fp8lab.layers.norm import check_normalization
from fp8lab.options import FP8Options


class TransformerBlock(nn.Module):
    """One pre-norm transformer block over (B, T, C).

    Args:
        hidden_size: model width C.
        ffn_hidden_size: MLP intermediate size.
        num_attention_heads: number of attention heads.
        normalization: "LayerNorm" or "RMSNorm" (both norms).
        activation: "gelu" (tanh approximation) or "swiglu".
        attn_mask_type: "causal" or "no_mask".
        attention_core: where the attention core computes: "auto", "native" or "fp32".
        fp8_dpa: FP8 attention core (``MultiheadAttention``'s ``fp8_dpa``; off by default).
        rotary_base: None, or the base theta of rotary embeddings of q and k (Llama: 10000).
        bias: learn additive biases in all four GEMMs.
        eps: the norms' epsilon.
        fp8: the FP8 options of all four GEMMs, as ``fp8lab.Linear`` takes them (an
            FP8Options, a scaling recipe alone, or None: ``FP8Options()``).
        device: where parameters and scaling state are created.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_attention_heads: int,
        *,
        normalization: str = "LayerNorm",
        activation: str = "gelu",
        attn_mask_type: str = "causal",
        attention_core: str = "auto",
        fp8_dpa: bool = False,
        rotary_base: float | None = None,
        bias: bool = True,
        eps: float = 1e-5,
        fp8: FP8Options | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        gemm = dict(bias=bias, eps=eps, fp8=fp8, device=device)
        self.attn = MultiheadAttention(
            hidden_size,
            num_attention_heads,
            attn_mask_type=attn_mask_type,
            attention_core=attention_core,
            fp8_dpa=fp8_dpa,
            normalization=check_normalization(normalization),
            rotary_base=rotary_base,
            **gemm,
        )
        self.mlp = LayerNormMLP(
            hidden_size, ffn_hidden_size, normalization=normalization, activation=activation, **gemm
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)  # (B, T, C); attn.norm is the first pre-norm
        return x + self.mlp(x)  # mlp.norm is the second
