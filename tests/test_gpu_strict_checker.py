"""The CPU-side model of CUDA's torch._scaled_mm rules against the real thing (GPU only).

``tests/fake_cuda/strict_scaled_mm.refusal`` encodes what ``_scaled_mm_out_cuda`` and
cuBLASLt refuse, read from torch's and NVIDIA's sources; the fake-CUDA tests trust it. Here,
on an FP8 GPU, each crafted call (one per rule the planted bugs exercise, and calls that
should pass, the ones fp8lab makes among them) goes to the real ``torch._scaled_mm``: the
model must refuse exactly the calls CUDA refuses. Exact agreement, no tolerance. A call the
model refuses but CUDA runs means the CPU checks are too strict (they would fail good code);
one CUDA refuses but the model lets through means they miss a rule. Blockwise 1x128/128x128
calls are only asked on sm_90 with CUDA >= 12.9 (their "R-block" rule); their scale-stride
alignment part is a conservative guess, so disagreement there is reported, not failed, in
``benchmarks/gpu_blockwise_probe.py``.
"""

from __future__ import annotations

import pytest
import torch

from tests.fake_cuda.strict_calls import EXPECTED_RULE, calls
from tests.fake_cuda.strict_scaled_mm import refusal

pytestmark = pytest.mark.gpu

HAS_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not HAS_FP8, reason="needs a CUDA device with compute capability >= 8.9")
@pytest.mark.parametrize("name", list(EXPECTED_RULE))
def test_cpu_model_refuses_exactly_what_cuda_refuses(name):
    torch.manual_seed(0)
    call = calls("cuda")[name]
    cap = torch.cuda.get_device_capability()
    cublas = tuple(int(p) for p in torch.version.cuda.split(".")[:2])
    predicted = refusal(**call, capability=cap, cublas=cublas)
    try:
        rest = dict(call)  # the tensors positionally: torch 2.11 names the first one "input", 2.13 "mat1"
        torch._scaled_mm(rest.pop("mat1"), rest.pop("mat2"), rest.pop("scale_a"), rest.pop("scale_b"), **rest)
        torch.cuda.synchronize()
        actual = None
    except (RuntimeError, ValueError) as err:
        actual = str(err).splitlines()[0][:200]
    assert (predicted is None) == (actual is None), f"{name}: model says {predicted!r}, CUDA says {actual!r}"
