"""Amax history sweep: history 1, 16 and 1024 with "max" and "most_recent", against BF16."""

from fp8lab import DelayedScaling
from fp8lab.run.config import ModelConfig, RunConfig, TrainConfig, Variant

SWEEP = tuple(
    Variant(
        name=f"fp8_h{length}_{algo}",
        precision="fp8",
        fallback="emulated",
        scaling=DelayedScaling(amax_history_len=length, amax_compute_algo=algo),
    )
    for length in (1, 16, 1024)
    for algo in ("max", "most_recent")
)


def config() -> RunConfig:
    return RunConfig(
        name="amax_history_sweep",
        model=ModelConfig(preset="tiny"),
        train=TrainConfig(steps=300, batch_size=16, block_size=128, log_interval=10, eval_interval=100),
        variants=(Variant(name="bf16", precision="bf16"),) + SWEEP,
    )
