"""fp8lab's torch._scaled_mm calls against what CUDA accepts, on a CPU (fake CUDA devices).

Every ``_scaled_mm`` call fp8lab.Linear makes (fprop, dgrad, wgrad; two steps with
``update_scales`` between) runs on FakeTensorMode tensors on "cuda" with real autograd
(``tests.fake_cuda``: a C++ device-guard shim, built here, in a child process) and passes
through two checks: torch 2.13's own ``meta_scaled_mm`` and ``StrictScaledMM``, what
``_scaled_mm_out_cuda`` and cuBLASLt refuse beyond it. There is no numeric tolerance here:
a configuration passes only when no check refuses any call, and the layer's outputs and
gradients have the dtypes and shapes of its contract. Numerics are checked on a real GPU
(tests/test_gpu_backends.py) and, for the GEMM itself, against torch's CPU kernel
(tests/test_hardware_model.py).

The planted-bug test shows these checks can fail: each bug of ``tests.fake_cuda.mutants``
must be refused, by the check ``EXPECTED`` names, and the CUDA-only ones must pass the meta
kernel alone (else the strict checks would be redundant for them).
"""

from __future__ import annotations

import itertools

import pytest

from tests.fake_cuda import run_child, skip_reason
from tests.fake_cuda.mutants import EXPECTED
from tests.fake_cuda.strict_calls import EXPECTED_RULE

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

TOKENS = (0, 1, 21, 32, 4096)
MUTANT_CONFIGS = [
    dict(scaling="delayed", m=21, bias=True, amp="bf16", steps=1),
    dict(scaling="delayed", m=21, bias=True, amp="off", steps=1),
    dict(scaling="current", m=32, bias=True, amp="bf16", steps=1),
]


def _configs(scalings, steps):
    """Every token count x autocast x bias on a 2-D fp32 input (``steps`` steps each, so
    delayed scaling runs on updated scales), plus one step of each layout a model hands a
    Linear (4-D, permuted, a column slice) and of bf16/fp16 inputs without autocast."""
    cfgs = [
        dict(scaling=s, m=m, bias=b, amp=amp, steps=steps)
        for s, m, b, amp in itertools.product(scalings, TOKENS, (True, False), ("off", "bf16", "fp16"))
    ]
    cfgs += [
        dict(scaling=s, m=m, bias=True, amp=amp, shape=shape, steps=1)
        for s, m, amp, shape in itertools.product(scalings, (1, 21, 32), ("off", "bf16"), ("4d", "permuted", "sliced"))
    ]
    cfgs += [
        dict(scaling=s, m=m, bias=b, amp="off", x_dtype=dt, steps=1)
        for s, m, b, dt in itertools.product(scalings, (21, 32), (True, False), ("bf16", "fp16"))
    ]
    return cfgs


# Block scalings: each (x, w, grad) block layout, so every pair of torch's blockwise GEMM
# (1x128 x 128x128, 128x128 x 1x128, 1x128 x 1x128) comes up in each of fprop, dgrad and
# wgrad; widths that are and are not multiples of 128 (K/128 = 6 needs L4 padding to 8).
BLOCK_SCALINGS = ("block", "block_x2d", "block_g2d")
BLOCK_DIMS = ((64, 48), (768, 256))


def _block_configs():
    cfgs = [
        dict(scaling=s, m=m, k=k, n=n, bias=True, amp="bf16", steps=2)
        for s, m, (k, n) in itertools.product(BLOCK_SCALINGS, TOKENS, BLOCK_DIMS)
    ]
    cfgs += [
        dict(scaling="block", m=21, k=768, n=256, bias=b, amp=amp, steps=1)
        for b, amp in itertools.product((True, False), ("off", "fp16"))
    ]
    cfgs += [
        dict(scaling="block", m=m, k=256, n=128, bias=True, amp="bf16", shape=shape, steps=1)
        for m, shape in itertools.product((1, 21, 32), ("4d", "permuted", "sliced"))
    ]
    return cfgs


# The torch blockwise pair of each GEMM (fprop, dgrad, wgrad) per block layout.
BLOCK_PAIRS = {
    "block": [["1x128", "128x128"], ["1x128", "128x128"], ["1x128", "1x128"]],
    "block_x2d": [["128x128", "1x128"], ["1x128", "1x128"], ["1x128", "128x128"]],
    "block_g2d": [["1x128", "1x128"], ["128x128", "1x128"], ["128x128", "1x128"]],
}


JOBS = {
    "sm90": dict(kind="contract", capability=[9, 0], configs=_configs(("delayed", "current"), steps=2)),
    "sm89": dict(kind="contract", capability=[8, 9], configs=_configs(("delayed", "current"), steps=1)),
    "sm80": dict(
        kind="contract",
        capability=[8, 0],
        configs=[
            dict(scaling=s, m=21, bias=True, amp="bf16", steps=1) for s in ("delayed", "current", "block", "mxfp8")
        ],
    ),
    # Float8BlockScaling without TE: torch's blockwise GEMM (sm_90, CUDA >= 12.9 only)
    "block_sm90": dict(kind="contract", capability=[9, 0], configs=_block_configs()),
    "block_refused": dict(
        kind="contract",
        capability=[8, 9],
        configs=[dict(scaling="block", m=21, bias=True, amp="bf16", steps=1)],
    ),
    "block_cuda12_8": dict(
        kind="contract",
        capability=[9, 0],
        cuda="12.8",
        configs=[dict(scaling="block", m=21, bias=True, amp="bf16", steps=1)],
    ),
    "mutants_sm90": dict(
        kind="mutants", capability=[9, 0], configs=MUTANT_CONFIGS, names=[n for n in EXPECTED if n != "fp8_on_sm80"]
    ),
    "mutants_sm80": dict(kind="mutants", capability=[8, 0], configs=MUTANT_CONFIGS, names=["fp8_on_sm80"]),
    "verdicts": dict(kind="verdicts", capability=[9, 0]),
}


@pytest.fixture(scope="module")
def suite():
    """All jobs in one child process (one interpreter and torch import)."""
    return run_child("suite", jobs=JOBS)


def _not_on_scaled_mm(cfgs, results) -> list:
    """The configurations that did not run on the scaled_mm backend, or met a refusal."""
    return [
        (cfg, res["plan"], res.get("error"))
        for cfg, res in zip(cfgs, results)
        if res["plan"] != "scaled_mm" or "error" in res
    ]


@pytest.mark.parametrize("device", ["sm90", "sm89"])
def test_every_scaled_mm_call_of_a_linear_is_one_cuda_accepts(device, suite):
    cfgs, results = JOBS[device]["configs"], suite[device]["results"]
    assert not _not_on_scaled_mm(cfgs, results)
    for cfg, res in zip(cfgs, results):
        calls = res["calls"]
        assert len(calls) == 3 * cfg["steps"], (cfg, len(calls))  # fprop, dgrad, wgrad per step
        fprop, dgrad, wgrad = calls[:3]
        m, k, n = cfg["m"], 64, 48
        tokens_padded = -(-m // 16) * 16
        assert [fprop["shapes"], dgrad["shapes"], wgrad["shapes"]] == [
            [[m, k], [k, n]],
            [[m, n], [n, k]],
            [[n, tokens_padded], [tokens_padded, k]],
        ], cfg
        assert fprop["dtypes"] == ["torch.float8_e4m3fn"] * 2
        assert dgrad["dtypes"] == wgrad["dtypes"] == ["torch.float8_e5m2", "torch.float8_e4m3fn"]  # hybrid
        assert all(c["scaling"] == ["tensorwise", "tensorwise"] for c in calls)
        # accumulation="te": cuBLASLt's FAST_ACCUM for the forward GEMM, its split accumulator for the backward
        assert [c["fast_accum"] for c in calls[:3]] == [True, False, False]
        # the bias rides in cuBLASLt's epilogue exactly when the output is bf16/fp16, in its dtype
        epilogue = fprop["out"] if cfg["bias"] and fprop["out"] != "torch.float32" else None
        assert fprop["bias"] == epilogue and dgrad["bias"] is None and wgrad["bias"] is None, cfg


def test_sm80_runs_no_fp8_gemm(suite):
    for res in suite["sm80"]["results"]:
        assert res["plan"] == "bf16" and "(sm_80) has no FP8 tensor cores" in res["reason"], res
        assert "error" not in res and res["calls"] == []


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_planted_bug_is_caught_by_the_expected_check(name, suite):
    row = (suite["mutants_sm90"]["mutants"] | suite["mutants_sm80"]["mutants"])[name]
    assert row["strict"] is not None, f"{name}: not caught at all"
    if EXPECTED[name] == "meta":
        assert row["meta"] is not None and row["meta"]["caught_by"] in ("meta", "fake-host-read"), row
    else:
        assert row["meta"] is None, f"{name}: the meta kernel alone already catches it: {row['meta']}"
        assert row["strict"]["caught_by"] == "strict", row


@pytest.mark.parametrize("name", list(EXPECTED_RULE))
def test_strict_model_gives_each_crafted_call_its_verdict(name, suite):
    """The same calls go to a real GPU in tests/test_gpu_strict_checker.py."""
    verdict, want = suite["verdicts"]["crafted"][name], EXPECTED_RULE[name]
    assert (verdict is None) if want is None else (verdict or "").startswith(want), verdict


def test_strict_model_architecture_and_blockwise_rules(suite):
    arch, block = suite["verdicts"]["arch"], suite["verdicts"]["block"]
    assert {k: v is None for k, v in arch.items()} == {
        "sm_80": False,
        "sm_86": False,
        "sm_89": True,
        "sm_90": True,
        "sm_100": True,
    }
    assert block["kinds"] == ["1x128", "128x128"] and block["sm_90"] is None
    for key in ("sm_89", "sm_100", "cublas_12.8", "fast_accum"):
        assert block[key].startswith("R-block"), (key, block[key])
    assert block["scale_a_row_major"].startswith("R-scaling")


def _up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def test_block_scaling_runs_through_torchs_blockwise_gemm_on_sm90(suite):
    """Every call passes the meta kernel and the strict v2 rules; the operands are padded as
    ``fp8lab.gemm.backends.scaled_mm._block_gemm`` says (K and 128x128-blocked sides to 128,
    1x128 A rows to 4, B columns to 16); never fast accumulation; no call for an empty GEMM."""
    cfgs, results = JOBS["block_sm90"]["configs"], suite["block_sm90"]["results"]
    assert not _not_on_scaled_mm(cfgs, results)
    for cfg, res in zip(cfgs, results):
        calls = res["calls"]
        if cfg["m"] == 0:  # no tokens: every GEMM is empty (zeros + bias), no call is made
            assert calls == [], cfg
            continue
        assert len(calls) == 3 * cfg["steps"], (cfg, len(calls))
        pairs = BLOCK_PAIRS[cfg["scaling"]]
        assert [c["scaling"] for c in calls] == pairs * cfg["steps"], cfg
        assert not any(c["fast_accum"] for c in calls)
        m, k, n = cfg["m"], cfg["k"], cfg["n"]

        def rows(kind: str, size: int) -> int:
            return _up(size, 128 if kind == "128x128" else 4)

        def cols(kind: str, size: int) -> int:
            return _up(size, 128 if kind == "128x128" else 16)

        (fa, fb), (da, db), (wa, wb) = pairs
        assert [c["shapes"] for c in calls[:3]] == [
            [[rows(fa, m), _up(k, 128)], [_up(k, 128), cols(fb, n)]],
            [[rows(da, m), _up(n, 128)], [_up(n, 128), cols(db, k)]],
            [[rows(wa, n), _up(m, 128)], [_up(m, 128), cols(wb, k)]],
        ], cfg


def test_block_scaling_elsewhere_keeps_its_fallback_and_says_why(suite):
    sm89 = suite["block_refused"]["results"][0]
    assert sm89["plan"] == "bf16" and "runs on Hopper (sm_90) only, not sm_89" in sm89["reason"], sm89
    old_cuda = suite["block_cuda12_8"]["results"][0]
    assert old_cuda["plan"] == "bf16" and "needs cuBLAS 12.9 or newer" in old_cuda["reason"], old_cuda
    assert sm89["calls"] == [] and old_cuda["calls"] == []


V2_EXPECTED = {
    "good": None,
    "unpadded_L4": "R-scaling",
    "scale_a_row_major": "R-scaling",
    "fast_accum": "R-block",
    "sm_89": "R-block",
    "sm_100": "R-block",
    "cublas_12.8": "R-block",
    "scales_on_cpu": "R-device",
    "b_row_major": "R-layout",
    "fp32_bias_bf16_out": "R-bias",
}


@pytest.mark.parametrize("name", list(V2_EXPECTED))
def test_strict_model_of_torchs_blockwise_gemm_gives_each_call_its_verdict(name, suite):
    verdict, want = suite["verdicts"]["block_v2"][name], V2_EXPECTED[name]
    assert (verdict is None) if want is None else (verdict or "").startswith(want), verdict
