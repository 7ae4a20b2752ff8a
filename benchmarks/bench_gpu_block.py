"""GPU: FP8 vs BF16 TransformerBlock forward+backward per backend, and host syncs.

NOT YET RUN: written in a session without a GPU (no figure in BENCHMARKS.md comes from
it). On a CUDA device with compute capability >= 8.9 it times, with CUDA events and a
median over repeats, a TransformerBlock at hidden 4096, sequence 2048 (batch 1) with
backend "bf16", "scaled_mm" and, if Transformer Engine imports, "te" (inside one
``fp8lab.gemm.backends.te.autocast`` region, TE's once-per-step cadence). It then runs a step under
``torch.cuda.set_sync_debug_mode("error")`` to show that no host sync happens between
log steps. Target (issue 8): FP8 >= 1.3x BF16. Not written yet: the comparison with a
raw ``te.TransformerLayer`` (fp8lab's overhead over TE, target <= 3%).

    python benchmarks/bench_gpu_block.py [--hidden 4096] [--seq 2048] [--repeats 20]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch

import fp8lab
from fp8lab import FP8Options
from fp8lab.gemm.backends.select import probe_te


def step_fn(block: torch.nn.Module, x: torch.Tensor, region) -> callable:
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16), region():
            y = block(x)
        y.float().pow(2).mean().backward()
        fp8lab.update_scales(block)
    return step


def time_ms(step, repeats: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit("bench_gpu_block needs a CUDA device with compute capability >= 8.9")
    device = torch.device("cuda")
    x = torch.randn(1, args.seq, args.hidden, device=device, requires_grad=True)
    scaling = fp8lab.DelayedScaling(amax_history_len=16)
    backends = ["bf16", "scaled_mm"] + (["te"] if probe_te().version else [])
    results = {}
    for backend in backends:
        torch.manual_seed(0)
        block = fp8lab.TransformerBlock(args.hidden, 4 * args.hidden, args.heads, fp8=FP8Options(scaling=scaling, backend=backend)).to(device)
        region = contextlib.nullcontext
        if backend == "te":
            from fp8lab.gemm.backends import te as te_backend

            region = lambda: te_backend.autocast(scaling)  # noqa: E731
        step = step_fn(block, x, region)
        results[backend] = time_ms(step, args.repeats)
        torch.cuda.set_sync_debug_mode("error")  # any host sync in a plain step raises
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    base = statistics.median(results["bf16"])
    print(f"TransformerBlock hidden {args.hidden} seq {args.seq} on {torch.cuda.get_device_name()}")
    print("| backend | median ms | min-max | speed-up vs bf16 |\n|---|---|---|---|")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"| {name} | {med:.2f} | {min(times):.2f}-{max(times):.2f} | {base / med:.2f}x |")
    print("no host sync in any step (set_sync_debug_mode('error') passed)")


if __name__ == "__main__":
    main()
