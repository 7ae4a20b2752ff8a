"""fp8lab: train transformers with FP8 GEMMs, see what FP8 does, and trust the result.

Reading order follows the data: config -> layers -> quantized GEMM (qgemm) ->
executors/backends -> scaling state -> update_scales -> telemetry.
"""

from fp8lab.config import DelayedScaling
from fp8lab.formats import E4M3, E5M2, Role
from fp8lab.options import FP8Options
from fp8lab.linear import Linear
from fp8lab.state import ScalingState
from fp8lab.update import update_scales
from fp8lab.layers import LayerNormLinear, LayerNormMLP, MultiheadAttention, TransformerBlock
from fp8lab.gpt import GPT, GPTConfig
from fp8lab.policy import PrecisionPolicy
from fp8lab.convert import convert
from fp8lab.describe import describe

__version__ = "0.1.0"

__all__ = ["DelayedScaling", "E4M3", "E5M2", "FP8Options", "Linear", "Role", "ScalingState", "update_scales", "__version__",
           "LayerNormLinear", "LayerNormMLP", "MultiheadAttention", "TransformerBlock", "GPT", "GPTConfig",
           "PrecisionPolicy", "convert", "describe"]
