"""Layers whose every GEMM is an ``fp8lab.Linear``, and the tools that act on them.

Invariant: every GEMM of every layer is an ``fp8lab.Linear``, whose plan (and its reason)
``describe`` shows; no layer updates scales itself (``fp8lab.update_scales`` does).

Reading order follows the data through a model: linear -> norm -> LayerNormLinear -> rotary ->
MultiheadAttention -> LayerNormMLP -> TransformerBlock -> GPT; then ``policy`` (which
layers stay BF16), ``convert`` (nn.Linear -> fp8lab.Linear) and ``describe``.
"""

from fp8lab.layers.attention import MultiheadAttention
from fp8lab.layers.block import TransformerBlock
from fp8lab.layers.convert import convert
from fp8lab.layers.describe import describe
from fp8lab.layers.gpt import GPT, GPTConfig
from fp8lab.layers.layernorm_linear import LayerNormLinear
from fp8lab.layers.linear import Linear
from fp8lab.layers.mlp import LayerNormMLP
from fp8lab.layers.norm import NORMALIZATIONS, Norm
from fp8lab.layers.policy import PrecisionPolicy

__all__ = [
    "GPT",
    "GPTConfig",
    "LayerNormLinear",
    "LayerNormMLP",
    "Linear",
    "MultiheadAttention",
    "NORMALIZATIONS",
    "Norm",
    "PrecisionPolicy",
    "TransformerBlock",
    "convert",
    "describe",
]
