"""A run's checkpoints of both kinds, listed, chosen and pruned as one sequence of steps.

Invariant: a run folder's checkpoints are ordered by step whatever their kind, and a step
is held by one kind at a time:

- ``checkpoints/step_XXXXXXXX.pt`` (``run.checkpoint``): one file, written by rank 0, when
  every rank holds whole variants (one process, DDP);
- ``checkpoints/step_XXXXXXXX.dcp/`` (``run.sharded_checkpoint``): every rank writes its
  shards, when the variants are sharded (``train.parallel="fsdp"`` over more than one process).
  DCP holds each variant's parameters and optimizer state (keys ``<variant>.model.<fqn>``,
  ``<variant>.optim...``); each rank's ``extra`` holds the rest of a whole checkpoint's
  payload (``folder.sharded_payload``) and its rank file its RNG state.

``--resume`` takes the newest usable checkpoint of either kind (digests checked, config
compared, the variants' keys validated) and an older intact one is offered when it is
damaged; a run then writes the kind its own world size calls for. ``train.keep_checkpoints``
counts both kinds; saving a step removes the other kind's checkpoint of that step, after
the new one is in place.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fp8lab.run import checkpoint as ckpt
from fp8lab.run import sharded_checkpoint as sharded

SHARDED_FORMAT_VERSION = 1  # the extra's own fields; the files' integrity is the manifest's
SHARDED_REQUIRED = ("format_version", "step", "config_hash", "config", "variants", "summary")


def list_all(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every completed checkpoint of either kind, oldest first."""
    return sorted(ckpt.list_checkpoints(run_dir) + sharded.list_sharded(run_dir))


def read_any(path: Path) -> dict:
    """A checkpoint's checked payload. For a sharded one: rank 0's ``extra`` (no tensor of a
    model is loaded), each variant's ``model`` being the keys DCP holds for it (to validate)."""
    path = Path(path)
    if path.suffix != ".dcp":
        return ckpt.read_checkpoint(path)
    extra, keys = sharded.read_sharded(path)  # every file checked against the manifest
    if (
        not isinstance(extra, dict)
        or any(k not in extra for k in SHARDED_REQUIRED)
        or not isinstance(extra["variants"], dict)
        or not all(isinstance(state, dict) for state in extra["variants"].values())
    ):
        raise ckpt.CheckpointError(f"checkpoint {path} is not an fp8lab run checkpoint (its rank files lack fields)")
    if extra["format_version"] != SHARDED_FORMAT_VERSION or extra["step"] != int(path.stem.split("_")[1]):
        raise ckpt.CheckpointError(
            f"checkpoint {path} has format_version {extra['format_version']!r} and step {extra['step']!r}; "
            f"this fp8lab reads sharded run checkpoints of format_version {SHARDED_FORMAT_VERSION} of their own step"
        )
    for name, state in extra["variants"].items():
        prefix = f"{name}.model."
        state["model"] = {key[len(prefix) :]: None for key in keys if key.startswith(prefix)}
    return extra


def newest_usable(run_dir: Path, config_hash: str, config_dict: dict, validate=None) -> tuple[Path, dict]:
    """``checkpoint.newest_usable`` over both kinds (under torchrun every rank calls it: reading
    a sharded checkpoint is a collective)."""
    return ckpt.newest_usable(run_dir, config_hash, config_dict, validate, found=list_all(run_dir), read=read_any)


def prune(run_dir: Path, saved: Path, keep: int) -> None:
    """After ``saved`` was published (rank 0): drop the other kind's checkpoint of its step,
    then all but the newest ``keep`` of both kinds."""
    found = list_all(run_dir)
    step = next(s for s, path in found if path == saved)
    for s, path in found:
        if s == step and path != saved:
            _remove(path)
    for _, old in list_all(run_dir)[:-keep]:
        _remove(old)


def _remove(path: Path) -> None:
    if path.suffix == ".dcp":
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
    else:
        ckpt._remove(path)
