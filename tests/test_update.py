"""update_scales over real fp8lab.Linear layers: window, accumulation, idle layers, scalings, warning.

All comparisons are exact (torch.equal / ==): expected scales are written out by hand or
rounded from a Python float64 quotient to float32 (``torch.tensor(q, dtype=float32)``),
which equals the correctly rounded float32 division.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import fp8lab
from fp8lab import FP8Options
from fp8lab.formats import Role
from fp8lab.layers.linear import STALE_SCALE_FORWARDS
from fp8lab.quantize.tensor import amaxes_of
from fp8lab.scaling.delayed import DelayedScaling

INPUT, WEIGHT, GRAD = Role.INPUT, Role.WEIGHT, Role.GRAD_OUTPUT


def f32(q: float) -> float:
    return torch.tensor(q, dtype=torch.float64).to(torch.float32).item()


def t32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _linear(k=16, n=16, **scaling_kw) -> fp8lab.Linear:
    return fp8lab.Linear(k, n, fp8=FP8Options(scaling=DelayedScaling(**scaling_kw), fallback="emulated"))


@pytest.mark.parametrize("h", (1, 4, 31))
def test_window_is_the_last_h_amaxes_including_the_current_one(h):
    layer = _linear(amax_history_len=h)
    state = layer.fp8_state
    for step in range(1, h + 2):
        x = torch.ones(2, 16)
        if step == 1:
            x[1, 3] = -100.0  # the outlier, recorded at the first step only
        layer(x)
        fp8lab.update_scales(layer)
        in_window = step <= h  # steps 1..h all see step 1's amax
        assert state.scale[INPUT].item() == (f32(448.0 / 100.0) if in_window else 448.0), step
        still_held = (state.amax_history[:, INPUT] == 100.0).sum().item()
        # the roll after update h drops it: it sat in row 1, the oldest past amax
        assert still_held == (1 if step < h else 0), step


def test_gradient_accumulation_records_the_max_and_rolls_once():
    h = 16
    torch.manual_seed(0)
    layer = _linear(64, 32, amax_history_len=h)
    state = layer.fp8_state
    micro_x = [torch.randn(4, 64) for _ in range(4)]
    micro_x[0][2, 5] = 1e3  # outlier in the first micro-batch
    micro_g = [torch.randn(4, 32).to(torch.bfloat16) for _ in range(4)]
    for x, g in zip(micro_x, micro_g):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.backward(g)

    outlier = micro_x[0].abs().max()
    assert outlier.item() == 1000.0
    assert torch.equal(state.amax_history[0, INPUT], amaxes_of(micro_x[0])[1])
    assert torch.equal(state.amax_history[0, INPUT], outlier)
    assert torch.equal(state.amax_history[0, WEIGHT], layer.weight.detach().abs().max())
    g_amax = torch.stack([g.abs().max() for g in micro_g]).max().float()
    assert torch.equal(state.amax_history[0, GRAD], g_amax)
    assert torch.equal(state.amax_history[1:], torch.zeros(h - 1, 3))  # no roll yet
    recorded = state.amax_history[0].clone()

    fp8lab.update_scales(layer)

    assert torch.equal(state.amax_history[h - 1], recorded)  # rolled exactly once
    assert torch.equal(state.amax_history[: h - 1], torch.zeros(h - 1, 3))
    assert state.scale[INPUT].item() == f32(448.0 / 1000.0)
    assert state.scale[WEIGHT].item() == f32(448.0 / recorded[WEIGHT].item())
    assert state.scale[GRAD].item() == f32(57344.0 / recorded[GRAD].item())


def test_layer_that_did_not_run_does_not_roll():
    h = 8
    model = nn.ModuleDict({"a": _linear(amax_history_len=h), "b": _linear(amax_history_len=h)})
    x = torch.randn(3, 16)
    model["a"](x)
    model["b"](x)
    fp8lab.update_scales(model)  # both ran in step 1
    idle = model["b"].fp8_state
    idle.scale.copy_(t32([0.37, 5.5, 1234.5]))  # an update would overwrite these
    idle_history, idle_scale = idle.amax_history.clone(), idle.scale.clone()
    busy = model["a"].fp8_state
    busy_history = busy.amax_history.clone()

    model["a"](x * 3)  # step 2: only "a" runs
    busy_row0 = busy.amax_history[0].clone()
    fp8lab.update_scales(model)

    assert torch.equal(idle.amax_history, idle_history)
    assert torch.equal(idle.scale, idle_scale)
    # "a" rolled: step 1's amaxes moved from the last row to the one before it
    assert torch.equal(busy.amax_history[h - 2], busy_history[h - 1])
    assert torch.equal(busy.amax_history[h - 1], busy_row0)
    assert torch.equal(busy.amax_history[0], torch.zeros(3))
    assert busy.scale[INPUT].item() == f32(448.0 / busy_row0[INPUT].item())


def _rolled(rows):
    """TE's roll, column by column: a column whose row 0 is 0 stays as it is."""
    rolled = [[0.0, 0.0, 0.0]] + [list(r) for r in rows[2:]] + [list(rows[0])]
    return [[new[c] if rows[0][c] != 0.0 else old[c] for c in range(3)] for new, old in zip(rolled, rows)]


def test_update_scales_groups_layers_of_different_scalings():
    scaling_a = dict(amax_history_len=4)  # hybrid, max, margin 0
    scaling_b = dict(fp8_format="e4m3", amax_history_len=8, amax_compute_algo="most_recent", margin=2)
    layers = [_linear(**scaling_a), _linear(**scaling_b), _linear(**scaling_a), _linear(**scaling_b)]
    model = nn.Sequential(*layers)
    model(torch.randn(2, 16))  # every layer ran
    histories = [
        [[2.0, 4.0, 7.0], [1.0, 8.0, 3.5], [0.5, 1.0, 1.0], [0.0, 0.0, 0.0]],
        [[1.0, 3.5, 7.0]] + [[1000.0, 1000.0, 1000.0]] * 7,  # most_recent ignores rows 1..7
        [[448.0, 1.0, 57344.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
        [[0.0, math.nan, 0.5]] + [[9.0, 9.0, 9.0]] * 7,
    ]
    prev = [0.37, 0.5, 2.0]
    for layer, rows in zip(layers, histories):
        layer.fp8_state.amax_history.copy_(t32(rows))
        layer.fp8_state.scale.copy_(t32(prev))
    expected_scales = [
        [224.0, 56.0, 8192.0],  # 448/2, 448/8, 57344/7
        [112.0, 32.0, 16.0],  # e4m3 everywhere, /2**2: 448/1/4, 448/3.5/4, 448/7/4
        [1.0, 448.0, 1.0],
        [0.37, 0.5, 224.0],  # amax 0 (no roll) and nan keep the previous scale; 448/0.5/4
    ]

    fp8lab.update_scales(model)

    for i, (layer, rows, scale) in enumerate(zip(layers, histories, expected_scales)):
        state = layer.fp8_state
        assert torch.equal(state.scale, t32(scale)), i
        expected_history = t32(_rolled(rows))
        assert torch.equal(state.amax_history.isnan(), expected_history.isnan()), i
        assert torch.equal(state.amax_history.nan_to_num(), expected_history.nan_to_num()), i


def _stale_warnings(records) -> int:
    return sum(issubclass(r.category, RuntimeWarning) and "update_scales" in str(r.message) for r in records)


def test_stale_scales_warn_exactly_once():
    layer = _linear(8, 8)
    x = torch.randn(2, 8)
    with warnings.catch_warnings(record=True) as records, torch.no_grad():
        warnings.simplefilter("always")  # count every call: no deduplication by location
        for _ in range(STALE_SCALE_FORWARDS):
            layer(x)
        assert _stale_warnings(records) == 0
        layer(x)  # one more than allowed
        assert _stale_warnings(records) == 1
        for _ in range(STALE_SCALE_FORWARDS):
            layer(x)
        assert _stale_warnings(records) == 1


def test_no_warning_when_scales_are_updated_every_step():
    layer = _linear(8, 8)
    x = torch.randn(2, 8)
    with warnings.catch_warnings(record=True) as records, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(STALE_SCALE_FORWARDS + 10):
            layer(x)
            fp8lab.update_scales(layer)
    assert _stale_warnings(records) == 0
