"""The FP8 tensor-core accumulator model (fp8lab.gemm.accumulate) against the plain integer reference
(tests/accum_reference.py) and against cases worked by hand from the papers' description.

Tolerances: none for "fast" and "promoted" -- every implementation (the C kernel's SIMD path, its
generic path, the pure-torch fallback) must give the reference's bits (NaN compares as NaN). "fp32"
is a BLAS fp32 GEMM: bit-equal to the exact sum where fp32 accumulation is exact, elsewhere within
the classic bound K * 2^-24 * sum|a||b|.
"""

from __future__ import annotations

import itertools
import math
import re
import struct

import pytest
import torch

from fp8lab import native
from fp8lab.accumulation import FP32, HOPPER_FAST, HOPPER_PROMOTED, Accumulator
from fp8lab.formats import E4M3, E5M2
from fp8lab.gemm import accumulate as acc_mod
from fp8lab.gemm import accumulate_native
from fp8lab.gemm.accumulate import (
    AccumulatePath,
    accumulate_path,
    chain_instructions,
    tensor_core_accumulate,
    tensor_core_gemm,
)
from fp8lab.gemm.accumulate_torch import Steps
from fp8lab.gemm.exact import epilogue
from tests import accum_reference as ref

FMT = {"e4m3": (E4M3, (-6, 3)), "e5m2": (E5M2, (-14, 2))}
KERNEL_OK = acc_mod._kernel()[0] is not None
PATHS = [
    pytest.param(
        AccumulatePath("c-simd", "forced"),
        id="c-simd",
        marks=pytest.mark.skipif(not KERNEL_OK, reason="no C compiler here"),
    ),
    pytest.param(
        AccumulatePath("c-generic", "forced"),
        id="c-generic",
        marks=pytest.mark.skipif(not KERNEL_OK, reason="no C compiler here"),
    ),
    pytest.param(AccumulatePath("torch", "forced"), id="torch"),
]


def bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def same(out: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Bit equality, every NaN equal to every NaN."""
    return (out.view(torch.int32) == expected.view(torch.int32)) | (out.isnan() & expected.isnan())


def fp8(gen, shape, fmt: str, scale: float = 1.0) -> torch.Tensor:
    dtype = FMT[fmt][0].dtype
    return (torch.randn(*shape, generator=gen) * scale).clamp(-FMT[fmt][0].max, FMT[fmt][0].max).to(dtype).float()


# ---------------------------------------------------------------- one instruction, 10,000+ random cases


def _instruction_batches() -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, str, str, int]]:
    """(label, a (25, 32), b (32, 40), c (25, 40), a format, b format, chunk): 1,000 cases each."""
    gen = torch.Generator().manual_seed(11)
    out = []

    def c_like(scale):
        return (torch.randn(25, 40, generator=gen) * scale).float()

    a, b = fp8(gen, (25, 32), "e4m3", 8), fp8(gen, (32, 40), "e4m3", 8)
    out.append(("gaussian e4m3, C ~ products", a, b, c_like(200.0), "e4m3", "e4m3", 32))
    a, b = fp8(gen, (25, 32), "e4m3", 2**-7), fp8(gen, (32, 40), "e4m3", 2**-6)  # mostly subnormal operands
    out.append(("subnormal-heavy e4m3", a, b, c_like(2**-14), "e4m3", "e4m3", 32))
    a, b = fp8(gen, (25, 32), "e5m2", 2**-15), fp8(gen, (32, 40), "e5m2", 2**-13)
    out.append(("subnormal-heavy e5m2", a, b, c_like(2**-30), "e5m2", "e5m2", 32))
    a, b = fp8(gen, (25, 32), "e4m3", 30), fp8(gen, (32, 40), "e5m2", 1000)
    out.append(("e4m3 x e5m2", a, b, c_like(1e4), "e4m3", "e5m2", 32))
    a, b = fp8(gen, (25, 32), "e4m3", 4), fp8(gen, (32, 40), "e4m3", 4)
    a[:, 1::2], b[1::2] = a[:, ::2], -b[::2]  # products cancel pairwise: sums of exactly zero
    a[:5, 1::2] = fp8(gen, (5, 16), "e4m3", 4)  # and a few rows that only nearly cancel
    c = c_like(1.0)
    c[::2] = 0.0
    out.append(("cancellation (to zero)", a, b, c, "e4m3", "e4m3", 32))
    a, b = fp8(gen, (25, 32), "e4m3", 1), fp8(gen, (32, 40), "e4m3", 1)
    out.append(("C much larger than the products", a, b, c_like(2.0**20), "e4m3", "e4m3", 32))
    c = c_like(2.0**-40)
    c[:3] = torch.tensor([0.0, -0.0, 2.0**-149])[:, None]  # zero, negative zero, an fp32 subnormal
    out.append(("C much smaller than the products", a, b, c, "e4m3", "e4m3", 32))
    a, b = fp8(gen, (25, 32), "e5m2", 100), fp8(gen, (32, 40), "e5m2", 100)
    a[:8], b[:, :8] = 0.0, 0.0  # all-zero rows and columns ...
    b[:, 8:12] = 57344.0  # ... against large operands (a zero operand's exponent is -126)
    c = c_like(2.0**-118)
    c[:, ::3] = 0.0
    out.append(("all-zero rows and columns, tiny C", a, b, c, "e5m2", "e5m2", 32))
    a, b = fp8(gen, (25, 32), "e5m2", 1000), fp8(gen, (32, 40), "e4m3", 10)
    a[0, 3], a[1, 4], a[2, 5], b[6, 7], b[7, 8], b[8, 9] = math.inf, -math.inf, math.nan, math.inf, -math.inf, math.nan
    a[3, 6] = 0.0
    b[6, :] = math.inf  # inf * 0 in row 3
    c = c_like(100.0)
    c[4, 10], c[5, 11], c[6, 12] = math.inf, -math.inf, math.nan
    out.append(("inf and NaN", a, b, c, "e5m2", "e4m3", 32))
    a, b = fp8(gen, (25, 32), "e4m3", 8), fp8(gen, (32, 40), "e5m2", 8)
    out.append(("Ada: two chained instructions of 16", a, b, c_like(50.0), "e4m3", "e5m2", 16))
    # The kernel scales products by an integer add to their exponent field only where E lies in [-49, 77]
    # (frac = 13); C's exponents around the upper edge, isolated zero operands (a zero product in a lane
    # that has other products) and tiles of nothing but zero products, mixed with ordinary lanes.
    a, b = fp8(gen, (25, 32), "e4m3", 2), fp8(gen, (32, 40), "e4m3", 2)
    a[:12, 5], b[9, :20] = 0.0, -0.0  # one zero product (or two) in each of these lanes
    a[18:], b[:, 32:] = 0.0, 0.0  # whole 6 x 32 kernel tiles of zero products: there E is C's alone
    exps = torch.tensor([-52, -51, -50, -49, -48, -47, 0, 75, 76, 77, 78, 79, 100, 127], dtype=torch.float32)
    pick = torch.randint(0, len(exps), (25, 40), generator=gen)
    c = torch.randn(25, 40, generator=gen).sign() * (1 + torch.rand(25, 40, generator=gen)) * 2.0 ** exps[pick]
    a[:3, :4], b[:4, :3] = 2.0**-9, -(2.0**-8)  # products of 2^-17 against a huge C
    c[:3, :3] = torch.tensor(
        [[1.5 * 2.0**127, -(2.0**120), 2.0**121], [2.0**122, 2.0**126, -(2.0**110)], [0, 1, 2.0**118]]
    )
    out.append(("C at the edges of the exponent-add path", a, b, c.float(), "e4m3", "e4m3", 32))
    return out


BATCHES = _instruction_batches()


def _per_element(a: torch.Tensor, b: torch.Tensor, value) -> torch.Tensor:
    """(M, N) float32 of ``value(i, j, row i of a, column j of b)`` (Python lists, for the reference)."""
    rows, cols = a.tolist(), b.t().tolist()
    return torch.tensor(
        [[value(i, j, row, col) for j, col in enumerate(cols)] for i, row in enumerate(rows)], dtype=torch.float32
    )


@pytest.fixture(scope="module")
def instruction_reference() -> list[torch.Tensor]:
    expected = []
    for _, a, b, c, fa, fb, chunk in BATCHES:

        def chained(i, j, row, col, c=c, fa=fa, fb=fb, chunk=chunk):
            d = c[i, j].item()
            for k0 in range(0, len(row), chunk):
                d = ref.instruction(row[k0 : k0 + chunk], col[k0 : k0 + chunk], d, FMT[fa][1], FMT[fb][1])
            return d

        expected.append(_per_element(a, b, chained))
    return expected


@pytest.mark.parametrize("path", PATHS)
def test_ten_thousand_instructions_match_the_reference(path, instruction_reference):
    total = 0
    for (label, a, b, c, fa, fb, chunk), expected in zip(BATCHES, instruction_reference):
        out = chain_instructions(a, b, c, FMT[fa][0], FMT[fb][0], chunk=chunk, path=path)
        eq = same(out, expected)
        assert eq.all(), f"{label}: {(~eq).sum().item()} of {eq.numel()} differ: {out[~eq][:3]} vs {expected[~eq][:3]}"
        total += eq.numel()
    assert total >= 10_000


# ---------------------------------------------------------------- cases worked by hand


def one(a, b, c=0.0, fa=E4M3, fb=E4M3) -> float:
    """One instruction (K <= 32) through the default path."""
    return chain_instructions(torch.tensor([a]), torch.tensor(b)[:, None], torch.tensor([[c]]), fa, fb).item()


def test_a_negative_term_is_truncated_toward_zero():
    # 1 * 1 = 1: exponent 0 = E, so the unit is 2^(0 - 13).
    # -(1.5 * 2^-7) * (1.5 * 2^-7) = -2.25 * 2^-14: exponent -14, significand 2.25 (not renormalised),
    # = -1.125 units, truncated toward zero to -1 unit (floor would give -2).
    # Sum: 8192 - 1 = 8191 units = 1 - 2^-13 (13 significant bits: step 5 keeps them all).
    d = one([1.0, -1.5 * 2**-7], [1.0, 1.5 * 2**-7])
    assert d == 1 - 2**-13 and bits(d) == 0x3F7FF800
    assert bits(1.0 - 2.25 * 2**-14) != bits(d)  # what an fp32 sum (round to nearest) would give


def test_a_term_shifted_entirely_out():
    # 256 * 1 = 2^8: E = 8, unit 2^-5. 2^-6 * 2^-6 = 2^-12 = 2^-7 units: truncated to 0, and so are all
    # 31 of them (no sticky bit). D = 256 = 0x43800000; the exact sum 256 + 31 * 2^-12 fits fp32.
    d = one([256.0] + [2**-6] * 31, [1.0] + [2**-6] * 31)
    assert bits(d) == 0x43800000
    assert 256.0 + 31 * 2**-12 == float(torch.tensor(256.0 + 31 * 2**-12))  # fp32 would have kept them


def test_c_absorbs_small_products():
    # C = 1024 = 2^10: E = 10, unit 2^-3. Each product 0.5 * 0.0625 = 2^-5 is 0.25 units: truncated to 0.
    # D = 1024 (0x44800000) although the 32 products add up to 1.0 (fp32: 1025).
    d = one([0.5] * 32, [0.0625] * 32, c=1024.0)
    assert bits(d) == 0x44800000


def test_step_five_keeps_thirteen_fraction_bits():
    # 1.875 * 1.875 = 3.515625: exponent 0 + 0 = 0 = E, significand 3.515625 in [1, 4): 28800 units of 2^-13.
    # 2^-6 * 2^-7 (2^-7 is an E4M3 subnormal: exponent -6, significand 0.5) = 0.5 * 2^-12 = 1 unit.
    # Step 4: 28801 units (15 bits). Step 5 keeps 1 + 13 bits: granularity 2 units -> 28800 = 3.515625.
    d = one([1.875, 2**-6], [1.875, 2**-7])
    assert d == 3.515625 and bits(d) == 0x40610000


def test_a_subnormal_operand_aligns_at_its_formats_minimum_exponent():
    # 2^-9 * 2^-9 (both E4M3 subnormals: exponent -6 each, significand 1/8) has exponent -12, not -18,
    # so E = -12 and the unit is 2^-25. C = 2^-20 + 2^-28 = 32.125 units: truncated to 32 = 2^-20.
    # D = 2^-18 + 2^-20; a renormalised product (E = -18, unit 2^-31) would have kept C's 2^-28.
    d = one([2**-9], [2**-9], c=2**-20 + 2**-28)
    assert d == 2**-18 + 2**-20


def test_a_zero_operand_takes_exponent_minus_126():
    # 0 * 57344 (E5M2, exponent 15): exponent -126 + 15 = -111 > C's -120, so E = -111 and the unit
    # 2^-124; C = 2^-120 + 2^-126 = 16.25 units -> 16 units = 2^-120. (A zero product that did not
    # take part would leave C whole.) This rule only shows when every product is zero and |C| < 2^-111.
    d = one([0.0], [57344.0], c=2**-120 + 2**-126, fa=E5M2, fb=E5M2)
    assert d == 2**-120


def test_all_zero_chunk_gives_plus_zero_and_non_finite_terms_the_ieee_sum():
    assert bits(one([0.0] * 32, [0.0] * 32)) == 0  # E is -126 (C = 0), nothing is NaN, the sum is +0
    assert bits(one([0.0] * 32, [0.0] * 32, c=-0.0)) == 0
    assert bits(one([-1.0], [0.0], c=-0.0)) == 0  # -0 terms: the integer sum has no sign, +0
    assert math.isnan(one([math.inf, 1.0], [0.0, 1.0], fa=E5M2))  # inf * 0
    assert math.isnan(one([math.inf, math.inf], [1.0, -1.0], fa=E5M2))  # inf - inf
    assert one([math.inf, 448.0], [1.0, 448.0], fa=E5M2) == math.inf
    assert one([1.0], [1.0], c=-math.inf) == -math.inf


def test_promotion_rescues_what_fast_accumulation_truncates():
    # K = 160: instructions 0-3 add 32 products of 8 * 8 = 64 each: C = 2048, 4096, 6144, 8192 (exact:
    # each product is a multiple of the unit). Instruction 4 adds 32 products of 1 * 0.5 = 0.5.
    # fast: C = 8192 = 2^13 sets E = 13, unit 1: each 0.5 truncates to 0 -> 8192.
    # promoted (every 4): instruction 4 starts from C = 0, sums 16 exactly, fp32 add -> 8208. fp32: 8208.
    a = torch.tensor([[8.0] * 128 + [1.0] * 32])
    b = torch.tensor([[8.0] * 128 + [0.5] * 32]).t()
    assert tensor_core_accumulate(a, b, E4M3, E4M3, HOPPER_FAST).item() == 8192.0
    assert tensor_core_accumulate(a, b, E4M3, E4M3, HOPPER_PROMOTED).item() == 8208.0
    assert tensor_core_accumulate(a, b, E4M3, E4M3, FP32).item() == 8208.0


# ---------------------------------------------------------------- whole GEMMs


def _gemm_cases():
    gen = torch.Generator().manual_seed(5)
    cases = []
    a, b = fp8(gen, (3, 100), "e4m3", 8), fp8(gen, (100, 5), "e4m3", 8)
    cases.append(("K=100 fast", a, b, "e4m3", "e4m3", HOPPER_FAST, None))
    cases.append(("K=100 promoted", a, b, "e4m3", "e4m3", HOPPER_PROMOTED, None))
    a, b = fp8(gen, (4, 128), "e4m3", 8), fp8(gen, (128, 6), "e5m2", 30)
    cases.append(("K=128 fast e4m3 x e5m2", a, b, "e4m3", "e5m2", HOPPER_FAST, None))
    a, b = fp8(gen, (3, 4096), "e4m3", 8), fp8(gen, (4096, 4), "e4m3", 8)
    b[:, 3] = b[:, 3].abs()
    a[2] = a[2].abs()  # an all-positive output: the one where fast accumulation drifts
    cases.append(("K=4096 fast", a, b, "e4m3", "e4m3", HOPPER_FAST, None))
    cases.append(("K=4096 promoted", a, b, "e4m3", "e4m3", HOPPER_PROMOTED, None))
    a, b = fp8(gen, (3, 1000), "e4m3", 8), fp8(gen, (1000, 5), "e5m2", 8)
    a[1] = 0.0
    scales = (torch.rand(3, 8, generator=gen) * 3 + 0.1, torch.rand(8, 5, generator=gen) * 3 + 0.1)
    cases.append(("K=1000 promoted, group scales", a, b, "e4m3", "e5m2", HOPPER_PROMOTED, scales))
    cases.append(
        (
            "K=1000 promoted, descending, split-K 3",
            a,
            b,
            "e4m3",
            "e5m2",
            Accumulator(kind="promoted", k_order="descending", split_k=3),
            None,
        )
    )
    cases.append(
        (
            "K=1000 fast, Ada chunk 16, promote 2 split-K 2",
            a,
            b,
            "e4m3",
            "e5m2",
            Accumulator(kind="fast", chunk=16, promote_every=2, split_k=2),
            None,
        )
    )
    cases.append(
        (
            "K=1000 promoted, Blackwell 25 bits",
            a,
            b,
            "e4m3",
            "e5m2",
            Accumulator(kind="promoted", fraction_bits=25),
            None,
        )
    )
    a2, b2 = a.clone(), b.clone()
    a2[0, 5], b2[7, 2], b2[900, 4] = math.inf, math.nan, -math.inf
    g_scales = (scales[0].clone(), scales[1].clone())
    g_scales[0][2, 3] = 0.0  # a zero scale on a group with an inf partial
    cases.append(("K=1000 promoted, inf/NaN, group scales", a2, b2, "e4m3", "e5m2", HOPPER_PROMOTED, g_scales))
    return cases


GEMM_CASES = _gemm_cases()


@pytest.fixture(scope="module")
def gemm_reference() -> list[torch.Tensor]:
    expected = []
    for _, a, b, fa, fb, acc, scales in GEMM_CASES:

        def element(i, j, row, col, fa=fa, fb=fb, acc=acc, scales=scales):
            return ref.gemm_element(
                row, col, FMT[fa][1], FMT[fb][1], kind=acc.kind, chunk=acc.chunk, frac_bits=acc.fraction_bits,
                promote_every=acc.promote_every, descending=acc.k_order == "descending", split_k=acc.split_k,
                a_scales=None if scales is None else scales[0][i].tolist(),
                b_scales=None if scales is None else scales[1][:, j].tolist(),
            )  # fmt: skip

        expected.append(_per_element(a, b, element))
    return expected


@pytest.mark.parametrize("path", PATHS)
def test_gemms_match_the_reference(path, gemm_reference):
    for (label, a, b, fa, fb, acc, scales), expected in zip(GEMM_CASES, gemm_reference):
        sa, sb = (None, None) if scales is None else scales
        out = tensor_core_accumulate(a, b, FMT[fa][0], FMT[fb][0], acc, a_group_scale=sa, b_group_scale=sb, path=path)
        eq = same(out, expected)
        assert eq.all(), f"{label}: {(~eq).sum().item()} differ: {out[~eq][:3]} vs {expected[~eq][:3]}"


@pytest.mark.parametrize(
    "acc",
    [HOPPER_FAST, HOPPER_PROMOTED, Accumulator(kind="promoted", k_order="descending")],
    ids=["fast", "promoted", "promoted-descending"],
)
def test_implementations_agree_bit_for_bit_on_larger_gemms(acc):
    """Sizes the reference is too slow for: the three implementations against each other (tiles, edges,
    K not a multiple of 32, odd strides and dtypes of the inputs)."""
    gen = torch.Generator().manual_seed(9)
    a, b = fp8(gen, (41, 700), "e4m3", 8), fp8(gen, (35, 700), "e5m2", 0.01).t()  # b: a transposed view
    a[3] = 0.0
    a[5:9, ::7], b[::11, 4:6] = 0.0, -0.0  # isolated zero products among nonzero ones
    scales = (torch.rand(41, 6, generator=gen) + 0.5, torch.rand(6, 35, generator=gen) + 0.5)
    sa, sb = scales if acc.kind == "promoted" else (None, None)
    a_in = a.bfloat16() if acc.kind == "fast" else a.t().contiguous().t()  # bf16, or a column-major fp32 a
    outs = {
        p.values[0].name: tensor_core_accumulate(
            a_in, b, E4M3, E5M2, acc, a_group_scale=sa, b_group_scale=sb, path=p.values[0]
        )
        for p in PATHS
        if p.values[0].name == "torch" or KERNEL_OK
    }
    base = outs.pop("torch")
    for name, out in outs.items():
        assert same(out, base).all(), name
    if KERNEL_OK:  # the kernel's scratch, freed, is allocated afresh
        accumulate_native.release(acc_mod._kernel()[0])
        again = tensor_core_accumulate(a_in, b, E4M3, E5M2, acc, a_group_scale=sa, b_group_scale=sb)
        assert same(again, base).all()


@pytest.mark.skipif(not KERNEL_OK, reason="no C compiler here")
def test_k_blocks_carry_the_state_exactly():
    """A wide B makes the kernel cut K into blocks of 4 instructions (its B panels must fit L2): the
    chained C (fast) and the promoted accumulator cross block edges, also in descending order with the
    partial group (K = 700: 22 instructions) visited first."""
    gen = torch.Generator().manual_seed(12)
    a, b = fp8(gen, (13, 700), "e4m3", 8), fp8(gen, (700, 600), "e5m2", 0.1)
    for acc in (
        HOPPER_FAST,
        HOPPER_PROMOTED,
        Accumulator(kind="promoted", k_order="descending"),
        Accumulator(kind="promoted", promote_every=3, k_order="descending"),
    ):
        expected = tensor_core_accumulate(a, b, E4M3, E5M2, acc, path=AccumulatePath("torch", "forced"))
        for name in ("c-simd", "c-generic"):
            out = tensor_core_accumulate(a, b, E4M3, E5M2, acc, path=AccumulatePath(name, "forced"))
            assert same(out, expected).all(), (name, acc)


def test_fp32_kind_is_an_fp32_accumulation():
    gen = torch.Generator().manual_seed(2)
    # Integers: every partial sum is exact in fp32, so any order gives the exact sum.
    a = torch.randint(-16, 17, (20, 256), generator=gen).float()
    b = torch.randint(-16, 17, (256, 30), generator=gen).float()
    exact = a.double() @ b.double()
    assert torch.equal(tensor_core_accumulate(a, b, E4M3, E4M3, FP32).double(), exact)
    # Gaussian: within the classic bound of an fp32 sum.
    a, b = fp8(gen, (20, 2000), "e4m3", 8), fp8(gen, (2000, 30), "e5m2", 8)
    exact = a.double() @ b.double()
    bound = 2000 * 2.0**-24 * (a.double().abs() @ b.double().abs())
    assert ((tensor_core_accumulate(a, b, E4M3, E5M2, FP32).double() - exact).abs() <= bound).all()
    # With group scales: each group's fp32 sum (exact here) FMA'd in, as the reference does it.
    a = torch.randint(-8, 9, (4, 300), generator=gen).float()
    b = torch.randint(-8, 9, (300, 3), generator=gen).float()
    sa, sb = torch.rand(4, 3, generator=gen) + 0.5, torch.rand(3, 3, generator=gen) + 0.5
    out = tensor_core_accumulate(a, b, E4M3, E4M3, FP32, a_group_scale=sa, b_group_scale=sb)
    expected = [
        [
            ref.gemm_element(
                a[i].tolist(),
                b[:, j].tolist(),
                (-6, 3),
                (-6, 3),
                kind="fp32",
                a_scales=sa[i].tolist(),
                b_scales=sb[:, j].tolist(),
            )
            for j in range(3)
        ]
        for i in range(4)
    ]
    assert torch.equal(out, torch.tensor(expected))


@pytest.mark.parametrize("path", PATHS)
def test_non_finite_outputs_are_what_a_plain_fp32_gemm_gives(path):
    """Without group scales an output is non-finite exactly when a product is (finite FP8 products and
    their sums never overflow fp32), and then it is the IEEE sum of the non-finite products in any
    order: the plain fp32 GEMM's value (which must not skip zeros: it gives NaN for inf * 0)."""
    gen = torch.Generator().manual_seed(4)
    a, b = fp8(gen, (30, 300), "e5m2", 100), fp8(gen, (300, 20), "e5m2", 100)
    for _ in range(12):
        i, k, j = (torch.randint(0, s, (1,), generator=gen).item() for s in (30, 300, 20))
        a[i, k] = [math.inf, -math.inf, math.nan][k % 3]
        b[k, j] = [0.0, math.inf, -math.inf][j % 3]
    plain = torch.mm(a, b)
    assert plain.isnan().any() and plain.isinf().any()
    for acc in (HOPPER_FAST, HOPPER_PROMOTED):
        out = tensor_core_accumulate(a, b, E5M2, E5M2, acc, path=path)
        assert torch.equal(out.isfinite(), plain.isfinite())
        assert same(out[~plain.isfinite()], plain[~plain.isfinite()]).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("acc", [FP32, HOPPER_FAST, HOPPER_PROMOTED], ids=["fp32", "fast", "promoted"])
def test_empty_dimensions(path, acc):
    for m, k, n in ((0, 64, 5), (4, 64, 0), (4, 0, 5), (0, 0, 0)):
        out = tensor_core_accumulate(torch.zeros(m, k), torch.zeros(k, n), E4M3, E4M3, acc, path=path)
        assert out.shape == (m, n) and out.dtype == torch.float32 and (out == 0).all()


@pytest.mark.parametrize("path", [p for p in PATHS if p.values[0].name != "torch"])  # torch: not fused
@pytest.mark.parametrize("acc", [HOPPER_FAST, HOPPER_PROMOTED], ids=["fast", "promoted"])
def test_the_fused_epilogue_is_the_epilogue_bit_for_bit(path, acc):
    """``tensor_core_gemm`` (the kernel applies scale, bias and the output rounding as it stores each
    tile) against ``epilogue(tensor_core_accumulate(...))``: every output dtype and bias dtype, with and
    without the scale, K in several blocks (bf16 output: the kernel's own fp32 accumulator between them),
    transposed bf16 operands, and inf/NaN/overflowing outputs."""
    gen = torch.Generator().manual_seed(21)
    a, b = fp8(gen, (37, 700), "e4m3", 8), fp8(gen, (700, 530), "e5m2", 4)
    a[5, 3], b[9, 11], a[6, :40] = math.inf, math.nan, 448.0  # an inf, a NaN, and a row near fp32's edge
    b[:40, 12] = 57344.0
    cases = [(a, b), (a.t().contiguous().t().bfloat16(), b.t().contiguous().t().bfloat16())]
    inv = torch.tensor(2.0**100 * 1.25)  # pushes large outputs past fp32 and bf16: inf after the scale
    accumulators = [tensor_core_accumulate(x, y, E4M3, E5M2, acc, path=path) for x, y in cases]
    for ((x, y), accumulator), out_dtype, bias_dtype, scale in itertools.product(
        zip(cases, accumulators),
        (torch.float32, torch.bfloat16, torch.float16),
        (None, torch.bfloat16, torch.float32),
        (None, inv),
    ):
        bias = None if bias_dtype is None else (torch.randn(530, generator=gen) * 3).to(bias_dtype)
        expected = epilogue(accumulator.clone(), scale, out_dtype, bias)
        out = tensor_core_gemm(x, y, E4M3, E5M2, acc, scale, out_dtype, bias, path=path)
        assert out.dtype == out_dtype and out.shape == expected.shape
        eq = same(out.float(), expected.float())
        assert eq.all(), (out_dtype, bias_dtype, scale, (~eq).sum().item())
        assert out.isinf().any() or scale is None


@pytest.mark.skipif(not KERNEL_OK, reason="no C compiler here")
def test_off_grid_values_are_counted_once_in_every_layout():
    """The prepass counts off-grid values per tile; tiles packed together from a transposed A and a last
    tile whose missing rows repeat the last real row must not count a value twice."""
    for m in (12, 13, 48, 50):
        a = torch.ones(m, 70)
        a[m - 1, 5] = 1.1
        for x in (a, a.t().contiguous().t(), a.bfloat16().t().contiguous().t()):
            with pytest.raises(ValueError, match=r"a holds 1 values that are not E4M3"):
                tensor_core_accumulate(x, torch.ones(70, 3), E4M3, E4M3, HOPPER_FAST)


@pytest.mark.skipif(not KERNEL_OK, reason="no C compiler here")
@pytest.mark.parametrize("where", ["vector", "tail"])
def test_every_kind_of_off_grid_value_is_counted_where_the_prepass_vectorises(where):
    """The AVX-512 prepass classifies sixteen values at a time with its own copy of operand_code's rule; the
    scalar rule classifies the tail. Both must agree on every kind of value: on the grid (E4M3 subnormals
    2^-9 and 7 * 2^-9, zeros, inf, NaN, 448) and off it (bits below the grid, below the smallest subnormal,
    an fp32 subnormal, past 448)."""
    on = [2.0**-9, 7 * 2.0**-9, 0.0, -0.0, math.inf, math.nan, 448.0, -1.75]
    off = [1.1, 2.0**-10, 3 * 2.0**-10, 1e-40, 480.0, -(2.0**-12)]
    at = 0 if where == "vector" else 32  # a row of 40: values 0-31 in two vector blocks, 32-39 in the tail
    a = torch.ones(2, 40)
    a[1, at : at + len(on)] = torch.tensor(on)
    b = torch.ones(40, 3)
    kernel, _ = accumulate_native.load_kernel()
    _, bad = accumulate_native.run(kernel, a, b, (-6, 3, -6, 3), (448.0, 448.0), Steps(32, 13, 0, False))
    assert bad == (0, 0)
    a[0, at : at + len(off)] = torch.tensor(off)
    _, bad = accumulate_native.run(kernel, a, b, (-6, 3, -6, 3), (448.0, 448.0), Steps(32, 13, 0, False))
    assert bad == (len(off), 0)
    _, bad = accumulate_native.run(
        kernel, b.t().contiguous(), a.t().contiguous(), (-6, 3, -6, 3), (448.0, 448.0), Steps(32, 13, 0, False)
    )
    assert bad == (0, len(off))  # B's panels go through the same classification


@pytest.mark.parametrize("path", PATHS)
def test_values_off_the_grid_are_refused(path):
    a, b = torch.ones(2, 40), torch.ones(40, 3)
    a[1, 7] = 1.1  # not an E4M3 value
    with pytest.raises(ValueError, match=r"a holds 1 values that are not E4M3"):
        tensor_core_accumulate(a, b, E4M3, E4M3, HOPPER_FAST, path=path)
    b[0, 0] = 512.0  # past E4M3's 448, an E5M2 value
    with pytest.raises(ValueError, match=r"b holds 1 values that are not E4M3"):
        tensor_core_accumulate(torch.ones(2, 40), b, E4M3, E4M3, HOPPER_FAST, path=path)
    tensor_core_accumulate(torch.ones(2, 40), b, E4M3, E5M2, HOPPER_FAST, path=path)


def test_inputs_on_other_dtypes_and_layouts_give_the_same_bits():
    gen = torch.Generator().manual_seed(8)
    a, b = fp8(gen, (33, 70), "e4m3", 8), fp8(gen, (70, 41), "e4m3", 8)
    base = tensor_core_accumulate(a, b, E4M3, E4M3, HOPPER_PROMOTED)
    for a2, b2 in (
        (a.bfloat16(), b.bfloat16()),
        (a.to(E4M3.dtype), b.to(E4M3.dtype)),
        (a.t().contiguous().t(), b.t().contiguous().t()),
        (a.double(), b[:, :].clone()),
    ):
        assert torch.equal(tensor_core_accumulate(a2, b2, E4M3, E4M3, HOPPER_PROMOTED), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_transposed_a_packs_to_the_same_bits(dtype):
    """A given as the transpose of a row-major tensor (every wgrad's layout) is packed in 16 x 16
    squares where it can (the AVX-512 build) and element by element at the edges: 200 rows and
    150 columns leave both edges; the result must equal the row-major A's bit for bit."""
    gen = torch.Generator().manual_seed(9)
    a, b = fp8(gen, (200, 150), "e5m2", 0.01), fp8(gen, (150, 40), "e4m3", 8)
    base = tensor_core_accumulate(a.to(dtype), b, E5M2, E4M3, HOPPER_PROMOTED)
    transposed = a.to(dtype).t().contiguous().t()
    assert transposed.stride() == (1, 200)
    assert torch.equal(tensor_core_accumulate(transposed, b, E5M2, E4M3, HOPPER_PROMOTED), base)
    assert torch.equal(
        tensor_core_accumulate(transposed[3:170, 5:149], b[5:149], E5M2, E4M3, HOPPER_PROMOTED),
        tensor_core_accumulate(a.to(dtype)[3:170, 5:149], b[5:149], E5M2, E4M3, HOPPER_PROMOTED),
    )


def test_flush_to_zero_set_by_torch_does_not_change_the_model():
    # Results in fp32's subnormal range: the model keeps them (as the GPU's fp32 adds do).
    a = torch.full((2, 64), 2.0**-9)
    b = torch.full((64, 3), 2.0**-9)
    c = torch.full((2, 3), 2.0**-140)
    before = chain_instructions(a[:, :32], b[:32], c, E4M3, E4M3)
    previous = torch.set_flush_denormal(True)
    try:
        after = chain_instructions(a[:, :32], b[:32], c, E4M3, E4M3)
    finally:
        torch.set_flush_denormal(False)
    assert previous and torch.equal(before, after) and (before > 0).all()


# ---------------------------------------------------------------- configuration and the kernel's build


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("kind", "bf16", "one of ('fp32', 'promoted', 'fast')"),
        ("k_order", "random", "one of ('ascending', 'descending')"),
        ("promote_every", 0, "an int in [1, 1048576]"),
        ("chunk", 32.0, "an int in [1, 1024]"),
        ("fraction_bits", 41, "an int in [1, 40]"),
        ("split_k", True, "an int in [1, 1048576]"),
    ],
)
def test_accumulator_validation_names_the_field(field, value, allowed):
    kwargs = {"kind": "fast", field: value}
    with pytest.raises(ValueError, match=re.escape(f"Accumulator.{field} must be {allowed}, got {value!r}")):
        Accumulator(**kwargs)
    with pytest.raises(TypeError):
        Accumulator("fast")  # keyword-only


def test_group_scales_are_checked():
    a, b = torch.ones(2, 300), torch.ones(300, 3)
    with pytest.raises(ValueError, match=r"\(M, G\) = \(2, 3\)"):
        tensor_core_accumulate(
            a, b, E4M3, E4M3, HOPPER_PROMOTED, a_group_scale=torch.ones(2, 2), b_group_scale=torch.ones(2, 3)
        )
    with pytest.raises(ValueError, match="kind must be 'promoted' or 'fp32'"):
        tensor_core_accumulate(
            a, b, E4M3, E4M3, HOPPER_FAST, a_group_scale=torch.ones(2, 3), b_group_scale=torch.ones(3, 3)
        )
    with pytest.raises(ValueError, match="both or neither"):
        tensor_core_accumulate(a, b, E4M3, E4M3, HOPPER_PROMOTED, a_group_scale=torch.ones(2, 3))


def test_a_failed_build_falls_back_to_torch_loudly(monkeypatch, tmp_path):
    kernel, why = accumulate_native.load_kernel(compiler=str(tmp_path / "no-such-cc"))
    assert kernel is None and "no C compiler found" in why
    broken = tmp_path / "cc"
    broken.write_text(
        "#!/bin/sh\n[ \"$1\" = --version ] && echo 'broken cc 1.0' && exit 0\necho 'error: no' >&2\nexit 1\n"
    )
    broken.chmod(0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kernel, why = accumulate_native.load_kernel(compiler=str(broken))
    assert kernel is None and "could not build the kernel" in why and "error: no" in why
    monkeypatch.setattr(acc_mod, "_kernel", lambda: (None, why))
    with pytest.warns(RuntimeWarning, match="C kernel is unavailable .*could not build"):
        path = accumulate_path.__wrapped__()
    assert path.name == "torch" and "pure torch" in path.reason


def test_the_build_follows_torchs_cpu_capability(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert native.isa_flags() == ("-mavx2", "-mfma")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert native.isa_flags() == ()
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    assert native.isa_flags() == ("-march=native",)


@pytest.mark.skipif(
    not KERNEL_OK or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="needs the C kernel and an AVX2 CPU",
)
def test_the_avx2_build_gives_the_same_bits(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    kernel, why = accumulate_native.load_kernel()
    assert kernel is not None, why
    assert kernel.simd_bits == 256 and "-mavx2" in kernel.flags
    gen = torch.Generator().manual_seed(3)
    a, b = fp8(gen, (37, 300), "e4m3", 8), fp8(gen, (300, 29), "e5m2", 8)
    a[0, 0], b[1, 1] = math.inf, math.nan
    for promote in (0, 4):
        out, bad = accumulate_native.run(kernel, a, b, (-6, 3, -14, 2), (448.0, 57344.0), Steps(32, 13, promote, False))
        expected = tensor_core_accumulate(
            a, b, E4M3, E5M2, HOPPER_PROMOTED if promote else HOPPER_FAST, path=AccumulatePath("torch", "forced")
        )
        assert bad == (0, 0) and same(out, expected).all()
