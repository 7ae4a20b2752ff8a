"""DelayedScaling: per-tensor delayed scaling, with Transformer Engine's field names and defaults.

Invariant: a DelayedScaling is immutable and valid once constructed; every field is
checked in ``__post_init__`` and a bad one raises ``ValueError`` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from fp8lab.formats import E4M3, E5M2, FP8Format, Role

FP8_FORMATS = ("hybrid", "e4m3")
AMAX_COMPUTE_ALGOS = ("max", "most_recent")


@dataclass(frozen=True, kw_only=True)
class DelayedScaling:
    """Per-tensor delayed scaling from an amax history (TE's ``DelayedScaling``).

    Args:
        fp8_format: "hybrid" (E4M3 forward, E5M2 gradients) or "e4m3" (E4M3 everywhere).
        amax_history_len: how many past amaxes the window holds, the current one included.
        amax_compute_algo: "max" over the window, or "most_recent" (the current amax).
        margin: scale = (fp8_max / amax) / 2**margin; a larger margin leaves headroom.
        reduce_amax: all-reduce amaxes (MAX) across the data-parallel group before the
            scale update, when torch.distributed is initialised.
    """

    fp8_format: str = "hybrid"
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    margin: int = 0
    reduce_amax: bool = True

    def __post_init__(self) -> None:
        if self.fp8_format not in FP8_FORMATS:
            raise ValueError(
                f"fp8_format must be one of {FP8_FORMATS}, got {self.fp8_format!r} "
                "(pure E5M2 training is not supported, as in Transformer Engine)"
            )
        if isinstance(self.amax_history_len, bool) or not isinstance(self.amax_history_len, int):
            raise ValueError(f"amax_history_len must be an int >= 1, got {self.amax_history_len!r}")
        if self.amax_history_len < 1:
            raise ValueError(f"amax_history_len must be >= 1, got {self.amax_history_len}")
        if self.amax_compute_algo not in AMAX_COMPUTE_ALGOS:
            raise ValueError(
                f"amax_compute_algo must be one of {AMAX_COMPUTE_ALGOS}, got {self.amax_compute_algo!r}"
            )
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 0:
            raise ValueError(f"margin must be an int >= 0, got {self.margin!r}")
        if not isinstance(self.reduce_amax, bool):
            raise ValueError(f"reduce_amax must be a bool, got {self.reduce_amax!r}")

    def format_for(self, role: Role) -> FP8Format:
        """The FP8 format of a GEMM operand: gradients are E5M2 under "hybrid"."""
        if role == Role.GRAD_OUTPUT and self.fp8_format == "hybrid":
            return E5M2
        return E4M3

    @property
    def fp8_max(self) -> tuple[float, float, float]:
        """fp8_max per role (input, weight, grad_output)."""
        return tuple(self.format_for(role).max for role in Role)
