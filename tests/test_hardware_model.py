"""The emulation computes what a Hopper GEMM computes (the hardware model of fp8lab.gemm.exact).

Reference, in float64 then float32 tensor ops: the exact sum of the products of the FP8
operand values (float64 holds it exactly at these sizes), rounded once to float32 (the
ideal fp32 accumulator), times ``inv_a * inv_b`` (an fp32 product) in fp32, plus the
epilogue's bias in fp32, rounded once to the output dtype. The operand values come from
torch's real float8 dtypes (``cast_to_fp8``), not from the emulation's own cast.

Bounds: >= 99% of bf16 outputs bit-equal to the reference (a real GEMM accumulates in
another order than the exact sum, which moves an output across a bf16 rounding boundary
for ~0.01-0.1% of outputs; the old emulation, which rounded to bf16 before scaling, was at
65%); fp32 outputs within 1e-5 of max|ref| (fp32 accumulation: ~1e-7). Every exact path
this machine has is checked: "fp32" always, "onednn-bf16" where the CPU runs bf16 natively.
"""

from __future__ import annotations

import pytest
import torch

import fp8lab
from fp8lab import FP8Options
from fp8lab.formats import E4M3, E5M2
from fp8lab.gemm.backends.emulated import EmulatedBackend
from fp8lab.gemm.backends.rounded import RoundedBackend
from fp8lab.gemm.backends.scaled_mm import ScaledMMBackend
from fp8lab.gemm.exact import GemmPath, cpu_has_native_bf16, gemm_path
from fp8lab.quantize.tensor import cast_to_fp8
from tests.helpers import equal_fraction, fp32_error, hw_reference

FP32_PATH = GemmPath("fp32", torch.float32, "fp32 (forced by the test)")
ONEDNN_PATH = GemmPath("onednn-bf16", torch.bfloat16, "oneDNN bf16 (forced by the test)")
PATHS = [FP32_PATH] + ([ONEDNN_PATH] if cpu_has_native_bf16() else [])
PATH_IDS = [p.name for p in PATHS]
BF16_EQUAL = 0.99
FP32_REL = 1e-5


def _scales(gen):
    """Non-power-of-2 scales, as delayed scaling produces them (fp8_max / amax)."""
    return (torch.tensor(448.0) / (torch.rand(3, generator=gen) * 40 + 3)).float()


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_emulated_gemm_is_the_hardware_model(path, out_dtype):
    gen = torch.Generator().manual_seed(0)
    m, k, n = 96, 320, 192
    x = (torch.randn(m, k, generator=gen) * 3).bfloat16()
    w = torch.randn(n, k, generator=gen) * 0.05
    bias = torch.randn(n, generator=gen)
    s_x, s_w, _ = _scales(gen)
    backend = EmulatedBackend(path)
    x_q, w_q = backend.quantize(x, s_x, E4M3), backend.quantize(w, s_w, E4M3)
    x_ref, w_ref = cast_to_fp8(x, s_x, E4M3).double(), cast_to_fp8(w, s_w, E4M3).double()
    assert torch.equal(x_q.double(), x_ref) and torch.equal(w_q.double(), w_ref)
    inv_x, inv_w = s_x.reciprocal(), s_w.reciprocal()
    b = fp8lab.gemm.exact.epilogue_bias(bias, out_dtype, fp8=True)

    out = backend.gemm(x_q, w_q.t(), inv_x, inv_w, out_dtype, b)
    ref = hw_reference(x_ref, w_ref.T, inv_x * inv_w, b, out_dtype)
    assert out.dtype == out_dtype
    if out_dtype == torch.bfloat16:
        assert equal_fraction(out, ref) >= BF16_EQUAL
        # the model is not "round to bf16, then scale": that differs for a third of outputs
        rounded_first = ((x_ref @ w_ref.T).float().bfloat16().float() * (inv_x * inv_w) + b.float()).bfloat16()
        assert equal_fraction(rounded_first, ref) < 0.9
    else:
        assert fp32_error(out, ref) <= FP32_REL


def _quantized(x, scale, fmt):
    return cast_to_fp8(x, scale, fmt).double()


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast-bf16", "fp32"])
def test_linear_fprop_dgrad_wgrad_are_the_hardware_model(path, autocast, monkeypatch):
    """Through fp8lab.Linear: with bias, non-power-of-2 scales, every GEMM of the step, each
    accumulated in fp32 (the ideal accumulator; tests/test_accumulation_wiring.py checks the
    tensor-core accumulator models the default accumulation="te" runs)."""
    monkeypatch.setattr(fp8lab.layers.linear, "backend_for", lambda name, device: EmulatedBackend(path))
    torch.manual_seed(1)
    layer = fp8lab.Linear(256, 192, fp8=FP8Options(fallback="emulated", accumulation="fp32"))
    scales = torch.tensor([448.0 / 4.7, 448.0 / 0.093, 57344.0 / 0.011])
    layer.fp8_state.scale.copy_(scales)
    s_x, s_w, s_g = scales.unbind()
    x = torch.randn(4, 24, 256, requires_grad=True)
    g = torch.randn(4, 24, 192) * 1e-3
    dtype = torch.bfloat16 if autocast else torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.backward(g.to(dtype))

    x_q = _quantized(x.detach().reshape(-1, 256), s_x, E4M3)
    w_q = _quantized(layer.weight.detach(), s_w, E4M3)
    g_q = _quantized(g.to(dtype).reshape(-1, 192), s_g, E5M2)
    bias = fp8lab.gemm.exact.epilogue_bias(layer.bias.detach(), dtype, fp8=True)
    refs = {
        "fprop": (y.reshape(-1, 192), hw_reference(x_q, w_q.T, s_x.reciprocal() * s_w.reciprocal(), bias, dtype)),
        "dgrad": (x.grad.reshape(-1, 256), hw_reference(g_q, w_q, s_g.reciprocal() * s_w.reciprocal(), None, dtype)),
        "wgrad": (layer.weight.grad, hw_reference(g_q.T, x_q, s_g.reciprocal() * s_x.reciprocal(), None, dtype)),
    }
    for name, (out, ref) in refs.items():
        if autocast:  # bf16 GEMM outputs; autograd casts dgrad and wgrad to fp32 exactly
            assert torch.equal(out.to(torch.bfloat16).float(), out.float()), name
            assert equal_fraction(out, ref) >= BF16_EQUAL, name
        else:
            assert fp32_error(out, ref) <= FP32_REL, name


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_bf16_backend_is_the_bf16_hardware_model(path):
    gen = torch.Generator().manual_seed(2)
    x, w, bias = torch.randn(64, 96, generator=gen), torch.randn(80, 96, generator=gen), torch.randn(80, generator=gen)
    backend = RoundedBackend(path, "bf16")
    b = fp8lab.gemm.exact.epilogue_bias(bias, torch.bfloat16, fp8=False)
    out = backend.gemm(backend.round(x), backend.round(w).t(), None, None, torch.bfloat16, b)
    ref = hw_reference(x.bfloat16().double(), w.bfloat16().double().T, None, b, torch.bfloat16)
    assert equal_fraction(out, ref) >= BF16_EQUAL
    out32 = backend.gemm(backend.round(x), backend.round(w).t(), None, None, torch.float32, bias)
    assert (
        fp32_error(out32, hw_reference(x.bfloat16().double(), w.bfloat16().double().T, None, bias, torch.float32))
        <= FP32_REL
    )


def test_this_machine_picks_an_exact_path_and_says_which():
    path = gemm_path("cpu")
    assert path.name == ("onednn-bf16" if cpu_has_native_bf16() else "fp32")
    assert path.reason.startswith("exact GEMM:")
    layer = fp8lab.Linear(32, 32, fp8=FP8Options(fallback="emulated"))
    assert f"; {path.reason}; accumulation (te): " in layer.plan().reason


# ---------------------------------------------------------------- torch._scaled_mm on CPU
def _power_of_two_scales():
    return torch.tensor([2.0**5, 2.0**-3, 2.0**9])


def _any_scales():
    return torch.tensor([448.0 / 3.3, 448.0 / 0.17, 57344.0 / 0.021])


@pytest.mark.parametrize("tokens", [5, 21, 32])
@pytest.mark.parametrize(
    "scales, exact", [(_power_of_two_scales(), True), (_any_scales(), False)], ids=["pow2-scales", "any-scales"]
)
def test_scaled_mm_backend_on_cpu_equals_the_emulation(tokens, scales, exact):
    """The real scaled_mm backend, run by torch's CPU kernel (dequantize, then an fp32
    GEMM; oneDNN pinned off, as hosts with AMX would take a oneDNN path): fprop, dgrad and
    wgrad (whose token count is zero-padded to 16) equal the emulation bit for bit with
    power-of-2 scales, and within one ulp of the output otherwise (the CPU kernel scales
    the operands before the product, the model scales the sum)."""
    gen = torch.Generator().manual_seed(tokens)
    k, n = 48, 32
    x = torch.randn(tokens, k, generator=gen).bfloat16()
    w = torch.randn(n, k, generator=gen) * 0.1
    g = (torch.randn(tokens, n, generator=gen) * 0.01).bfloat16()
    bias = torch.randn(n, generator=gen)
    s_x, s_w, s_g = scales.unbind()
    emu, smm = EmulatedBackend(FP32_PATH), ScaledMMBackend()
    b = fp8lab.gemm.exact.epilogue_bias(bias, torch.bfloat16, fp8=True)
    with torch.backends.mkldnn.flags(enabled=False):
        for name, (a_x, a_s, a_f), (b_x, b_s, b_f), transpose, bias_ in [
            ("fprop", (x, s_x, E4M3), (w, s_w, E4M3), "b", b),
            ("dgrad", (g, s_g, E5M2), (w, s_w, E4M3), None, None),
            ("wgrad", (g, s_g, E5M2), (x, s_x, E4M3), "a", None),
        ]:
            outs = []
            for ex in (emu, smm):
                qa, qb = ex.quantize(a_x, a_s, a_f), ex.quantize(b_x, b_s, b_f)
                qa = qa.t() if transpose == "a" else qa
                qb = qb.t() if transpose == "b" else qb
                outs.append(ex.gemm(qa, qb, a_s.reciprocal(), b_s.reciprocal(), torch.bfloat16, bias_))
            e, s = (o.float() for o in outs)
            if exact:
                assert torch.equal(e, s), name
            else:
                ulp = torch.finfo(torch.bfloat16).eps * e.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
                assert ((e - s).abs() <= ulp).all(), name
                assert equal_fraction(e, s) >= 0.9, name
