"""The scaled_mm backend against torch's own ``_scaled_mm`` contract, on CPU.

``torch._scaled_mm`` on "meta" tensors runs torch's ``meta_scaled_mm`` with the CUDA
checks (A row-major, B column-major, K and both dims of B multiples of 16, fp32 scalar
scales), so fprop, dgrad and wgrad operands are checked exactly as cuBLASLt gets them,
without a GPU and without computing anything. Numerics are checked on GPU
(tests/test_gpu_backends.py).
"""

from __future__ import annotations

import pytest
import torch

from fp8lab.formats import E4M3, E5M2
from fp8lab.gemm.backends.scaled_mm import ScaledMMBackend, _a_operand, _b_operand
from fp8lab.gemm.qlinear import _QuantizedLinear  # quantized_linear's torch.autocast has no "meta"
from fp8lab.quantize.tensor import cast_to_fp8
from fp8lab.scaling.delayed import DelayedScaling
from fp8lab.scaling.state import ScalingState

META = torch.device("meta")


@pytest.mark.parametrize("tokens", [(1, 1), (3, 7), (2, 16)], ids=["M1", "M21", "M32"])
@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_fprop_dgrad_wgrad_meet_the_scaled_mm_contract(tokens, fmt):
    state = ScalingState(DelayedScaling(fp8_format=fmt, amax_history_len=4), device=META)
    x = torch.empty(*tokens, 64, device=META, requires_grad=True)  # (B, T, K)
    w = torch.empty(48, 64, device=META, requires_grad=True)  # (N, K)
    b = torch.empty(48, device=META, requires_grad=True)
    y = _QuantizedLinear.apply(x, w, b, state.scaling, state, ScaledMMBackend(), torch.bfloat16, True, None)
    assert (y.shape, y.dtype) == ((*tokens, 48), torch.bfloat16)
    y.backward(torch.empty_like(y))  # dgrad: g @ w; wgrad: g^T @ x, inner dim = B*T
    assert (x.grad.shape, x.grad.dtype) == (x.shape, torch.float32)
    assert (w.grad.shape, w.grad.dtype) == (w.shape, torch.float32)
    assert b.grad.shape == b.shape


def _fp8(shape, fmt, seed):
    g = torch.Generator().manual_seed(seed)
    return cast_to_fp8(torch.randn(*shape, generator=g), torch.tensor(8.0), fmt)


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_a_operand_is_row_major_and_zero_padded_exactly(fmt):
    g = _fp8((21, 48), fmt, 0)  # (M, N) grad_out; the wgrad's A is g^T, (N, M), column-major
    a = _a_operand(g.t(), 32)
    assert a.shape == (48, 32) and a.stride() == (32, 1) and a.dtype == fmt.dtype
    assert torch.equal(a[:, :21].view(torch.uint8), g.t().contiguous().view(torch.uint8))
    assert torch.equal(a[:, 21:].view(torch.uint8), torch.zeros(48, 11, dtype=torch.uint8))


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_b_operand_is_col_major_and_zero_padded_exactly(fmt):
    x = _fp8((21, 64), fmt, 1)  # (M, K): the wgrad's B, row-major as saved by the forward
    b = _b_operand(x, 32)
    assert b.shape == (32, 64) and b.stride() == (1, 32) and b.dtype == fmt.dtype
    assert torch.equal(b[:21].view(torch.uint8), x.view(torch.uint8))
    assert torch.equal(b[21:].view(torch.uint8), torch.zeros(11, 64, dtype=torch.uint8))


def test_operands_already_in_layout_are_not_copied():
    x = _fp8((32, 64), E4M3, 2)
    assert _a_operand(x, 64) is x
    w_t = _fp8((48, 64), E4M3, 3).t()  # the fprop's B = w^T: column-major view of w
    assert _b_operand(w_t, 64) is w_t
