"""fp8lab: train transformers with FP8 GEMMs, see what FP8 does, and trust the result.

Reading order follows the data: ``formats``, ``options`` (FP8Options) -> ``scaling``
(the scaling recipes, ScalingState, update_scales) -> ``quantize`` (casts onto the FP8 grid)
-> ``gemm`` (the quantized GEMM and its backends) -> ``layers`` (Linear ... GPT,
convert, policy, describe) -> ``telemetry`` (the log-step protocol, Monitor) -> ``run`` (the
app: the CLI, recipes' training runs, report).

Invariant: this package's public names are the library's; nothing in the library imports
from ``fp8lab.run``.
"""

from fp8lab.formats import E4M3, E5M2, Role
from fp8lab.layers import (
    GPT,
    GPTConfig,
    LayerNormLinear,
    LayerNormMLP,
    Linear,
    MultiheadAttention,
    PrecisionPolicy,
    TransformerBlock,
    convert,
    describe,
)
from fp8lab.options import FP8Options
from fp8lab.scaling import (
    DelayedScaling,
    Float8BlockScaling,
    Float8CurrentScaling,
    Float8RowwiseScaling,
    MXFP8BlockScaling,
    NVFP4BlockScaling,
    ScalingState,
    update_scales,
)
from fp8lab.telemetry.monitor import Monitor

__version__ = "0.1.0"

__all__ = [
    "DelayedScaling",
    "Float8CurrentScaling",
    "Float8BlockScaling",
    "MXFP8BlockScaling",
    "NVFP4BlockScaling",
    "Float8RowwiseScaling",
    "E4M3",
    "E5M2",
    "FP8Options",
    "Linear",
    "Role",
    "ScalingState",
    "update_scales",
    "__version__",
    "LayerNormLinear",
    "LayerNormMLP",
    "MultiheadAttention",
    "TransformerBlock",
    "GPT",
    "GPTConfig",
    "PrecisionPolicy",
    "convert",
    "describe",
    "Monitor",
]
