"""fp8lab.Linear on CPU: emulated FP8 against a float64 reference, dtypes, eval, BF16 backend.

Tolerances (SQNR in dB against ``x.double() @ w.double().T + b``, seeded Gaussian data,
measured after one warm-up step + update_scales so the scales come from real amaxes):
output >= 20 dB, input and weight gradients >= 17 dB; the bias gradient is taken before
the cast (as Transformer Engine does), so it must be >= 60 dB.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fp8lab
from fp8lab import FP8Options
from fp8lab.formats import Role
from tests.helpers import sqnr_db

B, T, K, N = 4, 32, 256, 128


def _emulated(k: int = K, n: int = N, **kw) -> fp8lab.Linear:
    return fp8lab.Linear(k, n, fp8=FP8Options(fallback="emulated"), **kw)


def _step(layer, x, grad_out):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(grad_out)
    return y


def test_backend_plans_on_cpu():
    assert _emulated().plan().backend == "emulated"
    assert fp8lab.Linear(K, N).plan().backend == "bf16"  # default fallback on CPU
    assert fp8lab.Linear(K, N, fp8=FP8Options(backend="bf16")).plan().backend == "bf16"


def test_emulated_linear_sqnr_against_float64():
    torch.manual_seed(0)
    layer = _emulated()
    x_warm = torch.randn(B, T, K, requires_grad=True)
    _step(layer, x_warm, torch.randn(B, T, N).to(torch.bfloat16))
    fp8lab.update_scales(layer)
    assert not torch.equal(layer.fp8_state.scale, torch.ones(3))  # realistic scales now
    layer.zero_grad()

    x = torch.randn(B, T, K, requires_grad=True)
    g = torch.randn(B, T, N).to(torch.bfloat16)  # (B, T, N)
    y = _step(layer, x, g)

    w64, b64, x64, g64 = layer.weight.double(), layer.bias.double(), x.double(), g.double()
    y_ref = x64 @ w64.T + b64  # (B, T, N)
    grad_x_ref = g64 @ w64  # (B, T, K)
    grad_w_ref = g64.reshape(-1, N).T @ x64.reshape(-1, K)  # (N, K)
    grad_b_ref = g64.sum(dim=(0, 1))  # (N,)

    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    assert layer.weight.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32
    assert sqnr_db(y_ref, y) >= 20.0
    assert sqnr_db(grad_x_ref, x.grad) >= 17.0
    assert sqnr_db(grad_w_ref, layer.weight.grad) >= 17.0
    assert sqnr_db(grad_b_ref, layer.bias.grad) >= 60.0


@pytest.mark.parametrize("in_dtype", (torch.float32, torch.bfloat16))
def test_output_dtype_is_autocasts_or_the_inputs(in_dtype):
    layer = _emulated(64, 32)
    x = torch.randn(2, 64).to(in_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    assert layer(x).dtype == in_dtype
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad.dtype == in_dtype


def test_eval_mode_records_no_amax():
    torch.manual_seed(1)
    layer = _emulated(64, 32)
    layer(torch.randn(8, 64)).sum().backward()
    fp8lab.update_scales(layer)
    state = layer.fp8_state
    history, scale = state.amax_history.clone(), state.scale.clone()
    assert history.abs().sum().item() > 0  # a non-trivial state to compare against

    layer.eval()
    x = torch.randn(8, 64) * 100  # amax far above anything recorded so far
    with torch.no_grad():
        layer(x)
    assert torch.equal(state.amax_history, history)
    assert torch.equal(state.scale, scale)
    assert state.forwards_since_update == 0

    layer.train()  # the same forward in training mode does record
    with torch.no_grad():
        layer(x)
    assert state.amax_history[0, Role.INPUT].item() == x.abs().max().item()
    assert state.forwards_since_update == 1


def test_bf16_backend_records_nothing_and_is_the_bf16_hardware_model():
    """A BF16 layer: operands rounded to bf16, fp32 accumulation, bias added in fp32, one
    rounding to the output dtype (bf16 under autocast; fp32 without, at fp32 precision)."""
    torch.manual_seed(2)
    layer = fp8lab.Linear(64, 32, fp8=FP8Options(backend="bf16"))
    x = torch.randn(4, 8, 64, requires_grad=True)
    acc = x.bfloat16().double() @ layer.weight.bfloat16().double().T  # exact products and sum
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_autocast = F.linear(x, layer.weight, layer.bias)  # torch's own bf16 linear
    ref = (acc.float() + layer.bias.bfloat16().float()).bfloat16()
    assert y.dtype == torch.bfloat16
    assert (y == ref).float().mean().item() >= 0.99
    assert (y == y_autocast).float().mean().item() >= 0.99
    y.float().sum().backward()
    assert layer.weight.grad is not None and x.grad is not None

    y_plain = layer(x)  # no autocast: bf16 operands, an fp32 output at fp32 precision
    ref_plain = acc + layer.bias.double()
    assert y_plain.dtype == torch.float32
    assert (y_plain.double() - ref_plain).abs().max().item() <= 1e-6 * ref_plain.abs().max().item()

    state = layer.fp8_state
    assert torch.equal(state.amax_history, torch.zeros_like(state.amax_history))
    assert torch.equal(state.scale, torch.ones(3))
