"""FP8Options: the one frozen object that carries a layer's scaling, backend and fallback."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import fp8lab
from fp8lab import DelayedScaling, FP8Options, GPTConfig


def test_defaults_are_te_scaling_auto_backend_bf16_fallback():
    options = FP8Options()
    assert (options.scaling, options.backend, options.fallback) == (DelayedScaling(), "auto", "bf16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.backend = "bf16"
    with pytest.raises(TypeError):
        FP8Options(DelayedScaling())  # keyword-only


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(backend="fp8"), r"^backend must be one of \('auto', 'te', 'scaled_mm', 'emulated', 'bf16'\), got 'fp8'"),
        (dict(fallback="fp32"), r"^fallback must be one of \('bf16', 'emulated'\), got 'fp32'"),
        (
            dict(scaling={"margin": 1}),
            r"^scaling must be one of the scaling types \('DelayedScaling', "
            r"'Float8CurrentScaling', 'Float8BlockScaling', 'MXFP8BlockScaling', 'Float8RowwiseScaling', "
            r"'NVFP4BlockScaling'\)",
        ),
    ],
)
def test_a_bad_field_is_named_with_the_allowed_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FP8Options(**kwargs)


def test_every_layer_takes_one_fp8_keyword():
    options = FP8Options(scaling=DelayedScaling(amax_history_len=4), backend="emulated")
    layers = [
        fp8lab.Linear(16, 16, fp8=options),
        fp8lab.LayerNormLinear(16, 16, fp8=options).linear,
        fp8lab.LayerNormMLP(16, 32, fp8=options).fc2,
        fp8lab.MultiheadAttention(16, 2, fp8=options).qkv,
        fp8lab.TransformerBlock(16, 32, 2, fp8=options).mlp.fc1,
        fp8lab.convert(nn.Linear(16, 16), fp8=options),
    ]
    for layer in layers:
        assert layer.fp8 is options
        assert layer.fp8_state.amax_history.shape == (4, 3)
        assert layer.plan().backend == "emulated"
    assert fp8lab.Linear(16, 16).fp8 == FP8Options()


def test_from_preset_folds_shorthands_into_fp8():
    scaling = DelayedScaling(margin=1)
    config = GPTConfig.from_preset("tiny", scaling=scaling, backend="bf16")
    assert config.fp8 == FP8Options(scaling=scaling, backend="bf16")
    base = FP8Options(fallback="emulated")
    assert GPTConfig.from_preset("tiny", fp8=base, backend="emulated").fp8 == dataclasses.replace(
        base, backend="emulated"
    )
    assert GPTConfig.from_preset("tiny").fp8 == FP8Options()
    model = fp8lab.GPT.from_preset("tiny", num_layers=1, backend="emulated")
    assert all(m.fp8 is model.config.fp8 for m in model.modules() if isinstance(m, fp8lab.Linear))
    with pytest.raises(ValueError, match="backend must be one of"):
        GPTConfig.from_preset("tiny", backend="fp8")


def test_legacy_emulate_spelling_warns_and_means_emulated():
    """External code still writes fallback="emulate" (DESIGN.md's from_preset example):
    accepted, normalised to "emulated", with a DeprecationWarning naming the new spelling."""
    from fp8lab.run.config import Variant

    with pytest.warns(DeprecationWarning, match="fallback='emulate' is deprecated; use fallback='emulated'"):
        options = FP8Options(fallback="emulate")
    assert options == FP8Options(fallback="emulated")
    with pytest.warns(DeprecationWarning, match="use fallback='emulated'"):
        model = fp8lab.GPT.from_preset("tiny", fallback="emulate")
    assert model.config.fp8.fallback == "emulated" and model.blocks[0].mlp.fc1.plan().backend == "emulated"
    with pytest.warns(DeprecationWarning, match="use fallback='emulated'"):
        variant = Variant(name="fp8", fallback="emulate")
    assert variant.fallback == "emulated" and variant.fp8 == FP8Options(fallback="emulated")


def test_the_scaling_decides_whether_a_layer_has_state():
    """DelayedScaling keeps persistent state; a scaling without it (current or block
    scaling, later) yields ``fp8_state is None`` through the same constructors."""
    layer = fp8lab.Linear(16, 16)
    assert isinstance(layer.fp8_state, fp8lab.ScalingState) and layer.fp8_state.scaling is layer.fp8.scaling

    class Stateless(DelayedScaling):  # stands in for a scaling with no persistent state
        def new_state(self, device=None):
            return None

    options = FP8Options(scaling=Stateless(), backend="bf16")
    for stateless in (fp8lab.Linear(16, 16, fp8=options), fp8lab.convert(nn.Linear(16, 16), fp8=options)):
        assert stateless.fp8_state is None
        assert list(stateless.state_dict()) == ["weight", "bias"]
        stateless(torch.randn(2, 16)).sum().backward()
        fp8lab.update_scales(stateless)  # nothing to update
