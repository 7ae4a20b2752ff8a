"""Rowwise FP8 (``Float8RowwiseScaling``) against torchao 0.18's own ``Float8Linear``.

Tolerances: none. With fp32 accumulation every scale, every FP8 value, the forward output and
the input, weight and bias gradients equal torchao's ``Float8Linear(emulate=True)`` bit for bit
(fp32 and bf16 models, CPU), for both recipe names, on shapes that are not multiples of 16 with a zero row
and an outlier row. Under the default accumulation the forward GEMM equals the fast-accumulation
model (``tensor_core_accumulate``, HOPPER_FAST) bit for bit and differs from the promoted and
fp32 results on the same operands. Skips (with the reason) only where torchao is not importable.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import fp8lab
from fp8lab import Float8RowwiseScaling, FP8Options
from fp8lab.accumulation import HOPPER_FAST, HOPPER_PROMOTED
from fp8lab.formats import DGRAD, E4M3, FPROP, WGRAD, Role
from fp8lab.gemm.accumulate import tensor_core_accumulate
from fp8lab.gemm.backends.emulated import EmulatedBackend
from fp8lab.gemm.exact import gemm_path
from fp8lab.run.checks import ConfigError
from fp8lab.run.overrides import apply_overrides
from fp8lab.run.recipe_file import load_recipe
from fp8lab.scaling.protocol import COLUMNWISE, ROWWISE

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("rowwise", "rowwise_with_gw_hp")


def _torchao():
    config = pytest.importorskip("torchao.float8.config", reason="torchao (0.18) is not importable")
    linear = pytest.importorskip("torchao.float8.float8_linear", reason="torchao (0.18) is not importable")
    scaling = pytest.importorskip("torchao.float8.float8_scaling_utils", reason="torchao (0.18) is not importable")
    return config, linear, scaling


def _hard_input(batch: int, tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """(batch, tokens, k) normal values with one all-zero row and one row 1000x larger."""
    x = torch.randn(batch, tokens, k, generator=torch.Generator().manual_seed(seed))
    x[0, 3] = 0.0  # a zero row: scale 2^48, all values 0
    x[-1, 1] *= 1000.0  # an outlier row: its own scale, the other rows unaffected
    return x


def _pair(recipe: str, k: int, n: int, dtype: torch.dtype = torch.float32, bias: bool = True):
    """torchao's Float8Linear (emulate=True) and an fp8lab Linear (fp32 accumulation) with the
    same weights, in ``dtype``."""
    config, linear, _ = _torchao()
    ref = nn.Linear(k, n, bias=bias, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(n, k, generator=torch.Generator().manual_seed(1)) / k**0.5)
        ref.weight[2] *= 300.0  # an outlier output row of the weight
        if bias:
            ref.bias.copy_(torch.randn(n, generator=torch.Generator().manual_seed(2)))
    cfg = dataclasses.replace(config.Float8LinearConfig.from_recipe_name(recipe), emulate=True)
    theirs = linear.Float8Linear.from_float(copy.deepcopy(ref), config=cfg)
    fp8 = FP8Options(scaling=Float8RowwiseScaling(recipe_name=recipe), backend="emulated", accumulation="fp32")
    ours = fp8lab.Linear(k, n, bias=bias, fp8=fp8, dtype=dtype)
    with torch.no_grad():
        ours.weight.copy_(ref.weight)
        if bias:
            ours.bias.copy_(ref.bias)
    return theirs, ours


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
    bad = (a != b) & ~(a.isnan() & b.isnan())
    assert not bad.any(), f"{what}: {int(bad.sum())} of {a.numel()} differ, max |diff| {(a - b)[bad].abs().max()}"


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("shape", [(2, 9, 70, 45), (1, 5, 33, 17), (3, 7, 144, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_equals_torchao_emulate_bit_for_bit(recipe, shape, dtype):
    """fp32 accumulation: output, grad_input, grad_weight and grad_bias equal torchao's emulation
    (an fp32 model, and a bf16 one: bf16 parameters and inputs, no autocast)."""
    batch, tokens, k, n = shape
    theirs, ours = _pair(recipe, k, n, dtype)
    x = _hard_input(batch, tokens, k).to(dtype)
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_theirs, y_ours = theirs(x_theirs), ours(x_ours)
    _same(y_ours, y_theirs, "output")
    grad = torch.randn(y_theirs.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    grad[0, 2] = 0.0  # a zero gradient row
    grad[-1, 0] *= 1e4  # an outlier gradient row
    y_theirs.backward(grad)
    y_ours.backward(grad)
    _same(x_ours.grad, x_theirs.grad, "grad_input")
    _same(ours.weight.grad, theirs.weight.grad, "grad_weight")
    _same(ours.bias.grad, theirs.bias.grad, "grad_bias")


def _torchao_cast(scaling_utils, config, hp: torch.Tensor, cast_config, axiswise_dim, role):
    """torchao's cast of ``hp`` for one GEMM: (fp8 values as float32, scale)."""
    granularity = cast_config.scaling_granularity
    t = scaling_utils.hp_tensor_to_float8_dynamic(
        hp,
        cast_config.target_dtype,
        _linear_mm_config(),
        gemm_input_role=role,
        scaling_granularity=granularity,
        axiswise_dim=scaling_utils.get_maybe_axiswise_dim(axiswise_dim, granularity),
        round_scales_to_power_of_2=config.round_scales_to_power_of_2,
    )
    assert t._data.dtype == torch.float8_e4m3fn  # E4M3 everywhere, gradients included
    return t._data.float(), t._scale


def _linear_mm_config():
    from torchao.float8.float8_training_tensor import LinearMMConfig

    return LinearMMConfig()


@pytest.mark.parametrize("recipe", RECIPES)
def test_scales_and_casts_equal_torchao(recipe):
    """Every FP8 operand of the three GEMMs: the same E4M3 values and the same scales (fp8lab's
    inverse scales are their exact reciprocals) as torchao's casts in ``matmul_with_hp_or_float8_args``."""
    config_mod, _, scaling_utils = _torchao()
    from torchao.float8.float8_training_tensor import GemmInputRole

    cfg = config_mod.Float8LinearConfig.from_recipe_name(recipe)
    scaling = Float8RowwiseScaling(recipe_name=recipe)
    x = _hard_input(1, 37, 70)[0]  # (M, K)
    w = torch.randn(45, 70, generator=torch.Generator().manual_seed(4))  # (N, K)
    w[5] = 0.0
    w[:, 7] *= 1e3
    g = torch.randn(37, 45, generator=torch.Generator().manual_seed(5))  # (M, N)
    g[:, 3] *= 1e-30  # a column of tiny gradients: a large power-of-2 scale
    backend = EmulatedBackend(gemm_path("cpu"))
    # (name, fp8lab's tensor, role, usage, torchao's cast config, its axiswise dim): torchao casts
    # the weight as weight_hp_t = w.t() (K, N), fp8lab casts w (N, K), so those are compared transposed.
    cases = [
        ("fprop x", x, Role.INPUT, ROWWISE, cfg.cast_config_input, -1),
        ("fprop w", w, Role.WEIGHT, ROWWISE, cfg.cast_config_weight, 0),
        ("dgrad g", g, Role.GRAD_OUTPUT, ROWWISE, cfg.cast_config_grad_output, -1),
        ("dgrad w", w, Role.WEIGHT, COLUMNWISE, cfg.cast_config_weight_for_grad_input, -1),
    ]
    if recipe == "rowwise":  # gw_hp casts nothing for wgrad (checked below)
        cases += [
            ("wgrad g", g, Role.GRAD_OUTPUT, COLUMNWISE, cfg.cast_config_grad_output_for_grad_weight, 0),
            ("wgrad x", x, Role.INPUT, COLUMNWISE, cfg.cast_config_input_for_grad_weight, 0),
        ]
    ao_roles = {Role.INPUT: GemmInputRole.INPUT, Role.WEIGHT: GemmInputRole.WEIGHT}
    for name, ours_hp, role, usage, cast_config, dim in cases:
        op = scaling.operand(ours_hp, role, usage, state=None, backend=backend, record=False, slot=None, raw=True)
        flip = role == Role.WEIGHT
        ao_role = ao_roles.get(role, GemmInputRole.GRAD_OUTPUT)
        data, scale = _torchao_cast(scaling_utils, cfg, ours_hp.t() if flip else ours_hp, cast_config, dim, ao_role)
        values, inv = (op.values.float().t(), op.inv_scale.t()) if flip else (op.values.float(), op.inv_scale)
        assert op.fmt is E4M3, name
        _same(values, data, f"{name} values")
        _same(inv.expand_as(scale) if scale.dim() else inv.reshape(()), scale.reciprocal(), f"{name} inverse scale")
        assert torch.equal(torch.exp2(torch.log2(scale).round()), scale), f"{name}: scales are powers of two"
    if recipe == "rowwise_with_gw_hp":
        for hp, role in ((g, Role.GRAD_OUTPUT), (x, Role.INPUT)):
            op = scaling.operand(hp, role, COLUMNWISE, state=None, backend=backend, record=False, slot=None)
            assert op.values is hp and op.inv_scale is None and op.fmt is None  # wgrad in high precision
        op = scaling.operand(w, Role.WEIGHT, COLUMNWISE, state=None, backend=backend, record=False, slot=None, raw=True)
        assert op.inv_scale.shape == (1, 1)  # the dgrad weight: one tensorwise scale


@pytest.mark.parametrize("recipe", RECIPES)
def test_default_accumulation_is_what_torchao_asks_on_gpu(recipe):
    """torchao's ``gemm_config_output`` asks fast accumulation, grad_input and grad_weight not
    (its Float8GemmConfig defaults); gw_hp's wgrad is no FP8 GEMM."""
    config_mod, _, _ = _torchao()
    cfg = config_mod.Float8LinearConfig.from_recipe_name(recipe)
    asked = [cfg.gemm_config_output, cfg.gemm_config_grad_input, cfg.gemm_config_grad_weight]
    fp8 = FP8Options(scaling=Float8RowwiseScaling(recipe_name=recipe))
    for gemm in (FPROP, DGRAD) + ((WGRAD,) if recipe == "rowwise" else ()):
        assert fp8.accumulator(gemm) == (HOPPER_FAST if asked[gemm].use_fast_accum else HOPPER_PROMOTED)
    if recipe == "rowwise_with_gw_hp":
        assert fp8.accumulator(WGRAD).kind == "fp32"


@pytest.mark.parametrize("recipe", RECIPES)
def test_default_forward_is_the_fast_accumulation_model(recipe):
    """The default forward equals fast accumulation of the FP8 values with the per-row/column
    inverse scales applied to the accumulator, and differs from promoted and fp32 accumulation:
    this fails if the forward GEMM of this recipe were promoted or fp32."""
    k, n = 300, 40  # K over several 32-product instructions and promotion groups
    scaling = Float8RowwiseScaling(recipe_name=recipe)
    layer = fp8lab.Linear(k, n, bias=False, fp8=FP8Options(scaling=scaling, backend="emulated"))
    x = _hard_input(1, 24, k, seed=7)[0]
    y = layer(x)
    backend = EmulatedBackend(gemm_path("cpu"))
    x_op = scaling.operand(x, Role.INPUT, ROWWISE, state=None, backend=backend, record=False, slot=None, raw=True)
    w = layer.weight.detach()
    w_op = scaling.operand(w, Role.WEIGHT, ROWWISE, state=None, backend=backend, record=False, slot=None, raw=True)
    inv = x_op.inv_scale * w_op.inv_scale.t()  # (M, 1) * (1, N)
    results = {}
    for name, acc in (("fast", HOPPER_FAST), ("promoted", HOPPER_PROMOTED)):
        results[name] = tensor_core_accumulate(x_op.values, w_op.values.t(), E4M3, E4M3, acc) * inv
    fp32 = fp8lab.Linear(k, n, bias=False, fp8=FP8Options(scaling=scaling, backend="emulated", accumulation="fp32"))
    with torch.no_grad():
        fp32.weight.copy_(w)
    results["fp32"] = fp32(x)
    _same(y, results["fast"], "default forward vs the fast model")
    assert not torch.equal(y, results["promoted"]), "the forward must not be promoted"
    assert not torch.equal(y, results["fp32"]), "the forward must not be fp32-accumulated"


def test_bad_recipe_name_is_refused_with_the_allowed_values():
    for bad in ("row", "ROWWISE", None, 1):
        with pytest.raises(ValueError, match=r"recipe_name must be one of \('rowwise', 'rowwise_with_gw_hp'\)"):
            Float8RowwiseScaling(recipe_name=bad)
    with pytest.raises(TypeError):
        Float8RowwiseScaling("rowwise")  # keyword-only, as every scaling


def test_selected_from_the_cli_and_named_by_describe():
    config = load_recipe(ROOT / "recipes" / "quickstart.py")
    fp8 = next(v.name for v in config.variants if v.precision == "fp8")
    config = apply_overrides(
        config, [f"variants.{fp8}.scaling=rowwise", f"variants.{fp8}.scaling.recipe_name=rowwise_with_gw_hp"]
    )
    assert next(v for v in config.variants if v.name == fp8).scaling == Float8RowwiseScaling(
        recipe_name="rowwise_with_gw_hp"
    )
    with pytest.raises(ConfigError, match="recipe_name"):
        apply_overrides(config, [f"variants.{fp8}.scaling.recipe_name=columnwise"])
    model = nn.Sequential(fp8lab.Linear(32, 16, fp8=FP8Options(scaling=Float8RowwiseScaling(), fallback="emulated")))
    rows = list(fp8lab.describe(model))
    assert rows[0].precision == "fp8" and rows[0].backend == "emulated"
    assert Float8RowwiseScaling().unsupported("te", None) and Float8RowwiseScaling().unsupported("scaled_mm", None)


def test_telemetry_reports_per_row_scales_like_the_block_recipes():
    """An armed step leaves cast statistics, per-row scale statistics (``BLOCK_STAT_NAMES``) and
    each role's amax; the per-tensor scale column is NaN, as for block recipes."""
    layer = fp8lab.Linear(64, 24, fp8=FP8Options(scaling=Float8RowwiseScaling(), backend="emulated"))
    x = _hard_input(1, 10, 64)[0].requires_grad_()
    layer.telemetry.arm(layer.weight.device)
    y = layer(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(8)))  # not all ones: a lossy cast
    layer.telemetry.disarm()
    view = layer.scaling_view()
    assert torch.isnan(view.scale).all()
    assert torch.equal(view.amax[0], x.detach().abs().max())
    assert torch.isfinite(view.cast_stats).all() and torch.isfinite(view.block_stats[:, :3]).all()
    # The outlier row's scale is 2^10 below the others': the log2 spread of the input's row scales.
    assert view.block_stats[Role.INPUT, 2] - view.block_stats[Role.INPUT, 0] >= 9
    rowwise_row = list(fp8lab.scaling.SCALINGS).index("rowwise")
    assert torch.equal(view.whatif[Role.INPUT, rowwise_row], view.cast_stats[Role.INPUT])
