"""Which accumulator each GEMM of a Linear runs, on which operands, and what telemetry says.

The references are built here, independently of the layer's code: per-tensor operands from
``cast_to_fp8`` (the real float8 cast), block operands from the transliteration of TE's
kernels (tests/te_reference.py) with their scales, the accumulator model's pure-torch
implementation (tests/test_accumulate.py holds it bit-exact to the integer reference of the
five steps), and the epilogue ``round(acc * inv_scale + bias)``. Every comparison is exact
(``torch.equal``). Each test also shows the other model would differ, so it fails if the
wiring swaps fast and promoted (e.g. promotion in the forward GEMM of delayed scaling under
"te", or none in its wgrad).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fp8lab
from fp8lab.accumulation import FP32, HOPPER_FAST, HOPPER_PROMOTED, Accumulator
from fp8lab.formats import E4M3, E5M2
from fp8lab.gemm import accumulate as acc_mod
from fp8lab.gemm.exact import epilogue_bias
from fp8lab.quantize.tensor import cast_to_fp8
from fp8lab.scaling import DelayedScaling, Float8BlockScaling, Float8CurrentScaling, MXFP8BlockScaling
from tests import te_reference as ref

TORCH = acc_mod.AccumulatePath("torch", "reference: the pure-torch accumulator model")
IN, OUT, TOKENS = 256, 192, 256  # fprop K = 256, dgrad K = 192, wgrad K = 256 tokens: 6-8 instructions


def _model(a, b, fa, fb, acc, inv=None, bias=None, out_dtype=torch.bfloat16, groups=(None, None)):
    """The reference GEMM: the accumulator model (pure torch), then the epilogue."""
    if acc.kind == "fp32" and groups == (None, None):
        total = (a.double() @ b.double()).float()  # exact products, one rounding: fp32 accumulation of this data
    else:
        total = acc_mod.tensor_core_accumulate(
            a, b, fa, fb, acc, a_group_scale=groups[0], b_group_scale=groups[1], path=TORCH
        )
    if inv is not None:
        total = total * inv
    if bias is not None:
        total = total + bias.float()
    return total.to(out_dtype)


def _step(fp8: fp8lab.FP8Options, scales=None, seed: int = 0):
    """One emulated Linear step under bf16 autocast; returns (layer, x2d, g2d, y, grad_x, grad_w)."""
    torch.manual_seed(seed)
    layer = fp8lab.Linear(IN, OUT, fp8=fp8)
    if scales is not None:
        layer.fp8_state.scale.copy_(scales)
    x = torch.randn(TOKENS, IN, requires_grad=True)
    g = (torch.randn(TOKENS, OUT) * 1e-3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(g)
    return layer, x.detach(), g, y, x.grad, layer.weight.grad


DELAYED_SCALES = torch.tensor([448.0 / 4.1, 448.0 / 0.21, 57344.0 / 0.013])


def test_te_runs_the_forward_fast_and_the_backward_promoted_under_delayed_scaling():
    layer, x, g, y, grad_x, grad_w = _step(fp8lab.FP8Options(fallback="emulated"), DELAYED_SCALES)
    s_x, s_w, s_g = DELAYED_SCALES.unbind()
    x_q, w_q = cast_to_fp8(x, s_x, E4M3).float(), cast_to_fp8(layer.weight.detach(), s_w, E4M3).float()
    g_q = cast_to_fp8(g, s_g, E5M2).float()
    bias = epilogue_bias(layer.bias.detach(), torch.bfloat16, fp8=True)
    inv = {
        "fprop": s_x.reciprocal() * s_w.reciprocal(),
        "dgrad": s_g.reciprocal() * s_w.reciprocal(),
        "wgrad": s_g.reciprocal() * s_x.reciprocal(),
    }
    gemms = {
        "fprop": (y, lambda acc: _model(x_q, w_q.t(), E4M3, E4M3, acc, inv["fprop"], bias), HOPPER_FAST),
        "dgrad": (grad_x.bfloat16(), lambda acc: _model(g_q, w_q, E5M2, E4M3, acc, inv["dgrad"]), HOPPER_PROMOTED),
        "wgrad": (grad_w.bfloat16(), lambda acc: _model(g_q.t(), x_q, E5M2, E4M3, acc, inv["wgrad"]), HOPPER_PROMOTED),
    }
    for name, (out, model, acc) in gemms.items():
        assert torch.equal(out, model(acc)), name
        other = HOPPER_PROMOTED if acc is HOPPER_FAST else HOPPER_FAST
        assert not torch.equal(out, model(other)), f"{name}: fast and promoted agree here; the test could not tell"


@pytest.mark.parametrize(
    "setting, kinds",
    [("fast", ("fast",) * 3), ("promoted", ("promoted",) * 3), ("te", ("fast", "promoted", "promoted"))],
)
def test_each_setting_names_its_accumulator_per_gemm(setting, kinds):
    for scaling in (DelayedScaling(), Float8CurrentScaling()):
        fp8 = fp8lab.FP8Options(scaling=scaling, accumulation=setting)
        assert tuple(fp8.accumulator(gemm).kind for gemm in range(3)) == kinds
    assert fp8lab.FP8Options(accumulation="fp32").accumulator(0) is FP32
    custom = Accumulator(kind="promoted", promote_every=8)
    assert fp8lab.FP8Options(accumulation=custom).accumulator(2) is custom


def test_current_scaling_under_explicit_fast_accumulation():
    fp8 = fp8lab.FP8Options(scaling=Float8CurrentScaling(), fallback="emulated", accumulation="fast")
    layer, x, g, y, grad_x, grad_w = _step(fp8, seed=1)
    scale = lambda t, fmt: Float8CurrentScaling().scale(t.abs().max().float(), fmt)  # noqa: E731
    s_x, s_w, s_g = scale(x, E4M3), scale(layer.weight.detach(), E4M3), scale(g, E5M2)
    x_q, w_q = cast_to_fp8(x, s_x, E4M3).float(), cast_to_fp8(layer.weight.detach(), s_w, E4M3).float()
    g_q = cast_to_fp8(g, s_g, E5M2).float()
    bias = epilogue_bias(layer.bias.detach(), torch.bfloat16, fp8=True)
    assert torch.equal(y, _model(x_q, w_q.t(), E4M3, E4M3, HOPPER_FAST, s_x.reciprocal() * s_w.reciprocal(), bias))
    assert torch.equal(
        grad_x.bfloat16(), _model(g_q, w_q, E5M2, E4M3, HOPPER_FAST, s_g.reciprocal() * s_w.reciprocal())
    )
    wgrad = _model(g_q.t(), x_q, E5M2, E4M3, HOPPER_FAST, s_g.reciprocal() * s_x.reciprocal())
    assert torch.equal(grad_w.bfloat16(), wgrad)
    assert not torch.equal(
        grad_w.bfloat16(), _model(g_q.t(), x_q, E5M2, E4M3, HOPPER_PROMOTED, s_g.reciprocal() * s_x.reciprocal())
    )


def _block_operand(t: torch.Tensor, block: tuple[int, int], fmt, contract_dim: int):
    """(FP8 values, group scales) of TE's block cast of ``t``: the values unscaled, each
    block's inverse scale repeated along the dimension the GEMM does not contract."""
    arr = t.detach().float().numpy()
    max_finite = float(torch.finfo(t.dtype).max)

    def scale_of(amax):
        s = ref.scale_from_amax(amax, ref.FORMATS[fmt.name][0], True, 0.0, max_finite)
        return s, ref.f32(1.0 / s)

    deq = ref.quantize_blocks(arr, block, fmt.name, scale_of)
    br, bc = block
    rows, cols = -(-arr.shape[0] // br), -(-arr.shape[1] // bc)
    s_inv = np.zeros((rows, cols), dtype=np.float64)
    for i in range(rows):
        for j in range(cols):
            amax = float(np.nanmax(np.abs(arr[i * br : (i + 1) * br, j * bc : (j + 1) * bc])))
            s_inv[i, j] = scale_of(amax)[1]
    full = np.repeat(np.repeat(s_inv, br, 0), bc, 1)[: arr.shape[0], : arr.shape[1]]
    raw = torch.from_numpy(deq / full).float()  # exact: power-of-2 scales
    groups = torch.from_numpy(s_inv).float()
    groups = (
        groups.repeat_interleave(br, 0)[: arr.shape[0]]
        if contract_dim == 1
        else groups.repeat_interleave(bc, 1)[:, : arr.shape[1]]
    )
    return raw, groups.contiguous()


def test_block_scaling_promotes_every_gemm_with_its_block_scales():
    scaling = Float8BlockScaling()  # E4M3; x and g in 1x128 tiles, w in 128x128 blocks
    layer, x, g, y, grad_x, grad_w = _step(fp8lab.FP8Options(scaling=scaling, fallback="emulated"), seed=2)
    w = layer.weight.detach()
    x_r, x_rg = _block_operand(x, (1, 128), E4M3, 1)  # fprop: x contracted along K
    w_r, w_rg = _block_operand(w, (128, 128), E4M3, 1)
    g_r, g_rg = _block_operand(g, (1, 128), E4M3, 1)  # dgrad: g contracted along N
    w_c, w_cg = _block_operand(w, (128, 128), E4M3, 0)  # dgrad: w contracted along N (dim 0)
    x_c, x_cg = _block_operand(x, (128, 1), E4M3, 0)  # wgrad: contracted along the tokens
    g_c, g_cg = _block_operand(g, (128, 1), E4M3, 0)
    bias = epilogue_bias(layer.bias.detach(), torch.bfloat16, fp8=True)
    P = HOPPER_PROMOTED
    expected = {
        "fprop": (y, _model(x_r, w_r.t(), E4M3, E4M3, P, None, bias, groups=(x_rg, w_rg.t()))),
        "dgrad": (grad_x.bfloat16(), _model(g_r, w_c, E4M3, E4M3, P, groups=(g_rg, w_cg))),
        "wgrad": (grad_w.bfloat16(), _model(g_c.t(), x_c, E4M3, E4M3, P, groups=(g_cg.t(), x_cg))),
    }
    for name, (out, want) in expected.items():
        assert torch.equal(out, want), name
    # the fp32 accumulation of the same operands differs: the promotion is really modelled
    fp32 = _model(x_r, w_r.t(), E4M3, E4M3, FP32, None, bias, groups=(x_rg, w_rg.t()))
    assert not torch.equal(y, fp32)


def test_mxfp8_accumulates_in_fp32_and_refuses_a_tensor_core_model():
    fp8 = fp8lab.FP8Options(scaling=MXFP8BlockScaling(), fallback="emulated")
    assert all(fp8.accumulator(gemm) is FP32 for gemm in range(3))
    with pytest.raises(ValueError, match=r"^accumulation='promoted' with mxfp8 scaling \(fprop\): MXFP8's"):
        fp8lab.FP8Options(scaling=MXFP8BlockScaling(), accumulation="promoted")
    with pytest.raises(ValueError, match=r"^accumulation='fast' with block scaling \(fprop\): fast accumulation"):
        fp8lab.FP8Options(scaling=Float8BlockScaling(), accumulation="fast")
    with pytest.raises(ValueError, match="promote_every x chunk must be 128"):
        fp8lab.FP8Options(scaling=Float8BlockScaling(), accumulation=Accumulator(kind="promoted", promote_every=2))
    with pytest.raises(ValueError, match=r"^accumulation must be one of \('te', 'fp32', 'promoted', 'fast'\)"):
        fp8lab.FP8Options(accumulation="exact")


def test_accumulator_telemetry_is_the_sqnr_against_fp32_accumulation(monkeypatch):
    fp8 = fp8lab.FP8Options(fallback="emulated")
    torch.manual_seed(5)
    layer = fp8lab.Linear(IN, OUT, fp8=fp8)
    layer.fp8_state.scale.copy_(DELAYED_SCALES)
    layer.telemetry.arm(torch.device("cpu"))
    x = torch.randn(TOKENS, IN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(torch.randn_like(y) * 1e-3)
    layer.telemetry.disarm()
    accum = layer.telemetry.accum_sqnr
    assert torch.isfinite(accum).all(), accum
    # fast (fprop) costs more than promoted (dgrad, wgrad), and both far less than the cast
    assert accum[0] < accum[1] and accum[0] < accum[2] and accum.min() > layer.telemetry.shadow_sqnr.max()
    s_x, s_w = DELAYED_SCALES[0], DELAYED_SCALES[1]
    x_q, w_q = cast_to_fp8(x.detach(), s_x, E4M3).float(), cast_to_fp8(layer.weight.detach(), s_w, E4M3).float()
    bias = epilogue_bias(layer.bias.detach(), torch.bfloat16, fp8=True)
    inv = s_x.reciprocal() * s_w.reciprocal()
    want_ref, want_out = _model(x_q, w_q.t(), E4M3, E4M3, FP32, inv, bias), y.detach()
    err = (want_out.double() - want_ref.double()).pow(2).sum()
    db = 10 * math.log10(want_ref.double().pow(2).sum() / err)
    assert accum[0].item() == pytest.approx(db, abs=1e-3)
    # fp32 accumulation: nothing to measure
    layer32 = fp8lab.Linear(IN, OUT, fp8=fp8lab.FP8Options(fallback="emulated", accumulation="fp32"))
    layer32.telemetry.arm(torch.device("cpu"))
    layer32(torch.randn(8, IN)).sum().backward()
    assert torch.isnan(layer32.telemetry.accum_sqnr).all()


def test_the_report_says_when_accumulation_dominates_a_layers_error():
    from fp8lab.run.accuracy_report import accuracy_lines

    accuracy = {  # mean dB over log steps, as read back from the event files
        ("a", "fprop_sqnr_db"): [30.0],
        ("a", "dgrad_sqnr_db"): [25.0],
        ("a", "wgrad_sqnr_db"): [25.0],
        ("a", "fprop_accum_sqnr_db"): [32.0, 32.5],
        ("a", "dgrad_accum_sqnr_db"): [60.0],
        ("a", "wgrad_accum_sqnr_db"): [61.0],
        ("b", "fprop_sqnr_db"): [31.0],
        ("b", "fprop_accum_sqnr_db"): [45.0],
    }
    text = "\n".join(accuracy_lines("fp8", accuracy))
    assert "accumulator SQNR against fp32 accumulation" in text
    # a's fprop: 32.25 dB against fp32 accumulation, within 3.01 dB of 30 dB: the accumulator is over half the error
    assert "accumulation, not the FP8 cast, dominates the error of: a fprop (32.2 dB against fp32 accumulation" in text
    assert "b fprop" not in text.split("dominates the error of:")[1]
    calm = {k: v for k, v in accuracy.items() if k[0] == "b"}
    assert "the FP8 casts, not the accumulator, dominate every layer's error" in "\n".join(accuracy_lines("fp8", calm))
