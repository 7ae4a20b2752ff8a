"""MXFP8's scale rounding on a training run: round up (TE's RCEIL) against floor and even, same batches.

Mishra, Stosic & Layton (arXiv 2506.08027) found that how a block's amax becomes its E8M0 scale
decides whether MXFP8 trains: the OCP rule (floor of log2 of the amax, less the element format's
largest exponent) lets the block's largest values land above the format's maximum, where the cast
saturates them, and their runs diverged; rounding the scale up (what Transformer Engine's
MXFP8BlockScaling does, "rceil") never saturates and matched BF16. This recipe trains the
quickstart's tiny GPT with each of torchao's ScaleCalculationMode rules for MXFP8 (rceil, floor,
even), emulated exactly, next to the BF16 baseline on the same batches. Per layer and operand,
TensorBoard's scaling/<layer>/<role>/overflow_pct is the share of values each rule saturated and
sqnr_db the cast's SQNR; the final table and `fp8lab report` give each variant's gap to BF16.
At this scale the run shows the mechanism (saturation and SQNR per rule), not the divergence the
paper saw at billions of parameters and hundreds of billions of tokens.
"""

from fp8lab import MXFP8BlockScaling
from fp8lab.run.config import ModelConfig, RunConfig, TrainConfig, Variant

MODES = ("rceil", "floor", "even")  # torchao's ScaleCalculationMode names; rceil is TE's (the default)


def config() -> RunConfig:
    return RunConfig(
        name="mxfp8_rounding",
        model=ModelConfig(preset="tiny"),  # the quickstart's model and batches
        train=TrainConfig(),  # the quickstart's schedule (TrainConfig's defaults): 300 steps of 16 x 128 tokens
        variants=(
            Variant(name="bf16", precision="bf16"),
            *(Variant(name=f"mxfp8_{mode}", scaling=MXFP8BlockScaling(scale_calculation_mode=mode)) for mode in MODES),
        ),
    )
