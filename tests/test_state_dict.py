"""The state_dict contract of fp8lab.Linear: keys, bit-exact round trip, clear load errors."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import fp8lab
from fp8lab import FP8Options
from fp8lab.scaling.delayed import DelayedScaling

H = 16


def _trained_layer(seed: int, history_len: int = H) -> fp8lab.Linear:
    """A layer with non-trivial weights, history and scales after a few steps."""
    torch.manual_seed(seed)
    layer = fp8lab.Linear(
        32, 16, fp8=FP8Options(scaling=DelayedScaling(amax_history_len=history_len), fallback="emulated")
    )
    for step in range(3):
        x = torch.randn(4, 32) * (step + 1)
        layer(x).square().sum().backward()
        fp8lab.update_scales(layer)
    return layer


def test_state_dict_keys():
    sd = fp8lab.Linear(32, 16).state_dict()
    assert list(sd) == ["weight", "bias", "fp8_state.amax_history", "fp8_state.scale"]
    assert sd["fp8_state.amax_history"].shape == (1024, 3)
    assert sd["fp8_state.scale"].shape == (3,)
    no_bias = fp8lab.Linear(32, 16, bias=False).state_dict()
    assert list(no_bias) == ["weight", "fp8_state.amax_history", "fp8_state.scale"]


def test_round_trip_is_bit_exact_with_weights_only_load():
    src = _trained_layer(seed=0)
    torch.manual_seed(1)
    dst = fp8lab.Linear(
        32, 16, fp8=FP8Options(scaling=DelayedScaling(amax_history_len=H), fallback="emulated")
    )  # fresh
    src_sd = src.state_dict()
    for key, value in dst.state_dict().items():
        assert not torch.equal(value, src_sd[key]), f"{key} already equal before loading"

    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    dst.load_state_dict(loaded)

    for key, value in dst.state_dict().items():
        assert torch.equal(value, src_sd[key]), key
    src.eval()
    dst.eval()
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


def test_loading_without_scaling_state_raises_even_when_not_strict():
    src = _trained_layer(seed=0)
    weights_only = {k: v for k, v in src.state_dict().items() if not k.startswith("fp8_state.")}
    for strict in (True, False):
        with pytest.raises(KeyError, match="fp8_state.amax_history"):
            fp8lab.Linear(32, 16).load_state_dict(weights_only, strict=strict)
    no_scale = dict(src.state_dict())
    del no_scale["fp8_state.scale"]
    with pytest.raises(KeyError, match="fp8_state.scale"):
        fp8lab.Linear(32, 16, fp8=FP8Options(scaling=DelayedScaling(amax_history_len=H))).load_state_dict(
            no_scale, strict=False
        )


def test_nested_prefix_is_named_in_the_error():
    sd = nn.Sequential(nn.Linear(32, 16)).state_dict()  # a plain-torch checkpoint
    model = nn.Sequential(fp8lab.Linear(32, 16))
    with pytest.raises(KeyError, match=r"0\.fp8_state\.amax_history"):
        model.load_state_dict(sd, strict=False)


def test_wrong_history_length_raises_value_error_naming_the_shapes():
    sd = _trained_layer(seed=0, history_len=H).state_dict()
    dst = fp8lab.Linear(32, 16, fp8=FP8Options(scaling=DelayedScaling(amax_history_len=8), fallback="emulated"))
    before = dst.fp8_state.amax_history.clone()
    with pytest.raises(ValueError, match=r"\(16, 3\).*\(8, 3\)"):
        dst.load_state_dict(sd)
    assert torch.equal(dst.fp8_state.amax_history, before)
