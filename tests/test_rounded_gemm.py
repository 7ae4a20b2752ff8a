"""The rounded backends compute the BF16, FP16 and FP32 hardware models (fp8lab.gemm.exact).

Reference (tests/helpers.hw_reference): the exact sum of products of the rounded operand
values in float64, rounded once to fp32, plus the bias in fp32, rounded once to the output
dtype. Bounds as in test_hardware_model.py: >= 99% of 16-bit outputs bit-equal (another
accumulation order moves ~0.1% across a rounding boundary), fp32 outputs within 1e-5 of
max|ref|.
"""

from __future__ import annotations

import pytest
import torch

import fp8lab
from fp8lab import FP8Options
from fp8lab.gemm.backends import backend_for
from fp8lab.gemm.backends.rounded import RoundedBackend
from fp8lab.gemm.exact import ROUNDED_DTYPES, epilogue_bias, gemm_path, rounded_gemm_path
from tests.helpers import equal_fraction, fp32_error, hw_reference

EQUAL_16 = 0.99
FP32_REL = 1e-5


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_rounded_gemm_is_the_hardware_model_of_its_precision(precision):
    gen = torch.Generator().manual_seed(3)
    x, w, bias = torch.randn(64, 96, generator=gen), torch.randn(80, 96, generator=gen), torch.randn(80, generator=gen)
    dtype = ROUNDED_DTYPES[precision]
    backend = backend_for(precision, "cpu")
    assert isinstance(backend, RoundedBackend) and backend.name == precision and not backend.fp8
    x_r, w_r = backend.round(x), backend.round(w)
    assert torch.equal(x_r.to(dtype), x.to(dtype)) and torch.equal(x_r.double(), x.to(dtype).double())
    x64, w64 = x.to(dtype).double(), w.to(dtype).double().T
    out_dtype = dtype  # one rounding to the precision itself, as under autocast
    b = epilogue_bias(bias, out_dtype, fp8=False)
    out = backend.gemm(x_r, w_r.t(), None, None, out_dtype, b)
    assert out.dtype == out_dtype
    ref = hw_reference(x64, w64, None, b, out_dtype)
    if precision == "fp32":
        assert fp32_error(out, ref) <= FP32_REL
    else:
        assert equal_fraction(out, ref) >= EQUAL_16
    out32 = backend.gemm(x_r, w_r.t(), None, None, torch.float32, bias)
    assert fp32_error(out32, hw_reference(x64, w64, None, bias, torch.float32)) <= FP32_REL


def test_fp16_and_fp32_hold_operands_in_fp32_and_say_so():
    """An fp16 value does not fit bf16, so the fp16 GEMM never takes the oneDNN bf16 path."""
    for precision in ("fp16", "fp32"):
        path = rounded_gemm_path("cpu", precision)
        assert path.name == "fp32" and path.operand_dtype == torch.float32 and path.reason.startswith("exact GEMM:")
    assert rounded_gemm_path("cpu", "bf16") == gemm_path("cpu")
    assert rounded_gemm_path("cuda", "fp16").operand_dtype == torch.float32  # TF32 off (exact._cuda_exact)
    x = torch.tensor([1.0 + 2.0**-10, 65504.0, 2.0**-24])  # fp16 values bf16 cannot hold
    assert torch.equal(backend_for("fp16", "cpu").round(x), x)


def test_kept_layers_run_in_the_policy_precision():
    model = torch.nn.Sequential(
        fp8lab.Linear(32, 32, fp8=FP8Options(fallback="emulated")),
        fp8lab.Linear(32, 16, fp8=FP8Options(fallback="emulated")),
    )
    fp8lab.PrecisionPolicy(keep_bf16=("1",), precision="fp16").apply(model)
    rows = fp8lab.describe(model)
    assert (rows[0].precision, rows[1].precision, rows[1].backend) == ("fp8", "fp16", "fp16")
    assert rows[1].reason.startswith("kept in FP16 by policy pattern '1';")
    assert rows[1].reason.endswith(rounded_gemm_path("cpu", "fp16").reason)
    with pytest.raises(ValueError, match="precision must be one of"):
        fp8lab.PrecisionPolicy(precision="fp8")
