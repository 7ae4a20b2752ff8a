"""GPT-2 small (124M) shape, FP8 against BF16: meant for a Hopper/Ada GPU.

On a GPU with FP8 tensor cores, backend "auto" picks Transformer Engine or
torch._scaled_mm; elsewhere FP8 is emulated (slow for this size). The default corpus is
bytes, so the 50304-token vocabulary is mostly unused unless data.source names a
uint16 token file (tokens:PATH, as nanoGPT writes).
"""

from fp8lab import DelayedScaling
from fp8lab.run.config import ModelConfig, RunConfig, TrainConfig, Variant


def config() -> RunConfig:
    return RunConfig(
        name="gpt2_124m",
        model=ModelConfig(preset="gpt2-124m"),
        train=TrainConfig(
            steps=2000,
            batch_size=32,
            block_size=1024,
            lr=6e-4,
            min_lr=6e-5,
            warmup_steps=100,
            log_interval=20,
            eval_interval=250,
            eval_batches=20,
            checkpoint_interval=500,
        ),
        variants=(
            Variant(name="bf16", precision="bf16"),
            Variant(name="fp8", precision="fp8", scaling=DelayedScaling(), fallback="emulated"),
        ),
    )
