"""What-if statistics: what every scaling recipe would have done to the tensors a layer cast.

Invariant: computed only on log steps (while the layer's TelemetrySlot is armed), on the
high-precision tensor the layer was casting anyway, and never fed back into training: the
operands the GEMM uses are untouched. For each role the same tensor is cast, in the
layout of the GEMM that contracts its last dimension, under

- "delayed": the layer's own delayed scaling (its ScalingState's scale), when it has one;
- "current": the tensor's own amax (``Float8CurrentScaling``);
- "block": 1x128 tiles, 128x128 blocks for weights (``Float8BlockScaling``);
- "mxfp8": 1x32 blocks with E8M0 scales (``MXFP8BlockScaling``);

each with the layer's FP8 format for that role, and measured as ``fp8lab.quantize``'s
``STAT_NAMES`` (overflow %, underflow %, SQNR dB). A recipe that cannot be evaluated (delayed
scaling for a layer without its state) is NaN. Transformer Engine's debug API offers this
for MXFP8; fp8lab offers it for all four.
"""

from __future__ import annotations

import torch

from fp8lab.formats import E4M3, FP8Format, Role
from fp8lab.options import SCALINGS
from fp8lab.quantize import STAT_NAMES, amaxes_of, cast_stats, cast_to_fp8_grid
from fp8lab.quantize_blocks import block_cast_stats, cast_blocks_dequantized
from fp8lab.scaling.block import ROWWISE, Float8BlockScaling
from fp8lab.scaling.blocks import blocks_amax
from fp8lab.scaling.current import Float8CurrentScaling
from fp8lab.scaling.mxfp8 import MXFP8BlockScaling

WHATIF_RECIPES = tuple(SCALINGS)  # "delayed", "current", "block", "mxfp8": the rows below, in order


def _per_tensor(x2d: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    return cast_stats(x2d, cast_to_fp8_grid(x2d, scale, fmt, dtype=torch.float32), scale, fmt)


def _blocks(x2d: torch.Tensor, role: Role, scaling, fmt: FP8Format) -> torch.Tensor:
    block = scaling.block(role, ROWWISE)
    scale, scale_inv = scaling.block_scales(blocks_amax(x2d, block), fmt, x2d.dtype)
    deq = cast_blocks_dequantized(x2d, block, scale, scale_inv, fmt, dtype=torch.float32)
    return block_cast_stats(x2d, deq, block, scale, fmt)[: len(STAT_NAMES)]


def whatif_stats(x2d: torch.Tensor, role: Role, fmt: FP8Format, delayed_scale: torch.Tensor | None) -> torch.Tensor:
    """(len(WHATIF_RECIPES), len(STAT_NAMES)) float32: each recipe's statistics on ``x2d``.

    Args:
        x2d: the high-precision 2-D tensor the layer cast for ``role``.
        role: its role (weights get 128x128 blocks under block scaling, as in TE).
        fmt: the layer's FP8 format for this role; every recipe here uses it.
        delayed_scale: the layer's delayed scale for this role, or None.
    """
    fp8_format = "hybrid" if fmt is not E4M3 else "e4m3"
    rows = []
    if delayed_scale is not None:
        rows.append(_per_tensor(x2d, delayed_scale, fmt))
    else:
        rows.append(torch.full((len(STAT_NAMES),), float("nan"), device=x2d.device))
    current = Float8CurrentScaling(fp8_format=fp8_format)
    rows.append(_per_tensor(x2d, current.scale(amaxes_of(x2d)[1], fmt), fmt))
    rows.append(_blocks(x2d, role, Float8BlockScaling(fp8_format=fp8_format), fmt))
    rows.append(_blocks(x2d, role, MXFP8BlockScaling(fp8_format=fp8_format), fmt))
    return torch.stack(rows).float()
