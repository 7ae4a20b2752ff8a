"""Accuracy against BF16: the shadow GEMMs' output SQNR and the weight drift.

Tolerances: the logged SQNR against a float64 reference of the BF16 GEMM (operands rounded
to bf16, exact products, one rounding to fp32 then to the output dtype) within 0.05 dB:
the only difference is the order of the fp32 accumulation. The orthogonal-operand
relation within 1e-3 dB (fp32 round-off of the SQNR sums); the general bound holds exactly.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import fp8lab
from fp8lab import FP8Options
from fp8lab.formats import E4M3, GEMM_NAMES, Role
from fp8lab.quantize.tensor import STAT_NAMES, cast_to_fp8_grid
from fp8lab.telemetry.accuracy import WeightDrift
from tests.helpers import hw_reference, sqnr_db

SQNR = STAT_NAMES.index("sqnr_db")
FPROP, DGRAD, WGRAD = range(3)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.bfloat16).double()


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h  # (n, n) of +-1: H @ H.T == n * I, exact in E4M3 and bf16


def test_gemm_names_follow_the_slot_columns():
    from fp8lab.gemm import shadow

    assert (shadow.FPROP, shadow.DGRAD, shadow.WGRAD) == (0, 1, 2) and GEMM_NAMES == ("fprop", "dgrad", "wgrad")


def test_shadow_sqnr_against_float64_on_a_tiny_model():
    torch.manual_seed(0)
    fp8 = FP8Options(fallback="emulated")
    model = torch.nn.Sequential(fp8lab.Linear(32, 64, fp8=fp8), torch.nn.GELU(), fp8lab.Linear(64, 16, fp8=fp8))
    seen = {}
    for layer in (model[0], model[2]):
        layer.register_forward_hook(
            lambda m, inp, out: seen.__setitem__((id(m), "x"), inp[0]) or seen.__setitem__((id(m), "y"), out)
        )
        layer.register_full_backward_hook(
            lambda m, gin, gout: seen.__setitem__((id(m), "g"), gout[0]) or seen.__setitem__((id(m), "gx"), gin[0])
        )
    x = torch.randn(4, 8, 32, requires_grad=True)
    for step in range(2):  # the second step runs with scales from real amaxes
        model.zero_grad()
        for layer in (model[0], model[2]):
            layer.telemetry.arm(layer.weight.device)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().pow(2).mean().backward()
        if step == 0:
            fp8lab.update_scales(model)
    for layer in (model[0], model[2]):
        xl, yl, g, gx = (seen[(id(layer), k)] for k in ("x", "y", "g", "gx"))
        k, n = layer.in_features, layer.out_features
        x2, g2 = _bf16(xl).reshape(-1, k), _bf16(g).reshape(-1, n)
        w, b = _bf16(layer.weight), layer.bias.detach().to(torch.bfloat16)
        ref = {
            FPROP: (hw_reference(x2, w.T, None, b, torch.bfloat16), yl.reshape(-1, n)),
            DGRAD: (hw_reference(g2, w, None, None, torch.bfloat16), gx.reshape(-1, k)),
            WGRAD: (hw_reference(g2.T, x2, None, None, torch.bfloat16), layer.weight.grad),
        }
        logged = layer.telemetry.shadow_sqnr
        for gemm, (expected, actual) in ref.items():
            assert logged[gemm].item() == pytest.approx(sqnr_db(expected, actual), abs=0.05), (layer, GEMM_NAMES[gemm])
            assert 15.0 < logged[gemm].item() < 60.0  # FP8 against BF16: real noise, not a copy


def _armed_step(layer, x, g):
    layer.zero_grad()
    layer.telemetry.arm(layer.weight.device)
    layer(x).backward(g)  # float32 in and out: no output rounding to hide the noise
    layer.telemetry.disarm()
    return layer.telemetry.shadow_sqnr.clone(), layer.telemetry.cast_stats[:, SQNR].clone()


def test_shadow_sqnr_equals_cast_sqnr_through_orthogonal_operands():
    """Derivation: with w exact in FP8 (here at scale 1), y_fp8 - y_bf16 = (Q(x) - x) w^T, so
    |e w^T| <= s_max |e| and |x w^T| >= s_min |x| give SQNR_fprop >= SQNR_cast(x) - 20 log10(s_max/s_min),
    with equality when w is orthogonal up to a factor (every singular value equal): the
    GEMM's SQNR then IS the cast's. Likewise dgrad (grad_out @ w) and wgrad (grad_out^T @ x,
    with x exact and x x^T = c I) carry exactly the grad_output cast's SQNR."""
    torch.manual_seed(0)
    n = 64
    h = _hadamard(n)
    layer = fp8lab.Linear(n, n, bias=False, fp8=FP8Options(fallback="emulated"))
    with torch.no_grad():
        layer.weight.copy_(h)
    x = torch.randn(32, n).to(torch.bfloat16).float().requires_grad_()  # bf16 values: the BF16 GEMM keeps them
    g = torch.randn(32, n).to(torch.bfloat16).float()
    shadow, cast = _armed_step(layer, x, g)
    assert shadow[FPROP].item() == pytest.approx(cast[Role.INPUT].item(), abs=1e-3)
    assert shadow[DGRAD].item() == pytest.approx(cast[Role.GRAD_OUTPUT].item(), abs=1e-3)

    x_orth = h.clone().requires_grad_()  # exact in FP8: x x^T = n I
    g = torch.randn(n, n).to(torch.bfloat16).float()
    shadow, cast = _armed_step(layer, x_orth, g)
    assert shadow[FPROP].item() > 300.0  # both operands exact: the outputs are equal
    assert shadow[WGRAD].item() == pytest.approx(cast[Role.GRAD_OUTPUT].item(), abs=1e-3)

    # a general w on the FP8 grid: the bound, by its condition number
    w = cast_to_fp8_grid(torch.randn(n, 32), torch.ones(()), E4M3, dtype=torch.float32)
    tall = fp8lab.Linear(32, n, bias=False, fp8=FP8Options(fallback="emulated"))
    with torch.no_grad():
        tall.weight.copy_(w)
    s = torch.linalg.svdvals(w.double())
    shadow, cast = _armed_step(
        tall, torch.randn(16, 32).to(torch.bfloat16).float().requires_grad_(), torch.randn(16, n)
    )
    assert shadow[FPROP].item() >= cast[Role.INPUT].item() - 20 * math.log10(s.max() / s.min()) - 1e-3


def test_shadow_runs_only_while_armed(monkeypatch):
    from fp8lab.gemm import shadow

    calls = []
    monkeypatch.setattr(shadow, "record", lambda *a, **k: calls.append(a[1]))
    layer = fp8lab.Linear(32, 16, fp8=FP8Options(fallback="emulated"))
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).sum().backward()
    assert calls == []
    layer.telemetry.arm(layer.weight.device)
    layer(x).sum().backward()
    assert sorted(calls) == [FPROP, DGRAD, WGRAD]
    bf16 = fp8lab.Linear(32, 16, fp8=FP8Options(backend="bf16"))  # no FP8: nothing to compare
    bf16.telemetry.arm(bf16.weight.device)
    calls.clear()
    bf16(x).sum().backward()
    assert calls == []


def _variant_runs(keep_bf16):
    from test_run import QUICKSTART, SHORT

    from fp8lab.run.overrides import apply_overrides
    from fp8lab.run.recipe_file import load_recipe
    from fp8lab.run.variant import VariantRun, build_model

    config = apply_overrides(load_recipe(QUICKSTART), SHORT)
    base_variant, fp8_variant = config.variants
    fp8_variant = dataclasses.replace(fp8_variant, keep_bf16=keep_bf16)
    torch.manual_seed(config.train.seed)
    init = {k: p.detach() for k, p in build_model(config, base_variant, torch.device("cpu")).named_parameters()}
    return config, [VariantRun(v, config, init, torch.device("cpu")) for v in (base_variant, fp8_variant)]


@pytest.mark.parametrize("keep_bf16,zero", [(("*",), True), (("lm_head",), False)], ids=["all-bf16", "fp8"])
def test_weight_drift_is_zero_when_every_layer_is_kept_in_bf16(one_thread, keep_bf16, zero):
    from fp8lab.run.data import BatchSampler, load_corpus

    config, (base, fp8) = _variant_runs(keep_bf16)
    drift = WeightDrift(fp8.model, base.model)
    names = [name for name, m in fp8.model.named_modules() if isinstance(m, fp8lab.Linear)]
    assert [name for name, _, _ in drift.pairs] == names and "lm_head" in names
    sampler = BatchSampler(load_corpus("stdlib").train, 4, 32, 0)
    for step in range(2):
        x, y = sampler.batch(step)
        for run in (base, fp8):
            run.train_step(x, y, 1e-3, log=False)
    values = drift.read()
    assert set(values) == {f"accuracy/{name}/weight_rel_diff" for name in names}
    if zero:
        assert all(v == 0.0 for v in values.values()), values
    else:  # the same check sees real FP8 drift
        assert all(v > 0.0 for v in values.values()), values
