"""MultiheadAttention: fused QKV projection and output projection in FP8, core in BF16.

Invariant: exactly two GEMMs are quantized, ``qkv`` (hidden -> 3 * hidden, one
``fp8lab.Linear``) and ``proj`` (hidden -> hidden); the attention core (QK^T, softmax,
PV) runs in the activations' dtype (BF16 under autocast) through
``scaled_dot_product_attention``, as in Transformer Engine's FP8 recipes, where
attention itself is not quantized. The QKV features are laid out ``(three h d)``:
all query heads, then all key heads, then all value heads (``nn.MultiheadAttention``'s
``in_proj_weight`` layout), so weights move between the two unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from fp8lab.config import DelayedScaling
from fp8lab.layers.norm import Norm
from fp8lab.linear import Linear

ATTN_MASK_TYPES = ("causal", "no_mask")


class MultiheadAttention(nn.Module):
    """Self-attention over (B, T, C) input with an optional input norm.

    Args:
        hidden_size: model width C; must be divisible by ``num_attention_heads``.
        num_attention_heads: number of heads H (head size C / H).
        attn_mask_type: "causal" (token t sees tokens <= t) or "no_mask".
        normalization: None (no input norm), "LayerNorm" or "RMSNorm".
        bias: learn additive biases in the QKV and output projections.
        eps: the input norm's epsilon.
        recipe: the DelayedScaling recipe of both GEMMs (default: TE's defaults).
        backend: "auto", "te", "scaled_mm", "emulated" or "bf16".
        fallback: what "auto" does without FP8 hardware: "bf16" or "emulate".
        device: where parameters and scaling state are created.
    """

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        *,
        attn_mask_type: str = "causal",
        normalization: str | None = None,
        bias: bool = True,
        eps: float = 1e-5,
        recipe: DelayedScaling | None = None,
        backend: str = "auto",
        fallback: str = "bf16",
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if attn_mask_type not in ATTN_MASK_TYPES:
            raise ValueError(f"attn_mask_type must be one of {ATTN_MASK_TYPES}, got {attn_mask_type!r}")
        if num_attention_heads < 1 or hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                f"({num_attention_heads}), which must be >= 1"
            )
        self.num_attention_heads, self.attn_mask_type = num_attention_heads, attn_mask_type
        gemm = dict(recipe=recipe, backend=backend, fallback=fallback, device=device)
        self.norm = Norm(hidden_size, normalization, eps, device=device) if normalization is not None else None
        self.qkv = Linear(hidden_size, 3 * hidden_size, bias, **gemm)
        self.proj = Linear(hidden_size, hidden_size, bias, **gemm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) if self.norm is not None else x  # (B, T, C)
        qkv = self.qkv(h)  # (B, T, 3C)
        q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=self.num_attention_heads)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.attn_mask_type == "causal")  # (B, H, T, D)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))  # (B, T, C)

    def extra_repr(self) -> str:
        return f"num_attention_heads={self.num_attention_heads}, attn_mask_type={self.attn_mask_type}"
