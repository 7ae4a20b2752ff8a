"""What FP8 fast accumulation changes, bit for bit: torch._scaled_mm with and without ``use_fast_accum``
against fp8lab's model of Hopper's tensor-core accumulator (fp8lab.gemm.accumulate).

Transformer Engine runs the forward GEMM of DelayedScaling and Float8CurrentScaling with
``use_split_accumulator=False``, i.e. cuBLASLt's FAST_ACCUM: Hopper's FP8 ``wgmma`` then chains 13-bit
instructions over K ("fast"); with it off cuBLASLt promotes partial sums to fp32 at an interval
("promoted"). Scales are powers of two, so the epilogue (``acc * scale_a * scale_b``, fp32 output) is
exact and any difference is the accumulator's. Per K (not only multiples of 32 and 128), shape and
format pair, the script reports the share of outputs bit-equal to the model with its defaults
(promote every 4 instructions, ascending K, no split-K) and to each candidate setting of the three
parameters NVIDIA does not publish, so that one GPU run settles them:

- the promotion interval of cuBLASLt's non-fast FP8 kernels (CUTLASS's default is 4 instructions);
- the K order of the main loop (ascending or descending);
- split-K (the number of K slices reduced in fp32), which may change with the shape.

On CPU (``--device cpu``) torch's reference ``_scaled_mm`` (oneDNN off) has no fast mode: both of
its results must equal the model's "fp32" kind times the scales bit for bit (asserted), which checks
this script; the GPU questions are printed, unanswered.

    python -m benchmarks.gpu_fast_accum [--device cuda] [--shapes 256x256 1024x512] [--k 32 96 ... 16384]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import markdown_table  # noqa: E402
from fp8lab.accumulation import FP32, Accumulator  # noqa: E402
from fp8lab.formats import E4M3, E5M2  # noqa: E402
from fp8lab.gemm.accumulate import accumulate_path, tensor_core_accumulate  # noqa: E402

# CUDA's FP8 _scaled_mm needs K % 16 == 0: 48, 80 and 1008 are the Ks that are not multiples of 32 or 128
K_DEFAULT = [32, 48, 64, 80, 96, 128, 160, 256, 384, 1008, 1024, 4096, 16384]
PAIRS = ((E4M3, E4M3), (E4M3, E5M2))
SCALE_A, SCALE_B = 2.0**-3, 2.0**2  # powers of two: the epilogue is exact
# The tables' columns: the CPU check, and a GPU run's comparison per shape and K.
CPU_COLUMNS = "MxN|K|formats|_scaled_mm (both modes) = fp32 model|fp32 = fast model|fp32 = promoted model".split("|")
GPU_COLUMNS = "MxN|K|formats|_scaled_mm|= model (defaults)|= best candidate|best candidate|= fp32 model".split("|")
QUESTIONS = (
    "promotion interval of cuBLASLt's non-fast FP8 GEMM (model default: every 4 instructions of 32 = 128 of K)",
    "K order of the main loop (model default: ascending)",
    "split-K per shape (model default: 1, no split)",
    "whether use_fast_accum=True is the 'fast' model (chained 13-bit instructions, no promotion) at every K",
)


def candidates(fast: bool) -> list[Accumulator]:
    """Settings of the unpublished parameters to try; the first is the model's default."""
    kind = "fast" if fast else "promoted"
    promote = (4,) if fast else (4, 1, 2, 8, 16)
    grid = itertools.product(promote, ("ascending", "descending"), (1, 2, 4))
    return [Accumulator(kind=kind, promote_every=p, k_order=o, split_k=s) for p, o, s in grid]


def describe(acc: Accumulator) -> str:
    every = "" if acc.kind == "fast" else f" every {acc.promote_every}"
    return f"{acc.kind}{every}, {acc.k_order}, split-K {acc.split_k}"


def operands(m: int, n: int, k: int, fa, fb, gen: torch.Generator):
    a = (torch.randn(m, k, generator=gen) * 4).to(fa.dtype)
    b = (torch.randn(n, k, generator=gen) * 4).to(fb.dtype)  # (N, K): _scaled_mm wants b column-major
    return a, b


def scaled_mm(a, b, device: str, fast: bool) -> torch.Tensor:
    sa, sb = torch.tensor(SCALE_A, device=device), torch.tensor(SCALE_B, device=device)
    with torch.backends.mkldnn.flags(enabled=False):  # on CPU: torch's reference kernel, not oneDNN's
        out = torch._scaled_mm(a.to(device), b.to(device).t(), sa, sb, out_dtype=torch.float32, use_fast_accum=fast)
    return out.cpu()


def model(a, b, fa, fb, acc: Accumulator) -> torch.Tensor:
    # b.t().float(): the (K, N) layout _scaled_mm's CPU reference multiplies, so "fp32" takes the same BLAS path
    return tensor_core_accumulate(a.float(), b.t().float(), fa, fb, acc) * (SCALE_A * SCALE_B)


def equal_share(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.view(torch.int32) == y.view(torch.int32)) | (x.isnan() & y.isnan())).double().mean().item()


def gpu_rows(shapes, ks, gen) -> list[list[str]]:
    rows = []
    for (m, n), k, (fa, fb) in itertools.product(shapes, ks, PAIRS):
        a, b = operands(m, n, k, fa, fb, gen)
        for fast in (False, True):
            out = scaled_mm(a, b, "cuda", fast)
            tries = candidates(fast)
            shares = [(equal_share(out, model(a, b, fa, fb, tries[0])), tries[0])]
            if shares[0][0] < 1.0:  # the defaults do not explain every bit: try the other settings
                shares += [(equal_share(out, model(a, b, fa, fb, acc)), acc) for acc in tries[1:]]
            best_share, best = max(shares, key=lambda s: s[0])
            rows.append(
                [
                    f"{m}x{n}",
                    str(k),
                    f"{fa.name}x{fb.name}",
                    f"use_fast_accum={fast}",
                    f"{100 * shares[0][0]:.2f}%",
                    f"{100 * best_share:.2f}%",
                    describe(best),
                    f"{100 * equal_share(out, model(a, b, fa, fb, FP32)):.2f}%",
                ]
            )
            print("| " + " | ".join(rows[-1]) + " |", flush=True)  # as it goes: a run cut short keeps its rows
    return rows


def cpu_check(shapes, ks, gen) -> list[list[str]]:
    rows = []
    for (m, n), k, (fa, fb) in itertools.product(shapes, ks, PAIRS):
        a, b = operands(m, n, k, fa, fb, gen)
        ref = model(a, b, fa, fb, FP32)
        for fast in (False, True):
            out = scaled_mm(a, b, "cpu", fast)
            assert torch.equal(out, ref), f"CPU _scaled_mm (fast={fast}) is not the fp32 model at {m}x{n}, K={k}"
        rows.append(
            [
                f"{m}x{n}",
                str(k),
                f"{fa.name}x{fb.name}",
                "100% (asserted)",
                f"{100 * equal_share(ref, model(a, b, fa, fb, candidates(True)[0])):.2f}%",
                f"{100 * equal_share(ref, model(a, b, fa, fb, candidates(False)[0])):.2f}%",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", nargs="+", default=None, help="MxN output shapes (default 256x256 1024x512)")
    parser.add_argument("--k", type=int, nargs="+", default=None)
    args = parser.parse_args()
    cpu = args.device == "cpu"
    names = args.shapes or (["64x48"] if cpu else ["256x256", "1024x512"])
    shapes = [tuple(int(v) for v in s.split("x")) for s in names]
    ks = args.k or ([32, 96, 160, 1000, 4096] if cpu else K_DEFAULT)
    gen = torch.Generator().manual_seed(0)
    print(f"model: {accumulate_path().reason}; scales {SCALE_A} x {SCALE_B}; torch {torch.__version__}")
    if cpu:
        print(
            "CPU: torch's reference _scaled_mm (oneDNN off) ignores use_fast_accum; asserting both equal the "
            "model's 'fp32' kind bit for bit, and showing how far the Hopper modes are from it.\n"
        )
        print(markdown_table(CPU_COLUMNS, cpu_check(shapes, ks, gen)))
        print("\nNo GPU here. A run on an H100/H200 (--device cuda) must settle:")
        for q in QUESTIONS:
            print(f"  - {q}")
        print(
            "Read them off the 'best candidate' column: a setting matching 100% at every K and shape settles it; "
            "anything below 100% for every candidate means the model itself is off there."
        )
        return
    if not torch.cuda.is_available():
        sys.exit("gpu_fast_accum: no CUDA device here (use --device cpu to check the script)")
    print(f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})\n")
    print("| " + " | ".join(GPU_COLUMNS) + " |\n|" + "---|" * len(GPU_COLUMNS), flush=True)
    gpu_rows(shapes, ks, gen)
    print("\nThis run settles:")
    for q in QUESTIONS:
        print(f"  - {q}")


if __name__ == "__main__":
    main()
