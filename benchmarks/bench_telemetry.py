"""Cost of watching: FP8 step time with per-layer telemetry at log_interval 1, 10, 100 vs none.

Runs the quickstart's FP8 variant (tiny GPT, batch 16 x 128, emulated FP8) through the real runner
pieces: VariantRun.train_step with the collector armed on log steps, and the
TensorBoard writer receiving every per-layer scalar. Windows of the four settings are
interleaved and repeated; the ratio is each setting's median step time over "none"'s,
measured in the same process. Target (issue 8, before the shadow GEMMs and what-if
statistics existed): <= 3% at interval 10; the "what-if: no" row is what
``train.whatif_interval`` saves on the log steps that skip them.

    python -m benchmarks.bench_telemetry [--steps 100] [--repeats 3] [--quick] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import append_section, load_average  # noqa: E402
from fp8lab.run.recipe_file import load_recipe  # noqa: E402
from fp8lab.run.runner import Runner  # noqa: E402
from fp8lab.telemetry.tensorboard import VariantWriter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (log_interval, whether log steps compute the what-if statistics); None: never log
SETTINGS = ((None, True), (100, True), (10, True), (10, False), (1, True))


def window(runner: Runner, writer: VariantWriter, setting: tuple, steps: int, start: int) -> float:
    """Seconds per step over ``steps`` steps logging every ``interval`` (None: never)."""
    interval, whatif = setting
    run = runner.variants[1]
    t0 = time.perf_counter()
    for i in range(steps):
        x, y = runner.sampler.batch(start + i)
        log = interval is not None and (i + 1) % interval == 0
        stats = run.train_step(x, y, 1e-3, log, whatif=whatif)
        if log:
            writer.scalars(start + i, run.take_train_metrics(x.numel()))
            writer.layer_stats(start + i, stats)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20 steps, 2 repeats")
    parser.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()
    steps, repeats = (20, 2) if args.quick else (args.steps, args.repeats)
    load_before = load_average()
    config = load_recipe(ROOT / "recipes" / "quickstart.py")
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(config, tmp, progress=False)
        writer = VariantWriter(Path(tmp), "bench")
        window(runner, writer, (None, True), 5, 0)  # warm-up
        times: dict = {k: [] for k in SETTINGS}
        for r in range(repeats):
            for k in SETTINGS:
                times[k].append(window(runner, writer, k, steps, 1000 * (r + 1)))
        writer.close()
    base = statistics.median(times[(None, True)])
    rows = [
        f"| {'none' if k[0] is None else k[0]} | {'-' if k[0] is None else ('yes' if k[1] else 'no')} | "
        f"{1e3 * statistics.median(v):.1f} | {1e3 * min(v):.1f}-{1e3 * max(v):.1f} | "
        f"{100 * (statistics.median(v) / base - 1):+.1f}% |"
        for k, v in times.items()
    ]
    table = "\n".join(
        ["| log_interval | what-if | median ms/step | min-max | overhead vs none |", "|---|---|---|---|---|", *rows]
    )
    print(table)
    if args.write:
        n_layers = len(runner.variants[1].collector.layers)
        append_section(
            "bench_telemetry: the cost of watching",
            (
                f"Quickstart FP8 variant (tiny GPT, {n_layers} FP8 layers x 3 roles, batch 16 x 128, emulated FP8), "
                f"{steps}-step windows of each setting interleaved, {repeats} repeats; every log step writes all "
                f"per-layer tags.\n\n{table}"
            ),
            load_before,
        )


if __name__ == "__main__":
    main()
