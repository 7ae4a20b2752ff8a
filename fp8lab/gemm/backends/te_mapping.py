"""What maps between fp8lab and Transformer Engine, as pure functions that run without TE.

Invariant: nothing here imports Transformer Engine; the recipe mapping names TE's classes
and fields as strings (``te.py`` resolves them), and the scaling-state mapping moves
tensors between TE's ``fp8_meta`` layout and fp8lab's (input, weight, grad_output) columns,
exactly, so both are checked on CPU (tests/test_te_mapping.py).
"""

from __future__ import annotations

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


def te_recipe_kwargs(scaling) -> dict:
    """The Transformer Engine recipe equal to fp8lab's ``scaling``, without TE:
    {"recipe": TE's class name, "kwargs": its constructor arguments, "qparams": QParams
    arguments or None}.

    ``fp8_format`` is the *name* of the ``transformer_engine.common.recipe.Format`` member
    ("HYBRID" or "E4M3"); ``te_recipe`` resolves it. TE's current and block recipes take
    their power-of-2 and epsilon settings from class-level ``QParams`` defaults (computed
    from environment variables at import), not from constructor arguments, so ``te_recipe``
    sets ``fp8_quant_fwd_inp``/``fp8_quant_fwd_weight``/``fp8_quant_bwd_grad`` on the object.
    """
    fmt = {"fp8_format": _TE_FORMATS[scaling.fp8_format]}
    if isinstance(scaling, DelayedScaling):
        kwargs = {**fmt, "amax_history_len": scaling.amax_history_len, "amax_compute_algo": scaling.amax_compute_algo,
                  "margin": scaling.margin, "reduce_amax": scaling.reduce_amax}
        return {"recipe": "DelayedScaling", "kwargs": kwargs, "qparams": None}
    if isinstance(scaling, Float8CurrentScaling):
        qparams = {"power_2_scale": scaling.use_power_2_scales, "amax_epsilon": float(scaling.amax_epsilon)}
        return {"recipe": "Float8CurrentScaling", "kwargs": {**fmt, "use_power_2_scales": scaling.use_power_2_scales},
                "qparams": qparams}
    if isinstance(scaling, Float8BlockScaling):
        dims = {name: getattr(scaling, name) for name in ("x_block_scaling_dim", "w_block_scaling_dim", "grad_block_scaling_dim")}
        return {"recipe": "Float8BlockScaling", "kwargs": {**fmt, **dims},
                "qparams": {"power_2_scale": True, "amax_epsilon": float(scaling.amax_epsilon)}}
    if isinstance(scaling, MXFP8BlockScaling):
        return {"recipe": "MXFP8BlockScaling", "kwargs": {**fmt, "enable_2d_quantization": scaling.enable_2d_quantization},
                "qparams": None}
    raise TypeError(f"no Transformer Engine recipe for {type(scaling).__name__}")


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
