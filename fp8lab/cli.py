"""The ``fp8lab`` command: ``run RECIPE``, ``info``, ``report RUN_DIR``.

Invariant: bad input (recipe file, override, data source, run folder) exits with code 2
and a message naming the field, before anything is written under the output folder.
"""

from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3  # too many consecutive non-finite steps; the last checkpoint is intact


def _run(args) -> int:
    from fp8lab.data import DataError
    from fp8lab.run.checkpoint import CheckpointError
    from fp8lab.run.config import ConfigError
    from fp8lab.run.overrides import apply_overrides
    from fp8lab.run.recipe_file import load_recipe
    from fp8lab.run.stop import TrainingDiverged

    try:
        config = apply_overrides(load_recipe(args.recipe), args.set or [])
        from fp8lab.run.runner import Runner

        runner = Runner(config, args.out, progress=not args.quiet, resume=args.resume)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"fp8lab run: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        result = runner.run()
    except TrainingDiverged as err:
        print(f"fp8lab run: training stopped: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    if result is None:  # stopped by a signal, after writing a checkpoint
        return 128 + runner.stop.signum
    return 0


def _info(args) -> int:
    from fp8lab.info import collect_info, format_info

    print(format_info(collect_info()))
    return 0


def _report(args) -> int:
    from fp8lab.report import ReportError, report

    try:
        print(report(args.run_dir))
    except ReportError as err:
        print(f"fp8lab report: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fp8lab", description="Train with FP8 GEMMs and compare against BF16.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train a recipe's variants on the same batches")
    run.add_argument("recipe", help="a recipe file, e.g. recipes/quickstart.py")
    run.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config field (repeatable)")
    run.add_argument("--out", default="logs", help="logs folder (default: logs)")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint (same recipe and --set)")
    run.set_defaults(func=_run)
    info = sub.add_parser("info", help="torch, CUDA, devices, Transformer Engine and the backend 'auto' picks")
    info.set_defaults(func=_info)
    rep = sub.add_parser("report", help="per-layer scaling table and layers worth attention for a run")
    rep.add_argument("run_dir", help="a run folder: logs/<recipe>/<run_id>")
    rep.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
