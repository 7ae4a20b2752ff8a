"""Checkpoints of a run: everything needed to continue it bit for bit, written atomically.

Invariant: a file named ``checkpoints/step_XXXXXXXX.pt`` is always complete: it is written
to a temporary name, fsynced, renamed, and the folder fsynced, so a crash or SIGKILL at
any moment leaves either the old set or the new one; a write that fails (disk full)
removes its temporary file and leaves the previous checkpoints as they were. Files hold
only tensors and plain containers and load with ``torch.load(weights_only=True)``;
scaling state (amax history and scale of every layer) travels inside each model's
state_dict.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from fp8lab.run.config import hash_of, upgrade

FORMAT_VERSION = 1
FOLDER = "checkpoints"
_NAME = re.compile(r"^step_(\d{8})\.pt$")
REQUIRED = ("format_version", "step", "config_hash", "config", "variants", "rng", "summary")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the problem."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / FOLDER


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every completed checkpoint, oldest first (temporary files ignored)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Sink:
    """A file wrapper that remembers the OSError of a failed write (ENOSPC, EDQUOT...)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):  # name, fileno, ...: the file's own
        return getattr(self.f, name)


def save_checkpoint(run_dir: Path, step: int, payload: dict, keep: int) -> Path:
    """Write ``payload`` as the checkpoint of ``step`` atomically; keep the newest ``keep``."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}.pt"
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            sink = _Sink(f)
            try:
                torch.save(payload, sink)
            except RuntimeError:  # torch's zip writer hides the OSError of a failed write
                if sink.error is not None:
                    raise sink.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:  # disk full, a signal's exception, anything: no partial file stays
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        old.unlink()
    for stale in folder.glob(".step_*.tmp-*"):  # left by a process killed mid-write
        if stale != tmp:
            stale.unlink(missing_ok=True)
    return final


def read_checkpoint(path: Path) -> dict:
    """Load and sanity-check one checkpoint file (CPU tensors)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as err:  # truncated zip, bad pickle, unsafe global: all mean unusable
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {str(err)[:200]})"
        ) from None
    if not isinstance(payload, dict) or any(k not in payload for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(payload, dict) or k not in payload]
        raise CheckpointError(f"checkpoint {path} is not an fp8lab run checkpoint (missing {missing})")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format_version {payload['format_version']}, this fp8lab reads {FORMAT_VERSION}"
        )
    return payload


def _config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return diffs


def check_config(path: Path, payload: dict, config_hash: str, config_dict: dict) -> None:
    """Refuse a checkpoint written for another config, naming the fields that differ (a config
    of an earlier fp8lab is first given the fields it lacked, ``config.upgrade``)."""
    if payload["config_hash"] != config_hash and hash_of(upgrade(payload["config"])) != config_hash:
        saved = upgrade(payload["config"])
        saved = {**saved, "variants": {v["name"]: v for v in saved.get("variants", [])}}
        now = {**config_dict, "variants": {v["name"]: v for v in config_dict.get("variants", [])}}
        diffs = _config_diff(saved, now) or ["(hash differs)"]
        raise CheckpointError(f"checkpoint {path} was written for another config: " + "; ".join(diffs[:6]))


def newest_usable(run_dir: Path, config_hash: str, config_dict: dict, validate=None) -> tuple[Path, dict]:
    """The newest checkpoint of ``run_dir``, validated; errors offer an older intact one.

    Args:
        validate: optional ``validate(path, payload)`` raising CheckpointError when the
            payload does not fit the models it will be loaded into.
    """
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"run folder {run_dir} has no checkpoints in {FOLDER}/ to resume from")

    def usable(path: Path) -> dict:
        payload = read_checkpoint(path)
        check_config(path, payload, config_hash, config_dict)
        if validate is not None:
            validate(path, payload)
        return payload

    _, newest = found[-1]
    try:
        return newest, usable(newest)
    except CheckpointError as err:
        for _, older in reversed(found[:-1]):
            try:
                usable(older)
            except CheckpointError:
                continue
            raise CheckpointError(
                f"{err}. An older intact checkpoint exists: {older} (move {newest.name} away to resume from it)"
            ) from None
        raise
