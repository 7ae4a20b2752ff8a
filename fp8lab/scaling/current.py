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

from fp8lab.formats import FP8Format, Role, check_fp8_format
from fp8lab.quantize.tensor import amaxes_of, cast_stats
from fp8lab.scaling.protocol import KEEP_BF16, ROWWISE, TE_PINNED, Operand, Scaling, te_format
from fp8lab.scaling.te_scales import te_scale_from_amax


def check_epsilon(epsilon) -> None:
    """Raise ``ValueError`` naming ``amax_epsilon`` unless it is a finite number >= 0."""
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, (int, float))
        or not (math.isfinite(epsilon) and epsilon >= 0)
    ):
        raise ValueError(f"amax_epsilon must be a finite float >= 0, got {epsilon!r}")


@dataclass(frozen=True, kw_only=True)
class Float8CurrentScaling(Scaling):
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
    per_tensor = True

    def __post_init__(self) -> None:
        check_fp8_format(self.fp8_format)
        if not isinstance(self.use_power_2_scales, bool):
            raise ValueError(f"use_power_2_scales must be a bool, got {self.use_power_2_scales!r}")
        check_epsilon(self.amax_epsilon)

    def scale(self, amax: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
        """The scale of a tensor whose amax (TE's: NaN ignored) is ``amax``."""
        return te_scale_from_amax(amax, fmt.max, pow2=self.use_power_2_scales, epsilon=float(self.amax_epsilon))

    def operand(
        self, x2d: torch.Tensor, role: Role, usage: str, *, state, backend, record: bool, slot, raw: bool = False
    ) -> Operand:
        """Cast with a scale from this tensor's own amax, now; a cast that met NaN or inf is
        counted in the slot's faults in training."""
        fmt, amaxes = self.format_for(role), amaxes_of(x2d)
        scale = self.scale(amaxes[1], fmt)
        if record:
            slot.count_faults(role, amaxes[0])
        values = backend.quantize(x2d, scale, fmt)
        if slot is not None and slot.armed and usage == ROWWISE:
            slot.cast_stats[role] = cast_stats(x2d, values, scale, fmt)
            slot.record_scale(role, scale, amaxes[1])
        return Operand(values, scale.reciprocal(), fmt)

    def gathered_weight_scale(self, amaxes: torch.Tensor, state) -> torch.Tensor:
        return self.scale(amaxes[1], self.format_for(Role.WEIGHT))

    def gathered_weight_operand(
        self, values: torch.Tensor, scale: torch.Tensor, amaxes: torch.Tensor, w_hp, *, state, record: bool, slot
    ) -> Operand:
        """As ``operand`` for the whole weight: a fault counted (training), its statistics."""
        fmt = self.format_for(Role.WEIGHT)
        if record:
            slot.count_faults(Role.WEIGHT, amaxes[0])
        if slot is not None and slot.armed and w_hp is not None:
            slot.cast_stats[Role.WEIGHT] = cast_stats(w_hp, values, scale, fmt)
            slot.record_scale(Role.WEIGHT, scale, amaxes[1])
        return Operand(values, scale.reciprocal(), fmt)

    @classmethod
    def whatif_stats(cls, x2d: torch.Tensor, role: Role, fmt: FP8Format) -> torch.Tensor:
        return cast_stats(x2d, None, cls().scale(amaxes_of(x2d)[1], fmt), fmt)

    @classmethod
    def advice(cls, problem: str) -> str:
        """Each tensor's own amax maps onto fp8_max (an epsilon only lowers the scale), so only
        inf clamps; flushed values lie more than the format's range below the tensor's amax."""
        if problem == "overflow":
            return (
                "the scale maps each tensor's own amax to fp8_max, so only inf values clamp: see faults/nonfinite_amax"
            )
        return (
            "the flushed values lie more than E4M3's range below the tensor's amax: give them their own scale "
            f"(variants.<name>.scaling=block or mxfp8), lower amax_epsilon if it is set, or {KEEP_BF16}"
        )

    def te_recipe(self) -> dict:
        # TE's QParams take power-of-2 and epsilon from class-level defaults (computed from
        # environment variables at import), so they are set on the recipe object too.
        qparams = {"power_2_scale": self.use_power_2_scales, "amax_epsilon": float(self.amax_epsilon)}
        kwargs = {"fp8_format": te_format(self.fp8_format), "use_power_2_scales": self.use_power_2_scales, **TE_PINNED}
        return {
            "recipe": "Float8CurrentScaling",
            "kwargs": kwargs,
            "mmparams": self.te_split_accumulator(),
            "qparams": qparams,
        }
