"""The learning-rate schedule of a run.

Invariant: a pure function of the step and the config (no state), so a resumed run sets
exactly the learning rate the uninterrupted run would have.
"""

from __future__ import annotations

import math

from fp8lab.run.config import RunConfig


def learning_rate(step: int, config: RunConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr at the last step."""
    t = config.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
