"""The runner under torchrun: ``fp8lab run --nproc 2`` on CPU (gloo), a killed rank, resume.

Each launch starts torchrun's agent and 2 workers (seconds of start-up on a shared
CPU), so the file launches four times: a short run compared with one process, a run
whose rank 1 is SIGKILLed after its first checkpoint (resumed by one process), and a run
stopped by SIGTERM (resumed by two).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fp8lab.run import checkpoint as ckpt
from fp8lab.run.cli import EXIT_BAD_INPUT, main
from fp8lab.run.overrides import apply_overrides
from fp8lab.run.recipe_file import load_recipe
from fp8lab.run.runner import Runner
from tests.helpers import QUICKSTART, ROOT
from tests.helpers import SHORT as SHORT_RUN

SHORT = [*SHORT_RUN, "train.warmup_steps=2"]
LAUNCH_TIMEOUT_S = 240


def _sets(pairs):
    return [arg for pair in pairs for arg in ("--set", pair)]


def _events(variant_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(variant_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def _structure(run_dir: Path) -> dict:
    """Per variant: every scalar tag with its steps, every histogram tag."""
    out = {}
    for variant in ("bf16", "fp8"):
        acc = _events(run_dir / variant)
        out[variant] = (
            {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]},
            sorted(acc.Tags()["histograms"]),
        )
    return out


def job_failure(err: str) -> str:
    """What a failed job printed, for an assertion's message: the workers' own lines (the
    first fatal one, e.g. "terminate called ...", comes before torchrun's long report) and
    the report's end."""
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line]
    head = [line for line in lines if not line.startswith(("W1", "E1", "I1", "  File", "    "))][:40]
    return "\n".join(head) + "\n...\n" + err[-1500:]


def _launch(out: Path, *args, env: dict | None = None) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "fp8lab.run.cli",
        "run",
        QUICKSTART,
        "--nproc",
        "2",
        "--out",
        str(out),
        "--quiet",
        *args,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker with RANK=rank among the launcher's descendants."""
    for pid in _descendants(launcher):
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    return None


def test_batch_not_divisible_by_nproc_is_bad_input(tmp_path, capsys):
    code = main(["run", QUICKSTART, "--nproc", "3", "--out", str(tmp_path), *_sets(SHORT)])
    assert code == EXIT_BAD_INPUT
    assert "train.batch_size must be divisible by the number of processes (3), got 4" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing launched, nothing written


FINALIZED = "fp8lab-test: a worker ran the interpreter's exit"


def _finalization_marker(folder: Path) -> dict:
    """Environment whose sitecustomize makes each torchrun worker print FINALIZED at the
    interpreter's exit (atexit handlers run as finalization begins)."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import atexit, os, sys\n"
        "if 'LOCAL_RANK' in os.environ:\n"
        f"    atexit.register(lambda: print({FINALIZED!r}, file=sys.stderr, flush=True))\n"
    )
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def test_two_ranks_write_what_one_process_writes(tmp_path):
    """...and the workers of a finished run leave without the interpreter's finalization,
    where a gloo thread releasing a Python tensor aborts the process (cli._leave_worker)."""
    proc = _launch(tmp_path / "two", *_sets(SHORT), env=_finalization_marker(tmp_path / "site"))
    _, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, job_failure(err)
    assert FINALIZED not in err
    (two,) = (tmp_path / "two" / "quickstart").iterdir()  # one run folder, from rank 0
    assert main(["run", QUICKSTART, "--out", str(tmp_path / "one"), "--quiet", *_sets(SHORT)]) == 0
    (one,) = (tmp_path / "one" / "quickstart").iterdir()

    assert _structure(two) == _structure(one)
    # only rank 0 wrote: every event file carries one process id
    writers = {p.name.rsplit(".", 2)[1] for p in two.rglob("events.out.tfevents.*")}  # ...<host>.<pid>.<n>
    assert len(writers) == 1
    assert [path.name for _, path in ckpt.list_checkpoints(two)] == ["step_00000004.pt"]
    # same global batches, same loss convention: the losses agree up to rounding (each
    # rank's bf16 weight gradients are rounded before the sum; see test_distributed.py)
    a, b = (json.loads((d / "summary.json").read_text())["variants"] for d in (two, one))
    for variant in ("bf16", "fp8"):
        assert a[variant]["final_val_loss"] == pytest.approx(b[variant]["final_val_loss"], rel=5e-3)
        steps_a = [e.value for e in _events(two / variant).Scalars("loss/train")]
        steps_b = [e.value for e in _events(one / variant).Scalars("loss/train")]
        assert steps_a == pytest.approx(steps_b, rel=5e-3)
    # the checkpoint holds the un-wrapped model (no DDP "module." prefix)
    payload = ckpt.read_checkpoint(two / "checkpoints" / "step_00000004.pt")
    assert "blocks.0.mlp.fc1.fp8_state.scale" in payload["variants"]["fp8"]["model"]


def launch_and_kill_rank_1(tmp_path: Path, sets: list[str], kind: str):
    """Launch a 2-rank run, SIGKILL rank 1 once a checkpoint of ``kind`` ("pt" or "dcp") is
    in place (a later save may be under way), wait for the job: (run folder, job, stderr)."""
    proc = _launch(tmp_path, *_sets(sets))
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not list(tmp_path.glob(f"quickstart/*/checkpoints/step_*.{kind}")):
        assert proc.poll() is None and time.monotonic() < deadline, "the job ended before its first checkpoint"
        time.sleep(0.05)
    rank1 = _rank_pid(proc.pid, 1)
    assert rank1 is not None
    os.kill(rank1, signal.SIGKILL)
    _, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    (run_dir,) = (tmp_path / "quickstart").iterdir()
    return run_dir, proc, err


def test_killed_rank_fails_the_job_with_a_resume_command_and_resume_finishes(tmp_path):
    steps = 16
    sets = [*SHORT[1:], f"train.steps={steps}", "train.checkpoint_interval=2", "train.eval_interval=10"]
    run_dir, proc, err = launch_and_kill_rank_1(tmp_path, sets, "pt")

    assert proc.returncode != 0
    assert not (run_dir / "summary.json").exists()  # it did not finish
    assert "Signals.SIGKILL" in err or "SIGKILL" in err  # torchrun's report names the cause
    assert "the 2-process job failed" in err
    step, _ = ckpt.list_checkpoints(run_dir)[-1]
    assert f"Newest checkpoint: step {step}" in err and 2 <= step < steps
    assert f"--nproc 2 --resume {run_dir}" in err

    # resume on another world size (1 process divides the global batch as well)
    config = apply_overrides(load_recipe(QUICKSTART), sets)
    runner = Runner(config, tmp_path, progress=False, resume=run_dir)
    assert runner.start_step == step
    result = runner.run()
    assert result is not None and (run_dir / "summary.json").exists()
    losses = [e.step for e in _events(run_dir / "fp8").Scalars("loss/train")]
    assert losses == list(range(2, steps + 1, 2))  # logged once per log step, none lost or repeated


def test_sigterm_stops_every_rank_after_the_same_step_and_two_ranks_resume(tmp_path):
    """torchrun passes SIGTERM to every worker; ranks agree on the step to stop after."""
    sets = [*SHORT[1:], "train.steps=20", "train.checkpoint_interval=4", "train.eval_interval=10"]
    proc = _launch(tmp_path, *_sets(sets))
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not list(tmp_path.glob("quickstart/*/checkpoints/step_*.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, "the job ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the launcher, as a scheduler would
    _, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    (run_dir,) = (tmp_path / "quickstart").iterdir()
    assert proc.returncode != 0 and not (run_dir / "summary.json").exists()
    assert "the 2-process job stopped on SIGTERM" in err
    step, _ = ckpt.list_checkpoints(run_dir)[-1]
    assert 4 <= step < 20 and f"Newest checkpoint: step {step}" in err
    # a rank that stopped alone would have left the other in a collective: both ranks
    # reported the stop instead of a broken connection
    assert "Connection closed by peer" not in err and "Connection reset" not in err

    # and 2 ranks continue it (measured once by hand: bit-identical to an uninterrupted run)
    proc = _launch(tmp_path, *_sets(sets), "--resume", str(run_dir))
    _, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, job_failure(err)
    assert [e.step for e in _events(run_dir / "fp8").Scalars("loss/train")] == list(range(2, 21, 2))
