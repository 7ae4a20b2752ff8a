"""Scaling: how each layer's FP8 scales are computed, held and updated.

Reading order: ``delayed`` (DelayedScaling and its pure math) -> ``state`` (one layer's
ScalingState buffers) -> ``update`` (``update_scales``, once per optimizer step); then the
recipes without persistent state: ``blocks`` (TE's scale arithmetic), ``current``
(Float8CurrentScaling), ``block`` (Float8BlockScaling), ``mxfp8`` (MXFP8BlockScaling).
"""

from fp8lab.scaling.block import Float8BlockScaling
from fp8lab.scaling.current import Float8CurrentScaling
from fp8lab.scaling.delayed import DelayedScaling, compute_scale
from fp8lab.scaling.mxfp8 import MXFP8BlockScaling
from fp8lab.scaling.state import ScalingState
from fp8lab.scaling.update import update_scales

__all__ = ["DelayedScaling", "Float8BlockScaling", "Float8CurrentScaling", "MXFP8BlockScaling", "ScalingState",
           "compute_scale", "update_scales"]
