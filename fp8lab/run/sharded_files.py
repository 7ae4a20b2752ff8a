"""The files of a sharded checkpoint: their manifest, its check, and reading them without pickle code.

Invariant: nothing of a sharded checkpoint folder is parsed before its bytes match the
SHA-256 that the manifest (``manifest.json``, written last, by rank 0) gives for it, and
nothing in it can run code when parsed:

- tensor shards: DCP's ``FileSystemReader`` already loads them with ``torch.load(weights_only=True)``;
- non-tensor values (optimizer hyperparameters: lr, betas...): DCP's ``DefaultLoadPlanner.load_bytes``
  uses ``torch.load(weights_only=False)``; ``WeightsOnlyLoadPlanner`` loads them with
  ``weights_only=True`` instead;
- DCP's ``.metadata`` is a plain ``pickle.load`` in torch 2.13 (``FileSystemReader.read_metadata``,
  no weights_only path and no hook): ``SafeReader`` checks its digest, then unpickles those same
  bytes with an unpickler that resolves only the classes DCP's metadata is made of
  (``METADATA_GLOBALS``; anything else is refused before it is looked up, so no ``__reduce__``
  of another class runs).

- rank files (``extra_rankNNNNN.pt``: each rank's ``extra`` and RNG state): plain containers and
  tensors only (``check_plain`` before saving), loaded from the checked bytes with ``weights_only=True``.

The digests of the data files are checked before DCP reads them, not while it reads them: a
file replaced between the check and the read is not detected (it still cannot run code).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element  # DefaultLoadPlanner's own helper
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta

from fp8lab.run.checkpoint import CheckpointError, _open_regular

MANIFEST = "manifest.json"
METADATA = ".metadata"  # DCP's own name (torch.distributed.checkpoint.filesystem._metadata_fn)
MANIFEST_VERSION = 1
KIND = "fp8lab-sharded-checkpoint"
_CHUNK = 1 << 20

_DCP = "torch.distributed.checkpoint.metadata"
METADATA_GLOBALS = frozenset(
    {(_DCP, name) for name in ("Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata")}
    | {(_DCP, name) for name in ("BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties")}
    | {(_DCP, "_MEM_FORMAT_ENCODING"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}
    | {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
    | {("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")}
    | {("torch", name) for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}
)


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, ``sha256:<hex>``) of a regular file; CheckpointError if it is not one."""
    h, size = hashlib.sha256(), 0
    with _open_regular(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, f"sha256:{h.hexdigest()}"


def bytes_digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def write_manifest(folder: Path, step: int, world_size: int, files: dict[str, tuple[int, str]]) -> None:
    """``folder/manifest.json`` (sizes and digests of ``files``), fsynced."""
    manifest = {
        "kind": KIND,
        "format_version": MANIFEST_VERSION,
        "step": step,
        "world_size": world_size,
        "torch": torch.__version__,
        "files": {name: {"bytes": size, "sha256": digest} for name, (size, digest) in sorted(files.items())},
    }
    with open(folder / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(folder: Path) -> dict:
    """The manifest of ``folder``, its fields checked (not yet the files it lists)."""
    path = Path(folder) / MANIFEST
    with _open_regular(path) as f:
        raw = f.read()
    try:
        manifest = json.loads(raw)
    except ValueError as err:
        raise CheckpointError(f"checkpoint manifest {path} is truncated or corrupt ({err})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(files, dict)
        or manifest.get("kind") != KIND
        or type(manifest.get("step")) is not int
        or type(manifest.get("world_size")) is not int
        or manifest["world_size"] < 1
        or METADATA not in files
        or not all(
            isinstance(v, dict) and type(v.get("bytes")) is int and isinstance(v.get("sha256"), str)
            for v in files.values()
        )
    ):
        raise CheckpointError(f"checkpoint manifest {path} is not an fp8lab sharded-checkpoint manifest or is damaged")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise CheckpointError(
            f"checkpoint manifest {path} has format_version {manifest.get('format_version')!r}, "
            f"this fp8lab reads {MANIFEST_VERSION}"
        )
    for name in files:
        if name != os.path.basename(name) or name in ("", ".", ".."):
            raise CheckpointError(f"checkpoint manifest {path} names a file outside its folder: {name!r}")
    return manifest


def check_file(folder: Path, name: str, entry: dict) -> None:
    """CheckpointError naming ``folder/name`` unless its size and digest are the manifest's."""
    path = Path(folder) / name
    size, digest = file_digest(path)
    if size != entry["bytes"]:
        raise CheckpointError(
            f"checkpoint file {path} has {size} bytes, its manifest says {entry['bytes']}: truncated or damaged"
        )
    if digest != entry["sha256"]:
        raise CheckpointError(f"checkpoint file {path} is corrupt: its SHA-256 does not match its manifest")


def read_checked(folder: Path, name: str, manifest: dict) -> bytes:
    """The bytes of ``folder/name``, read once and checked against the manifest."""
    path = Path(folder) / name
    entry = manifest["files"].get(name)
    if entry is None:
        raise CheckpointError(f"checkpoint file {path} is not listed in its manifest")
    with _open_regular(path) as f:
        data = f.read()
    if len(data) != entry["bytes"] or bytes_digest(data) != entry["sha256"]:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt: it does not match its manifest")
    return data


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in METADATA_GLOBALS:
            raise pickle.UnpicklingError(
                f"{module}.{name} is not part of DCP's checkpoint metadata; refusing to load it"
            )
        return super().find_class(module, name)


def load_metadata(data: bytes):
    """DCP ``Metadata`` from its pickle, resolving only ``METADATA_GLOBALS``."""
    return _MetadataUnpickler(io.BytesIO(data)).load()


def read_dcp_metadata(folder: Path, manifest: dict):
    """DCP's ``.metadata`` of ``folder``: digest-checked, unpickled with the allowlist, and naming
    only files the manifest lists; CheckpointError otherwise."""
    folder = Path(folder)
    data = read_checked(folder, METADATA, manifest)
    try:
        metadata = load_metadata(data)
    except Exception as err:  # a refused global, a truncated or garbled pickle
        raise CheckpointError(f"checkpoint file {folder / METADATA} is not DCP metadata ({err})") from None
    if type(metadata).__name__ != "Metadata" or not isinstance(getattr(metadata, "storage_data", None), dict):
        raise CheckpointError(f"checkpoint file {folder / METADATA} is not DCP metadata")
    for info in metadata.storage_data.values():
        if getattr(info, "relative_path", None) not in manifest["files"]:
            raise CheckpointError(
                f"checkpoint {folder}: {METADATA} names {getattr(info, 'relative_path', None)!r}, "
                "which its manifest does not list"
            )
    return metadata


class SafeReader(FileSystemReader):
    """DCP's FileSystemReader given the metadata ``read_dcp_metadata`` already checked: DCP never
    opens ``.metadata`` itself (its ``read_metadata`` is a plain ``pickle.load``)."""

    def __init__(self, path: Path, metadata):
        super().__init__(str(path))
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs):
        if kwargs.get("rank") is not None:  # DCP's fallback to rank-local metadata: never written here
            raise CheckpointError(f"checkpoint {self.path} has no rank-local metadata")
        if getattr(self.metadata, "storage_meta", None) is None:
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor values load with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


# ---------------------------------------------------------------- rank files: each rank's extra and RNG state
RANK_FORMAT_VERSION = 1
_PLAIN = (int, float, bool, str, type(None), torch.Tensor)


def rank_file(rank: int) -> str:
    return f"extra_rank{rank:05d}.pt"


def check_plain(value, where: str) -> None:
    """``extra`` must load with ``torch.load(weights_only=True)``: tensors and plain containers."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; use str or int keys")
            check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(
            f"{where} is a {type(value).__module__}.{type(value).__qualname__}; sharded checkpoints store "
            "only tensors, numbers, strings, None and lists/tuples/dicts of them (weights_only loading)"
        )


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def write_rank_file(folder: Path, rank: int, world: int, step: int, extra: dict) -> None:
    payload = {
        "format_version": RANK_FORMAT_VERSION,
        "rank": rank,
        "world_size": world,
        "step": step,
        "rng": _rng_state(),
        "extra": extra,
    }
    with open(folder / rank_file(rank), "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())


def _seeded_rng(rank0_cpu_state: torch.Tensor, rank: int) -> torch.Tensor:
    digest = hashlib.sha256(rank0_cpu_state.numpy().tobytes() + f"rank {rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little")).get_state()


def read_rank_file(path: Path, manifest: dict, rank: int) -> dict:
    saved_world = manifest["world_size"]
    source = rank if rank < saved_world else 0
    data = read_checked(path, rank_file(source), manifest)  # the bytes loaded are the bytes checked
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    expected = {"format_version": RANK_FORMAT_VERSION, "rank": source, "step": manifest["step"]}
    if not isinstance(payload, dict) or any(payload.get(k) != v for k, v in expected.items()):
        raise CheckpointError(f"checkpoint file {path / rank_file(source)} is not the rank file this checkpoint needs")
    if rank >= saved_world:  # a new rank: rank 0's extra, an RNG derived from rank 0's
        payload["rng"] = {"cpu": _seeded_rng(payload["rng"]["cpu"], rank)}
    return payload
