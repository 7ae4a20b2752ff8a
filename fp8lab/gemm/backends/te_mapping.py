"""What maps between fp8lab and Transformer Engine, as pure functions that never import TE.

Invariant: nothing here imports Transformer Engine. The recipe mapping is each scaling's own
(``Scaling.te_recipe``: TE's class and field names as strings, every numerics field set
explicitly so no ``NVTE_*`` variable changes them); ``make_te_recipe`` builds TE's object
from the recipe module it is handed, checking every keyword against the installed class
(TE's pydantic dataclasses silently ignore unknown keywords). The scaling-state mapping
moves tensors between TE's ``fp8_meta`` layout and fp8lab's (input, weight, grad_output)
columns, exactly. Both are checked on CPU (tests/test_te_mapping.py, tests/test_te_wheel.py).
"""

from __future__ import annotations

import dataclasses

import torch

from fp8lab.formats import Role
from fp8lab.gemm.hardware import BackendUnavailable

# Where each fp8lab column lives in TE's fp8_meta: FP8FwdTensors GEMM1_INPUT = 0,
# GEMM1_WEIGHT = 1; FP8BwdTensors GRAD_OUTPUT1 = 0 (TE csrc/common.h).
TE_SLOTS = {Role.INPUT: ("scaling_fwd", 0), Role.WEIGHT: ("scaling_fwd", 1), Role.GRAD_OUTPUT: ("scaling_bwd", 0)}


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


def make_te_recipe(scaling, recipe_module, te_version: str):
    """TE's recipe object for ``scaling``, built from ``recipe_module`` (TE's
    ``transformer_engine.common.recipe``, passed in: this module never imports TE).

    Raises:
        BackendUnavailable: this TE lacks the recipe class, or a field fp8lab sets to a
            value whose absence would change the numerics; the message names the TE
            version needed. (TE's recipes are pydantic dataclasses, which silently ignore
            unknown keywords: without this check an older TE would run something else.)
            Also a setting no TE has (``te_recipe`` raises ValueError), e.g. an MXFP8 scale
            rounding mode other than TE's.
    """
    try:
        spec = scaling.te_recipe()
    except ValueError as err:
        raise BackendUnavailable(str(err)) from None
    name = spec["recipe"]
    cls = getattr(recipe_module, name, None)
    if cls is None:
        raise BackendUnavailable(
            f"Transformer Engine {te_version} has no {name}: {type(scaling).__name__} needs "
            f"Transformer Engine >= {TE_SINCE.get(name, '?')} (pip install -U 'fp8lab[te]')"
        )
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
                f"{name} of Transformer Engine {te_version} has no field {key!r} and would ignore it"
            )
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
