"""Nothing damaged is trusted, signals are handled until exit, resuming is idempotent (issue 22,
rules 1 and 6).

One table: each case damages or prepares a copy of one finished quickstart run (6 tiny
steps, a checkpoint every step, the last 3 kept), runs one command, and states the exit
code, a regex the message must match, and what must hold on disk afterwards: by default
that the command wrote nothing (the run folder's names, sizes and mtimes are as before)
and that every checkpoint the case did not damage still reads intact (its digest checked).
Signal cases run the CLI in a subprocess and send a real signal when it prints a given
line; a wrapper holds the process for 0.5 s at that point, so the signal lands in the
moment named, not somewhere near it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fp8lab.run import checkpoint as ckpt
from fp8lab.run.cli import main
from fp8lab.run.digest import sealed
from tests.helpers import QUICKSTART, ROOT, TINY_MODEL

SETS = [*TINY_MODEL, "train.steps=6", "train.log_interval=1", "train.eval_interval=2"]
SETS += ["train.checkpoint_interval=1", "train.keep_checkpoints=3"]
ARGS = [a for s in SETS for a in ("--set", s)]


def ckpt_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}.pt"


def run_argv(run_dir: Path, *extra: str) -> list[str]:
    return ["run", QUICKSTART, "--out", str(run_dir.parent / "unused"), "--quiet", *ARGS, *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 6-step run (checkpoints 4, 5, 6) and its summary."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("logs")
    assert main(["run", QUICKSTART, "--out", str(out), "--quiet", *ARGS]) == 0
    torch.set_num_threads(threads)
    (run_dir,) = (out / "quickstart").iterdir()
    return run_dir


# --- ways to damage a file ------------------------------------------------------------


def flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def entry_data(path: Path, name: str) -> tuple[int, int]:
    """(offset, size) of a zip entry's stored bytes (torch stores entries uncompressed)."""
    info = zipfile.ZipFile(path).getinfo(name)
    raw = path.read_bytes()
    n, extra = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + n + extra, info.compress_size


def flip_tensor_bit(path: Path) -> None:
    offset, size = entry_data(path, "archive/data/0")
    flip(path, offset + size // 2, 3)


def flip_in(path: Path, needle: bytes, at: int = 0, bit: int = 0) -> None:
    flip(path, path.read_bytes().index(needle) + at, bit)


def rewrite(path: Path, change: Callable[[dict], dict]) -> None:
    torch.save(change(torch.load(path, weights_only=True)), path)


def records(path: Path) -> list[int]:
    """Byte offsets where each TFRecord of an event file starts."""
    raw, offsets, pos = path.read_bytes(), [], 0
    while pos < len(raw):
        offsets.append(pos)
        pos += 16 + struct.unpack("<Q", raw[pos : pos + 8])[0]
    return offsets


def main_events(run_dir: Path, variant: str = "fp8") -> Path:
    """The variant's first (largest) event file: the one with every training step."""
    return sorted((run_dir / variant).glob("events.out.tfevents.*"))[0]


# --- cases -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    prepare: Callable[[Path], None]  # damages the copy of the finished run
    command: str  # "resume" or "report"
    code: int
    message: str  # a regex the stderr must match
    damaged: tuple[int, ...] = ()  # checkpoint steps the case damaged (the others must read intact)
    writes: bool = False  # the command may write into the run folder (checked by ``after``)
    after: Callable[[Path, Path], None] | None = None  # (run_dir, finished) -> checks


OLDER_5 = r"An older intact checkpoint exists: \S+step_00000005\.pt \(move step_00000006\.pt away"
CORRUPT = r"step_00000006\.pt is (truncated or )?corrupt"
DIGEST = r"step_00000006\.pt is corrupt: its contents do not match the digest stored with them"


def _newest(make: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda run_dir: make(ckpt_path(run_dir, 6))


def _replace(make: Callable[[Path], None]) -> Callable[[Path], None]:
    def prepare(run_dir: Path) -> None:
        path = ckpt_path(run_dir, 6)
        path.unlink()
        make(path)

    return prepare


def _socket(path: Path) -> None:
    cwd = os.getcwd()  # a socket's path is limited to 108 bytes: bind by the short name
    os.chdir(path.parent)
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path.name)
        sock.close()
    finally:
        os.chdir(cwd)


def _renamed_later(run_dir: Path) -> None:
    shutil.copy(ckpt_path(run_dir, 6), ckpt_path(run_dir, 7))


def _other_config(path: Path) -> None:
    def change(p: dict) -> dict:
        p["config"]["train"]["seed"] += 1
        return sealed({**p, "config_hash": "0123456789ab"})

    rewrite(path, change)


def _no_digest(path: Path) -> None:
    rewrite(path, lambda p: {k: v for k, v in p.items() if k != "digest"})


def _flip_newest_two(run_dir: Path) -> None:
    flip_tensor_bit(ckpt_path(run_dir, 6))
    flip_tensor_bit(ckpt_path(run_dir, 5))


def _flip_all(run_dir: Path) -> None:
    for step in (4, 5, 6):
        flip_tensor_bit(ckpt_path(run_dir, step))


def _truncate_events_at_boundary(run_dir: Path) -> None:
    path = main_events(run_dir)
    offsets = records(path)
    path.write_bytes(path.read_bytes()[: offsets[len(offsets) // 2]])


def _unfinished_events_cut(run_dir: Path) -> None:
    (run_dir / "summary.json").unlink()
    _truncate_events_at_boundary(run_dir)


def _flip_events_mid(run_dir: Path) -> None:
    path = main_events(run_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte, as the issue has it
    path.write_bytes(bytes(data))


def _events_to_folder(run_dir: Path) -> None:
    path = main_events(run_dir)
    path.unlink()
    path.mkdir()


def _stale_folders(run_dir: Path) -> None:
    """An unfinished run (newest checkpoint 5) whose checkpoints folder holds a folder named like
    an old checkpoint and one named like a stale temporary: the resume's pruning must leave them."""
    ckpt_path(run_dir, 6).unlink()
    (run_dir / "summary.json").unlink()
    (run_dir / "checkpoints" / "step_00000001.pt").mkdir()
    (run_dir / "checkpoints" / ".step_00000003.pt.tmp-1").mkdir()


def _stale_folders_after(run_dir: Path, finished: Path) -> None:
    assert (run_dir / "checkpoints" / "step_00000001.pt").is_dir()
    assert (run_dir / "checkpoints" / ".step_00000003.pt.tmp-1").is_dir()
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [1, 4, 5, 6]  # the newest 3 kept, the folder left
    _same_final_numbers(run_dir, finished)


def _same_final_numbers(run_dir: Path, finished: Path) -> None:
    got, want = (json.loads((d / "summary.json").read_text()) for d in (run_dir, finished))
    for name in want["variants"]:  # on CPU a resumed run equals the uninterrupted one bit for bit
        assert got["variants"][name]["final_val_loss"] == want["variants"][name]["final_val_loss"], name


def _summary_rewritten(run_dir: Path, finished: Path) -> None:
    assert (run_dir / "summary.json").read_text() == (finished / "summary.json").read_text()
    assert _tree(run_dir, contents=False, skip="summary.json") == _tree(finished, contents=False, skip="summary.json")


CASES: dict[str, Case] = {
    # --- rule 1 (a): bits flipped inside a checkpoint ---
    "ckpt_bit_in_tensor_data": Case(_newest(flip_tensor_bit), "resume", 2, f"{DIGEST}.*{OLDER_5}", (6,)),
    "ckpt_bit_in_pickled_string": Case(
        _newest(lambda p: flip_in(p, b"quickstart", 3)), "resume", 2, f"{DIGEST}.*{OLDER_5}", (6,)
    ),
    "ckpt_bit_in_stored_digest": Case(
        _newest(lambda p: flip_in(p, b"sha256:", 12)), "resume", 2, f"{DIGEST}.*{OLDER_5}", (6,)
    ),
    "ckpt_bit_in_pickle_opcode": Case(
        _newest(lambda p: flip(p, entry_data(p, "archive/data.pkl")[0], 7)), "resume", 2, f"{CORRUPT}.*{OLDER_5}", (6,)
    ),
    "ckpt_bit_in_zip_local_header": Case(_newest(lambda p: flip(p, 1)), "resume", 2, f"{CORRUPT}.*{OLDER_5}", (6,)),
    "ckpt_bit_in_zip_central_directory": Case(
        _newest(lambda p: flip_in(p, b"PK\x01\x02archive/data.pkl"[:4], 50)), "resume", 2, f"{CORRUPT}.*{OLDER_5}", (6,)
    ),
    "ckpt_format_version_3": Case(
        _newest(lambda p: rewrite(p, lambda d: {**d, "format_version": 3})),
        "resume",
        2,
        r"step_00000006\.pt has format_version 3, this fp8lab reads \(1, 2\)",
        (6,),
    ),
    "ckpt_digest_removed": Case(_newest(_no_digest), "resume", 2, r"step_00000006\.pt has no digest", (6,)),
    # --- cut short ---
    "ckpt_zero_length": Case(
        _newest(lambda p: p.write_bytes(b"")), "resume", 2, rf"step_00000006\.pt is empty \(0 bytes\).*{OLDER_5}", (6,)
    ),
    "ckpt_truncated_to_half": Case(
        _newest(lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
        "resume",
        2,
        f"{CORRUPT}.*{OLDER_5}",
        (6,),
    ),
    # --- rule 1 (b): not a regular file (torch.load would hang on a FIFO, never end on /dev/zero) ---
    "ckpt_is_a_fifo": Case(
        _replace(os.mkfifo), "resume", 2, rf"is a FIFO \(named pipe\), not a regular file.*{OLDER_5}"
    ),
    "ckpt_is_a_folder": Case(_replace(Path.mkdir), "resume", 2, rf"step_00000006\.pt is a folder.*{OLDER_5}"),
    "ckpt_is_a_socket": Case(_replace(_socket), "resume", 2, rf"is a socket, not a regular file.*{OLDER_5}"),
    "ckpt_symlink_to_dev_zero": Case(
        _replace(lambda p: p.symlink_to("/dev/zero")),
        "resume",
        2,
        rf"is a character device \(a symbolic link to /dev/zero\).*{OLDER_5}",
    ),
    "ckpt_symlink_to_folder": Case(
        _replace(lambda p: p.symlink_to(p.parent)), "resume", 2, rf"is a folder \(a symbolic link to .*{OLDER_5}"
    ),
    "ckpt_dangling_symlink": Case(
        _replace(lambda p: p.symlink_to(p.parent / "gone.pt")),
        "resume",
        2,
        rf"gone\.pt, which does not exist.*{OLDER_5}",
    ),
    "ckpt_symlink_loop": Case(
        _replace(lambda p: p.symlink_to(p.name)),
        "resume",
        2,
        rf"cannot be read \(Too many levels of symbolic links.*{OLDER_5}",
    ),
    # --- intact files that do not belong ---
    "ckpt_copied_under_a_later_step": Case(
        _renamed_later,
        "resume",
        2,
        r"step_00000007\.pt holds step 6, not the step its name says.*An older intact checkpoint exists: "
        r"\S+step_00000006\.pt \(move step_00000007\.pt away",
    ),
    "ckpt_of_another_config": Case(
        _newest(_other_config),
        "resume",
        2,
        rf"was written for another config: train\.seed: checkpoint 1338, now 1337.*{OLDER_5}",
        (6,),
    ),
    # --- several damaged ---
    "ckpt_two_newest_damaged": Case(
        _flip_newest_two,
        "resume",
        2,
        r"step_00000006\.pt is corrupt.*; checkpoint \S+step_00000005\.pt is corrupt.*An older intact checkpoint "
        r"exists: \S+step_00000004\.pt \(move step_00000005\.pt and step_00000006\.pt away",
        (5, 6),
    ),
    "ckpt_all_damaged": Case(
        _flip_all, "resume", 2, r"step_00000004\.pt is corrupt.*No checkpoint of this run is usable", (4, 5, 6)
    ),
    # --- folders where fp8lab prunes: left alone, the resume finishes ---
    "folders_named_like_old_checkpoint_and_temporary": Case(
        _stale_folders, "resume", 0, r"^$", writes=True, after=_stale_folders_after
    ),
    # --- rule 6: resuming a finished run twice changes nothing; a damaged summary is rewritten ---
    "resume_finished_run_writes_nothing": Case(lambda d: None, "resume", 0, r"^$"),
    "resume_finished_run_with_damaged_summary": Case(
        lambda d: (d / "summary.json").write_text('{"recipe": '),
        "resume",
        0,
        r"^$",
        writes=True,
        after=_summary_rewritten,
    ),
    # --- rule 1 (c): event files and summary.json for fp8lab report ---
    "events_byte_flipped_mid_file": Case(
        _flip_events_mid,
        "report",
        2,
        r"event file \S+/fp8/events\.out\.tfevents\.\S+ is damaged at byte \d+ of \d+ \(a record's data fails its "
        r"CRC\): TensorBoard reads its events up to step [1-5] and silently drops the rest",
    ),
    "events_length_field_flipped": Case(
        lambda d: flip(main_events(d), 0, 5),
        "report",
        2,
        r"damaged at byte 0 of \d+ \(a record's length fails its CRC\): none",
    ),
    "events_truncated_to_zero": Case(
        lambda d: main_events(d).write_bytes(b""), "report", 2, r"fp8/events\S+ is damaged at byte 0 of 0 \(empty"
    ),
    "events_truncated_mid_record": Case(
        lambda d: main_events(d).write_bytes(main_events(d).read_bytes()[: records(main_events(d))[20] + 30]),
        "report",
        2,
        r"damaged at byte \d+ of \d+ \(a record of \d+ bytes runs past the end of the file\)",
    ),
    "events_truncated_at_record_boundary": Case(
        _truncate_events_at_boundary,
        "report",
        2,
        r"event files in \S+/fp8 end at step [1-5] but the run reached step 6 \(summary\.json\): events were lost",
    ),
    "events_cut_in_unfinished_run": Case(
        _unfinished_events_cut,
        "report",
        2,
        r"end at step [1-5] but the run reached step 6 \(its newest checkpoint step_00000006\.pt\)",
    ),
    "events_garbage_appended": Case(
        lambda d: main_events(d, "bf16").open("ab").write(b"garbage!" * 64),
        "report",
        2,
        r"bf16/events\S+ is damaged at byte \d+ of \d+ \(a record's length fails its CRC\): TensorBoard reads its "
        r"events up to step 6",
    ),
    "events_few_bytes_appended": Case(
        lambda d: main_events(d).open("ab").write(b"\0\0\0"), "report", 2, r"\(3 bytes after the last record, too few"
    ),
    "events_file_is_a_folder": Case(
        _events_to_folder, "report", 2, r"fp8/events\S+ is damaged at byte 0 of 0 \(not a regular file"
    ),
    "events_main_file_removed": Case(
        lambda d: main_events(d).unlink(),
        "report",
        2,
        r"fp8 hold no train loss but the run reached step 6 \(summary\.json\)",
    ),
    "summary_not_json": Case(
        lambda d: (d / "summary.json").write_text("{not json"),
        "report",
        2,
        r"summary\.json is damaged \(JSONDecodeError",
    ),
    "summary_is_a_folder": Case(
        lambda d: ((d / "summary.json").unlink(), (d / "summary.json").mkdir()),
        "report",
        2,
        r"summary\.json is not a file",
    ),
    "summary_missing_report_still_reads": Case(lambda d: (d / "summary.json").unlink(), "report", 0, r"^$"),
}


def _tree(path: Path, contents: bool = True, skip: str = "") -> list:
    """Every entry under ``path``: name, kind, size, mtime (and a content hash of files)."""
    rows = []
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if rel == skip:
            continue
        st = p.lstat()
        row = [rel, st.st_mode >> 12, st.st_size if p.is_file() else 0]
        if contents:
            row.append(st.st_mtime_ns)
            if p.is_file() and not p.is_symlink():
                row.append(hashlib.sha256(p.read_bytes()).hexdigest())
        rows.append(tuple(row))
    return rows


def test_the_table_holds_every_listed_case_and_20_more():
    listed = {"ckpt_bit_in_tensor_data", "ckpt_is_a_fifo", "events_byte_flipped_mid_file"}
    assert listed <= set(CASES) and len(CASES) + len(SIGNAL_CASES) >= len(listed) + 2 + 20


def _alarm(signum, frame):
    raise TimeoutError("the command hung (a FIFO opened for reading?)")


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_case(name, finished, tmp_path, capsys, one_thread):
    case = CASES[name]
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir, symlinks=True)
    case.prepare(run_dir)
    before = _tree(run_dir)
    argv = run_argv(run_dir, "--resume", str(run_dir)) if case.command == "resume" else ["report", str(run_dir)]
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)  # a regression that hangs fails instead of stopping the suite
    try:
        code = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err.strip()
    assert code == case.code, err
    assert re.search(case.message, err, re.S), err
    if not case.writes:
        assert _tree(run_dir) == before, "the command wrote into the run folder"
    for step, path in ckpt.list_checkpoints(run_dir):
        if step not in case.damaged and path.is_file() and not path.is_symlink() and step != 7:
            ckpt.read_checkpoint(path)  # nothing saved was lost: every undamaged checkpoint reads intact
    if case.after is not None:
        case.after(run_dir, finished)


def test_the_offered_older_checkpoint_resumes_to_the_same_result(finished, tmp_path, capsys, one_thread):
    """Following the message of a flipped bit (move the damaged file away) finishes the run
    exactly as the uninterrupted one did."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "summary.json").unlink()
    flip_tensor_bit(ckpt_path(run_dir, 6))
    assert main(run_argv(run_dir, "--resume", str(run_dir))) == 2
    ckpt_path(run_dir, 6).rename(tmp_path / "damaged.pt")  # what the message says to do
    assert main(run_argv(run_dir, "--resume", str(run_dir))) == 0
    _same_final_numbers(run_dir, finished)


# --- signals: a real signal at a named moment, in a subprocess ----------------------------

# Runs the CLI as its own process (argv from sys.argv); holds 0.5 s after printing MARK at
# the moment named by argv[1], so the test's signal lands there.
WRAPPER = """
import sys, time
from fp8lab.run import cli, progress
moment = sys.argv.pop(1)
sys.argv[0] = "fp8lab"

def hold():
    print("MARK", file=sys.stderr, flush=True)
    time.sleep(0.5)

if moment == "after_final_line":
    finish = progress.Progress.finish
    def finish_and_hold(self, *a, **k):
        finish(self, *a, **k)
        hold()
    progress.Progress.finish = finish_and_hold
if moment == "mid_training":
    update = progress.Progress.update
    def update_and_hold(self, step, metrics):
        update(self, step, metrics)
        if step == 3:
            hold()
    progress.Progress.update = update_and_hold
code = cli.main()
if moment == "process_exit":
    hold()
sys.exit(code)
"""


@dataclass(frozen=True)
class SignalCase:
    moment: str  # after_final_line, process_exit (main returned), mid_training
    signum: int
    code: int
    message: str


SIGNAL_CASES: dict[str, SignalCase] = {
    "sigterm_right_after_final_line": SignalCase(
        "after_final_line",
        signal.SIGTERM,
        143,
        r"SIGTERM received at the end of the run: the final checkpoint and summary\.json were completed first; "
        r"the run is finished",
    ),
    "sigterm_while_the_process_exits": SignalCase("process_exit", signal.SIGTERM, 0, r"tensorboard --logdir"),
    "sigterm_mid_training": SignalCase(
        "mid_training", signal.SIGTERM, 143, r"SIGTERM received: finished step 3, wrote \S+step_00000003\.pt"
    ),
    "sighup_mid_training": SignalCase(
        "mid_training", signal.SIGHUP, 129, r"SIGHUP received: finished step 3, wrote \S+step_00000003\.pt"
    ),
}


def _start(case: SignalCase, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", WRAPPER, case.moment, "run", QUICKSTART, "--out", str(out), *ARGS]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)


def _signal_at_mark(proc: subprocess.Popen, signum: int) -> tuple[int, str]:
    """Send ``signum`` when the process prints MARK; (exit code, stderr)."""
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.strip() == "MARK":
                proc.send_signal(signum)
                break
        lines += proc.stderr.read().splitlines(keepends=True)
        return proc.wait(timeout=120), "".join(lines)
    finally:
        proc.kill()


def test_signals_at_named_moments(finished, tmp_path, one_thread):
    """Every SIGNAL_CASES row, the processes started together (each is mostly imports)."""
    from concurrent.futures import ThreadPoolExecutor

    procs = {name: _start(case, tmp_path / name) for name, case in SIGNAL_CASES.items()}
    with ThreadPoolExecutor(len(procs)) as pool:  # each process is watched for its MARK as it prints it
        futures = {name: pool.submit(_signal_at_mark, proc, SIGNAL_CASES[name].signum) for name, proc in procs.items()}
    outcomes = {name: future.result() for name, future in futures.items()}
    for name, case in SIGNAL_CASES.items():
        code, err = outcomes[name]
        assert code == case.code, (name, err)  # never -15: no moment leaves the default action in place
        assert re.search(case.message, err), (name, err)
        assert "Traceback" not in err, (name, err)
        (run_dir,) = (tmp_path / name / "quickstart").iterdir()
        assert not list(run_dir.rglob("*.tmp*")), name
        for _, path in ckpt.list_checkpoints(run_dir):
            ckpt.read_checkpoint(path)
        if case.moment != "mid_training":
            assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6, name
        else:
            assert not (run_dir / "summary.json").exists(), name
    # rule 6: resuming an interrupted run twice in a row: the second resume changes no file,
    # and the final numbers are the uninterrupted run's
    (run_dir,) = (tmp_path / "sigterm_mid_training" / "quickstart").iterdir()
    assert main(run_argv(run_dir, "--resume", str(run_dir))) == 0
    once = _tree(run_dir)
    assert main(run_argv(run_dir, "--resume", str(run_dir))) == 0
    assert _tree(run_dir) == once
    _same_final_numbers(run_dir, finished)


def test_progress_to_a_closed_stderr_does_not_stop_training():
    """``fp8lab run ... 2>&1 | head -1``: the pipe's reader is gone; before, the next progress
    line raised BrokenPipeError mid-run (a traceback, no checkpoint)."""
    from fp8lab.run.progress import Progress

    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    progress = Progress(6, stream=Closed())
    progress.update(1, {"fp8": {"loss/train": 5.0}})  # raised before
    progress.stopped("SIGTERM", 1, "step_00000001.pt", "run")
    assert not progress.enabled


def test_a_record_being_written_is_damage_only_when_no_process_writes_the_run(finished, tmp_path):
    from fp8lab.run.event_files import check_event_file

    path = tmp_path / "events.out.tfevents.1.host.1.0"
    data = main_events(finished).read_bytes()
    path.write_bytes(data[: records(main_events(finished))[-1] + 30])  # the last record half-written
    assert check_event_file(path, live=True) is None
    assert "runs past the end of the file" in str(check_event_file(path, live=False))
    path.write_bytes(b"")
    assert check_event_file(path, live=True) is None  # created, not flushed yet
