"""A run folder holding both kinds of checkpoint: one sequence by step, pruned together.

Files only (no process group, no model): the names are what ``checkpoint_kinds`` lists and
prunes; what is inside them is tested in test_checkpoint.py and test_sharded_checkpoint.py.
"""

from __future__ import annotations

from pathlib import Path

from fp8lab.run import checkpoint_kinds


def _make(run_dir: Path, name: str) -> Path:
    path = run_dir / "checkpoints" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".dcp"):
        path.mkdir()
        (path / "manifest.json").write_text("{}")
    else:
        path.write_bytes(b"")
    return path


def test_both_kinds_are_one_sequence_by_step(tmp_path):
    for name in ("step_00000004.dcp", "step_00000002.pt", "step_00000006.pt", "step_00000008.dcp.tmp-12"):
        _make(tmp_path, name)
    _make(tmp_path, "step_00000003.pt").rename(tmp_path / "checkpoints" / "step_00000003.dcp")  # a file: not a .dcp
    listed = [(step, path.name) for step, path in checkpoint_kinds.list_all(tmp_path)]
    assert listed == [(2, "step_00000002.pt"), (4, "step_00000004.dcp"), (6, "step_00000006.pt")]


def test_keep_counts_both_kinds_and_a_step_is_held_by_one_kind(tmp_path):
    for name in ("step_00000002.pt", "step_00000004.dcp", "step_00000006.pt", "step_00000006.dcp"):
        saved = _make(tmp_path, name)  # the .dcp of step 6 saved last (a resume on 2 ranks)
    checkpoint_kinds.prune(tmp_path, saved, keep=2)
    assert [path.name for _, path in checkpoint_kinds.list_all(tmp_path)] == ["step_00000004.dcp", "step_00000006.dcp"]
