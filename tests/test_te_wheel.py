"""fp8lab's Transformer Engine mapping against TE's real classes, from the registry's wheel.

TE's pure-Python wheel (``tests.te_wheel``: downloaded with ``pip download --no-deps`` into a
cache folder, never installed) at the oldest and newest versions fp8lab supports. Its recipe
module is imported standalone; its PyTorch sources are only read (parsed), never executed.
Skipped with the reason when the registry cannot be reached. Exact checks, no tolerance:

- every valid fp8lab scaling builds TE's recipe through ``make_te_recipe`` (the code the
  ``te`` backend runs) with every keyword kept, TE's Format maxima equal fp8lab's, value
  types as TE declares them, and TE's defaults equal to fp8lab's defaults; or, where that
  TE lacks a part, ``BackendUnavailable`` naming the version needed (``TE_SINCE``);
- the ``NVTE_*`` variables TE reads at import change TE's own defaults but not the recipe
  fp8lab builds;
- the TE internals fp8lab's telemetry and backend use (``fp8_meta["scaling_fwd"]``'s
  ``amax_history``/``scale``, ``FP8GlobalStateManager``, ``autocast``/``fp8_autocast``,
  ``init_fp8_metadata``, ``Linear``'s arguments) exist in that TE's sources, so a rename
  fails here rather than in a user's run.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import sys
import typing

import pytest

from fp8lab import DelayedScaling, Float8BlockScaling, Float8CurrentScaling, MXFP8BlockScaling
from fp8lab.formats import E4M3, E5M2
from fp8lab.gemm.backends.select import BackendUnavailable
from fp8lab.gemm.backends.te_mapping import TE_SINCE, make_te_recipe
from tests import te_wheel

pytest.importorskip("pydantic", reason="TE's recipe module needs pydantic (fp8lab[dev] installs it)")

SCALINGS = [
    DelayedScaling(),
    DelayedScaling(
        fp8_format="e4m3", amax_history_len=16, amax_compute_algo="most_recent", margin=2, reduce_amax=False
    ),
    Float8CurrentScaling(),
    Float8CurrentScaling(fp8_format="e4m3", use_power_2_scales=True, amax_epsilon=1e-6),
    Float8BlockScaling(),
    Float8BlockScaling(fp8_format="hybrid", x_block_scaling_dim=2, w_block_scaling_dim=1, amax_epsilon=1e-12),
    Float8BlockScaling(use_f32_scales=True, amax_epsilon=1e-12),
    MXFP8BlockScaling(),
    MXFP8BlockScaling(enable_2d_quantization=True),
]
VERSIONS = [te_wheel.OLDEST, te_wheel.NEWEST]


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:2])


@pytest.fixture(scope="module", params=VERSIONS)
def te(request):
    root = te_wheel.wheel(request.param)
    if isinstance(root, str):
        pytest.skip(root)
    return request.param, root, te_wheel.recipe_module(root)


def _needs(scaling, version: str) -> str | None:
    """The TE version ``scaling`` needs beyond ``version``, by fp8lab's TE_SINCE, or None."""
    spec = scaling.te_recipe()
    needed = [TE_SINCE[spec["recipe"]]] if spec["recipe"] in TE_SINCE else []
    if spec["kwargs"].get("enable_2d_quantization"):
        needed.append(TE_SINCE["enable_2d_quantization"])
    missing = [v for v in needed if _version(v) > _version(version)]
    return max(missing, key=_version) if missing else None


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: repr(s)[:60])
def test_every_scaling_builds_te_recipe_with_every_keyword_kept(te, scaling):
    version, _, recipe = te
    needed = _needs(scaling, version)
    if needed is not None:
        with pytest.raises(BackendUnavailable, match=rf"Transformer Engine >= {needed}"):
            make_te_recipe(scaling, recipe, version)
        return
    built = make_te_recipe(scaling, recipe, version)
    spec = scaling.te_recipe()
    cls = getattr(recipe, spec["recipe"])
    assert type(built) is cls
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    for key, value in spec["kwargs"].items():
        if key not in fields:  # only fields whose absence means the same numerics may be missing
            assert key in ("backward_override", "use_power_2_scales", "enable_2d_quantization"), key
            continue
        got = getattr(built, key)
        want = recipe.Format[value] if key == "fp8_format" else value
        assert got == want and type(got) is type(want), (key, got, want)
        if hints.get(key) in (int, bool, float):
            assert type(got) is hints[key], (key, type(got), hints[key])
    for key, split in (spec["mmparams"] or {}).items():
        assert getattr(built, key).use_split_accumulator is split
    if spec["qparams"] is not None:
        for attr in ("fp8_quant_fwd_inp", "fp8_quant_fwd_weight", "fp8_quant_bwd_grad"):
            q = getattr(built, attr)
            assert (q.power_2_scale, q.amax_epsilon) == (
                spec["qparams"]["power_2_scale"],
                spec["qparams"]["amax_epsilon"],
            )
    # TE's format maxima are fp8lab's, role by role (forward: input and weight; backward: grad)
    fmt = built.fp8_format.value
    assert (fmt.max_fwd, fmt.max_bwd) == (scaling.format_for(0).max, scaling.format_for(2).max)


@pytest.mark.parametrize(
    "scaling",
    [DelayedScaling(), Float8CurrentScaling(), Float8BlockScaling(), MXFP8BlockScaling()],
    ids=lambda s: type(s).__name__,
)
def test_fp8lab_defaults_are_te_defaults(te, scaling):
    version, _, recipe = te
    spec = scaling.te_recipe()
    cls = getattr(recipe, spec["recipe"], None)
    if cls is None:
        assert _version(TE_SINCE[spec["recipe"]]) > _version(version)
        return
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for key, value in spec["kwargs"].items():
        if key in defaults:
            want = recipe.Format[value] if key == "fp8_format" else value
            assert defaults[key] == want, (key, defaults[key], want)
    assert recipe.Format.E4M3.value.max_fwd == E4M3.max and recipe.Format.HYBRID.value.max_bwd == E5M2.max


def test_te_since_matches_the_oldest_and_newest_wheels():
    roots = {v: te_wheel.wheel(v) for v in VERSIONS}
    if any(isinstance(r, str) for r in roots.values()):
        pytest.skip(next(r for r in roots.values() if isinstance(r, str)))
    old, new = (te_wheel.recipe_module(roots[v]) for v in VERSIONS)
    owners = {
        "use_power_2_scales": "Float8CurrentScaling",
        "backward_override": "DelayedScaling",
        "enable_2d_quantization": "MXFP8BlockScaling",
    }
    for key in TE_SINCE:
        for module, present in ((new, True), (old, _version(TE_SINCE[key]) <= _version(te_wheel.OLDEST))):
            if key in owners:
                cls = getattr(module, owners[key], None)
                has = cls is not None and key in {f.name for f in dataclasses.fields(cls)}
            else:
                has = hasattr(module, key)
            assert has == present, (key, module.__name__)


ENV = {
    "NVTE_BACKWARD_OVERRIDE": "high_precision",
    "NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES": "1",
    "NVTE_FP8_BLOCK_SCALING_FP32_SCALES": "1",
}


def _import_with_env(root, monkeypatch):
    """TE's recipe module imported afresh with ``ENV`` set (TE reads it at import)."""
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    path = root / "transformer_engine" / "common" / "recipe" / "__init__.py"
    name = f"_te_recipe_env_{root.name.replace('.', '_')}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def _state(built) -> dict:
    out = {f.name: getattr(built, f.name) for f in dataclasses.fields(built)}
    for attr in ("fp8_quant_fwd_inp", "fp8_quant_fwd_weight", "fp8_quant_bwd_grad"):
        if hasattr(built, attr):
            q = getattr(built, attr)
            out[attr] = (q.power_2_scale, q.amax_epsilon)
    out["fp8_format"] = out["fp8_format"].name
    for key, value in list(out.items()):
        if hasattr(value, "use_split_accumulator"):
            out[key] = value.use_split_accumulator
    return out


def test_nvte_environment_changes_te_defaults_but_not_fp8lab_recipes(monkeypatch):
    root = te_wheel.wheel(te_wheel.NEWEST)
    if isinstance(root, str):
        pytest.skip(root)
    clean = te_wheel.recipe_module(root)
    env = _import_with_env(root, monkeypatch)
    # the variables do act on TE's own defaults (else this test could not fail)
    assert env.Float8CurrentScaling().backward_override == "high_precision"
    assert env.Float8CurrentScaling.fp8_quant_fwd_inp.power_2_scale is True
    assert env.Float8BlockScaling().use_f32_scales is True
    with pytest.raises(Exception, match="backward_override=None"):
        env.DelayedScaling()  # what a bare TE recipe does under this environment
    for scaling in SCALINGS:
        assert _state(make_te_recipe(scaling, env, te_wheel.NEWEST)) == _state(
            make_te_recipe(scaling, clean, te_wheel.NEWEST)
        ), scaling


def _functions(tree: ast.AST) -> dict[str, list[str]]:
    """{name: argument names} of every function (methods included) in a module."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            out.setdefault(node.name, [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs])
    return out


def _callable_args(tree: ast.Module, name: str) -> list[str]:
    """Argument names of a top-level function, or of a top-level class's ``__init__``."""
    node = next(n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name)
    if isinstance(node, ast.ClassDef):
        node = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]


def _class(tree: ast.AST, name: str) -> ast.ClassDef:
    return next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name)


def _self_attrs(cls: ast.ClassDef) -> set[str]:
    return {
        t.attr
        for n in ast.walk(cls)
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
    }


def test_te_internals_fp8lab_reads_exist_in_te_sources(te):
    version, root, _ = te
    # fp8lab's _import_te: FP8GlobalStateManager from pytorch/quantization.py, else pytorch/fp8.py
    _, text = te_wheel.source(root, "quantization.py", "fp8.py")
    tree = ast.parse(text)
    manager = _functions(_class(tree, "FP8GlobalStateManager"))
    assert {"is_fp8_enabled", "reset"} <= set(manager)
    # fp8_meta["scaling_fwd"/"scaling_bwd"] hold this state; fp8lab reads .amax_history and .scale
    assert {"amax_history", "scale"} <= _self_attrs(_class(tree, "DelayedScalingRecipeState"))
    # fp8lab's _region: te.autocast(enabled=, recipe=) where TE exports it, else te.fp8_autocast(enabled=, fp8_recipe=)
    _, init = te_wheel.source(root, "__init__.py")
    region = "autocast" if "import autocast" in init else "fp8_autocast"
    assert f"import {region}" in init
    assert {"enabled", "recipe" if region == "autocast" else "fp8_recipe"} <= set(_callable_args(tree, region))
    _, base = te_wheel.source(root, "module/base.py")
    base_funcs = _functions(ast.parse(base))
    assert base_funcs["init_fp8_metadata"][:2] == ["self", "num_gemms"]
    assert '"scaling_fwd"' in base and '"scaling_bwd"' in base and "self.fp8_meta[" in base
    _, linear = te_wheel.source(root, "module/linear.py")
    init_args = _functions(_class(ast.parse(linear), "Linear"))["__init__"]
    assert {"in_features", "out_features", "bias", "params_dtype", "device"} <= set(init_args)
