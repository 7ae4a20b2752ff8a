"""Step time of each FP8 scaling recipe, emulated on CPU, against fp8lab's BF16 baseline.

One MLP 768->3072->768 at 2048 tokens (forward + backward under bf16 autocast, float32
master weights, ``update_scales`` for the FP8 variants), the same weights and inputs for
every variant, timed interleaved in one process (``benchmarks/common.py``). Block recipes
cast the backward's copies of x, w and the gradient again along the other dimension
(as Transformer Engine does), so they do more casting than the per-tensor recipes.

    python -m benchmarks.bench_recipes [--repeats N] [--no-write] [--imitate-avx2]
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

TOKENS, HIDDEN, FFN = 2048, 768, 3072
RECIPES = {
    "delayed": fp8lab.DelayedScaling(amax_history_len=16),
    "current": fp8lab.Float8CurrentScaling(),
    "block": fp8lab.Float8BlockScaling(),
    "mxfp8": fp8lab.MXFP8BlockScaling(),
    "rowwise": fp8lab.Float8RowwiseScaling(),
    "nvfp4": fp8lab.NVFP4BlockScaling(),
}


def mlp(scaling) -> nn.Module:
    fp8 = fp8lab.FP8Options(scaling=scaling, fallback="emulated")
    torch.manual_seed(0)
    return nn.Sequential(fp8lab.Linear(HIDDEN, FFN, fp8=fp8), nn.GELU(), fp8lab.Linear(FFN, HIDDEN, fp8=fp8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.timing_arguments(parser, repeats=11, warmup=2)
    args = parser.parse_args()
    load_before = common.start(args)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, HIDDEN, generator=gen).requires_grad_(True)
    grad = torch.randn(TOKENS, HIDDEN, generator=gen)
    base = mlp(RECIPES["delayed"])
    steps = {"bf16": make_step(to_fp8lab_bf16(base), x, grad, False)}
    for name, scaling in RECIPES.items():
        model = mlp(scaling)
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
            f"MLP {HIDDEN}->{FFN}->{HIDDEN}, {TOKENS} tokens, fwd+bwd (+ update_scales), {args.repeats} "
            f"interleaved repeats after {args.warmup} warm-up rounds; ratios are medians of per-repeat ratios.\n\n"
            + table
        )
        common.append_section("bench_recipes: each FP8 scaling recipe (emulated) vs BF16", body, load_before)


if __name__ == "__main__":
    main()
