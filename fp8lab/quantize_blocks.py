"""Casting a tensor onto the FP8 grid block by block, with the block scales it is given.

Invariant: like ``fp8lab.quantize``, casting takes scales as inputs and never computes
them (the block recipes in ``fp8lab.scaling`` do). Every block of a 2-D tensor is
multiplied by its scale in float32, clamped to +-fp8_max, rounded to nearest even on the
FP8 grid, and multiplied by its scale_inv: with power-of-2 scales (the only ones fp8lab's
block recipes make) the result is the exact value the hardware's GEMM multiplies, held in
bf16 or float32, so a plain GEMM on it is the hardware model.
"""

from __future__ import annotations

import torch

from fp8lab.formats import FP8Format
from fp8lab.quantize import round_fp32_to_fp8_grid_
from fp8lab.scaling.blocks import padded_blocks

BLOCK_STAT_NAMES = ("block_scale_log2_min", "block_scale_log2_median", "block_scale_log2_max",
                    "blocks_underflow_pct", "blocks_saturated_pct")


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

    Args:
        x2d: any float tensor, 2-D.
        block: the block shape (br, bc).
        scale, scale_inv: (ceil(R/br), ceil(C/bc)) float32, powers of two.
        fmt: the FP8 format.
        dtype: bfloat16 or float32 (both hold q * 2^k exactly for the scales fp8lab makes).
    """
    r, c = x2d.shape
    v = padded_blocks(x2d.float(), block).mul(_per_block(scale)).contiguous()  # a fresh float32 tensor
    v.clamp_(-fmt.max, fmt.max)
    round_fp32_to_fp8_grid_(v.view(-1), fmt)
    v.mul_(_per_block(scale_inv))
    return v.reshape(v.shape[0] * v.shape[1], v.shape[2] * v.shape[3])[:r, :c].to(dtype)


def block_cast_stats(
    x2d: torch.Tensor, dequantized: torch.Tensor, block: tuple[int, int], scale: torch.Tensor, fmt: FP8Format
) -> torch.Tensor:
    """``STAT_NAMES`` then ``BLOCK_STAT_NAMES`` of one blockwise cast (log steps only).

    overflow %: elements with |x * scale| > fmt.max (clamped); underflow %: non-zero
    elements that became zero; SQNR: 10*log10(|x|^2 / |x - dequantized|^2); then the
    min / median / max of log2(block scale) over the blocks that hold a non-zero value,
    and the % of blocks with an underflowed element and with a clamped element.
    """
    x32 = x2d.float()
    xs = padded_blocks(x32, block) * _per_block(scale)
    deq = padded_blocks(dequantized.float(), block)
    x_blocks = padded_blocks(x32, block)
    clamped = xs.abs() > fmt.max
    flushed = (x_blocks != 0) & (deq == 0)
    n = max(x2d.numel(), 1)
    err = x32 - dequantized.float()
    signal, noise = (x32 * x32).sum(), (err * err).sum()
    sqnr = 10.0 * torch.log10(signal / noise.clamp_min(torch.finfo(torch.float32).tiny))
    occupied = (x_blocks != 0).any(dim=3).any(dim=1)  # (R/br, C/bc)
    log2 = torch.log2(scale.float())[occupied]
    if log2.numel() == 0:
        log2 = torch.zeros(1, device=x2d.device)
    blocks = max(occupied.numel(), 1)
    return torch.stack([
        clamped.sum().float() * (100.0 / n),
        flushed.sum().float() * (100.0 / n),
        sqnr,
        log2.min(), log2.median(), log2.max(),
        flushed.any(dim=3).any(dim=1).sum().float() * (100.0 / blocks),
        clamped.any(dim=3).any(dim=1).sum().float() * (100.0 / blocks),
    ])
