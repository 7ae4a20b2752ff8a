"""Float8BlockScaling through torch's blockwise scaled GEMM (the scaled_mm backend on Hopper
without Transformer Engine), checked on a CPU.

torch's CPU ``_scaled_mm`` refuses blockwise scales, so the GEMM itself runs only on a GPU
(``tests/test_gpu_backends.py``; ``benchmarks/gpu_blockwise_probe.py``). What a CPU can
check, it checks here, on real float8 tensors:

- the layouts: ``decode_scaled_mm`` stands in for ``torch.nn.functional.scaled_mm``. It first
  requires each call's scale shapes and strides to be what ``ScaledBlas.cpp`` demands
  (``refusal_v2``'s R-scaling rule, ``tests/fake_cuda/strict_scaled_mm``; the fake-CUDA
  contract test runs the whole rule set and torch's meta kernel on the same calls), then
  reads every scale from the place that layout puts it and multiplies in float64. A scale
  read from the wrong block, row or K group changes the result by a power of two;
- the numbers: a Linear's output, input gradient and weight gradient through the scaled_mm
  backend (with that decoder) against the emulation of the same layer with an fp32
  accumulator (the same exact FP8 values and block scales, dequantized): fp32 outputs agree
  to 1e-5 of max|ref| (float64 vs fp32 summation), bf16 outputs >= 99% bit-equal and each
  within one bf16 ulp plus that slack. The decoder's ideal accumulation is not the tensor cores' promoted one: that
  comparison needs a GPU.
- a planted layout bug (scales of the K groups in reverse order) fails the same comparison.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fp8lab
from fp8lab.accumulation import FP32
from fp8lab.gemm.backends import scaled_mm
from fp8lab.gemm.backends.emulated import EmulatedBackend
from fp8lab.gemm.backends.scaled_mm import ScaledMMBackend
from fp8lab.gemm.exact import gemm_path
from fp8lab.gemm.qlinear import _QuantizedLinear
from tests.fake_cuda.strict_scaled_mm import V2_KINDS, _v2_block_scales

SCALINGS = {
    "x1-w2-g1": fp8lab.Float8BlockScaling(),
    "x2-w1-g1": fp8lab.Float8BlockScaling(x_block_scaling_dim=2, w_block_scaling_dim=1),
    "x1-w1-g2": fp8lab.Float8BlockScaling(w_block_scaling_dim=1, grad_block_scaling_dim=2),
    "hybrid": fp8lab.Float8BlockScaling(fp8_format="hybrid"),
}
SHAPES = [(21, 64, 48), (300, 768, 256), (130, 256, 144)]  # (tokens, in_features, out_features)


def _expand(scale: torch.Tensor, kind: str, outer: int, k: int, k_groups: int) -> torch.Tensor:
    """One operand's scales laid out as ScaledBlas.cpp defines them, expanded to (outer, K)."""
    if kind == "1x128":  # (outer, G), strides (1, outer)
        per_group = scale
    else:  # (L4, ceil(outer / 128)), strides (1, L4): one scale per 128 x 128 block
        per_group = scale[:k_groups].t().repeat_interleave(128, dim=0)[:outer]
    return per_group.double().repeat_interleave(128, dim=1)[:, :k]


def decode_scaled_mm(
    mat_a, mat_b, scale_a, recipe_a, scale_b, recipe_b, bias=None, output_dtype=torch.bfloat16, use_fast_accum=False
):
    """``F.scaled_mm`` for FP8 blockwise pairs, on CPU: layout checked, scales decoded, float64 sum."""
    kinds = (V2_KINDS[int(recipe_a.value)], V2_KINDS[int(recipe_b.value)])
    (m, k), n = mat_a.shape, mat_b.shape[1]
    why = _v2_block_scales(kinds, m, k, n, scale_a, scale_b)
    assert why is None, why
    assert not use_fast_accum
    assert mat_a.stride(1) == 1 and mat_b.stride(0) == 1, (mat_a.stride(), mat_b.stride())  # row x column-major
    groups = -(-k // 128)
    a = mat_a.double() * _expand(scale_a, kinds[0], m, k, groups)
    b = mat_b.double() * _expand(scale_b, kinds[1], n, k, groups).t()
    out = a @ b
    if bias is not None:
        out += bias.double()
    return out.to(output_dtype)


def _blocky(shape, generator) -> torch.Tensor:
    """Values whose magnitude changes by powers of two from one 128-block to the next, so every
    block gets its own scale (a scale applied to the wrong block cannot go unnoticed)."""
    rows, cols = shape
    row_mag = torch.exp2(torch.randint(-6, 7, (-(-rows // 128), 1), generator=generator).float())
    col_mag = torch.exp2(torch.randint(-6, 7, (1, -(-cols // 128)), generator=generator).float())
    mag = (row_mag @ col_mag).repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    return torch.randn(rows, cols, generator=generator) * mag


def _linear(backend, scaling, x, w, b, g, out_dtype, accumulators):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = _QuantizedLinear.apply(x, w, b, scaling, None, backend, out_dtype, False, None, accumulators)
    y.backward(g)
    return y.detach(), x.grad, w.grad


def _run_both(scaling, shape, out_dtype, monkeypatch):
    m, k, n = shape
    gen = torch.Generator().manual_seed(m * 7 + k)
    x, w, g = _blocky((m, k), gen), _blocky((n, k), gen) * 0.05, _blocky((m, n), gen).to(out_dtype)
    bias = torch.randn(n, generator=gen).to(out_dtype)
    emulated = _linear(EmulatedBackend(gemm_path("cpu")), scaling, x, w, bias, g, out_dtype, (FP32, FP32, FP32))
    monkeypatch.setattr(F, "scaled_mm", decode_scaled_mm)
    promoted = tuple(fp8lab.accumulation.HOPPER_PROMOTED for _ in range(3))
    hardware = _linear(ScaledMMBackend(), scaling, x, w, bias, g, out_dtype, promoted)
    return emulated, hardware


def _agree(ref: torch.Tensor, test: torch.Tensor, gemm_dtype) -> str | None:
    """fp32 GEMM outputs: within 1e-5 of max|ref|; bf16 ones: >= 99% bit-equal, and each
    within one bf16 ulp of itself plus that (a sum that cancels can round either side)."""
    assert ref.shape == test.shape and ref.dtype == test.dtype
    ref, test = ref.double(), test.double()
    err, slack = (ref - test).abs(), 1e-5 * ref.abs().max().item()
    if gemm_dtype == torch.float32:
        return None if err.max().item() <= slack else f"max error {err.max().item():.3g} > {slack:.3g}"
    equal = (ref == test).double().mean().item()
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)
    worst = (err / (ulp + slack)).max().item()
    return None if equal >= 0.99 and worst <= 1.0 else f"{equal:.2%} bit-equal, worst {worst:.2f} x (ulp + slack)"


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
@pytest.mark.parametrize("name", list(SCALINGS))
def test_blockwise_gemms_read_every_scale_where_torch_expects_it(name, shape, out_dtype, monkeypatch):
    emulated, hardware = _run_both(SCALINGS[name], shape, out_dtype, monkeypatch)
    for what, ref, test in zip(("output", "grad_x", "grad_w"), emulated, hardware, strict=True):
        why = _agree(ref, test, out_dtype)  # all three GEMMs round to the activation dtype
        assert why is None, f"{what}: {why}"


def test_a_planted_layout_bug_is_caught(monkeypatch):
    """K groups' scales in reverse order: the decoder accepts the layout, the numbers fail."""
    real = scaled_mm._block_scale

    def reversed_groups(group, *args):
        return real(group.flip(1), *args)

    monkeypatch.setattr(scaled_mm, "_block_scale", reversed_groups)
    emulated, hardware = _run_both(SCALINGS["x1-w2-g1"], (32, 768, 256), torch.float32, monkeypatch)
    assert _agree(emulated[0], hardware[0], torch.float32) is not None


def test_the_scaled_mm_backend_keeps_block_values_in_fp8():
    backend = ScaledMMBackend()
    x = torch.randn(4, 256)
    scale = torch.ones(4, 2)
    q = backend.quantize_blocks(x, (1, 128), scale, None, fp8lab.formats.E4M3)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    with pytest.raises(ValueError, match="scale_inv=None"):
        backend.quantize_blocks(x, (1, 128), scale, scale, fp8lab.formats.E4M3)


def test_the_accumulator_reference_dequantizes_block_operands():
    """The fp32 twin the accumulator telemetry compares against (log steps): the same exact
    values as the emulation's fp32 GEMM on dequantized operands, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(40, 256, generator=gen).to(torch.float8_e4m3fn)
    b = torch.randn(256, 48, generator=gen).to(torch.float8_e4m3fn)
    sa = torch.exp2(torch.randint(-5, 5, (40, 2), generator=gen).float())
    sb = torch.exp2(torch.randint(-5, 5, (2, 48), generator=gen).float())
    out = ScaledMMBackend().fp32_reference(a, b, None, None, torch.float32, group_scales=(sa, sb))
    deq_a = a.float() * sa.repeat_interleave(128, 1)
    deq_b = b.float() * sb.repeat_interleave(128, 0)
    path = gemm_path("cpu")
    want = fp8lab.gemm.exact.scaled_gemm(
        deq_a.to(path.operand_dtype), deq_b.to(path.operand_dtype), None, torch.float32, path=path
    )
    assert torch.equal(out, want)


def test_an_empty_blockwise_gemm_is_zeros_plus_bias_without_a_call(monkeypatch):
    def no_call(*args, **kwargs):
        raise AssertionError("F.scaled_mm called for an empty GEMM")

    monkeypatch.setattr(F, "scaled_mm", no_call)
    a = torch.empty(5, 0, dtype=torch.float8_e4m3fn)
    b = torch.empty(0, 48, dtype=torch.float8_e4m3fn).t().t()
    bias = torch.arange(48, dtype=torch.bfloat16)
    groups = (torch.ones(5, 0), torch.ones(0, 48))
    out = scaled_mm._block_gemm(a, b, torch.bfloat16, bias, groups, ((1, 128), (128, 128)))
    assert out.shape == (5, 48) and torch.equal(out, bias.expand(5, 48))
    empty = scaled_mm._block_gemm(a[:0], b, torch.float32, None, (groups[0][:0], groups[1]), ((1, 128), (128, 1)))
    assert empty.shape == (0, 48)
