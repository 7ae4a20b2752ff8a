"""update_scales: the once-per-optimizer-step delayed-scaling update of a whole model.

Invariant: this is the only code that rolls amax histories and changes scales. It is
vectorised: layers that share a recipe are stacked and updated by a fixed number of
tensor ops, whatever their count; under torch.distributed every rank's row 0 is
MAX-reduced in one collective first, so all ranks end with identical state. Nothing here
reads a tensor on the host.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from fp8lab.scaling import update_history_and_scale
from fp8lab.state import ScalingState


def scaling_states(model: nn.Module) -> list[ScalingState]:
    """Every ScalingState in ``model``, in ``named_modules`` order."""
    return [m for m in model.modules() if isinstance(m, ScalingState)]


def _reduce_amaxes(states: list[ScalingState], group) -> None:
    """One MAX all-reduce of every layer's row 0 and 'ran' flag, in a single buffer.

    NaN is sent as +inf: a MAX reduction drops a NaN depending on which rank holds it
    (gloo keeps rank 0's NaN and loses rank 1's), while +inf survives on every rank and
    means the same to ``compute_scale`` and the fault counter (not finite: keep the scale).
    """
    if not states:
        return
    rows = torch.stack([torch.cat([s.amax_history[0], s.ran.to(s.amax_history.dtype).reshape(1)]) for s in states])
    rows.masked_fill_(rows.isnan(), float("inf"))
    torch.distributed.all_reduce(rows, op=torch.distributed.ReduceOp.MAX, group=group)
    torch._foreach_copy_([s.amax_history[0] for s in states], list(rows[:, :3].unbind(0)))
    torch._foreach_copy_([s.ran for s in states], list((rows[:, 3] > 0).unbind(0)))


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _where_layers_(ran: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``torch.where(ran[None, :, None], new, old)``, written into ``new`` (contiguous
    (H, N, 3), a temporary of the caller), bit for bit (NaN and inf included).

    A bitwise select on an (H, N*3) integer view, in place: torch.where's CPU kernel takes
    0.8 ms on this broadcast for 192 layers of 1024 rows and allocates 2.4 MB more; these
    three passes take 0.1 ms.
    """
    h, n, roles = new.shape
    as_int = _SAME_SIZE_INT[new.element_size()]
    mask = (-ran.to(as_int)).repeat_interleave(roles)  # (N*3,) all ones where the layer ran
    new_i, old_i = new.view(h, n * roles).view(as_int), old.reshape(h, n * roles).view(as_int)
    new_i.bitwise_xor_(old_i).bitwise_and_(mask).bitwise_xor_(old_i)
    return new


def update_scales(model: nn.Module, group=None, *, skip: torch.Tensor | None = None) -> None:
    """Roll every layer's amax history and recompute its scales; call after optimizer.step().

    A layer that has not run since the last call keeps its history and scale unchanged.
    With gradient accumulation, call this once per optimizer step: row 0 then holds the
    max amax over all micro-batches. A non-finite amax keeps the previous scale
    (Transformer Engine's rule) and is counted in the layer's ``fp8_state.faults``.

    Args:
        model: any module containing fp8lab layers.
        group: the data-parallel process group for the amax reduction (default: WORLD);
            used only when torch.distributed is initialised and the recipe's
            ``reduce_amax`` is True.
        skip: optional 0-dim bool tensor on the device (no host read): when True the
            step was skipped (non-finite loss or gradient), so histories and scales stay
            as they were and the step's amaxes (row 0) are discarded.
    """
    states = scaling_states(model)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _reduce_amaxes([s for s in states if s.recipe.reduce_amax], group)

    by_recipe: dict[object, list[ScalingState]] = defaultdict(list)
    for state in states:
        by_recipe[(state.recipe, state.amax_history.device)].append(state)
        state.forwards_since_update = 0

    for (recipe, device), group_states in by_recipe.items():
        histories = [s.amax_history for s in group_states]
        scales = [s.scale for s in group_states]
        rans = [s.ran for s in group_states]
        history = torch.stack(histories, dim=1)  # (H, N, 3)
        scale = torch.stack(scales)  # (N, 3)
        ran = torch.stack(rans)  # (N,)
        fp8_max = group_states[0].fp8_max  # (3,) the same for every layer of one recipe
        faults = (~torch.isfinite(history[0]) & ran[:, None]).float()  # (N, 3)
        new_history, new_scale = update_history_and_scale(
            history, scale, fp8_max, recipe.margin, recipe.amax_compute_algo
        )
        if skip is not None:
            ran = ran & ~skip
            # history is our stacked temporary: drop a skipped step's row 0 in place.
            history[0].masked_fill_(skip, 0.0)
        new_history = _where_layers_(ran, new_history, history)
        new_scale = torch.where(ran[:, None], new_scale, scale)
        torch._foreach_copy_(histories, list(new_history.unbind(1)))
        torch._foreach_copy_(scales, list(new_scale.unbind(0)))
        torch._foreach_add_([s.faults for s in group_states], list(faults.unbind(0)))
        torch._foreach_zero_(rans)
