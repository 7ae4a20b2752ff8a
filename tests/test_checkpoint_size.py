"""The preflight's checkpoint size against the file a run writes, for every recipe.

Each recipe runs one step at a tiny size (every variant kept: the variants are what make
a checkpoint's size), and its only checkpoint, the last, must be within 1% of
``checkpoint_size.checkpoint_bytes``. The estimate measures the run's own payload built on
fake tensors, so it is within a few KiB (the summary's float values are stand-ins); 1%
is the issue's bound.
"""

from __future__ import annotations

import pytest

from fp8lab.run import checkpoint as ckpt
from fp8lab.run.checkpoint_size import checkpoint_bytes
from fp8lab.run.cli import main
from fp8lab.run.overrides import apply_overrides
from fp8lab.run.recipe_file import load_recipe
from tests.helpers import ROOT, TINY_MODEL

RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.py"))
ONE_STEP = TINY_MODEL + ["train.steps=1", "train.log_interval=1", "train.eval_interval=1"]
# Narrow: seconds per recipe; gpt2-124m keeps its vocabulary (50304, tied), a ~40 MB file.
NARROW = ["model.num_attention_heads=2", "model.hidden_size=32", "model.ffn_hidden_size=64"]
SIZES = {"layerwise.py": ["model.num_layers=3"]}  # first_last_bf16=1 keeps block 1 in FP8
TOLERANCE = 0.01


def test_every_recipe_is_covered():
    assert len(RECIPES) >= 7 and "quickstart.py" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_estimate_within_one_percent_of_the_checkpoint_written(recipe, tmp_path, capsys):
    path = str(ROOT / "recipes" / recipe)
    extra = SIZES.get(recipe, [])
    sets = [s for s in ONE_STEP + NARROW if s.split("=")[0] not in {e.split("=")[0] for e in extra}] + extra
    estimate = checkpoint_bytes(apply_overrides(load_recipe(path), sets))
    assert main(["run", path, "--out", str(tmp_path), "--quiet", *(a for s in sets for a in ("--set", s))]) == 0
    (run_dir,) = (tmp_path / recipe.removesuffix(".py")).iterdir()
    ((_, written),) = ckpt.list_checkpoints(run_dir)
    real = written.stat().st_size
    with capsys.disabled():
        print(f"\n{recipe}: estimate {estimate} bytes, written {real} ({100 * (estimate - real) / real:+.3f}%)")
    assert abs(estimate - real) <= TOLERANCE * real, (estimate, real)


def test_the_estimate_of_a_gpu_backend_run_builds_on_the_cpu():
    """The preflight estimates a run that needs a GPU backend (backend='scaled_mm') on CPU fake
    tensors: it must not ask that backend to run on the CPU (it refused every such run on an H200),
    and the state it estimates is the same as the emulated backend's."""
    recipe = load_recipe(ROOT / "recipes" / "quickstart.py")
    emulated = checkpoint_bytes(apply_overrides(recipe, ONE_STEP + NARROW))
    scaled_mm = checkpoint_bytes(apply_overrides(recipe, ONE_STEP + NARROW + ["variants.fp8.backend=scaled_mm"]))
    # the payloads differ only in the config's backend string ('scaled_mm' is 5 characters
    # longer than 'auto'), which may push the pickle across one 64-byte zip alignment boundary
    assert emulated > 0 and 0 <= scaled_mm - emulated <= 64
