"""The ``fp8lab`` command: ``run RECIPE``, ``info``, ``report RUN_DIR``.

Invariant: bad input (recipe file, override, data source, run folder) exits with code 2
and a message naming the field, before anything is written under the output folder.
"""

from __future__ import annotations

import argparse
import os
import signal
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

    dist = None
    try:
        config = apply_overrides(load_recipe(args.recipe), args.set or [])
        if args.nproc is not None:
            return _launch(args, config)
        from fp8lab.run.distributed import Distributed
        from fp8lab.run.runner import Runner, resolve_device

        dist = Distributed.from_env(resolve_device(config.train.device))
        runner = Runner(config, args.out, progress=not args.quiet, resume=args.resume, dist=dist,
                        run_dir=args.run_dir)
    except (ConfigError, DataError, CheckpointError) as err:
        if dist is None or dist.is_main:  # every rank finds the same error: say it once
            print(f"fp8lab run: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        result = runner.run()
    except TrainingDiverged as err:
        if dist.is_main:
            print(f"fp8lab run: training stopped: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except RuntimeError as err:
        if not dist.enabled:
            raise
        # Typically a collective whose peer died; torchrun reports which rank failed first.
        first_line = (str(err).splitlines() or [""])[0]
        print(f"fp8lab run: rank {dist.rank} of {dist.world_size} failed: {type(err).__name__}: {first_line}\n"
              f"fp8lab run: when the job has stopped, relaunch it with --resume {runner.run_dir} "
              "to continue from its newest checkpoint", file=sys.stderr)
        raise
    finally:
        dist.close()
    if result is None:  # stopped by a signal (on this rank or another), after a checkpoint
        return 128 + (runner.stop.signum or signal.SIGTERM)
    return 0


def _launch(args, config) -> int:
    """``--nproc N``: validate, name the run folder, and start N workers through torchrun."""
    from pathlib import Path

    from fp8lab.run.checkpoint import CheckpointError, newest_usable
    from fp8lab.run.config import ConfigError
    from fp8lab.run.launch import launch_local
    from fp8lab.run.runner import check_world_size, new_run_dir

    if "LOCAL_RANK" in os.environ:
        raise ConfigError("--nproc starts torchrun itself; under torchrun, leave --nproc out")
    if args.run_dir is not None:
        raise ConfigError("--run-dir is set by the --nproc launcher; leave it out")
    check_world_size(config, args.nproc)
    common = [args.recipe, *(a for s in args.set or [] for a in ("--set", s)), "--out", args.out]
    common += ["--quiet"] if args.quiet else []
    if args.resume is not None:
        resume = Path(args.resume)
        if not (resume / "config.json").is_file():
            raise CheckpointError(f"--resume {resume}: not a run folder (no config.json)")
        newest_usable(resume, config.hash(), config.to_dict())  # fail here, before any process starts
        run_dir, worker = resume, ["--resume", str(resume)]
    else:
        run_dir = new_run_dir(Path(args.out), config)
        worker = ["--run-dir", str(run_dir)]
    return launch_local(args.nproc, ["run", *common, *worker], run_dir,
                        ["fp8lab", "run", *common, "--nproc", str(args.nproc)])


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}")
    return value


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
    run.add_argument("--nproc", type=_positive_int, metavar="N",
                     help="data-parallel over N local processes, launched through torchrun (see docs/distributed.md)")
    run.add_argument("--run-dir", help=argparse.SUPPRESS)  # the --nproc launcher names the folder for its workers
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
