"""Transformer Engine's fused delayed-scaling rules, end to end through fp8lab.Linear.

Each case runs a real training step of one layer (forward and backward, emulated FP8),
checks the recorded state before ``update_scales`` and the state after it against the
rule of TE's default kernels (``common/recipe/delayed_scaling.cu`` ``kernel_bulk``, and the
cast kernels' ``fmaxf(fabsf(x), amax)``), and checks what TE's unfused Python fallback
(``_default_get_amax_and_update_history`` + ``_default_sf_compute``, reimplemented below)
would have done instead, so the table also shows where the two differ.
"""

from __future__ import annotations

import math

import pytest
import torch

import fp8lab
from fp8lab import FP8Options
from fp8lab.formats import Role
from fp8lab.scaling.delayed import DelayedScaling

H = 4
PREV_SCALE = torch.tensor([3.0, 5.0, 7.0])
PAST = 2.0  # every past amax of the pre-filled history
F32_MAX = torch.finfo(torch.float32).max


def python_fallback(history: torch.Tensor, scale: torch.Tensor, fp8_max: torch.Tensor, margin: int, algo: str):
    """TE's unfused Python path: torch.max over the window (NaN propagates), always roll,
    ``(fp8_max / amax) / 2**margin``, amax 0/inf/nan keep the scale, inf scale -> fp32 max."""
    amax = history.amax(0) if algo == "max" else history[0]
    new_history = torch.roll(history, -1, 0)
    new_history[0] = 0.0
    sf = (fp8_max / amax) / 2.0**margin
    sf = torch.where(amax > 0.0, sf, scale)
    sf = torch.where(torch.isfinite(amax), sf, scale)
    sf = torch.where(torch.isinf(sf), torch.full_like(sf, F32_MAX), sf)
    return new_history, sf


def _layer(margin=0, algo="max") -> fp8lab.Linear:
    scaling = DelayedScaling(amax_history_len=H, amax_compute_algo=algo, margin=margin)
    layer = fp8lab.Linear(16, 16, bias=False, fp8=FP8Options(scaling=scaling, fallback="emulated"))
    with torch.no_grad():
        layer.weight.copy_(torch.full((16, 16), 0.5))
        layer.fp8_state.amax_history[1:].fill_(PAST)
        layer.fp8_state.scale.copy_(PREV_SCALE)
    return layer


def _step(layer, x):
    y = layer(x)
    y.backward(torch.full_like(y, 0.25))


def _case_nan_element():
    layer = _layer()
    x = torch.ones(4, 16)
    x[1, 3] = math.nan
    x[2, 5] = -6.0
    _step(layer, x)
    return layer, {Role.INPUT: 6.0}, {Role.INPUT: 1}


def _case_inf_element():
    layer = _layer()
    x = torch.ones(4, 16)
    x[0, 0] = -math.inf
    _step(layer, x)
    return layer, {Role.INPUT: math.inf}, {Role.INPUT: 1}


def _case_zero_tensor():
    layer = _layer()
    _step(layer, torch.zeros(4, 16))  # the layer ran; its input amax is 0
    return layer, {Role.INPUT: 0.0}, {}


def _case_not_run():
    layer = _layer()
    return layer, {Role.INPUT: 0.0, Role.WEIGHT: 0.0, Role.GRAD_OUTPUT: 0.0}, {}


def _case_tiny_amax_margin_2():
    # 448 / 5e-37 overflows float32, (448 * 2**-2) / 5e-37 = 2.24e38 does not
    layer = _layer(margin=2, algo="most_recent")
    _step(layer, torch.full((4, 16), 5e-37))
    return layer, {Role.INPUT: torch.tensor(5e-37).item()}, {}


CASES = {
    "nan-element": _case_nan_element,
    "inf-element": _case_inf_element,
    "zero-amax-layer-ran": _case_zero_tensor,
    "layer-not-run": _case_not_run,
    "tiny-amax-margin-2": _case_tiny_amax_margin_2,
}


def _te_expected(history, scale, fp8_max, margin, algo):
    """TE's fused rules, column by column, in float32 tensor ops."""
    new_history, new_scale = history.clone(), scale.clone()
    for c in range(3):
        last = history[0, c]
        if last == 0:
            continue  # no roll, scale kept
        window = history[:, c].nan_to_num(nan=0.0, posinf=math.inf)
        amax = window.max() if algo == "max" else last
        new_history[:, c] = torch.cat([torch.zeros(1), history[2:, c], last[None]])
        if torch.isfinite(amax) and amax > 0:
            s = (fp8_max[c] * 2.0**-margin) / amax
            new_scale[c] = F32_MAX if torch.isinf(s) else s
    return new_history, new_scale


@pytest.mark.parametrize("case", CASES)
def test_te_fused_rule(case):
    layer, expected_row0, expected_faults = CASES[case]()
    state, scaling = layer.fp8_state, layer.fp8.scaling
    # before the update: what the casts recorded
    for role, value in expected_row0.items():
        assert state.amax_history[0, role].item() == value, role
    for role in Role:
        assert state.nonfinite[role].item() == expected_faults.get(role, 0), role
    assert torch.equal(state.scale, PREV_SCALE)
    history, scale = state.amax_history.clone(), state.scale.clone()
    fallback = python_fallback(history, scale, state.fp8_max, scaling.margin, scaling.amax_compute_algo)

    fp8lab.update_scales(layer)

    exp_history, exp_scale = _te_expected(history, scale, state.fp8_max, scaling.margin, scaling.amax_compute_algo)
    assert torch.equal(state.amax_history, exp_history)
    assert torch.equal(state.scale, exp_scale)
    assert [state.faults[r].item() for r in Role] == [expected_faults.get(r, 0) for r in Role]
    assert torch.equal(state.nonfinite, torch.zeros(3))

    # what each case shows, and where TE's Python fallback would differ
    if case == "nan-element":  # the NaN is ignored: the scale follows the finite amax 6
        assert state.scale[Role.INPUT].item() == pytest.approx(448.0 / 6.0, rel=1e-7)
        assert torch.equal(fallback[1], exp_scale)  # nothing NaN reaches the history, so equal
    if case == "inf-element":  # inf is counted: the scale is kept, the history rolls inf in
        assert state.scale[Role.INPUT].item() == PREV_SCALE[Role.INPUT].item()
        assert state.amax_history[H - 1, Role.INPUT].item() == math.inf
    if case in ("zero-amax-layer-ran", "layer-not-run"):  # no roll: the past amaxes stay
        assert torch.equal(state.amax_history[:, Role.INPUT], history[:, Role.INPUT])
        assert state.scale[Role.INPUT].item() == PREV_SCALE[Role.INPUT].item()
        # the fallback rolls anyway and rescales from the past amax 2
        assert not torch.equal(fallback[0][:, Role.INPUT], history[:, Role.INPUT])
        assert fallback[1][Role.INPUT].item() == 448.0 / PAST
    if case == "zero-amax-layer-ran":  # the weight and gradient columns did roll
        assert state.amax_history[H - 1, Role.WEIGHT].item() == 0.5
    if case == "tiny-amax-margin-2":  # one rounding of (448 / 4) / amax: finite
        assert state.scale[Role.INPUT].item() == pytest.approx(112.0 / 5e-37, rel=1e-6)
        assert state.scale[Role.INPUT].item() < F32_MAX
        assert fallback[1][Role.INPUT].item() == F32_MAX  # (448 / amax) overflowed first


def test_a_nan_never_freezes_the_scale_for_the_window():
    """With "max" and TE's default 1024-row window, a NaN element recorded as NaN would keep
    the scale for 1024 steps; ignored, the next step's amax sets it."""
    layer = fp8lab.Linear(16, 16, fp8=FP8Options(scaling=DelayedScaling(), fallback="emulated"))
    x = torch.ones(2, 16)
    x[0, 0] = math.nan
    _step(layer, x)
    fp8lab.update_scales(layer)
    _step(layer, torch.full((2, 16), 8.0))
    fp8lab.update_scales(layer)
    assert layer.fp8_state.scale[Role.INPUT].item() == 448.0 / 8.0
    assert layer.fp8_state.faults[Role.INPUT].item() == 1


@pytest.mark.parametrize("convert", ["to_bf16", "half", "bfloat16", "double"])
def test_scaling_state_stays_float32_whatever_the_model_dtype(convert):
    model = fp8lab.GPT.from_preset("tiny", fallback="emulated", num_layers=1, block_size=16)
    layer = model.blocks[0].mlp.fc1
    layer.fp8_state.amax_history[1, 0] = 1.0 + 2.0**-20  # not representable in bf16 or fp16
    before = layer.fp8_state.amax_history.clone()
    model = {
        "to_bf16": lambda m: m.to(torch.bfloat16),
        "half": lambda m: m.half(),
        "bfloat16": lambda m: m.bfloat16(),
        "double": lambda m: m.double(),
    }[convert](model)
    for state in fp8lab.scaling.update.scaling_states(model):
        for name in ("amax_history", "scale", "fp8_max", "faults", "nonfinite"):
            assert getattr(state, name).dtype == torch.float32, name
    assert torch.equal(layer.fp8_state.amax_history, before)  # moved, never rounded
    assert layer.weight.dtype != torch.float32  # the model itself was converted


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_cast_to_low_precision_trains(dtype):
    torch.manual_seed(0)
    model = fp8lab.GPT.from_preset("tiny", fallback="emulated", num_layers=2, block_size=32).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randint(0, 256, (4, 32))
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        fp8lab.update_scales(model)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    scale = model.blocks[0].mlp.fc1.fp8_state.scale
    assert scale.dtype == torch.float32 and not torch.equal(scale, torch.ones(3))


def test_a_model_built_with_a_bfloat16_default_dtype_keeps_float32_scaling_state():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        layer = fp8lab.Linear(16, 16, fp8=FP8Options(fallback="emulated"))
    finally:
        torch.set_default_dtype(previous)
    assert layer.weight.dtype == torch.bfloat16
    assert layer.fp8_state.amax_history.dtype == torch.float32
    layer(torch.randn(2, 16, dtype=torch.bfloat16)).float().sum().backward()
    fp8lab.update_scales(layer)
    assert layer.fp8_state.scale[Role.INPUT].item() != 1.0
