"""The scaled_mm backend: real float8 operands through ``torch._scaled_mm`` (per-tensor scales)
and ``torch.nn.functional.scaled_mm`` (Float8BlockScaling's 1x128 / 128x128 block scales).

Invariant: it receives scales (and their inverses) as inputs and never computes them;
``gemm`` returns ``round(fp32(a @ b) * (a_inv * b_inv) + bias)`` in the output dtype, the
hardware model of ``fp8lab.gemm.exact``, computed by cuBLASLt (with block scales: the sum
of each K group's products times its two block scales, see ``_block_gemm``). For users it runs on CUDA
with compute capability >= 8.9; tests also run it on CPU at small sizes (``select_backend``
never picks it there: torch's CPU kernel runs at a few hundredths of a GFLOP/s). Operands
are re-laid out and zero-padded to cuBLASLt's contract (see ``ScaledMMBackend``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fp8lab.accumulation import FP32, Accumulator
from fp8lab.formats import FP8Format
from fp8lab.gemm.backends.base import QuantizedGemmBackend
from fp8lab.gemm.exact import gemm_path, scaled_gemm
from fp8lab.gemm.hardware import HW_GEMM_MULTIPLE
from fp8lab.quantize.blocks import cast_blocks_fp8
from fp8lab.quantize.tensor import cast_to_fp8

BLOCK = 128  # the K group (and 2-D block side) of torch's blockwise GEMM


def _is_row_major(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and t.stride(0) > 1  # torch's meta_scaled_mm test, exactly


def _is_col_major(t: torch.Tensor) -> bool:
    return t.stride(0) == 1 and t.stride(1) > 1


def _row_major(t: torch.Tensor, cols: int, rows: int | None = None) -> torch.Tensor:
    """``t`` row-major as (rows, cols), zero columns (and rows) appended; ``t`` itself when it
    already is."""
    r, c = t.shape
    rows = r if rows is None else rows
    if c == cols and r == rows and _is_row_major(t):
        return t
    # Built through uint8 views: zero bits are +0.0 in both FP8 formats, and uint8
    # fill/copy kernels exist everywhere (float8 ones need not).
    grow = c < cols or r < rows
    out = (torch.zeros if grow else torch.empty)(rows, cols, dtype=torch.uint8, device=t.device)
    out[:r, :c].copy_(t.view(torch.uint8))
    return out.view(t.dtype)


def _a_operand(a: torch.Tensor, k_pad: int, m_pad: int | None = None) -> torch.Tensor:
    """A as cuBLASLt takes it: row-major (m_pad, k_pad), zero columns (and rows) appended."""
    return _row_major(a, k_pad, m_pad)


def _b_operand(b: torch.Tensor, k_pad: int, n_pad: int | None = None) -> torch.Tensor:
    """B as cuBLASLt takes it: column-major (k_pad, n_pad), zero rows (and columns) appended
    (the transpose of B^T made row-major); ``b`` itself when it already is."""
    if b.shape[0] == k_pad and n_pad in (None, b.shape[1]) and _is_col_major(b):
        return b
    return _row_major(b.t(), k_pad, n_pad).t()


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _block_scale(group: torch.Tensor, outer: int, outer_pad: int, outer_block: int, k_groups: int) -> torch.Tensor:
    """One operand's block scales in the layout of torch's blockwise GEMM (``ScaledBlas.cpp``,
    ``_scaled_block*``), from its per-group inverse scales ``group`` (outer, G), G = K/128
    groups along K, the scale repeated along the outer dimension within a block:

    - 1x128 tiles (``outer_block`` 1): (outer_pad, G) with strides (1, outer_pad), the rows
      past ``outer`` (zero padding) scaled by 1;
    - 128x128 blocks: (L4, outer_pad / 128) with strides (1, L4), L4 = G rounded up to a
      multiple of 4 (16-byte aligned columns), one entry per block (the padding entries 1).
    """
    if outer_block == 1:
        out = torch.ones(k_groups, outer_pad, dtype=torch.float32, device=group.device)
        out[:, :outer].copy_(group.t())
        return out.t()
    compact = group[::outer_block]  # (ceil(outer / 128), G): one row per block
    out = torch.ones(outer_pad // outer_block, _round_up(k_groups, 4), dtype=torch.float32, device=group.device)
    out[: compact.shape[0], :k_groups].copy_(compact)
    return out.t()


class ScaledMMBackend(QuantizedGemmBackend):
    """``torch._scaled_mm`` with per-tensor scales (torch 2.13 contract, see meta_scaled_mm);
    block-scaled operands go to ``_block_gemm`` instead.

    A must be row-major and B column-major; K (A's columns) and both dimensions of B must
    be multiples of 16; M is free; scales are float32 with one element; E5M2 x E5M2 is
    refused by cuBLASLt (never asked for: "hybrid" pairs E5M2 gradients with E4M3).
    fprop (x @ w^T) and dgrad (g @ w) have K, N in {in_features, out_features}, which
    select_backend guarantees are multiples of 16. The wgrad (g^T @ x) contracts over
    the token count M, which is dynamic: it is zero-padded to a multiple of 16 here
    (exact: zero rows add nothing), costing one copy of each operand when M % 16 != 0.
    The bias goes to cuBLASLt's epilogue (bf16/fp16 outputs); an fp32 output, for which
    cuBLASLt takes no bias, gets it added in fp32 afterwards, which is the same sum.
    """

    name = "scaled_mm"
    block_scales_in_gemm = True  # Float8BlockScaling through torch's blockwise GEMM

    @staticmethod
    def quantize(x_hp: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
        return cast_to_fp8(x_hp, scale, fmt)

    @staticmethod
    def fp8_values(codes: torch.Tensor) -> torch.Tensor:
        return codes  # torch._scaled_mm takes the codes themselves

    @staticmethod
    def quantize_blocks(x2d: torch.Tensor, block, scale, scale_inv, fmt: FP8Format) -> torch.Tensor:
        """The FP8 values of a block cast; the block scales go to the GEMM (``group_scales``),
        so there is no dequantized form to make here."""
        if scale_inv is not None:
            raise ValueError("the scaled_mm backend keeps block-scaled values in FP8: pass scale_inv=None")
        return cast_blocks_fp8(x2d, block, scale, fmt)

    def fp32_reference(self, a, b, a_inv, b_inv, out_dtype, bias=None, *, group_scales=(None, None), **_emulation):
        """The same GEMM on this device's exact fp32 path: block-scaled FP8 operands are
        dequantized first (exact: power-of-2 scales), per-tensor ones are not."""
        if group_scales == (None, None):
            return super().fp32_reference(a, b, a_inv, b_inv, out_dtype, bias)
        path = gemm_path(a.device.type)
        k = a.shape[1]
        a_deq = a.float() * group_scales[0].repeat_interleave(BLOCK, dim=1)[:, :k]
        b_deq = b.float() * group_scales[1].repeat_interleave(BLOCK, dim=0)[:k]
        return scaled_gemm(a_deq.to(path.operand_dtype), b_deq.to(path.operand_dtype), None, out_dtype, bias, path=path)

    @staticmethod
    def gemm(
        a,
        b,
        a_inv,
        b_inv,
        out_dtype: torch.dtype,
        bias=None,
        *,
        accumulator: Accumulator = FP32,
        group_scales=(None, None),
        blocks=(None, None),
        **_emulation,
    ):
        """cuBLASLt's FP8 GEMM; a "fast" accumulator is its FAST_ACCUM (``use_fast_accum``),
        any other its split accumulator, promoted at cuBLASLt's own (unpublished) interval:
        an ideal "fp32" accumulation does not exist on the hardware. Block-scaled operands
        (``group_scales`` and ``blocks`` given) go to torch's blockwise GEMM (``_block_gemm``);
        the operands' formats the emulation takes are not needed here."""
        if group_scales != (None, None):
            return _block_gemm(a, b, out_dtype, bias, group_scales, blocks)
        k_pad = -(-a.shape[1] // HW_GEMM_MULTIPLE) * HW_GEMM_MULTIPLE
        # Layout copies (1-byte data): dgrad's B = w (N, K) and both wgrad operands
        # (g^T, x) arrive row-major/transposed and are re-laid out here.
        a = _a_operand(a, k_pad)
        b = _b_operand(b, k_pad)
        mm_dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
        epilogue = bias if bias is not None and mm_dtype != torch.float32 else None
        out = torch._scaled_mm(
            a,
            b,
            scale_a=a_inv.reshape(()),
            scale_b=b_inv.reshape(()),
            bias=epilogue,
            out_dtype=mm_dtype,
            use_fast_accum=accumulator.kind == "fast",
        )
        if bias is not None and epilogue is None:
            out = out.add_(bias)
        return out if out.dtype == out_dtype else out.to(out_dtype)


def _block_gemm(a, b, out_dtype: torch.dtype, bias, group_scales, blocks) -> torch.Tensor:
    """``a @ b`` of block-scaled FP8 values through ``torch.nn.functional.scaled_mm`` with
    1x128 / 128x128 float32 scales (DeepSeek-style, cuBLASLt 12.9 on sm_90; the layouts of
    ``ScaledBlas.cpp``'s ``_scaled_block1x128_block1x128``, ``_block1x128_block128x128`` and
    ``_block128x128_block1x128``, see ``_block_scale``).

    Shapes are zero-padded (exact: zero rows and columns add nothing) so that torch's meta
    kernel, which sizes the scales with K // 128 and M // 128 (floor), and its CUDA kernel
    (ceil) agree: K to a multiple of 128, a 128x128-blocked dimension to a multiple of 128, A's
    rows otherwise to a multiple of 4 (16-byte aligned scale columns) and B's columns to 16.
    The output is cut back to (M, N). Never fast accumulation (cuBLASLt refuses it here). An
    empty GEMM (M, N or K zero: no tokens) makes no call: its sum is zero (+ bias), and torch's
    meta and CUDA kernels disagree on the scale strides of an empty operand."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0 or k == 0:
        out = torch.zeros(m, n, dtype=out_dtype, device=a.device)
        return out if bias is None else out.add_(bias)
    (a_block, b_block), (a_group, b_group) = blocks, group_scales
    a_outer, b_outer = a_block[0], b_block[1]  # 1: 1x128 tiles, 128: 128x128 blocks
    k_pad = _round_up(k, BLOCK)
    m_pad = _round_up(m, BLOCK if a_outer == BLOCK else 4)
    n_pad = _round_up(n, BLOCK if b_outer == BLOCK else HW_GEMM_MULTIPLE)
    groups = k_pad // BLOCK
    scale_a = _block_scale(a_group, m, m_pad, a_outer, groups)
    scale_b = _block_scale(b_group.t(), n, n_pad, b_outer, groups)
    kinds = {1: F.ScalingType.BlockWise1x128, BLOCK: F.ScalingType.BlockWise128x128}
    mm_dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
    epilogue = bias if bias is not None and mm_dtype != torch.float32 else None
    if epilogue is not None and n_pad != n:
        epilogue = torch.nn.functional.pad(epilogue, (0, n_pad - n))
    out = F.scaled_mm(
        _a_operand(a, k_pad, m_pad),
        _b_operand(b, k_pad, n_pad),
        scale_a,
        kinds[a_outer],
        scale_b,
        kinds[b_outer],
        bias=epilogue,
        output_dtype=mm_dtype,
        use_fast_accum=False,
    )
    if m_pad != m or n_pad != n:
        out = out[:m, :n].contiguous()
    if bias is not None and epilogue is None:
        out = out.add_(bias)
    return out if out.dtype == out_dtype else out.to(out_dtype)
