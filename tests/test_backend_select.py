"""select_backend over the whole decision table: every input is an argument, so CPU suffices.

Each row states the exact backend and reason a user sees in ``fp8lab describe`` /
``fp8lab info``; impossible explicit requests must raise ``BackendUnavailable`` with a
message that says what to install or change.
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

from fp8lab.gemm.backends.select import (
    BackendUnavailable,
    DeviceFacts,
    Plan,
    TEFacts,
    probe_device,
    probe_te,
    select_backend,
)
from fp8lab.options import BACKENDS, FALLBACKS, FP8Options
from fp8lab.scaling import SCALINGS

CPU = DeviceFacts("cpu")
A100 = DeviceFacts("cuda", (8, 0), "A100")
A10 = DeviceFacts("cuda", (8, 6), "A10")
L4 = DeviceFacts("cuda", (8, 9), "L4")
H100 = DeviceFacts("cuda", (9, 0), "H100")
B200 = DeviceFacts("cuda", (10, 0), "B200")
DEVICES = (CPU, A100, A10, L4, H100, B200)
TE = TEFacts("2.20.2")
NO_TE = TEFacts(None, "transformer_engine is not installed")
ALIGNED = (4096, 4096)
ODD = (100, 4096)  # 100 is not a multiple of 16

EMU = "; FP8 emulated in software"
TE_REASON = "Transformer Engine 2.20.2 on {}"
SMM_REASON = "torch._scaled_mm on {}; install fp8lab[te] for fused kernels"

# (device, te, requested, fallback, dims) -> (backend, reason)
CASES = [
    # auto without FP8 hardware: the layer's fallback, with the hardware reason
    (CPU, TE, "auto", "bf16", ALIGNED, "bf16", "no FP8 hardware on CPU"),
    (CPU, NO_TE, "auto", "emulated", ALIGNED, "emulated", "no FP8 hardware on CPU" + EMU),
    (CPU, NO_TE, "auto", "bf16", ODD, "bf16", "no FP8 hardware on CPU"),
    (A100, TE, "auto", "bf16", ALIGNED, "bf16", "A100 (sm_80) has no FP8 tensor cores"),
    (A100, NO_TE, "auto", "emulated", ALIGNED, "emulated", "A100 (sm_80) has no FP8 tensor cores" + EMU),
    (A10, TE, "auto", "bf16", ALIGNED, "bf16", "A10 (sm_86) has no FP8 tensor cores"),
    (A10, NO_TE, "auto", "emulated", ODD, "emulated", "A10 (sm_86) has no FP8 tensor cores" + EMU),
    # auto with FP8 hardware: TE when importable, else torch._scaled_mm; fallback unused
    (L4, TE, "auto", "bf16", ALIGNED, "te", TE_REASON.format("L4 (sm_89)")),
    (L4, NO_TE, "auto", "emulated", ALIGNED, "scaled_mm", SMM_REASON.format("L4 (sm_89)")),
    (H100, TE, "auto", "bf16", ALIGNED, "te", TE_REASON.format("H100 (sm_90)")),
    (H100, TE, "auto", "emulated", ALIGNED, "te", TE_REASON.format("H100 (sm_90)")),
    (H100, NO_TE, "auto", "bf16", ALIGNED, "scaled_mm", SMM_REASON.format("H100 (sm_90)")),
    (B200, TE, "auto", "bf16", ALIGNED, "te", TE_REASON.format("B200 (sm_100)")),
    (B200, NO_TE, "auto", "emulated", ALIGNED, "scaled_mm", SMM_REASON.format("B200 (sm_100)")),
    # a layer a hardware FP8 GEMM cannot take falls back alone, saying why
    (
        H100,
        TE,
        "auto",
        "bf16",
        ODD,
        "bf16",
        "dimensions 100x4096 are not multiples of 16, which a hardware FP8 GEMM needs",
    ),
    (
        H100,
        NO_TE,
        "auto",
        "emulated",
        ODD,
        "emulated",
        "dimensions 100x4096 are not multiples of 16, which a hardware FP8 GEMM needs" + EMU,
    ),
    (
        H100,
        TE,
        "te",
        "bf16",
        ODD,
        "bf16",
        "backend='te' requested, but dimensions 100x4096 are not multiples of 16, which a hardware FP8 GEMM needs",
    ),
    (
        L4,
        NO_TE,
        "scaled_mm",
        "emulated",
        ODD,
        "emulated",
        "backend='scaled_mm' requested, but dimensions 100x4096 are not multiples of 16, which a hardware FP8 GEMM "
        "needs" + EMU,
    ),
    # explicit hardware requests that can run
    (H100, TE, "te", "bf16", ALIGNED, "te", TE_REASON.format("H100 (sm_90)")),
    (L4, TE, "te", "emulated", None, "te", TE_REASON.format("L4 (sm_89)")),
    (H100, TE, "scaled_mm", "bf16", ALIGNED, "scaled_mm", "torch._scaled_mm on H100 (sm_90) (requested)"),
    (B200, NO_TE, "scaled_mm", "emulated", ALIGNED, "scaled_mm", "torch._scaled_mm on B200 (sm_100) (requested)"),
]


@pytest.mark.parametrize("device,te,requested,fallback,dims,backend,reason", CASES)
def test_decision_table(device, te, requested, fallback, dims, backend, reason):
    plan = select_backend(device=device, te=te, requested=requested, fallback=fallback, dims=dims)
    assert plan == Plan(backend, reason)
    assert plan.precision == ("bf16" if backend == "bf16" else "fp8")


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.name or d.type)
@pytest.mark.parametrize("te", (TE, NO_TE), ids=("te", "no_te"))
@pytest.mark.parametrize("fallback", FALLBACKS)
@pytest.mark.parametrize("dims", (ALIGNED, ODD, None), ids=("aligned", "odd", "nodims"))
def test_software_requests_run_everywhere(device, te, fallback, dims):
    """'bf16' and 'emulated' never depend on hardware, TE or dims."""
    common = dict(device=device, te=te, fallback=fallback, dims=dims)
    assert select_backend(requested="bf16", **common) == Plan("bf16", "backend='bf16' requested")
    assert select_backend(requested="emulated", **common) == Plan(
        "emulated", "backend='emulated' requested; FP8 emulated in software"
    )


IMPOSSIBLE = [
    # (device, te, requested, fragments the message must contain)
    (
        CPU,
        TE,
        "scaled_mm",
        ("backend='scaled_mm' needs a CUDA device, got cpu", "never run on CPU", "backend='emulated'"),
    ),
    (CPU, NO_TE, "te", ("backend='te' needs a CUDA device, got cpu", "NVIDIA GPU", "backend='emulated'")),
    (A100, TE, "scaled_mm", ("FP8 tensor cores (sm_89 or newer)", "A100 (sm_80) has none", "backend='auto'")),
    (A10, TE, "te", ("FP8 tensor cores (sm_89 or newer)", "A10 (sm_86) has none", "backend='auto'")),
    (H100, NO_TE, "te", ("pip install 'fp8lab[te]'", "transformer_engine is not installed")),
    (
        L4,
        TEFacts(None, "transformer_engine is installed without its PyTorch extension (transformer_engine_torch)"),
        "te",
        ("pip install 'fp8lab[te]'", "without its PyTorch extension"),
    ),
]


@pytest.mark.parametrize("device,te,requested,fragments", IMPOSSIBLE)
@pytest.mark.parametrize("fallback", FALLBACKS)
def test_impossible_requests_raise_with_a_remedy(device, te, requested, fragments, fallback):
    with pytest.raises(BackendUnavailable) as info:
        select_backend(device=device, te=te, requested=requested, fallback=fallback, dims=ALIGNED)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_whole_table_is_total():
    """Every combination either plans a known backend with a reason or raises for an explicit request."""
    raised = set()
    for device, te, requested, fallback, dims in itertools.product(
        DEVICES, (TE, NO_TE), BACKENDS, FALLBACKS, (ALIGNED, ODD, None)
    ):
        try:
            plan = select_backend(device=device, te=te, requested=requested, fallback=fallback, dims=dims)
        except BackendUnavailable:
            raised.add((device.name or device.type, te.version, requested))
            continue
        assert plan.backend in ("te", "scaled_mm", "emulated", "bf16") and plan.reason
        assert plan.backend != "te" or te.version is not None  # never TE when it is absent
        fp8_hw = device.type == "cuda" and device.capability >= (8, 9)
        assert fp8_hw or plan.backend not in ("te", "scaled_mm")
        if plan.backend in ("te", "scaled_mm"):
            assert dims != ODD  # odd dims never reach a hardware GEMM
    expected = {
        (dev, ver, req)
        for dev, ver, req in itertools.product(("cpu", "A100", "A10"), ("2.20.2", None), ("te", "scaled_mm"))
    } | {(name, None, "te") for name in ("L4", "H100", "B200")}
    assert raised == expected


@pytest.mark.parametrize("field,kwargs", [("backend", {"backend": "fp8"}), ("fallback", {"fallback": "fp32"})])
def test_bad_names_say_field_and_allowed(field, kwargs):
    """Names are checked once, by FP8Options, before any plan is made."""
    with pytest.raises(ValueError, match=rf"^{field} must be one of"):
        FP8Options(**kwargs)


def test_probe_device_on_cpu_makes_no_cuda_call():
    assert probe_device(torch.device("cpu")) == DeviceFacts("cpu")


def test_probe_te_matches_installed_packages():
    facts = probe_te()
    installed = all(importlib.util.find_spec(m) is not None for m in ("transformer_engine", "transformer_engine_torch"))
    assert (facts.version is not None) == installed
    if not installed:
        assert "transformer_engine is" in facts.why_not


H100_CUDA12_8 = DeviceFacts("cuda", (9, 0), "H100", (12, 8), torch_blockwise=True)
H100_CUDA13 = DeviceFacts("cuda", (9, 0), "H100", (13, 0), torch_blockwise=True)
H100_OLD_TORCH = DeviceFacts("cuda", (9, 0), "H100", (12, 9))  # a torch without the blockwise scaled GEMM
B200_CUDA13 = DeviceFacts("cuda", (10, 0), "B200", (13, 0), torch_blockwise=True)

# (device, te, scaling, requested, fallback) -> (backend, reason fragment)
SCALING_CASES = [
    (H100_CUDA13, NO_TE, "current", "auto", "bf16", "scaled_mm", "torch._scaled_mm on H100 (sm_90)"),
    (H100_CUDA13, TE, "current", "auto", "bf16", "te", "Transformer Engine 2.20.2 on H100 (sm_90)"),
    (H100_CUDA13, TE, "block", "auto", "bf16", "te", "Transformer Engine 2.20.2 on H100 (sm_90)"),
    (H100_CUDA12_8, TE, "block", "auto", "emulated", "emulated", "needs sm_90 or newer and CUDA 12.9 or newer"),
    # block scaling without TE: torch's blockwise GEMM on sm_90 with CUDA 12.9 and a torch that has it
    (H100_CUDA13, NO_TE, "block", "auto", "bf16", "scaled_mm", "torch._scaled_mm on H100 (sm_90)"),
    (
        H100_OLD_TORCH,
        NO_TE,
        "block",
        "auto",
        "bf16",
        "bf16",
        "block scaling on H100 (sm_90): Transformer Engine is not installed, and this torch lacks the blockwise",
    ),
    (H100_CUDA12_8, NO_TE, "block", "auto", "emulated", "emulated", "needs cuBLAS 12.9 or newer"),
    (L4, NO_TE, "block", "auto", "bf16", "bf16", "runs on Hopper (sm_90) only, not sm_89"),
    (B200_CUDA13, NO_TE, "block", "auto", "bf16", "bf16", "runs on Hopper (sm_90) only, not sm_100"),
    (H100_CUDA13, TE, "mxfp8", "auto", "emulated", "emulated", "MXFP8BlockScaling needs sm_100"),
    (B200_CUDA13, TE, "mxfp8", "auto", "bf16", "te", "Transformer Engine 2.20.2 on B200 (sm_100)"),
    (B200_CUDA13, NO_TE, "mxfp8", "auto", "emulated", "emulated", "1x128/128x128 scales only, not mxfp8's"),
    (CPU, TE, "mxfp8", "auto", "emulated", "emulated", "no FP8 hardware on CPU"),
]


@pytest.mark.parametrize("device, te, scaling, requested, fallback, backend, reason", SCALING_CASES)
def test_each_scaling_goes_where_hardware_can_run_it(device, te, scaling, requested, fallback, backend, reason):
    plan = select_backend(
        device=device, te=te, requested=requested, fallback=fallback, dims=ALIGNED, scaling=SCALINGS[scaling]()
    )
    assert plan.backend == backend and reason in plan.reason


@pytest.mark.parametrize(
    "device, te, scaling, requested, message",
    [
        (H100_OLD_TORCH, TE, "block", "scaled_mm", "this torch lacks the blockwise scaled GEMM"),
        (B200_CUDA13, TE, "mxfp8", "scaled_mm", "1x128/128x128 scales only"),
        (H100_CUDA13, TE, "mxfp8", "te", "needs sm_100"),
        (H100_CUDA12_8, TE, "block", "te", "CUDA 12.9"),
    ],
)
def test_an_explicit_backend_that_cannot_run_the_scaling_says_why(device, te, scaling, requested, message):
    with pytest.raises(BackendUnavailable, match=message):
        select_backend(
            device=device, te=te, requested=requested, fallback="bf16", dims=ALIGNED, scaling=SCALINGS[scaling]()
        )
