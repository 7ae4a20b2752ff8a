"""Checkpoints of a run: everything needed to continue it bit for bit, written atomically.

Invariant: a file named ``checkpoints/step_XXXXXXXX.pt`` is always complete: it is written
to a temporary name, fsynced, renamed, and the folder fsynced, so a crash or SIGKILL at
any moment leaves either the old set or the new one; a write that fails (disk full)
removes its temporary file and leaves the previous checkpoints as they were. Files hold
only tensors and plain containers and load with ``torch.load(weights_only=True)``;
scaling state (amax history and scale of every layer) travels inside each model's
state_dict.

Nothing damaged is used: every checkpoint carries the digest of its payload
(``run.digest``), checked on every read; a file whose digest does not match, that is not
a regular file (a FIFO would hang ``torch.load``), that cannot be read or whose name
and step disagree is refused like a truncated one, and an older intact checkpoint is
offered. Checkpoints of format_version 1 (before digests) still load, unverified.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import torch

from fp8lab.run import digest
from fp8lab.run.config import hash_of, upgrade

FORMAT_VERSION = 2  # 2: the payload carries its digest; 1 (no digest) is still read, unverified
READABLE_VERSIONS = (1, 2)
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
    """Write ``payload`` (with its digest added) as the checkpoint of ``step`` atomically; keep
    the newest ``keep``. Entries named like checkpoints or temporaries that are folders were
    not written by fp8lab and are left alone."""
    payload = digest.sealed(payload)
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
        _remove(old)
    for stale in folder.glob(".step_*.tmp-*"):  # left by a process killed mid-write
        if stale != tmp:
            _remove(stale)
    return final


def _remove(path: Path) -> None:
    """Unlink a file (or link, FIFO...) fp8lab named; a folder by that name is not fp8lab's."""
    try:
        if not stat.S_ISDIR(path.lstat().st_mode):
            path.unlink()
    except FileNotFoundError:
        pass


_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _not_regular(path: Path, mode: int) -> CheckpointError:
    kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
    link = f" (a symbolic link to {os.readlink(path)})" if path.is_symlink() else ""
    return CheckpointError(f"checkpoint {path} is {kind}{link}, not a regular file; fp8lab writes checkpoints as files")


def _open_regular(path: Path):
    """``path`` opened for reading if it is a regular file (after symlinks); anything else is
    refused before it is opened (a FIFO would block ``open``, ``/dev/zero`` never ends)."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never blocks, even if swapped for a FIFO since
    except FileNotFoundError:
        if path.is_symlink():
            raise CheckpointError(
                f"checkpoint {path} is a symbolic link to {os.readlink(path)}, which does not exist"
            ) from None
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except OSError as err:  # permission denied, a symlink loop, an I/O error
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({err.strerror or err}); check its permissions"
        ) from None
    f = os.fdopen(fd, "rb")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # replaced between stat and open
        f.close()
        raise _not_regular(path, mode)
    return f


def read_checkpoint(path: Path) -> dict:
    """Load and check one checkpoint file (CPU tensors): a regular file, a run checkpoint of a
    version this fp8lab reads, its digest matching its contents and its step its name's."""
    path = Path(path)
    with _open_regular(path) as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise CheckpointError(f"checkpoint {path} is empty (0 bytes): truncated or corrupt")
        try:
            payload = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated zip, bad pickle, unsafe global: all mean unusable
            raise CheckpointError(
                f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {str(err)[:200]})"
            ) from None
    if not isinstance(payload, dict) or any(k not in payload for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(payload, dict) or k not in payload]
        raise CheckpointError(f"checkpoint {path} is not an fp8lab run checkpoint (missing {missing})")
    version = payload["format_version"]
    # One flipped bit cannot turn 2 into 1 (0b10 -> 0b01 is two), so a damaged checkpoint of
    # today's format never passes for an unverified one of version 1.
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path} has format_version {version!r}, this fp8lab reads {READABLE_VERSIONS}"
        )
    if version >= 2:  # format_version 1 had no digest: such a checkpoint is used unverified
        _check_digest(path, payload)
    named = _NAME.match(path.name)
    if named and int(named.group(1)) != payload["step"]:
        raise CheckpointError(
            f"checkpoint {path} holds step {payload['step']!r}, not the step its name says; "
            "fp8lab never renames checkpoints"
        )
    return payload


def _check_digest(path: Path, payload: dict) -> None:
    stored = payload.get(digest.KEY)
    if not isinstance(stored, str):
        raise CheckpointError(f"checkpoint {path} has no digest (format_version 2 stores one): damaged")
    if digest.payload_digest(payload) != stored:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its contents do not match the digest stored with them "
            "(a bit changed on disk or in a copy)"
        )


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


def newest_usable(
    run_dir: Path, config_hash: str, config_dict: dict, validate=None, *, found=None, read=read_checkpoint
) -> tuple[Path, dict]:
    """The newest checkpoint of ``run_dir``, validated; errors offer an older intact one.

    Args:
        validate: optional ``validate(path, payload)`` raising CheckpointError when the
            payload does not fit the models it will be loaded into.
        found: the (step, path) candidates, oldest first (default: ``list_checkpoints``).
        read: ``read(path)``, one candidate's checked payload (default: ``read_checkpoint``).
    """
    found = list_checkpoints(run_dir) if found is None else found
    if not found:
        raise CheckpointError(f"run folder {run_dir} has no checkpoints in {FOLDER}/ to resume from")

    def usable(path: Path) -> dict:
        payload = read(path)
        check_config(path, payload, config_hash, config_dict)
        if validate is not None:
            validate(path, payload)
        return payload

    refused: list[tuple[Path, CheckpointError]] = []  # newest first
    for _, path in reversed(found):
        try:
            payload = usable(path)
        except CheckpointError as err:
            refused.append((path, err))
            continue
        if not refused:
            return path, payload
        names = " and ".join(p.name for p, _ in reversed(refused))
        also = "".join(f"; {err}" for _, err in refused[1:])
        raise CheckpointError(
            f"{refused[0][1]}{also}. An older intact checkpoint exists: {path} (move {names} away to resume from it)"
        )
    if len(refused) > 1:
        raise CheckpointError("; ".join(str(err) for _, err in refused) + ". No checkpoint of this run is usable")
    raise refused[0][1]
