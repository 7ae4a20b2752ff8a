"""Scaling: how each layer's FP8 scales are computed, held and updated.

Invariant: every question about a scaling recipe is answered by the recipe itself
(``protocol``); only ``update_scales`` changes persistent scales.

Reading order: ``protocol`` (what every scaling answers for itself) -> ``delayed``
(DelayedScaling, its operands and its pure math) -> ``state`` (one layer's ScalingState
buffers) -> ``update`` (``update_scales``, once per optimizer step); then the recipes without
persistent state: ``te_scales`` (TE's scale arithmetic), ``current`` (Float8CurrentScaling),
``blockwise`` (what the block recipes share), ``block`` (Float8BlockScaling), ``mxfp8``
(MXFP8BlockScaling), ``nvfp4_scales`` and ``nvfp4`` (NVFP4BlockScaling), ``rowwise`` (torchao's
rowwise recipes); ``whatif`` (every recipe's statistics on one tensor).

``SCALINGS`` is the registry: a new scaling is one file and one entry here.
"""

from fp8lab.scaling.block import Float8BlockScaling
from fp8lab.scaling.current import Float8CurrentScaling
from fp8lab.scaling.delayed import DelayedScaling, compute_scale
from fp8lab.scaling.mxfp8 import MXFP8BlockScaling
from fp8lab.scaling.nvfp4 import NVFP4BlockScaling
from fp8lab.scaling.protocol import Scaling
from fp8lab.scaling.rowwise import Float8RowwiseScaling
from fp8lab.scaling.state import ScalingState
from fp8lab.scaling.update import update_scales

# Every scaling fp8lab implements (Transformer Engine calls them recipes), by short name, in
# the order telemetry lists them (the what-if rows, the report's columns).
SCALINGS: dict[str, type[Scaling]] = {
    cls.name: cls
    for cls in (
        DelayedScaling,
        Float8CurrentScaling,
        Float8BlockScaling,
        MXFP8BlockScaling,
        Float8RowwiseScaling,
        NVFP4BlockScaling,
    )
}

__all__ = [
    "SCALINGS",
    "DelayedScaling",
    "Float8BlockScaling",
    "Float8CurrentScaling",
    "Float8RowwiseScaling",
    "MXFP8BlockScaling",
    "NVFP4BlockScaling",
    "Scaling",
    "ScalingState",
    "compute_scale",
    "update_scales",
]
