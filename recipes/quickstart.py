"""Quickstart: a tiny byte-level GPT on the Python stdlib, FP8 (emulated) against BF16.

Runs on a 2-core CPU in a few minutes, both variants included. FP8 uses
fallback="emulated" so its numerics are FP8's on any machine.
"""

from fp8lab import DelayedScaling
from fp8lab.run.config import ModelConfig, RunConfig, TrainConfig, Variant


def config() -> RunConfig:
    return RunConfig(
        name="quickstart",
        model=ModelConfig(preset="tiny"),
        train=TrainConfig(  # TrainConfig's defaults, spelled out; the other recipes take them as they are
            steps=300,
            batch_size=16,
            block_size=128,
            lr=2e-3,
            warmup_steps=20,
            log_interval=10,
            eval_interval=100,
            eval_batches=8,
        ),
        variants=(
            Variant(name="bf16", precision="bf16"),
            Variant(name="fp8", precision="fp8", scaling=DelayedScaling(amax_history_len=16), fallback="emulated"),
        ),
    )
