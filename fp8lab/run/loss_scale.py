"""Dynamic loss scaling for FP16 activations, kept on the device.

Invariant: the scale and its growth counter are device tensors that only ``update`` changes,
by torch's own ``_amp_update_scale_`` kernel, so the semantics are exactly
``torch.amp.GradScaler``'s: a step with an inf/NaN gradient (or loss) is skipped and
multiplies the scale by ``backoff_factor``; ``growth_interval`` good steps in a row multiply
it by ``growth_factor``. Nothing here reads a tensor on the host.

Why not GradScaler itself: with fused AdamW it makes no host read either (its
``_step_supports_amp_scaling`` path; a non-fused optimizer costs an ``.item()`` per step),
but (1) ``GradScaler.step`` sets the optimizer's ``found_inf`` from the gradients alone,
while fp8lab's skip also covers a non-finite loss and must be the one flag that skips the
optimizer, the FP8 scale update and the counters; (2) clipping needs unscaled gradients,
and ``GradScaler.unscale_`` refuses FP16 ones, which a model without master weights has;
(3) its per-step state is a private per-optimizer dict. Here the gradients are never
unscaled in their own dtype: the clipping coefficient and ``1 / scale`` go to the fused
AdamW as its ``grad_scale``, which divides in fp32 inside the kernel (``clip_scaled_``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fp8lab.gemm.fp8_all_gather import whole_tensor

# FP16 rounds every |g| <= 2**-25 to zero (its smallest subnormal is 2**-24, a tie goes to even).
FP16_ZERO_BOUND = 2.0**-25


def flushing_scale(tokens: int) -> float:
    """The loss scale at or below which every FP16 gradient is zero, for a loss that is the
    mean over ``tokens`` tokens.

    The gradient of the mean cross-entropy with respect to a logit is ``(p - y) / tokens``,
    of magnitude below ``1 / tokens``; under a loss scale S it reaches the FP16 logits as
    ``S * (p - y) / tokens``. When ``S / tokens <= 2**-25`` every one of them rounds to zero,
    and every gradient of the model (all downstream of the logits) is zero with them.
    """
    return tokens * FP16_ZERO_BOUND


@dataclass(frozen=True, kw_only=True)
class LossScaleConfig:
    """Dynamic loss scaling; defaults are ``torch.amp.GradScaler``'s.

    Args:
        init: the first scale (2**16).
        growth_factor: multiplies the scale after ``growth_interval`` good steps (> 1).
        backoff_factor: multiplies the scale at a skipped step (in (0, 1)).
        growth_interval: good steps in a row before the scale grows.
    """

    init: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        def real(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not (real(self.init) and 0 < self.init <= torch.finfo(torch.float32).max):
            raise ValueError(f"init must be a finite float > 0, got {self.init!r}")
        if not (real(self.growth_factor) and self.growth_factor > 1):
            raise ValueError(f"growth_factor must be a finite float > 1, got {self.growth_factor!r}")
        if not (real(self.backoff_factor) and 0 < self.backoff_factor < 1):
            raise ValueError(f"backoff_factor must be a float in (0, 1), got {self.backoff_factor!r}")
        if (
            isinstance(self.growth_interval, bool)
            or not isinstance(self.growth_interval, int)
            or not 1 <= self.growth_interval < 2**31
        ):
            raise ValueError(f"growth_interval must be an int in [1, 2**31 - 1], got {self.growth_interval!r}")


class DynamicLossScaler:
    """One variant's loss scale: ``scale`` (float32, 0-dim) and ``growth_tracker`` (int32,
    0-dim: good steps since the scale last changed), on ``device``.

    Args:
        config: the scaling settings.
        device: where the state lives (the model's device).
    """

    def __init__(self, config: LossScaleConfig, device: torch.device):
        self.config = config
        self.scale = torch.full((), float(config.init), dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale``: the value to call ``backward`` on."""
        return loss * self.scale

    def update(self, skipped: torch.Tensor) -> None:
        """After the optimizer step: back off when ``skipped`` (0-dim bool/float), else count
        a good step and grow after ``growth_interval`` of them (GradScaler.update)."""
        c = self.config
        torch._amp_update_scale_(
            self.scale, self.growth_tracker, skipped.float(), c.growth_factor, c.backoff_factor, c.growth_interval
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors (checkpoints load with ``weights_only=True``), restored bit for bit."""
        return {"scale": self.scale.detach().clone(), "growth_tracker": self.growth_tracker.detach().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])


def clip_scaled_(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float, scale: torch.Tensor | None
) -> torch.Tensor:
    """Clip gradients that are scaled (by ``scale``) or held in 16 bits, without touching them.

    ``clip_grad_norm_`` would take the norm in the gradients' dtype (an FP16 norm of
    loss-scaled gradients overflows at 65504) and multiply them in place (unscaled FP16
    gradients underflow, the very thing loss scaling prevents). Instead the norm is taken
    in fp32, and ``scale / clip_coef`` is handed to the fused AdamW as ``grad_scale``: the
    kernel divides each gradient by it in fp32. Same coefficient as ``clip_grad_norm_``:
    ``min(1, max_norm / (norm + 1e-6))``.

    Args:
        optimizer: a fused AdamW (it reads ``grad_scale`` at its next ``step``).
        params: the parameters whose ``.grad`` to clip.
        max_norm: the clipping threshold (inf: no clipping).
        scale: the loss scale (0-dim float32 tensor), or None for unscaled gradients.
    Returns:
        the total gradient norm of the unscaled gradients (fp32, 0-dim; inf/NaN when a
        gradient is not finite), on the device.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)  # per tensor, fp32 accumulation
    total = whole_tensor(torch.linalg.vector_norm(torch.stack(norms)))  # FSDP: the shards' norms combined
    if scale is not None:
        total = total / scale
    clip_coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    optimizer.grad_scale = clip_coef.reciprocal() if scale is None else scale / clip_coef
    return total
