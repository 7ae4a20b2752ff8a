"""``fp8lab run --nproc 2 --set train.parallel=fsdp`` on CPU (gloo): tags, memory, resume, refusals.

Three launches of torchrun (seconds each on a shared CPU): the quickstart sharded, the
same under DDP, and the sharded run resumed from its middle checkpoint; plus one process.
Gradient clipping is made inactive (``grad_clip=1e9``): FSDP's global norm combines the
shards' norms, so an active clip factor can differ from DDP's by an ulp (measured on this
recipe with grad_clip=1.0: losses within 2e-5 relative, amaxes 7e-8, SQNRs 3e-5); with it
inactive every tag but the timings and the per-rank memory is bit-equal to DDP's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fp8lab.run import checkpoint as ckpt
from fp8lab.run.cli import EXIT_BAD_INPUT, main
from tests.helpers import QUICKSTART
from tests.helpers import SHORT as SHORT_RUN
from tests.test_distributed_run import LAUNCH_TIMEOUT_S, _events, _launch, _sets

SETS = [*SHORT_RUN, "train.warmup_steps=2", "train.checkpoint_interval=2", "train.grad_clip=1e9"]
FSDP = [*SETS, "train.parallel=fsdp"]
# Differ by design: wall-clock timings, the process's RSS, and what each rank holds.
PER_RANK = ("perf/tokens_per_s", "perf/log_step_ms", "perf/peak_mem_mb", "perf/mem_")


def _scalars(variant_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = _events(variant_dir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _run(out: Path, sets: list[str]) -> Path:
    proc = _launch(out, *_sets(sets))
    _, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, err[-3000:]
    (run_dir,) = (out / "quickstart").iterdir()
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp_runs")
    return {"fsdp": _run(root / "fsdp", FSDP), "ddp": _run(root / "ddp", SETS)}


def test_fsdp_tags_equal_ddp_bit_for_bit(runs):
    """Rank 0's tags: FSDP == DDP bit for bit but for timings and per-rank memory. (DDP against
    one process on the whole global batch agrees within the rounding test_distributed_run
    states, loss rel. 5e-3; FSDP against one process accumulating the ranks' slices is
    bit-exact: test_fsdp.)"""
    for variant in ("bf16", "fp8"):
        fsdp, ddp = (_scalars(runs[k] / variant) for k in ("fsdp", "ddp"))
        assert set(fsdp) == set(ddp) | {"perf/all_gather_bytes_per_step"}
        assert len(fsdp) > (600 if variant == "fp8" else 10)  # the per-layer tags are there
        for tag, values in ddp.items():
            if not tag.startswith(PER_RANK):
                assert fsdp[tag] == values, tag


def test_fsdp_memory_per_rank_is_half_of_ddp_counted_from_the_shards(runs):
    """Parameters and gradients: exactly half on 2 ranks (the tiny GPT's rows divide by 2);
    AdamW state: half the moments, and every rank keeps each parameter's fp32 step counter."""
    for variant in ("bf16", "fp8"):
        fsdp, ddp = (_scalars(runs[k] / variant) for k in ("fsdp", "ddp"))
        for tag in ("perf/mem_params_bytes", "perf/mem_grads_bytes"):
            assert [2 * v for _, v in fsdp[tag]] == [v for _, v in ddp[tag]]
        counters = 4 * 29  # 29 parameters, one fp32 step counter each
        fsdp_opt, ddp_opt = fsdp["perf/mem_optimizer_bytes"][-1][1], ddp["perf/mem_optimizer_bytes"][-1][1]
        assert 2 * (fsdp_opt - counters) == ddp_opt - counters
    summary = json.loads((runs["fsdp"] / "summary.json").read_text())["variants"]
    assert summary["fp8"]["memory"]["params_bytes"] == 932_864  # 1,865,728 under DDP
    assert summary["fp8"]["memory"]["all_gather_bytes_per_step"] == 1_092_608  # FP8 block weights
    assert summary["bf16"]["memory"]["all_gather_bytes_per_step"] == 3_451_904  # everything fp32
    assert summary["fp8"]["fsdp"]["weights_gathered"]["blocks.1.mlp.fc2"] == "fp8"
    assert summary["fp8"]["fsdp"]["world_size"] == 2


def test_fsdp_checkpoint_is_whole_and_resume_is_bit_exact(runs, tmp_path):
    """The checkpoint holds whole tensors (DDP's format); 2 ranks resumed from step 2 write a
    final checkpoint equal, tensor for tensor, to the uninterrupted run's; 1 process continues it too."""
    final = ckpt.read_checkpoint(ckpt.list_checkpoints(runs["fsdp"])[-1][1])
    ddp = ckpt.read_checkpoint(ckpt.list_checkpoints(runs["ddp"])[-1][1])
    for variant in ("bf16", "fp8"):
        a, b = final["variants"][variant], ddp["variants"][variant]
        assert a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    def resumed(nproc: int) -> Path:
        copy = tmp_path / f"resume{nproc}"
        shutil.copytree(runs["fsdp"], copy)
        ckpt.list_checkpoints(copy)[-1][1].unlink()
        (copy / "summary.json").unlink()
        args = ["--resume", str(copy)]
        if nproc == 1:
            assert main(["run", QUICKSTART, "--out", str(tmp_path), "--quiet", *_sets(FSDP), *args]) == 0
        else:
            proc = _launch(tmp_path, *_sets(FSDP), *args)
            _, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
            assert proc.returncode == 0, err[-3000:]
        return copy

    again = ckpt.read_checkpoint(ckpt.list_checkpoints(resumed(2))[-1][1])
    assert again["step"] == final["step"] == 4

    def same(x, y):
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
        return True  # timings and other host values

    for variant in ("bf16", "fp8"):
        for part in ("model", "optimizer", "counters"):
            assert same(again["variants"][variant][part], final["variants"][variant][part]), (variant, part)
    one = resumed(1)  # 2 -> 1 process: the same whole checkpoint, unsharded
    assert json.loads((one / "summary.json").read_text())["variants"]["fp8"]["final_val_loss"] is not None


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.parallel=zero3", "train.parallel must be one of ('ddp', 'fsdp'), got 'zero3'"),
        ("train.fp8_all_gather=maybe", "train.fp8_all_gather must be a bool"),
    ],
)
def test_bad_values_of_the_new_fields_are_refused_with_the_field_named(tmp_path, capsys, setting, message):
    assert main(["run", QUICKSTART, "--out", str(tmp_path), "--set", setting]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_low_precision_adam_state_is_refused_under_fsdp(tmp_path, capsys):
    recipe = str(Path(QUICKSTART).parents[0] / "precision_ladder.py")
    assert main(["run", recipe, "--out", str(tmp_path), "--set", "train.parallel=fsdp"]) == EXIT_BAD_INPUT
    assert "variants.fp8_adam8.optimizer_state must be 'fp32' when train.parallel is 'fsdp'" in capsys.readouterr().err
