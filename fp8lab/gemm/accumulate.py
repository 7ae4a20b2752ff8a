"""Hopper's FP8 tensor-core accumulator: the fp32 accumulator of an FP8 GEMM before its epilogue.

The model (MMA-Sim, arXiv 2511.10909; Khattak & Mikaitis, arXiv 2512.07004, Table 3; DeepSeek-V3
3.3.2). sm_90 ``wgmma`` with FP8 inputs takes ``chunk`` = 32 products per instruction; per output
element one instruction computes D = C + the sum of its products:

1. each product is exact: its exponent is the sum of its operands' exponents, its significand in
   [1, 4) is not renormalised (a subnormal operand takes its format's minimum exponent, -6 for E4M3
   and -14 for E5M2, with an unnormalised significand; a zero takes -126); C enters with its own
   fp32 exponent, clamped at -126;
2. every term, C included, is aligned to the largest exponent E;
3. each is truncated toward zero to a multiple of 2^(E - 13): no guard or sticky bits;
4. the truncated terms are added exactly;
5. the sum is normalised and truncated toward zero to 13 fraction bits (a zero sum is +0); stored
   as fp32 it is the next instruction's C. An instruction with an inf or NaN term gives the IEEE sum.

Over K (``Accumulator.kind``): "fast" chains the instructions (cuBLASLt FAST_ACCUM: Transformer
Engine's forward GEMM under delayed and current scaling); "promoted" adds the chained partial into
a second fp32 accumulator (fp32 add, round to nearest) every ``promote_every`` instructions and
restarts C at 0 (CUTLASS's ``mma_promotion_interval``: TE's dgrad and wgrad, all block-scaled GEMMs,
``torch._scaled_mm(use_fast_accum=False)``); with group scales the promotion is the FMA
``acc = fma(partial, fp32(sA * sB), acc)`` (DeepSeek-V3's 1x128 / 128x128 blocks; CUTLASS forms
sA * sB first when one of the two is constant over its tile, as with 128x128 weight blocks). "fp32"
is the ideal accumulator fp8lab modelled before (``fp8lab.gemm.exact``): a BLAS fp32 GEMM, order
unspecified; with group scales each group's fp32 sum is promoted as above.

Invariant: the "fast" and "promoted" results are defined bit for bit, and every implementation
computes exactly them (tests/test_accumulate.py holds them to an integer reference): the C kernel
(``accumulate_kernel.c``, SIMD or generic) or the pure-torch fallback, chosen once per process and
named by ``accumulate_path`` for ``fp8lab info``. NaN results compare as NaN (payloads not modelled).

``tensor_core_gemm`` is the whole GEMM of the hardware model, the epilogue included: the kernel applies
scale, bias and the output rounding as it stores each tile, bit for bit what ``fp8lab.gemm.exact.epilogue``
computes on the accumulator.

Cost: the C kernel runs at about a third of an fp32 GEMM's speed (pass 2 is four vector ops per 16
products where a GEMM needs one FMA); it keeps its scratch memory (about 8 bytes per element of a,
5 per element of b, 4 per output when a bf16 output spans several K blocks, for the largest call so
far) with the calling thread between calls, because a fresh page costs microseconds on a VM
(``accumulate_native.release`` frees it). Measured on the 2-core AVX-512 dev VM, 2048x512x128
promoted: SIMD kernel about 4.0 ms (67 GFLOP-equivalent/s), its generic scalar path (CPUs without
AVX2) 0.43 s, the pure-torch fallback 1.4 s.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch

from fp8lab.accumulation import Accumulator
from fp8lab.formats import FP8Format
from fp8lab.gemm import accumulate_native
from fp8lab.gemm.accumulate_torch import Steps, accumulate_torch, fma_fp32
from fp8lab.gemm.exact import epilogue

PATH_NAMES = ("c-avx512", "c-avx2", "c-generic", "torch")


@dataclass(frozen=True)
class AccumulatePath:
    """Which implementation runs the model: ``name`` in PATH_NAMES, ``reason`` one line for ``info``."""

    name: str
    reason: str


@functools.cache
def _kernel() -> tuple[accumulate_native.Kernel | None, str]:
    return accumulate_native.load_kernel()


@functools.cache
def accumulate_path() -> AccumulatePath:
    """The implementation of this process, chosen once: the C kernel, or (loudly, once) pure torch."""
    kernel, why = _kernel()
    if kernel is None:
        warnings.warn(
            f"fp8lab: the FP8 accumulator's C kernel is unavailable ({why}); using the pure-torch "
            f"model instead (the same bits, far slower)",
            RuntimeWarning,
            stacklevel=2,
        )
        return AccumulatePath("torch", f"FP8 accumulator model: pure torch (exact, slow), as {why}")
    name = {512: "c-avx512", 256: "c-avx2"}.get(kernel.simd_bits, "c-generic")
    threads = "OpenMP" if kernel.openmp else "one thread (the compiler has no OpenMP)"
    return AccumulatePath(
        name,
        f"FP8 accumulator model: C kernel, {name[2:]}, {threads}, built by {kernel.compiler} "
        f"with {' '.join(kernel.flags[4:]) or 'no ISA flags'}",
    )


def _operand(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` on the CPU as float32 or bfloat16 (the kernel reads both, any strides; other float dtypes
    are converted to float32, exactly for FP8 values)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a 2-D floating-point tensor, got {getattr(x, 'shape', type(x))}")
    x = x.detach().cpu()
    return x if x.dtype in (torch.float32, torch.bfloat16) else x.float()


def _grid(fmt: FP8Format) -> tuple[int, int, float]:
    """(minimum exponent, fraction bits, largest value) of an FP8 format."""
    emin, emax = int(math.log2(fmt.min_normal)), math.floor(math.log2(fmt.max))
    if not -19 <= emin <= emax <= 19:  # the kernel's int8 exponent codes cover FP8's range only
        raise ValueError(f"{fmt.name}: exponents {emin}..{emax} are outside the FP8 range the model takes")
    return emin, fmt.mantissa_bits, fmt.max


def _off_grid(x: torch.Tensor, fmt: FP8Format) -> int:
    """How many finite values of float32 ``x`` are not values of ``fmt`` (the kernel counts the same)."""
    emin, mbits, vmax = _grid(fmt)
    bits = x.view(torch.int32)
    biased = (bits >> 23) & 0xFF
    shift = 23 - mbits + (emin - (biased - 127)).clamp(min=0)
    low = bits & ((torch.ones_like(bits) << shift.clamp(max=31)) - 1)
    bad = (biased == 0) | (x.abs() > vmax) | (shift > 23) | (low != 0)
    return int((bad & (x != 0) & (biased != 255)).sum())


def _check(counts: tuple[int, int], a_format: FP8Format, b_format: FP8Format) -> None:
    for name, count, fmt in (("a", counts[0], a_format), ("b", counts[1], b_format)):
        if count:
            raise ValueError(
                f"{name} holds {count} values that are not {fmt.name.upper()} values; the model needs the "
                f"exact FP8 operand values (cast them first, e.g. fp8lab.quantize.cast_to_fp8_grid)"
            )


def _run(a, b, a_format, b_format, steps: Steps, *, c0, sa, sb, path: AccumulatePath, **epilogue):
    """One accumulation on float32 CPU tensors with the implementation ``path`` names; ``epilogue``
    (``inv``, ``bias``, ``out_dtype``: the C kernel's fused epilogue) only with the kernel."""
    (ea, ma, xa), (eb, mb, xb) = _grid(a_format), _grid(b_format)
    if path.name == "torch":
        a, b = a.float(), b.float()
        _check((_off_grid(a, a_format), _off_grid(b, b_format)), a_format, b_format)
        return accumulate_torch(a, b, (ea, eb), steps, c0=c0, sa=sa, sb=sb)
    kernel, why = _kernel()
    if kernel is None:
        raise RuntimeError(f"accumulate path {path.name!r} needs the C kernel, which is unavailable: {why}")
    mode = 1 if path.name == "c-generic" else 0
    out, counts = accumulate_native.run(
        kernel, a, b, (ea, ma, eb, mb), (xa, xb), steps, c0=c0, sa=sa, sb=sb, mode=mode, **epilogue
    )
    _check(counts, a_format, b_format)
    return out


def _fp32_kind(a, b, sa, sb, group_k: int, desc: bool) -> torch.Tensor:
    if sa is None:
        return torch.mm(a, b)
    out = torch.zeros(a.shape[0], b.shape[1])
    groups = range(sa.shape[1])
    for g in reversed(groups) if desc else groups:
        ks = slice(g * group_k, (g + 1) * group_k)
        out = fma_fp32(torch.mm(a[:, ks], b[ks]), sa[:, g : g + 1] * sb[g : g + 1], out)
    return out


def _inputs(a, b, acc: Accumulator, a_group_scale, b_group_scale):
    """(a, b, sa, sb): the operands on the CPU (``_operand``) with matching K, and the group scales
    checked (``_group_scales``)."""
    a, b = _operand(a, "a"), _operand(b, "b")
    (m, k), n = a.shape, b.shape[1]
    if b.shape[0] != k:
        raise ValueError(f"a is (M, K) = {tuple(a.shape)} but b is {tuple(b.shape)}, not (K, N) with K = {k}")
    return a, b, *_group_scales(a_group_scale, b_group_scale, m, n, -(-k // acc.group_k), acc)


def _steps(acc: Accumulator) -> Steps:
    """The instruction sequence of a "fast" or "promoted" accumulator."""
    promote = acc.promote_every if acc.kind == "promoted" else 0
    return Steps(acc.chunk, acc.fraction_bits, promote, acc.k_order == "descending")


def _group_scales(sa, sb, m: int, n: int, n_groups: int, acc: Accumulator):
    """The group scales as float32 CPU tensors, checked (both or neither; (M, G) and (G, N))."""
    if (sa is None) != (sb is None):
        raise ValueError("a_group_scale and b_group_scale come together: give both or neither")
    if sa is None:
        return None, None
    if acc.kind == "fast":
        raise ValueError("group scales are applied at promotions: Accumulator.kind must be 'promoted' or 'fp32'")
    sa, sb = sa.detach().to("cpu", torch.float32).contiguous(), sb.detach().to("cpu", torch.float32).contiguous()
    if tuple(sa.shape) != (m, n_groups) or tuple(sb.shape) != (n_groups, n):
        raise ValueError(
            f"group scales must be (M, G) = {(m, n_groups)} and (G, N) = {(n_groups, n)} with "
            f"G = ceil(K / {acc.group_k}), got {tuple(sa.shape)} and {tuple(sb.shape)}"
        )
    return sa, sb


def tensor_core_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_format: FP8Format,
    b_format: FP8Format,
    acc: Accumulator,
    inv_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    *,
    a_group_scale: torch.Tensor | None = None,
    b_group_scale: torch.Tensor | None = None,
    path: AccumulatePath | None = None,
) -> torch.Tensor:
    """``epilogue(tensor_core_accumulate(a, b, ...), inv_scale, out_dtype, bias)``, bit for bit: the
    whole FP8 GEMM of the hardware model. The C kernel applies the epilogue as it stores each tile
    (no fp32 (M, N) pass afterwards); other paths, split-K and other output dtypes run the two steps.

    Args:
        a, b, a_format, b_format, acc, a_group_scale, b_group_scale, path: as ``tensor_core_accumulate``.
        inv_scale: 0-dim float32 ``scale_inv_a * scale_inv_b`` (a CPU tensor), or None for 1.
        out_dtype: the output dtype (one rounding from fp32).
        bias: (N,) the epilogue's bias (``fp8lab.gemm.exact.epilogue_bias``), added in fp32, or None.
    """
    path = path or accumulate_path()
    fused = (
        acc.kind != "fp32"
        and acc.split_k == 1
        and path.name != "torch"
        and a.device.type == "cpu"
        and (inv_scale is None or inv_scale.device.type == "cpu")
        and (bias is None or bias.dtype in (torch.float32, torch.bfloat16))
    )
    if not fused:
        out = tensor_core_accumulate(
            a, b, a_format, b_format, acc, a_group_scale=a_group_scale, b_group_scale=b_group_scale, path=path
        )
        return epilogue(out, inv_scale, out_dtype, bias)
    a, b, sa, sb = _inputs(a, b, acc, a_group_scale, b_group_scale)
    kernel_dtype = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
    inv = None if inv_scale is None else float(inv_scale)  # a CPU tensor's value: a load, not a device copy
    out = _run(
        a,
        b,
        a_format,
        b_format,
        _steps(acc),
        c0=None,
        sa=sa,
        sb=sb,
        path=path,
        inv=inv,
        bias=bias,
        out_dtype=kernel_dtype,
    )
    return out if out.dtype == out_dtype else out.to(out_dtype)


def tensor_core_accumulate(
    a: torch.Tensor,
    b: torch.Tensor,
    a_format: FP8Format,
    b_format: FP8Format,
    acc: Accumulator,
    *,
    a_group_scale: torch.Tensor | None = None,
    b_group_scale: torch.Tensor | None = None,
    path: AccumulatePath | None = None,
) -> torch.Tensor:
    """The (M, N) fp32 accumulator the tensor cores hold for ``a @ b``, before the epilogue.

    Args:
        a: (M, K) exact ``a_format`` values (FP8 values held in fp32, bf16 or a float8 dtype; any strides).
        b: (K, N) exact ``b_format`` values. Neither carries its per-tensor scale: the caller's epilogue
            applies ``inv_scale`` and the bias (``fp8lab.gemm.exact``).
        acc: the accumulator model (``HOPPER_FAST``, ``HOPPER_PROMOTED``, ``FP32`` or your own).
        a_group_scale, b_group_scale: (M, G) and (G, N) float32 scales of K groups, G = ceil(K /
            acc.group_k), for block recipes: each promotion is ``fma(partial, sA * sB, acc)``. Both or neither;
            not with kind "fast".
        path: the implementation (default ``accumulate_path()``; tests force each).
    Returns a new float32 tensor on ``a``'s device; computed on the CPU (other devices are copied there).
    Raises ValueError for operands off their formats' grids ("fast" and "promoted" check, "fp32" does not).
    """
    device = a.device
    a, b, sa, sb = _inputs(a, b, acc, a_group_scale, b_group_scale)
    (m, k), n = a.shape, b.shape[1]
    n_groups = -(-k // acc.group_k)
    path = path or accumulate_path()
    desc = acc.k_order == "descending"
    per_slice = max(1, -(-n_groups // acc.split_k))
    out = None
    for g0 in range(0, n_groups, per_slice):  # split-K: slices of whole groups, added in fp32 in order
        g1 = min(n_groups, g0 + per_slice)
        ks = slice(g0 * acc.group_k, min(k, g1 * acc.group_k))
        sa_s, sb_s = (None, None) if sa is None else (sa[:, g0:g1], sb[g0:g1])
        if acc.kind == "fp32":
            part = _fp32_kind(a[:, ks].float(), b[ks].float(), sa_s, sb_s, acc.group_k, desc)
        else:
            part = _run(a[:, ks], b[ks], a_format, b_format, _steps(acc), c0=None, sa=sa_s, sb=sb_s, path=path)
        out = part if out is None else out + part
    if out is None:  # K == 0
        out = torch.zeros(m, n)
    return out if device.type == "cpu" else out.to(device)


def chain_instructions(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    a_format: FP8Format,
    b_format: FP8Format,
    *,
    chunk: int = 32,
    fraction_bits: int = 13,
    path: AccumulatePath | None = None,
) -> torch.Tensor:
    """Fast accumulation starting from the fp32 accumulator ``c`` (M, N) instead of zeros: with K <=
    ``chunk`` it is one instruction, D = C + sum of products, per output. For tests and analyses."""
    Accumulator(kind="fast", chunk=chunk, fraction_bits=fraction_bits)  # validates
    a, b = _operand(a, "a"), _operand(b, "b")
    c = c.detach().to("cpu", torch.float32)
    if b.shape[0] != a.shape[1] or tuple(c.shape) != (a.shape[0], b.shape[1]):
        raise ValueError(
            f"shapes must be a (M, K), b (K, N), c (M, N); got {tuple(a.shape)}, {tuple(b.shape)}, {tuple(c.shape)}"
        )
    steps = Steps(chunk, fraction_bits, 0, False)
    return _run(a, b, a_format, b_format, steps, c0=c, sa=None, sb=None, path=path or accumulate_path())
