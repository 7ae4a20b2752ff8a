"""What maps between fp8lab and Transformer Engine, as pure functions that run without TE.

Invariant: nothing here imports Transformer Engine; the recipe mapping names TE's classes
and fields as strings (``te.py`` resolves them), and the scaling-state mapping moves
tensors between TE's ``fp8_meta`` layout and fp8lab's (input, weight, grad_output) columns,
exactly, so both are checked on CPU (tests/test_te_mapping.py).
"""

from __future__ import annotations

import dataclasses

import torch

from fp8lab.formats import Role
from fp8lab.scaling.block import Float8BlockScaling
from fp8lab.scaling.current import Float8CurrentScaling
from fp8lab.scaling.delayed import DelayedScaling
from fp8lab.scaling.mxfp8 import MXFP8BlockScaling

# Where each fp8lab column lives in TE's fp8_meta: FP8FwdTensors GEMM1_INPUT = 0,
# GEMM1_WEIGHT = 1; FP8BwdTensors GRAD_OUTPUT1 = 0 (TE csrc/common.h).
TE_SLOTS = {Role.INPUT: ("scaling_fwd", 0), Role.WEIGHT: ("scaling_fwd", 1), Role.GRAD_OUTPUT: ("scaling_bwd", 0)}
_TE_FORMATS = {"hybrid": "HYBRID", "e4m3": "E4M3"}  # names of TE's recipe.Format members


# Transformer Engine versions that first have what fp8lab maps to (read in TE's
# transformer_engine/common/recipe/__init__.py of the registry's wheels 2.1.0 ... 2.20.2;
# tests/test_te_wheel.py checks it against the oldest and newest supported wheels).
TE_SINCE = {
    "Float8CurrentScaling": "2.2",
    "Float8BlockScaling": "2.3",
    "use_power_2_scales": "2.8",  # a field of Float8CurrentScaling; QParams carry it before
    "backward_override": "2.15",  # defaulted from $NVTE_BACKWARD_OVERRIDE when not passed
    "enable_2d_quantization": "2.19",  # MXFP8BlockScaling; earlier TE quantizes weights 1-D
}
# Fields an older TE may lack without changing what fp8lab models, when set to these
# values (None: any value, carried by QParams too): dropped there instead of refused.
ABSENT_MEANS = {"backward_override": (None,), "enable_2d_quantization": (False,), "use_power_2_scales": None}
# Split accumulation (promoted fp32 accumulation) per GEMM: TE's defaults, set explicitly.
_SPLIT_ACCUMULATOR = {
    "Float8CurrentScaling": {"fp8_gemm_fprop": False, "fp8_gemm_dgrad": True, "fp8_gemm_wgrad": True},
    "Float8BlockScaling": {"fp8_gemm_fprop": True, "fp8_gemm_dgrad": True, "fp8_gemm_wgrad": True},
}


def te_recipe_kwargs(scaling) -> dict:
    """The Transformer Engine recipe equal to fp8lab's ``scaling``, without TE:
    {"recipe": TE's class name, "kwargs": its constructor arguments, "mmparams": the
    ``use_split_accumulator`` of each ``fp8_gemm_*`` MMParams field or None, "qparams":
    QParams arguments or None}.

    Every field of TE's recipe that changes numerics is set explicitly, including those TE
    otherwise takes from the environment at import (``NVTE_BACKWARD_OVERRIDE``,
    ``NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES``, ``NVTE_FP8_BLOCK_SCALING_FP32_SCALES``), so
    no ``NVTE_*`` variable changes what fp8lab models. ``fp8_format`` is the *name* of the
    ``transformer_engine.common.recipe.Format`` member ("HYBRID" or "E4M3"). TE's current
    and block recipes take their power-of-2 and epsilon settings from class-level
    ``QParams`` (computed from the environment at import), so ``make_te_recipe`` sets
    ``fp8_quant_fwd_inp``/``fp8_quant_fwd_weight``/``fp8_quant_bwd_grad`` on the object.
    """
    fmt = {"fp8_format": _TE_FORMATS[scaling.fp8_format]}
    common = {"fp8_dpa": False, "fp8_mha": False, "backward_override": None}
    if isinstance(scaling, DelayedScaling):
        kwargs = {**fmt, "amax_history_len": scaling.amax_history_len, "amax_compute_algo": scaling.amax_compute_algo,
                  "margin": scaling.margin, "reduce_amax": scaling.reduce_amax, "scaling_factor_compute_algo": None,
                  **common}
        return {"recipe": "DelayedScaling", "kwargs": kwargs, "mmparams": None, "qparams": None}
    if isinstance(scaling, Float8CurrentScaling):
        qparams = {"power_2_scale": scaling.use_power_2_scales, "amax_epsilon": float(scaling.amax_epsilon)}
        return {"recipe": "Float8CurrentScaling", "kwargs": {**fmt, "use_power_2_scales": scaling.use_power_2_scales, **common},
                "mmparams": _SPLIT_ACCUMULATOR["Float8CurrentScaling"], "qparams": qparams}
    if isinstance(scaling, Float8BlockScaling):
        dims = {name: getattr(scaling, name) for name in ("x_block_scaling_dim", "w_block_scaling_dim", "grad_block_scaling_dim")}
        return {"recipe": "Float8BlockScaling", "kwargs": {**fmt, **dims, "use_f32_scales": False, **common},
                "mmparams": _SPLIT_ACCUMULATOR["Float8BlockScaling"],
                "qparams": {"power_2_scale": True, "amax_epsilon": float(scaling.amax_epsilon)}}
    if isinstance(scaling, MXFP8BlockScaling):
        kwargs = {**fmt, "margin": 0, "enable_2d_quantization": scaling.enable_2d_quantization, **common}
        return {"recipe": "MXFP8BlockScaling", "kwargs": kwargs, "mmparams": None, "qparams": None}
    raise TypeError(f"no Transformer Engine recipe for {type(scaling).__name__}")


def make_te_recipe(scaling, recipe_module, te_version: str):
    """TE's recipe object for ``scaling``, built from ``recipe_module`` (TE's
    ``transformer_engine.common.recipe``, passed in: this module never imports TE).

    Raises:
        BackendUnavailable: this TE lacks the recipe class, or a field fp8lab sets to a
            value whose absence would change the numerics; the message names the TE
            version needed. (TE's recipes are pydantic dataclasses, which silently ignore
            unknown keywords: without this check an older TE would run something else.)
    """
    from fp8lab.gemm.backends.select import BackendUnavailable

    spec = te_recipe_kwargs(scaling)
    name = spec["recipe"]
    cls = getattr(recipe_module, name, None)
    if cls is None:
        raise BackendUnavailable(f"Transformer Engine {te_version} has no {name}: {type(scaling).__name__} needs "
                                 f"Transformer Engine >= {TE_SINCE.get(name, '?')} (pip install -U 'fp8lab[te]')")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in spec["kwargs"].items():
        if key in fields:
            kwargs[key] = value
        elif key in ABSENT_MEANS and (ABSENT_MEANS[key] is None or value in ABSENT_MEANS[key]):
            continue  # this TE behaves as the value says without the field
        else:
            raise BackendUnavailable(
                f"{type(scaling).__name__}({key}={value!r}) needs Transformer Engine >= {TE_SINCE.get(key, '?')}: "
                f"{name} of Transformer Engine {te_version} has no field {key!r} and would ignore it")
    for key, split in (spec["mmparams"] or {}).items():
        if key in fields:
            kwargs[key] = recipe_module.MMParams(use_split_accumulator=split)
    kwargs["fp8_format"] = recipe_module.Format[kwargs["fp8_format"]]
    recipe = cls(**kwargs)
    if spec["qparams"] is not None:
        for attr in ("fp8_quant_fwd_inp", "fp8_quant_fwd_weight", "fp8_quant_bwd_grad"):
            setattr(recipe, attr, recipe_module.QParams(**spec["qparams"]))
    dropped = [key for key, value in kwargs.items() if getattr(recipe, key, object()) != value]
    if dropped:
        raise BackendUnavailable(f"Transformer Engine {te_version}'s {name} did not keep {dropped}")
    return recipe


def te_meta_to_fp8lab(te_meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8lab's view of TE's scaling state: (amax_history [H, 3], scale [3]), new tensors.

    Args:
        te_meta: {"scaling_fwd": (amax_history [H, >=2], scale [>=2]),
                  "scaling_bwd": (amax_history [H, >=1], scale [>=1])}.
    """
    slots = [TE_SLOTS[role] for role in Role]
    history = torch.stack([te_meta[key][0][:, i] for key, i in slots], dim=1)  # (H, 3)
    scale = torch.stack([te_meta[key][1][i] for key, i in slots])  # (3,)
    return history, scale


def copy_into_te_meta_(history: torch.Tensor, scale: torch.Tensor, te_meta: dict) -> None:
    """Write fp8lab's (amax_history [H, 3], scale [3]) into TE's tensors, in place.

    In place because TE's global amax buffers hold references to these very tensors.
    TE's unused slots (forward output, grad_input) are left as they are.
    """
    for role in Role:
        key, i = TE_SLOTS[role]
        te_history, te_scale = te_meta[key]
        if te_history.shape[0] != history.shape[0]:
            raise ValueError(
                f"amax_history_len differs: fp8lab state has {history.shape[0]} rows, "
                f"TE's {key} has {te_history.shape[0]} (use the layer's scaling in te.autocast)"
            )
        te_history[:, i].copy_(history[:, role])
        te_scale[i].copy_(scale[role])
