"""The run folder: ``<out>/<recipe>/<run_id>/`` claimed, locked, checkpointed, restored, finished.

Invariant: this is the only code that writes into a run folder besides the event files
(``fp8lab.run.runlog``): ``config.json`` once, checkpoints atomically (``run.checkpoint``),
and at the end ``summary.json`` and the heatmaps, each written atomically; only rank 0
writes (but for the shards of a sharded checkpoint: every rank's own), and it holds the
folder's lock from ``claim`` to ``release``. A checkpoint's payload is assembled and applied
here, in one format (``checkpoint.FORMAT_VERSION``): step, config, every variant's state, RNG
state, the summary's state and the overviews' history. A sharded run (FSDP over more than
one process) writes the same payload as a DCP checkpoint (``run.checkpoint_kinds``): the
variants' parameters and optimizer state in shards, the rest in each rank's ``extra``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

from fp8lab.run import checkpoint as ckpt
from fp8lab.run import checkpoint_kinds, sharded_checkpoint, storage
from fp8lab.run.config import RunConfig
from fp8lab.run.distributed import Distributed
from fp8lab.run.lock import RunFolderBusy, RunLock


class RunFolder:
    """One run's folder.

    Args:
        config: the run's config (its name, hash and dict go into the folder).
        out_root: the logs folder; a fresh run goes to ``out_root/<name>/<run_id>/``.
        dist: the data-parallel job (rank 0 writes; every rank learns the folder's name).
        run_dir: the folder of a fresh run named by the ``--nproc`` launcher, or None.
    """

    def __init__(self, config: RunConfig, out_root: Path, dist: Distributed, run_dir: Path | None = None):
        self.config, self.out_root, self.dist = config, Path(out_root), dist
        self.path: Path | None = Path(run_dir) if run_dir is not None else None
        self.lock: RunLock | None = None
        self.resumed_from: Path | None = None  # the checkpoint this process loaded
        self.last_checkpoint: Path | None = None  # the newest intact checkpoint (named in errors)
        self.created: list[Path] = []  # folders a fresh run's claim made, innermost first

    def load_newest(self, resume: Path, validate) -> dict:
        """The newest usable checkpoint of ``resume`` (its config, its state keys: ``validate``);
        the folder becomes ``resume``. Raises ``CheckpointError`` when none is usable."""
        self.resumed_from, payload = checkpoint_kinds.newest_usable(
            resume, self.config.hash(), self.config.to_dict(), validate
        )
        self.path, self.last_checkpoint = resume, self.resumed_from
        return payload

    def claim(self) -> None:
        """Create (fresh run) and lock the folder; rank 0 writes config.json. A resumed folder
        that changed since its checkpoint was loaded is another process's: ``RunFolderBusy``."""
        if self.path is None:  # rank 0 creates a fresh run's folder; every rank uses that name
            parents = [self.out_root / self.config.name, self.out_root]
            self.created = [p for p in parents if not p.exists()] if self.dist.is_main else []
            claimed = (
                storage.claim_run_dir(self.out_root, self.config.name, self.config.hash())
                if self.dist.is_main
                else None
            )
            self.path = self.dist.broadcast(claimed)
            self.created = [self.path, *self.created] if self.dist.is_main else []
        if not self.dist.is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)  # named by the --nproc launcher, or resumed
        self.lock = RunLock(self.path).acquire()
        found = checkpoint_kinds.list_all(self.path)
        if self.resumed_from is not None and (not found or found[-1][1] != self.resumed_from):
            raise RunFolderBusy(
                f"run folder {self.path} changed while this process loaded {self.resumed_from} "
                "(another process wrote into it); resume again"
            )
        if not (self.path / "config.json").exists():
            storage.write_atomic(self.path / "config.json", json.dumps(self.config.to_dict(), indent=2, default=str))

    def discard(self) -> bool:
        """Remove a fresh run's folder (and the parents its claim created) when no checkpoint
        was written into it: a run that failed before keeping anything leaves nothing behind.
        Returns whether it did (False for a resumed run, a --nproc rank, or after a checkpoint).
        Call it after ``release`` and after the event files are closed."""
        if not self.created or self.last_checkpoint is not None or self.dist.enabled:
            return False
        shutil.rmtree(self.created[0], ignore_errors=True)
        for parent in self.created[1:]:
            with contextlib.suppress(OSError):
                parent.rmdir()  # only when empty: another run may have started there meanwhile
        return True

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def save_checkpoint(self, step: int, variants, summary, overviews: dict) -> Path | None:
        """Write the checkpoint of ``step`` atomically: a whole file by rank 0 (ranks hold the
        same state), or, when the variants are sharded (FSDP), a DCP folder by every rank.
        Returns its path (None on ranks other than 0 for a whole file)."""
        keep = self.config.train.keep_checkpoints
        if any(run.sharded for run in variants):  # every rank: its shards and its extra
            parts = {run.variant.name: (run.model, run.optimizer) for run in variants}
            extra = sharded_payload(self.config, step, variants, summary, overviews)
            path = sharded_checkpoint.save_sharded_parts(self.path, step, parts, extra, keep)
        elif self.dist.is_main:
            path = ckpt.save_checkpoint(
                self.path, step, checkpoint_payload(self.config, step, variants, summary, overviews), keep
            )
        else:
            return None
        if self.dist.is_main:  # keep counts both kinds; this step is now held by this kind only
            checkpoint_kinds.prune(self.path, path, keep)
        self.last_checkpoint = path
        return path

    def restore(self, payload: dict, variants, summary, overviews: dict) -> int:
        """Put a checkpoint's state back into the variants, summary, overviews and RNGs;
        returns its step. A variant that does not fit is a ``CheckpointError`` naming it.
        A sharded checkpoint is loaded by every rank together, resharded to this world size:
        ``payload`` (rank 0's, read to choose it) is replaced by this rank's own."""
        sharded = self.resumed_from is not None and self.resumed_from.suffix == ".dcp"
        if sharded:  # the parameters and optimizer state, and this rank's extra and RNG state
            parts = {run.variant.name: (run.model, run.optimizer) for run in variants}
            try:
                payload = sharded_checkpoint.load_sharded_parts(self.resumed_from, parts)
            except (KeyError, ValueError, RuntimeError) as err:  # CheckpointError is a ValueError
                raise ckpt.CheckpointError(f"checkpoint {self.resumed_from}: {err}") from None
        for run in variants:
            try:
                run.load_state_dict(payload["variants"][run.variant.name], weights=not sharded)
            except (KeyError, ValueError, RuntimeError) as err:
                raise ckpt.CheckpointError(
                    f"checkpoint {self.resumed_from}: variant {run.variant.name!r}: {err}"
                ) from None
        summary.load_state_dict(payload["summary"])
        for name, state in payload.get("overview", {}).items():  # older checkpoints have none
            overviews[name].load_state_dict(state)
        if sharded:  # load_sharded_parts set the RNG state (a new rank's: derived from rank 0's)
            return payload["step"]
        torch.set_rng_state(payload["rng"]["torch"])
        device = variants[0].device
        if device.type == "cuda" and payload["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(payload["rng"]["cuda"], device)
        return payload["step"]

    def finish(self, result: dict, pictures: dict[str, bytes]) -> None:
        """Rank 0 writes ``summary.json`` and each variant's heatmap ``scaling_<name>.png``."""
        if not self.dist.is_main:
            return
        for name, png in pictures.items():
            storage.write_atomic(self.path / f"scaling_{name}.png", png)
        storage.write_atomic(self.path / "summary.json", _summary_text(result))

    def has_summary(self, result: dict) -> bool:
        """Whether summary.json holds exactly ``result`` (as ``finish`` writes it)."""
        try:
            return (self.path / "summary.json").read_text() == _summary_text(result)
        except (OSError, ValueError):  # missing, unreadable, not UTF-8
            return False

    def storage_error(self, err: OSError) -> storage.StorageError:
        """A failed write, named with the folder and its newest intact checkpoint."""
        return storage.storage_error(err, self.path, self.last_checkpoint)


def checkpoint_payload(config: RunConfig, step: int, variants, summary, overviews: dict, states=None) -> dict:
    """What a checkpoint file holds, in one place: ``fp8lab.run.checkpoint_size`` measures
    the same payload built from fake tensors, so a field added here is counted there too.
    ``states``: the variants' state dicts when already taken (FSDP gathers them on every rank)."""
    device = variants[0].device
    return {
        "format_version": ckpt.FORMAT_VERSION,
        "step": step,
        "config_hash": config.hash(),
        "config": config.to_dict(),
        "variants": states if states is not None else {run.variant.name: run.state_dict() for run in variants},
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        },
        "summary": summary.state_dict(),
        "overview": {name: overview.state_dict() for name, overview in overviews.items() if overview},
    }


def sharded_payload(config: RunConfig, step: int, variants, summary, overviews: dict) -> dict:
    """A sharded checkpoint's ``extra`` (each rank's own): ``checkpoint_payload`` without the
    tensors DCP holds (every variant's model and optimizer) and the RNG state (its rank file's)."""
    states = {run.variant.name: run.state_dict(weights=False) for run in variants}
    payload = checkpoint_payload(config, step, variants, summary, overviews, states)
    del payload["rng"]
    return {**payload, "format_version": checkpoint_kinds.SHARDED_FORMAT_VERSION}


def _summary_text(result: dict) -> str:
    return json.dumps(result, indent=2)


def check_variants_fit(path: Path, payload: dict, variants) -> None:
    """The checkpoint holds every variant, with exactly the state keys of its model."""
    for run in variants:
        state = payload["variants"].get(run.variant.name)
        if state is None:
            raise ckpt.CheckpointError(f"checkpoint {path} has no variant {run.variant.name!r}")
        expected, saved = set(run.model.state_dict()), set(state["model"])
        missing = sorted(expected - saved)
        if missing:
            what = "FP8 scaling state" if any("fp8_state" in k for k in missing) else "model state"
            raise ckpt.CheckpointError(
                f"checkpoint {path}: variant {run.variant.name!r} has no {what} for {missing[:3]}"
            )
        if saved - expected:
            raise ckpt.CheckpointError(
                f"checkpoint {path}: variant {run.variant.name!r} has unexpected keys {sorted(saved - expected)[:3]}"
            )
