"""Layer-wise precision: first and last blocks kept in BF16, against all-FP8 and BF16."""

from fp8lab import DelayedScaling
from fp8lab.run.config import ModelConfig, RunConfig, TrainConfig, Variant


def config() -> RunConfig:
    scaling = DelayedScaling(amax_history_len=16)
    return RunConfig(
        name="layerwise",
        model=ModelConfig(preset="tiny"),
        train=TrainConfig(steps=300, batch_size=16, block_size=128, log_interval=10, eval_interval=100),
        variants=(
            Variant(name="bf16", precision="bf16"),
            Variant(name="fp8_all", precision="fp8", scaling=scaling, fallback="emulated"),
            Variant(
                name="fp8_first_last_bf16", precision="fp8", scaling=scaling, fallback="emulated", first_last_bf16=1
            ),
        ),
    )
