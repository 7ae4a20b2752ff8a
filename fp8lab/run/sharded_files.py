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
