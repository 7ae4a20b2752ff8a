"""Delayed-scaling math, exact (torch.equal) against a reference written here in plain Python.

The reference transliterates Transformer Engine's fused update kernel
(``common/recipe/delayed_scaling.cu``, ``kernel_bulk``) column by column, on Python floats
(float64), rounding to float32 with ``struct``: ``scale = f32((fp8_max * 2**-margin) /
amax)``. ``fp8_max * 2**-margin`` is exact, and rounding a float64 quotient of two float32
values to float32 equals the float32 division (float64 carries more than 2*24+2 bits, so
the double rounding is innocuous). ``max`` is ``fmaxf`` (NaN ignored). Every test also
checks that the expected state differs from the state before the update, so it cannot pass
by leaving the state alone.
"""

from __future__ import annotations

import dataclasses
import math
import random
import struct

import pytest
import torch

import fp8lab
from fp8lab import FP8Options
from fp8lab.scaling.delayed import (
    DelayedScaling,
    amax_from_history,
    compute_scale,
    roll_history,
    update_history_and_scale,
)

F32_MAX = 3.4028234663852886e38  # largest finite float32, written out
TINY = 1e-40  # a float32 subnormal: 448 / TINY overflows float32
E4M3_MAX, E5M2_MAX = 448.0, 57344.0
HISTORY_LENS = (1, 31, 1024)
ALGOS = ("max", "most_recent")
MARGINS = (0, 2)


# ----------------------------------------------------------------------------- reference
def f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (inf beyond the float32 range)."""
    if math.isnan(x) or math.isinf(x):
        return x
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:  # older Pythons raise instead of returning inf
        return math.copysign(math.inf, x)


def ref_scale(amax: float, prev: float, fp8_max: float, margin: int) -> float:
    if math.isnan(amax) or math.isinf(amax) or amax == 0.0:
        return prev
    s = f32((fp8_max * 2.0**-margin) / amax)
    return F32_MAX if math.isinf(s) else s


def fmaxf(a: float, b: float) -> float:
    """C's fmaxf: a NaN argument is ignored (both NaN: NaN)."""
    if math.isnan(a):
        return b
    if math.isnan(b):
        return a
    return max(a, b)


def ref_amax(rows: list[list[float]], algo: str) -> list[float]:
    if algo == "most_recent":
        return list(rows[0])
    out = []
    for col in zip(*rows):
        m = 0.0
        for v in col:
            m = fmaxf(m, v)
        out.append(m)
    return out


def ref_roll(rows: list[list[float]]) -> list[list[float]]:
    rolled = [list(r) for r in rows[1:]] + [list(rows[0])]
    rolled[0] = [0.0] * len(rows[0])
    return rolled


def ref_te_update(rows, prev, maxima, margin, algo):
    """TE's ``kernel_bulk`` per column: (new rows, new scales). A column whose row 0 is 0
    neither rolls nor changes its scale; otherwise amax over the window (fmaxf), roll."""
    h = len(rows)
    new_rows = [list(r) for r in rows]
    scales = []
    for c in range(len(rows[0])):
        col = [r[c] for r in rows]
        last = col[0]
        amax = 0.0
        if last != 0.0:  # NaN != 0 is True: a NaN row 0 rolls (fp8lab never records one)
            a = [col[i + 1] if i < h - 1 else last for i in range(h)]
            for v in a:
                amax = fmaxf(amax, v)
            for i in range(h):
                new_rows[i][c] = a[i] if i > 0 else 0.0
        if algo == "most_recent":
            amax = last
        scales.append(ref_scale(amax, prev[c], maxima[c], margin))
    return new_rows, scales


def t32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def random_history(rng: random.Random, h: int, cols: int = 3) -> list[list[float]]:
    """Positive float32 amaxes spread over 2^-20 .. 2^20, some exact zeros."""
    return [[0.0 if rng.random() < 0.1 else f32(2.0 ** rng.uniform(-20, 20)) for _ in range(cols)] for _ in range(h)]


# ----------------------------------------------------------------------------- reference self-check
def test_reference_rounding_helper():
    assert f32(1.0) == 1.0
    assert f32(0.1) != 0.1 and abs(f32(0.1) - 0.1) < 1e-8
    assert f32(1e39) == math.inf
    assert 0.0 < f32(TINY) < 1.2e-38  # subnormal, not flushed
    assert math.isinf(f32(E4M3_MAX / f32(TINY)))


# ----------------------------------------------------------------------------- compute_scale
@pytest.mark.parametrize(
    "amax, fp8_max, margin, expected",
    [
        (448.0, E4M3_MAX, 0, 1.0),
        (1.0, E4M3_MAX, 0, 448.0),
        (1.0, E4M3_MAX, 2, 112.0),
        (3.5, E4M3_MAX, 0, 128.0),
        (57344.0, E5M2_MAX, 0, 1.0),
        (7.0, E5M2_MAX, 2, 2048.0),
        (0.0, E4M3_MAX, 0, 0.75),  # amax 0 keeps the previous scale
        (0.0, E5M2_MAX, 2, 0.75),
        (math.inf, E4M3_MAX, 0, 0.75),  # inf keeps it
        (math.nan, E5M2_MAX, 0, 0.75),  # nan keeps it
        (TINY, E4M3_MAX, 0, F32_MAX),  # scale overflows float32 -> float32 max
        (TINY, E5M2_MAX, 2, F32_MAX),
    ],
)
def test_compute_scale_explicit_cases(amax, fp8_max, margin, expected):
    prev = t32(0.75)
    amax_t = t32(amax)
    out = compute_scale(amax_t, prev, fp8_max, margin)
    assert out.dtype == torch.float32
    assert torch.equal(out, t32(expected))
    assert torch.equal(prev, t32(0.75))  # pure: the previous scale is not written


@pytest.mark.parametrize("fp8_max", (E4M3_MAX, E5M2_MAX))
@pytest.mark.parametrize("margin", MARGINS)
def test_compute_scale_matches_reference_over_all_magnitudes(fp8_max, margin):
    rng = random.Random(1234 + margin)
    amaxes = [f32(10.0 ** rng.uniform(-45, 38.5)) for _ in range(2000)]
    amaxes += [0.0, math.inf, math.nan, TINY, f32(1.5e-36), f32(2.0e-36), F32_MAX, 1.0, fp8_max]
    prevs = [f32(rng.uniform(0.01, 100.0)) for _ in amaxes]
    expected = t32([ref_scale(a, p, fp8_max, margin) for a, p in zip(amaxes, prevs)])
    amax_t, prev_t = t32(amaxes), t32(prevs)
    amax_copy = amax_t.clone()

    out = compute_scale(amax_t, prev_t, fp8_max, margin)

    assert not torch.equal(expected, prev_t)
    assert torch.equal(out, expected)
    assert torch.equal(amax_t.nan_to_num(), amax_copy.nan_to_num())  # inputs untouched
    # the same with fp8_max as a tensor that broadcasts (how update_scales calls it)
    out_t = compute_scale(amax_t, prev_t, torch.tensor(fp8_max), margin)
    assert torch.equal(out_t, expected)


def test_compute_scale_per_role_fp8_max_broadcast():
    amax = t32([[1.0, 2.0, 7.0], [0.0, math.nan, TINY]])  # (N=2, 3 roles)
    prev = t32([[0.5, 0.5, 0.5], [3.0, 4.0, 5.0]])
    out = compute_scale(amax, prev, t32([E4M3_MAX, E4M3_MAX, E5M2_MAX]), 0)
    assert torch.equal(out, t32([[448.0, 224.0, 8192.0], [3.0, 4.0, F32_MAX]]))


# ----------------------------------------------------------------------------- amax_from_history
@pytest.mark.parametrize("h", HISTORY_LENS)
@pytest.mark.parametrize("algo", ALGOS)
def test_amax_from_history_matches_reference(h, algo):
    rows = random_history(random.Random(h), h)
    hist = t32(rows)
    before = hist.clone()
    out = amax_from_history(hist, algo)
    assert torch.equal(out, t32(ref_amax(rows, algo)))
    assert torch.equal(hist, before)
    out.fill_(-1.0)  # the result is a new tensor, not a view of row 0
    assert torch.equal(hist, before)


def test_amax_from_history_explicit_and_non_finite():
    rows = [[1.0, 0.0, 5.0], [4.0, math.nan, 2.0], [2.0, 3.0, math.inf]]
    out_max = amax_from_history(t32(rows), "max")
    assert out_max[0].item() == 4.0
    assert out_max[1].item() == 3.0  # fmaxf: a NaN in the window is ignored, as TE's kernel does
    assert out_max[2].item() == math.inf
    assert amax_from_history(t32([[math.nan], [math.nan]]), "max").item() == 0.0  # fmaxf(0, nan)
    assert torch.equal(amax_from_history(t32(rows), "most_recent"), t32([1.0, 0.0, 5.0]))


def test_amax_from_history_rejects_unknown_algo():
    with pytest.raises(ValueError, match="amax_compute_algo"):
        amax_from_history(torch.zeros(4, 3), "mean")


# ----------------------------------------------------------------------------- roll_history
def test_roll_history_explicit():
    hist = t32([[1.0], [2.0], [3.0], [4.0]])
    out = roll_history(hist)
    # row 0 (current) -> last row, row 1 (oldest) dropped, row 0 zero
    assert torch.equal(out, t32([[0.0], [3.0], [4.0], [1.0]]))
    assert torch.equal(hist, t32([[1.0], [2.0], [3.0], [4.0]]))


@pytest.mark.parametrize("h", HISTORY_LENS)
def test_roll_history_matches_reference(h):
    rows = random_history(random.Random(10 + h), h)
    rows[0] = [5.0, 6.0, 7.0]  # non-zero current row, so zeroing it is visible
    hist = t32(rows)
    expected = t32(ref_roll(rows))
    assert not torch.equal(expected, hist)
    out = roll_history(hist)
    assert torch.equal(out, expected)
    assert torch.equal(hist, t32(rows))


def test_update_takes_amax_over_the_window_before_the_roll():
    # Transformer Engine: amax over the whole window (oldest row 1 included), then roll.
    hist = t32([[1.0, 1.0, 1.0], [100.0, 2.0, 2.0], [2.0, 3.0, 3.0], [3.0, 4.0, 4.0]])
    new_hist, new_scale = update_history_and_scale(
        hist, t32([1.0, 1.0, 1.0]), t32([E4M3_MAX, E4M3_MAX, E5M2_MAX]), 0, "max"
    )
    # after the roll the window max would be 3 / 4; TE's order gives 100 / 4 / 4
    assert torch.equal(new_scale, t32([f32(448.0 / 100.0), 112.0, 14336.0]))
    assert torch.equal(new_hist, t32([[0.0] * 3, [2.0, 3.0, 3.0], [3.0, 4.0, 4.0], [1.0, 1.0, 1.0]]))


# ----------------------------------------------------------------------------- update_scales on a Linear
SPECIALS = ("normal", "zero", "tiny", "inf", "nan")


def _history_with_special(rng: random.Random, h: int, algo: str, special: str, col: int):
    """A full history whose amax (by ``algo``) in column ``col`` is the special case."""
    rows = [[f32(2.0 ** rng.uniform(-20, 20)) for _ in range(3)] for _ in range(h)]
    window_rows = range(h) if algo == "max" else [0]  # rows the amax is read from
    if special in ("zero", "tiny"):
        for r in window_rows:
            rows[r][col] = 0.0
        if special == "tiny":  # recorded this step (row 0), so the column rolls and rescales
            rows[0][col] = f32(TINY)
    elif special in ("inf", "nan"):
        rows[rng.randrange(h) if algo == "max" else 0][col] = math.inf if special == "inf" else math.nan
    return rows


@pytest.mark.parametrize("h", HISTORY_LENS)
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("fp8_format", ("hybrid", "e4m3"))
@pytest.mark.parametrize("special", SPECIALS)
def test_update_scales_on_linear_matches_reference(h, algo, margin, fp8_format, special):
    scaling = DelayedScaling(fp8_format=fp8_format, amax_history_len=h, amax_compute_algo=algo, margin=margin)
    layer = fp8lab.Linear(16, 16, fp8=FP8Options(scaling=scaling, fallback="emulated"))
    layer(torch.randn(2, 16))  # a real training forward: the layer has run this step
    state = layer.fp8_state
    col = SPECIALS.index(special) % 3
    rng = random.Random(f"{h}-{algo}-{margin}-{fp8_format}-{special}")
    rows = _history_with_special(rng, h, algo, special, col)
    prev = [f32(0.37), f32(5.5), f32(1234.5)]
    state.amax_history.copy_(t32(rows))
    state.scale.copy_(t32(prev))
    maxima = (E4M3_MAX, E4M3_MAX, E5M2_MAX) if fp8_format == "hybrid" else (E4M3_MAX,) * 3

    new_rows, new_scales = ref_te_update(rows, prev, maxima, margin, algo)
    expected_scale, expected_history = t32(new_scales), t32(new_rows)
    history_before, scale_before = state.amax_history.clone(), state.scale.clone()
    assert not torch.equal(expected_history.nan_to_num(), history_before.nan_to_num())
    assert not torch.equal(expected_scale, scale_before)

    fp8lab.update_scales(layer)

    # nan sits in the rolled history too; compare it position-exactly, then the rest
    assert torch.equal(state.amax_history.isnan(), expected_history.isnan())
    assert torch.equal(state.amax_history.nan_to_num(), expected_history.nan_to_num())
    assert torch.equal(state.scale, expected_scale)
    if special in ("zero", "inf") or (special == "nan" and algo == "most_recent"):
        assert state.scale[col].item() == prev[col]
    elif special == "tiny":
        assert state.scale[col].item() == F32_MAX
    if special == "zero":  # row 0 is 0: the column neither rolls nor rescales
        assert torch.equal(state.amax_history[:, col], t32(rows)[:, col])


# ----------------------------------------------------------------------------- DelayedScaling
@pytest.mark.parametrize(
    "field, value",
    [
        ("fp8_format", "e5m2"),
        ("amax_history_len", 0),
        ("amax_history_len", 1.5),
        ("amax_history_len", True),
        ("amax_compute_algo", "mean"),
        ("margin", -1),
        ("reduce_amax", "yes"),
    ],
)
def test_delayed_scaling_rejects_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        DelayedScaling(**{field: value})


def test_delayed_scaling_defaults_equal_transformer_engines():
    r = DelayedScaling()
    assert (r.fp8_format, r.amax_history_len, r.amax_compute_algo, r.margin, r.reduce_amax) == (
        "hybrid",
        1024,
        "max",
        0,
        True,
    )
    assert r.fp8_max == (E4M3_MAX, E4M3_MAX, E5M2_MAX)
    assert DelayedScaling(fp8_format="e4m3").fp8_max == (E4M3_MAX,) * 3


def test_delayed_scaling_accepts_valid_non_defaults_and_is_frozen():
    r = DelayedScaling(
        fp8_format="e4m3", amax_history_len=1, amax_compute_algo="most_recent", margin=3, reduce_amax=False
    )
    assert (r.fp8_format, r.amax_history_len, r.margin) == ("e4m3", 1, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.margin = 0
    with pytest.raises(TypeError):
        DelayedScaling("hybrid")  # keyword-only
