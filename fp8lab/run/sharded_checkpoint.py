"""Sharded checkpoints with torch.distributed.checkpoint (DCP): each rank writes its own shards.

Invariant: a folder named ``checkpoints/step_XXXXXXXX.dcp`` is complete and every file in it
matches its manifest. It is written as ``step_XXXXXXXX.dcp.tmp-<pid>`` (DCP's shard files,
fsynced; one ``extra_rankNNNNN.pt`` per rank), then, after every rank has finished, rank 0
writes ``manifest.json`` (size and SHA-256 of every file, world size, format version),
fsyncs it and the folder, renames the folder and fsyncs ``checkpoints/``: a crash at any
moment leaves the previous set (plus a ``.tmp-`` folder that is ignored, and removed by the
next save) or the new one. Loading checks every file against the manifest first and never
runs pickled code (``sharded_files``).

What is saved: parameters and optimizer state through ``get_state_dict`` (FSDP2 DTensors stay
sharded, one shard per rank; an unsharded model saves whole tensors), fp8lab's scaling state
(``amax_history`` and ``scale`` buffers, whole on every rank under FSDP2: checked identical on
every rank before it is saved once), and per rank its ``extra`` dict (plain values and
tensors) and its torch CPU generator state (CUDA's too, where CUDA is initialized).

World size. Parameters, optimizer state and scaling state load at any world size, resharded
by DCP, and are bit-identical to what was saved. Rank r gets back rank r's ``extra`` and RNG
state when the checkpoint has one; a rank beyond the saved world size gets rank 0's
``extra`` and a CPU generator seeded from SHA-256(rank 0's state, its rank): deterministic,
different per rank. Ranks dropped by a smaller world size are lost. Training continued at
the same world size is bit-exact; at another world size it may differ in reduction order.

Several models in one checkpoint (a run's variants): ``save_sharded_parts`` and
``load_sharded_parts`` take ``{name: (model, optimizer)}``; DCP's keys are then prefixed with
the name (``fp8.model.<fqn>``, ``fp8.optim.state.<fqn>.exp_avg``); ``extra`` stays one per rank.

A DTensor over fp8lab's ``ShardedFP8Weight`` (the FP8 all-gather's parameter) is saved and
loaded as a DTensor over its plain fp32 shard (``sharded_state.plain_shards``): the files name no fp8lab class.

Collectives: ``save_sharded*``, ``load_sharded*``, ``read_sharded`` and ``newest_usable_sharded``
are called by every rank of the default process group together (or by one process without
one); the run folder must be on a filesystem every rank sees.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from fp8lab.run.checkpoint import CheckpointError, _fsync_dir, checkpoint_dir
from fp8lab.run.digest import payload_digest
from fp8lab.run.sharded_files import (
    MANIFEST,
    SafeReader,
    WeightsOnlyLoadPlanner,
    check_file,
    check_plain,
    file_digest,
    read_dcp_metadata,
    read_manifest,
    read_rank_file,
    write_manifest,
    write_rank_file,
)
from fp8lab.run.sharded_state import dcp_state, set_dcp_state

_NAME = re.compile(r"^step_(\d{8})\.dcp$")
_LEFTOVER = re.compile(r"^step_\d{8}\.dcp\.(tmp|replaced)-\d+$")


@contextlib.contextmanager
def _single_process_said():
    """DCP without a process group warns that it assumes one process: that is what fp8lab means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj) -> list:
    """``obj`` of every rank, in rank order (a gloo/nccl object all-gather; one process: [obj])."""
    if _rank_world()[1] == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _together(fn, *args):
    """Run ``fn`` on this rank; if it failed on any rank, raise CheckpointError on every rank
    (a rank that failed alone would otherwise leave the others waiting in a collective)."""
    result, error = None, None
    try:
        result = fn(*args)
    except Exception as err:  # reported to every rank below
        error = err if isinstance(err, CheckpointError) else CheckpointError(f"{type(err).__name__}: {err}")
    errors = [e for e in _gather(None if error is None else str(error)) if e is not None]
    if errors:
        raise error if error is not None else CheckpointError(errors[0])
    return result


def list_sharded(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every completed sharded checkpoint, oldest first (``.tmp-`` folders ignored)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_dir())


def _replicated_digests(state: dict) -> dict[str, str]:
    """The digest (``run.digest``: dtype, shape and bytes) of every tensor that is not a DTensor
    (buffers: the scaling state), by key."""
    return {
        key: payload_digest({key: value})
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and not isinstance(value, DTensor)
    }


def _check_replicated(model_state: dict) -> None:
    """DCP saves a replicated tensor from one rank: refuse if the ranks' copies differ."""
    if _rank_world()[1] == 1:
        return
    digests = _gather(_replicated_digests(model_state))
    differ = sorted(k for k in digests[0] if any(d.get(k) != digests[0][k] for d in digests[1:]))
    if differ:
        raise CheckpointError(
            f"replicated tensors differ between ranks, so no one copy can be saved: {differ[:4]} "
            "(is fp8lab.update_scales called on every rank after each optimizer step?)"
        )


def _digest_share(folder: Path, names: list[str], rank: int, world: int) -> dict:
    return {name: file_digest(folder / name) for name in names[rank::world]}


def save_sharded(run_dir: Path, step: int, model, optimizer, extra: dict, keep: int) -> Path:
    """Save ``model`` (FSDP2-sharded or whole), ``optimizer`` (or None) and this rank's ``extra``.

    Called by every rank together. Returns the checkpoint folder, ``checkpoints/step_XXXXXXXX.dcp``.

    Args:
        run_dir: the run folder; checkpoints go to ``run_dir/checkpoints/``.
        step: the optimizer steps taken (the folder's name).
        model: the model, after ``Distributed.shard`` or unsharded.
        optimizer: its optimizer, or None.
        extra: this rank's host-side state (loss scale, data position...): tensors, numbers,
            strings, None and lists/tuples/dicts of them. The CPU RNG state is added here.
        keep: how many sharded checkpoints to keep (the newest; >= 1).
    """
    return _save(run_dir, step, {"": (model, optimizer)}, extra, keep)


def save_sharded_parts(run_dir: Path, step: int, parts: dict, extra: dict, keep: int) -> Path:
    """``save_sharded`` of several models in one checkpoint: ``parts`` maps a name to
    ``(model, optimizer or None)``; DCP's keys are ``<name>.model.<fqn>`` and ``<name>.optim...``."""
    if not parts or "" in parts:
        raise ValueError(f"parts must be named, got {sorted(parts)!r}")
    return _save(run_dir, step, parts, extra, keep)


def _save(run_dir: Path, step: int, parts: dict, extra: dict, keep: int) -> Path:
    """Every rank: ``parts`` (name -> (model, optimizer)); the name "" alone is save_sharded's layout."""
    if type(keep) is not int or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    check_plain(extra, "extra")
    rank, world = _rank_world()
    folder = checkpoint_dir(run_dir)
    final = folder / f"step_{step:08d}.dcp"
    tmp = Path(_gather(str(folder / f"{final.name}.tmp-{os.getpid()}"))[0])  # rank 0's pid names it
    _together(_make_tmp, tmp, rank)  # it exists before any rank writes into it
    try:
        states = {name: dcp_state(model, optimizer) for name, (model, optimizer) in parts.items()}
        replicated = {f"{n}.{k}" if n else k: v for n, part in states.items() for k, v in part["model"].items()}
        _together(_check_replicated, replicated)
        state = states[""] if "" in states else states  # one model: save_sharded's layout, no prefix
        with _single_process_said():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))
        _together(write_rank_file, tmp, rank, world, step, extra)
        names = _gather(sorted(p.name for p in tmp.iterdir()) if rank == 0 else None)[0]
        shares = _together(_digest_share, tmp, names, rank, world)
        files = {name: entry for share in _gather(shares) for name, entry in share.items()}
        _together(_publish, tmp, final, step, world, files, keep, rank)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _make_tmp(tmp: Path, rank: int) -> None:
    if rank == 0:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a dead process of the same pid
        tmp.mkdir()


def _publish(tmp: Path, final: Path, step: int, world: int, files: dict, keep: int, rank: int) -> None:
    """Rank 0: manifest, fsync, rename into place, fsync the parent, prune."""
    if rank != 0:
        return
    write_manifest(tmp, step, world, files)
    _fsync_dir(tmp)
    folder = final.parent
    aside = None
    if final.exists():  # a step saved again (after a resume from an older checkpoint)
        aside = folder / f"{final.name}.replaced-{os.getpid()}"
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(folder)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    for _, old in list_sharded(folder.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in folder.iterdir():  # left by a process killed mid-save
        if _LEFTOVER.match(leftover.name) and leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)


def _read_and_share(path: Path, rank: int, world: int) -> dict:
    manifest = read_manifest(path)
    named = _NAME.match(path.name)
    if named and int(named.group(1)) != manifest["step"]:
        raise CheckpointError(f"checkpoint {path} holds step {manifest['step']}, not the step its name says")
    names = sorted(manifest["files"])
    for name in names[rank::world]:
        check_file(path, name, manifest["files"][name])
    return manifest


def verify_sharded(path: Path) -> dict:
    """The manifest of ``path`` after every file was checked against it (ranks share the
    reading); CheckpointError naming the first damaged, missing or truncated file."""
    rank, world = _rank_world()
    return _together(_read_and_share, Path(path), rank, world)


def load_sharded(path: Path, model, optimizer=None, *, restore_rng: bool = True) -> dict:
    """Load a sharded checkpoint into ``model`` (and ``optimizer``) at any world size; return ``extra``.

    Called by every rank together, after ``Distributed.shard`` (or on the unsharded model) and
    after the optimizer was built. Every file is checked against the manifest first.

    Args:
        path: a ``checkpoints/step_XXXXXXXX.dcp`` folder.
        restore_rng: set this rank's torch CPU (and CUDA) generator state from the checkpoint.
    """
    state = dcp_state(model, optimizer)
    payload = _load(Path(path), state, restore_rng)
    set_dcp_state(model, optimizer, state)
    return payload["extra"]


def load_sharded_parts(path: Path, parts: dict, *, restore_rng: bool = True) -> dict:
    """``load_sharded`` of a ``save_sharded_parts`` checkpoint into ``parts`` (name ->
    ``(model, optimizer or None)``, the names it was saved with); returns this rank's ``extra``."""
    state = {name: dcp_state(model, optimizer) for name, (model, optimizer) in parts.items()}
    payload = _load(Path(path), state, restore_rng)
    for name, (model, optimizer) in parts.items():
        set_dcp_state(model, optimizer, state[name])
    return payload["extra"]


def _load(path: Path, state: dict, restore_rng: bool) -> dict:
    """Check ``path``, fill ``state`` (DCP's view of the models) in place; this rank's rank file."""
    rank, _ = _rank_world()
    manifest = verify_sharded(path)
    payload = _together(read_rank_file, path, manifest, rank)
    metadata = _together(read_dcp_metadata, path, manifest)  # before DCP: it would pickle.load it
    with _single_process_said():
        dcp.load(state, storage_reader=SafeReader(path, metadata), planner=WeightsOnlyLoadPlanner())
    if restore_rng:
        torch.set_rng_state(payload["rng"]["cpu"])
        if "cuda" in payload["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(payload["rng"]["cuda"])
    return payload


def read_sharded(path: Path) -> tuple[dict, list[str]]:
    """Rank 0's ``extra`` and the keys DCP holds (``<name>.model.<fqn>``...) of ``path``, after
    every file was checked against the manifest; no tensor is loaded. Every rank together."""
    path = Path(path)
    manifest = verify_sharded(path)
    payload = _together(read_rank_file, path, manifest, 0)
    metadata = _together(read_dcp_metadata, path, manifest)
    return payload["extra"], sorted(metadata.state_dict_metadata)


def newest_usable_sharded(run_dir: Path) -> tuple[Path, list[tuple[Path, str]]]:
    """The newest sharded checkpoint whose files all match its manifest, and the newer ones
    refused (path, reason), newest first; CheckpointError when none is usable."""
    found = list_sharded(run_dir)
    if not found:
        raise CheckpointError(f"run folder {run_dir} has no sharded checkpoints in {checkpoint_dir(run_dir)}")
    refused = []
    for _, path in reversed(found):
        try:
            verify_sharded(path)
        except CheckpointError as err:
            refused.append((path, str(err)))
            continue
        return path, refused
    raise CheckpointError("; ".join(reason for _, reason in refused) + ". No sharded checkpoint is usable")


__all__ = [
    "MANIFEST",
    "list_sharded",
    "load_sharded",
    "load_sharded_parts",
    "newest_usable_sharded",
    "read_sharded",
    "save_sharded",
    "save_sharded_parts",
    "verify_sharded",
]
