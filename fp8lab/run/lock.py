"""One writer per run folder: an exclusive, non-blocking ``flock`` on the folder itself.

Invariant: while a process trains into a run folder it holds the lock; a second
process that would write there (a concurrent ``--resume``) gets ``RunFolderBusy``
naming the holder's PID and writes nothing. The lock is taken on the folder's own file
descriptor, so it creates no file, and the kernel drops it when the holder dies (a
SIGKILLed run never leaves a stale lock). The holder's PID is read from /proc/locks.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder; the message names its PID."""


def holder_pid(path: Path) -> int | None:
    """The PID holding a flock on ``path``, from /proc/locks (None when unknown)."""
    try:
        st = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    # "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234567 0 EOF" (device in hex major:minor)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == dev and parts[4].isdigit():
            return int(parts[4])
    return None


class RunLock:
    """The exclusive lock on one run folder.

    Args:
        run_dir: an existing run folder.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise ``RunFolderBusy``; where the file system has no flock
        (some network file systems) the run goes on unlocked."""
        fd = os.open(self.run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunFolderBusy(busy_message(self.run_dir)) from None
            return self  # no locking here: nothing to hold
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def busy_message(run_dir: Path) -> str:
    pid = holder_pid(run_dir)
    who = f"process {pid}" if pid is not None else "another process"
    stop = f" or stop it with `kill -TERM {pid}` (it checkpoints first)" if pid is not None else ""
    return (
        f"run folder {run_dir} is in use by {who}, which is writing into it; wait for it to finish{stop}, then resume"
    )


def check_not_busy(run_dir: Path) -> None:
    """Raise ``RunFolderBusy`` if another process holds ``run_dir`` (takes and drops the lock)."""
    RunLock(run_dir).acquire().release()
