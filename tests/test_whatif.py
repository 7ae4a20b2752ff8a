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

import pytest
import torch

from fp8lab.formats import E4M3, E5M2, Role
from fp8lab.quantize.tensor import amaxes_of, cast_stats, cast_to_fp8_grid
from fp8lab.run.overrides import apply_overrides
from fp8lab.run.recipe_file import load_recipe
from fp8lab.run.report import report
from fp8lab.run.runner import Runner
from fp8lab.run.whatif_report import CLEAR_DB, best_by_layer
from fp8lab.scaling import Float8CurrentScaling
from fp8lab.scaling.whatif import WHATIF_RECIPES, whatif_stats
from tests.helpers import ROOT, SHORT


def test_whatif_rows_are_each_recipes_own_cast_statistics():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=gen) * 3
    scale = torch.tensor(11.0)
    delayed = cast_stats(x, cast_to_fp8_grid(x, scale, E4M3), scale, E4M3)  # a delayed layer's own cast
    stats = whatif_stats(x, Role.INPUT, E4M3, known={"delayed": delayed})
    assert stats.shape == (len(WHATIF_RECIPES), 3)
    assert WHATIF_RECIPES == ("delayed", "current", "block", "mxfp8", "rowwise", "nvfp4")
    assert torch.equal(stats[0], delayed)
    current_scale = Float8CurrentScaling().scale(amaxes_of(x)[1], E4M3)
    assert torch.equal(stats[1], cast_stats(x, cast_to_fp8_grid(x, current_scale, E4M3), current_scale, E4M3))
    assert torch.isnan(whatif_stats(x, Role.GRAD_OUTPUT, E5M2)[0]).all()  # no history: not measurable


def test_block_recipes_keep_what_per_tensor_scaling_flushes_next_to_an_outlier():
    """One huge value: per-tensor scaling flushes nearly every other value to zero (while its
    whole-tensor SQNR, dominated by the outlier, stays high); blocks keep them, and the
    ranking follows what is lost before SQNR."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 512, generator=gen) * 0.01
    x[3, 7] = 3.0e4
    stats = whatif_stats(x, Role.INPUT, E4M3)
    underflow = stats[:, 1]
    assert underflow[1] > 99.0 and underflow[2] < 1.0 and underflow[3] < 1.0  # current vs block, mxfp8
    sqnr = {r: [stats[i, 2].item()] for i, r in enumerate(WHATIF_RECIPES) if i}
    lost = {r: [(stats[i, 0] + stats[i, 1]).item()] for i, r in enumerate(WHATIF_RECIPES) if i}
    best = best_by_layer({("l", r): v for r, v in sqnr.items()}, {("l", r): v for r, v in lost.items()})["l"]
    assert best["best"] in ("block", "mxfp8", "tie") and best["best"] != "current"
    assert sqnr["current"][0] > sqnr["block"][0]  # why SQNR alone would have picked current


def test_best_recipe_needs_a_clear_lead():
    best = best_by_layer(
        {
            ("a", "current"): [30.0, 31.0],
            ("a", "mxfp8"): [40.0],
            ("b", "current"): [30.0],
            ("b", "block"): [30.0 + CLEAR_DB / 2],
            ("c", "delayed"): [math.nan],
            ("c", "block"): [20.0],
        }
    )
    assert best["a"]["best"] == "mxfp8" and best["a"]["margin_db"] == 40.0 - 30.5
    assert best["b"]["best"] == "tie"
    assert best["c"]["best"] == "block" and "delayed" not in best["c"]["sqnr_db"]


def test_a_block_variant_logs_block_statistics_and_the_report_compares_recipes(tmp_path, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = apply_overrides(
        load_recipe(ROOT / "recipes" / "quickstart.py"), SHORT + ["model.num_layers=4", "variants.fp8.scaling=block"]
    )
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


def _block_reference(x: torch.Tensor, block: tuple[int, int], scale: torch.Tensor, fmt) -> list[float]:
    """``block_cast_stats`` in float64, element by element from the definition: scale each
    block, clamp, round onto the grid (the exact cast), dequantize."""
    from fp8lab.quantize.blocks import cast_blocks_dequantized

    br, bc = block
    x64 = x.double()
    s64 = scale.double().repeat_interleave(br, 0).repeat_interleave(bc, 1)[: x.shape[0], : x.shape[1]]
    deq = cast_blocks_dequantized(x, block, scale, scale.reciprocal(), fmt, dtype=torch.float32).double()
    clamped = (x64 * s64).abs() > fmt.max
    flushed = (x64 != 0) & (deq == 0)
    n = x.numel()
    sqnr = 10 * math.log10((x64**2).sum().item() / ((x64 - deq) ** 2).sum().item())
    nb = scale.shape
    pad = (0, nb[1] * bc - x.shape[1], 0, nb[0] * br - x.shape[0])

    def per_block(mask):
        m = torch.nn.functional.pad(mask.double(), pad).reshape(nb[0], br, nb[1], bc)
        return m.amax(dim=(1, 3)) > 0

    occupied = per_block(x64 != 0)
    log2 = torch.log2(scale.double())[occupied]
    return [
        clamped.sum().item() * 100 / n,
        flushed.sum().item() * 100 / n,
        sqnr,
        log2.min().item(),
        log2.median().item(),
        log2.max().item(),
        per_block(flushed).double().mean().item() * 100,
        per_block(clamped).double().mean().item() * 100,
    ]


@pytest.mark.parametrize("block", [(1, 128), (128, 128), (1, 32)])
@pytest.mark.parametrize("transposed", [False, True])
def test_block_cast_stats_match_a_float64_reference(block, transposed):
    """Chunked block statistics (several CPU chunks, ragged edges, a transposed view,
    overflow, underflow and an all-zero block) against the definition in float64: counts
    exactly, SQNR to 1e-3 dB; and the what-if path that casts by itself gives the very
    same numbers as the path handed the layer's dequantized values."""
    from fp8lab.quantize.blocks import block_cast_stats, blocks_amax

    gen = torch.Generator().manual_seed(5)
    rows, cols = 1100, 700  # neither a multiple of 128; 770k elements: > 2 chunks of 2^18
    x = (
        (torch.randn(cols, rows, generator=gen) * 3).bfloat16().t()
        if transposed
        else (torch.randn(rows, cols, generator=gen) * 3).bfloat16()
    )
    x[:130, :130] = 0  # an all-zero block under every block shape
    x[200, 5] = 1e-30  # underflows next to normal values in its block
    amax = blocks_amax(x, block)
    scale = (torch.full_like(amax, E4M3.max) / amax).nan_to_num(posinf=1.0)
    scale = torch.exp2(torch.floor(torch.log2(scale)))  # powers of two, as the block recipes make
    scale[0, -1] *= 4  # one block scaled past fp8_max: saturates
    from fp8lab.quantize.blocks import cast_blocks_dequantized

    deq = cast_blocks_dequantized(x, block, scale, scale.reciprocal(), E4M3)
    given = block_cast_stats(x, deq, block, scale, E4M3)
    cast_here = block_cast_stats(x, None, block, scale, E4M3)
    assert torch.equal(given, cast_here)
    assert torch.equal(block_cast_stats(x, None, block, scale, E4M3, block_stats=False), given[:3])
    ref = _block_reference(x, block, scale, E4M3)
    assert ref[0] > 0 and ref[1] > 0 and ref[7] > 0 and ref[6] > 0
    got = given.tolist()
    for i in (0, 1, 6, 7):
        assert math.isclose(got[i], ref[i], rel_tol=1e-6), (i, got[i], ref[i])
    assert abs(got[2] - ref[2]) < 1e-3
    assert got[3:6] == ref[3:6]


def test_whatif_runs_only_on_the_steps_asked_for(tmp_path, one_thread):
    """train.whatif_interval: what-if tags on its multiples only, the scaling tags on every
    log step; a value that is not a multiple of log_interval is refused naming the key."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fp8lab.run.config import ConfigError

    config = apply_overrides(
        load_recipe(ROOT / "recipes" / "quickstart.py"), SHORT + ["model.num_layers=4", "train.whatif_interval=4"]
    )
    Runner(config, tmp_path, progress=False).run()
    run_dir = next((tmp_path / "quickstart").iterdir())
    acc = EventAccumulator(str(run_dir / "fp8"), size_guidance={"scalars": 0})
    acc.Reload()
    layer = "blocks.0.mlp.fc1"
    assert [e.step for e in acc.Scalars(f"scaling/{layer}/input/sqnr_db")] == [2, 4]
    assert [e.step for e in acc.Scalars(f"whatif/{layer}/input/mxfp8/sqnr_db")] == [4]
    with pytest.raises(ConfigError, match=r"train\.whatif_interval"):
        apply_overrides(config, ["train.whatif_interval=3"])


def test_the_report_labels_a_variant_with_the_options_it_set(tmp_path):
    """Two variants of one recipe read apart: the label adds every field set away from its default."""
    from fp8lab.run.report import _scaling_of

    variants = [
        {"name": "bf16", "precision": "bf16", "scaling": {"kind": "delayed"}},
        {"name": "rceil", "precision": "fp8", "scaling": {"kind": "mxfp8", "scale_calculation_mode": "rceil"}},
        {"name": "floor", "precision": "fp8", "scaling": {"kind": "mxfp8", "scale_calculation_mode": "floor"}},
        {"name": "f32", "precision": "fp8", "scaling": {"kind": "block", "use_f32_scales": True, "amax_epsilon": 0.0}},
        {"name": "hist", "precision": "fp8", "scaling": {"kind": "delayed", "amax_history_len": 16, "margin": 0}},
    ]
    (tmp_path / "config.json").write_text(json.dumps({"variants": variants}))
    assert _scaling_of(tmp_path, "bf16") == (None, None)
    assert _scaling_of(tmp_path, "rceil") == ("mxfp8", "mxfp8")
    assert _scaling_of(tmp_path, "floor") == ("mxfp8", "mxfp8(scale_calculation_mode='floor')")
    assert _scaling_of(tmp_path, "f32") == ("block", "block(use_f32_scales=True)")
    assert _scaling_of(tmp_path, "hist") == ("delayed", "delayed(amax_history_len=16)")
    assert _scaling_of(tmp_path, "absent") == (None, None)
