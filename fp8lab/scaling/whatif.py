"""What-if statistics: what every scaling recipe would have done to the tensors a layer cast.

Invariant: computed only on log steps (while the layer's TelemetrySlot is armed, by the
quantized GEMM), on the high-precision tensor the layer was casting anyway, and never fed
back into training: the operands the GEMM uses are untouched. For each role the same
tensor is cast, in the layout of the GEMM that contracts its last dimension, under every
recipe of ``fp8lab.scaling.SCALINGS`` at Transformer Engine's defaults (each answers for
itself: ``Scaling.whatif_stats``), each with the layer's FP8 format for that role, and
measured as ``STAT_NAMES`` (overflow %, underflow %, SQNR dB). A recipe that cannot be
evaluated (delayed scaling, on a layer without its amax history) is NaN. Transformer
Engine's debug API offers this for MXFP8; fp8lab offers it for every recipe.
"""

from __future__ import annotations

import torch

from fp8lab.formats import FP8Format, Role
from fp8lab.scaling import SCALINGS

WHATIF_RECIPES = tuple(SCALINGS)  # "delayed", "current", "block", "mxfp8": the rows below, in order


def whatif_stats(
    x2d: torch.Tensor, role: Role, fmt: FP8Format, known: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """(len(WHATIF_RECIPES), len(STAT_NAMES)) float32: each recipe's statistics on ``x2d``.

    Args:
        x2d: the high-precision 2-D tensor the layer cast for ``role``.
        role: its role (weights get 128x128 blocks under block scaling, as in TE).
        fmt: the layer's FP8 format for this role; every recipe here uses it.
        known: rows already measured, by recipe name: the layer's own cast statistics for
            the recipe it runs (the same numbers, so the cast is not done twice).
    """
    known = known or {}
    rows = [known[name] if name in known else cls.whatif_stats(x2d, role, fmt) for name, cls in SCALINGS.items()]
    return torch.stack(rows).float()
