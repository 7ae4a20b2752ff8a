"""Gradients FP16 would flush to zero without loss scaling, per layer, at log steps.

What loss scaling is for, measured rather than asserted: FP16's smallest subnormal is
2**-24, and rounding to nearest even sends every ``|g| <= 2**-25`` to zero. Under a loss
scale S, the gradient a layer's output receives is ``S * g``, rounded to FP16; without
the scale it would have been ``g`` itself, which flushes when ``|S * g| <= S * 2**-25``.
The share reported is of the non-zero values of each fp8lab Linear's output gradient (its
``grad_output``, the FP16 tensor that enters its dgrad and wgrad GEMMs).

Invariant: hooks exist only between ``arm`` and ``disarm`` (log steps); they count on the
device into one (n_layers, 2) tensor, which ``read`` copies to the host once. Layers are
never written to.
"""

from __future__ import annotations

import torch
from torch import nn

from fp8lab.layers.linear import Linear
from fp8lab.telemetry.keys import FP16_FLUSH, Key

FLUSH_BOUND = 2.0**-25  # the largest magnitude FP16 rounds to zero (a tie, to even: 0)


class FP16FlushProbe:
    """Counts, per fp8lab Linear of ``model``, output-gradient values that would flush.

    Args:
        model: the variant's (un-wrapped) model.
    """

    def __init__(self, model: nn.Module):
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
        device = next(model.parameters()).device
        self.counts = torch.zeros(len(self.layers), 2, dtype=torch.int64, device=device)  # (flush, non-zero)
        self._handles: list = []

    def arm(self, loss_scale: torch.Tensor) -> None:
        """Count during the coming forward and backward, whose loss is scaled by ``loss_scale``."""
        bound = loss_scale.float() * FLUSH_BOUND  # 0-dim, on the device

        def count(i: int):
            def on_grad(grad: torch.Tensor) -> None:
                g = grad.detach().float().abs()
                nonzero = g != 0
                self.counts[i, 0] += (nonzero & (g <= bound)).sum()
                self.counts[i, 1] += nonzero.sum()

            return on_grad

        def hook_for(i: int):
            def forward_hook(module, args, output):
                if output.requires_grad:
                    output.register_hook(count(i))

            return forward_hook

        self._handles = [layer.register_forward_hook(hook_for(i)) for i, (_, layer) in enumerate(self.layers)]

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def read(self) -> dict[str, float]:
        """``{"precision/fp16_flush_pct/<layer>": %}`` since the last read (one host copy)."""
        host = self.counts.tolist()  # a copy (.cpu() of a CPU tensor would be the tensor itself)
        self.counts.zero_()
        return {
            Key(FP16_FLUSH, name).tag: 100.0 * flush / total
            for (name, _), (flush, total) in zip(self.layers, host)
            if total
        }
