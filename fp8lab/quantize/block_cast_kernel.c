/*
 * fp8lab: block casts on the CPU in one pass each (the block recipes' amaxes and their FP8 casts).
 *
 * Invariant: every output equals, bit for bit, what fp8lab/quantize/blocks.py's torch code computes
 * (``blocks_amax``, ``cast_blocks_dequantized``), for every input, NaN, inf, zeros and subnormals
 * included: the same float32 operations in the same order, no contraction into FMAs (built with
 * -ffp-contract=off), no reassociation. Compiled at first use by fp8lab/quantize/block_cast_native.py
 * through fp8lab/native.py; no Python or torch headers.
 *
 * Layout: x is (r, c), row stride sr (elements), unit column stride, float32 or bfloat16. Blocks are
 * br x bc; the block grid is (ceil(r/br), ceil(c/bc)), row-major with row stride ld (elements) for the
 * amaxes, scales and inverse scales. Work is split across threads by block rows.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 16  /* partial maxima kept per 1 x bc block row, so the loop vectorises without a reduction */

static inline float load(const void *x, int bf16, int64_t at) {
    if (bf16) {
        const uint32_t u = (uint32_t)((const uint16_t *)x)[at] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return ((const float *)x)[at];
}

/* |v| with NaN ignored by the max that follows: m = a > m ? a : m keeps m for a NaN a, as fmaxf does. */
static inline float larger(float m, float a) { return a > m ? a : m; }

/* fmaxf(|x|) per block (NaN ignored, inf counted; an all-NaN block gives 0), into amax (nbr x nbc, ld). */
int fp8lab_block_amax(const void *x, int bf16, int64_t sr, int64_t r, int64_t c, int64_t br, int64_t bc,
                      float *amax, int64_t ld, int nthreads) {
    const int64_t nbr = (r + br - 1) / br, nbc = (c + bc - 1) / bc;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bi = 0; bi < nbr; bi++) {
        float *row = amax + bi * ld;
        for (int64_t bj = 0; bj < nbc; bj++) row[bj] = 0.0f;
        const int64_t i1 = (bi + 1) * br < r ? (bi + 1) * br : r;
        for (int64_t i = bi * br; i < i1; i++) {
            const int64_t base = i * sr;
            if (bc == 1) {  /* blocks down the columns: an elementwise max into the row of maxima */
                for (int64_t j = 0; j < c; j++) row[j] = larger(row[j], fabsf(load(x, bf16, base + j)));
                continue;
            }
            for (int64_t bj = 0; bj < nbc; bj++) {
                const int64_t j0 = bj * bc, j1 = j0 + bc < c ? j0 + bc : c;
                float lane[LANES] = {0};
                int64_t j = j0;
                for (; j + LANES <= j1; j += LANES)
                    for (int q = 0; q < LANES; q++) lane[q] = larger(lane[q], fabsf(load(x, bf16, base + j + q)));
                float m = row[bj];
                for (; j < j1; j++) m = larger(m, fabsf(load(x, bf16, base + j)));
                for (int q = 0; q < LANES; q++) m = larger(m, lane[q]);
                row[bj] = m;
            }
        }
    }
    return 0;
}

static inline uint32_t bits_of(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
}

static inline float float_of(uint32_t u) {
    float v;
    memcpy(&v, &u, 4);
    return v;
}

/* Round to nearest even into bfloat16 (NaN -> 0x7FC0, as torch rounds). */
static inline uint16_t bf16_of(float v) {
    const uint32_t u = bits_of(v);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* One element: scaled, clamped (NaN stays NaN), rounded to nearest even on the FP8 grid by the magic
 * number of its binade, then (dequantize) times the block's inverse scale. */
static inline float cast_one(float x, float s, float si, int dequantize, float fmax, uint32_t min_normal_bits,
                             float alpha) {
    float v = x * s;
    v = v > fmax ? fmax : (v < -fmax ? -fmax : v);
    uint32_t e = bits_of(v) & 0x7F800000u;
    e = e > min_normal_bits ? e : min_normal_bits;
    const float m = float_of(e) * alpha;
    v = (v + m) - m;
    return dequantize ? v * si : v;
}

static inline void store(void *out, int out_bf16, int64_t at, float v) {
    if (out_bf16)
        ((uint16_t *)out)[at] = bf16_of(v);
    else
        ((float *)out)[at] = v;
}

/*
 * out (r x c, row stride so; float32, or bfloat16 if out_bf16) = each element
 *   v = x * scale[block]                (float32, one rounding)
 *   v = clamp(v, -fmax, fmax)           (NaN stays NaN)
 *   v = (v + M) - M, M = 2^max(floor(log2|v|), e_min) * alpha   (round to nearest even on the FP8
 *        grid: alpha = 1.5 * 2^(23 - mantissa bits); min_normal_bits = the float32 bits of 2^e_min)
 *   v = v * scale_inv[block]            (when scale_inv is not NULL)
 * exactly as fp8lab.quantize.tensor.round_fp32_to_fp8_grid_ and blocks.cast_blocks_dequantized do.
 */
int fp8lab_block_cast(const void *x, int bf16, int64_t sr, int64_t r, int64_t c, int64_t br, int64_t bc,
                      const float *scale, const float *scale_inv, int64_t ld, float fmax, uint32_t min_normal_bits,
                      float alpha, void *out, int out_bf16, int64_t so, int nthreads) {
    const int64_t nbr = (r + br - 1) / br, nbc = (c + bc - 1) / bc;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bi = 0; bi < nbr; bi++) {
        const float *s = scale + bi * ld, *si = scale_inv ? scale_inv + bi * ld : NULL;
        const int64_t i1 = (bi + 1) * br < r ? (bi + 1) * br : r;
        for (int64_t i = bi * br; i < i1; i++) {
            if (bc == 1) {  /* blocks down the columns: one scale per column */
                for (int64_t j = 0; j < c; j++)
                    store(out, out_bf16, i * so + j,
                          cast_one(load(x, bf16, i * sr + j), s[j], si ? si[j] : 1.0f, si != NULL, fmax,
                                   min_normal_bits, alpha));
                continue;
            }
            for (int64_t bj = 0; bj < nbc; bj++) {
                const int64_t j0 = bj * bc, j1 = j0 + bc < c ? j0 + bc : c;
                const float sb = s[bj], sib = si ? si[bj] : 1.0f;
                for (int64_t j = j0; j < j1; j++)
                    store(out, out_bf16, i * so + j,
                          cast_one(load(x, bf16, i * sr + j), sb, sib, si != NULL, fmax, min_normal_bits, alpha));
            }
        }
    }
    return 0;
}
