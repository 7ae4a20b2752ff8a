"""Current scaling: every cast's scale comes from that tensor's own amax (no history).

Invariant: ``Float8CurrentScaling`` is immutable and valid once constructed, with
Transformer Engine's names and defaults (``transformer_engine.common.recipe``); it keeps
no persistent state (``new_state`` is None), and its scale is TE's
``compute_scale_from_amax`` of the tensor's amax as TE's cast kernels take it (NaN elements
ignored, inf counted): ``fp8_max / amax``, 1 for an amax of 0, inf or NaN, float32 max on
overflow, optionally rounded down to a power of two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fp8lab.formats import E4M3, E5M2, FP8Format, Role
from fp8lab.scaling.te_scales import te_scale_from_amax

FP8_FORMATS = ("hybrid", "e4m3")


def check_format(fp8_format: str) -> None:
    if fp8_format not in FP8_FORMATS:
        raise ValueError(
            f"fp8_format must be one of {FP8_FORMATS}, got {fp8_format!r} "
            "(pure E5M2 training is not supported, as in Transformer Engine)"
        )


def check_epsilon(epsilon) -> None:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"amax_epsilon must be a finite float >= 0, got {epsilon!r}")


def format_for(fp8_format: str, role: Role) -> FP8Format:
    """E4M3, except gradients under "hybrid" (E5M2)."""
    return E5M2 if role == Role.GRAD_OUTPUT and fp8_format == "hybrid" else E4M3


@dataclass(frozen=True, kw_only=True)
class Float8CurrentScaling:
    """Per-tensor scaling from the tensor's own amax at cast time (TE's ``Float8CurrentScaling``).

    Args:
        fp8_format: "hybrid" (E4M3 forward, E5M2 gradients) or "e4m3".
        use_power_2_scales: round every scale down to a power of two (TE's QParams
            ``power_2_scale``; TE takes its default from NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES).
        amax_epsilon: a floor under the amax (TE's QParams ``amax_epsilon``).
    """

    fp8_format: str = "hybrid"
    use_power_2_scales: bool = False
    amax_epsilon: float = 0.0

    name = "current"

    def __post_init__(self) -> None:
        check_format(self.fp8_format)
        if not isinstance(self.use_power_2_scales, bool):
            raise ValueError(f"use_power_2_scales must be a bool, got {self.use_power_2_scales!r}")
        check_epsilon(self.amax_epsilon)

    def format_for(self, role: Role) -> FP8Format:
        return format_for(self.fp8_format, role)

    def new_state(self, device=None) -> None:
        return None  # nothing persists from one step to the next

    def scale(self, amax: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
        """The scale of a tensor whose amax (TE's: NaN ignored) is ``amax``."""
        return te_scale_from_amax(amax, fmt.max, pow2=self.use_power_2_scales, epsilon=float(self.amax_epsilon))
