"""A strict ``torch._scaled_mm``: what CUDA refuses that torch's meta kernel lets through.

Invariant: ``refusal(...)`` is a pure function of tensor metadata (dtype, shape, strides,
storage offset, device) and of the device (compute capability, cuBLAS version); it returns
the first rule a call breaks, as CUDA would report it, or None. ``StrictScaledMM`` is a
dispatch mode that applies it to every ``aten._scaled_mm`` call made under it (forward and
backward: modes reach autograd's worker threads), records each call, then lets the call
through to the mode below (FakeTensorMode: torch's own ``meta_scaled_mm`` checks).

Sources, read for torch 2.13 (the meta kernel from the installed wheel's
``torch/_meta_registrations.py``; the CUDA side from pytorch's
``aten/src/ATen/native/cuda/ScaledBlas.cpp`` ``_scaled_mm_out_cuda``/``get_joint_scaling``,
``cuBlasCommonArgs.h``, ``ATen/cuda/CUDABlas.cpp`` ``scaled_gemm`` and
``CUDABlasUtils``' ``cublasLtMatmulScaleMode``, at the newest stored commit; see
/work/notes/gpu.md for the commit) and cuBLASLt's documented FP8 requirements:

  R-arch     compute capability 8.9 or >= 9.0 (``scaled_mm_arch_allowed``)
  R-2d       both operands 2-D
  R-inner    mat1.size(1) == mat2.size(0)                       [meta: not checked]
  R-scaling  tensorwise (fp32 scalars), rowwise ((M,1), (1,N) fp32 contiguous) or
             blockwise 1x128 / 128x128 with the strides of ``get_joint_scaling``
             (1x128: outer-dim-major; 128x128: inner-dim-major)  [meta: shapes only]
  R-result   scale_result, if any, is a float32 scalar
  R-bias     bias numel == N; no bias with a float32 output; bias bf16 or fp16; bf16
             output needs a bf16 bias, fp16 output an fp16 bias  [meta: not checked]
  R-16       K % 16 == 0, both dims of mat2 % 16 == 0
  R-dtype    float8 operands; not e5m2 x e5m2                   [meta: e5m2 pair passes]
  R-device   out, mat1, mat2, bias, scales, scale_result on one CUDA device (checkAllSameGPU)
             [meta: CPU scales pass]
  (M, K or N == 0: CUDA returns here, before any of the rules below)
  R-rowwise  rowwise on sm < 9.0 or cuBLAS < 12.9 goes to CUTLASS: bf16/fp16/fp32 out
  R-block    blockwise needs sm_90 (``_check_deepseek_support``) and cuBLAS >= 12.9
             (``cublasLtMatmulScaleMode``), and refuses ``use_fast_accum``; block scale
             strides 16-byte aligned (torch's v2 pads 128x128 scales to a multiple of 4
             rows; TE pads 1x128 scales to a multiple of 4): conservative, cuBLASLt's
             own refusal is not visible in torch's source
  R-layout   A row-major, B column-major ('t','n' to cuBLASLt; meta checks it too)
  R-align    cuBLASLt FP8: A, B (and the output) 16-byte aligned pointers (storage offset x
             itemsize; allocations are 512-byte aligned), leading dimensions multiples of
             16 bytes                                           [meta: not checked]

``refusal_v2`` does the same for ``torch._scaled_mm_v2`` (``torch.nn.functional.scaled_mm``,
``_scaled_mm_cuda_v2_out``), for the FP8 blockwise pairs fp8lab calls it with: the same
rules, in that function's order (empty shapes first), with R-scaling as the pair's
``_scaled_block*`` function checks it: A 1x128 scales (M, ceil(K/128)) strides (1, M), B 1x128
(N, ceil(K/128)) strides (1, N), a 128x128 side (L4, ceil(outer/128)) strides (1, L4) with
L4 = ceil(K/128) rounded up to a multiple of 4. torch's meta kernel for it sizes the same
scales with floor divisions (K // 128, M // 128): fp8lab pads the shapes so both agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
ALIGN = 16  # bytes


class CudaRefusal(RuntimeError):
    """A ``torch._scaled_mm`` call that CUDA (torch's CUDA kernel or cuBLASLt) would refuse."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _size_stride(scale: torch.Tensor, dim: int, size: int, stride: int) -> bool:
    """ScaledBlas.cpp ``check_size_stride``: a dimension of size <= 1 has a free stride."""
    return scale.size(dim) == size and (size <= 1 or scale.stride(dim) == stride)


def _is_1x128(t: torch.Tensor, s: torch.Tensor) -> bool:
    return (
        t.dtype in FP8
        and s.dtype == torch.float32
        and s.dim() == 2
        and _size_stride(s, 0, t.size(0), 1)
        and _size_stride(s, 1, _cdiv(t.size(1), 128), t.size(0))
    )


def _is_128x128(t: torch.Tensor, s: torch.Tensor) -> bool:
    return (
        t.dtype in FP8
        and s.dtype == torch.float32
        and s.dim() == 2
        and _size_stride(s, 0, _cdiv(t.size(0), 128), _cdiv(t.size(1), 128))
        and _size_stride(s, 1, _cdiv(t.size(1), 128), 1)
    )


def _is_tensorwise(t, s) -> bool:
    return t.dtype in FP8 and s.dtype == torch.float32 and s.numel() == 1


def _is_rowwise(t, s) -> bool:
    return (
        t.dtype in FP8
        and s.dtype == torch.float32
        and s.dim() == 2
        and s.size(0) == t.size(0)
        and s.size(1) == 1
        and s.is_contiguous()
    )


_KINDS = {"tensorwise": _is_tensorwise, "rowwise": _is_rowwise, "1x128": _is_1x128, "128x128": _is_128x128}
# get_joint_scaling's order (fp8 pairs only; 1x32 and 1x16 are MXFP8/NVFP4, not modelled here)
_PAIRS = (
    ("tensorwise", "tensorwise"),
    ("rowwise", "rowwise"),
    ("128x128", "1x128"),
    ("1x128", "128x128"),
    ("1x128", "1x128"),
)


def scaling_kinds(mat1, mat2, scale_a, scale_b) -> tuple[str, str] | None:
    """(kind of A's scale, kind of B's scale) as ``get_joint_scaling`` decides, or None."""
    for lhs, rhs in _PAIRS:
        if _KINDS[lhs](mat1, scale_a) and _KINDS[rhs](mat2.t(), scale_b.t()):
            return lhs, rhs
    return None


def _ptr_aligned(t: torch.Tensor) -> bool:
    return (t.storage_offset() * t.element_size()) % ALIGN == 0


def _arch(cap: tuple[int, int]) -> str | None:
    if not (cap == (8, 9) or cap >= (9, 0)):
        return (
            f"R-arch: torch._scaled_mm is only supported on compute capability >= 9.0 or 8.9, got sm_{cap[0]}{cap[1]}"
        )
    return None


def _operands(mat1, mat2, bias, out, tensors: dict) -> str | None:
    """R-16, R-dtype, R-bias, R-device: the checks both entry points make before the kernel."""
    if mat1.size(1) % 16 or mat2.size(0) % 16 or mat2.size(1) % 16:
        return f"R-16: K and both dims of mat2 must be divisible by 16, got {tuple(mat1.shape)} @ {tuple(mat2.shape)}"
    if mat1.dtype not in FP8 or mat2.dtype not in FP8:
        return f"R-dtype: expected float8 operands, got {mat1.dtype} and {mat2.dtype}"
    if mat1.dtype == torch.float8_e5m2 and mat2.dtype == torch.float8_e5m2:
        return "R-dtype: multiplication of two Float8_e5m2 matrices is not supported"
    if bias is not None:
        if out == torch.float32:
            return "R-bias: bias is not supported when out_dtype is set to Float32"
        if bias.dtype not in (torch.bfloat16, torch.float16):
            return f"R-bias: bias must be BFloat16 or Half, but got {bias.dtype}"
        if out == torch.bfloat16 and bias.dtype != torch.bfloat16:
            return f"R-bias: bias must be BFloat16 to compute {out} output, but got {bias.dtype}"
        if out == torch.float16 and bias.dtype != torch.float16:
            return f"R-bias: bias must be Float16 to compute {out} output, but got {bias.dtype}"
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if any(d.type != "cuda" for d in devices.values()) or len(set(devices.values())) > 1:
        return f"R-device: expected all tensors on one CUDA device, got {devices}"
    return None


def _blockwise(cap, cublas, use_fast_accum, scales: dict) -> str | None:
    """R-block: DeepSeek-style scaling's device, library, accumulation and scale alignment."""
    if cap[0] != 9:
        return (
            f"R-block: DeepSeek style (1x128, 128x128) scaling only supported in CUDA for SM90, got sm_{cap[0]}{cap[1]}"
        )
    if cublas < (12, 9):
        return f"R-block: 1x128/128x128 blockwise scaling is only supported for CUDA 12.9 and above, got {cublas}"
    if use_fast_accum:
        return "R-block: scaled_gemm doesn't support fast accum with blockwise scaling"
    for name, s in scales.items():
        outer = max(s.stride())
        if s.numel() > 1 and (outer * s.element_size()) % ALIGN:
            return f"R-block: {name} stride {s.stride()} is not 16-byte aligned"
    return None


def _layout(mat1, mat2) -> str | None:
    """R-layout, R-align: what cuBLASLt takes (``cublasCommonArgs``, its FP8 requirements)."""
    if not (mat1.stride(1) == 1 and mat1.stride(0) > 1) or not (mat2.stride(0) == 1 and mat2.stride(1) > 1):
        return f"R-layout: only row-major x column-major is supported, got strides {mat1.stride()} and {mat2.stride()}"
    for name, t, ld in (("mat1", mat1, mat1.stride(0)), ("mat2", mat2, mat2.stride(1))):
        if not _ptr_aligned(t):
            return f"R-align: {name} data pointer is not 16-byte aligned (storage offset {t.storage_offset()})"
        if (ld * t.element_size()) % ALIGN:
            return f"R-align: {name} leading dimension {ld} is not a multiple of 16 bytes"
    return None


def refusal(
    mat1,
    mat2,
    scale_a,
    scale_b,
    bias=None,
    scale_result=None,
    out_dtype=None,
    use_fast_accum=False,
    *,
    capability: tuple[int, int],
    cublas: tuple[int, int] = (12, 9),
) -> str | None:
    """The first CUDA rule (module docstring) that ``torch._scaled_mm(...)`` breaks, or None."""
    cap = tuple(capability)
    if (why := _arch(cap)) is not None:
        return why
    if mat1.dim() != 2 or mat2.dim() != 2:
        return "R-2d: mat1 and mat2 must be matrices"
    if mat1.size(1) != mat2.size(0):
        return (
            f"R-inner: mat1 and mat2 shapes cannot be multiplied ({mat1.size(0)}x{mat1.size(1)} and "
            f"{mat2.size(0)}x{mat2.size(1)})"
        )
    kinds = scaling_kinds(mat1, mat2, scale_a, scale_b)
    if kinds is None:
        return (
            f"R-scaling: invalid scaling configuration: scale_a {scale_a.dtype} {tuple(scale_a.shape)} stride "
            f"{scale_a.stride()}, scale_b {scale_b.dtype} {tuple(scale_b.shape)} stride {scale_b.stride()}"
        )
    if scale_result is not None and not (scale_result.numel() == 1 and scale_result.dtype == torch.float32):
        return "R-result: scale_result must be a float scalar"
    out = out_dtype if out_dtype is not None else mat1.dtype
    if bias is not None and bias.numel() != mat2.size(1):
        return f"R-bias: bias must be size {mat2.size(1)} but got {bias.numel()}"
    tensors = {
        "mat1": mat1,
        "mat2": mat2,
        "scale_a": scale_a,
        "scale_b": scale_b,
        "bias": bias,
        "scale_result": scale_result,
    }
    if (why := _operands(mat1, mat2, bias, out, tensors)) is not None:
        return why
    m, k, n = mat1.size(0), mat1.size(1), mat2.size(1)
    if m == 0 or k == 0 or n == 0:
        return None  # CUDA returns an empty (or zero-filled) output here
    if kinds == ("rowwise", "rowwise") and (cap[0] < 9 or cublas < (12, 9)):
        if out not in (torch.bfloat16, torch.float16, torch.float32):
            return "R-rowwise: only bf16, fp16 and fp32 outputs are supported for row-wise scaling"
    if "1x128" in kinds or "128x128" in kinds:
        if (why := _blockwise(cap, cublas, use_fast_accum, {"scale_a": scale_a, "scale_b": scale_b})) is not None:
            return why
    return _layout(mat1, mat2)


# torch.nn.functional.ScalingType's values (the ints ``aten._scaled_mm_v2`` receives)
V2_KINDS = {0: "tensorwise", 1: "rowwise", 2: "1x16", 3: "1x32", 4: "1x128", 5: "128x128"}


def _v2_block_scales(kinds, m: int, k: int, n: int, sa, sb) -> str | None:
    """The scale shapes and strides of ``ScaledBlas.cpp``'s ``_scaled_block1x128_block1x128``,
    ``_scaled_block1x128_block128x128`` and ``_scaled_block128x128_block1x128`` (ceil
    divisions; 128x128 scales padded to L4 = round_up(ceil(K/128), 4) along K)."""
    kb, l4 = _cdiv(k, 128), _cdiv(_cdiv(k, 128), 4) * 4

    def fits(s, rows: int, cols: int, stride1: int) -> bool:
        return (
            s.dtype == torch.float32
            and s.dim() == 2
            and tuple(s.shape) == (rows, cols)
            and s.stride(0) == 1
            and (s.stride(1) == stride1 or (cols == 1 and s.stride(1) == 1))
        )

    want = {
        ("1x128", "1x128"): ((m, kb, m), (n, kb, n)),
        ("1x128", "128x128"): ((m, kb, m), (l4, _cdiv(n, 128), l4)),
        ("128x128", "1x128"): ((l4, _cdiv(m, 128), l4), (n, kb, n)),
    }.get(tuple(kinds))
    if want is None:
        return f"R-scaling: the pair {kinds} is not one of the blockwise FP8 pairs modelled here"
    for name, s, (rows, cols, stride1) in (("scale_a", sa, want[0]), ("scale_b", sb, want[1])):
        if not fits(s, rows, cols, stride1):
            return (
                f"R-scaling: for {kinds[0]} x {kinds[1]} scaling {name} must be float32 ({rows}, {cols}) with "
                f"strides (1, {stride1}); got {s.dtype} {tuple(s.shape)} strides {s.stride()}"
            )
    return None


def refusal_v2(
    mat1,
    mat2,
    scale_a,
    recipe_a,
    swizzle_a,
    scale_b,
    recipe_b,
    swizzle_b,
    bias=None,
    out_dtype=None,
    contraction_dim=(),
    use_fast_accum=False,
    *,
    capability: tuple[int, int],
    cublas: tuple[int, int] = (12, 9),
) -> str | None:
    """The first CUDA rule that ``torch._scaled_mm_v2`` (``torch.nn.functional.scaled_mm``)
    breaks, for the FP8 blockwise pairs (``_scaled_mm_cuda_v2_out`` then the pair's
    ``_scaled_block*`` function, then ``_scaled_gemm``), or None. Other recipes are refused as
    not modelled (fp8lab makes no such call)."""
    cap = tuple(capability)
    if (why := _arch(cap)) is not None:
        return why
    if mat1.dim() != 2 or mat2.dim() != 2 or mat1.size(1) != mat2.size(0):
        return f"R-inner: mat1 {tuple(mat1.shape)} and mat2 {tuple(mat2.shape)} cannot be multiplied"
    m, k, n = mat1.size(0), mat1.size(1), mat2.size(1)
    kinds = tuple(V2_KINDS.get(int(r), str(r)) for r in (*recipe_a, *recipe_b))
    if len(scale_a) != 1 or len(scale_b) != 1 or len(kinds) != 2 or contraction_dim:
        return f"R-scaling: one scale and recipe per operand, no contraction_dim, is what is modelled; got {kinds}"
    if m == 0 or k == 0 or n == 0:
        return None  # CUDA returns here, zero-filling the output when K == 0
    out = out_dtype if out_dtype is not None else torch.bfloat16
    tensors = {"mat1": mat1, "mat2": mat2, "scale_a": scale_a[0], "scale_b": scale_b[0], "bias": bias}
    if (why := _operands(mat1, mat2, bias, out, tensors)) is not None:
        return why
    if (why := _v2_block_scales(kinds, m, k, n, scale_a[0], scale_b[0])) is not None:
        return why
    if any(int(z) != 0 for z in (*swizzle_a, *swizzle_b)):
        return "R-scaling: blockwise 1x128/128x128 scales are not swizzled"
    if (why := _blockwise(cap, cublas, use_fast_accum, {"scale_a": scale_a[0], "scale_b": scale_b[0]})) is not None:
        return why
    return _layout(mat1, mat2)


@dataclass
class Call:
    """One ``_scaled_mm`` call: what fp8lab asked of cuBLASLt."""

    shapes: tuple
    strides: tuple
    dtypes: tuple
    scaling: tuple[str, str] | None
    out_dtype: str
    bias: str | None
    fast_accum: bool


@dataclass
class StrictScaledMM(TorchDispatchMode):
    """Raise ``CudaRefusal`` on a ``_scaled_mm`` or ``_scaled_mm_v2`` call CUDA would refuse;
    record every call.

    Any other scaled GEMM op (``_scaled_grouped_mm``, ...) raises: its CUDA rules are not
    modelled here, so a call to it would go unchecked.
    """

    capability: tuple[int, int] = (9, 0)
    cublas: tuple[int, int] = (12, 9)
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self):
        super().__init__()

    def _record(self, bound: dict, kinds) -> None:
        mat1, mat2, bias = bound["mat1"], bound["mat2"], bound.get("bias")
        self.calls.append(
            Call(
                (tuple(mat1.shape), tuple(mat2.shape)),
                (mat1.stride(), mat2.stride()),
                (str(mat1.dtype), str(mat2.dtype)),
                kinds,
                str(bound.get("out_dtype") or mat1.dtype),
                None if bias is None else str(bias.dtype),
                bool(bound.get("use_fast_accum", False)),
            )
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten._scaled_mm.default, aten._scaled_mm.out):
            names = ("mat1", "mat2", "scale_a", "scale_b", "bias", "scale_result", "out_dtype", "use_fast_accum")
            bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
            why = refusal(**bound, capability=self.capability, cublas=self.cublas)
            if why is not None:
                raise CudaRefusal(f"CUDA would refuse this torch._scaled_mm: {why}")
            kinds = scaling_kinds(bound["mat1"], bound["mat2"], bound["scale_a"], bound["scale_b"])
            self._record(bound, kinds)
        elif func == aten._scaled_mm_v2.default:
            names = (
                "mat1",
                "mat2",
                "scale_a",
                "recipe_a",
                "swizzle_a",
                "scale_b",
                "recipe_b",
                "swizzle_b",
                "bias",
                "out_dtype",
                "contraction_dim",
                "use_fast_accum",
            )
            bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
            why = refusal_v2(**bound, capability=self.capability, cublas=self.cublas)
            if why is not None:
                raise CudaRefusal(f"CUDA would refuse this torch._scaled_mm_v2: {why}")
            self._record(bound, tuple(V2_KINDS[int(r)] for r in (*bound["recipe_a"], *bound["recipe_b"])))
        elif "scaled" in func.name() and ("_mm" in func.name()):
            raise CudaRefusal(f"{func.name()}: its CUDA rules are not modelled by tests.fake_cuda.strict_scaled_mm")
        return func(*args, **kwargs)
