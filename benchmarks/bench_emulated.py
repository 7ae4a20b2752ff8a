"""Step time of fp8lab's emulated FP8 backend against BF16, FP32 and torchao's emulation.

A step is forward + backward (input gradient included) with float32 master weights, and
for fp8lab's FP8 variant also ``fp8lab.update_scales`` (part of its step); no optimizer
step. Variants, all sharing weights and inputs, timed interleaved in one process (see
``benchmarks/common.py``):

- fp32:       ``nn.Linear`` GEMMs, no autocast (float32 everywhere);
- torch-bf16: ``nn.Linear`` under ``torch.autocast("cpu", dtype=torch.bfloat16)``: what
              plain PyTorch gives (on an AVX2-only CPU its bf16 GEMMs are ATen's scalar code);
- bf16:       fp8lab's BF16 baseline: ``fp8lab.Linear`` kept in BF16, under the same
              autocast (the bf16 hardware model on the machine's exact GEMM path);
- fp8lab:     ``fp8lab.Linear(fp8=FP8Options(fallback="emulated"))`` (delayed scaling, exact FP8 values,
              the default accumulation "te": the tensor cores' accumulator per GEMM, a C kernel);
- fp8lab-fp32acc: the same layers with ``accumulation="fp32"`` (an ideal fp32 accumulator: the
              exact GEMM path, what fp8lab's emulation computed before the accumulator model);
- torchao:    ``torchao.float8.convert_to_float8_training`` of the torch-bf16 module with
              ``Float8LinearConfig(emulate=True)`` (default tensorwise dynamic recipe).

Targets (issue "Emulation that computes what Hopper computes", set before the accumulator
model existed, so measured on ``fp8lab-fp32acc``): fp8lab <= 1.5x bf16 on every CPU; bf16
<= 1.3x fp32 on an AVX2-only CPU; fp8lab faster than torchao. Run from the repository root
(``--imitate-avx2`` re-runs the script with oneDNN, ATen and MKL limited to AVX2, see
``benchmarks.common.AVX2_ONLY_ENV``):

    python -m benchmarks.bench_emulated [--quick] [--no-write] [--imitate-avx2]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a file: import this checkout's fp8lab and benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fp8lab  # noqa: E402
from benchmarks.common import (  # noqa: E402
    append_section,
    imitating_avx2,
    load_average,
    markdown_table,
    paired_ratio,
    reexec_imitating_avx2,
    summary,
    time_interleaved,
)
from fp8lab import FP8Options  # noqa: E402

TOKENS, HIDDEN, FFN = 2048, 768, 3072


def to_nn_linear(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with each fp8lab.Linear replaced by an nn.Linear of its weights."""

    def swap(m: nn.Module) -> nn.Module:
        if not isinstance(m, fp8lab.Linear):
            for name, child in m.named_children():
                setattr(m, name, swap(child))
            return m
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        linear.weight, linear.bias = m.weight, m.bias  # already copies: module was deep-copied
        return linear

    return swap(copy.deepcopy(module))


def build_cases(quick: bool) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Name -> (fp8lab module with fallback="emulated", input shape)."""
    emulated = dict(fp8=FP8Options(fallback="emulated"))
    cases = {
        f"Linear {HIDDEN}->{FFN}": (fp8lab.Linear(HIDDEN, FFN, **emulated), (TOKENS, HIDDEN)),
        f"MLP {HIDDEN}->{FFN}->{HIDDEN}": (
            nn.Sequential(fp8lab.Linear(HIDDEN, FFN, **emulated), nn.GELU(), fp8lab.Linear(FFN, HIDDEN, **emulated)),
            (TOKENS, HIDDEN),
        ),
    }
    if hasattr(fp8lab, "TransformerBlock") and not quick:
        block = fp8lab.TransformerBlock(HIDDEN, FFN, HIDDEN // 64, **emulated)
        cases[f"TransformerBlock C={HIDDEN} T=512 B=4"] = (block, (4, 512, HIDDEN))
    elif not hasattr(fp8lab, "TransformerBlock"):
        print("fp8lab.TransformerBlock is not available: skipping the block case")
    return cases


def to_fp8lab_bf16(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every fp8lab.Linear kept in BF16 (the BF16 baseline)."""
    out = copy.deepcopy(module)
    for m in out.modules():
        if isinstance(m, fp8lab.Linear):
            m.keep_in_bf16("BF16 baseline of the benchmark")
    return out


def make_step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, update_scales: bool, autocast: bool = True):
    def step() -> None:
        model.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
        y.backward(grad.to(y.dtype))
        if update_scales:
            fp8lab.update_scales(model)

    return step


VARIANTS = ("fp32", "torch-bf16", "bf16", "fp8lab", "fp8lab-fp32acc", "torchao")


def with_fp32_accumulation(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose fp8lab.Linear layers accumulate in ideal fp32."""
    out = copy.deepcopy(module)
    for m in out.modules():
        if isinstance(m, fp8lab.Linear):
            m.fp8 = dataclasses.replace(m.fp8, accumulation="fp32")
    return out


def bench_case(model_fp8: nn.Module, shape: tuple[int, ...], repeats: int, warmup: int, variants):
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    model_torch = to_nn_linear(model_fp8)
    config = Float8LinearConfig(emulate=True)  # default recipe: tensorwise dynamic scaling
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).requires_grad_(True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out_shape = model_torch(x).shape
    grad = torch.randn(out_shape, generator=g)
    makers = {
        "fp32": lambda: make_step(model_torch, x, grad, False, autocast=False),
        "torch-bf16": lambda: make_step(model_torch, x, grad, False),
        "bf16": lambda: make_step(to_fp8lab_bf16(model_fp8), x, grad, False),
        "fp8lab": lambda: make_step(model_fp8, x, grad, True),
        "fp8lab-fp32acc": lambda: make_step(with_fp32_accumulation(model_fp8), x, grad, True),
        "torchao": lambda: make_step(
            convert_to_float8_training(copy.deepcopy(model_torch), config=config), x, grad, False
        ),
    }
    return time_interleaved({name: makers[name]() for name in variants}, repeats, warmup)


def profile_mlp(steps: int = 3) -> str:
    """torch.profiler tables (self CPU time) of the fp8lab and BF16 MLP steps."""
    from torch.profiler import profile

    model_fp8, shape = build_cases(quick=True)[f"MLP {HIDDEN}->{FFN}->{HIDDEN}"]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    grad = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1))
    out = []
    variants = {
        "fp8lab": make_step(model_fp8, x, grad, True),
        "bf16": make_step(to_fp8lab_bf16(model_fp8), x, grad, False),
    }
    for name, step in variants.items():
        for _ in range(2):
            step()
        with profile() as prof:
            for _ in range(steps):
                step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
        out.append(f"{name} MLP, {steps} steps:\n{table}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Linear and MLP only, 7 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 15, quick 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to BENCHMARKS.md")
    parser.add_argument("--profile", action="store_true", help="print profiler tables of the MLP step, exit")
    parser.add_argument(
        "--imitate-avx2",
        action="store_true",
        help="run with oneDNN/ATen/MKL limited to AVX2, as on a CPU without native BF16",
    )
    parser.add_argument(
        "--skip-torch-bf16", action="store_true", help="leave out plain torch bf16 (minutes per step on AVX2-only CPUs)"
    )
    args = parser.parse_args()
    if args.imitate_avx2 and not imitating_avx2():
        reexec_imitating_avx2(sys.argv[1:])  # does not return
    torch.manual_seed(0)
    if args.profile:
        print(profile_mlp())
        return
    repeats = args.repeats or (7 if args.quick else 15)
    warnings.filterwarnings("ignore", module="torchao")
    load_before = load_average()
    variants = [v for v in VARIANTS if not (v == "torch-bf16" and args.skip_torch_bf16)]

    header = [
        "case",
        "variant",
        "median ms",
        "IQR ms",
        "min-max ms",
        "x bf16",
        "x fp32",
        "torchao / this",
        "faults/step",
    ]
    rows = []
    for name, (model, shape) in build_cases(args.quick).items():
        times, faults = bench_case(model, shape, repeats, args.warmup, variants)
        for variant, seconds in times.items():
            s = summary(seconds)
            rows.append(
                [
                    name if variant == variants[0] else "",
                    variant,
                    f"{s['median']:.1f}",
                    f"{s['q1']:.1f}-{s['q3']:.1f}",
                    f"{s['min']:.1f}-{s['max']:.1f}",
                    f"{paired_ratio(seconds, times['bf16']):.2f}",
                    f"{paired_ratio(seconds, times['fp32']):.2f}",
                    f"{paired_ratio(times['torchao'], seconds):.2f}",
                    f"{statistics.median(faults[variant]):.0f}",
                ]
            )
        print(markdown_table(header, rows[-len(variants) :]), flush=True)

    body = (
        f"{repeats} interleaved repeats after {args.warmup} warm-up rounds; ratios are medians "
        "of per-repeat ratios; faults/step: median minor page faults per step (4 KiB each). "
        "`bf16` is fp8lab's BF16 baseline, `torch-bf16` plain autocast; `fp8lab` accumulates as the "
        "tensor cores do (accumulation='te'), `fp8lab-fp32acc` in ideal fp32. Targets (set before the "
        "accumulator model, so for fp8lab-fp32acc): `x bf16` <= 1.5; bf16 `x fp32` <= 1.3 on AVX2-only "
        "CPUs; `torchao / this` > 1.\n\n" + markdown_table(header, rows)
    )
    if not args.no_write:
        append_section("bench_emulated: fp8lab emulated vs BF16 vs FP32 vs torchao emulate", body, load_before)


if __name__ == "__main__":
    main()
