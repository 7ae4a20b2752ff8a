"""Bugs planted on purpose in fp8lab's scaled_mm path, to show the fake-CUDA checks catch them.

Each entry is one defect a change to the GPU path could plausibly introduce, applied by
``planted(name)`` (a context manager, child process only) on top of the real code: it
replaces one helper of ``fp8lab.gemm.backends.scaled_mm`` (or one fact of
``fp8lab.gemm.backends.select``) with a wrapper that does the wrong thing, and restores it.
These wrappers reach into fp8lab internals on purpose (``_a_operand``, ``_b_operand``,
``HW_GEMM_MULTIPLE``, ``ScaledMMBackend.gemm``): a mutation test names what it mutates.

``EXPECTED`` says which check is expected to catch each bug: "meta" (torch's meta kernel, or
FakeTensorMode refusing a host read of a fake value, which a real GPU would do silently as
a sync) or "strict" (only ``tests.fake_cuda.strict_scaled_mm``: what CUDA refuses beyond
the meta kernel).
"""

from __future__ import annotations

import contextlib
import inspect

import torch

EXPECTED = {
    "b_not_relaid_out": "meta",  # B handed over row-major when no padding is needed
    "wgrad_padded_to_8": "meta",  # token dimension padded to 8, not 16
    "a_column_major": "meta",  # A re-laid out column-major
    "fp64_scales": "meta",  # inverse scales in float64
    "host_read_of_scale": "meta",  # float(scale) on the host: a sync on a real GPU
    "inner_dims_mismatch": "strict",  # wgrad's B over-padded by 16 rows: K of A != K of B
    "fp32_bias": "strict",  # bias handed to the epilogue in fp32
    "scales_on_cpu": "strict",  # inverse scales left on the CPU
    "e5m2_weight": "strict",  # weights cast to E5M2: dgrad is E5M2 x E5M2
    "misaligned_a": "strict",  # A a view 8 bytes into a padded buffer
    "fp8_on_sm80": "strict",  # select_backend lets sm_80 run torch._scaled_mm
}


@contextlib.contextmanager
def _patched(obj, name, value):
    old = inspect.getattr_static(obj, name)  # a staticmethod stays one when restored
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def planted(name: str):
    from fp8lab.formats import E5M2, Role
    from fp8lab.gemm.backends import scaled_mm as sm
    from fp8lab.gemm.backends import select
    from fp8lab.scaling.current import Float8CurrentScaling
    from fp8lab.scaling.delayed import DelayedScaling

    a_operand, b_operand, gemm = sm._a_operand, sm._b_operand, sm.ScaledMMBackend.gemm

    def wrap_gemm(change):
        return staticmethod(
            lambda a, b, a_inv, b_inv, out_dtype, bias=None, **kw: gemm(
                *change(a, b, a_inv, b_inv, out_dtype, bias), **kw
            )
        )

    if name == "b_not_relaid_out":
        patch = _patched(sm, "_b_operand", lambda b, k_pad: b if b.shape[0] == k_pad else b_operand(b, k_pad))
    elif name == "wgrad_padded_to_8":
        patch = _patched(sm, "HW_GEMM_MULTIPLE", 8)
    elif name == "a_column_major":
        patch = _patched(sm, "_a_operand", lambda a, k_pad: a_operand(a, k_pad).t().contiguous().t())
    elif name == "fp64_scales":
        patch = _patched(
            sm.ScaledMMBackend,
            "gemm",
            wrap_gemm(lambda a, b, ai, bi, o, bias: (a, b, ai.double(), bi.double(), o, bias)),
        )
    elif name == "host_read_of_scale":
        patch = _patched(
            sm.ScaledMMBackend,
            "gemm",
            wrap_gemm(lambda a, b, ai, bi, o, bias: (a, b, torch.tensor(float(ai), device=a.device), bi, o, bias)),
        )
    elif name == "inner_dims_mismatch":
        patch = _patched(
            sm, "_b_operand", lambda b, k_pad: b_operand(b, k_pad + 16) if k_pad != b.shape[0] else b_operand(b, k_pad)
        )
    elif name == "fp32_bias":
        patch = _patched(
            sm.ScaledMMBackend,
            "gemm",
            wrap_gemm(lambda a, b, ai, bi, o, bias: (a, b, ai, bi, o, None if bias is None else bias.float())),
        )
    elif name == "scales_on_cpu":
        patch = _patched(
            sm.ScaledMMBackend, "gemm", wrap_gemm(lambda a, b, ai, bi, o, bias: (a, b, ai.cpu(), bi.cpu(), o, bias))
        )
    elif name == "e5m2_weight":

        def format_for(self, role, _orig=DelayedScaling.format_for):
            return E5M2 if role == Role.WEIGHT else _orig(self, role)

        patch = contextlib.ExitStack()
        patch.enter_context(_patched(DelayedScaling, "format_for", format_for))
        patch.enter_context(_patched(Float8CurrentScaling, "format_for", format_for))
    elif name == "misaligned_a":

        def misaligned(a, k_pad):
            a = a_operand(a, k_pad)
            buf = torch.zeros(a.shape[0], a.shape[1] + 8, dtype=torch.uint8, device=a.device)[:, 8:]
            buf.copy_(a.view(torch.uint8))
            return buf.view(a.dtype)

        patch = _patched(sm, "_a_operand", misaligned)
    elif name == "fp8_on_sm80":
        patch = _patched(select, "FP8_MIN_CAPABILITY", (8, 0))
    else:
        raise KeyError(name)
    with patch:
        yield
