"""Where a whole quickstart training step spends its time, per variant and op category.

Builds the quickstart recipe's variants exactly as ``fp8lab run`` does (same model, same
initial weights, fused AdamW, ``update_scales``), adds an fp32 rung and, with
``--native-attention``, a BF16 variant whose attention core runs torch's own bf16 SDPA,
then times training steps interleaved in one process and profiles a few of them with
``torch.profiler``. Self CPU time is grouped into GEMM, attention core, layer norm, GELU,
loss, optimizer, FP8 casts and the rest, so an op that is slow in bf16 on this CPU (on
AVX2-only CPUs, anything that lands in ATen's scalar bf16 fallback) stands out. Self time
goes to the innermost op: the attention core's two batched matmuls count as GEMM, its
softmax as attention core.

    python -m benchmarks.bench_step [--steps N] [--repeats N] [--no-write] [--imitate-avx2]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from fp8lab.run.config import Variant  # noqa: E402
from fp8lab.run.recipe_file import load_recipe  # noqa: E402
from fp8lab.run.variant import VariantRun, build_model  # noqa: E402

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.py"

# Op-name fragments per category, first match wins (aten names as the profiler shows them;
# the loss comes before the attention core, whose softmax would otherwise take log_softmax).
CATEGORIES = (
    ("GEMM", ("mm", "matmul", "linear")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss")),
    ("attention core", ("scaled_dot_product", "softmax", "attention")),
    ("layer norm", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("optimizer", ("adam", "_foreach")),
    # fp8lab's grid cast: in-place elementwise passes over 2^18-element chunks, and amax
    ("FP8 cast", ("bitwise_and", "aminmax", "clamp_", "add_", "sub_", "mul_")),
)


def category(name: str) -> str:
    short = name.split("::")[-1]
    for label, fragments in CATEGORIES:
        if any(f in short for f in fragments):
            return label
    return "other"


def variants(config, native_attention: bool) -> list[tuple[str, Variant, dict]]:
    """(label, variant, model overrides) in run order: fp32, the recipe's own, then bf16 with native SDPA."""
    out = [("fp32", Variant(name="fp32", precision="fp32"), {})]
    out += [(v.name, v, {}) for v in config.variants]
    if native_attention:
        out.append(("bf16 native-SDPA", Variant(name="bf16_sdpa", precision="bf16"), {"attention_core": "native"}))
    return out


def build_runs(config, specs) -> dict[str, VariantRun]:
    device = torch.device("cpu")
    whole = dataclasses.replace(config, variants=tuple(v for _, v, _ in specs))  # every variant valid together
    torch.manual_seed(config.train.seed)
    reference = build_model(whole, config.variants[0], device)
    init = {name: p.detach().clone() for name, p in reference.named_parameters()}
    runs = {}
    for label, variant, model_overrides in specs:
        cfg = dataclasses.replace(whole, model=dataclasses.replace(config.model, **model_overrides))
        runs[label] = VariantRun(variant, cfg, init, device)
    return runs


def profile_step(run: VariantRun, batch, steps: int) -> dict[str, float]:
    """Self CPU milliseconds per step and category over ``steps`` profiled steps."""
    x, y = batch
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run.train_step(x, y, 1e-3, log=False)
    totals: dict[str, float] = collections.defaultdict(float)
    for event in prof.key_averages():
        totals[category(event.key)] += event.self_cpu_time_total / 1e3 / steps
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.timing_arguments(parser, repeats=9, warmup=3)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per variant")
    parser.add_argument(
        "--native-attention",
        action="store_true",
        help="also time a BF16 variant whose attention core is torch's bf16 SDPA",
    )
    args = parser.parse_args()
    load_before = common.start(args)
    config = load_recipe(QUICKSTART)
    specs = variants(config, args.native_attention)
    runs = build_runs(config, specs)
    t = config.train
    vocab = runs["bf16"].model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batch = (
        torch.randint(0, vocab, (t.batch_size, t.block_size), generator=gen),
        torch.randint(0, vocab, (t.batch_size, t.block_size), generator=gen),
    )

    def stepper(run):
        return lambda: run.train_step(*batch, 1e-3, log=False)

    times, _ = common.time_interleaved(
        {label: stepper(run) for label, run in runs.items()}, repeats=args.repeats, warmup=args.warmup
    )
    profiles = {label: profile_step(run, batch, args.steps) for label, run in runs.items()}

    labels = [label for label, _, _ in specs]
    cats = [c for c, _ in CATEGORIES] + ["other"]
    tokens = t.batch_size * t.block_size
    rows = []
    for label in labels:
        s = common.summary(times[label])
        ratio_bf16 = common.paired_ratio(times[label], times["bf16"])
        ratio_fp32 = common.paired_ratio(times[label], times["fp32"])
        prof = profiles[label]
        rows.append(
            [label, f"{s['median']:.1f}", f"{tokens / s['median'] * 1e3:.0f}", f"{ratio_bf16:.2f}", f"{ratio_fp32:.2f}"]
            + [f"{prof.get(c, 0.0):.1f}" for c in cats]
        )
    table = common.markdown_table(
        ["variant", "step ms (median)", "tokens/s", "x bf16", "x fp32"] + [f"{c} ms" for c in cats], rows
    )
    body = (
        f"Quickstart model (`recipes/quickstart.py`: preset tiny, batch {t.batch_size} x {t.block_size} tokens), "
        f"one full training step (forward, loss, backward, grad clip, fused AdamW, update_scales), "
        f"{args.repeats} interleaved repeats after {args.warmup} warm-up rounds; ratios are medians of "
        f"per-repeat ratios. Category columns: self CPU ms per step from torch.profiler over {args.steps} "
        f"steps (the profiler adds overhead; read them as shares).\n\n{table}"
    )
    print(body)
    if not args.no_write:
        common.append_section("bench_step: where a quickstart training step goes", body, load_before)


if __name__ == "__main__":
    main()
