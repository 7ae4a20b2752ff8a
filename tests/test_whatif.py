"""What-if statistics and the per-recipe telemetry of block scalings.

Each recipe's row of ``whatif_stats`` equals the cast statistics of that recipe's own
cast of the tensor (so the numbers a run logs for the recipe it ran and the what-if of the
same recipe agree exactly); on a tensor with an outlier the block recipes beat per-tensor
scaling by a wide margin; a run with a block variant logs block-scale statistics and no
per-tensor scale, and the report names a winner only when it leads by CLEAR_DB.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from fp8lab.formats import E4M3, E5M2, Role
from fp8lab.gemm.whatif import WHATIF_RECIPES, whatif_stats
from fp8lab.quantize import amaxes_of, cast_stats, cast_to_fp8_grid
from fp8lab.report import report
from fp8lab.run.overrides import apply_overrides
from fp8lab.run.recipe_file import load_recipe
from fp8lab.run.runner import Runner
from fp8lab.scaling import Float8CurrentScaling
from fp8lab.whatif_report import CLEAR_DB, best_by_layer
from tests.helpers import one_thread  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["train.steps=4", "train.log_interval=2", "train.eval_interval=4", "train.eval_batches=1",
         "train.batch_size=4", "train.block_size=32"]


def test_whatif_rows_are_each_recipes_own_cast_statistics():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=gen) * 3
    scale = torch.tensor(11.0)
    stats = whatif_stats(x, Role.INPUT, E4M3, delayed_scale=scale)
    assert stats.shape == (len(WHATIF_RECIPES), 3) and WHATIF_RECIPES == ("delayed", "current", "block", "mxfp8")
    delayed = cast_stats(x, cast_to_fp8_grid(x, scale, E4M3), scale, E4M3)
    assert torch.equal(stats[0], delayed)
    current_scale = Float8CurrentScaling().scale(amaxes_of(x)[1], E4M3)
    assert torch.equal(stats[1], cast_stats(x, cast_to_fp8_grid(x, current_scale, E4M3), current_scale, E4M3))
    assert torch.isnan(whatif_stats(x, Role.GRAD_OUTPUT, E5M2, delayed_scale=None)[0]).all()


def test_block_recipes_keep_what_per_tensor_scaling_flushes_next_to_an_outlier():
    """One huge value: per-tensor scaling flushes nearly every other value to zero (while its
    whole-tensor SQNR, dominated by the outlier, stays high); blocks keep them, and the
    ranking follows what is lost before SQNR."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 512, generator=gen) * 0.01
    x[3, 7] = 3.0e4
    stats = whatif_stats(x, Role.INPUT, E4M3, delayed_scale=None)
    underflow = stats[:, 1]
    assert underflow[1] > 99.0 and underflow[2] < 1.0 and underflow[3] < 1.0  # current vs block, mxfp8
    sqnr = {r: [stats[i, 2].item()] for i, r in enumerate(WHATIF_RECIPES) if i}
    lost = {r: [(stats[i, 0] + stats[i, 1]).item()] for i, r in enumerate(WHATIF_RECIPES) if i}
    best = best_by_layer({("l", r): v for r, v in sqnr.items()}, {("l", r): v for r, v in lost.items()})["l"]
    assert best["best"] in ("block", "mxfp8", "tie") and best["best"] != "current"
    assert sqnr["current"][0] > sqnr["block"][0]  # why SQNR alone would have picked current


def test_best_recipe_needs_a_clear_lead():
    best = best_by_layer({("a", "current"): [30.0, 31.0], ("a", "mxfp8"): [40.0], ("b", "current"): [30.0],
                          ("b", "block"): [30.0 + CLEAR_DB / 2], ("c", "delayed"): [math.nan], ("c", "block"): [20.0]})
    assert best["a"]["best"] == "mxfp8" and best["a"]["margin_db"] == 40.0 - 30.5
    assert best["b"]["best"] == "tie"
    assert best["c"]["best"] == "block" and "delayed" not in best["c"]["sqnr_db"]


def test_a_block_variant_logs_block_statistics_and_the_report_compares_recipes(tmp_path, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = apply_overrides(load_recipe(ROOT / "recipes" / "quickstart.py"),
                             SHORT + ["variants.fp8.scaling=block"])
    result = Runner(config, tmp_path, progress=False).run()
    run_dir = next((tmp_path / "quickstart").iterdir())
    acc = EventAccumulator(str(run_dir / "fp8"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    layer = "blocks.0.mlp.fc1"
    for field in ("amax", "sqnr_db", "block_scale_log2_median", "blocks_underflow_pct", "blocks_saturated_pct"):
        assert f"scaling/{layer}/input/{field}" in tags, field
    assert f"scaling/{layer}/input/scale" not in tags  # a block scaling has no single scale
    for recipe in ("current", "block", "mxfp8"):
        assert f"whatif/{layer}/weight/{recipe}/sqnr_db" in tags
    assert f"whatif/{layer}/weight/delayed/sqnr_db" not in tags  # no history to ask
    # the what-if of the recipe it ran equals what it logged for its own cast
    own = [e.value for e in acc.Scalars(f"scaling/{layer}/input/sqnr_db")]
    whatif = [e.value for e in acc.Scalars(f"whatif/{layer}/input/block/sqnr_db")]
    assert own == whatif
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["variants"]["fp8"]["scaling"] == "block"
    assert layer in summary["variants"]["fp8"]["best_scaling"]
    assert result["variants"]["fp8"]["best_scaling"] == summary["variants"]["fp8"]["best_scaling"]
    text = report(run_dir)
    assert "which scaling would have served each layer best" in text and "it ran block" in text
