"""What a run writes besides its metrics: the hparams of each variant, and the wait that
keeps a resumed run's event files sorted after the dead run's.

Invariant: pure formatting of host values (and one bounded sleep); nothing here reads a
device tensor or trains.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from fp8lab.run.config import RunConfig
from fp8lab.run.precision import rung_of


def wait_past_event_files(run_dir: Path) -> None:
    """Wait (at most 1 s) until the clock's second is past every event file's in ``run_dir``.

    TensorBoard reads a folder's event files in name order, and a name is
    ``events.out.tfevents.<second>.<host>.<pid>.<counter>``: a resumed run's file created
    in the same second as the dead run's can sort before it (``...12.10`` < ``...12.9``),
    and its events would then be read first and purge the earlier ones.
    """
    seconds = [
        int(p.name.split(".")[3]) for p in run_dir.glob("*/events.out.tfevents.*") if p.name.split(".")[3].isdigit()
    ]
    if seconds:
        time.sleep(max(0.0, max(seconds) + 1 - time.time()))


def hparams_of(config: RunConfig, variant) -> dict:
    scaling = {f"scaling.{k}": v for k, v in dataclasses.asdict(variant.scaling).items()}  # the recipe's own fields
    return {
        "variant": variant.name,
        "precision": variant.precision,
        "scaling": variant.scaling.name,
        **scaling,
        "first_last_bf16": variant.first_last_bf16,
        "accumulation": variant.accumulation,
        "activations": rung_of(variant).activations,
        "master_weights": variant.master_weights,
        "optimizer_state": variant.optimizer_state,
        "steps": config.train.steps,
        "lr": config.train.lr,
        "batch_size": config.train.batch_size,
    }
