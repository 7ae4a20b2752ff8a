"""MultiheadAttention: fused QKV projection and output projection in FP8, core optionally FP8.

Invariant: the two projections are quantized, ``qkv`` (hidden -> 3 * hidden, one
``fp8lab.Linear``) and ``proj`` (hidden -> hidden); the attention core (QK^T, softmax,
PV) is quantized only with ``fp8_dpa=True`` (off by default, as in Transformer Engine's
recipes) while the ``qkv`` layer's plan is FP8 on fp8lab's own backends: then it is
``fp8lab.layers.fp8_attention``'s model, with its own scaling state (``self.dpa``). The QKV features are
laid out ``(three h d)``: all query heads, then all key heads, then all value heads
(``nn.MultiheadAttention``'s ``in_proj_weight`` layout), so weights move between the two
unchanged. With ``rotary_base`` set, q and k are rotated by their positions
(``fp8lab.layers.rotary``, unquantized) between the QKV GEMM and the core.

Where the core computes (``attention_core``), the same for the BF16 baseline and every
FP8 variant:
- "auto" (default): in float32 on CPU, on the bf16 values of q, k and v, with the output
  rounded to the activations' dtype; in the activations' dtype elsewhere (the fused
  kernel a GPU user runs). On CPU a bf16 attention runs in oneDNN-less scalar code on
  AVX2-only machines (its backward ~3.5x slower than float32 at quickstart size), and
  float32 gives the same numbers on every CPU. It is more accurate than a GPU's bf16
  flash attention, which rounds the softmax probabilities to bf16 before P @ V
  (relative error ~2e-5 against 2-4e-3); BENCHMARKS.md measures what that changes in the
  BF16 baseline's loss.
- "native": ``scaled_dot_product_attention`` in the activations' dtype everywhere.
- "fp32": float32 everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from fp8lab.layers import choices
from fp8lab.layers.choices import one_of
from fp8lab.layers.fp8_attention import FP8DotProductAttention
from fp8lab.layers.linear import Linear
from fp8lab.layers.norm import Norm, check_normalization
from fp8lab.layers.rotary import RotaryEmbedding
from fp8lab.options import FP8Options

ATTN_MASK_TYPES = ("causal", "no_mask")
ATTENTION_CORES = ("auto", "native", "fp32")
# The qkv projection's backends under which fp8_dpa runs the FP8 core (fp8lab's own GEMMs).
DPA_BACKENDS = ("emulated", "scaled_mm")


def check_attention_core(core: str) -> str:
    """``core`` itself, or ValueError naming the allowed values."""
    return one_of("attention_core", core, ATTENTION_CORES)


def attention(q, k, v, *, causal: bool, core: str = "auto") -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` over (B, H, T, D) tensors, where ``core`` says."""
    low_precision = q.dtype in (torch.bfloat16, torch.float16)
    if low_precision and (core == "fp32" or (core == "auto" and q.device.type == "cpu")):
        # autocast would run SDPA in its lower precision again: off for the float32 core
        with torch.autocast(q.device.type, enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        return y.to(q.dtype)  # one rounding of the float32 result
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


class MultiheadAttention(nn.Module):
    """Self-attention over (B, T, C) input with an optional input norm.

    Args:
        hidden_size: model width C; must be divisible by ``num_attention_heads``.
        num_attention_heads: number of heads H (head size C / H).
        attn_mask_type: "causal" (token t sees tokens <= t) or "no_mask".
        attention_core: where the core computes: "auto", "native" or "fp32" (see the
            module docstring).
        normalization: None (no input norm), "LayerNorm" or "RMSNorm".
        rotary_base: None (no position information here), or the base theta of rotary
            embeddings of q and k (10000 in Llama); the head size must then be even.
        bias: learn additive biases in the QKV and output projections.
        eps: the input norm's epsilon.
        fp8_dpa: run QK^T and PV as FP8 GEMMs with delayed scaling (Transformer Engine's
            recipe field of that name; ``fp8lab.layers.fp8_attention``) whenever the ``qkv``
            projection runs in FP8 on the emulated or scaled_mm backend; the scaling must be
            a ``DelayedScaling``. Off (default): the core is ``attention_core``'s, and the
            layer has no attention scaling state.
        fp8: the FP8 options of both GEMMs, as ``fp8lab.Linear`` takes them (an FP8Options,
            a scaling recipe alone, or None: ``FP8Options()``).
        device: where parameters and scaling state are created.
    """

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        *,
        attn_mask_type: str = "causal",
        attention_core: str = "auto",
        normalization: str | None = None,
        rotary_base: float | None = None,
        bias: bool = True,
        eps: float = 1e-5,
        fp8_dpa: bool = False,
        fp8: FP8Options | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        one_of("attn_mask_type", attn_mask_type, ATTN_MASK_TYPES)
        choices.size("hidden_size", hidden_size)
        choices.size("num_attention_heads", num_attention_heads)
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"
            )
        if normalization is not None:
            check_normalization(normalization)
        if rotary_base is not None:
            choices.positive_float("rotary_base", rotary_base)  # TypeError for a non-number
        head_size = hidden_size // num_attention_heads
        rotary = RotaryEmbedding(head_size, rotary_base) if rotary_base is not None else None  # checks, no tensors
        self.num_attention_heads, self.attn_mask_type = num_attention_heads, attn_mask_type
        self.attention_core = check_attention_core(attention_core)
        gemm = dict(fp8=fp8, device=device)
        self.norm = Norm(hidden_size, normalization, eps, device=device) if normalization is not None else None
        self.qkv = Linear(hidden_size, 3 * hidden_size, bias, **gemm)
        self.rotary = rotary
        self.proj = Linear(hidden_size, hidden_size, bias, **gemm)
        self.fp8_dpa = choices.flag("fp8_dpa", fp8_dpa)
        # only with fp8_dpa, so the state_dict of every other model is unchanged
        self.dpa = FP8DotProductAttention(self.qkv.fp8.scaling, device=device) if self.fp8_dpa else None

    def dpa_runs(self, device: torch.device) -> bool:
        """Whether the core runs in FP8 on ``device``: fp8_dpa, and the qkv projection's plan
        is FP8 on fp8lab's own GEMMs (a TE-run layer keeps TE's recipe, fp8_dpa pinned off)."""
        return self.dpa is not None and self.qkv.plan(device).backend in DPA_BACKENDS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) if self.norm is not None else x  # (B, T, C)
        qkv = self.qkv(h)  # (B, T, 3C)
        q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=self.num_attention_heads)
        if self.rotary is not None:
            q, k = self.rotary(q, k)  # (B, H, T, D) each, rotated by position
        causal = self.attn_mask_type == "causal"
        if self.dpa_runs(x.device):
            y = self.dpa(q, k, v, causal=causal)  # (B, H, T, D), FP8 QK^T and PV
        else:
            y = attention(q, k, v, causal=causal, core=self.attention_core)  # (B, H, T, D)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))  # (B, T, C)

    def extra_repr(self) -> str:
        return (
            f"num_attention_heads={self.num_attention_heads}, attn_mask_type={self.attn_mask_type}, "
            f"attention_core={self.attention_core}" + (", fp8_dpa=True" if self.fp8_dpa else "")
        )
