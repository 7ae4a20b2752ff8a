"""The accumulator model in plain torch ops: the fallback where no C compiler works, and a second,
independent implementation the tests hold the C kernel to.

Invariant: bit-identical to ``accumulate_kernel.c`` for every input (see ``fp8lab.gemm.accumulate``
for the model). It shares no arithmetic trick with the kernel: each instruction's terms are formed
and truncated in float64 (every product, power-of-two scale and sum of a chunk is exact there),
step 5 uses ``frexp``, and fp32 only appears where the model rounds to fp32. Slow (about a dozen
tensor passes over M * N * K float64 values); memory stays bounded by working on blocks of rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Steps(NamedTuple):
    """The instruction sequence of one accumulation: products per instruction, fraction bits,
    instructions per promotion (0: fast accumulation, never promoted), and whether the K loop
    runs backwards. Both implementations (this one and the C kernel) take it."""

    chunk: int
    frac: int
    promote: int
    desc: bool


EXP_ZERO = -126  # a zero operand's exponent, and the clamp of C's
EXP_NONFINITE = 2000  # inf/NaN: an instruction whose E reaches EXP_FLAG is an IEEE sum
EXP_FLAG = 1000
BLOCK_ELEMENTS = 1 << 20  # products formed at once (8 MiB of float64 per temporary)


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2.0**e (float64, exact) for integer exponents in [-1022, 1023], from the bits."""
    return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)


def operand_exponents(x: torch.Tensor, emin: int) -> torch.Tensor:
    """int32 exponents of FP8 values held in float32: their own, ``emin`` for a subnormal of the
    format, EXP_ZERO for zeros, EXP_NONFINITE for inf and NaN."""
    biased = (x.view(torch.int32) >> 23) & 0xFF
    e = (biased - 127).clamp(min=emin)
    e = torch.where(x == 0, EXP_ZERO, e)
    return torch.where(biased == 255, EXP_NONFINITE, e).to(torch.int32)


def c_exponents(c: torch.Tensor) -> torch.Tensor:
    biased = (c.view(torch.int32) >> 23) & 0xFF
    return torch.where(biased == 255, EXP_NONFINITE, biased.clamp(min=1) - 127).to(torch.int32)


def truncate_fraction_bits(v: torch.Tensor, out_frac: int) -> torch.Tensor:
    """Step 5 on exact float64 values: toward zero to ``out_frac`` fraction bits, the exponent clamped
    at fp32's -126; a zero is +0."""
    _, e = torch.frexp(v)  # v = m * 2^e, |m| in [0.5, 1): the leading bit is 2^(e - 1)
    lead = (e.to(torch.int32) - 1).clamp(min=-126)
    kept = torch.trunc(v * pow2(out_frac - lead)) * pow2(lead - out_frac)
    return kept + 0.0  # -0 -> +0


def fma_fp32(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``x * y + z`` of float32 tensors with one rounding, as an FFMA computes it.

    The product is exact in float64; the sum is rounded to float64 *to odd* (TwoSum gives its exact
    error; where inexact and the last bit is even, step one ulp toward the exact value), and a
    round-to-odd float64 rounds correctly to float32 (53 >= 24 + 2). Non-finite cases take IEEE's
    answer from the float64 arithmetic (no finite float32 product overflows there).
    """
    p, zd = x.double() * y.double(), z.double()
    s = p + zd
    bb = s - p
    err = (p - (s - bb)) + (zd - bb)
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(err > 0, torch.inf, -torch.inf).to(torch.float64)
    odd = torch.where((err != 0) & even, torch.nextafter(s, toward), s)
    return torch.where(torch.isfinite(s), odd, s).float()


def _instruction(a_blk, b_chunk, ea_blk, eb_chunk, c, frac: int, out_frac: int) -> torch.Tensor:
    """One instruction for a block of rows: D = C + the chunk's products, steps 1-5 (or the IEEE sum)."""
    prods = a_blk.double().unsqueeze(2) * b_chunk.double().unsqueeze(0)  # (rows, kc, N), exact
    e = torch.maximum((ea_blk.unsqueeze(2) + eb_chunk.unsqueeze(0)).amax(dim=1), c_exponents(c))  # (rows, N)
    ieee = e >= EXP_FLAG
    e = e.clamp(max=EXP_FLAG)  # flagged outputs are replaced below; keep their scales finite
    unit = pow2(frac - e).unsqueeze(1)
    total = torch.trunc(c.double() * unit.squeeze(1)) + torch.trunc(prods * unit).sum(dim=1)  # exact integers
    d = truncate_fraction_bits(total * pow2(e - frac), out_frac).float()
    if ieee.any():  # a host check on CPU; rare in practice
        d = torch.where(ieee, (c.double() + prods.sum(dim=1)).float(), d)
    return d


def accumulate_torch(
    a: torch.Tensor,
    b: torch.Tensor,
    emins: tuple[int, int],
    steps: Steps,
    *,
    c0=None,
    sa=None,
    sb=None,
) -> torch.Tensor:
    """The accumulator over float32 ``a`` (M, K) and ``b`` (K, N), as the kernel's ``fp8lab_accumulate``.

    ``c0`` (M, N) is the first C; ``sa`` (M, G), ``sb`` (G, N) the group scales (promoted only).
    """
    chunk, frac, promote, desc = steps
    m, k = a.shape
    n = b.shape[1]
    out = torch.empty(m, n, dtype=torch.float32)
    n_ins = -(-k // chunk)
    out_frac = min(frac, 23)
    ea, eb = operand_exponents(a, emins[0]), operand_exponents(b, emins[1])
    rows = max(1, BLOCK_ELEMENTS // max(1, chunk * n))
    for i0 in range(0, m, rows):
        i1 = min(m, i0 + rows)
        c = torch.zeros(i1 - i0, n) if c0 is None else c0[i0:i1].clone()
        acc = torch.zeros(i1 - i0, n)
        for t in range(n_ins):
            ins = n_ins - 1 - t if desc else t
            ks = slice(ins * chunk, min(k, (ins + 1) * chunk))
            c = _instruction(a[i0:i1, ks], b[ks], ea[i0:i1, ks], eb[ks], c, frac, out_frac)
            if promote and (ins % promote == 0 if desc else ins % promote == promote - 1 or ins == n_ins - 1):
                g = ins // promote
                if sa is not None:
                    acc = fma_fp32(c, sa[i0:i1, g : g + 1] * sb[g : g + 1], acc)  # scales multiplied in fp32 first
                else:
                    acc = acc + c
                c = torch.zeros_like(c)
        out[i0:i1] = acc if promote else c
    return out
