"""A plain reference for Hopper's FP8 tensor-core accumulator, written from the model's five steps.

Invariant: nothing here shares code or tricks with ``fp8lab.gemm.accumulate`` (no float scaling, no
masks, no torch): significands are Python integers, exponents explicit, truncation an integer shift
of a magnitude, fp32 roundings done on exact rationals. Slow (microseconds per product) and meant
to be read next to the model:

1. each product exact: significand ``ma * mb`` (integers with ``fa + fb`` fraction bits), exponent
   ``ea + eb``; an FP8 subnormal takes its format's minimum exponent with an unnormalised
   significand, a zero takes -126; C enters with its fp32 exponent clamped at -126;
2. align every term (C included) to the largest exponent E;
3. truncate each term toward zero to a multiple of 2^(E - F) (F fraction bits, 13 on Hopper);
4. add the truncated terms exactly;
5. normalise and truncate toward zero to min(F, 23) fraction bits (fp32's exponent range: below
   2^-126 the bits are counted from 2^-126); a zero sum is +0, a result at or past 2^128 is inf.
An instruction with an inf or NaN term gives the IEEE sum of its terms.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

ZERO_EXPONENT = -126
FP32_MIN_EXPONENT = -126


@functools.lru_cache(maxsize=1 << 16)  # an FP8 format has 256 values: the same few recur
def decompose(v: float, emin: int, mbits: int) -> tuple[int, int, int]:
    """(sign, integer significand with ``mbits`` fraction bits, exponent) of a finite value on a
    grid with ``mbits`` fraction bits and minimum exponent ``emin``: |v| = m * 2^(e - mbits)."""
    if v == 0:
        return 1, 0, ZERO_EXPONENT
    sign = -1 if v < 0 else 1
    frac, exp = math.frexp(abs(v))  # |v| = frac * 2^exp, frac in [0.5, 1)
    e = max(exp - 1, emin)
    m = Fraction(abs(v)) * Fraction(2) ** (mbits - e)
    if m.denominator != 1:
        raise ValueError(f"{v!r} is not on a grid with {mbits} fraction bits and minimum exponent {emin}")
    return sign, int(m), e


def round_to_fp32(x: Fraction) -> float:
    """The exact rational ``x`` rounded to nearest-even fp32 (subnormals included; inf past the range)."""
    if x == 0:
        return 0.0
    sign, mag = (-1 if x < 0 else 1), abs(x)
    e = mag.numerator.bit_length() - mag.denominator.bit_length()
    if Fraction(2) ** e > mag:
        e -= 1  # now 2^e <= mag < 2^(e+1)
    quantum = Fraction(2) ** (max(e, FP32_MIN_EXPONENT) - 23)
    q, rem = divmod(mag, quantum)  # q integer, rem < quantum
    if rem * 2 > quantum or (rem * 2 == quantum and q % 2 == 1):
        q += 1
    value = q * quantum
    if value >= 2**128:
        return sign * math.inf
    return sign * float(value)


def fp32_add(x: float, y: float) -> float:
    if not (math.isfinite(x) and math.isfinite(y)):
        return x + y  # IEEE: inf + finite, inf - inf = nan, nan
    return round_to_fp32(Fraction(x) + Fraction(y))


def fp32_mul(x: float, y: float) -> float:
    if not (math.isfinite(x) and math.isfinite(y)):
        return x * y
    return round_to_fp32(Fraction(x) * Fraction(y))


def fp32_fma(x: float, y: float, z: float) -> float:
    """x * y + z with one rounding (what an FFMA does)."""
    if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(z)):
        return x * y + z  # in float64: no finite fp32 product overflows there, so IEEE's answer
    return round_to_fp32(Fraction(x) * Fraction(y) + Fraction(z))


def instruction(
    a: list[float], b: list[float], c: float, a_fmt: tuple[int, int], b_fmt: tuple[int, int], frac_bits: int = 13
) -> float:
    """One instruction: C + sum(a[i] * b[i]) as the tensor core computes it.

    Args:
        a, b: operand values (exact FP8 values as Python floats); a_fmt, b_fmt: (minimum exponent,
            fraction bits) of their formats, (-6, 3) for E4M3 and (-14, 2) for E5M2.
        c: the fp32 accumulator entering the instruction.
    """
    if any(math.isinf(x) or math.isnan(x) for x in [*a, *b, c]):
        total = float(c)
        for x, y in zip(a, b):
            total += x * y  # float64: the finite terms cannot overflow, so the IEEE sum
        return total
    # Step 1: terms as (sign, integer significand, fraction bits, exponent).
    sc, mc, ec = decompose(c, FP32_MIN_EXPONENT, 23)
    terms = [(sc, mc, 23, ec)]
    for x, y in zip(a, b):
        sx, mx, ex = decompose(x, *a_fmt)
        sy, my, ey = decompose(y, *b_fmt)
        terms.append((sx * sy, mx * my, a_fmt[1] + b_fmt[1], ex + ey))
    # Step 2: the largest exponent.
    big_e = max(e for _, _, _, e in terms)
    # Steps 3 and 4: each magnitude in units of 2^(E - F), truncated toward zero, summed exactly.
    total = 0
    for sign, m, f, e in terms:
        shift = (e - f) - (big_e - frac_bits)  # term = m * 2^(e - f) = (m << shift) units
        units = m << shift if shift >= 0 else m >> -shift
        total += sign * units
    return normalise(total, big_e - frac_bits, min(frac_bits, 23))


def normalise(total: int, unit_exponent: int, out_frac: int) -> float:
    """Step 5: ``total * 2^unit_exponent`` truncated toward zero to ``out_frac`` fraction bits."""
    if total == 0:
        return 0.0
    sign, mag = (-1 if total < 0 else 1), abs(total)
    lead = mag.bit_length() - 1 + unit_exponent  # exponent of the leading bit
    drop = max(lead, FP32_MIN_EXPONENT) - out_frac - unit_exponent  # low bits below the kept ones
    if drop > 0:
        mag = (mag >> drop) << drop
    if mag.bit_length() - 1 + unit_exponent >= 128:
        return sign * math.inf
    return sign * math.ldexp(mag, unit_exponent)  # exact: at most 24 significant bits, in range


def gemm_element(
    a_row: list[float],
    b_col: list[float],
    a_fmt,
    b_fmt,
    *,
    kind: str,
    chunk: int = 32,
    frac_bits: int = 13,
    promote_every: int = 4,
    descending: bool = False,
    split_k: int = 1,
    a_scales: list[float] | None = None,
    b_scales: list[float] | None = None,
) -> float:
    """One output element of the accumulator over K (the model's GEMM, one element at a time).

    K is cut into instructions of ``chunk`` (the last zero-padded), grouped into promotion groups of
    ``promote_every`` instructions counted from k = 0. "fast" chains C through every instruction;
    "promoted" restarts C at 0 in each group and adds the group's result to an fp32 accumulator
    (fp32 add), or with scales FMAs it times ``fp32(a_scales[g] * b_scales[g])``; "fp32" is the
    exact sum of each group's products rounded once to fp32, promoted the same way. ``descending``
    visits instructions from the last to the first. ``split_k`` cuts the groups into that many
    slices of ceil(G / split_k) groups, each accumulated alone, summed in fp32 in slice order.
    """
    k = len(a_row)
    n_ins = -(-k // chunk)
    n_groups = -(-n_ins // promote_every)
    per_slice = max(1, -(-n_groups // split_k))
    out = 0.0
    for g0 in range(0, n_groups, per_slice):
        groups = range(g0, min(n_groups, g0 + per_slice))
        out = fp32_add(
            out,
            _slice(
                a_row,
                b_col,
                a_fmt,
                b_fmt,
                groups,
                kind,
                chunk,
                frac_bits,
                promote_every,
                descending,
                a_scales,
                b_scales,
            ),
        )
    return out


def _slice(
    a_row, b_col, a_fmt, b_fmt, groups, kind, chunk, frac_bits, promote_every, descending, a_scales, b_scales
) -> float:
    k = len(a_row)
    order = list(groups)[::-1] if descending else list(groups)
    if kind == "fp32" and a_scales is None:  # no promotion to model: the slice's exact sum, rounded once
        lo, hi = min(groups) * promote_every * chunk, min(k, (max(groups) + 1) * promote_every * chunk)
        return _exact_fp32_sum(a_row[lo:hi], b_col[lo:hi])
    c, acc = 0.0, 0.0
    for g in order:
        ins = [i for i in range(g * promote_every, (g + 1) * promote_every) if i * chunk < k]
        if kind == "fp32":
            lo, hi = ins[0] * chunk, min(k, (ins[-1] + 1) * chunk)
            partial = _exact_fp32_sum(a_row[lo:hi], b_col[lo:hi])
        else:
            for i in ins[::-1] if descending else ins:
                lo, hi = i * chunk, min(k, (i + 1) * chunk)
                c = instruction(a_row[lo:hi], b_col[lo:hi], c, a_fmt, b_fmt, frac_bits)
            if kind == "fast":
                continue
            partial, c = c, 0.0
        if a_scales is not None:
            acc = fp32_fma(partial, fp32_mul(a_scales[g], b_scales[g]), acc)
        else:
            acc = fp32_add(acc, partial)
    return c if kind == "fast" else acc


def _exact_fp32_sum(a: list[float], b: list[float]) -> float:
    """The exact sum of the products rounded once to fp32 (the IEEE sum when a product is not finite)."""
    prods = [x * y for x, y in zip(a, b)]
    if not all(math.isfinite(p) for p in prods):
        return sum(prods)  # float64: the finite products cannot overflow, the non-finite ones decide
    return round_to_fp32(sum((Fraction(x) * Fraction(y) for x, y in zip(a, b)), Fraction(0)))
