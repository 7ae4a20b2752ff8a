"""ScalingState: one layer's FP8 scaling state, held as registered buffers.

Invariant: ``amax_history`` [H, 3] and ``scale`` [3] (columns input, weight,
grad_output) are the whole persistent state; row 0 of the history is the step being
recorded, and only ``fp8lab.update_scales`` rolls it. Loading a checkpoint that lacks
them is an error, never a silent re-initialisation.
"""

from __future__ import annotations

import torch
from torch import nn

from fp8lab.config import DelayedScaling
from fp8lab.formats import ROLE_NAMES, Role

# Telemetry slots filled only while ``collect_stats`` is on (see fp8lab.cast.cast_stats).
STAT_NAMES = ("overflow_pct", "underflow_pct", "sqnr_db")


class ScalingState(nn.Module):
    """Amax history and scales of the three GEMM operands of one layer.

    Args:
        recipe: the DelayedScaling recipe; its ``amax_history_len`` sets H.
        device: where the buffers live.
    """

    def __init__(self, recipe: DelayedScaling, device: torch.device | str | None = None):
        super().__init__()
        self.recipe = recipe
        history_len = recipe.amax_history_len
        self.register_buffer("amax_history", torch.zeros(history_len, 3, device=device))
        self.register_buffer("scale", torch.ones(3, device=device))
        # fp8_max per role, kept on the device so update_scales never copies it from the host.
        self.register_buffer("fp8_max", torch.tensor(recipe.fp8_max, device=device), persistent=False)
        # Not checkpointed: set by a forward, cleared by update_scales (always False at a
        # step boundary, where checkpoints are taken).
        self.register_buffer("ran", torch.zeros((), dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("stats", torch.zeros(3, len(STAT_NAMES), device=device), persistent=False)
        # Non-finite amaxes seen per role since telemetry last drained them (a counter for
        # the faults/ tags; not scaling state, so not checkpointed with the layer).
        self.register_buffer("faults", torch.zeros(3, device=device), persistent=False)
        self.collect_stats = False  # set by the telemetry collector for log steps only
        self.forwards_since_update = 0  # host-side counter, never a tensor read

    def record_amax(self, role: Role, amax: torch.Tensor) -> None:
        """Fold ``amax`` into row 0: the max over all micro-batches since the last update."""
        row0 = self.amax_history[0, role]
        torch.maximum(row0, amax.to(row0.dtype), out=row0)

    def extra_repr(self) -> str:
        r = self.recipe
        return (
            f"format={r.fp8_format}, history={r.amax_history_len}, "
            f"algo={r.amax_compute_algo}, margin={r.margin}"
        )

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
                f"this layer's recipe needs {tuple(self.amax_history.shape)} "
                f"(amax_history_len={self.recipe.amax_history_len}, roles {ROLE_NAMES})"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
