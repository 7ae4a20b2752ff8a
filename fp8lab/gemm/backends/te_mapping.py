"""How TE's scaling state maps onto fp8lab's, as pure functions that run without TE.

Invariant: nothing here imports Transformer Engine. The scaling-state mapping moves tensors
between TE's ``fp8_meta`` layout and fp8lab's (input, weight, grad_output) columns, exactly,
so it is checked on CPU (tests/test_te_mapping.py). The recipe mapping is each scaling's
own (``Scaling.te_recipe``: TE's class and field names as strings, resolved by ``te.py``).
"""

from __future__ import annotations

import torch

from fp8lab.formats import Role

# Where each fp8lab column lives in TE's fp8_meta: FP8FwdTensors GEMM1_INPUT = 0,
# GEMM1_WEIGHT = 1; FP8BwdTensors GRAD_OUTPUT1 = 0 (TE csrc/common.h).
TE_SLOTS = {Role.INPUT: ("scaling_fwd", 0), Role.WEIGHT: ("scaling_fwd", 1), Role.GRAD_OUTPUT: ("scaling_bwd", 0)}


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
