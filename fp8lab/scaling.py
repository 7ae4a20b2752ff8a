"""Delayed-scaling math as pure functions: history in, amax out; amax in, scale out.

Invariant: nothing here mutates its arguments; every function returns new tensors and
runs on any device, so the same code is checked exactly on CPU. Semantics follow
Transformer Engine's ``DelayedScaling`` (``_default_get_amax_and_update_history`` and
``_default_sf_compute``): the amax is taken over the whole window, row 0 (the step being
recorded) included; then the window rolls by one and row 0 starts again at zero.
"""

from __future__ import annotations

import torch

FP32_MAX = torch.finfo(torch.float32).max


def compute_scale(
    amax: torch.Tensor, scale: torch.Tensor, fp8_max: float | torch.Tensor, margin: int
) -> torch.Tensor:
    """The scale that maps ``amax`` onto ``fp8_max``, with headroom ``2**margin``.

    ``scale = (fp8_max / amax) / 2**margin``, element-wise, in float32. Edge cases
    (Transformer Engine's rules):

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
        # A Python-float numerator makes torch compute reciprocal(amax) * fp8_max (two
        # roundings, off by one ulp for ~1/4 of amaxes); a tensor numerator gives the
        # correctly rounded float32 quotient, as update_scales' per-role tensor does.
        fp8_max = torch.full_like(amax, fp8_max)
    new_scale = (fp8_max / amax) / (2.0**margin)
    usable = (amax > 0) & torch.isfinite(amax)  # nan > 0 is False; inf is not finite
    new_scale = torch.where(usable, new_scale, scale)
    return torch.where(torch.isinf(new_scale), torch.full_like(new_scale, FP32_MAX), new_scale)


def amax_from_history(amax_history: torch.Tensor, algo: str) -> torch.Tensor:
    """The amax a scale is computed from: ``max`` over the window or ``most_recent`` (row 0).

    Args:
        amax_history: [H, ...] with row 0 the step being recorded.
        algo: "max" or "most_recent".
    """
    if algo == "max":
        return amax_history.amax(dim=0)
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
    """One delayed-scaling step: (new history, new scale).

    ``amax_history`` is [H, ...] and ``scale`` has the trailing shape ``[...]``, so many
    layers update at once when their histories are stacked along dim 1 ([H, N, 3]).
    """
    amax = amax_from_history(amax_history, algo)
    return roll_history(amax_history), compute_scale(amax, scale, fp8_max, margin)
