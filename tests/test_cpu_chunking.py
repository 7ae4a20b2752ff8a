"""CPU work done in slices of about fp8lab.quantize.CPU_CHUNK elements (to keep temporaries
small) must give the same numbers as the whole-tensor op.

- the grid cast: exact, ``torch.equal`` against ``cast_to_fp8(...).float()``;
- the bias gradient (gemm.qlinear._bias_grad): a float32 sum added in another order, so exact
  where every partial sum is exact (small integers), and otherwise within the float32
  summation bound n * 2^-24 * sum|g| of a float64 reference.
"""

import pytest
import torch

import fp8lab.quantize.tensor as quantize
from fp8lab.formats import E4M3, E5M2
from fp8lab.gemm.qlinear import _bias_grad


def _spread(shape, gen):
    x = torch.randn(shape, generator=gen)
    return x * torch.exp2(torch.randint(-30, 31, shape, generator=gen).float())


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_chunk_cast_equals_real_cast(fmt, dtype):
    gen = torch.Generator().manual_seed(3)
    x = _spread((2 * quantize.CPU_CHUNK + 3,), gen).to(dtype)  # two full chunks and a tail
    x[5], x[-1] = float("inf"), -1e30  # saturation in the first and the last chunk
    for scale in (1 / 3, 37.5):
        s = torch.tensor(scale)
        grid = quantize.cast_to_fp8_grid(x, s, fmt)
        assert grid.dtype == torch.bfloat16 and grid.shape == x.shape
        assert torch.equal(grid.float(), quantize.cast_to_fp8(x, s, fmt).float())


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunk_boundaries_and_layouts(monkeypatch, chunk):
    gen = torch.Generator().manual_seed(4)
    x = _spread((50, 37), gen).t()  # non-contiguous, 1850 elements: many chunks and a tail
    s = torch.tensor(2.5)
    expected = quantize.cast_to_fp8(x, s, E4M3).float()
    monkeypatch.setattr(quantize, "CPU_CHUNK", chunk)
    grid = quantize.cast_to_fp8_grid(x, s, E4M3)
    assert grid.shape == (37, 50) and torch.equal(grid.float(), expected)
    assert quantize.cast_to_fp8_grid(torch.empty(0, 4), s, E4M3).shape == (0, 4)


@pytest.mark.parametrize("shape", [(2048, 3072), (3000, 7), (0, 5), (1, 1)])
def test_bias_grad_in_slices(shape):
    gen = torch.Generator().manual_seed(5)
    ints = torch.randint(-50, 51, shape, generator=gen).to(torch.bfloat16)  # exact sums
    exact = ints.double().sum(dim=0)
    got = _bias_grad(ints)
    assert got.dtype == torch.float32 and torch.equal(got.double(), exact)

    g = torch.randn(shape, generator=gen).to(torch.bfloat16)
    ref = g.double().sum(dim=0)
    bound = shape[0] * 2.0**-24 * g.double().abs().sum(dim=0)
    assert ((_bias_grad(g).double() - ref).abs() <= bound).all()
