"""Folder paths a user names (the CLI's ``--out``, ``Monitor``'s ``log_dir``), checked before
anything is created.

Invariant: ``folder_problem`` only looks (stat, lstat, readlink, pathconf); it returns why
a folder at that path could not be created or written into, in words a user can act on,
or None. It walks the path as the kernel will: from the working folder, component by
component, ``..`` after the symlink it follows (never normalized away first).
"""

from __future__ import annotations

import errno
import os
import stat

NAME_MAX = 255  # bytes per file name, when the file system does not say (ext4, xfs, tmpfs)
PATH_MAX = 4096
# What a run adds below the folder: <recipe>/<run_id>/checkpoints/.step_XXXXXXXX.pt.tmp-PID
RESERVED = 128


def shown(text: str) -> str:
    """``text`` as a message can print it: bytes that are not UTF-8 as ``\\xff``."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def _name_max(folder: str) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return NAME_MAX


def folder_problem(path) -> str | None:
    """Why a folder at ``path`` (str or os.PathLike) could not be created and written, or None."""
    text = os.fsdecode(os.fspath(path))
    if text == "":
        return "the path is empty; name a folder, e.g. logs"
    if "\0" in text:
        return "the path contains a NUL byte"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return (
            f"'{shown(text)}' is not valid UTF-8; TensorBoard's event writer and the run's JSON files need "
            "UTF-8 file names: choose a folder whose name is UTF-8"
        )
    full = os.path.join(os.getcwd(), text)  # not normalized: the kernel resolves ".." after symlinks
    if len(os.fsencode(full)) + RESERVED > PATH_MAX:
        n = len(os.fsencode(full))
        return f"the path is {n} bytes long; with the names a run adds below it, it passes PATH_MAX ({PATH_MAX})"
    parts = full.split(os.sep)
    prefix, missing = os.sep, None
    for part in parts[1:]:
        if part in ("", "."):
            continue
        if part == ".." and missing is not None:
            return f"the path goes up ('..') out of {shown(missing)}, which does not exist"
        limit = _name_max(prefix if missing is None else os.sep)
        if len(os.fsencode(part)) > limit:
            return (
                f"the name {shown(part[:24])}... is {len(os.fsencode(part))} bytes long; this file system "
                f"allows {limit} bytes per name (NAME_MAX)"
            )
        prefix = os.path.join(prefix, part)
        if missing is not None:
            continue
        try:
            st = os.stat(prefix)
        except FileNotFoundError:
            if os.path.islink(prefix):
                return (
                    f"{shown(prefix)} is a symbolic link to {shown(os.readlink(prefix))}, which does not exist; "
                    "create its target or choose another folder"
                )
            missing = prefix  # this one and the rest will be created
            continue
        except OSError as err:
            if err.errno == errno.ELOOP:
                return f"{shown(prefix)} is a symbolic link loop ({os.strerror(err.errno)}); choose another folder"
            if err.errno == errno.ENOTDIR:
                return f"{shown(os.path.dirname(prefix))} is a file, not a folder"
            return f"{shown(prefix)}: {os.strerror(err.errno)}"
        if not stat.S_ISDIR(st.st_mode):
            kind = "a file" if stat.S_ISREG(st.st_mode) else "a device, pipe or socket"
            return f"{shown(prefix)} is {kind}, not a folder; choose another folder"
    return None
