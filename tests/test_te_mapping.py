"""The Transformer Engine backend's pure parts, on CPU without TE.

Scaling mapping: fp8lab's DelayedScaling -> TE's DelayedScaling recipe keyword arguments (TE's
field names and defaults from transformer_engine/common/recipe/__init__.py, 2.20.2).
Scaling-state mapping: TE's fp8_meta (forward [input, weight, output], backward
[grad_output, grad_input]) <-> fp8lab's columns (input, weight, grad_output), exact.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from torch import nn

from fp8lab import DelayedScaling, Float8BlockScaling, Float8CurrentScaling, FP8Options, Linear, MXFP8BlockScaling
from fp8lab.gemm.backends.select import BackendUnavailable
from fp8lab.gemm.backends.te import sync_from_te, sync_te_scaling, te_recipe
from fp8lab.gemm.backends.te_mapping import copy_into_te_meta_, te_meta_to_fp8lab

TE_DEFAULTS = {
    "fp8_format": "HYBRID",
    "amax_history_len": 1024,
    "amax_compute_algo": "max",
    "margin": 0,
    "reduce_amax": True,
}
# numerics fields fp8lab pins to TE's defaults explicitly, so no NVTE_* variable changes them
PINNED = {"fp8_dpa": False, "fp8_mha": False, "backward_override": None}
TE_IMPORTABLE = importlib.util.find_spec("transformer_engine") is not None


def test_default_scaling_maps_to_te_defaults():
    spec = DelayedScaling().te_recipe()
    assert spec == {
        "recipe": "DelayedScaling",
        "kwargs": {**TE_DEFAULTS, "scaling_factor_compute_algo": None, **PINNED},
        "mmparams": None,
        "qparams": None,
    }


@pytest.mark.parametrize(
    "scaling",
    [DelayedScaling(), Float8CurrentScaling(), Float8BlockScaling(), MXFP8BlockScaling()],
    ids=lambda s: type(s).__name__,
)
def test_every_fp8lab_field_is_mapped(scaling):
    """A field added to one of fp8lab's scaling recipes without a TE mapping fails here:
    every field is a TE constructor argument or a QParams setting, or a setting TE does not
    have whose other values ``te_recipe`` refuses (tests/test_scaling_modes.py)."""
    spec = scaling.te_recipe()
    assert spec["recipe"] == type(scaling).__name__  # TE's names
    names = {f.name for f in dataclasses.fields(scaling)} - {"scale_calculation_mode"}
    mapped = set(spec["kwargs"]) | ({"amax_epsilon"} if spec["qparams"] else set())
    assert names <= mapped


def test_non_default_scaling_maps_field_by_field():
    scaling = DelayedScaling(
        fp8_format="e4m3", amax_history_len=16, amax_compute_algo="most_recent", margin=2, reduce_amax=False
    )
    assert scaling.te_recipe()["kwargs"] == {
        "fp8_format": "E4M3",
        "amax_history_len": 16,
        "amax_compute_algo": "most_recent",
        "margin": 2,
        "reduce_amax": False,
        "scaling_factor_compute_algo": None,
        **PINNED,
    }
    current = Float8CurrentScaling(fp8_format="e4m3", use_power_2_scales=True, amax_epsilon=1e-6).te_recipe()
    assert current["kwargs"] == {"fp8_format": "E4M3", "use_power_2_scales": True, **PINNED}
    assert current["mmparams"] == {"fp8_gemm_fprop": False, "fp8_gemm_dgrad": True, "fp8_gemm_wgrad": True}
    assert current["qparams"] == {"power_2_scale": True, "amax_epsilon": 1e-6}
    block = Float8BlockScaling(fp8_format="hybrid", x_block_scaling_dim=2, w_block_scaling_dim=1).te_recipe()
    assert block["kwargs"] == {
        "fp8_format": "HYBRID",
        "x_block_scaling_dim": 2,
        "w_block_scaling_dim": 1,
        "grad_block_scaling_dim": 1,
        "use_f32_scales": False,
        **PINNED,
    }
    assert block["qparams"] == {"power_2_scale": True, "amax_epsilon": 0.0}  # fp8lab's block scales are powers of 2
    assert MXFP8BlockScaling(enable_2d_quantization=True).te_recipe()["kwargs"] == {
        "fp8_format": "E4M3",
        "margin": 0,
        "enable_2d_quantization": True,
        **PINNED,
    }


def _te_shaped_meta(history_len: int) -> dict:
    """Tensors shaped as TE's DelayedScalingRecipeState: fwd [H, 3] / [3], bwd [H, 2] / [2]."""
    fwd_h = torch.arange(history_len * 3, dtype=torch.float32).reshape(history_len, 3) + 1
    bwd_h = -torch.arange(history_len * 2, dtype=torch.float32).reshape(history_len, 2) - 1
    return {
        "scaling_fwd": (fwd_h, torch.tensor([10.0, 20.0, 30.0])),
        "scaling_bwd": (bwd_h, torch.tensor([40.0, 50.0])),
    }


def test_te_meta_columns_map_to_input_weight_grad_output():
    meta = _te_shaped_meta(5)
    history, scale = te_meta_to_fp8lab(meta)
    (fwd_h, _), (bwd_h, _) = meta["scaling_fwd"], meta["scaling_bwd"]
    assert torch.equal(history, torch.stack([fwd_h[:, 0], fwd_h[:, 1], bwd_h[:, 0]], dim=1))
    assert torch.equal(scale, torch.tensor([10.0, 20.0, 40.0]))
    history.zero_()  # a new tensor: TE's state is untouched
    assert fwd_h.min() == 1


def test_copy_into_te_meta_is_in_place_and_round_trips():
    meta = _te_shaped_meta(4)
    before = {key: (h.clone(), s.clone()) for key, (h, s) in meta.items()}
    pointers = [t.data_ptr() for pair in meta.values() for t in pair]
    history = torch.rand(4, 3) * 100
    scale = torch.tensor([448.0, 224.0, 57344.0])
    copy_into_te_meta_(history, scale, meta)
    assert pointers == [t.data_ptr() for pair in meta.values() for t in pair]  # TE's buffers keep them
    back_history, back_scale = te_meta_to_fp8lab(meta)
    assert torch.equal(back_history, history) and torch.equal(back_scale, scale)
    # TE's slots fp8lab does not use (forward output, grad_input) are left alone
    assert torch.equal(meta["scaling_fwd"][0][:, 2], before["scaling_fwd"][0][:, 2])
    assert torch.equal(meta["scaling_fwd"][1][2], before["scaling_fwd"][1][2])
    assert torch.equal(meta["scaling_bwd"][0][:, 1], before["scaling_bwd"][0][:, 1])
    assert torch.equal(meta["scaling_bwd"][1][1], before["scaling_bwd"][1][1])


def test_history_length_mismatch_names_the_field():
    with pytest.raises(ValueError, match="amax_history_len differs: fp8lab state has 3 rows, TE's scaling_fwd has 4"):
        copy_into_te_meta_(torch.zeros(3, 3), torch.ones(3), _te_shaped_meta(4))


def test_layers_that_never_ran_on_te_keep_their_state():
    model = nn.Sequential(Linear(16, 16, fp8=FP8Options(backend="emulated")), nn.GELU())
    state = model[0].fp8_state
    state.amax_history.fill_(3.0)
    sync_te_scaling(model)
    sync_from_te(model[0])
    assert torch.equal(state.amax_history, torch.full_like(state.amax_history, 3.0))


@pytest.mark.skipif(TE_IMPORTABLE, reason="checks the message shown when Transformer Engine is absent")
def test_missing_te_says_what_to_install():
    with pytest.raises(BackendUnavailable, match=r"pip install 'fp8lab\[te\]'"):
        te_recipe(DelayedScaling())
