"""The precision ladder: FP32, FP16 (dynamic loss scaling), BF16 and FP8 on the same batches.

Each rung really runs in its precision (fp8lab/run/precision.py has the table). FP32 is the
reference every gap is measured against. Two more rungs show what the ladder's choices
buy: BF16 without master weights (parameters and AdamW state in bf16), and FP8 GEMMs
over FP16 activations, with loss scaling, as Transformer Engine allows. Three go past the
linear layers (issue 25): FP8 attention (QK^T and PV in FP8, TE's fp8_dpa), AdamW's moments
stored in FP8/FP16 (FP8-LM's O2 layout, fp32 master weights), FP8 primary weights (the FP8
Linears' weights stored as E4M3 codes + scale, TE's quantized_model_init, with an fp32 master
copy the optimizer updates: ``fp8_w8``), and all three (``fp8_all``). The final table
gives per rung the val loss, its gap to FP32, tokens/s, exactly counted memory and
skipped steps. FP8 uses fallback="emulated" so its numerics are FP8's on any machine.
"""

from fp8lab import DelayedScaling
from fp8lab.run.config import ModelConfig, RunConfig, TrainConfig, Variant

SCALING = DelayedScaling(amax_history_len=16)


def config() -> RunConfig:
    return RunConfig(
        name="precision_ladder",
        model=ModelConfig(preset="tiny"),  # the quickstart's model and batches: ~3 min on 2 idle cores
        train=TrainConfig(),  # the quickstart's schedule (TrainConfig's defaults): 300 steps of 16 x 128 tokens
        variants=(
            Variant(name="fp32", precision="fp32"),
            Variant(name="fp16", precision="fp16"),
            Variant(name="bf16", precision="bf16"),
            Variant(name="fp8", precision="fp8", scaling=SCALING, fallback="emulated"),
            Variant(name="bf16_no_master", precision="bf16", master_weights=False),
            Variant(name="fp8_fp16", precision="fp8", activations="fp16", scaling=SCALING, fallback="emulated"),
            Variant(name="fp8_attn", precision="fp8", scaling=SCALING, fallback="emulated", fp8_dpa=True),
            Variant(name="fp8_adam8", precision="fp8", scaling=SCALING, fallback="emulated", optimizer_state="fp8-lm"),
            Variant(name="fp8_w8", precision="fp8", scaling=SCALING, fallback="emulated", weights="fp8-master"),
            Variant(
                name="fp8_all",
                precision="fp8",
                scaling=SCALING,
                fallback="emulated",
                fp8_dpa=True,
                optimizer_state="fp8-lm",
                weights="fp8-master",
            ),
        ),
        baseline="fp32",
    )
