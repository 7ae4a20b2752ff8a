"""Shared test helpers: SQNR against a float64 reference, the hardware model of a GEMM."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.py")
LADDER = str(ROOT / "recipes" / "precision_ladder.py")
# --set overrides that shrink a quickstart-sized recipe to seconds: a tiny model and batch;
# TINY: 2 steps, every one logged and checkpointed; SHORT: 4 steps of a 2-block model.
TINY_MODEL = ["train.batch_size=2", "train.block_size=16", "model.num_layers=1", "train.eval_batches=1"]
TINY = TINY_MODEL + ["train.steps=2", "train.log_interval=1", "train.eval_interval=2", "train.checkpoint_interval=1"]
SHORT_STEPS = ["train.steps=4", "train.log_interval=2", "train.eval_interval=4", "train.eval_batches=1"]
SHORT = SHORT_STEPS + ["train.batch_size=4", "train.block_size=32", "model.num_layers=2"]
# The imports a recipe file written by a test starts with.
RECIPE_HEADER = "from fp8lab import DelayedScaling\nfrom fp8lab.run.config import *\n"


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """10 * log10(||ref||^2 / ||ref - test||^2), computed in float64 (inf when equal)."""
    ref64, test64 = ref.detach().to(torch.float64), test.detach().to(torch.float64)
    noise = (ref64 - test64).pow(2).sum()
    signal = ref64.pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10.0 * torch.log10(signal / noise))


def sigterm_in_training_step(runner, step: int):
    """Send this process a real SIGTERM during the ``step``-th training forward (1-based) of
    the runner's FP8 variant, mid-step; returns the hook's handle."""
    import os
    import signal

    calls = []

    def hook(module, args):
        if module.training:
            calls.append(1)
            if len(calls) == step:
                os.kill(os.getpid(), signal.SIGTERM)

    return runner.variants[1].model.blocks[0].mlp.fc1.register_forward_pre_hook(hook)


# The exact GEMM paths a CPU test can force whatever this CPU has (oneDNN bf16 only where native).
CPU_PATH_NAMES = ("fp32", "onednn-bf16")


def force_gemm_path(monkeypatch, path_name: str) -> None:
    """Make the FP8 and BF16 backends use ``path_name`` (a CI machine may have either);
    skips the test where this CPU cannot run it."""
    import fp8lab.layers.linear
    from fp8lab.gemm.backends.emulated import EmulatedBackend
    from fp8lab.gemm.backends.rounded import RoundedBackend
    from fp8lab.gemm.exact import GemmPath, cpu_has_native_bf16

    if path_name == "onednn-bf16" and not cpu_has_native_bf16():
        pytest.skip("this CPU has no native BF16 (oneDNN bf16 path)")
    path = GemmPath(path_name, torch.bfloat16 if path_name == "onednn-bf16" else torch.float32, "forced by the test")
    backends = {"emulated": EmulatedBackend(path), "bf16": RoundedBackend(path, "bf16")}
    original = fp8lab.layers.linear.backend_for
    monkeypatch.setattr(
        fp8lab.layers.linear,
        "backend_for",
        lambda name, device: backends[name] if name in backends else original(name, device),
    )


def hw_reference(a64, b64, inv: torch.Tensor | None, bias: torch.Tensor | None, out_dtype):
    """The hardware model of fp8lab.gemm.exact on exact operand values (float64 tensors): the
    exact sum of products rounded once to fp32, times the fp32 inverse scale, plus the bias,
    in fp32, rounded once to ``out_dtype``."""
    acc = (a64.double() @ b64.double()).float()
    if inv is not None:
        acc = acc * inv.float()
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)


def equal_fraction(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Share of elements that are bit-equal (as values; -0 == +0)."""
    return (out.float() == ref.float()).float().mean().item()


def fp32_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref|, in float64."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def assert_bad_override_exits_2(tmp_path, capsys, recipe, override: str, message: str) -> None:
    """``fp8lab run RECIPE --set OVERRIDE`` exits 2, names the problem on stderr and writes nothing."""
    from fp8lab.run.cli import main

    out = tmp_path / "logs"
    assert main(["run", str(recipe), "--out", str(out), "--quiet", "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()


def free_port() -> int:
    """A TCP port free on this machine now (for a process group's MASTER_PORT)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(entry, args: tuple, nprocs: int, timeout_s: float, what: str) -> None:
    """Spawn ``nprocs`` processes of ``entry(rank, *args)`` and wait for them; the test fails
    (instead of hanging on a stuck collective) if they take longer than ``timeout_s``, and any
    process still alive is killed."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(entry, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not finish in {timeout_s} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    """This spawned process as ``rank`` of a ``world``-process gloo group on the loopback (one
    intra-op thread, a 60 s collective timeout), destroyed on the way out. A body that returns
    ends the process there, through ``os._exit(0)``: the interpreter's finalization can abort
    it while a gloo thread releases a Python tensor (see ``fp8lab.run.cli._leave_worker``); a
    body that raises takes the ordinary way, so its traceback reaches the parent."""
    import datetime
    import os

    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
    from fp8lab.run.cli import _leave_worker

    _leave_worker(0)
