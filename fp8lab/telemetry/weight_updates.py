"""What happens to tiny updates of FP8 primary weights: the share lost to rounding, per layer.

``weights/<layer>/updates_lost_pct``: of the layer's weight elements, the % whose optimizer
update was nonzero (the master copy, or the dequantized weight being updated, changed in
the step) but whose stored FP8 code is the one the value before the update gets with the
same scale: the stored FP8 weight did not change because of the update (with an unchanged
scale: it did not change at all). Without master weights such an update is gone; with master weights it
stays in the master and may move the FP8 weight in a later step (why master weights exist).

Invariant: counted by ``fp8lab.optim.FP8WeightUpdate.finish`` on the steps it is asked to
(the runner's log steps), on the device; ``read`` copies the counts to the host once.
"""

from __future__ import annotations

import torch

from fp8lab.telemetry.keys import WEIGHTS, Key


class LostUpdateProbe:
    """Per FP8-weight layer, ``updates_lost_pct`` of the last tracked step.

    Args:
        update: the run's ``fp8lab.optim.fp8_weights.FP8WeightUpdate``.
    """

    def __init__(self, update):
        self.update = update

    def read(self) -> dict[str, float]:
        """``{"weights/<layer>/updates_lost_pct": %}``; layers not counted yet are left out."""
        names = [name for name in self.update.layers if name in self.update.lost]
        if not names:
            return {}
        counts = torch.stack([self.update.lost[name] for name in names]).tolist()  # the one host copy
        return {
            Key(WEIGHTS, name, stat="updates_lost_pct").tag: 100.0 * count / self.update.layers[name].weight.numel()
            for name, count in zip(names, counts)
        }
