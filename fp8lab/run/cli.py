"""The ``fp8lab`` command: ``run RECIPE``, ``info``, ``report RUN_DIR``.

Invariant: ``classify`` is the one place where an error becomes an exit code: every
error caused by the user's input or environment exits 2 (3 for divergence, 128 + the
signal for SIGHUP/SIGINT/SIGTERM) with one message naming the key, file or resource and what
to do; any other exception is a bug in fp8lab and shows its traceback (exit 1). Bad
input is found before anything is written under the output folder.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
from typing import NoReturn

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3  # too many consecutive non-finite steps; the last checkpoint is intact

EXIT_CODES = """exit codes:
  0    the run finished (summary.json written)
  1    a bug in fp8lab: a Python traceback (please report it)
  2    bad input or environment: recipe, --set value, data file, --out or --resume folder,
       backend, memory or disk space. One message names it and what to do. Nothing was
       written, or (disk full during training) the newest checkpoint is intact and the
       message prints the command that resumes
  3    training diverged: train.max_consecutive_skips non-finite steps in a row
  129, 130, 143  SIGHUP, Ctrl-C (SIGINT), SIGTERM: the current step and a checkpoint are
       finished first (the resume command is printed); before training started, nothing was
       written; at the end of a run (final writes or later), the run is finished
"""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input or environment (exit 2)."""
    from fp8lab.gemm.backends.select import BackendUnavailable
    from fp8lab.run.checkpoint import CheckpointError
    from fp8lab.run.config import ConfigError
    from fp8lab.run.data import DataError
    from fp8lab.run.lock import RunFolderBusy
    from fp8lab.run.memory import ResourceError
    from fp8lab.run.report import ReportError
    from fp8lab.run.storage import StorageError

    return (
        ConfigError,
        DataError,
        CheckpointError,
        ReportError,
        BackendUnavailable,
        RunFolderBusy,
        StorageError,
        ResourceError,
    )


def _out_of_memory(err: BaseException) -> bool:
    from fp8lab.run.memory import is_out_of_memory

    return is_out_of_memory(err)


def classify(err: BaseException, args=None) -> tuple[int, str] | None:
    """(exit code, message) for an error of the user's input or environment; None for a bug."""
    from fp8lab.run.stop import StopBeforeStart, TrainingDiverged

    if isinstance(err, TrainingDiverged):
        return EXIT_DIVERGED, f"training stopped: {err}"
    if isinstance(err, StopBeforeStart):
        return 128 + err.signum, str(err)
    if isinstance(err, KeyboardInterrupt):
        return 128 + signal.SIGINT, "interrupted (SIGINT)"
    if isinstance(err, _user_errors()):
        message = str(err)
        run_dir = getattr(err, "run_dir", None)
        if run_dir is not None and args is not None and getattr(args, "recipe", None):
            message += f"\n  resume with: {resume_command(args, run_dir)}"
        return EXIT_BAD_INPUT, message
    if _out_of_memory(err):
        from fp8lab.run.memory import out_of_memory_message

        return EXIT_BAD_INPUT, out_of_memory_message(err)
    return None


def resume_command(args, run_dir) -> str:
    """The command line that continues ``run_dir`` with the same recipe and options."""
    command = ["fp8lab", "run", args.recipe, *(a for s in args.set or [] for a in ("--set", s))]
    command += ["--quiet"] if args.quiet else []
    command += ["--nproc", str(args.nproc)] if args.nproc else []
    return shlex.join([*command, "--resume", str(run_dir)])


def _quiet_writer_threads() -> None:
    """TensorBoard's writer thread hands a failed write (disk full) to the main thread,
    which reports it once with the intact checkpoint; the thread's own traceback on
    stderr would only repeat it."""
    from fp8lab.run.storage import is_storage_fault

    previous = threading.excepthook
    if getattr(previous, "fp8lab_quiet", False):
        return

    def hook(hook_args):
        if not is_storage_fault(hook_args.exc_value):
            previous(hook_args)

    hook.fp8lab_quiet = True
    threading.excepthook = hook


def _run(args) -> int:
    from fp8lab.run.overrides import apply_overrides
    from fp8lab.run.recipe_file import load_recipe
    from fp8lab.run.stop import StopRequest, stop_before_start

    stop = StopRequest()
    # The flag first, then everything inside it: stop_before_start nests (and restores the
    # flag), Runner.run nests, and as the process's own command the flag stays until exit.
    with stop.installed(until_exit=args.own_process):
        with stop_before_start():  # a signal here stops at once: nothing is written yet
            config = apply_overrides(load_recipe(args.recipe), args.set or [])
            if args.nproc is not None:
                return _launch(args, config)
            from fp8lab.run.distributed import Distributed, resolve_device
            from fp8lab.run.runner import Runner

            dist = Distributed.from_env(resolve_device(config.train.device))
            try:
                runner = Runner(
                    config,
                    args.out,
                    progress=not args.quiet,
                    resume=args.resume,
                    dist=dist,
                    run_dir=args.run_dir,
                    stop=stop,
                )
            except BaseException:
                dist.close()
                raise
        _quiet_writer_threads()
        try:
            result = runner.run()  # from here a signal finishes the step and checkpoints
        except RuntimeError as err:
            if not dist.enabled or classify(err) is not None:
                raise
            # Typically a collective whose peer died; torchrun reports which rank failed first.
            first_line = (str(err).splitlines() or [""])[0]
            print(
                f"fp8lab run: rank {dist.rank} of {dist.world_size} failed: {type(err).__name__}: {first_line}\n"
                f"fp8lab run: when the job has stopped, relaunch it with --resume {runner.run_dir} "
                "to continue from its newest checkpoint",
                file=sys.stderr,
            )
            raise
        finally:
            dist.close()
        if result is None:  # a signal (on this rank or another): after a checkpoint, said by the runner
            return 128 + (stop.signum or signal.SIGTERM)
        if stop:  # the run is finished; the last moment a signal changes the exit code
            runner.progress.stopped_at_end(stop.name, runner.run_dir)
            return 128 + stop.signum
        return 0


def _launch(args, config) -> int:
    """``--nproc N``: validate, name the run folder, and start N workers through torchrun."""
    from pathlib import Path

    from fp8lab.run.checkpoint import CheckpointError
    from fp8lab.run.checkpoint_kinds import newest_usable
    from fp8lab.run.config import ConfigError
    from fp8lab.run.distributed import check_world_size
    from fp8lab.run.launch import launch_local
    from fp8lab.run.lock import check_not_busy
    from fp8lab.run.storage import check_out, check_writable, new_run_dir

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
        check_not_busy(resume)
        check_writable(resume / "checkpoints", f"--resume {resume}")
        newest_usable(resume, config.hash(), config.to_dict())  # fail here, before any process starts
        run_dir, worker = resume, ["--resume", str(resume)]
    else:
        check_out(args.out)
        check_writable(Path(args.out) / config.name, f"--out {args.out}")
        run_dir = new_run_dir(Path(args.out), config.name, config.hash())
        worker = ["--run-dir", str(run_dir)]
    return launch_local(
        args.nproc, ["run", *common, *worker], run_dir, ["fp8lab", "run", *common, "--nproc", str(args.nproc)]
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}")
    return value


def _info(args) -> int:
    from fp8lab.run.info import collect_info, format_info

    print(format_info(collect_info()))
    return 0


def _report(args) -> int:
    from fp8lab.run.report import report

    print(report(args.run_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fp8lab", description="Train with FP8 GEMMs and compare against BF16.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="train a recipe's variants on the same batches",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("recipe", help="a recipe file, e.g. recipes/quickstart.py")
    run.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config field (repeatable)")
    run.add_argument("--out", default="logs", help="logs folder (default: logs)")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint (same recipe and --set)"
    )
    run.add_argument(
        "--nproc",
        type=_positive_int,
        metavar="N",
        help="data-parallel over N local processes, launched through torchrun (see docs/distributed.md)",
    )
    run.add_argument("--run-dir", help=argparse.SUPPRESS)  # the --nproc launcher names the folder for its workers
    run.set_defaults(func=_run)
    info = sub.add_parser("info", help="torch, CUDA, devices, Transformer Engine and the backend 'auto' picks")
    info.set_defaults(func=_info)
    rep = sub.add_parser("report", help="per-layer scaling table and layers worth attention for a run")
    rep.add_argument("run_dir", help="a run folder: logs/<recipe>/<run_id>")
    rep.set_defaults(func=_report)
    return parser


def _speaks(err: BaseException) -> bool:
    """Under torchrun every rank meets the same bad input, divergence or signal: rank 0
    says it once. Memory, which can differ per device, is said by every rank."""
    from fp8lab.run.memory import ResourceError

    return os.environ.get("RANK", "0") == "0" or isinstance(err, ResourceError) or _out_of_memory(err)


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` and return its exit code.

    Args:
        argv: the arguments; None reads the process's command line, and the process is
            then the command's: ``run`` keeps its signal handler until the process exits
            (called with a list, as tests do, it restores the caller's handlers).
    """
    args = build_parser().parse_args(argv)
    args.own_process = argv is None
    returned = None  # the command's own exit code (its files closed), not an error's
    try:
        returned = args.func(args)
        return returned
    except BaseException as err:  # the one place an error becomes an exit code
        verdict = classify(err, args)
        if verdict is None:
            raise  # a bug: the traceback is what a report needs
        code, message = verdict
        if _speaks(err):
            rank = os.environ.get("RANK", "0")
            try:
                print(f"fp8lab {args.command}: {'' if rank == '0' else f'rank {rank}: '}{message}", file=sys.stderr)
            except (OSError, ValueError):
                pass  # stderr is gone (a closed pipe): the exit code still says it
        return code
    finally:
        if args.own_process:
            # The exit code is decided and only the interpreter's exit follows, during which
            # Python restores the signals' default action: hold them pending from here, so a
            # late SIGTERM cannot turn a finished run's exit code into a death by signal.
            from fp8lab.run.stop import SIGNALS

            signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
            if returned is not None and "LOCAL_RANK" in os.environ:  # torch is imported only under torchrun
                from fp8lab.run.distributed import torchrun_worker

                if torchrun_worker():
                    _leave_worker(returned)


def _leave_worker(code: int) -> NoReturn:
    """End a torchrun worker whose exit code is decided, without the interpreter's finalization.

    Gloo's worker threads drop their reference to a collective a moment after the collective
    has returned to Python. When that is the last reference to a tensor Python created,
    dropping it takes the GIL; a thread that takes the GIL while the interpreter finalizes is
    ended by ``pthread_exit``, whose unwinding through gloo's C++ loop aborts the process
    ("terminate called without an active exception"). The run had finished and was reported
    as a crash: 3 of 99 four-rank FSDP resumes on the 2-core VM, always after the
    final checkpoint (c10's stack trace: ``ProcessGroupGloo::runLoop`` ->
    ``TensorImpl::decref_pyobject`` -> ``pthread_exit``). Only for a command that returned
    its exit code, so its event files are closed, its checkpoints and summary written and
    the process group destroyed: the worker flushes its output and leaves as
    multiprocessing's workers do, through ``os._exit`` (atexit handlers do not run; fp8lab
    registers none). An error keeps the ordinary exit, which flushes what it left open.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: the exit code still says it
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
