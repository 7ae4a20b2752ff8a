"""Faults and their mechanisms, below the CLI table of test_user_errors.py: step timing
across a resume, a failed checkpoint write, the run-folder lock, the memory estimate
against real models, and the exit-code table itself."""

from __future__ import annotations

import errno
import os
import types

import pytest
import torch

import fp8lab
from fp8lab.layers.gpt import GPT
from fp8lab.run import checkpoint as ckpt
from fp8lab.run import memory, storage, validate
from fp8lab.run.cli import classify
from fp8lab.run.lock import RunFolderBusy, RunLock, check_not_busy
from fp8lab.run.overrides import apply_overrides
from fp8lab.run.recipe_file import load_recipe
from fp8lab.run.runner import Runner
from tests.helpers import QUICKSTART, ROOT, TINY_MODEL, sigterm_in_training_step

TINY = [*TINY_MODEL, "train.warmup_steps=1"]


def config(*extra):
    return apply_overrides(load_recipe(QUICKSTART), TINY + list(extra))


class FakeClock:
    """perf_counter for fp8lab.run.timer alone: every call advances 0.5 s, so each step measures 0.5 s."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.5
        return self.now


def test_tokens_per_s_of_the_first_interval_after_a_resume(tmp_path, monkeypatch, one_thread):
    import fp8lab.run.timer as timer

    monkeypatch.setattr(timer, "time", types.SimpleNamespace(perf_counter=FakeClock().perf_counter))
    cfg = config("train.steps=4", "train.log_interval=4", "train.eval_interval=4")
    straight = Runner(cfg, tmp_path / "a", progress=False)
    straight.run()
    expected = [m["perf/tokens_per_s"] for _, m in straight.summary.train["fp8"]]
    assert expected == [2 * 16 / 0.5]  # batch x block tokens per 0.5 s step

    interrupted = Runner(cfg, tmp_path / "b", progress=False)
    sigterm_in_training_step(interrupted, 2)
    assert interrupted.run() is None  # stopped after step 2, in the middle of the log interval
    resumed = Runner(cfg, tmp_path / "unused", progress=False, resume=interrupted.run_dir)
    assert resumed.start_step == 2
    resumed.run()
    # 4 steps of 0.5 s, two timed before the stop and two after: not 4 steps' tokens in 1 s
    assert [m["perf/tokens_per_s"] for _, m in resumed.summary.train["fp8"]] == expected
    assert [m["perf/log_step_ms"] for _, m in resumed.summary.train["fp8"]] == [500.0]
    every_step_logs = Runner(
        config("train.steps=2", "train.log_interval=1", "train.eval_interval=2"), tmp_path / "c", progress=False
    )
    every_step_logs.run()  # no training step between log steps: throughput from the log steps
    assert [m["perf/tokens_per_s"] for _, m in every_step_logs.summary.train["fp8"]] == [2 * 16 / 0.5] * 2


def test_throughput_leaves_out_log_steps_and_reports_them_apart(monkeypatch):
    import fp8lab.run.timer as timer

    clock = iter([0.0, 0.125, 1.0, 1.125, 2.0, 4.0])  # two training steps of 0.125 s, a log step of 2 s
    monkeypatch.setattr(timer, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    steps = timer.StepTimer(torch.device("cpu"))
    for log in (False, False, True):
        with steps.measure(log=log):
            pass
    restored = timer.StepTimer(torch.device("cpu"))
    restored.load_state_dict(steps.state_dict())  # through a checkpoint
    assert restored.take() == {"train": (0.25, 2), "log": (2.0, 1)}
    assert restored.take() == {"train": (0.0, 0), "log": (0.0, 0)}
    older = timer.StepTimer(torch.device("cpu"))
    older.load_state_dict({"seconds": 1.5, "steps": 3})  # a checkpoint from before log steps were timed apart
    assert older.take() == {"train": (1.5, 3), "log": (0.0, 0)}


def test_a_failed_checkpoint_write_keeps_the_previous_and_names_it(tmp_path, monkeypatch, one_thread):
    """The disk-full path without a tmpfs: the writer's OSError surfaces, not torch's RuntimeError."""
    cfg = config("train.steps=3", "train.log_interval=1", "train.eval_interval=3", "train.checkpoint_interval=1")
    runner = Runner(cfg, tmp_path, progress=False)
    real_write = ckpt._Sink.write

    def write(self, data):
        if ".step_00000002" in self.f.name:
            self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise self.error
        return real_write(self, data)

    monkeypatch.setattr(ckpt._Sink, "write", write)
    with pytest.raises(storage.StorageError) as err:
        runner.run()
    first = runner.run_dir / "checkpoints" / "step_00000001.pt"
    assert "the disk is full" in str(err.value) and f"newest intact checkpoint is {first}" in str(err.value)
    assert err.value.run_dir == runner.run_dir
    assert [p.name for p in (runner.run_dir / "checkpoints").iterdir()] == ["step_00000001.pt"]
    ckpt.read_checkpoint(first)
    monkeypatch.undo()
    assert Runner(cfg, tmp_path, progress=False, resume=runner.run_dir).run()["steps"] == 3


def test_run_lock_is_exclusive_and_released(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunFolderBusy, match=f"in use by process {os.getpid()}"):
            check_not_busy(tmp_path)  # a second open file description: refused, even in-process
    check_not_busy(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the lock creates no file


def test_fresh_run_folders_are_claimed_atomically(tmp_path):
    a = storage.claim_run_dir(tmp_path, "r", "abcdef123456")
    b = storage.claim_run_dir(tmp_path, "r", "abcdef123456")
    assert a != b and a.is_dir() and b.is_dir()


@pytest.mark.parametrize(
    "shape",
    [
        dict(),
        dict(activation="swiglu", normalization="RMSNorm", bias=False),
        dict(tie_embeddings=True, num_layers=3, hidden_size=64, num_attention_heads=2, ffn_hidden_size=96),
    ],
)
def test_memory_estimate_counts_the_parameters_of_the_real_model(shape):
    with torch.device("meta"):
        model = GPT.from_preset("tiny", block_size=32, **shape)
    fields = {**dataclasses_asdict(model.config)}
    assert memory.gpt_params(fields) == sum(p.numel() for p in model.parameters())


def dataclasses_asdict(cfg) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def test_policy_rules_know_the_gpt_layer_names():
    with torch.device("meta"):
        model = GPT.from_preset("tiny", num_layers=2)
    names = [n for n, m in model.named_modules() if isinstance(m, fp8lab.Linear)]
    assert sorted(names) == sorted(validate._layer_names(range(2)))


def test_memory_estimate_lets_the_shipped_small_recipes_through():
    for recipe in ("quickstart", "layerwise", "amax_history_sweep"):
        est = memory.estimate(load_recipe(ROOT / "recipes" / f"{recipe}.py"))
        assert est.total < 2**30, (recipe, est)
    est = memory.estimate(load_recipe(ROOT / "recipes" / "gpt2_124m.py"))
    assert 8 * 2**30 < est.total < 40 * 2**30  # fits an 80 GB H100 (measured need is larger than this bound)


def test_largest_seed_trains(tmp_path, one_thread):
    cfg = config(f"train.seed={2**64 - 1}", "train.steps=1", "train.log_interval=1", "train.eval_interval=1")
    assert Runner(cfg, tmp_path, progress=False).run()["steps"] == 1


@pytest.mark.parametrize(
    "err,code",
    [
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                "allocate 1 GB"
            ),
            2,
        ),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), 2),
        (MemoryError(), 2),
        (KeyboardInterrupt(), 130),
        (ValueError("a bug"), None),
        (RuntimeError("a bug"), None),
        (OSError(errno.ENOSPC, "No space left on device"), None),  # raw: only the runner knows the run folder
    ],
)
def test_one_table_maps_errors_to_exit_codes(err, code):
    verdict = classify(err)
    assert (verdict[0] if verdict else None) == code
    if code == 2:
        assert "out of memory" in verdict[1] and "train.batch_size" in verdict[1]
