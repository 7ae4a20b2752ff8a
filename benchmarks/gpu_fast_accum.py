"""What FP8 fast accumulation changes: torch._scaled_mm with and without ``use_fast_accum``
against the hardware model (float64 sum of the FP8 products, rounded once to fp32).

Transformer Engine runs the forward GEMM of DelayedScaling and Float8CurrentScaling with
``use_split_accumulator=False``, i.e. cuBLASLt's FAST_ACCUM: on Hopper the FP8 tensor cores
then accumulate with reduced precision, partial sums never promoted to fp32. fp8lab's
emulation (and its scaled_mm backend) model the promoted GEMM. This script measures the
difference on a GPU, per contraction length K: the share of outputs bit-equal to the model,
max|out - model| / max|model|, and the SQNR against the exact float64 product.

On CPU (``--device cpu``, small sizes) it runs torch's CPU ``_scaled_mm`` kernel, which has
no fast mode: its two rows must then be identical (and differ from the model only in the
last bits, as that kernel scales the operands before multiplying), which checks this script.

    python -m benchmarks.gpu_fast_accum [--device cuda] [--m 1024] [--n 1024] [--k 256 1024 4096 16384]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import markdown_table  # noqa: E402


def measure(m: int, n: int, k: int, out_dtype: torch.dtype, device: str, gen: torch.Generator) -> list[list[str]]:
    a = (torch.randn(m, k, generator=gen) * 2).to(torch.float8_e4m3fn)
    b = (torch.randn(n, k, generator=gen) * 2).to(torch.float8_e4m3fn)
    inv_a, inv_b = torch.tensor(0.75), torch.tensor(1.0 / 3.0)  # not powers of two: the epilogue rounds
    exact = a.double() @ b.double().t()  # every product and sum exact in float64 at these sizes
    model = ((exact.float() * (inv_a * inv_b)).to(out_dtype)).double()
    truth = exact * float(inv_a) * float(inv_b)
    rows = []
    for fast in (False, True):
        with torch.backends.mkldnn.flags(enabled=False):  # the CPU's reference kernel, not oneDNN's
            out = torch._scaled_mm(a.to(device), b.to(device).t(), inv_a.to(device), inv_b.to(device),
                                   out_dtype=out_dtype, use_fast_accum=fast).double().cpu()
        equal = (out == model).double().mean().item()
        rel = ((out - model).abs().max() / model.abs().max()).item()
        noise = ((out - truth) ** 2).sum().item()
        sqnr = math.inf if noise == 0 else 10 * math.log10((truth ** 2).sum().item() / noise)
        rows.append([str(k), str(out_dtype).replace("torch.", ""), "fast" if fast else "promoted",
                     f"{100 * equal:.2f}%", f"{rel:.2e}", f"{sqnr:.1f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--m", type=int, default=1024)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--k", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_fast_accum: no CUDA device here (use --device cpu to check the script)")
    gen = torch.Generator().manual_seed(0)
    rows = [row for k in args.k for dtype in (torch.bfloat16, torch.float32)
            for row in measure(args.m, args.n, k, dtype, args.device, gen)]
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (torch's reference _scaled_mm kernel)"
    print(f"{where}, torch {torch.__version__}, M={args.m} N={args.n}, E4M3 x E4M3, scale_inv 0.75 x 1/3\n")
    print(markdown_table(["K", "output", "accumulation", "bit-equal to the model", "max rel. diff", "SQNR vs exact dB"], rows))


if __name__ == "__main__":
    main()
