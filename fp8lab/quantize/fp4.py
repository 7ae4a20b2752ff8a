"""Casting onto the FP4 E2M1 grid block by block, with given block encode scales; the random
Hadamard transform NVFP4 applies before some casts.

Invariant: like the FP8 casts, these take scales (and random bits) as inputs and never compute
them (``fp8lab.scaling.nvfp4_scales`` does). Each element is converted to float32 and multiplied
by its block's encode scale (one float32 rounding, TE's ``mul.f32x2``), then converted to E2M1
with "satfinite" semantics: NaN becomes +6, magnitudes above 6 become 6 with their sign kept;

- round to nearest even (``cvt.rn.satfinite.e2m1x2.f32``): exact, ties to the even neighbour;
- stochastic rounding with 8 random bits ``r`` per element, TE's ``stochastic_round_fp4_e2m1``
  (its definition of what ``cvt.rs.satfinite.e2m1x4.f32`` takes): ``t = fma(r/256, step(|x|),
  |x|)``, then ``floor(t / step(t)) * step(t)``, at most 6, with x's sign; ``step`` is the E2M1
  spacing (0.5 below 2, 1 in [2, 4), 2 from 4). Each value rounds up with probability
  ``ceil(256 * frac) / 256`` of its distance to the next grid point, so it is unbiased for values
  on a 1/256-step grid between grid points and biased by less than step/256 otherwise.
"""

from __future__ import annotations

import math

import torch

from fp8lab.formats import E2M1
from fp8lab.quantize import block_cast_native
from fp8lab.quantize.blocks import padded_blocks, transposed
from fp8lab.quantize.tensor import round_fp32_to_fp8_grid_

HADAMARD_SIZE = 16


def _step(a: torch.Tensor) -> torch.Tensor:
    """The E2M1 grid spacing at magnitude ``a`` (float32, >= 0 or NaN), as a new tensor: 0.5 below
    2, 1 in [2, 4), 2 from 4 (2 for NaN and inf; the callers' NaN lanes never use it). On the bits:
    ``a``'s exponent field alone is 2^floor(log2 a), and half of that, clamped to [0.5, 2], is the
    spacing."""
    return (a.view(torch.int32) & 0x7F800000).view(torch.float32).mul_(0.5).clamp_(0.5, 2.0)


def round_to_e2m1(v: torch.Tensor, rbits: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``v`` rounded onto E2M1 (satfinite) as a new float32 tensor: to nearest even, or
    (``rbits``: integers 0..255 shaped like ``v``) stochastically, as TE defines it."""
    v = v.float()
    if rbits is None:
        q = torch.where(torch.isnan(v), E2M1.max, v).clamp(-E2M1.max, E2M1.max).contiguous()
        return round_fp32_to_fp8_grid_(q.view(-1), E2M1).view(v.shape)
    a = v.abs()
    # u * step(a), u = r / 256, is exact (8 bits times a power of two), so adding it to a is TE's
    # fmaf: one rounding.
    t = _step(a).mul_(rbits.to(torch.float32)).mul_(1.0 / 256.0).add_(a)
    step_t = _step(t)
    q = t.div_(step_t).floor_().mul_(step_t).clamp_(max=E2M1.max)  # division by a power of two: exact
    return torch.copysign(q, v).masked_fill_(torch.isnan(v), E2M1.max)  # NaN: +6, satfinite


def cast_blocks_e2m1(
    x2d: torch.Tensor, block: tuple[int, int], encode: torch.Tensor, rbits: torch.Tensor | None = None
) -> torch.Tensor:
    """The E2M1 values (float32, (R, C)) of ``x2d`` cast block by block: ``x * encode`` in float32,
    then ``round_to_e2m1``.

    Args:
        x2d: any float tensor, 2-D.
        block: the block shape (1, 16), (16, 1) or (16, 16).
        encode: (ceil(R/br), ceil(C/bc)) float32 encode scales (``block_encode_scale``).
        rbits: None (round to nearest even) or integers 0..255 shaped like ``x2d``.
    """
    r, c = x2d.shape
    scaled = padded_blocks(x2d.float(), block) * encode.float()[:, None, :, None]
    scaled = scaled.reshape(scaled.shape[0] * block[0], scaled.shape[2] * block[1])[:r, :c]
    return round_to_e2m1(scaled, rbits)


def cast_dequantized_e2m1(
    x2d: torch.Tensor,
    block: tuple[int, int],
    encode: torch.Tensor,
    decode: torch.Tensor,
    sr_key: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``dequantize_blocks(cast_blocks_e2m1(x2d, block, encode, rbits), block, decode, dtype)`` with
    ``rbits = sr_bits(sr_key, x2d.shape)`` (``sr_key`` None: nearest even): on the CPU in one pass of
    the block-cast C kernel, which makes the same random bits itself (the same values), laid out as
    ``x2d`` is (a transpose of a contiguous tensor stays one); elsewhere, or without the kernel, as
    written."""
    if block_cast_native.readable(x2d.t() if transposed(x2d) else x2d) and dtype in (torch.float32, torch.bfloat16):
        k = block_cast_native.kernel()
        if k is not None:
            if transposed(x2d):  # the contiguous tensor, blocks swapped; bits by x2d's own indices
                t = block_cast_native.block_cast_e2m1(
                    k, x2d.t(), block[::-1], encode.t(), decode.t(), sr_key, dtype, (1, x2d.shape[1])
                )
                return t.t()
            return block_cast_native.block_cast_e2m1(k, x2d, block, encode, decode, sr_key, dtype)
    rbits = None if sr_key is None else sr_bits(sr_key, x2d.shape, x2d.device)
    return dequantize_blocks(cast_blocks_e2m1(x2d, block, encode, rbits), block, decode, dtype)


def sr_key(seed: int, cast: int) -> int:
    """The 32-bit key of stochastically rounded cast number ``cast`` of a run seeded ``seed``
    (splitmix64's finaliser of the pair, low 32 bits)."""
    z = (seed * 0x9E3779B97F4A7C15 + cast + 1) % (1 << 64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return (z ^ (z >> 31)) & 0xFFFFFFFF


_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """h * c mod 2^32 for int64 h in [0, 2^32): in 16-bit halves of c, so no product leaves int64."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def sr_bits(key: int, shape, device=None) -> torch.Tensor:
    """The random bits (int32, 0..255) of a stochastically rounded cast with ``key`` over a tensor of
    ``shape``: for the element of row-major index i (mod 2^32), the top byte of Wellons' lowbias32
    hash of ``i * 0x9E3779B1 + key``. A counter-based generator: the bits of any element are a pure
    function of (key, index), so a resumed run, a transposed layout and the C kernel all draw the
    same ones, on any device."""
    h = torch.arange(math.prod(shape), dtype=torch.int64, device=device).reshape(shape) & _M32
    h = (_mul32(h, 0x9E3779B1) + key) & _M32
    h = _mul32(h ^ (h >> 16), 0x7FEB352D)
    h = _mul32(h ^ (h >> 15), 0x846CA68B)
    return ((h ^ (h >> 16)) >> 24).to(torch.int32)


def dequantize_blocks(q: torch.Tensor, block: tuple[int, int], decode: torch.Tensor, dtype: torch.dtype):
    """``q * decode`` per block in ``dtype``: exact in float32 and bfloat16 (an E2M1 value has 2
    significant bits, an E4M3 scale 4, so their product has at most 6, and at least 2^-10)."""
    r, c = q.shape
    out = padded_blocks(q.float(), block) * decode.float()[:, None, :, None]
    return out.reshape(out.shape[0] * block[0], out.shape[2] * block[1])[:r, :c].to(dtype)


def hadamard(size: int = HADAMARD_SIZE) -> torch.Tensor:
    """The Sylvester Hadamard matrix of ``size`` (a power of two), entries +-1, float64."""
    h = torch.ones((1, 1), dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


def rht_matrix(signs: torch.Tensor) -> torch.Tensor:
    """The random Hadamard transform's 16x16 matrix ``diag(signs) @ H / 4`` (float32, exact:
    entries +-1/4), orthogonal: ``T @ T.T = I``. A row of 16 values ``v`` becomes ``v @ T``."""
    n = signs.numel()
    return (torch.diag(signs.double()) @ hadamard(n) / n**0.5).float()


def apply_rht_dim0(x2d: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x2d`` (R, C) transformed along dim 0 in groups of 16 rows: column j's group g becomes
    ``x[g, j] @ T`` (TE transforms each 16-long row of the transposed copy). R is zero-padded to
    a multiple of 16 first (TE requires one; padding both operands of the weight-gradient GEMM
    with zeros leaves their product unchanged). Each output is the exact sum of its 16 terms
    +-x/4 rounded once to float32 (computed in float64, where 16 terms of a float32 or bf16 input
    sum exactly unless their exponents span more than ~25 binades): a model, since the order of
    TE's fused kernel's float32 sum is not public. Returns float32 (Rp, C)."""
    n = t.shape[0]
    r, c = x2d.shape
    x = torch.nn.functional.pad(x2d.double(), (0, 0, 0, -r % n))
    # group g's rows become T^T @ x[g] (16, C): one batched GEMM over the groups, no transposes
    return torch.matmul(t.double().t(), x.view(-1, n, c)).view(-1, c).float()


def rht_dim0(x2d: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``apply_rht_dim0(x2d, rht_matrix(signs))``: on the CPU in one pass of the block-cast C kernel
    (a fast Walsh-Hadamard transform in float64: the same bits wherever the 16 terms sum exactly,
    see ``apply_rht_dim0``), elsewhere as written."""
    if block_cast_native.readable(x2d):
        k = block_cast_native.kernel()
        if k is not None:
            return block_cast_native.rht_dim0(k, x2d, signs)
    return apply_rht_dim0(x2d, rht_matrix(signs).to(x2d.device))  # the 16x16 matrix where x2d is (a GPU)
