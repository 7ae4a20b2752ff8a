"""Optimizers: AdamW with its moments stored in low precision (``LowPrecisionAdamW``)."""

from fp8lab.optim.low_precision_adamw import (
    MOMENT_DTYPES,
    OPTIMIZER_STATES,
    LowPrecisionAdamW,
    dequantize_moment,
    quantize_moment,
)

__all__ = ["MOMENT_DTYPES", "OPTIMIZER_STATES", "LowPrecisionAdamW", "dequantize_moment", "quantize_moment"]
