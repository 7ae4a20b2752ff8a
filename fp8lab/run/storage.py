"""Where a run writes: checks made before anything is created, the run folder claimed
atomically, small files replaced atomically, and write faults named.

Invariant: ``check_writable`` and ``check_free_space`` only look (stat, access,
statvfs); they create nothing. A write that fails for a reason of the machine (disk
full, quota, read-only file system, permissions) becomes a ``StorageError`` naming the
path, the cause and what to do; any other OSError is left alone (a bug shows its
traceback).
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

from fp8lab.paths import folder_problem, shown

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


class StorageError(OSError):
    """A run folder cannot be written; the message names the path and what to do.

    Attributes:
        run_dir: the run folder concerned, when one exists (the CLI then prints the
            command that resumes it).
    """

    def __init__(self, message: str, run_dir: Path | None = None):
        super().__init__(message)
        self.run_dir = run_dir

    def __str__(self) -> str:
        return self.args[0]


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return f"uid {os.geteuid()}"


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the folder a mkdir would write in)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, what: str) -> None:
    """Refuse a folder fp8lab could not create or write, before anything is created.

    Args:
        path: the folder that will be created (or written into, if it exists).
        what: how the user named it, e.g. ``"--out logs"``.
    Raises:
        StorageError: the path is one no folder can have (see ``fp8lab.paths``), a path
            component is a file, or the nearest existing folder is not writable by this user.
    """
    problem = folder_problem(path)
    if problem is not None:
        raise StorageError(f"{what}: {problem}")
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise StorageError(f"{what}: {existing} is a file, not a folder; choose another --out folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        verb = "write in" if existing == Path(os.path.abspath(path)) else "create folders in"
        raise StorageError(
            f"{what}: no permission to {verb} {existing} (running as {_user()}); "
            "choose a folder you can write, or change its permissions"
        )


def check_out(out, what: str | None = None) -> None:
    """Refuse an ``--out`` (as the user typed it) no run folder can be created under."""
    problem = folder_problem(out)
    if problem is not None:
        what = what if what is not None else f"--out '{shown(os.fsdecode(os.fspath(out)))}'"
        raise StorageError(f"{what}: {problem}")


def check_free_space(path: Path, needed: int, what: str) -> None:
    """Refuse a run whose file system cannot hold even one checkpoint (``needed`` bytes)."""
    free = shutil.disk_usage(nearest_existing(path)).free
    if free < needed:
        raise StorageError(
            f"{what}: a checkpoint of this run takes about {needed / 2**20:.1f} MiB but only "
            f"{free / 2**20:.1f} MiB are free on {nearest_existing(path)}; free some space "
            "or choose another --out folder"
        )


def is_storage_fault(err: BaseException) -> bool:
    """An OSError caused by the machine (disk full, quota, read-only, permissions)."""
    return isinstance(err, OSError) and not isinstance(err, StorageError) and err.errno in FULL + DENIED


def storage_error(err: OSError, run_dir: Path, last_checkpoint: Path | None) -> StorageError:
    """The message for a write that failed under ``run_dir``."""
    where = f" ({err.filename})" if err.filename else ""
    if err.errno in FULL:
        cause = f"the disk is full{where}: {os.strerror(err.errno)}"
        todo = "free some space"
    else:
        cause = f"no permission to write{where}: {os.strerror(err.errno)}"
        todo = "make the run folder writable"
    if last_checkpoint is None:
        return StorageError(
            f"cannot write the run folder {run_dir}: {cause}. No checkpoint was written yet; "
            f"{todo}, then start the run again (remove {run_dir} first)"
        )
    return StorageError(
        f"cannot write the run folder {run_dir}: {cause}. Partial files were removed and the "
        f"newest intact checkpoint is {last_checkpoint}; {todo}, then resume",
        run_dir=run_dir,
    )


def new_run_dir(out_root: Path, name: str, config_hash: str) -> Path:
    """A name for a fresh run folder, ``out_root/<name>/<time>-<hash>``, that does not exist yet."""
    base = Path(out_root) / name / f"{time.strftime('%Y%m%d-%H%M%S')}-{config_hash[:6]}"
    run_dir, n = base, 1
    while run_dir.exists():
        run_dir, n = Path(f"{base}-{n}"), n + 1
    return run_dir


def claim_run_dir(out_root: Path, name: str, config_hash: str) -> Path:
    """Create a fresh run folder atomically: two runs started in the same second never share one."""
    while True:
        run_dir = new_run_dir(out_root, name, config_hash)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue


def write_atomic(path: Path, text: str | bytes) -> None:
    """``path`` holds ``text`` (or bytes) or its previous content, never a part (temporary removed on failure)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(text) if isinstance(text, bytes) else tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
