"""Scaling: how each layer's FP8 scales are computed, held and updated.

Reading order: ``delayed`` (DelayedScaling and its pure math) -> ``state`` (one layer's
ScalingState buffers) -> ``update`` (``update_scales``, once per optimizer step).
"""

from fp8lab.scaling.delayed import DelayedScaling, compute_scale
from fp8lab.scaling.state import ScalingState
from fp8lab.scaling.update import update_scales

__all__ = ["DelayedScaling", "ScalingState", "compute_scale", "update_scales"]
