"""Step time of each FP8 scaling recipe, emulated on CPU, against fp8lab's BF16 baseline.

One MLP at 2048 tokens, 768->3072->768 by default or the quickstart's 128->512->128 with
``--quickstart`` (forward + backward under bf16 autocast, float32 master weights,
``update_scales`` for the FP8 variants), the same weights and inputs for every variant, timed
interleaved in one process (``benchmarks/common.py``). Block recipes cast the backward's copies
of x, w and the gradient again along the other dimension (as Transformer Engine does), so they
do more casting than the per-tensor recipes. ``--accumulation fp32`` runs every recipe with fp32
accumulation (the cost of its casts alone) instead of its default ("te": the tensor-core
accumulator model for the Hopper recipes).

    python -m benchmarks.bench_recipes [--quickstart] [--accumulation te|fp32] [--repeats N] [--no-write]
        [--imitate-avx2]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fp8lab  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.bench_emulated import make_step, to_fp8lab_bf16  # noqa: E402

TOKENS = 2048
SIZES = {False: (768, 3072), True: (128, 512)}  # --quickstart: the quickstart model's MLP
RECIPES = {
    "delayed": fp8lab.DelayedScaling(amax_history_len=16),
    "current": fp8lab.Float8CurrentScaling(),
    "block": fp8lab.Float8BlockScaling(),
    "mxfp8": fp8lab.MXFP8BlockScaling(),
    "rowwise": fp8lab.Float8RowwiseScaling(),
    "nvfp4": fp8lab.NVFP4BlockScaling(),
}


def mlp(scaling, hidden: int, ffn: int, accumulation: str = "te") -> nn.Module:
    fp8 = fp8lab.FP8Options(scaling=scaling, fallback="emulated", accumulation=accumulation)
    torch.manual_seed(0)
    return nn.Sequential(fp8lab.Linear(hidden, ffn, fp8=fp8), nn.GELU(), fp8lab.Linear(ffn, hidden, fp8=fp8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quickstart", action="store_true", help="the quickstart's MLP, 128->512->128")
    parser.add_argument("--accumulation", choices=("te", "fp32"), default="te", help="every FP8 variant's")
    common.timing_arguments(parser, repeats=11, warmup=2)
    args = parser.parse_args()
    load_before = common.start(args)
    hidden, ffn = SIZES[args.quickstart]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, hidden, generator=gen).requires_grad_(True)
    grad = torch.randn(TOKENS, hidden, generator=gen)
    base = mlp(RECIPES["delayed"], hidden, ffn)
    steps = {"bf16": make_step(to_fp8lab_bf16(base), x, grad, False)}
    for name, scaling in RECIPES.items():
        model = mlp(scaling, hidden, ffn, args.accumulation)
        model.load_state_dict(copy.deepcopy(base.state_dict()), strict=False)
        steps[name] = make_step(model, x, grad, True)
    times, _ = common.time_interleaved(steps, args.repeats, args.warmup)
    header = ["variant", "median ms", "IQR ms", "x bf16"]
    rows = []
    for name, seconds in times.items():
        s = common.summary(seconds)
        rows.append(
            [
                name,
                f"{s['median']:.1f}",
                f"{s['q1']:.1f}-{s['q3']:.1f}",
                f"{common.paired_ratio(seconds, times['bf16']):.2f}",
            ]
        )
    table = common.markdown_table(header, rows)
    print(table)
    if not args.no_write:
        body = (
            f"MLP {hidden}->{ffn}->{hidden}, {TOKENS} tokens, fwd+bwd (+ update_scales), accumulation "
            f"{args.accumulation!r} for every FP8 variant, {args.repeats} "
            f"interleaved repeats after {args.warmup} warm-up rounds; ratios are medians of per-repeat ratios.\n\n"
            + table
        )
        common.append_section("bench_recipes: each FP8 scaling recipe (emulated) vs BF16", body, load_before)


if __name__ == "__main__":
    main()
