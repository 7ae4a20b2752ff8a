"""What-if statistics: what every scaling recipe would have done to the tensors a layer cast.

Invariant: computed only on log steps (while the layer's TelemetrySlot is armed), on the
high-precision tensor the layer was casting anyway, and never fed back into training: the
operands the GEMM uses are untouched. For each role the same tensor is cast, in the
layout of the GEMM that contracts its last dimension, under

- "delayed": the layer's own delayed scaling (its ScalingState's scale), when it has one;
- "current": the tensor's own amax (``Float8CurrentScaling``);
- "block": 1x128 tiles, 128x128 blocks for weights (``Float8BlockScaling``);
- "mxfp8": 1x32 blocks with E8M0 scales (``MXFP8BlockScaling``);

each with the layer's FP8 format for that role, and measured as ``fp8lab.quantize.tensor``'s
``STAT_NAMES`` (overflow %, underflow %, SQNR dB). A recipe that cannot be evaluated (delayed
scaling for a layer without its state) is NaN. Transformer Engine's debug API offers this
for MXFP8; fp8lab offers it for all four.
"""

from __future__ import annotations

import torch

from fp8lab.formats import E4M3, FP8Format, Role
from fp8lab.options import SCALINGS
from fp8lab.quantize.tensor import STAT_NAMES, amaxes_of, cast_stats
from fp8lab.quantize.blocks import block_cast_stats
from fp8lab.scaling.block import ROWWISE, Float8BlockScaling
from fp8lab.quantize.blocks import blocks_amax
from fp8lab.scaling.current import Float8CurrentScaling
from fp8lab.scaling.mxfp8 import MXFP8BlockScaling

WHATIF_RECIPES = tuple(SCALINGS)  # "delayed", "current", "block", "mxfp8": the rows below, in order


def _blocks(x2d: torch.Tensor, role: Role, scaling, fmt: FP8Format) -> torch.Tensor:
    block = scaling.block(role, ROWWISE)
    scale, _ = scaling.block_scales(blocks_amax(x2d, block), fmt, x2d.dtype)
    return block_cast_stats(x2d, None, block, scale, fmt, block_stats=False)


def whatif_stats(
    x2d: torch.Tensor,
    role: Role,
    fmt: FP8Format,
    delayed_scale: torch.Tensor | None,
    known: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(len(WHATIF_RECIPES), len(STAT_NAMES)) float32: each recipe's statistics on ``x2d``.

    Args:
        x2d: the high-precision 2-D tensor the layer cast for ``role``.
        role: its role (weights get 128x128 blocks under block scaling, as in TE).
        fmt: the layer's FP8 format for this role; every recipe here uses it.
        delayed_scale: the layer's delayed scale for this role, or None.
        known: rows already measured, by recipe name: the layer's own cast statistics for
            the recipe it runs (the same numbers, so the cast is not done twice).
    """
    known = known or {}
    fp8_format = "hybrid" if fmt is not E4M3 else "e4m3"
    rows = []
    for recipe in WHATIF_RECIPES:
        if recipe in known:
            rows.append(known[recipe])
        elif recipe == "delayed":
            rows.append(cast_stats(x2d, None, delayed_scale, fmt) if delayed_scale is not None
                        else torch.full((len(STAT_NAMES),), float("nan"), device=x2d.device))
        elif recipe == "current":
            scale = Float8CurrentScaling(fp8_format=fp8_format).scale(amaxes_of(x2d)[1], fmt)
            rows.append(cast_stats(x2d, None, scale, fmt))
        elif recipe == "block":
            rows.append(_blocks(x2d, role, Float8BlockScaling(fp8_format=fp8_format), fmt))
        else:
            rows.append(_blocks(x2d, role, MXFP8BlockScaling(fp8_format=fp8_format), fmt))
    return torch.stack(rows).float()
