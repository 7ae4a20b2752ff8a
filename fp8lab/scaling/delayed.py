"""Delayed scaling: the ``DelayedScaling`` recipe, its operands, and its math as pure functions.

Invariants: a DelayedScaling is immutable and valid once constructed (every field is
checked in ``__post_init__``; a bad one raises ``ValueError`` naming the field), with
Transformer Engine's field names and defaults. Its operands are cast with the scale in the
layer's ScalingState (from the *previous* update); the tensor's amax goes into row 0 in
training, and only ``fp8lab.update_scales`` turns amaxes into scales. The math functions (history in, amax
out; amax in, scale out) never mutate their arguments; every function returns new
tensors and runs on any device, so the same code is checked exactly on CPU. Semantics
follow Transformer Engine's default fused update kernel
(``common/recipe/delayed_scaling.cu``, ``kernel_bulk``), tensor by tensor:

- the amax is taken over the whole window, row 0 (the step being recorded) included;
- then the window rolls by one and row 0 starts again at zero;
- a tensor whose recorded amax (row 0) is 0 neither rolls nor changes its scale;
- ``scale = (fp8_max * 2**-margin) / amax``, one rounding of the quotient; an amax that
  is 0, inf or NaN keeps the previous scale; a scale that overflows float32 is float32 max.

Where TE's unfused Python fallback (``_default_get_amax_and_update_history`` and
``_default_sf_compute``) differs: it rolls a zero amax too, takes ``torch.max`` over the
window (a NaN propagates, where ``fmaxf`` ignores it) and computes ``(fp8_max / amax) /
2**margin`` (two roundings). The amaxes fp8lab records never hold NaN (its casts take them
as TE's cast kernels do, ``fmaxf``: NaN elements ignored), so a NaN reaches these functions
only from a hand-made state; they then do what the kernel does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8lab.formats import FP8Format, Role, check_fp8_format
from fp8lab.quantize.tensor import amaxes_of, cast_stats
from fp8lab.scaling.protocol import KEEP_BF16, ROWWISE, TE_PINNED, Operand, Scaling, not_measured, te_format
from fp8lab.scaling.state import ScalingState

AMAX_COMPUTE_ALGOS = ("max", "most_recent")


@dataclass(frozen=True, kw_only=True)
class DelayedScaling(Scaling):
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

    name = "delayed"  # class attributes, not fields (fp8lab.scaling.protocol)
    per_tensor = True

    def __post_init__(self) -> None:
        check_fp8_format(self.fp8_format)
        if isinstance(self.amax_history_len, bool) or not isinstance(self.amax_history_len, int):
            raise ValueError(f"amax_history_len must be an int >= 1, got {self.amax_history_len!r}")
        if self.amax_history_len < 1:
            raise ValueError(f"amax_history_len must be >= 1, got {self.amax_history_len}")
        if self.amax_compute_algo not in AMAX_COMPUTE_ALGOS:
            raise ValueError(f"amax_compute_algo must be one of {AMAX_COMPUTE_ALGOS}, got {self.amax_compute_algo!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 0:
            raise ValueError(f"margin must be an int >= 0, got {self.margin!r}")
        if not isinstance(self.reduce_amax, bool):
            raise ValueError(f"reduce_amax must be a bool, got {self.reduce_amax!r}")

    @property
    def fp8_max(self) -> tuple[float, float, float]:
        """fp8_max per role (input, weight, grad_output)."""
        return tuple(self.format_for(role).max for role in Role)

    def new_state(self, device: torch.device | str | None = None) -> ScalingState | None:
        """The persistent state one layer keeps for this scaling: its amax history and
        scales. A layer stores whatever this returns as ``fp8_state``; a scaling without
        persistent state (current or block scaling) returns None.

        Args:
            device: where the state's buffers are created.
        """
        return ScalingState(self, device=device)

    def operand(
        self, x2d: torch.Tensor, role: Role, usage: str, *, state, backend, record: bool, slot, raw: bool = False
    ) -> Operand:
        """Cast with the state's scale for ``role``; in training, the amax into row 0."""
        fmt, scale = self.format_for(role), state.scale[role]
        if record:
            state.record_amax(role, amaxes_of(x2d))
        values = backend.quantize(x2d, scale, fmt)
        if slot is not None and slot.armed and usage == ROWWISE:
            slot.cast_stats[role] = cast_stats(x2d, values, scale, fmt)
        return Operand(values, scale.reciprocal(), fmt)

    def gathered_weight_scale(self, amaxes: torch.Tensor, state) -> torch.Tensor:
        return state.scale[Role.WEIGHT]  # from the previous update, as ``operand`` uses

    def gathered_weight_operand(
        self, values: torch.Tensor, scale: torch.Tensor, amaxes: torch.Tensor, w_hp, *, state, record: bool, slot
    ) -> Operand:
        """As ``operand`` for the whole weight: its amaxes into row 0 (training), its statistics."""
        fmt = self.format_for(Role.WEIGHT)
        if record:
            state.record_amax(Role.WEIGHT, amaxes)
        if slot is not None and slot.armed and w_hp is not None:
            slot.cast_stats[Role.WEIGHT] = cast_stats(w_hp, values, scale, fmt)
        return Operand(values, scale.reciprocal(), fmt)

    @classmethod
    def whatif_stats(cls, x2d: torch.Tensor, role: Role, fmt: FP8Format) -> torch.Tensor:
        """Not measurable on another recipe's layer: delayed scaling needs the layer's own
        amax history (NaN)."""
        return not_measured(x2d.device)

    @classmethod
    def advice(cls, problem: str) -> str:
        """The scale comes from past amaxes: a growing tensor clamps (raise the margin, or take
        the max over a longer window), a shrinking one flushes under a stale large amax."""
        if problem == "overflow":
            return "raise margin (fp8.margin=1 or 2) or use amax_compute_algo='max' with a longer history"
        return f"shorten amax_history_len (a stale large amax keeps the scale low) or {KEEP_BF16}"

    def te_recipe(self) -> dict:
        kwargs = {
            "fp8_format": te_format(self.fp8_format),
            "amax_history_len": self.amax_history_len,
            "amax_compute_algo": self.amax_compute_algo,
            "margin": self.margin,
            "reduce_amax": self.reduce_amax,
            "scaling_factor_compute_algo": None,
            **TE_PINNED,
        }
        # TE's DelayedScaling has no fp8_gemm_* fields: its module defaults apply.
        return {"recipe": "DelayedScaling", "kwargs": kwargs, "mmparams": None, "qparams": None}


FP32_MAX = torch.finfo(torch.float32).max


def compute_scale(amax: torch.Tensor, scale: torch.Tensor, fp8_max: float | torch.Tensor, margin: int) -> torch.Tensor:
    """The scale that maps ``amax`` onto ``fp8_max``, with headroom ``2**margin``.

    ``scale = (fp8_max * 2**-margin) / amax`` element-wise in float32 (``fp8_max *
    2**-margin`` is exact, so the quotient is rounded once, as TE's kernel computes it).
    Edge cases (TE's rules):

    - amax == 0: no information, the previous ``scale`` is kept.
    - amax inf or nan: no usable information, the previous ``scale`` is kept.
    - 0 < amax so small that the scale overflows float32: float32 max.
    - otherwise the formula above.

    Args:
        amax: float32 tensor of amaxes (any shape).
        scale: the previous scales, same shape as ``amax``.
        fp8_max: the largest value of the target format (a float, or a tensor that
            broadcasts against ``amax``, e.g. one value per role).
        margin: non-negative integer exponent of the headroom.
    Returns:
        A new float32 tensor of scales.
    """
    if not isinstance(fp8_max, torch.Tensor):
        fp8_max = torch.tensor(fp8_max, dtype=torch.float32, device=amax.device)
    scaled_max = fp8_max * (2.0**-margin)  # exact: a power of two times 448 or 57344
    new_scale = scaled_max / amax
    usable = (amax > 0) & torch.isfinite(amax)  # nan > 0 is False; inf is not finite
    new_scale = torch.where(usable, new_scale, scale)
    return torch.where(torch.isinf(new_scale), torch.full_like(new_scale, FP32_MAX), new_scale)


def amax_from_history(amax_history: torch.Tensor, algo: str) -> torch.Tensor:
    """The amax a scale is computed from: ``max`` over the window or ``most_recent`` (row 0).

    Args:
        amax_history: [H, ...] with row 0 the step being recorded.
        algo: "max" or "most_recent".
    """
    if algo == "max":  # fmaxf, as TE's kernel: NaN ignored (0 when all are NaN), inf counted
        return amax_history.nan_to_num(nan=0.0, posinf=float("inf")).amax(dim=0)
    if algo == "most_recent":
        return amax_history[0].clone()
    raise ValueError(f"amax_compute_algo must be 'max' or 'most_recent', got {algo!r}")


def roll_history(amax_history: torch.Tensor) -> torch.Tensor:
    """The history after an update: shifted one row towards the front, row 0 zeroed.

    Row 0 moves to the last row (it becomes the newest past amax), the oldest past amax
    (row 1) is dropped, and row 0 starts the next step at zero. With H == 1 only the
    zeroing happens. ``amax_history`` is [H, ...]; the roll is along dim 0.
    """
    rolled = torch.roll(amax_history, shifts=-1, dims=0)
    rolled[0] = 0.0
    return rolled


def update_history_and_scale(
    amax_history: torch.Tensor,
    scale: torch.Tensor,
    fp8_max: float | torch.Tensor,
    margin: int,
    algo: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One delayed-scaling step: (new history, new scale), TE's fused kernel's rules.

    ``amax_history`` is [H, ...] and ``scale`` has the trailing shape ``[...]``, so many
    layers update at once when their histories are stacked along dim 1 ([H, N, 3]). A
    column whose row 0 is 0 (the tensor was not cast since the last update, or was all
    zeros) keeps its history and scale unchanged.
    """
    recorded = amax_history[0] != 0  # [...]
    amax = amax_from_history(amax_history, algo)
    new_history = torch.where(recorded, roll_history(amax_history), amax_history)
    new_scale = torch.where(recorded, compute_scale(amax, scale, fp8_max, margin), scale)
    return new_history, new_scale
