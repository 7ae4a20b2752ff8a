"""Casting a tensor onto the FP8 grid block by block, with the block scales it is given.

Invariant: like ``fp8lab.quantize.tensor``, casting takes scales as inputs and never computes
them (the block recipes in ``fp8lab.scaling`` do); it takes the blocks' amaxes
(``blocks_amax``: ``fmaxf`` over each block's magnitudes, NaN ignored, inf counted, as TE's
kernels; a block at the tensor's edge covers only the elements that exist). Every block of a 2-D tensor is
multiplied by its scale in float32, clamped to +-fp8_max, rounded to nearest even on the
FP8 grid, and multiplied by its scale_inv: with power-of-2 scales (the only ones fp8lab's
block recipes make) the result is the exact value the hardware's GEMM multiplies, held in
bf16 or float32, so a plain GEMM on it is the hardware model.

A block is a shape over a 2-D tensor: (1, 128) tiles along the last dim, (128, 1) along
dim 0, (128, 128) squares; (1, 32), (32, 1) and (32, 32) for MXFP8.
"""

from __future__ import annotations

import ctypes

import torch

from fp8lab.formats import FP8Format
from fp8lab.quantize import block_cast_native
from fp8lab.quantize.tensor import CPU_CHUNK, amaxes_of, round_fp32_to_fp8_grid_

BLOCK_STAT_NAMES = (
    "block_scale_log2_min",
    "block_scale_log2_median",
    "block_scale_log2_max",
    "blocks_underflow_pct",
    "blocks_saturated_pct",
)


def transposed(x2d: torch.Tensor) -> bool:
    """Whether ``x2d`` is the transpose of a contiguous tensor (the backward's copies). Block
    work on it runs on that contiguous tensor with the block shape swapped: reductions and
    passes over a column-major view are many times slower on CPU."""
    return not x2d.is_contiguous() and x2d.t().is_contiguous()


def padded_blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """x (R, C) zero-padded to whole blocks and viewed as (R/br, br, C/bc, bc)."""
    br, bc = block
    r, c = x.shape
    pad_r, pad_c = -r % br, -c % bc
    if pad_r or pad_c:
        x = torch.nn.functional.pad(x, (0, pad_c, 0, pad_r))
    return x.reshape((r + pad_r) // br, br, (c + pad_c) // bc, bc)


def blocks_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fmaxf(|x|) of every block: (ceil(R/br), ceil(C/bc)) float32 (NaN elements ignored, inf counted).

    |x| and its maxima are exact in x's own dtype, so no float32 copy is made. A NaN
    element makes its block's plain maximum NaN; on CPU the NaN-ignoring pass runs only
    then (reading the result is a load from host memory), elsewhere always (no host read).
    The transpose of a contiguous tensor (the backward's copies) is reduced in its
    contiguous layout, with the block shape swapped (13x faster on CPU at 2048x3072).
    """
    if transposed(x):
        return blocks_amax(x.t(), block[::-1]).t()
    if block_cast_native.readable(x) and (k := block_cast_native.kernel()) is not None:
        return block_cast_native.block_amax(k, x, block)  # one pass, the same values
    return _blocks_amax_torch(x, block)


def blocks_amax_and_raw(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(``blocks_amax(x, block)``, x's raw amax: max|x| with NaN propagating, 0-dim float32, the
    value of ``amaxes_of(x)[0]`` up to the sign of a zero, so non-finite exactly when x holds NaN
    or inf: what a training cast counts its faults from). Where the C kernel reads x, one pass
    (it counts NaN elements as it takes the maxima) and the largest block amax; else two passes."""
    if transposed(x):
        amax, raw = blocks_amax_and_raw(x.t(), block[::-1])
        return amax.t(), raw
    if block_cast_native.readable(x) and (k := block_cast_native.kernel()) is not None:
        nans = ctypes.c_int64(0)
        amax = block_cast_native.block_amax(k, x, block, nans)
        if nans.value:
            return amax, torch.tensor(float("nan"))
        return amax, amax.amax() if amax.numel() else torch.zeros(())
    return blocks_amax(x, block), amaxes_of(x)[0]


def _blocks_amax_torch(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``blocks_amax`` in torch operations (devices, dtypes and layouts the C kernel does not read)."""
    magnitude = padded_blocks(x.abs(), block)
    amax = _block_max(magnitude) if x.device.type == "cpu" else None
    if amax is None or bool(torch.isnan(amax).any()):
        amax = _block_max(magnitude.nan_to_num(nan=0.0, posinf=float("inf")))
    return amax.float()


def _block_max(blocks: torch.Tensor) -> torch.Tensor:
    """(R/br, br, C/bc, bc) -> (R/br, C/bc): the contiguous dim first, size-1 dims dropped
    (one reduction over both dims, or over a dim of 1, is a slow extra pass on CPU)."""
    m = blocks.amax(dim=3) if blocks.shape[3] > 1 else blocks.squeeze(3)
    return m.amax(dim=1) if m.shape[1] > 1 else m.squeeze(1)


def _per_block(t: torch.Tensor) -> torch.Tensor:
    return t[:, None, :, None]  # (R/br, C/bc) -> broadcast over (R/br, br, C/bc, bc)


def cast_blocks_dequantized(
    x2d: torch.Tensor,
    block: tuple[int, int],
    scale: torch.Tensor,
    scale_inv: torch.Tensor,
    fmt: FP8Format,
    *,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The dequantized FP8 values of ``x2d`` (R, C) cast block by block, in ``dtype``.

    Each element: ``x * scale`` in float32, clamped to +-fmt.max, rounded to nearest even on
    the grid, times ``scale_inv``. On CPU the work goes in slices of whole block rows of
    about CPU_CHUNK elements through two reused buffers, as ``fp8lab.quantize.tensor`` casts, so
    no tensor-sized float32 temporary is made.

    Args:
        x2d: any float tensor, 2-D.
        block: the block shape (br, bc).
        scale, scale_inv: (ceil(R/br), ceil(C/bc)) float32, powers of two.
        fmt: the FP8 format.
        dtype: bfloat16 or float32 (both hold q * 2^k exactly for the scales fp8lab makes).
    """
    if transposed(x2d):  # the result is laid out as x2d is: a transpose, which GEMMs take as is
        return cast_blocks_dequantized(x2d.t(), block[::-1], scale.t(), scale_inv.t(), fmt, dtype=dtype).t()
    if block_cast_native.readable(x2d) and dtype in (torch.float32, torch.bfloat16):
        k = block_cast_native.kernel()
        if k is not None:  # one pass over x2d, the same values
            return block_cast_native.block_cast(k, x2d, block, scale, scale_inv, fmt, dtype)
    return _cast_blocks_torch(x2d, block, scale, scale_inv, fmt, dtype)


def _cast_blocks_torch(x2d, block, scale, scale_inv, fmt: FP8Format, dtype: torch.dtype) -> torch.Tensor:
    """``cast_blocks_dequantized`` in torch operations, on a tensor that is not a transpose."""
    br, bc = block
    r, c = x2d.shape
    out = torch.empty((r, c), dtype=dtype, device=x2d.device)
    rows = r if x2d.device.type != "cpu" else max(br, CPU_CHUNK // max(c, 1) // br * br)
    chunk_shape = (-(-min(rows, r) // br), br, -(-c // bc), bc)
    v_buf = torch.empty(chunk_shape, dtype=torch.float32, device=x2d.device)
    magic_buf = torch.empty(v_buf.numel(), dtype=torch.int32, device=x2d.device)
    for r0 in range(0, r, rows):
        xb = padded_blocks(x2d[r0 : r0 + rows], block)
        v = v_buf[: xb.shape[0]]
        v.copy_(xb).mul_(_per_block(scale[r0 // br : r0 // br + xb.shape[0]]))
        v.clamp_(-fmt.max, fmt.max)
        round_fp32_to_fp8_grid_(v.view(-1), fmt, magic_buf[: v.numel()])
        v.mul_(_per_block(scale_inv[r0 // br : r0 // br + xb.shape[0]]))
        part = out[r0 : r0 + rows]
        part.copy_(v.view(v.shape[0] * br, v.shape[2] * bc)[: part.shape[0], :c])
    return out


def cast_blocks_fp8(x2d: torch.Tensor, block: tuple[int, int], scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """The FP8 values of ``x2d`` (R, C) cast block by block, in ``fmt.dtype`` (float8): each
    element ``x * scale`` in float32, clamped to +-fmt.max, rounded to nearest even by the
    float8 conversion (the values ``cast_blocks_dequantized`` makes, before its ``scale_inv``).
    Laid out as ``x2d`` is (a transpose of a contiguous tensor stays one). For a hardware GEMM
    that takes block scales (``torch.nn.functional.scaled_mm``); one float32 temporary.

    Args:
        x2d: any float tensor, 2-D.
        block: the block shape (br, bc).
        scale: (ceil(R/br), ceil(C/bc)) float32.
        fmt: the FP8 format.
    """
    if transposed(x2d):
        return cast_blocks_fp8(x2d.t(), block[::-1], scale.t(), fmt).t()
    r, c = x2d.shape
    v = padded_blocks(x2d.float(), block) * _per_block(scale)
    v = v.clamp_(-fmt.max, fmt.max).reshape(v.shape[0] * block[0], v.shape[2] * block[1])[:r, :c]
    return v.to(fmt.dtype)


def block_cast_stats(
    x2d: torch.Tensor,
    dequantized: torch.Tensor | None,
    block: tuple[int, int],
    scale: torch.Tensor,
    fmt: FP8Format,
    *,
    block_stats: bool = True,
) -> torch.Tensor:
    """``STAT_NAMES`` then (``block_stats``) ``BLOCK_STAT_NAMES`` of one blockwise cast (log steps only).

    overflow %: elements with |x * scale| > fmt.max (clamped); underflow %: non-zero
    elements that became zero; SQNR: 10*log10(|x|^2 / |x - dequantized|^2); then the
    min / median / max of log2(block scale) over the blocks that hold a non-zero value,
    and the % of blocks with an underflowed element and with a clamped element.
    ``dequantized`` None: the statistics of ``cast_blocks_dequantized`` with these scales,
    cast here (the what-if statistics). On CPU the work goes in slices of whole block rows
    of about CPU_CHUNK elements, as ``fp8lab.quantize.cast_stats`` does, so no
    tensor-sized float32 temporary is made.

    Args:
        x2d: the high-precision 2-D tensor.
        dequantized: its dequantized FP8 values (same shape, any float dtype), or None.
        block: the block shape (br, bc).
        scale: (ceil(R/br), ceil(C/bc)) float32 powers of two.
        fmt: the FP8 format.
    """
    br, bc = block
    r, c = x2d.shape
    rows = r if x2d.device.type != "cpu" else max(br, CPU_CHUNK // max(c, 1) // br * br)
    sums = torch.zeros(4, dtype=torch.float32, device=x2d.device)  # overflow, underflow, signal, noise
    occupied, flushed_blocks, clamped_blocks = [], [], []
    for r0 in range(0, max(r, 1), rows):
        s = _per_block(scale[r0 // br : -(-(r0 + rows) // br)])
        x32 = x2d[r0 : r0 + rows].float()
        xb = padded_blocks(x32, block)
        xs = (xb * s).contiguous()  # scaled domain, exact (power-of-2 scales); x2d may be a transposed view
        if dequantized is None:  # the cast itself, as cast_blocks_dequantized does it
            q = round_fp32_to_fp8_grid_(xs.clamp(-fmt.max, fmt.max).view(-1), fmt).view(xs.shape)
        else:
            q = padded_blocks(dequantized[r0 : r0 + rows].float(), block) * s
        clamped = xs.abs() > fmt.max
        # underflow: 0 always stays 0, so the non-zero elements lost are the difference of counts
        underflow = torch.count_nonzero(xb) - torch.count_nonzero(q)
        if block_stats:
            nonzero = xb != 0
            occupied.append(nonzero.any(dim=3).any(dim=1))  # (rows/br, C/bc)
            flushed_blocks.append((nonzero & (q == 0)).any(dim=3).any(dim=1))
            clamped_blocks.append(clamped.any(dim=3).any(dim=1))
        err = q.sub_(xs).div_(s)  # x - dequantized up to sign, exactly (power-of-2 scales)
        flat_x = x32.reshape(-1)
        sums += torch.stack(
            [
                torch.count_nonzero(clamped).float(),
                underflow.float(),
                torch.dot(flat_x, flat_x),
                torch.dot(err.reshape(-1), err.reshape(-1)),
            ]
        )
    n = max(x2d.numel(), 1)
    sqnr = 10.0 * torch.log10(sums[2] / sums[3].clamp_min(torch.finfo(torch.float32).tiny))
    stats = [sums[0] * (100.0 / n), sums[1] * (100.0 / n), sqnr]
    if block_stats:
        occupied_all = torch.cat(occupied)
        log2 = torch.log2(scale.float())[occupied_all]
        if log2.numel() == 0:
            log2 = torch.zeros(1, device=x2d.device)
        blocks = max(occupied_all.numel(), 1)
        stats += [
            log2.min(),
            log2.median(),
            log2.max(),
            torch.cat(flushed_blocks).sum().float() * (100.0 / blocks),
            torch.cat(clamped_blocks).sum().float() * (100.0 / blocks),
        ]
    return torch.stack(stats)
