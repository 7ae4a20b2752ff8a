"""What a run needs from the machine, checked before anything is allocated or written.

Invariant: ``preflight`` only reads (stat, access, /proc, free memory); when it returns,
the output folder (or the resumed run folder) can be written, no other process holds
the resumed folder, the model's memory estimate fits the device and the file system has
room for a checkpoint. Each failure names the folder or resource and what to do.
"""

from __future__ import annotations

from pathlib import Path

from fp8lab.run import checkpoint_size, memory, storage
from fp8lab.run.checkpoint import CheckpointError, checkpoint_dir
from fp8lab.run.lock import check_not_busy


def preflight(
    config, device, *, world_size: int, is_main: bool, out_root: Path, resume: Path | None, run_dir: Path | None
) -> None:
    """Raise CheckpointError, RunFolderBusy, StorageError or ResourceError, or return.

    Args:
        is_main: this process writes the run's files (rank 0); other ranks check memory only.
        out_root: ``--out``; a fresh run goes to ``out_root/<name>/<run_id>``.
        resume: the run folder to continue, if any.
        run_dir: the fresh run folder the ``--nproc`` launcher named, if any.
    """
    if resume is not None:
        if not (resume / "config.json").is_file():
            raise CheckpointError(f"--resume {resume}: not a run folder (no config.json)")
        target, what = resume, f"--resume {resume}"
    else:
        target, what = (run_dir if run_dir is not None else out_root / config.name), f"--out {out_root}"
    if is_main:  # the only writer
        if resume is not None:
            check_not_busy(resume)
            storage.check_writable(checkpoint_dir(resume), what)
        else:
            storage.check_writable(target, what)
    memory.check_fits(config, device, world_size)
    if is_main:
        storage.check_free_space(target, checkpoint_size.checkpoint_bytes(config, device), what)
