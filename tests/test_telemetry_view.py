"""Telemetry reads layers through ``layer.scaling_view()``; its slot lives on the layer.

The scaling state holds only what the scaling update needs (history, scale, fp8_max,
fault counters); cast statistics go to the layer's TelemetrySlot, and only while the
collector has armed it.
"""

from __future__ import annotations

import ast
import inspect

import torch

import fp8lab
import fp8lab.telemetry.collector as collector_module
from fp8lab import FP8Options
from fp8lab.quantize.tensor import STAT_NAMES
from fp8lab.telemetry.collector import ScalingCollector


def _step(layer: fp8lab.Linear, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 32, generator=gen, requires_grad=True)
    layer(x).backward(torch.randn(4, layer.out_features, generator=gen))  # not exact in FP8


def test_collector_imports_no_backend():
    tree = ast.parse(inspect.getsource(collector_module))
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not [m for m in modules if m and m.startswith("fp8lab.gemm")], modules


def test_scaling_state_holds_no_telemetry_slot():
    state = fp8lab.Linear(32, 16).fp8_state
    assert dict(state.named_buffers()).keys() == {"amax_history", "scale", "fp8_max", "nonfinite", "faults"}
    assert not hasattr(state, "stats") and not hasattr(state, "collect_stats")


def test_cast_stats_are_written_only_while_armed():
    torch.manual_seed(0)
    layer = fp8lab.Linear(32, 16, fp8=FP8Options(backend="emulated"))
    _step(layer, 1)
    assert layer.telemetry.cast_stats is None  # never armed: nothing computed
    assert torch.isnan(layer.scaling_view().cast_stats).all()

    layer.telemetry.arm(layer.weight.device)
    _step(layer, 2)  # forward (input, weight) and backward (grad_output)
    layer.telemetry.disarm()
    stats = layer.telemetry.cast_stats.clone()
    assert stats.shape == (3, len(STAT_NAMES)) and torch.isfinite(stats).all()
    assert (stats[:, STAT_NAMES.index("sqnr_db")] > 20).all()

    _step(layer, 3)  # disarmed: the slot keeps the armed step's values
    assert torch.equal(layer.telemetry.cast_stats, stats)


def test_view_is_the_live_state_and_bf16_layers_have_none():
    layer = fp8lab.Linear(32, 16, fp8=FP8Options(backend="emulated"))
    view, state = layer.scaling_view(), layer.fp8_state
    assert view.amax_history is state.amax_history and view.scale is state.scale and view.faults is state.faults
    assert fp8lab.Linear(32, 16, fp8=FP8Options(backend="bf16")).scaling_view() is None


def test_collector_arms_snapshots_and_disarms():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        fp8lab.Linear(32, 32, fp8=FP8Options(backend="emulated")), fp8lab.Linear(32, 16, fp8=FP8Options(backend="bf16"))
    )
    collector = ScalingCollector(model)
    assert collector.names == ("0",)  # FP8 layers only
    collector.arm()
    assert model[0].telemetry.armed
    model(torch.randn(4, 32)).backward(torch.randn(4, 16))
    snapshot = collector.snapshot()
    assert not model[0].telemetry.armed
    fp8lab.update_scales(model)
    stats = collector.read(snapshot)
    assert stats.values["amax"][0].min() > 0 and (stats.values["sqnr_db"][0] > 20).all()
