"""Cost of ``fp8lab.update_scales`` as a share of a training step, for 12, 24 and 48 blocks.

A training step of a stack of ``fp8lab.TransformerBlock`` (hidden 256, 4 heads, FFN
1024, seq 128, batch 4, ``fallback="emulated"``, TE's default scaling: amax history
1024) is zero_grad, forward under ``torch.autocast("cpu", bfloat16)``, backward,
``AdamW.step()``, then ``update_scales(model)``. Each part is timed inside the same
step, so the share ``update / whole step`` is paired; the models of different depth
are stepped in rotating order. Target: under 1% and flat as blocks grow. Run from the
repository root:

    python -m benchmarks.bench_update [--quick] [--no-write]   (or python benchmarks/bench_update.py)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a file: import this checkout's fp8lab and benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fp8lab  # noqa: E402
from benchmarks.common import append_section, load_average, markdown_table, summary  # noqa: E402
from fp8lab import FP8Options  # noqa: E402

HIDDEN, HEADS, FFN, SEQ, BATCH = 256, 4, 1024, 128, 4


def build(num_blocks: int) -> nn.Module:
    if hasattr(fp8lab, "TransformerBlock"):
        blocks = [
            fp8lab.TransformerBlock(HIDDEN, FFN, HEADS, fp8=FP8Options(fallback="emulated")) for _ in range(num_blocks)
        ]
    else:  # same four GEMMs per block, without norms and attention
        print("fp8lab.TransformerBlock is not available: 4 fp8lab.Linear per block instead")
        blocks = [
            nn.Sequential(
                fp8lab.Linear(HIDDEN, 3 * HIDDEN, fp8=FP8Options(fallback="emulated")),
                fp8lab.Linear(3 * HIDDEN, HIDDEN, fp8=FP8Options(fallback="emulated")),
                fp8lab.Linear(HIDDEN, FFN, fp8=FP8Options(fallback="emulated")),
                fp8lab.Linear(FFN, HIDDEN, fp8=FP8Options(fallback="emulated")),
            )
            for _ in range(num_blocks)
        ]
    return nn.Sequential(*blocks)


def make_step(model: nn.Module, x: torch.Tensor, record: dict[str, list[float]]):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        mid = time.perf_counter()
        fp8lab.update_scales(model)
        end = time.perf_counter()
        record["train"].append(mid - start)
        record["update"].append(end - mid)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats instead of 9")
    parser.add_argument("--blocks", type=int, nargs="+", default=[12, 24, 48])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()
    repeats = 5 if args.quick else 9
    torch.manual_seed(0)
    load_before = load_average()

    x = torch.randn(BATCH, SEQ, HIDDEN, generator=torch.Generator().manual_seed(0))
    records = {n: {"train": [], "update": []} for n in args.blocks}
    steps = {n: make_step(build(n), x, records[n]) for n in args.blocks}
    names = list(steps)
    for r in range(args.warmup + repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            steps[n]()
    header = [
        "blocks",
        "fp8lab layers",
        "step ms (median, min-max)",
        "update_scales ms (median, IQR)",
        "share % (median, min-max)",
    ]
    rows = []
    for n in args.blocks:
        train, update = (records[n][k][args.warmup :] for k in ("train", "update"))
        share = [100 * u / (t + u) for t, u in zip(train, update)]
        st, su = summary([t + u for t, u in zip(train, update)]), summary(update)
        rows.append(
            [
                str(n),
                str(4 * n),
                f"{st['median']:.0f} ({st['min']:.0f}-{st['max']:.0f})",
                f"{su['median']:.2f} ({su['q1']:.2f}-{su['q3']:.2f})",
                f"{statistics.median(share):.2f} ({min(share):.2f}-{max(share):.2f})",
            ]
        )
    table = markdown_table(header, rows)
    print(table)
    body = (
        f"hidden {HIDDEN}, heads {HEADS}, FFN {FFN}, seq {SEQ}, batch {BATCH}, AdamW, amax history "
        f"1024; {repeats} repeats after {args.warmup} warm-up steps, depths interleaved. "
        "Target: share < 1% and flat as blocks grow.\n\n" + table
    )
    if not args.no_write:
        append_section("bench_update: update_scales share of a training step", body, load_before)


if __name__ == "__main__":
    main()
