"""``fp8lab run --nproc 2 --set train.parallel=fsdp`` on CPU (gloo): tags, memory, sharded
checkpoints and resume, refusals.

Seven launches of torchrun (seconds each on a shared CPU): the quickstart sharded and the same
under DDP (8 steps, a checkpoint every 2); the sharded run resumed from its middle checkpoint;
a sharded run whose rank 1 is SIGKILLed, and its resume; the sharded run resumed on 4 ranks;
a one-process run resumed on 2 ranks; plus one process resuming the sharded run from the older
checkpoint when the newest is damaged.
Gradient clipping is made inactive (``grad_clip=1e9``): FSDP's global norm combines the
shards' norms, so an active clip factor can differ from DDP's by an ulp (measured on this
recipe with grad_clip=1.0: losses within 2e-5 relative, amaxes 7e-8, SQNRs 3e-5); with it
inactive every tag but the timings and the per-rank memory is bit-equal to DDP's.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from fp8lab.run import checkpoint as ckpt
from fp8lab.run import checkpoint_kinds
from fp8lab.run.cli import EXIT_BAD_INPUT, main
from fp8lab.run.overrides import apply_overrides
from fp8lab.run.recipe_file import load_recipe
from fp8lab.run.runner import Runner
from tests.helpers import QUICKSTART
from tests.helpers import SHORT as SHORT_RUN
from tests.test_distributed_run import (
    LAUNCH_TIMEOUT_S,
    _events,
    _launch,
    _sets,
    job_failure,
    launch_and_kill_rank_1,
)

STEPS = 8  # checkpoints every 2 steps: a kill after the first leaves the job steps to run
SETS = [*SHORT_RUN[1:], f"train.steps={STEPS}", "train.warmup_steps=2", "train.checkpoint_interval=2"]
SETS += ["train.grad_clip=1e9"]
FSDP = [*SETS, "train.parallel=fsdp"]
# Differ by design: wall-clock timings, the process's RSS, and what each rank holds.
PER_RANK = ("perf/tokens_per_s", "perf/log_step_ms", "perf/peak_mem_mb", "perf/mem_")


def _scalars(variant_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = _events(variant_dir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _run(out: Path, sets: list[str]) -> Path:
    proc = _launch(out, *_sets(sets))
    _, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, job_failure(err)
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


def _dcp_tensors(path: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint by its DCP key (``fp8.model.<fqn>``...), read with
    DCP's own converter (files this test's runs wrote)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = scratch / f"{path.parent.parent.name}-{path.name}.pt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_to_torch_save(path, whole)

    def flat(tree, prefix=""):
        if isinstance(tree, dict):
            return {k: v for key, item in tree.items() for k, v in flat(item, f"{prefix}{key}.").items()}
        return {prefix[:-1]: tree} if isinstance(tree, torch.Tensor) else {}

    return flat(torch.load(whole, weights_only=True))


def _comparable(summary: dict) -> dict:
    """summary.json without what differs between processes by design (timings, RSS)."""
    if isinstance(summary, dict):
        return {
            k: _comparable(v) for k, v in summary.items() if k not in ("tokens_per_s", "log_step_ms", "peak_mem_mb")
        }
    return summary


def _assert_continues_bit_exact(resumed: Path, uninterrupted: Path, scratch: Path) -> None:
    """The resumed run ends where the uninterrupted one did: every tensor of the final
    checkpoint, rank 0's loss/train and loss/val events, summary.json but for timings."""
    (final,) = [p for s, p in checkpoint_kinds.list_all(uninterrupted) if s == STEPS]
    (again,) = [p for s, p in checkpoint_kinds.list_all(resumed) if s == STEPS]
    a, b = _dcp_tensors(again, scratch), _dcp_tensors(final, scratch)
    assert a.keys() == b.keys() and any(k.startswith("fp8.optim.state.") for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    for variant in ("bf16", "fp8"):
        for tag in ("loss/train", "loss/val"):
            assert _scalars(resumed / variant)[tag] == _scalars(uninterrupted / variant)[tag], (variant, tag)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (resumed, uninterrupted)]
    assert _comparable(summaries[0]) == _comparable(summaries[1])


def _resumable_copy(run_dir: Path, to: Path) -> Path:
    """A copy of a finished run without its final checkpoint and summary: a run to resume."""
    shutil.copytree(run_dir, to)
    shutil.rmtree(to / "checkpoints" / f"step_{STEPS:08d}.dcp")
    (to / "summary.json").unlink()
    return to


def test_fsdp_checkpoints_are_sharded_and_resume_is_bit_exact(runs, tmp_path):
    """FSDP over 2 ranks writes DCP folders (every rank its shards; keep=2 prunes them), whose
    parameters equal DDP's whole checkpoint; 2 ranks resumed from the middle one end bit for
    bit where the uninterrupted run ended."""
    names = sorted(p.name for p in (runs["fsdp"] / "checkpoints").iterdir())
    assert names == [f"step_{STEPS - 2:08d}.dcp", f"step_{STEPS:08d}.dcp"]
    assert sorted(p.name for p in (runs["fsdp"] / "checkpoints" / names[-1]).glob("extra_rank*.pt")) == [
        "extra_rank00000.pt",
        "extra_rank00001.pt",
    ]
    final = _dcp_tensors(runs["fsdp"] / "checkpoints" / names[-1], tmp_path)
    ddp = ckpt.read_checkpoint(ckpt.list_checkpoints(runs["ddp"])[-1][1])
    for variant in ("bf16", "fp8"):
        model = ddp["variants"][variant]["model"]
        assert all(torch.equal(final[f"{variant}.model.{k}"], v) for k, v in model.items())

    copy = _resumable_copy(runs["fsdp"], tmp_path / "resumed")
    proc = _launch(tmp_path, *_sets(FSDP), "--resume", str(copy))
    _, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, job_failure(err)
    _assert_continues_bit_exact(copy, runs["fsdp"], tmp_path)


def test_killed_fsdp_rank_resumes_bit_exact_from_the_sharded_checkpoint(runs, tmp_path):
    """kill -9 of rank 1 after the first sharded checkpoint (possibly in a later save: its
    ``.tmp-`` folder is ignored); 2 ranks resumed end bit for bit where the uninterrupted run did."""
    run_dir, proc, err = launch_and_kill_rank_1(tmp_path, FSDP, "dcp")
    assert proc.returncode != 0 and not (run_dir / "summary.json").exists(), job_failure(err)
    step, newest = checkpoint_kinds.list_all(run_dir)[-1]
    assert newest.suffix == ".dcp" and 2 <= step < STEPS
    assert f"Newest checkpoint: step {step} ({newest})" in err

    proc = _launch(tmp_path, *_sets(FSDP), "--resume", str(run_dir))
    _, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, job_failure(err)
    _assert_continues_bit_exact(run_dir, runs["fsdp"], tmp_path)


def test_damaged_newest_sharded_checkpoint_offers_the_older_and_one_process_continues(runs, tmp_path, capsys):
    """A truncated shard file refuses its checkpoint, naming the file, and offers the older
    intact one (as for .pt files); moved away, one process (world size 2 -> 1) loads the older
    one's parameters exactly, writes a whole .pt checkpoint and finishes."""
    copy = _resumable_copy(runs["fsdp"], tmp_path / "damaged")
    older = copy / "checkpoints" / f"step_{STEPS - 2:08d}.dcp"
    saved = _dcp_tensors(older, tmp_path)
    newer = copy / "checkpoints" / f"step_{STEPS:08d}.dcp"
    shutil.copytree(runs["fsdp"] / "checkpoints" / newer.name, newer)
    shard = newer / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])

    code = main(
        ["run", QUICKSTART, "--nproc", "2", "--out", str(tmp_path), "--quiet", *_sets(FSDP), "--resume", str(copy)]
    )
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert f"checkpoint file {shard} has 100 bytes" in err and f"An older intact checkpoint exists: {older}" in err
    ddp = ["run", QUICKSTART, "--nproc", "2", "--out", str(tmp_path), *_sets(SETS), "--resume", str(copy)]
    assert main(ddp) == EXIT_BAD_INPUT  # another train.parallel is another config: refused, the field named
    assert "train.parallel: checkpoint 'fsdp', now 'ddp'" in capsys.readouterr().err

    shutil.move(newer, tmp_path / newer.name)
    runner = Runner(apply_overrides(load_recipe(QUICKSTART), FSDP), tmp_path, progress=False, resume=copy)
    assert runner.start_step == STEPS - 2
    for run in runner.variants:
        state = run.model.state_dict()
        assert all(torch.equal(v, saved[f"{run.variant.name}.model.{k}"]) for k, v in state.items())
    assert runner.run() is not None
    assert [p.name for _, p in checkpoint_kinds.list_all(copy)] == [older.name, f"step_{STEPS:08d}.pt"]
    for variant in ("bf16", "fp8"):
        losses = _scalars(copy / variant)["loss/train"]
        assert [s for s, _ in losses] == list(range(2, STEPS + 1, 2)) and all(math.isfinite(v) for _, v in losses)


def test_two_rank_sharded_checkpoint_resumes_on_four_ranks(runs, tmp_path):
    """DCP reshards the 2-rank checkpoint over 4 ranks; the run continues to its last step and
    writes a 4-rank checkpoint. Not bit-exact: 4 ranks add the gradients in another order
    (measured on a 4-step run resumed at 2: final val loss within 6e-6 relative)."""
    copy = _resumable_copy(runs["fsdp"], tmp_path / "four")
    proc = _launch(tmp_path, *_sets(FSDP), "--nproc", "4", "--resume", str(copy))  # the last --nproc counts
    _, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, job_failure(err)
    final = copy / "checkpoints" / f"step_{STEPS:08d}.dcp"
    assert json.loads((final / "manifest.json").read_text())["world_size"] == 4
    a, b = (json.loads((d / "summary.json").read_text())["variants"] for d in (copy, runs["fsdp"]))
    for variant in ("bf16", "fp8"):
        losses = _scalars(copy / variant)["loss/train"]
        assert [s for s, _ in losses] == list(range(2, STEPS + 1, 2)) and all(math.isfinite(v) for _, v in losses)
        assert a[variant]["final_val_loss"] == pytest.approx(b[variant]["final_val_loss"], rel=1e-3)
        assert a[variant]["fsdp"]["world_size"] == 4


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


def test_one_process_checkpoint_resumes_sharded_on_two_ranks(tmp_path):
    """World size 1 -> 2 through the CLI: one process with ``train.parallel=fsdp`` (FSDP is off
    for one process) writes whole .pt checkpoints; 2 ranks resume from the middle one, shard it
    and write a 2-rank DCP checkpoint. Not bit-exact (two ranks add the gradients in another
    order): the final val loss within 1e-3 relative of the one-process run's."""
    runner = Runner(apply_overrides(load_recipe(QUICKSTART), FSDP), tmp_path / "one", progress=False)
    assert runner.run() is not None
    one = runner.folder.path
    assert [p.name for _, p in checkpoint_kinds.list_all(one)] == [f"step_{STEPS - 2:08d}.pt", f"step_{STEPS:08d}.pt"]
    copy = tmp_path / "two"
    shutil.copytree(one, copy)
    (copy / "checkpoints" / f"step_{STEPS:08d}.pt").unlink()
    (copy / "summary.json").unlink()
    proc = _launch(tmp_path, *_sets(FSDP), "--resume", str(copy))
    _, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, job_failure(err)
    final = copy / "checkpoints" / f"step_{STEPS:08d}.dcp"
    assert json.loads((final / "manifest.json").read_text())["world_size"] == 2
    a, b = (json.loads((d / "summary.json").read_text())["variants"] for d in (copy, one))
    for variant in ("bf16", "fp8"):
        losses = _scalars(copy / variant)["loss/train"]
        assert [s for s, _ in losses] == list(range(2, STEPS + 1, 2)) and all(math.isfinite(v) for _, v in losses)
        assert a[variant]["final_val_loss"] == pytest.approx(b[variant]["final_val_loss"], rel=1e-3)
        assert a[variant]["fsdp"]["world_size"] == 2
