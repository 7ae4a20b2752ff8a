"""Checkpoint and resume: bit-exact continuation, kills at any moment, numeric faults."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fp8lab.run import checkpoint as ckpt
from fp8lab.run.overrides import apply_overrides
from fp8lab.run.recipe_file import load_recipe
from fp8lab.run.runner import Runner
from fp8lab.run.stop import TrainingDiverged
from tests.helpers import sigterm_in_training_step

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.py"
TINY = [
    "train.batch_size=4",
    "train.block_size=32",
    "model.num_layers=2",
    "train.eval_batches=1",
    "train.log_interval=2",
    "train.eval_interval=4",
    "train.checkpoint_interval=2",
    "train.warmup_steps=2",
]


def config(*extra):
    return apply_overrides(load_recipe(QUICKSTART), TINY + list(extra))


def scalar_steps(variant_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(variant_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def model_states(runner: Runner) -> dict[str, dict]:
    return {run.variant.name: run.model.state_dict() for run in runner.variants}


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    cfg = config("train.steps=8")
    straight = Runner(cfg, tmp_path / "a", progress=False)
    straight.run()

    interrupted = Runner(cfg, tmp_path / "b", progress=False)
    hook = sigterm_in_training_step(interrupted, 3)  # a real SIGTERM arriving in the middle of a step
    assert interrupted.run() is None  # finished step 3, checkpointed, stopped
    hook.remove()
    run_dir = interrupted.run_dir
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2, 3]
    assert not (run_dir / "summary.json").exists()

    resumed = Runner(cfg, tmp_path / "unused", progress=False, resume=run_dir)
    fresh = Runner(cfg, tmp_path / "unused", progress=False)
    saved = ckpt.read_checkpoint(run_dir / "checkpoints" / "step_00000003.pt")
    # a fresh model differs from the checkpoint before loading; the resumed one equals it
    fresh_fp8 = fresh.variants[1].model.state_dict()
    assert not torch.equal(
        fresh_fp8["blocks.0.mlp.fc1.weight"], saved["variants"]["fp8"]["model"]["blocks.0.mlp.fc1.weight"]
    )
    assert not torch.equal(
        fresh_fp8["blocks.0.mlp.fc1.fp8_state.scale"],
        saved["variants"]["fp8"]["model"]["blocks.0.mlp.fc1.fp8_state.scale"],
    )
    assert resumed.start_step == 3
    resumed.run()

    for name, state in model_states(straight).items():
        other = model_states(resumed)[name]
        assert state.keys() == other.keys()
        for key in state:  # parameters, amax histories and scales: bit for bit
            assert torch.equal(state[key], other[key]), (name, key)
    for variant in ("bf16", "fp8"):
        for tag in (
            ("loss/train", "loss/val", "scaling/blocks.1.mlp.fc2/grad_output/scale")
            if variant == "fp8"
            else ("loss/train", "loss/val")
        ):
            assert scalar_steps(straight.run_dir / variant, tag) == scalar_steps(run_dir / variant, tag), (variant, tag)
    a = json.loads((straight.run_dir / "summary.json").read_text())
    b = json.loads((run_dir / "summary.json").read_text())
    assert a["variants"]["fp8"]["final_val_loss"] == b["variants"]["fp8"]["final_val_loss"]


SLOW_SAVE = """
import sys, time, torch
import fp8lab.run.checkpoint as ckpt
from fp8lab.run.cli import main
real_save = torch.save
def slow_save(obj, f):  # writes the real bytes, slowly, so a kill can land mid-write
    import io
    buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
    if "step_00000004" in f.name:
        print("WRITING", flush=True)
        f.write(data[: len(data) // 2]); f.flush(); time.sleep(60)
    f.write(data)
ckpt.torch.save = slow_save
sys.exit(main(sys.argv[1:]))
"""


def _sets(pairs):
    return [a for p in pairs for a in ("--set", p)]


def test_sigkill_during_checkpoint_write_resumes_from_last_intact(tmp_path):
    out = tmp_path / "logs"
    args = [
        "run",
        str(QUICKSTART),
        "--out",
        str(out),
        "--quiet",
        *_sets(TINY + ["train.steps=8", "train.log_interval=1"]),
    ]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.time() + 120
        line = ""
        while "WRITING" not in line and time.time() < deadline:
            line = proc.stdout.readline()
        assert "WRITING" in line, "the run never reached the step-4 checkpoint"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    (run_dir,) = (out / "quickstart").iterdir()
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2]  # the half-written one has no final name
    assert list((run_dir / "checkpoints").glob(".step_00000004.pt.tmp-*"))
    done = subprocess.run(
        [sys.executable, "-m", "fp8lab.run.cli", *args, "--resume", str(run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))  # stale temporaries cleaned
    for _, path in ckpt.list_checkpoints(run_dir):
        ckpt.read_checkpoint(path)  # every file intact, weights_only
    json.loads((run_dir / "summary.json").read_text())
    # the dead process logged steps 3 and 4 after its step-2 checkpoint: purged, not doubled
    steps = [s for s, _ in scalar_steps(run_dir / "fp8", "loss/train")]
    assert steps == list(range(1, 9))


def _inject_nan(runner: Runner, layer: str, steps: set[int]):
    module = runner.variants[1].model.get_submodule(layer)
    seen = {"n": 0, "scales": {}}

    def hook(mod, args):
        if not mod.training:  # count training forwards only (evaluation runs too)
            return None
        seen["n"] += 1
        seen["scales"][seen["n"]] = mod.fp8_state.scale.clone()
        if seen["n"] in steps:
            x = args[0].clone()
            x[0, 0, 0] = float("nan")
            return (x,)

    module.register_forward_pre_hook(hook)
    return seen


def test_nan_in_one_layer_for_one_step_is_held_logged_and_harmless(tmp_path):
    cfg = config("train.steps=12", "train.log_interval=1")
    clean = Runner(cfg, tmp_path / "clean", progress=False).run()
    faulty = Runner(cfg, tmp_path / "faulty", progress=False)
    seen = _inject_nan(faulty, "blocks.0.mlp.fc1", {5})
    result = faulty.run()
    fp8 = result["variants"]["fp8"]
    assert fp8["skipped_steps"] == 1
    assert fp8["nonfinite_amax"].get("blocks.0.mlp.fc1/input", 0) >= 1
    assert torch.equal(seen["scales"][6], seen["scales"][5])  # the scale was held over the fault
    assert not torch.equal(seen["scales"][5], seen["scales"][4])  # ...while it moves on normal steps
    layer = faulty.variants[1].model.blocks[0].mlp.fc1
    assert torch.isfinite(layer.fp8_state.amax_history).all()  # the NaN never entered the history
    assert scalar_steps(faulty.run_dir / "fp8", "faults/skipped_steps")[-1][1] == 1.0
    assert scalar_steps(faulty.run_dir / "fp8", "faults/nonfinite_amax/blocks.0.mlp.fc1/input")
    # one skipped step in 12 leaves the loss in the clean run's band (bound: 5%)
    gap = (
        abs(fp8["final_val_loss"] - clean["variants"]["fp8"]["final_val_loss"])
        / clean["variants"]["fp8"]["final_val_loss"]
    )
    assert gap < 0.05, gap
    assert all(torch.isfinite(p).all() for p in faulty.variants[1].model.parameters())


def test_consecutive_skips_stop_the_run_naming_step_and_layer(tmp_path):
    cfg = config("train.steps=12", "train.log_interval=1", "train.max_consecutive_skips=3")
    runner = Runner(cfg, tmp_path, progress=False)
    _inject_nan(runner, "blocks.1.attn.qkv", set(range(4, 100)))
    with pytest.raises(TrainingDiverged) as err:
        runner.run()
    message = str(err.value)
    assert "up to step 6" in message and "blocks.1.attn.qkv/input" in message and "step_00000002.pt" in message
    path = ckpt.list_checkpoints(runner.run_dir)[-1][1]
    payload = ckpt.read_checkpoint(path)
    weights = payload["variants"]["fp8"]["model"]
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
