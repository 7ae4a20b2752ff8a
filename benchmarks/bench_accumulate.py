"""Speed of the FP8 tensor-core accumulator model (fp8lab.gemm.accumulate) on this CPU.

Two tables, variants timed interleaved in one process (``benchmarks/common.py``):

- GEMMs: the quickstart MLP's six GEMM shapes (2048 tokens, 128 -> 512 -> 128: fprop, dgrad and
  wgrad of both layers) in GFLOP-equivalents (2*M*N*K / time) for ``torch.mm`` fp32 and bf16 (what
  the "fp32" accumulation of the emulated backend runs: oneDNN bf16 where native, fp32 elsewhere)
  and the model's fast and promoted accumulation on its chosen path (``accumulate_path``);
- training step: that MLP (``fp8lab.Linear`` x2 with GELU, delayed scaling, bf16 autocast, forward
  + backward + ``update_scales``) with ``FP8Options(accumulation="fp32")`` against the default
  ``accumulation="te"``: fprop fast, dgrad and wgrad promoted every 4 instructions, as Transformer
  Engine runs them. Target (issue 27): the "te" step <= ~3x the "fp32" one.

    python -m benchmarks.bench_accumulate [--quick] [--no-write] [--imitate-avx2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fp8lab  # noqa: E402
from benchmarks.common import (  # noqa: E402
    append_section,
    markdown_table,
    paired_ratio,
    start,
    summary,
    time_interleaved,
    timing_arguments,
)
from fp8lab import FP8Options  # noqa: E402
from fp8lab.accumulation import HOPPER_FAST, HOPPER_PROMOTED  # noqa: E402
from fp8lab.formats import E4M3, E5M2  # noqa: E402
from fp8lab.gemm.accumulate import accumulate_path, tensor_core_accumulate  # noqa: E402
from fp8lab.gemm.exact import gemm_path  # noqa: E402

TOKENS, HIDDEN, FFN = 2048, 128, 512
# (name, M, K, N, a format, b format, accumulation) of the MLP's six GEMMs (HYBRID: gradients E5M2).
GEMMS = (
    ("fc1 fprop", TOKENS, HIDDEN, FFN, E4M3, E4M3, HOPPER_FAST),
    ("fc2 fprop", TOKENS, FFN, HIDDEN, E4M3, E4M3, HOPPER_FAST),
    ("fc2 dgrad", TOKENS, HIDDEN, FFN, E5M2, E4M3, HOPPER_PROMOTED),
    ("fc1 dgrad", TOKENS, FFN, HIDDEN, E5M2, E4M3, HOPPER_PROMOTED),
    ("fc2 wgrad", HIDDEN, TOKENS, FFN, E5M2, E4M3, HOPPER_PROMOTED),
    ("fc1 wgrad", FFN, TOKENS, HIDDEN, E5M2, E4M3, HOPPER_PROMOTED),
)


def gemm_rows(repeats: int, warmup: int) -> list[list[str]]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, m, k, n, fa, fb, _acc in GEMMS:
        a = (torch.randn(m, k, generator=gen) * 8).to(fa.dtype).float()
        b = (torch.randn(k, n, generator=gen) * 8).to(fb.dtype).float()
        a16, b16 = a.bfloat16(), b.bfloat16()
        steps = {  # called within this iteration (the default arguments only pin that for readers)
            "mm fp32": lambda a=a, b=b: torch.mm(a, b),
            "mm bf16": lambda a16=a16, b16=b16: torch.mm(a16, b16),
            "model fast": lambda a=a, b=b, fa=fa, fb=fb: tensor_core_accumulate(a, b, fa, fb, HOPPER_FAST),
            "model promoted": lambda a=a, b=b, fa=fa, fb=fb: tensor_core_accumulate(a, b, fa, fb, HOPPER_PROMOTED),
        }
        times, _ = time_interleaved(steps, repeats, warmup)
        gflop = {v: 2 * m * n * k / (summary(t)["median"] * 1e-3) / 1e9 for v, t in times.items()}
        rows.append(
            [
                f"{name} {m}x{k}x{n}",
                *(f"{gflop[v]:.0f}" for v in steps),
                f"{paired_ratio(times['model promoted'], times['mm fp32']):.2f}",
                f"{paired_ratio(times['model promoted'], times['mm bf16']):.2f}",
            ]
        )
    return rows


def mlp(accumulation: str) -> nn.Module:
    opts = FP8Options(
        scaling=fp8lab.DelayedScaling(amax_history_len=16), fallback="emulated", accumulation=accumulation
    )
    torch.manual_seed(0)
    return nn.Sequential(fp8lab.Linear(HIDDEN, FFN, fp8=opts), nn.GELU(), fp8lab.Linear(FFN, HIDDEN, fp8=opts))


def make_step(model, x, grad):
    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.backward(grad.to(y.dtype))
        fp8lab.update_scales(model)

    return step


def step_rows(repeats: int, warmup: int) -> tuple[list[list[str]], float]:
    gen = torch.Generator().manual_seed(1)
    x, grad = torch.randn(TOKENS, HIDDEN, generator=gen), torch.randn(TOKENS, HIDDEN, generator=gen)
    base = f"accumulation='fp32' ({gemm_path('cpu').name})"
    steps = {base: make_step(mlp("fp32"), x, grad), "accumulation='te' (the model)": make_step(mlp("te"), x, grad)}
    times, _ = time_interleaved(steps, repeats, warmup)
    ratio = paired_ratio(times["accumulation='te' (the model)"], times[base])
    rows = [
        [
            v,
            f"{summary(t)['median']:.1f}",
            f"{summary(t)['q1']:.1f}-{summary(t)['q3']:.1f}",
            "1.00" if v == base else f"{ratio:.2f}",
        ]
        for v, t in times.items()
    ]
    return rows, ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    timing_arguments(parser, repeats=15, warmup=3)
    args = parser.parse_args()
    load_before = start(args)
    repeats = 5 if args.quick else args.repeats
    print(f"accumulator path: {accumulate_path().reason}")
    gemm = markdown_table(
        [
            "GEMM MxKxN",
            "mm fp32 GF/s",
            "mm bf16 GF/s",
            "model fast GF/s",
            "model promoted GF/s",
            "promoted / fp32 time",
            "promoted / bf16 time",
        ],
        gemm_rows(repeats, args.warmup),
    )
    steps, ratio = step_rows(repeats, args.warmup)
    step = markdown_table(
        ["MLP step (2048 tokens, 128->512->128, fwd+bwd)", "median ms", "IQR ms", "time / fp32"], steps
    )
    body = (
        f"Accumulator path: {accumulate_path().reason}.\n\n{gemm}\n\n{step}\n\n"
        f"Target: the model's step <= ~3x the fp32-accumulation step; measured {ratio:.2f}x."
    )
    print(body)
    if not args.no_write:
        append_section("FP8 tensor-core accumulator model: kernel speed", body, load_before)


if __name__ == "__main__":
    main()
