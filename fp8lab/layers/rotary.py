"""Rotary position embedding (RoPE, Su et al., arXiv 2104.09864) of the queries and keys.

Invariant: RoPE has no parameters and no state, and is never quantized: it rotates q and k
per head after the QKV GEMM and before the attention core, in float32 (float64 for float64
input), and rounds the result once to q's dtype (Transformer Engine's fused RoPE does the
same). The angles are computed in float64 and rounded once, so they are the same on every
device.

Layout, as Transformer Engine's default (``interleaved=False``), GPT-NeoX and Hugging Face
Llama: channel i of a head of size D is paired with channel i + D/2 (the "rotate half"
form; Meta's Llama pairs 2i with 2i + 1, a permutation of the same head channels), and the
pair at position t is rotated by the angle ``t * base ** (-2i / D)``. So
``q_m . k_n`` depends on the positions only through ``m - n``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

DEFAULT_BASE = 10000.0  # RoPE's and Llama's theta


def check_rotary_base(base) -> float:
    """``base`` as a float, or ValueError: RoPE's base must be a finite number > 1."""
    if isinstance(base, bool) or not isinstance(base, numbers.Real) or not (math.isfinite(base) and base > 1):
        raise ValueError(f"rotary_base must be a finite number > 1, got {base!r}")
    return float(base)


def rotary_angles(seq_len: int, head_size: int, base: float, device=None) -> torch.Tensor:
    """(seq_len, head_size / 2) float64 angles ``t * base ** (-2i / head_size)``."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float64, device=device) / head_size)  # (D/2,)
    return torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)  # (T, D/2)


class RotaryEmbedding(nn.Module):
    """Rotates (B, H, T, D) queries and keys by their positions 0 .. T-1.

    Args:
        head_size: D, the size of one attention head; even.
        base: theta of the angles ``t * theta ** (-2i / D)`` (10000 in RoPE and Llama).
    """

    def __init__(self, head_size: int, base: float = DEFAULT_BASE):
        super().__init__()
        if head_size % 2:
            raise ValueError(f"rotary embeddings pair a head's channels: head size must be even, got {head_size}")
        self.head_size, self.base = head_size, check_rotary_base(base)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x_hp = x.to(cos.dtype)
            x1, x2 = x_hp.chunk(2, dim=-1)  # (B, H, T, D/2) each: channel i pairs with i + D/2
            y_hp = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # (B, H, T, D)
        return y_hp.to(x.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # a (T, D/2) table per call: T * D / 2 sin and cos, small next to the QKV GEMM
        angles = rotary_angles(q.shape[-2], self.head_size, self.base, device=q.device)
        dtype = torch.promote_types(q.dtype, torch.float32)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # (T, D/2)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_size={self.head_size}, base={self.base}"
