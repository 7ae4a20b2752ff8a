"""What every CPU benchmark here shares: interleaved timing, summary statistics, the
machine description, and the dated section appended to BENCHMARKS.md.

Invariant: timings of the variants being compared are taken in one process, repeat
by repeat in rotating order, so load from other processes hits all of them; ratios
are medians of per-repeat ratios (paired), never ratios across runs.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def minor_faults() -> int:
    """Page faults of this process so far. Fresh large CPU tensors fault page by page
    (glibc returns freed heap to the OS), which on a VM can rival the arithmetic."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_interleaved(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Seconds and page faults per call of each step, over ``repeats`` timed rounds.

    ``warmup`` untimed rounds come first; round r runs the steps in order rotated by r,
    so no variant always runs first.
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[int]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            faults_before, start = minor_faults(), time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
            faults[name].append(minor_faults() - faults_before)
    return times, faults


def summary(seconds: list[float]) -> dict[str, float]:
    """Median, quartiles, min and max in milliseconds."""
    ms = sorted(s * 1e3 for s in seconds)
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
    return {"median": statistics.median(ms), "q1": q1, "q3": q3, "min": ms[0], "max": ms[-1]}


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over repeats of num[r] / den[r] (both timed in the same round)."""
    return statistics.median(n / d for n, d in zip(num, den))


# Environment that makes a CPU with native BF16 (AVX512_BF16, AMX) behave like an AVX2-only
# one for torch: oneDNN limited to AVX2 (so bf16 matmul takes ATen's scalar fallback, as
# on an AVX2 laptop; torch.ops.mkldnn._is_mkldnn_bf16_supported() turns False), ATen's
# vectorised kernels built for AVX2, and MKL's sgemm limited to AVX2. Read by the libraries
# at start-up, so it must be set before torch is imported (see imitate_avx2_or_exec).
AVX2_ONLY_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def imitating_avx2() -> bool:
    return all(os.environ.get(k) == v for k, v in AVX2_ONLY_ENV.items())


def reexec_imitating_avx2(argv: list[str]) -> None:
    """Replace this process by ``python -m benchmarks.<this script> argv`` with AVX2_ONLY_ENV."""
    module = f"benchmarks.{Path(sys.argv[0]).stem}"
    env = {**os.environ, **AVX2_ONLY_ENV}
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def timing_arguments(parser, repeats: int, warmup: int) -> None:
    """The options every CPU timing benchmark takes: rounds, warm-up, --no-write, --imitate-avx2."""
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved timing rounds")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed rounds first")
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to BENCHMARKS.md")
    parser.add_argument("--imitate-avx2", action="store_true", help="re-run as on a CPU without native BF16")


def start(args) -> str:
    """Re-execute imitating an AVX2-only CPU when asked (before any timing), then return the
    load average the section will record as 'before'."""
    if args.imitate_avx2 and not imitating_avx2():
        reexec_imitating_avx2(sys.argv[1:])
    return load_average()


def machine() -> str:
    """CPU model, cores, SIMD features that matter for bf16 GEMMs, torch version, and
    what torch sees of them (AVX2 imitation, native bf16 GEMM, fp8lab's GEMM path)."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags] or ["no AVX-512"]
    from fp8lab.gemm.exact import cpu_has_native_bf16, gemm_path

    seen = (
        f"imitating an AVX2-only CPU ({' '.join(f'{k}={v}' for k, v in AVX2_ONLY_ENV.items())})"
        if imitating_avx2()
        else "native ISA"
    )
    return (
        f"{model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
        f"{' '.join(simd)}; {seen}: torch ISA {torch.backends.cpu.get_cpu_capability()}, "
        f"oneDNN bf16 GEMM {'yes' if cpu_has_native_bf16() else 'no'}, fp8lab GEMM path "
        f"{gemm_path('cpu').name}; torch {torch.__version__}, Python {platform.python_version()}"
    )


def load_average() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def append_section(title: str, body: str, load_before: str) -> None:
    """Append a dated section with the exact command, machine and load averages."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    args = sys.argv[1:] + (["--imitate-avx2"] if imitating_avx2() and "--imitate-avx2" not in sys.argv else [])
    command = " ".join(["python -m", f"benchmarks.{Path(sys.argv[0]).stem}", *args])
    text = (
        f"\n## {title} ({stamp})\n\n"
        f"- command: `{command}`\n"
        f"- machine: {machine()}\n"
        f"- load average (1/5/15 min) before: {load_before}; after: {load_average()}\n\n"
        f"{body}\n"
    )
    if not BENCHMARKS_MD.exists():
        BENCHMARKS_MD.write_text("# fp8lab benchmarks\n\nSections below are appended by `benchmarks/*.py`.\n")
    with BENCHMARKS_MD.open("a") as f:
        f.write(text)
