"""Casts into FP8: bit-exact against torch's float8 dtypes, saturating, ties to even.

Tolerances: ``cast_to_fp8`` is compared bit for bit (``.view(torch.uint8)``) and
``cast_to_fp8_grid`` value for value (``torch.equal`` after ``.float()``; -0 == +0). The
expected rounding of every midpoint between FP8 neighbours is derived independently from
the bit codes (ties go to the even code). SQNR against float64: E4M3 >= 28 dB, E5M2 >= 22 dB
on Gaussian data with scale = fp8_max / amax.
"""

from __future__ import annotations

import math

import pytest
import torch

from fp8lab.formats import E4M3, E5M2
from fp8lab.quantize.tensor import amaxes_of, cast_stats, cast_to_fp8, cast_to_fp8_grid
from tests.helpers import sqnr_db

FORMATS = pytest.mark.parametrize("fmt", (E4M3, E5M2), ids=("e4m3", "e5m2"))
IN_DTYPES = pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
ONE = torch.tensor(1.0)


def reference_cast(x: torch.Tensor, scale: torch.Tensor, fmt) -> torch.Tensor:
    """(x * scale).clamp(-max, max).to(fp8), the product formed in float32."""
    return (x.float() * scale).clamp(-fmt.max, fmt.max).to(fmt.dtype)


def positive_codes(fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes 0..k of the finite non-negative FP8 values, and the values (increasing)."""
    codes = torch.arange(128, dtype=torch.uint8)
    values = codes.view(fmt.dtype).float()
    finite = torch.isfinite(values)
    return codes[finite], values[finite]


def test_format_constants():
    assert (E4M3.max, E5M2.max) == (448.0, 57344.0)
    assert (E4M3.min_normal, E5M2.min_normal) == (2.0**-6, 2.0**-14)


@FORMATS
@IN_DTYPES
def test_every_representable_value_is_kept(fmt, dtype):
    all_values = torch.arange(256, dtype=torch.uint8).view(fmt.dtype).float()
    values = all_values[torch.isfinite(all_values)]
    x = values.to(dtype)
    assert torch.equal(x.float(), values)  # exact in bf16 too
    assert torch.equal(cast_to_fp8(x, ONE, fmt).float(), values)
    assert torch.equal(cast_to_fp8_grid(x, ONE, fmt).float(), values)
    assert cast_to_fp8_grid(x, ONE, fmt).dtype == torch.bfloat16


@FORMATS
@IN_DTYPES
def test_midpoints_round_to_even_code(fmt, dtype):
    codes, values = positive_codes(fmt)
    assert torch.equal(codes.long(), torch.arange(len(codes)))  # increasing, no gaps
    mids = (values[:-1].double() + values[1:].double()) / 2
    even_lower = codes[:-1] % 2 == 0
    expected_codes = torch.where(even_lower, codes[:-1], codes[1:])
    expected_values = torch.where(even_lower, values[:-1], values[1:])
    x = torch.cat([mids, -mids]).to(dtype)
    assert torch.equal(x.double(), torch.cat([mids, -mids]))  # midpoints are exact inputs

    out = cast_to_fp8(x, ONE, fmt)
    assert torch.equal(out.view(torch.uint8), torch.cat([expected_codes, expected_codes | 0x80]))
    grid = cast_to_fp8_grid(x, ONE, fmt).float()
    assert torch.equal(grid, torch.cat([expected_values, -expected_values]))


@FORMATS
def test_one_float32_ulp_off_a_midpoint_rounds_to_the_nearer_neighbour(fmt):
    codes, values = positive_codes(fmt)
    mids = ((values[:-1].double() + values[1:].double()) / 2).float()
    above = torch.nextafter(mids, torch.tensor(math.inf))
    below = torch.nextafter(mids, torch.tensor(0.0))
    assert torch.equal(cast_to_fp8(above, ONE, fmt).view(torch.uint8), codes[1:])
    assert torch.equal(cast_to_fp8(below, ONE, fmt).view(torch.uint8), codes[:-1])
    assert torch.equal(cast_to_fp8_grid(above, ONE, fmt).float(), values[1:])
    assert torch.equal(cast_to_fp8_grid(below, ONE, fmt).float(), values[:-1])


@pytest.mark.parametrize(
    "x, expected",
    [(1.0625, 1.0), (17.0, 16.0), (-17.0, -16.0), (1.1875, 1.25), (0.0029296875, 0.00390625)],
)
def test_e4m3_rounding_cases(x, expected):
    # 1.0625: tie between 1.0 and 1.125 -> 1.0; 17: tie between 16 and 18 -> 16;
    # 1.1875: tie between 1.125 and 1.25 -> 1.25; 3*2^-10: subnormal tie 2^-9 | 2^-8 -> 2^-8
    xt = torch.tensor([x])
    assert cast_to_fp8(xt, ONE, E4M3).float().item() == expected
    assert cast_to_fp8_grid(xt, ONE, E4M3).float().item() == expected


@FORMATS
@IN_DTYPES
def test_grid_equals_real_cast_over_many_magnitudes_and_scales(fmt, dtype):
    gen = torch.Generator().manual_seed(7)
    n = 1 << 16
    exponents = torch.randint(-40, 41, (n,), generator=gen).float()
    x = (torch.randn(n, generator=gen) * torch.exp2(exponents)).to(dtype)
    amax = x.float().abs().max()
    for scale in (2.0**-20, 1 / 3, 1.0, 3.7, fmt.max / amax.item(), 2.0**20, 1e30):
        s = torch.tensor(scale, dtype=torch.float32)
        real = cast_to_fp8(x, s, fmt)
        assert torch.equal(real.view(torch.uint8), reference_cast(x, s, fmt).view(torch.uint8))
        grid = cast_to_fp8_grid(x, s, fmt)
        assert torch.equal(grid.float(), real.float()), f"scale={scale}"


@FORMATS
@IN_DTYPES
def test_cast_to_fp8_is_bit_exact_against_clamp_then_convert(fmt, dtype):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4096, generator=gen) * 300).to(dtype)
    for s in (torch.tensor(0.5), torch.tensor(1.0), torch.tensor(fmt.max / 7.0)):
        expected = (x.float() * s).clamp(-fmt.max, fmt.max).to(fmt.dtype)
        out = cast_to_fp8(x, s, fmt)
        assert out.dtype == fmt.dtype
        assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))


@FORMATS
@IN_DTYPES
def test_saturates_to_max_never_nan(fmt, dtype):
    big = torch.tensor([1e30, -1e30, math.inf, -math.inf, fmt.max + 1, -1e5, 1e38, fmt.max * 1.2]).to(dtype)
    signs = torch.sign(big.float())
    for s in (torch.tensor(1.0), torch.tensor(2.0**20)):  # 1e38 * 2^20 overflows float32
        out = cast_to_fp8(big, s, fmt).float()
        grid = cast_to_fp8_grid(big, s, fmt).float()
        assert not out.isnan().any() and not grid.isnan().any()
        assert torch.equal(out, signs * fmt.max)
        assert torch.equal(grid, signs * fmt.max)


@FORMATS
@IN_DTYPES
def test_nan_stays_nan(fmt, dtype):
    x = torch.tensor([1.0, math.nan, -2.0]).to(dtype)
    for out in (cast_to_fp8(x, ONE, fmt).float(), cast_to_fp8_grid(x, ONE, fmt).float()):
        assert torch.equal(out.isnan(), torch.tensor([False, True, False]))
        assert out[0].item() == 1.0 and out[2].item() == -2.0


def _amax_both_ways(x):
    """amaxes_of(x) on the tensor and on a non-contiguous view of it."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype) if x.dim() else x
    if x.dim():
        wide[..., ::2] = x
        return amaxes_of(x), amaxes_of(wide[..., ::2])
    return amaxes_of(x), amaxes_of(x)


@IN_DTYPES
def test_amaxes_are_max_abs_with_nan_ignored_as_te_takes_them(dtype):
    """[0] the raw amax (NaN propagates), [1] Transformer Engine's (fmaxf: NaN elements
    ignored, inf counted), over several CPU chunks, contiguous or not."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 120_000, generator=gen) * 10).to(dtype)  # > 1 CPU chunk
    x[1, 100_000] = -1536.0  # the extreme is negative (exact in bf16), in the second chunk
    for out in _amax_both_ways(x):
        assert out.dtype == torch.float32 and out.tolist() == [1536.0, 1536.0]
    for out in _amax_both_ways(-x.abs()):  # all negative
        assert out.tolist() == [1536.0, 1536.0]
    x[2, 3] = math.nan
    for out in _amax_both_ways(x):
        assert math.isnan(out[0].item()) and out[1].item() == 1536.0
    x[0, 7] = -math.inf
    for out in _amax_both_ways(x):
        assert math.isnan(out[0].item()) and out[1].item() == math.inf
    x[2, 3] = 0.0
    for out in _amax_both_ways(x):
        assert out.tolist() == [math.inf, math.inf]
    for out in _amax_both_ways(torch.full((5,), math.nan, dtype=dtype)):  # fmaxf(0, nan) = 0
        assert math.isnan(out[0].item()) and out[1].item() == 0.0
    for out in _amax_both_ways(torch.empty(0, 3, dtype=dtype)):
        assert out.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
@IN_DTYPES
def test_grid_cast_to_float32_equals_bf16(fmt, dtype):
    """The fp32 GEMM path holds the same FP8 values in float32."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(300_001, generator=gen) * 300).to(dtype)
    x[::997] = math.nan
    s = torch.tensor(0.7)
    as_bf16 = cast_to_fp8_grid(x, s, fmt)
    as_f32 = cast_to_fp8_grid(x, s, fmt, dtype=torch.float32)
    assert as_f32.dtype == torch.float32
    assert torch.equal(as_f32.isnan(), as_bf16.isnan())
    assert torch.equal(as_f32.nan_to_num(0.0), as_bf16.float().nan_to_num(0.0))


@pytest.mark.parametrize("scale", (1.0, 2.0, 0.25))
def test_cast_stats_overflow_and_underflow_percentages_are_exact(scale):
    # 64 elements (100/64 is exact in float32): 5 overflow, 9 underflow, 3 exact zeros.
    over = [1000.0, -500.0, 449.0, 1e6, -449.5]
    under = [1e-4, -3e-4, 2.0**-11, -(2.0**-10), 2.0**-12, 1e-6, -1e-9, 5e-4, -9.7e-4]
    zeros = [0.0, 0.0, -0.0]
    rest = [(-1.0) ** i * (0.5 + 3.1 * i) for i in range(64 - len(over) - len(under) - len(zeros))]
    x_scaled = torch.tensor(over + under + zeros + rest)
    x = x_scaled / scale  # a power of two: exact
    s = torch.tensor(scale)
    for q in (cast_to_fp8(x, s, E4M3), cast_to_fp8_grid(x, s, E4M3)):
        stats = cast_stats(x, q, s, E4M3)
        assert stats.dtype == torch.float32 and stats.shape == (3,)
        assert stats[0].item() == 5 * 100 / 64  # 7.8125
        assert stats[1].item() == 9 * 100 / 64  # 14.0625
        expected_sqnr = sqnr_db(x, q.float() / s)
        assert abs(stats[2].item() - expected_sqnr) < 1e-3 * abs(expected_sqnr)


@pytest.mark.parametrize("fmt, min_db", [(E4M3, 28.0), (E5M2, 22.0)], ids=("e4m3", "e5m2"))
@IN_DTYPES
def test_cast_sqnr_on_gaussian_data(fmt, min_db, dtype):
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(1 << 16, generator=gen).to(dtype)
    scale = torch.tensor(fmt.max) / amaxes_of(x)[1]
    ref = x.double()
    real = sqnr_db(ref, cast_to_fp8(x, scale, fmt).double() / scale.double())
    grid = sqnr_db(ref, cast_to_fp8_grid(x, scale, fmt).double() / scale.double())
    assert real >= min_db, f"{fmt.name} cast SQNR {real:.2f} dB < {min_db}"
    assert grid == real


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_cast_stats_match_a_float64_reference_over_several_chunks(fmt):
    """The chunked, scaled-domain statistics equal plain float64 formulas: percentages
    exactly (they are counts), SQNR to 0.01 dB."""
    torch.manual_seed(3)
    x = torch.randn(3, 200_000, dtype=torch.bfloat16) * 4  # > 2 CPU chunks
    x[0, :1000] = 0.0
    x[1, :1000] = 1e-10  # x * scale is below half the smallest subnormal of either format
    scale = torch.tensor(fmt.max / 6.0)  # some values overflow, the smallest underflow
    q = cast_to_fp8_grid(x, scale, fmt)
    got = cast_stats(x, q, scale, fmt)
    x64, q64 = x.double(), q.double() / scale.double()
    overflow = (x64.abs() * scale.double() > fmt.max).double().mean() * 100
    underflow = ((q64 == 0) & (x64 != 0)).double().mean() * 100
    sqnr = 10 * torch.log10((x64**2).sum() / ((x64 - q64) ** 2).sum())
    assert overflow > 0 and underflow > 0
    assert torch.isclose(got[0].double(), overflow, rtol=1e-6, atol=0)
    assert torch.isclose(got[1].double(), underflow, rtol=1e-6, atol=0)
    assert abs(got[2].item() - sqnr.item()) < 0.01


def test_the_fused_cuda_casts_stay_compiled_for_every_rank_layout_dtype_and_format(monkeypatch):
    """The CUDA casts (``_cast_cuda``, ``_amaxes_cuda``) are torch.compile'd with fullgraph=True.
    A GPT casts 2-D operands (weights are Parameters), their transposes and 4-D attention tensors,
    in bf16, fp16 and fp32, to E4M3 and E5M2: compiled per shape kind that is over 24 graphs
    (the H200 run's logs: "expected type of x_hp to be a tensor type, but found Parameter"), past
    dynamo's recompile limit
    of 8, after which every compiled call fails and fp8lab fell back to eager kernels for the
    rest of the run. Flattened to 1-D first, the same calls need one graph per input dtype and
    format (6) and never fall back. Dynamo's guards and recompiles are the same for every
    backend, so the CPU test compiles with backend "eager" (no C++ build); values equal the
    eager math bit for bit."""
    import warnings

    from torch._dynamo.utils import counters

    from fp8lab.quantize import tensor

    torch._dynamo.reset()
    monkeypatch.setattr(tensor, "_cast_compiled", tensor._compile(tensor._cast_math, backend="eager"))
    monkeypatch.setattr(tensor, "_amaxes_compiled", tensor._compile(tensor._amaxes_math, backend="eager"))
    rows = tensor._compile(tensor._amaxes_rows_math, backend="eager")
    monkeypatch.setattr(tensor, "_amaxes_rows_compiled", rows)
    graphs = counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 3.0, 2.0])[1]  # as the layers pass it: one role's row of a state's scales
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warns
        # the last two: the two-stage amax, whole rows and rows plus a ragged tail
        for shape in ((96,), (64, 48), (2, 3, 16, 8), (4, 16, 24), (64, 2048), (3, 33333)):
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                x = (torch.randn(shape, generator=g) * 40).to(dtype)
                views = (x, x.t(), torch.nn.Parameter(x)) if x.dim() == 2 else (x,)  # weights are Parameters
                for view in views:
                    for fmt in (E4M3, E5M2):
                        got = tensor._cast_cuda(view, scale, fmt.max, fmt.dtype)
                        want = tensor._cast_math(view, scale, fmt.max, fmt.dtype)
                        assert got.shape == view.shape and got.stride() == view.stride()
                        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
                    assert torch.equal(tensor._amaxes_cuda(view), tensor._amaxes_math(view))
        big = torch.randn(3, 33333, generator=g)
        for where_nan, where_inf in ((5, None), (99990, None), (5, 99990), (99990, 7), (None, 99995)):
            x = big.clone().view(-1)
            if where_nan is not None:
                x[where_nan] = math.nan
            if where_inf is not None:
                x[where_inf] = -math.inf
            got, want = tensor._amaxes_cuda(x.view(3, -1)), tensor._amaxes_math(x)
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    # casts: dtype x format; amaxes: dtype, one- and two-stage
    assert counters["stats"]["unique_graphs"] - graphs <= 3 * 2 + 3 + 3
    torch._dynamo.reset()
