"""GPU: where one FP8 TransformerBlock training step spends its time (torch.profiler), and how
many times dynamo recompiled fp8lab's fused casts getting there.

Needs a CUDA device with compute capability >= 8.9. Builds the block of ``bench_gpu_block``
(hidden 2048, 4x2048 tokens, delayed scaling, backend "scaled_mm"), runs 10 warm-up steps,
then profiles 3 and prints the top operators by self CPU time and by self CUDA time, the
step's wall time, and dynamo's counters (frames compiled, recompiles, graph breaks).

    python -m benchmarks.gpu_profile_step [--hidden 2048] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fp8lab  # noqa: E402
from benchmarks.bench_gpu_block import block_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    torch.manual_seed(0)
    fp8 = fp8lab.FP8Options(scaling=fp8lab.DelayedScaling(amax_history_len=16), backend="scaled_mm")
    block = fp8lab.TransformerBlock(args.hidden, 4 * args.hidden, args.hidden // 64, fp8=fp8).cuda()
    x = torch.randn(args.tokens // 2048, 2048, args.hidden, device="cuda", requires_grad=True)
    step = block_step(block, x, True)
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    print(f"step: {(time.perf_counter() - start) * 100:.2f} ms (mean of 10, wall)")
    from torch._dynamo.utils import counters

    for kind in ("stats", "recompiles", "graph_break"):
        print(kind, dict(counters.get(kind, {})))
    host_ms(block, x)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, with_stack=True) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(averages.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    print("host time by Python call site (3 steps):")
    print(prof.key_averages(group_by_stack_n=4).table(sort_by="self_cpu_time_total", row_limit=30))


def host_ms(block, x) -> None:
    """Host time of the forward and of the backward call alone (no profiler): the GPU runs
    behind, so a host time above the step's CUDA time is what bounds the step."""
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = block(x)
        t1 = time.perf_counter()
        y.float().pow(2).mean().backward()
        t2 = time.perf_counter()
        fp8lab.update_scales(block)
        t3 = time.perf_counter()
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        print(
            f"host: forward {1e3 * (t1 - t0):.2f} ms, backward {1e3 * (t2 - t1):.2f} ms, "
            f"update_scales {1e3 * (t3 - t2):.2f} ms; then waiting for the GPU {1e3 * (t4 - t3):.2f} ms"
        )


if __name__ == "__main__":
    main()
