"""NVFP4BlockScaling: the cast bit-exact against a reference written from the definitions, the GEMM
against float64, stochastic rounding, the random Hadamard transform, and the recipe's fields.

The reference below does each float32 operation of TE's kernels as a float64 operation (exact for
a product of two float32 values) rounded to float32 (for the quotients: float64 division then one
rounding, which equals float32 division since 53 >= 2*24 + 2), and rounds onto E4M3 and E2M1
from their definitions: spacing 2^(max(e, e_min) - mantissa_bits), ties to even, saturating.
"""

from __future__ import annotations

import math

import pytest
import torch

import fp8lab
from fp8lab import FP8Options, NVFP4BlockScaling
from fp8lab.formats import Role
from fp8lab.quantize.fp4 import apply_rht_dim0, dequantize_blocks, hadamard, rht_matrix, round_to_e2m1
from fp8lab.scaling import SCALINGS
from fp8lab.scaling.nvfp4 import RHT_SIGNS
from fp8lab.scaling.nvfp4_scales import gemm_alpha, global_decode_scale, global_encode_scale
from fp8lab.scaling.protocol import COLUMNWISE, ROWWISE

F32_MAX = torch.finfo(torch.float32).max
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def f32(t: torch.Tensor) -> torch.Tensor:
    """One float32 rounding of float64 values (float64 again, to keep computing exactly)."""
    return t.double().float().double()


def round_grid(v: torch.Tensor, mantissa_bits: int, e_min: int, max_value: float) -> torch.Tensor:
    """Round to nearest even onto a float grid with ``mantissa_bits``, normal exponents >= ``e_min``,
    saturating at ``max_value`` (float64 in, float64 out)."""
    a = v.abs()
    e = torch.floor(torch.log2(torch.where(a > 0, a, torch.ones_like(a)))).clamp(min=e_min)
    spacing = torch.exp2(e - mantissa_bits)
    r = (torch.round(a / spacing) * spacing).clamp(max=max_value)  # torch.round: half to even
    return torch.copysign(r, v)


def ref_e2m1(v):
    return round_grid(torch.where(torch.isnan(v), 6.0, v).clamp(-6.0, 6.0), 1, 0, 6.0)


def ref_e4m3(v):
    return round_grid(v, 3, -6, 448.0)


def ref_cast(x: torch.Tensor, block: tuple[int, int]):
    """(E2M1 values, E4M3 block scales, S_dec) of x (float32 or bf16, 2-D, whole blocks), from the
    definitions: S_enc = 448*6/amax; s_b = e4m3(amax_b * (S_enc * fp32(1/6))); elements
    x * fp32(1 / (s_b * S_dec)) rounded to nearest even onto E2M1."""
    xd = x.double()
    amax = xd.abs().max()
    s_enc = f32(torch.tensor(2688.0, dtype=torch.float64) / amax) if amax > 0 else torch.tensor(1.0).double()
    s_enc = s_enc.clamp(max=F32_MAX)
    s_dec = f32(1.0 / s_enc)
    mult = f32(s_enc * f32(torch.tensor(1.0 / 6.0, dtype=torch.float64)))
    br, bc = block
    r, c = x.shape
    blocks = xd.reshape(r // br, br, c // bc, bc)
    bamax = blocks.abs().amax(dim=(1, 3))
    dec = ref_e4m3(f32(bamax * mult).clamp(max=F32_MAX))
    enc = f32(1.0 / f32(dec * s_dec)).clamp(max=F32_MAX)  # 1/0 = inf -> FLT_MAX
    scaled = f32(blocks * enc[:, None, :, None])
    return ref_e2m1(scaled).reshape(r, c), dec, s_dec


def _cast(scaling, x, role, usage):
    q, dec, amax, _ = scaling.quantize(x, role, usage)
    return q.double(), dec.double(), global_decode_scale(global_encode_scale(amax)).double()


# --- 1. the cast -----------------------------------------------------------------------------


def test_e2m1_round_to_nearest_even_midpoints_and_saturation():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0])
    assert round_to_e2m1(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]
    edges = torch.tensor([6.0, 6.5, 7.0, 1e30, float("inf"), -float("inf"), float("nan"), 5.0001, 0.2500001])
    assert round_to_e2m1(edges).tolist() == [6.0, 6.0, 6.0, 6.0, 6.0, -6.0, 6.0, 6.0, 0.5]  # NaN: +6 (satfinite)
    v = torch.randn(100_000, generator=torch.Generator().manual_seed(1)) * 3
    assert torch.equal(round_to_e2m1(v).double(), ref_e2m1(v.double()))
    assert set(round_to_e2m1(v).abs().unique().tolist()) <= set(E2M1_GRID)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [(1, 16), (16, 1), (16, 16)])
def test_cast_bit_exact_against_reference(dtype, block):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 96, generator=g) * torch.exp2(torch.randint(-8, 8, (64, 1), generator=g).float())
    x[:16, :16] = 0.0  # a block of zeros (scale 0)
    x[16:32, 16:32] *= 1e-7  # blocks whose E4M3 scale underflows to 0 (their values cast to +-6, times 0)
    x[32:48] = torch.randn(16, 96, generator=g) * 0.1  # blocks with subnormal E4M3 scales
    x[40, 50] = 3e4  # the global amax: its block's scale saturates at 448
    x = x.to(dtype)
    role, usage = (
        (Role.WEIGHT, ROWWISE) if block == (16, 16) else (Role.INPUT, ROWWISE if block[0] == 1 else COLUMNWISE)
    )
    scaling = NVFP4BlockScaling(disable_rht=True)
    q, dec, s_dec = _cast(scaling, x, role, usage)
    q_ref, dec_ref, s_dec_ref = ref_cast(x, block)
    assert torch.equal(q, q_ref) and torch.equal(dec, dec_ref) and torch.equal(s_dec, s_dec_ref)
    assert dec.max() == 448.0 and (dec == 0).any() and ((dec > 0) & (dec < 2.0**-6)).any()  # cases covered
    assert torch.equal(dec[:1, :1].flatten(), torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize("role", [Role.INPUT, Role.GRAD_OUTPUT])
def test_rht_copy_cast_bit_exact_against_reference(role):
    """The columnwise copy with RHT: the transform of each 16-row group of each column (exact
    sums rounded once to float32), then the same cast, amax taken after the transform."""
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(14)).to(torch.bfloat16)
    x[3, 5] = 300.0
    t = torch.diag(torch.tensor(RHT_SIGNS).double()) @ hadamard(16) / 4
    moved = f32((x.double().reshape(4, 16, 48).transpose(1, 2) @ t).transpose(1, 2).reshape(64, 48)).float()
    q, dec, s_dec = _cast(NVFP4BlockScaling(disable_stochastic_rounding=True), x, role, COLUMNWISE)
    q_ref, dec_ref, s_dec_ref = ref_cast(moved, (16, 1))
    assert torch.equal(q, q_ref) and torch.equal(dec, dec_ref) and torch.equal(s_dec, s_dec_ref)
    # the rowwise copy (fprop's, dgrad's) is not transformed
    row = _cast(NVFP4BlockScaling(disable_stochastic_rounding=True), x, role, ROWWISE)
    assert all(torch.equal(a, b) for a, b in zip(row, ref_cast(x, (1, 16))))


def test_cast_ties_to_even_inside_a_block():
    """Global amax 2688 gives S_enc = 1 and a block of amax 6 the E4M3 scale 1: its elements are
    rounded unscaled, so the E2M1 midpoints are met exactly."""
    x = torch.zeros(1, 32)
    x[0, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -2.5, 0.5, 6.0, 0.0, 1.0, 3.0, 4.0, -0.25])
    x[0, 16] = 2688.0
    q, dec, s_dec = _cast(NVFP4BlockScaling(), x, Role.INPUT, ROWWISE)
    assert s_dec.item() == 1.0 and dec.flatten().tolist() == [1.0, 448.0]
    assert q[0, :16].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, -2.0, 0.5, 6.0, 0.0, 1.0, 3.0, 4.0, -0.0]


def test_global_scale_edge_cases():
    amax = torch.tensor([0.0, float("inf"), 1e-45, 2688.0, float("nan")])
    assert global_encode_scale(amax).tolist() == [1.0, 1.0, F32_MAX, 1.0, F32_MAX]
    # alpha from the amaxes, TE's order: (a * b) * fp32(1/7225344)
    a, b = torch.tensor(3.0), torch.tensor(5.0)
    expected = f32(f32(torch.tensor(15.0).double()) * f32(torch.tensor(1.0 / 7225344.0, dtype=torch.float64)))
    assert gemm_alpha(a, b).double() == expected


def test_cast_sqnr_of_gaussian_1x16_and_16x16():
    """Stated bounds: a Gaussian tensor cast 1x16 keeps >= 19 dB (measured 20.4), 16x16 >= 17 dB."""
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(3))
    for role, bound in ((Role.INPUT, 19.0), (Role.WEIGHT, 17.0)):
        q, dec, s_dec = _cast(NVFP4BlockScaling(), x, role, ROWWISE)
        block = NVFP4BlockScaling().block(role, ROWWISE)
        deq = dequantize_blocks(q, block, dec, torch.float64) * s_dec
        assert _sqnr(x.double(), deq) >= bound


def _sqnr(ref, got):
    return 10 * math.log10(float((ref**2).sum() / ((ref - got) ** 2).sum()))


# --- 2. the recipe ---------------------------------------------------------------------------


def test_fields_and_defaults_follow_te(te_recipe_220):
    te = te_recipe_220.NVFP4BlockScaling
    ours = NVFP4BlockScaling()
    for name in (
        "disable_rht",
        "disable_stochastic_rounding",
        "disable_2d_quantization",
        "row_scaled_activation",
        "nvfp4_4over6",
        "nvfp4_4over6_e4m3_use_256",
        "nvfp4_4over6_err_mode",
    ):
        assert getattr(ours, name) == getattr(te, name), name
    assert SCALINGS["nvfp4"] is NVFP4BlockScaling
    assert ours.te_recipe()["recipe"] == "NVFP4BlockScaling"
    # TE's QParams per tensor say where RHT, SR and 2-D blocks apply; fp8lab's recipe agrees
    off = NVFP4BlockScaling(disable_rht=True, disable_stochastic_rounding=True, disable_2d_quantization=True)
    for scaling in (ours, off):
        built = te(**scaling.te_recipe()["kwargs"])
        for attr, role in (
            ("fp4_quant_fwd_inp", Role.INPUT),
            ("fp4_quant_fwd_weight", Role.WEIGHT),
            ("fp4_quant_bwd_grad", Role.GRAD_OUTPUT),
        ):
            q = getattr(built, attr)
            assert q.random_hadamard_transform == scaling.rht(role, COLUMNWISE)  # TE: columnwise copies only
            assert not scaling.rht(role, ROWWISE)
            assert q.stochastic_rounding == scaling.stochastic(role)
            assert q.fp4_2d_quantization == (scaling.block(role, ROWWISE) == (16, 16))


def test_selected_from_the_cli_and_runs_emulated():
    from pathlib import Path

    from fp8lab.run.overrides import apply_overrides
    from fp8lab.run.recipe_file import load_recipe

    config = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.py")
    fp8 = next(v.name for v in config.variants if v.precision == "fp8")
    config = apply_overrides(
        config, [f"variants.{fp8}.scaling=nvfp4", f"variants.{fp8}.scaling.disable_2d_quantization=true"]
    )
    assert next(v for v in config.variants if v.name == fp8).scaling == NVFP4BlockScaling(disable_2d_quantization=True)
    rows = list(fp8lab.describe(_layer(NVFP4BlockScaling())))
    assert rows[0].precision == "fp8" and rows[0].backend == "emulated"


@pytest.fixture
def te_recipe_220(monkeypatch):
    from tests import te_wheel

    for var in ("NVTE_NVFP4_DISABLE_RHT", "NVTE_NVFP4_DISABLE_STOCHASTIC_ROUNDING", "NVTE_NVFP4_4OVER6"):
        monkeypatch.delenv(var, raising=False)
    root = te_wheel.wheel("2.20.2")
    if isinstance(root, str):
        pytest.skip(root)
    return te_wheel.recipe_module(root)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("nvfp4_4over6", "all", "'none'"),
        ("row_scaled_activation", True, "False"),
        ("fp4_format", "e3m0", "'e2m1'"),
        ("fp8_format", "hybrid", "'e4m3'"),
        ("nvfp4_4over6_err_mode", "L2", "MAE"),
        ("disable_rht", 1, "bool"),
    ],
)
def test_unmodelled_fields_are_refused(field, value, allowed):
    with pytest.raises(ValueError, match=field) as err:
        NVFP4BlockScaling(**{field: value})
    assert allowed in str(err.value)


def test_only_fp32_accumulation_is_accepted():
    for kind in ("fast", "promoted"):
        with pytest.raises(ValueError, match="Blackwell's MMA"):
            FP8Options(scaling=NVFP4BlockScaling(), accumulation=kind)
    assert FP8Options(scaling=NVFP4BlockScaling()).accumulator(0).kind == "fp32"


def test_block_shapes_rht_and_sr_per_operand():
    s = NVFP4BlockScaling()
    assert s.block(Role.WEIGHT, ROWWISE) == (16, 16) and s.block(Role.WEIGHT, COLUMNWISE) == (16, 16)
    assert s.block(Role.INPUT, ROWWISE) == (1, 16) and s.block(Role.GRAD_OUTPUT, COLUMNWISE) == (16, 1)
    assert NVFP4BlockScaling(disable_2d_quantization=True).block(Role.WEIGHT, ROWWISE) == (1, 16)
    assert [s.rht(r, u) for r in Role for u in (ROWWISE, COLUMNWISE)] == [False, True, False, False, False, True]
    assert [s.stochastic(r) for r in Role] == [False, False, True]
    assert s.unsupported("te", None) and s.unsupported("scaled_mm", None) and s.unsupported("emulated", None) is None


def test_2d_weight_copies_are_transposes_of_each_other_1x16_are_not():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(4))
    for scaling, same in ((NVFP4BlockScaling(), True), (NVFP4BlockScaling(disable_2d_quantization=True), False)):
        row = _deq(scaling, w, Role.WEIGHT, ROWWISE)
        col = _deq(scaling, w, Role.WEIGHT, COLUMNWISE)
        assert torch.equal(row, col) == same


def _deq(scaling, x, role, usage):
    q, dec, s_dec = _cast(scaling, x, role, usage)
    return dequantize_blocks(q, scaling.block(role, usage), dec, torch.float64) * s_dec


# --- 3. the GEMM -----------------------------------------------------------------------------


def _layer(scaling, k=64, n=48, seed=5):
    torch.manual_seed(seed)
    return fp8lab.Linear(k, n, fp8=FP8Options(scaling=scaling, fallback="emulated"))


def _gemm_ref(a_q, a_dec, a_block, b_q, b_dec, b_block, alpha):
    """float64 (A_dequant_by_block @ B_dequant_by_block^T) * alpha, and the fp32 sum's error bound."""
    a = dequantize_blocks(a_q, a_block, a_dec, torch.float64)
    b = dequantize_blocks(b_q, b_block, b_dec, torch.float64)
    k = a.shape[1]
    bound = (k * 2.0**-24) * (a.abs() @ b.abs().t()) * alpha
    return (a @ b.t()) * alpha, bound


def test_fprop_dgrad_wgrad_against_float64():
    """y, grad_x and grad_w of a layer equal the float64 products of the operands as this recipe
    casts them (bit-exact casts above), times alpha, within the fp32 accumulation's K * 2^-24 of
    sum |products| plus the output's rounding (float32 output)."""
    scaling = NVFP4BlockScaling(disable_stochastic_rounding=True)
    layer = _layer(scaling)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(6), requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    w = layer.weight.detach()
    ops = {}
    for name, t, role in (("x", x.detach(), Role.INPUT), ("w", w, Role.WEIGHT), ("g", gy, Role.GRAD_OUTPUT)):
        for usage in (ROWWISE, COLUMNWISE):
            q, dec, amax, _ = scaling.quantize(t, role, usage)
            ops[name, usage] = (q, dec, scaling.block(role, usage), amax)

    def check(out, a, b, extra=None):
        (aq, adec, ab, aamax), (bq, bdec, bb, bamax) = a, b
        ref, bound = _gemm_ref(aq, adec, ab, bq, bdec, bb, gemm_alpha(aamax, bamax).double())
        if extra is not None:
            ref = ref + extra
        assert ((out.double() - ref).abs() <= bound + ref.abs() * 2.0**-24 + 1e-30).all()

    bias = layer.bias.detach().to(torch.bfloat16).double()  # an FP8 GEMM's bias is bf16 (DESIGN.md)
    check(y.detach(), ops["x", ROWWISE], ops["w", ROWWISE], bias)
    # dgrad: grad_x = g @ w, contracting N: w's columnwise copy, transposed into (K, N) rows
    wq, wdec, wb, wamax = ops["w", COLUMNWISE]
    check(x.grad, ops["g", ROWWISE], (wq.t(), wdec.t(), wb[::-1], wamax))
    # wgrad: grad_w = g^T @ x, contracting the tokens: both columnwise copies (RHT-transformed)
    gq, gdec, gb, gamax = ops["g", COLUMNWISE]
    xq, xdec, xb, xamax = ops["x", COLUMNWISE]
    check(layer.weight.grad, (gq.t(), gdec.t(), gb[::-1], gamax), (xq.t(), xdec.t(), xb[::-1], xamax))


def test_layer_sqnr_bound():
    """Stated bound: an NVFP4 Linear's output against float64 keeps >= 14 dB (measured ~17)."""
    layer = _layer(NVFP4BlockScaling(), k=128, n=64)
    x = torch.randn(128, 128, generator=torch.Generator().manual_seed(7))
    y = layer(x).detach().double()
    ref = x.double() @ layer.weight.detach().double().t() + layer.bias.detach().double()
    assert _sqnr(ref, y) >= 14.0


# --- 4. stochastic rounding ------------------------------------------------------------------


def test_sr_exactly_unbiased_over_all_random_bits():
    """For values on a step/256 grid, the mean over all 256 random-bit values is the value itself."""
    steps = torch.tensor([0.5] * 4 + [1.0] * 2 + [2.0])
    lows = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    k = torch.arange(256, dtype=torch.float32)
    for lo, step in zip(lows, steps):
        v = (lo + k * step / 256).repeat(256, 1)  # (r, value)
        for sign in (1.0, -1.0):
            r = torch.arange(256).unsqueeze(1).expand_as(v)
            q = round_to_e2m1(sign * v, r)
            assert torch.equal(q.double().mean(dim=0), (sign * v[0]).double())
            assert ((q - sign * v).abs() < step).all()  # only the two neighbours


def test_sr_bit_exact_against_a_scalar_reference_of_tes_definition():
    """Every element against TE's ``stochastic_round_fp4_e2m1`` written per element in Python: the
    float32 fma of r/256 * step(|x|) + |x| (numpy float32: one rounding, the product being exact),
    the floor onto the spacing at the sum, satfinite at 6, x's sign, NaN -> +6; on random values
    of every magnitude, zeros of both signs, subnormals, inf and NaN."""
    import numpy as np

    def step(a):
        return np.float32(2.0 if a >= 4 else 1.0 if a >= 2 else 0.5)

    def reference(x, r):
        if math.isnan(x):
            return 6.0
        a = np.float32(abs(x))
        t = np.float32(a + np.float32(np.float32(r / 256) * step(a)))
        q = min(math.floor(t / step(t)) * float(step(t)), 6.0) if not math.isinf(t) else 6.0
        return math.copysign(q, x)

    g = torch.Generator().manual_seed(11)
    x = torch.randn(4000, generator=g) * torch.logspace(-3, 1.5, 4000)
    x[:8] = torch.tensor([0.0, -0.0, 1e-40, -1e-40, float("inf"), -float("inf"), float("nan"), -float("nan")])
    r = torch.randint(0, 256, x.shape, generator=g)
    got = round_to_e2m1(x, r)
    want = torch.tensor([reference(float(v), int(b)) for v, b in zip(x, r)], dtype=torch.float32)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_sr_monte_carlo_mean_converges():
    """Any values: |mean of N SR casts - value| <= step/256 (the 8-bit resolution) + 5 sigma,
    sigma <= step / (2 sqrt N)."""
    g = torch.Generator().manual_seed(8)
    v = torch.rand(64, generator=g) * 6
    n = 4000
    rbits = torch.randint(0, 256, (n, 64), generator=g)
    mean = round_to_e2m1(v.expand(n, 64), rbits).double().mean(dim=0)
    step = torch.where(v >= 4, 2.0, torch.where(v >= 2, 1.0, 0.5)).double()
    assert ((mean - v.double()).abs() <= step / 256 + 5 * step / (2 * math.sqrt(n))).all()
    assert not torch.equal(round_to_e2m1(v.expand(n, 64), rbits)[0], round_to_e2m1(v))


def test_sr_off_is_round_to_nearest_even_and_on_differs():
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(9))
    grads = {}
    for sr in (False, True):
        layer = _layer(NVFP4BlockScaling(disable_stochastic_rounding=not sr), k=64, n=32)
        x_ = x.clone().requires_grad_()
        layer(x_).backward(torch.ones(32, 32) * torch.arange(32.0))
        grads[sr] = x_.grad
    off = NVFP4BlockScaling(disable_stochastic_rounding=True)
    assert off.new_state() is None and NVFP4BlockScaling().new_state() is not None
    assert not torch.equal(grads[False], grads[True])


def test_sr_resume_is_bit_exact():
    """A layer's SR cast counter is in its state_dict: a copy loaded from a checkpoint after two
    steps draws the same bits in step three; another seed draws others."""
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(10))

    def step(layer):
        layer.zero_grad()
        layer(x).pow(2).sum().backward()
        return layer.weight.grad.clone()

    a = _layer(NVFP4BlockScaling())
    step(a), step(a)
    saved = {k: v.clone() for k, v in a.state_dict().items()}
    assert saved["fp8_state.sr_casts"].item() == 4  # two casts (dgrad, wgrad copies) per step
    b = _layer(NVFP4BlockScaling(), seed=99)
    b.load_state_dict(saved)
    assert torch.equal(step(a), step(b))
    c = _layer(NVFP4BlockScaling(sr_seed=1), seed=99)
    c.load_state_dict(saved)
    assert not torch.equal(step(c), step(b))


# --- 5. the random Hadamard transform --------------------------------------------------------


def test_rht_matrix_is_tes_and_orthogonal():
    t = rht_matrix(torch.tensor(RHT_SIGNS)).double()
    assert torch.equal(t @ t.t(), torch.eye(16, dtype=torch.float64))  # exact: entries +-1/4
    sylvester = torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(16)] for i in range(16)]).double()
    assert torch.equal(hadamard(16), sylvester)
    assert torch.equal(t * 4, torch.diag(torch.tensor(RHT_SIGNS).double()) @ sylvester)


def test_rht_cancels_in_the_wgrad_product():
    """(T g)^T (T x) = g^T x: exactly in float64 algebra; in float32 to rounding; and the quantized
    product with RHT is as close to the exact one as without it (within 1 dB, both >= 12 dB)."""
    gen = torch.Generator().manual_seed(11)
    g, x = torch.randn(80, 24, generator=gen), torch.randn(80, 40, generator=gen)
    exact = g.double().t() @ x.double()
    moved = (
        apply_rht_dim0(g, rht_matrix(torch.tensor(RHT_SIGNS))).double().t()
        @ apply_rht_dim0(x, rht_matrix(torch.tensor(RHT_SIGNS))).double()
    )
    assert torch.allclose(moved, exact, rtol=0, atol=1e-4)
    sq = {}
    for rht in (True, False):
        s = NVFP4BlockScaling(disable_rht=not rht)
        gd = _deq(s, g, Role.GRAD_OUTPUT, COLUMNWISE)
        xd = _deq(s, x, Role.INPUT, COLUMNWISE)
        sq[rht] = _sqnr(exact, gd.t() @ xd)
    assert min(sq.values()) >= 12.0 and abs(sq[True] - sq[False]) <= 1.0


def test_rht_beats_plain_1x16_on_a_tensor_with_an_outlier():
    """One element 1e6 in a unit Gaussian: the global scale pushes every other block's E4M3 scale
    below E4M3's range (plain 1x16: < 5 dB on the other values); RHT spreads the outlier over its
    16 rows, lowering the global amax 4x (>= 15 dB). Measured in the original basis (T^-1 = T^T)."""
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    x[5, 7] = 1e6
    rest = torch.ones_like(x, dtype=torch.bool)
    rest[0:16, 7] = False
    t = rht_matrix(torch.tensor(RHT_SIGNS)).double()
    sq = {}
    for rht in (False, True):
        s = NVFP4BlockScaling(disable_rht=not rht)
        d = _deq(s, x, Role.INPUT, COLUMNWISE)
        if rht:  # undo: each 16-row group of each column times T^T
            d = (d.reshape(-1, 16, 64).transpose(1, 2) @ t.t()).transpose(1, 2).reshape(256, 64)
        sq[rht] = (_sqnr(x.double()[rest], d[rest]), _sqnr(x.double(), d))
    assert sq[False][0] < 5.0 and sq[True][0] >= 15.0
    assert sq[True][1] > sq[False][1] + 10.0


def test_telemetry_cast_and_block_statistics_and_whatif_row():
    layer = _layer(NVFP4BlockScaling())
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(12), requires_grad=True)
    layer.telemetry.arm(layer.weight.device)
    layer(x).backward(torch.randn(32, 48, generator=torch.Generator().manual_seed(13)))
    layer.telemetry.disarm()
    view = layer.scaling_view()
    assert torch.isfinite(view.cast_stats).all() and torch.isfinite(view.block_stats).all()
    assert torch.equal(view.amax[Role.INPUT], x.detach().abs().max())
    assert (view.cast_stats[:, 2] >= 17.0).all()  # SQNR dB of each role's cast (Gaussian, 1x16 / 16x16)
    row = list(SCALINGS).index("nvfp4")
    assert torch.equal(view.whatif[Role.INPUT, row], view.cast_stats[Role.INPUT])


def test_the_cast_counter_is_kept_on_the_host_and_follows_a_load():
    """The counter's buffer is written, not read, at each cast (a read would sync a GPU); a loaded
    state_dict is where counting continues, also in a state that had counted further."""
    from fp8lab.scaling.nvfp4 import NVFP4State

    state = NVFP4State()
    assert [state.next_cast() for _ in range(3)] == [0, 1, 2] and state.sr_casts.item() == 3
    state.load_state_dict({"sr_casts": torch.tensor(1)})
    assert state.next_cast() == 1 and state.sr_casts.item() == 2
