"""Integrity of a run's TensorBoard event files, checked before ``fp8lab report`` reads them.

Invariant: TensorBoard's loader stops at the first record that fails its CRC (or is cut
short) and silently drops the rest of the file; so ``check_event_file`` walks every
record of a file (TFRecord framing: length, masked CRC-32C of the length, data, masked
CRC-32C of the data) and ``EventFileDamage`` names the first damaged byte and the last
step read intact before it. A file that is cut short at its end is damage only when no
process is writing the run (a live writer may be in the middle of a record), and so is an
empty file. ``expected_last_step`` is the step the events must reach, from summary.json or
the newest checkpoint, for damage that leaves no broken record (a file cut at a record
boundary, a file removed). Reads only; pure Python CRCs cost about 8 ms per MB.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

HEADER = 12  # uint64 length + uint32 masked CRC of the length
FOOTER = 4  # uint32 masked CRC of the data


@dataclass(frozen=True)
class EventFileDamage:
    """The first damage in one event file."""

    path: Path
    offset: int  # the byte where the first unreadable record starts
    size: int
    what: str
    last_step: int | None  # the highest step of the records before it (None: none intact)

    def __str__(self) -> str:
        lost = (
            "none of its events can be read"
            if self.last_step is None
            else f"TensorBoard reads its events up to step {self.last_step} and silently drops the rest"
        )
        return (
            f"event file {self.path} is damaged at byte {self.offset} of {self.size} ({self.what}): {lost}; "
            "restore it from a copy (the run's checkpoints are not affected)"
        )


def check_event_file(path: Path, *, live: bool = False) -> EventFileDamage | None:
    """The first damage in the event file ``path``, or None when every record is intact.

    Args:
        live: a process is writing the run; a record cut short at the end (or an empty
            file) is then one being written, not damage.
    """
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        return EventFileDamage(path, 0, 0, "not a regular file: TensorBoard skips it", None)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return None if live else EventFileDamage(path, 0, 0, "empty: every event file starts with a record", None)
        offset, last_step = 0, None

        def damage(what: str) -> EventFileDamage:
            return EventFileDamage(path, offset, size, what, last_step)

        while offset < size:
            header = f.read(HEADER)
            if len(header) < HEADER:
                return None if live else damage(f"{size - offset} bytes after the last record, too few for one")
            (length,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
                return damage("a record's length fails its CRC")
            if offset + HEADER + length + FOOTER > size:
                return None if live else damage(f"a record of {length} bytes runs past the end of the file")
            data, footer = f.read(length), f.read(FOOTER)
            if struct.unpack("<I", footer)[0] != masked_crc32c(data):
                return damage("a record's data fails its CRC")
            try:
                step = Event.FromString(data).step
            except Exception:  # a CRC-valid record that is no Event: written by something else
                return damage("a record that is not a TensorBoard event")
            last_step = step if last_step is None else max(last_step, step)
            offset += HEADER + length + FOOTER
    return None


def expected_last_step(run_dir: Path) -> tuple[int, str] | None:
    """(the last log step the events must hold, where that comes from), or None if unknown.

    A finished run logged its final step (summary.json's ``steps``); an unfinished one
    flushed its events before each checkpoint, so they hold the last log step at or before
    its newest checkpoint (``train.log_interval`` from config.json).
    """
    from fp8lab.run.checkpoint_kinds import list_all

    try:
        steps = json.loads((run_dir / "summary.json").read_text())["steps"]
        if type(steps) is int and steps > 0:
            return steps, "summary.json"
    except (OSError, ValueError, KeyError, TypeError):
        pass  # a damaged summary.json is reported by itself
    found = list_all(run_dir)
    try:
        interval = json.loads((run_dir / "config.json").read_text())["train"]["log_interval"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not found or type(interval) is not int or interval < 1:
        return None
    step, path = found[-1]
    logged = step // interval * interval
    return (logged, f"its newest checkpoint {path.name}") if logged else None
