"""``fp8lab run --nproc N``: N local processes through PyTorch's own launcher (torchrun).

Invariant: the launcher validates the config and names the run folder before any
process starts, so bad input exits with code 2 and a failed job can always say which
folder to ``--resume``. It trains nothing itself; torchrun's elastic agent starts,
watches and stops the workers, and when one fails this prints how to continue from the
newest checkpoint.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import fp8lab
from fp8lab.run.checkpoint_kinds import list_all


def torchrun_command(nproc: int, worker_args: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m fp8lab.run.cli ...``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "fp8lab.run.cli",
        *worker_args,
    ]


def launch_local(nproc: int, worker_args: list[str], run_dir: Path, resume_command: list[str]) -> int:
    """Run the workers under torchrun; on failure, print the resume command. Returns the exit code.

    Args:
        nproc: processes on this machine (one per GPU on CUDA).
        worker_args: the ``fp8lab`` arguments every worker gets (``run RECIPE ...``).
        run_dir: the run folder the workers write (rank 0) and a resume would continue.
        resume_command: the command line that continues this job, without ``--resume``.
    """
    env = dict(os.environ)
    # Workers import the same fp8lab as this process, installed or not.
    package_root = str(Path(fp8lab.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(torchrun_command(nproc, worker_args), env=env)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        proc.send_signal(signum)

    # Ctrl-C reaches every process of the job through the terminal and torchrun passes
    # SIGTERM on to the workers: both end in a checkpoint. Here: wait, and pass SIGTERM on.
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
    }
    try:
        code = proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if code != 0:
        print(failure_message(nproc, code, run_dir, resume_command, received), file=sys.stderr)
    return code


def failure_message(nproc: int, code: int, run_dir: Path, resume_command: list[str], signals: list[int] = ()) -> str:
    """What failed (or who stopped the job), and the command that continues it."""
    if signals:
        head = f"fp8lab run: the {nproc}-process job stopped on {signal.Signals(signals[0]).name}."
    else:
        head = (
            f"fp8lab run: the {nproc}-process job failed (torchrun exit code {code}; its report "
            "above names the rank that failed first and why)."
        )
    found = list_all(run_dir)
    if not found:
        return f"{head}\nNo checkpoint was written in {run_dir} yet: start the run again (without --resume)."
    step, path = found[-1]
    command = shlex.join([*resume_command, "--resume", str(run_dir)])
    return (
        f"{head}\nNewest checkpoint: step {step} ({path}). Continue the run with (any --nproc that "
        f"divides train.batch_size):\n  {command}"
    )
