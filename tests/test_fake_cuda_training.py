"""The no-host-sync rule on fake CUDA: training steps counted, read by read.

A tiny GPT (2 blocks, ``backend="auto"`` on a fake sm_90: torch._scaled_mm; the LM head in
BF16 by the default policy) trains through ``fp8lab.Monitor`` with real autograd and
``torch.autocast("cuda", bf16)``; ``tests.fake_cuda.d2h.D2HCounter`` counts every
device-to-host read and blocking host-to-device copy in each whole optimizer step
(``begin_step`` .. ``end_step``, which runs ``update_scales`` and the telemetry). Exact
counts, no tolerance:

- a step between log steps: none at all;
- a log step: exactly the designed copies, each named by where it happens: the log-step
  protocol's one copy of every layer's statistics, fault counts and the loss/skip counters
  (``ScalingCollector.read_with``), plus, on steps that are multiples of
  ``histogram_interval``, the amax histories (``ScalingCollector.histories``).

Then the model's ``state_dict`` goes through ``torch.save``/``torch.load(weights_only=True)``
and a fresh model that loaded it runs a step with no sync. And one step of a Linear per
scaling recipe (block scaling through torch's blockwise GEMM and through the emulation,
MXFP8 through the emulation) makes no sync either: the MXFP8 cast used to build a scalar
with ``torch.tensor(v, device=...)``, a blocking copy.
"""

from __future__ import annotations

import pytest

from tests.fake_cuda import run_child, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

COLLECTOR = "telemetry/collector.py"
# A log step reads the layers' statistics, fault counts and the step counters in one copy.
LOG_READS = [("to_cpu", f"{COLLECTOR}:read_with")]
HISTOGRAMS = [("to_cpu", f"{COLLECTOR}:histories")]


def _reads(where) -> list[tuple[str, str]]:
    """[(kind, "file:function")] without line numbers, which move with every edit."""
    return [(kind, f"{loc.split(':')[0]}:{loc.split(' ')[-1]}") for kind, loc in where]


SYNC_CONFIGS = [dict(scaling=s) for s in ("delayed", "current", "block", "mxfp8")] + [
    dict(scaling="block", backend="emulated")
]


@pytest.fixture(scope="module")
def suite():
    return run_child(
        "suite",
        jobs={
            "train": dict(kind="train", scaling="delayed", steps=4, log_interval=2, histogram_interval=4),
            "syncs": dict(kind="syncs", capability=[9, 0], configs=SYNC_CONFIGS),
        },
    )


@pytest.fixture(scope="module")
def run(suite):
    return suite["train"]


def test_fake_sm90_gpt_runs_fp8_through_scaled_mm(run):
    assert any(p.startswith("scaled_mm: torch._scaled_mm on NVIDIA H100 (fake) (sm_90)") for p in run["plans"])
    assert run["scaled_mm_calls"] == 4 * 8 * 3  # steps x FP8 Linears (2 blocks x 4) x (fprop, dgrad, wgrad)


def test_no_host_sync_between_log_steps_and_only_the_designed_ones_on_log_steps(run):
    for step, record in enumerate(run["steps"], start=1):
        reads = _reads(record["where"])
        if not record["log_step"]:
            assert reads == [] and record["d2h"] == {}, f"step {step}: {record['where']}"
        else:
            want = LOG_READS + (HISTOGRAMS if step % 4 == 0 else [])
            assert sorted(reads) == sorted(want), f"step {step}: {record['where']}"
            assert record["tags"] > 100  # the log step did write its telemetry


def test_checkpoint_round_trip_then_a_step_without_sync(run):
    ckpt = run["checkpoint"]
    # 8 FP8 Linears and the LM head (kept in BF16, its DelayedScaling state still saved)
    assert ckpt["keys_equal"] and ckpt["mismatched"] == [] and ckpt["fp8_state_keys"] == 9
    resumed = run["resumed_step"]
    assert not resumed["log_step"] and resumed["where"] == []


def test_one_linear_step_of_every_scaling_makes_no_host_sync(suite):
    results = suite["syncs"]["results"]
    # block scaling: torch's blockwise GEMM on sm_90 (and the emulation, asked for); MXFP8 is emulated
    assert [r["plan"] for r in results] == ["scaled_mm", "scaled_mm", "scaled_mm", "emulated", "emulated"]
    for cfg, res in zip(SYNC_CONFIGS, results):
        assert res["error"] is None and res["where"] == [], (cfg, res)
