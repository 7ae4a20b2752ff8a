"""The hardware model of a scaled GEMM, computed exactly on whatever machine this is.

What a Hopper/Ada GEMM computes through cuBLASLt or Transformer Engine: the operand
values (FP8, or bf16 for a BF16 GEMM) are multiplied exactly, the products accumulated in
fp32, the fp32 sum multiplied by ``inv_scale = scale_inv_a * scale_inv_b`` (fp32), the
bias added in fp32, and the result rounded once to the output dtype; an fp32 output keeps
fp32 precision.

Invariant: every path here computes that model. Paths differ in speed and in the order of
the fp32 accumulation, which no two GEMM libraries share (so results agree bit for bit
except where a different summation order moves an output across a rounding boundary).
A path is chosen once per process and device type (``gemm_path``) and named in
``fp8lab info`` and in ``describe``'s reasons:

- ``onednn-bf16`` (CPUs where oneDNN runs bf16 natively: AVX512_BF16 or AMX): oneDNN's
  bf16 GEMM through ``torch.addmm``, with ``inv_scale`` as its alpha and the bias as its
  C, both applied to the fp32 accumulator before its one rounding to bf16. Passing alpha
  reads the CPU scale tensor on the host: host memory, no copy and no sync (no accelerator
  path ever reads a tensor). Outputs of any other dtype take the ``fp32`` path.
- ``fp32`` (other CPUs, e.g. AVX2-only laptops, where a bf16 ``torch.mm`` runs ATen's
  scalar fallback at ~2 GFLOP/s): an fp32 GEMM on the exact operand values. A product of
  two FP8 or two bf16 values has at most 16 significant bits, so fp32 holds it exactly and
  an fp32 GEMM (FMA or not) accumulates exactly as the model says; scale, bias and the
  rounding follow as fp32 tensor ops.
- ``cuda``: cuBLAS bf16 GEMM with an fp32 output (``torch.mm(out_dtype=float32)``), or,
  on a torch without it, an fp32 GEMM, with TF32 and reduced-precision reductions switched
  off for the call (whatever the script set globally); a BF16 GEMM with a bf16 output is
  cuBLAS's own bf16 GEMM with the bias in its epilogue.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

PATHS = ("onednn-bf16", "fp32", "cuda")


@dataclass(frozen=True)
class GemmPath:
    """One exact way to run the hardware model on a device type.

    Attributes:
        name: one of ``PATHS``.
        operand_dtype: the dtype that holds operand values for this path (bf16 or fp32;
            both hold every FP8 and bf16 value exactly).
        reason: one line for ``info`` and ``describe``.
    """

    name: str
    operand_dtype: torch.dtype
    reason: str


def cpu_has_native_bf16() -> bool:
    """Whether torch's bf16 matmul on this CPU runs in oneDNN (AVX512_BF16 or AMX).

    This is the gate torch itself uses for bf16 ``torch.mm``; it follows
    ``ONEDNN_MAX_CPU_ISA`` (``=AVX2`` makes a native-BF16 CPU behave like an AVX2 one).
    """
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def _cuda_has_mm_out_dtype() -> bool:
    try:
        a = torch.ones(16, 16, dtype=torch.bfloat16, device="cuda")
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


@functools.cache
def gemm_path(device_type: str) -> GemmPath:
    """The fastest exact path on ``device_type`` ("cpu", "cuda", ...), chosen once per process."""
    if device_type == "cuda":
        if _cuda_has_mm_out_dtype():
            return GemmPath("cuda", torch.bfloat16, "exact GEMM: cuBLAS bf16 with fp32 output, scale and bias in fp32")
        return GemmPath("cuda", torch.float32, "exact GEMM: cuBLAS fp32 with TF32 off, on the exact operand values")
    if device_type == "cpu" and cpu_has_native_bf16():
        return GemmPath(
            "onednn-bf16", torch.bfloat16,
            "exact GEMM: oneDNN bf16 (native on this CPU), inverse scale and bias in its fp32 epilogue",
        )  # fmt: skip
    return GemmPath(
        "fp32", torch.float32,
        f"exact GEMM: fp32 on the exact operand values, as this {device_type.upper()} has no native bf16 GEMM",
    )  # fmt: skip


# The precisions of a GEMM without FP8 (the rounded backends), by name.
ROUNDED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@functools.cache
def rounded_gemm_path(device_type: str, precision: str) -> GemmPath:
    """The exact path of a GEMM whose operands are rounded to ``precision`` (no FP8).

    "bf16" takes ``gemm_path(device_type)``. "fp16" and "fp32" take an fp32 GEMM on the
    exact operand values (on CUDA with TF32 off): a product of two fp16 values has at most
    22 significant bits, so fp32 holds it exactly and accumulates as the model says; oneDNN
    has no fp16 GEMM on the CPUs this runs on, and ``onednn-bf16`` would round fp16 values.
    """
    if precision == "bf16":
        return gemm_path(device_type)
    if precision not in ROUNDED_DTYPES:
        raise ValueError(f"precision must be one of {tuple(ROUNDED_DTYPES)}, got {precision!r}")
    what = "the fp16 operand values (their products are exact in fp32)" if precision == "fp16" else "fp32 operands"
    if device_type == "cuda":
        return GemmPath("cuda", torch.float32, f"exact GEMM: cuBLAS fp32 with TF32 off, on {what}")
    return GemmPath("fp32", torch.float32, f"exact GEMM: fp32 on {what}")


def epilogue_bias(bias: torch.Tensor | None, out_dtype: torch.dtype, fp8: bool) -> torch.Tensor | None:
    """The bias as the GEMM epilogue receives it (Transformer Engine's rule).

    TE casts the bias to the activation dtype; an FP8 GEMM with fp32 output gets a bf16
    bias (cuBLASLt has no FP8 GEMM with an fp32 bias). The epilogue adds it in fp32.
    """
    if bias is None:
        return None
    if out_dtype in (torch.bfloat16, torch.float16):
        return bias.to(out_dtype)
    return bias.to(torch.bfloat16) if fp8 else bias.to(out_dtype)


_ZERO = {dtype: torch.zeros((), dtype=dtype) for dtype in (torch.bfloat16,)}


def _onednn_bf16(a, b, inv_scale, bias):
    # A CPU tensor's value is in host memory: reading it is a load, not a device copy.
    alpha = 1.0 if inv_scale is None else float(inv_scale)
    if bias is None:
        return torch.addmm(_ZERO[torch.bfloat16], a, b, beta=0, alpha=alpha)
    return torch.addmm(bias.to(torch.bfloat16), a, b, beta=1, alpha=alpha)


_CUDA_EXACT_FLAGS = ("allow_tf32", "allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction")


@contextlib.contextmanager
def _cuda_exact():
    """cuBLAS with fp32 accumulation throughout for the enclosed GEMMs: TF32 and reduced-
    precision split-K reductions off (torch's global switches, restored afterwards; they
    are host-side settings, so toggling them costs nothing on the device)."""
    matmul = torch.backends.cuda.matmul
    previous = [getattr(matmul, flag) for flag in _CUDA_EXACT_FLAGS]
    for flag in _CUDA_EXACT_FLAGS:
        setattr(matmul, flag, False)
    try:
        yield
    finally:
        for flag, value in zip(_CUDA_EXACT_FLAGS, previous):
            setattr(matmul, flag, value)


def _fp32_accumulator(a: torch.Tensor, b: torch.Tensor, path: GemmPath) -> torch.Tensor:
    if a.device.type == "cuda":
        with _cuda_exact():
            if path.operand_dtype == torch.bfloat16:
                return torch.mm(a.to(torch.bfloat16), b.to(torch.bfloat16), out_dtype=torch.float32)
            return torch.mm(a.float(), b.float())
    return torch.mm(a.float(), b.float())


def scaled_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    inv_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    *,
    path: GemmPath,
) -> torch.Tensor:
    """``round_to_out_dtype(fp32(a @ b) * inv_scale + bias)``: the hardware model.

    Args:
        a: (M, K) exact operand values (FP8 or bf16 values, held in any float dtype).
        b: (K, N) exact operand values (any strides).
        inv_scale: 0-dim float32 ``scale_inv_a * scale_inv_b``, or an (M, N)-broadcastable one
            (per-row and per-column scales), or None for 1.
        out_dtype: the dtype of the result (one rounding from fp32).
        bias: (N,) the epilogue's bias (see ``epilogue_bias``), added in fp32, or None.
        path: the path of this device (``gemm_path``).
    """
    per_element = inv_scale is not None and inv_scale.dim() > 0  # rowwise scales: the (M, N) epilogue below
    if path.name == "onednn-bf16" and out_dtype == torch.bfloat16 and not per_element:
        return _onednn_bf16(a.to(torch.bfloat16), b.to(torch.bfloat16), inv_scale, bias)
    if path.name == "cuda" and inv_scale is None and out_dtype == torch.bfloat16:
        # A BF16 GEMM with a bf16 output is cuBLAS's own: fp32 accumulation, the bias in its
        # fp32 epilogue, one rounding; no fp32 output to round again.
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        with _cuda_exact():
            return torch.mm(a16, b16) if bias is None else torch.addmm(bias.to(torch.bfloat16), a16, b16)
    return epilogue(_fp32_accumulator(a, b, path), inv_scale, out_dtype, bias)


def epilogue(
    acc: torch.Tensor, inv_scale: torch.Tensor | None, out_dtype: torch.dtype, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``round_to_out_dtype(acc * inv_scale + bias)``: the GEMM's epilogue on its fp32
    accumulator ``acc`` (a fresh (M, N) tensor, modified in place), the scale product and the
    bias each applied in fp32, then one rounding."""
    if inv_scale is not None:
        acc.mul_(inv_scale)
    if bias is not None:
        acc.add_(bias)  # bf16/fp16/fp32 bias values, promoted to fp32 exactly
    return acc if out_dtype == torch.float32 else acc.to(out_dtype)


def round_operand(x_hp: torch.Tensor, precision: str, path: GemmPath) -> torch.Tensor:
    """``x_hp`` rounded to ``precision`` ("bf16", "fp16", "fp32"; nearest even), held in the
    path's operand dtype (which holds every value of that precision exactly)."""
    return x_hp.to(ROUNDED_DTYPES[precision]).to(path.operand_dtype)
