"""A checkpoint written by an earlier fp8lab still resumes, and the run ends where it did.

The fixture ``fixtures/quickstart_v1`` was written by fp8lab at commit 5e0f1fe (before the
run layer and the scalings were redesigned): the quickstart at a tiny size (its ``--set``
options are in ``expected.json``), stopped after its step-3 checkpoint, next to the final
metrics of the uninterrupted 6-step run. Resuming it with today's code must accept the
checkpoint (same config hash, same state keys) and reach the same final metrics.
Tolerance: the final validation losses agree to 1e-4 relative (bit-equal on the machine
that wrote the fixture, a Xeon/EPYC with native BF16; an AVX2-only CPU sums the fp32
accumulators in another order, moving the last bits); the batch fingerprints exactly.

That fp8lab accumulated every FP8 GEMM in fp32 and its configs have no ``accumulation``
field: resuming needs ``--set variants.fp8.accumulation=fp32`` (its config, upgraded, is then
today's), and without it the resume is refused naming the field, never run on another model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fp8lab.run import checkpoint as ckpt
from fp8lab.run.cli import main
from fp8lab.run.config import hash_of, upgrade

FIXTURE = Path(__file__).parent / "fixtures" / "quickstart_v1"
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_checkpoint_of_the_earlier_layout_resumes_to_the_same_result(tmp_path):
    expected = json.loads((FIXTURE / "expected.json").read_text())
    run_dir = tmp_path / "quickstart" / "run"
    shutil.copytree(FIXTURE / "run", run_dir)
    sets = [a for s in expected["sets"] + ["variants.fp8.accumulation=fp32"] for a in ("--set", s)]
    code = main(
        ["run", str(ROOT / expected["recipe"]), *sets, "--out", str(tmp_path), "--quiet", "--resume", str(run_dir)]
    )
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    saved = ckpt.read_checkpoint(run_dir / "checkpoints" / "step_00000003.pt")
    assert saved["config_hash"] == expected["config_hash"]
    assert summary["config_hash"] == hash_of(upgrade(saved["config"]))
    for name, want in expected["variants"].items():
        got = summary["variants"][name]
        assert got["final_val_loss"] == pytest.approx(want["final_val_loss"], rel=1e-4), name
        assert got["first_batch_sha"] == want["first_batch_sha"], name
        assert got["skipped_steps"] == want["skipped_steps"], name


def test_the_earlier_checkpoint_is_refused_under_another_accumulation_naming_the_field(tmp_path, capsys):
    expected = json.loads((FIXTURE / "expected.json").read_text())
    run_dir = tmp_path / "quickstart" / "run"
    shutil.copytree(FIXTURE / "run", run_dir)
    sets = [a for s in expected["sets"] for a in ("--set", s)]  # today's default: accumulation="te"
    code = main(
        ["run", str(ROOT / expected["recipe"]), *sets, "--out", str(tmp_path), "--quiet", "--resume", str(run_dir)]
    )
    assert code == 2
    assert "variants.fp8.accumulation: checkpoint 'fp32', now 'te'" in capsys.readouterr().err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000003.pt"]  # nothing written
