"""Scale modes beyond TE's defaults: MXFP8's E8M0 rounding modes and float32 block scales.

Tolerances: every scale and every FP8 value is compared bit for bit, MXFP8 against torchao's
own cast (``torchao.prototype.mx_formats.mx_tensor.to_mx``, torchao 0.18), float32 block
scales against a float64 reference written from TE's definition; the GEMM with float32
block scales bit for bit against the accumulator model it calls, and within 2^-20 of the
magnitude sum against the exact float64 sum of the dequantized products; the training
smoke test's loss within 5% of the BF16 run's.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

import fp8lab
from fp8lab import Float8BlockScaling, FP8Options, MXFP8BlockScaling
from fp8lab.accumulation import FP32, Accumulator
from fp8lab.formats import E4M3, E5M2, Role
from fp8lab.gemm.accumulate import tensor_core_accumulate
from fp8lab.gemm.backends.emulated import EmulatedBackend
from fp8lab.gemm.backends.te_mapping import make_te_recipe
from fp8lab.gemm.exact import GemmPath
from fp8lab.gemm.hardware import BackendUnavailable
from fp8lab.gemm.qlinear import quantized_linear
from fp8lab.quantize.blocks import blocks_amax, cast_blocks_dequantized, cast_blocks_fp8
from fp8lab.run.checks import ConfigError
from fp8lab.run.overrides import apply_overrides
from fp8lab.run.recipe_file import load_recipe
from fp8lab.scaling.mxfp8 import SCALE_CALCULATION_MODES
from fp8lab.scaling.protocol import COLUMNWISE, ROWWISE
from fp8lab.scaling.te_scales import e8m0_scale, e8m0_scale_inv, float_to_e8m0, te_scale_from_amax

ROOT = Path(__file__).resolve().parents[1]
F32 = torch.float32


# --- MXFP8: E8M0 scale rounding modes against torchao --------------------------------------


def _torchao():
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    config = pytest.importorskip("torchao.prototype.mx_formats.config")
    return mx.to_mx, config.ScaleCalculationMode


def _edge_blocks(fmt) -> torch.Tensor:
    """(R, 32) float32 rows, one MX block each: the cases where rounding modes part ways."""
    gen = torch.Generator().manual_seed(0)
    amaxes = []
    for k in range(-20, 21, 3):
        for base in (2.0**k, fmt.max * 2.0**k, 1.5 * 2.0**k, 1.9375 * 2.0**k):  # pow2, fp8_max * 2^k, mid, even's edge
            t = torch.tensor([base], dtype=F32)
            amaxes += [torch.nextafter(t, torch.zeros(1)), t, torch.nextafter(t, torch.full((1,), math.inf))]
    amaxes += [torch.tensor([v], dtype=F32) for v in (fmt.max, fmt.max * 0.999, fmt.max * 1.001, 3.0e38, 1e-30)]
    amax = torch.cat(amaxes)
    rows = torch.randn(len(amax), 32, generator=gen).clamp(-3, 3) / 3 * amax[:, None] * 0.99
    rows[:, 7] = amax  # the block's amax, exactly
    rows[::2, 9] = -amax[::2]
    rows[:, 20:24] *= 2.0**-14  # elements in (or under) the FP8 subnormal range of their block
    zero = torch.zeros(1, 32)
    return torch.cat([rows, zero])


def _varied(fmt) -> torch.Tensor:
    """(64, 512): Gaussian blocks of magnitudes 2^-40 .. 2^40, a zero block, the edge blocks."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 512, generator=gen) * torch.exp2(
        torch.randint(-40, 41, (64, 16), generator=gen).float()
    ).repeat_interleave(32, dim=1)
    x[3, 64:96] = 0.0
    edges = _edge_blocks(fmt).reshape(-1)
    n = edges.numel() // 512 * 512
    return torch.cat([x, edges[:n].reshape(-1, 512)])


def _fp8lab_mx(x: torch.Tensor, mode: str, fmt):
    scaling = MXFP8BlockScaling(scale_calculation_mode=mode)
    amax = blocks_amax(x, (1, 32))
    scale, _ = scaling.block_scales(amax, fmt, x.dtype)
    return scaling.block_codes(amax, fmt), cast_blocks_fp8(x, (1, 32), scale, fmt)


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("mode", SCALE_CALCULATION_MODES)
def test_mxfp8_mode_equals_torchao_bit_for_bit(mode, fmt):
    """Scales (E8M0 codes) and FP8 values of every block, bit for bit, except two documented
    departures of "rceil", which is TE's exact round-up: torchao's eager fallback takes
    ceil(log2(amax / fp8_max)) in float32, whose log2 rounds a quotient just above 2^k down
    to k (TE and torchao's own Blackwell path round it up); and a block with E8M0 code 0
    (amax below ~fp8_max * 2^-127), here only blocks of zeros, whose nonzero values each library
    would cast its own way."""
    to_mx, Mode = _torchao()
    for x in (_varied(fmt), torch.cat([_edge_blocks(fmt)] * 2).reshape(-1, 64)):
        code, q = _fp8lab_mx(x, mode, fmt)
        ao_scale, ao_q = to_mx(x, fmt.dtype, 32, Mode(mode))
        ao_code = ao_scale.view(torch.uint8).to(torch.int32)
        assert code.shape == ao_code.shape and bool(((code > 0) | (blocks_amax(x, (1, 32)) == 0)).all())
        if mode == "rceil":
            # torchao's float32 log2 of a quotient one ulp above a power of two
            descale = blocks_amax(x, (1, 32)) / fmt.max
            exact_pow2 = (descale.view(torch.int32) & 0x7FFFFF) == 0
            log2_is_int = ~exact_pow2 & (torch.log2(descale) == torch.floor(torch.log2(descale)))
            differ = code != ao_code
            assert bool((log2_is_int | ~differ).all())  # they differ only there ...
            assert bool((code[differ] == ao_code[differ] + 1).all())  # ... by torchao not rounding up
            assert bool((code == float_to_e8m0(descale)).all())  # the exact round-up of amax / fp8_max
            assert 0 < int(differ.sum()) < code.numel() // 4 or x.shape[1] != 64
            keep = ~differ
            code, ao_code = code[keep], ao_code[keep]
            q = q.reshape(*keep.shape, 32)[keep]
            ao_q = ao_q.reshape(*keep.shape, 32)[keep]
        assert torch.equal(code, ao_code), mode
        assert torch.equal(q.view(torch.uint8), ao_q.view(torch.uint8)), mode


def test_mxfp8_modes_differ_where_they_should():
    """The test above would fail with one rule for all: each pair of modes disagrees on some
    edge block, and on a block whose amax is a power of two times fp8_max all agree but floor."""
    x = _edge_blocks(E4M3)
    codes = {mode: _fp8lab_mx(x, mode, E4M3)[0] for mode in SCALE_CALCULATION_MODES}
    for a in SCALE_CALCULATION_MODES:
        for b in SCALE_CALCULATION_MODES:
            if a < b:
                assert not torch.equal(codes[a], codes[b]), (a, b)
    block = torch.zeros(2, 32)
    block[0, 0] = 448.0  # 1.75 * 2^8: rceil 2^0 (448 / 448 = 1); floor, even 2^(8 - 8); ceil 2^(9 - 8)
    block[1, 0] = 496.0  # 1.9375 * 2^8: even rounds 3 fraction bits up to 2^9, floor keeps 2^8
    got = {m: _fp8lab_mx(block, m, E4M3)[0].reshape(-1).tolist() for m in SCALE_CALCULATION_MODES}
    assert got == {"rceil": [127, 128], "floor": [127, 127], "ceil": [128, 128], "even": [127, 128]}


def test_mxfp8_default_is_rceil_and_unchanged():
    """The default is TE's rule, computed as before (float_to_e8m0 of amax times 1/fp8_max)."""
    assert MXFP8BlockScaling().scale_calculation_mode == "rceil"
    x = _varied(E4M3)
    amax = blocks_amax(x, (1, 32))
    scale, scale_inv = MXFP8BlockScaling().block_scales(amax, E4M3, x.dtype)
    old_code = float_to_e8m0(amax * torch.full((), 1.0 / 448.0))
    assert torch.equal(scale, e8m0_scale(old_code)) and torch.equal(scale_inv, e8m0_scale_inv(old_code))


def test_mxfp8_code_zero_block_is_cast_unscaled_as_te_does():
    """A block whose amax is below fp8_max * 2^-127 gets E8M0 code 0, and TE's ``exp2f_rcp(0)``
    is 1: its values are cast unscaled, so nonzero ones far below E4M3's smallest subnormal
    flush to zero (multiplying them by 2^127 instead would keep them). Its neighbour block,
    with a normal amax, is untouched."""
    x = torch.zeros(1, 64)
    x[0, :32] = torch.linspace(1e-38, 2e-38, 32)  # amax / 448 below 2^-127: code 0
    x[0, 32:] = torch.linspace(-1.0, 1.0, 32)
    code, q = _fp8lab_mx(x, "rceil", E4M3)
    assert code.reshape(-1).tolist()[0] == 0 and code.reshape(-1).tolist()[1] > 0
    assert bool((q.reshape(-1)[:32].float() == 0).all())
    assert bool((q.reshape(-1)[32:].float() != 0).any())


def test_mxfp8_mode_is_validated_and_set_from_the_cli():
    with pytest.raises(ValueError, match=r"scale_calculation_mode must be one of \('rceil', 'floor'"):
        MXFP8BlockScaling(scale_calculation_mode="nearest")
    config = load_recipe(ROOT / "recipes" / "quickstart.py")
    fp8 = next(v.name for v in config.variants if v.precision == "fp8")
    config = apply_overrides(
        config, [f"variants.{fp8}.scaling=mxfp8", f"variants.{fp8}.scaling.scale_calculation_mode=even"]
    )
    assert next(v for v in config.variants if v.name == fp8).scaling.scale_calculation_mode == "even"
    with pytest.raises(ConfigError, match="scale_calculation_mode"):
        apply_overrides(config, [f"variants.{fp8}.scaling.scale_calculation_mode=up"])


def test_te_refuses_mxfp8_modes_it_lacks():
    """TE's MXFP8BlockScaling has no mode field (it rounds up): the backend choice says why, and
    building TE's recipe refuses instead of silently running "rceil"."""

    @dataclasses.dataclass
    class Blackwell:
        capability: tuple = (10, 0)
        cuda: tuple = (12, 9)

    assert MXFP8BlockScaling().unsupported("te", Blackwell()) is None
    for mode in ("floor", "ceil", "even"):
        scaling = MXFP8BlockScaling(scale_calculation_mode=mode)
        assert "rceil" in scaling.unsupported("te", Blackwell())
        with pytest.raises(BackendUnavailable, match=f"scale_calculation_mode='{mode}'"):
            make_te_recipe(scaling, recipe_module=None, te_version="2.20.2")


# --- Float8BlockScaling with float32 (non-power-of-2) scales --------------------------------


def _e4m3_round64(y: torch.Tensor) -> torch.Tensor:
    """Round float64 values to the E4M3 grid, nearest even, clamped to +-448 (the definition)."""
    y = y.clamp(-448.0, 448.0)
    exponent = torch.floor(torch.log2(y.abs().clamp(min=2.0**-9))).clamp(min=-6)
    quantum = torch.exp2(exponent - 3)
    return torch.round(y / quantum) * quantum  # torch.round: half to even


def _reference_f32_block(x: torch.Tensor, eps: float, value_for_inf: float):
    """(scale, scale_inv, fp8 values) of 1x128 tiles from TE's definition, in float64: amax
    floored at eps; 0/inf/NaN give 1; fp8_max / amax rounded once to float32 (a float64
    quotient of float32 numbers rounds to the correctly rounded float32 one), float32
    overflow gives value_for_inf; scale_inv the float32 1 / scale; x * scale rounded to
    float32, then to E4M3."""
    x64 = x.double()
    amax = x64.abs().reshape(x.shape[0], -1, 128).amax(-1)
    amax = torch.where(amax < eps, torch.full_like(amax, eps), amax)
    scale = (448.0 / amax).float().double()
    scale = torch.where(torch.isinf(scale), torch.full_like(scale, value_for_inf), scale)
    scale = torch.where((amax == 0) | torch.isinf(amax), torch.ones_like(scale), scale)
    scale_inv = (1.0 / scale).float().double()
    scaled = (x64.reshape(x.shape[0], -1, 128) * scale[..., None]).float().double()
    return scale, scale_inv, _e4m3_round64(scaled).reshape(x.shape)


def _f32_block_input() -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(48, 512, generator=gen) * torch.exp2(
        torch.randint(-30, 31, (48, 4), generator=gen).float()
    ).repeat_interleave(128, dim=1)
    x[0, :128] = 0.0
    x[1, :128] *= 1e-40 / x[1, :128].abs().max()  # float32-subnormal amax: the scale overflows
    x[2, 128:256] = x[2, 128:256].sign() * 448.0 * 2.0**5  # amax exactly fp8_max * 2^k
    x[3, 256:384] *= 1e-3  # below the epsilon below
    return x


def test_f32_block_scales_and_casts_equal_the_float64_reference():
    x = _f32_block_input()
    for eps in (0.0, 1e-2):
        scaling = Float8BlockScaling(use_f32_scales=True, amax_epsilon=eps)
        amax = blocks_amax(x, (1, 128))
        scale, scale_inv = scaling.block_scales(amax, E4M3, x.dtype)
        ref_scale, ref_inv, ref_q = _reference_f32_block(x, eps, float(torch.finfo(F32).max))
        assert torch.equal(scale.double(), ref_scale) and torch.equal(scale_inv.double(), ref_inv)
        assert not bool(((scale.view(torch.int32) & 0x7FFFFF) == 0).all())  # not all powers of two
        q = cast_blocks_fp8(x, (1, 128), scale, E4M3)
        assert torch.equal(q.double(), ref_q)
        # the recipe hands the GEMM exactly these FP8 values with these inverse scales
        op = scaling.operand(
            x,
            Role.INPUT,
            ROWWISE,
            state=None,
            backend=EmulatedBackend(GemmPath("fp32", F32, "test")),
            record=False,
            slot=None,
        )
        assert torch.equal(op.values.double(), ref_q) and op.inv_scale is None
        assert torch.equal(op.group_scale.double(), ref_inv)
    # the bf16 input's overflow value is bf16's largest finite value
    bf = x.bfloat16()
    scale, _ = Float8BlockScaling(use_f32_scales=True).block_scales(blocks_amax(bf, (1, 128)), E4M3, bf.dtype)
    assert torch.equal(scale.double(), _reference_f32_block(bf.float(), 0.0, float(torch.finfo(torch.bfloat16).max))[0])


def test_power_of_2_default_is_unchanged():
    """Default block scaling: power-of-2 scales, dequantized values, no group scales with fp32
    accumulation, TE's recipe as before."""
    x = _f32_block_input()
    scaling = Float8BlockScaling()
    assert scaling.use_f32_scales is False and scaling.exact_dequantization
    amax = blocks_amax(x, (1, 128))
    scale, scale_inv = scaling.block_scales(amax, E4M3, x.dtype)
    assert torch.equal(scale, te_scale_from_amax(amax, 448.0, pow2=True, value_for_inf=float(torch.finfo(F32).max)))
    backend = EmulatedBackend(GemmPath("fp32", F32, "test"))
    op = scaling.operand(x, Role.INPUT, ROWWISE, state=None, backend=backend, record=False, slot=None)
    assert op.group_scale is None
    assert torch.equal(op.values, cast_blocks_dequantized(x, (1, 128), scale, scale_inv, E4M3, dtype=F32))
    spec = scaling.te_recipe()
    assert spec["kwargs"]["use_f32_scales"] is False and spec["qparams"]["power_2_scale"] is True
    f32 = Float8BlockScaling(use_f32_scales=True).te_recipe()
    assert f32["kwargs"]["use_f32_scales"] is True and f32["qparams"]["power_2_scale"] is False
    with pytest.raises(ValueError, match="use_f32_scales must be a bool"):
        Float8BlockScaling(use_f32_scales=1)
    config = load_recipe(ROOT / "recipes" / "quickstart.py")
    fp8 = next(v.name for v in config.variants if v.precision == "fp8")
    config = apply_overrides(config, [f"variants.{fp8}.scaling=block", f"variants.{fp8}.scaling.use_f32_scales=true"])
    assert next(v for v in config.variants if v.name == fp8).scaling.use_f32_scales is True


def test_f32_block_gemm_applies_group_scales_at_promotion():
    """fprop with float32 block scales and fp32 accumulation: the layer's output is the model
    (per 128-wide K group, fma(fp32 partial sum, fp32(sA * sB), acc)) bit for bit, and within
    2^-20 of the magnitude sum of the exact float64 sum of the dequantized products."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(32, 384, generator=gen) * torch.logspace(-3, 3, 384)[torch.randperm(384, generator=gen)]
    w = torch.randn(40, 384, generator=gen)
    scaling = Float8BlockScaling(use_f32_scales=True)
    backend = EmulatedBackend(GemmPath("fp32", F32, "test"))
    xo = scaling.operand(x, Role.INPUT, ROWWISE, state=None, backend=backend, record=False, slot=None)
    wo = scaling.operand(w, Role.WEIGHT, ROWWISE, state=None, backend=backend, record=False, slot=None)
    assert xo.group_scale.shape == (32, 3) and wo.group_scale.shape == (40, 3)
    y = quantized_linear(x, w, None, scaling, None, backend, F32, record=False)
    model = tensor_core_accumulate(
        xo.values, wo.values.t(), E4M3, E4M3, FP32, a_group_scale=xo.group_scale, b_group_scale=wo.group_scale.t()
    )
    assert torch.equal(y, model)
    a64 = xo.values.double() * xo.group_scale.double().repeat_interleave(128, dim=1)
    b64 = wo.values.double() * wo.group_scale.double().repeat_interleave(128, dim=1)
    exact = a64 @ b64.t()
    assert bool(((y.double() - exact).abs() <= 2.0**-20 * (a64.abs() @ b64.abs().t())).all())
    # dequantizing in float32 first is not exact with these scales (why the values go raw)
    assert not torch.equal((xo.values * xo.group_scale.repeat_interleave(128, dim=1)).double(), a64)
    # the backward's copies, cast along the other dim, carry their scales the same way
    xc = scaling.operand(x, Role.INPUT, COLUMNWISE, state=None, backend=backend, record=False, slot=None)
    assert xc.group_scale.shape == (1, 384) and xc.block == (128, 1)
    with pytest.raises(Exception, match="promote_every x chunk must be 128"):
        FP8Options(scaling=scaling, accumulation=Accumulator(kind="fp32", promote_every=2))


def test_f32_block_scaling_trains_a_tiny_model():
    """Ten SGD steps of a two-layer MLP: finite, the loss falls, and ends within 5% of BF16's."""

    def run(fp8):
        torch.manual_seed(7)
        model = torch.nn.Sequential(fp8lab.Linear(128, 256, fp8=fp8), torch.nn.GELU(), fp8lab.Linear(256, 128, fp8=fp8))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(8)
        target = torch.randn(128, 128, generator=gen) / 16
        losses = []
        for _ in range(10):
            x = torch.randn(64, 128, generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(model(x).float(), x @ target)
            loss.backward()
            opt.step()
            opt.zero_grad()
            fp8lab.update_scales(model)
            losses.append(float(loss.detach()))
        return losses

    fp8 = run(FP8Options(scaling=Float8BlockScaling(use_f32_scales=True), fallback="emulated"))
    bf16 = run(FP8Options(backend="bf16"))
    assert all(math.isfinite(v) for v in fp8) and fp8[-1] < fp8[0]
    assert abs(fp8[-1] - bf16[-1]) <= 0.05 * bf16[-1]
