"""Scaling recipes side by side: BF16, TE's four FP8 recipes and NVFP4, and torchao's rowwise, same batches.

Delayed scaling (an amax history), current scaling (each tensor's own amax), block scaling
(1x128 tiles, 128x128 weight blocks, power-of-2 scales) and MXFP8 (1x32 blocks, E8M0
scales), each with TE's defaults and the same history length as the quickstart for the
delayed one, torchao's rowwise recipe (a power-of-2 scale per row of each operand, what
torchtitan trains with) and TE's NVFP4 (E2M1 values, 1x16 blocks with E4M3 scales, Blackwell's).
Each is emulated exactly on machines without the hardware for it (MXFP8 and NVFP4 need
Blackwell), so the comparison means the same on a laptop. `fp8lab report` then says
per layer which recipe would have served it best.
"""

from fp8lab import (
    DelayedScaling,
    Float8BlockScaling,
    Float8CurrentScaling,
    Float8RowwiseScaling,
    MXFP8BlockScaling,
    NVFP4BlockScaling,
)
from fp8lab.run.config import ModelConfig, RunConfig, TrainConfig, Variant


def config() -> RunConfig:
    return RunConfig(
        name="scaling_recipes",
        model=ModelConfig(preset="tiny"),
        train=TrainConfig(),  # the quickstart's schedule (TrainConfig's defaults): 300 steps of 16 x 128 tokens
        variants=(
            Variant(name="bf16", precision="bf16"),
            Variant(name="delayed", scaling=DelayedScaling(amax_history_len=16), fallback="emulated"),
            Variant(name="current", scaling=Float8CurrentScaling(), fallback="emulated"),
            Variant(name="block", scaling=Float8BlockScaling(), fallback="emulated"),
            Variant(name="mxfp8", scaling=MXFP8BlockScaling(), fallback="emulated"),
            Variant(name="rowwise", scaling=Float8RowwiseScaling(), fallback="emulated"),
            Variant(name="nvfp4", scaling=NVFP4BlockScaling(), fallback="emulated"),
        ),
    )
