"""ScalingState: one layer's FP8 scaling state, held as registered buffers.

Invariant: ``amax_history`` [H, 3] and ``scale`` [3] (columns input, weight,
grad_output) are the whole persistent state; row 0 of the history is the step being
recorded, and only ``fp8lab.update_scales`` rolls it. They are float32 whatever the
model's dtype (``.to(torch.bfloat16)``, ``.half()`` move them but keep float32, as
Transformer Engine keeps its FP8 metadata). Loading a checkpoint that lacks them is an
error, never a silent re-initialisation.
"""

from __future__ import annotations

import torch
from torch import nn

from fp8lab.formats import ROLE_NAMES, Role


class ScalingState(nn.Module):
    """Amax history and scales of the three GEMM operands of one layer.

    Args:
        scaling: the layer's DelayedScaling (``fp8lab.scaling.delayed``, which builds this
            state): its ``amax_history_len`` sets H, its ``fp8_max`` the per-role maxima;
            ``update_scales`` reads its algorithm and margin from here.
        device: where the buffers live.
    """

    def __init__(self, scaling, device: torch.device | str | None = None):
        super().__init__()
        self.scaling = scaling
        history_len = scaling.amax_history_len
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("amax_history", torch.zeros(history_len, 3, **f32))
        self.register_buffer("scale", torch.ones(3, **f32))
        # fp8_max per role, kept on the device so update_scales never copies it from the host.
        self.register_buffer("fp8_max", torch.tensor(scaling.fp8_max, **f32), persistent=False)
        # Casts whose tensor held NaN or inf, per role: ``nonfinite`` since the last update
        # (MAX-reduced with row 0 in update_scales' one collective), added by update_scales
        # into ``faults``, which counts since telemetry last drained it (the faults/ tags).
        # Counters of the update, not scales: not in the layer's state_dict.
        self.register_buffer("nonfinite", torch.zeros(3, **f32), persistent=False)
        self.register_buffer("faults", torch.zeros(3, **f32), persistent=False)
        self.forwards_since_update = 0  # host-side counter, never a tensor read
        # Set when another library owns this state (Transformer Engine layers): the state is
        # then a mirror, and update_scales leaves it alone.
        self.owner: str | None = None

    def record_amax(self, role: Role, amaxes: torch.Tensor) -> None:
        """Fold one cast's amaxes (``fp8lab.quantize.tensor.amaxes_of``: [raw, TE's]) into the state.

        Row 0 keeps the max of TE's amax (NaN elements ignored, inf counted) over all
        micro-batches since the last update; a raw amax that is not finite (the tensor
        held NaN or inf) adds one to the role's ``nonfinite`` count, so a NaN the scaling
        ignores still shows in the ``faults/`` telemetry.
        """
        row0 = self.amax_history[0, role]
        torch.maximum(row0, amaxes[1], out=row0)
        self.nonfinite[role].add_(~torch.isfinite(amaxes[0]))

    def _apply(self, fn, recurse=True):
        """Move with the model, but stay float32 under a dtype conversion."""

        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if out.dtype != t.dtype and t.dtype == torch.float32:
                return t.to(device=out.device)  # the move only: no rounding of the state
            return out

        return super()._apply(keep_float32, recurse)

    def extra_repr(self) -> str:
        r = self.scaling
        return f"format={r.fp8_format}, history={r.amax_history_len}, algo={r.amax_compute_algo}, margin={r.margin}"

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        for name in ("amax_history", "scale"):
            key = prefix + name
            if key not in state_dict:
                raise KeyError(
                    f"checkpoint has no FP8 scaling state {key!r}; refusing to re-initialise "
                    "scales silently (was it saved by a model without fp8lab layers?)"
                )
        history = state_dict[prefix + "amax_history"]
        if tuple(history.shape) != tuple(self.amax_history.shape):
            raise ValueError(
                f"{prefix}amax_history has shape {tuple(history.shape)} in the checkpoint but "
                f"this layer's scaling needs {tuple(self.amax_history.shape)} "
                f"(amax_history_len={self.scaling.amax_history_len}, roles {ROLE_NAMES})"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
