"""The accumulator model's C kernel (``accumulate_kernel.c``), built and cached by ``fp8lab.native``
(source hash, flags, compiler and machine in the cache key; ISA and OpenMP flags as it says), called
through ctypes.

Invariant: building never raises: ``load_kernel`` returns the kernel or one line saying why there is
none, and the caller decides what to do about it.
"""

from __future__ import annotations

import ctypes
import dataclasses
from pathlib import Path

import torch

from fp8lab import native
from fp8lab.gemm.accumulate_torch import Steps

SOURCE = Path(__file__).with_name("accumulate_kernel.c")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A loaded build: the library, what it was built with and what it can do."""

    lib: ctypes.CDLL
    compiler: str  # the compiler's first --version line
    flags: tuple[str, ...]
    simd_bits: int  # 512 (AVX-512), 256 (AVX2) or 0 (generic path only)
    openmp: bool
    file: Path


def _load(lib: ctypes.CDLL, file: Path, compiler: str, flags: tuple[str, ...]) -> Kernel:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.fp8lab_accumulate.restype = ctypes.c_int
    c_int = ctypes.c_int
    lib.fp8lab_accumulate.argtypes = [
        ptr,
        c_int,
        i64,
        i64,
        ptr,
        c_int,
        i64,
        i64,
        i64,
        i64,
        i64,
        ptr,
        ptr,
        c_int,
        c_int,
        c_int,
        c_int,
        ptr,
        ptr,
        i64,
        ptr,
        i64,
        c_int,
        ctypes.c_float,
        ptr,
        c_int,
        ptr,
        c_int,
        c_int,
        c_int,
        ptr,
    ]
    for name in ("fp8lab_accum_simd_bits", "fp8lab_accum_openmp"):
        getattr(lib, name).restype = ctypes.c_int
    lib.fp8lab_accum_release.restype = None
    lib.fp8lab_accum_uses_simd.argtypes = [ctypes.c_int, ctypes.c_int]
    return Kernel(lib, compiler, flags, lib.fp8lab_accum_simd_bits(), bool(lib.fp8lab_accum_openmp()), file)


def load_kernel(compiler: str | None = None) -> tuple[Kernel | None, str]:
    """Build (or find in the cache) and load the kernel: ``(kernel, "")`` or ``(None, why not)``
    (``fp8lab.native.build``). ``compiler`` defaults to ``cc`` (or ``gcc``)."""
    return native.build(SOURCE, "accumulate", _load, compiler)


def release(kernel: Kernel) -> None:
    """Free the calling thread's scratch memory, which the kernel keeps between calls (a fresh page
    costs microseconds on a VM: per-call buffers tripled the time of a 2048x128x512 GEMM there)."""
    kernel.lib.fp8lab_accum_release()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def run(
    kernel: Kernel,
    a: torch.Tensor,
    b: torch.Tensor,
    fmt: tuple[int, int, int, int],
    vmax: tuple[float, float],
    steps: Steps,
    *,
    c0=None,
    sa=None,
    sb=None,
    inv: float | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    mode: int = 0,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """One call of the kernel: ``(out (M, N), (off-grid values of a, of b))``.

    ``a`` and ``b``: float32 or bfloat16 CPU tensors, any strides (the kernel's prepass converts and
    transposes them itself: torch's transposing copies cost more than the whole prepass). ``c0``
    (M, N) is made row-major; ``sa`` (M, G) and ``sb`` (G, N) must have a unit column stride.
    ``steps``: the instruction sequence (``accumulate_torch.Steps``; promote 0 is fast accumulation).
    The epilogue, in the kernel as the last K block is stored, each step in fp32: ``out = acc * inv``
    (if ``inv`` is not None) ``+ bias`` ((N,) fp32 or bf16, if given), then ``out_dtype`` (fp32, or bf16
    rounded to nearest even as torch rounds). Without them ``out`` is the accumulator itself.
    ``mode``: 0 the fastest exact path, 1 the generic path (both compute the same bits; tests hold each
    to the reference).
    """
    for x in (a, b) + (() if bias is None else (bias,)):
        if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
            raise ValueError(f"the kernel takes float32 or bfloat16 CPU tensors, got {x.dtype} on {x.device}")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the kernel writes float32 or bfloat16, not {out_dtype}")
    c0 = None if c0 is None else c0.contiguous()
    m, k = a.shape
    n = b.shape[1]
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be (N,) = ({n},), got {tuple(bias.shape)}")
    bias = None if bias is None else bias.contiguous()
    out = torch.empty(m, n, dtype=out_dtype)
    fmt_arr, vmax_arr = (ctypes.c_int * 4)(*fmt), (ctypes.c_float * 2)(*vmax)
    bad = (ctypes.c_int64 * 2)()
    status = kernel.lib.fp8lab_accumulate(
        a.data_ptr(),
        int(a.dtype == torch.bfloat16),
        a.stride(0),
        a.stride(1),
        b.data_ptr(),
        int(b.dtype == torch.bfloat16),
        b.stride(0),
        b.stride(1),
        m,
        n,
        k,
        fmt_arr,
        vmax_arr,
        steps.chunk,
        steps.frac,
        steps.promote,
        int(steps.desc),
        _ptr(c0),
        _ptr(sa),
        sa.stride(0) if sa is not None else 0,
        _ptr(sb),
        sb.stride(0) if sb is not None else 0,
        int(inv is not None),
        1.0 if inv is None else inv,
        _ptr(bias),
        int(bias is not None and bias.dtype == torch.bfloat16),
        out.data_ptr(),
        int(out_dtype == torch.bfloat16),
        torch.get_num_threads(),
        mode,
        bad,
    )
    if status != 0:
        raise MemoryError(f"fp8lab accumulate kernel: out of memory packing a ({m}x{k}) and b ({k}x{n})")
    return out, (bad[0], bad[1])
