"""Transformer layers whose every GEMM is an ``fp8lab.Linear``.

Reading order follows the data through a block: norm -> LayerNormLinear ->
MultiheadAttention -> LayerNormMLP -> TransformerBlock.
"""

from fp8lab.layers.attention import MultiheadAttention
from fp8lab.layers.block import TransformerBlock
from fp8lab.layers.layernorm_linear import LayerNormLinear
from fp8lab.layers.mlp import LayerNormMLP
from fp8lab.layers.norm import NORMALIZATIONS, Norm

__all__ = ["LayerNormLinear", "LayerNormMLP", "MultiheadAttention", "NORMALIZATIONS", "Norm", "TransformerBlock"]
