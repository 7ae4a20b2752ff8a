"""Hopper's FP8 accumulator on a training run: the tiny GPT with each accumulation model, same batches.

FP8 (delayed scaling, emulated exactly) with every GEMM accumulated in fp32 (what fp8lab computed
before it modelled the tensor cores), with accumulation="te" (what Transformer Engine asks of a
Hopper: the forward GEMM with fast accumulation, 13 fraction bits per 32 products, the backward
GEMMs promoted to fp32 every 128 products) and with fast accumulation in all three GEMMs; the
BF16 baseline on the same batches. The final table gives each one's gap to BF16; `fp8lab report`
adds, per layer, the SQNR of each GEMM against its fp32-accumulated twin and says where the
accumulator, not the cast, dominates. The GEMM error against K is benchmarks/accumulation_error.py.
"""

from fp8lab import DelayedScaling
from fp8lab.run.config import ModelConfig, RunConfig, TrainConfig, Variant

SCALING = DelayedScaling(amax_history_len=16)


def config() -> RunConfig:
    return RunConfig(
        name="accumulation",
        model=ModelConfig(preset="tiny"),  # the quickstart's model and batches
        train=TrainConfig(),  # the quickstart's schedule (TrainConfig's defaults): 300 steps of 16 x 128 tokens
        variants=(
            Variant(name="bf16", precision="bf16"),
            Variant(name="fp8_fp32acc", scaling=SCALING, fallback="emulated", accumulation="fp32"),
            Variant(name="fp8_te", scaling=SCALING, fallback="emulated", accumulation="te"),
            Variant(name="fp8_fast", scaling=SCALING, fallback="emulated", accumulation="fast"),
        ),
    )
