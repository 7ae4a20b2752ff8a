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
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define SEG 2048  /* elements of a row converted to float32 at a time (a multiple of every block width used) */

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

/* n elements of x from index at, as float32 (exact), into buf: one branch-free loop per dtype. */
static void to_float(float *restrict buf, const void *x, int bf16, int64_t at, int64_t n) {
    if (bf16) {
        const uint16_t *p = (const uint16_t *)x + at;
        for (int64_t j = 0; j < n; j++) buf[j] = float_of((uint32_t)p[j] << 16);
    } else {
        memcpy(buf, (const float *)x + at, sizeof(float) * n);
    }
}

/* Round to nearest even into bfloat16 (NaN -> 0x7FC0, as torch's scalar conversion). */
static inline uint16_t bf16_of(float v) {
    const uint32_t u = bits_of(v);
    const uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0 : rounded;
}

static void from_float(void *out, int out_bf16, int64_t at, const float *restrict buf, int64_t n) {
    if (out_bf16) {
        uint16_t *p = (uint16_t *)out + at;
        for (int64_t j = 0; j < n; j++) p[j] = bf16_of(buf[j]);
    } else {
        memcpy((float *)out + at, buf, sizeof(float) * n);
    }
}

/* The larger of m and |a|, NaN a ignored (m kept), as fmaxf does. */
static inline float larger(float m, float a) {
    a = fabsf(a);
    return a > m ? a : m;
}

/* n elements of x from index at as the float32 bits of their magnitudes, NaN as 0 (the bits of +0),
 * into bits: non-negative floats order as their bits, so an integer maximum of these is fmaxf's
 * maximum with NaN ignored, and GCC vectorises an integer max reduction (a float one it keeps
 * scalar, since reordering it would reorder NaN comparisons). */
static void to_magnitude_bits(uint32_t *restrict bits, const void *x, int bf16, int64_t at, int64_t n,
                              int64_t *nans) {
    if (bf16) {
        const uint16_t *p = (const uint16_t *)x + at;
        for (int64_t j = 0; j < n; j++) bits[j] = (uint32_t)(p[j] & 0x7FFFu) << 16;
    } else {
        memcpy(bits, (const float *)x + at, sizeof(float) * n);
        for (int64_t j = 0; j < n; j++) bits[j] &= 0x7FFFFFFFu;
    }
    if (nans) {  /* counted where asked: NaN becomes 0 below */
        int64_t count = 0;
        for (int64_t j = 0; j < n; j++) count += bits[j] > 0x7F800000u;
        *nans += count;
    }
    for (int64_t j = 0; j < n; j++) bits[j] = bits[j] > 0x7F800000u ? 0u : bits[j];
}

/* The largest of n magnitude bits and m. */
static inline uint32_t max_bits(uint32_t m, const uint32_t *restrict bits, int64_t n) {
    for (int64_t j = 0; j < n; j++) m = bits[j] > m ? bits[j] : m;
    return m;
}

/* The segment width for blocks bc wide: whole blocks (bc == 1: any). */
static inline int64_t segment(int64_t bc) { return bc >= SEG ? bc : SEG / bc * bc; }

/* fmaxf(|x|) per block (NaN ignored, inf counted; an all-NaN block gives 0), into amax (nbr x nbc, ld);
 * the number of NaN elements into *nans unless it is NULL (the raw amax's NaN, in the same pass). */
int fp8lab_block_amax(const void *x, int bf16, int64_t sr, int64_t r, int64_t c, int64_t br, int64_t bc,
                      float *amax, int64_t ld, int nthreads, int64_t *nans) {
    const int64_t nbr = (r + br - 1) / br, nbc = (c + bc - 1) / bc, seg = segment(bc);
    if (nthreads < 1) nthreads = 1;
    float *bufs = malloc(sizeof(float) * seg * nthreads);  /* floats, or (row blocks) magnitude bits */
    if (!bufs) return -1;
    int64_t nan_count = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(+ : nan_count)
    for (int64_t bi = 0; bi < nbr; bi++) {
#ifdef _OPENMP
        float *buf = bufs + seg * omp_get_thread_num();
#else
        float *buf = bufs;
#endif
        float *row = amax + bi * ld;
        for (int64_t bj = 0; bj < nbc; bj++) row[bj] = 0.0f;
        const int64_t i1 = (bi + 1) * br < r ? (bi + 1) * br : r;
        for (int64_t i = bi * br; i < i1; i++)
            for (int64_t j0 = 0; j0 < c; j0 += seg) {
                const int64_t n = c - j0 < seg ? c - j0 : seg;
                if (bc == 1) {  /* blocks down the columns: an elementwise max into the row of maxima */
                    to_float(buf, x, bf16, i * sr + j0, n);
                    float *restrict m = row + j0;
                    for (int64_t j = 0; j < n; j++) m[j] = larger(m[j], buf[j]);
                    if (nans)
                        for (int64_t j = 0; j < n; j++) nan_count += buf[j] != buf[j];
                    continue;
                }
                uint32_t *restrict bits = (uint32_t *)buf;  /* the buffer holds bits here, never floats */
                to_magnitude_bits(bits, x, bf16, i * sr + j0, n, nans ? &nan_count : NULL);
                for (int64_t b0 = 0; b0 < n; b0 += bc) {
                    const int64_t w = n - b0 < bc ? n - b0 : bc, b = (j0 + b0) / bc;
                    row[b] = float_of(max_bits(bits_of(row[b]), bits + b0, w));  /* row[b] >= 0: bits order */
                }
            }
    }
    free(bufs);
    if (nans) *nans = nan_count;
    return 0;
}

/* One element: scaled, clamped (NaN stays NaN), rounded to nearest even on the FP8 grid by the magic
 * number of its binade, then times the block's inverse scale (1 when there is none). */
static inline float cast_one(float x, float s, float si, float fmax, uint32_t min_normal_bits, float alpha) {
    float v = x * s;
    v = v > fmax ? fmax : (v < -fmax ? -fmax : v);
    uint32_t e = bits_of(v) & 0x7F800000u;
    e = e > min_normal_bits ? e : min_normal_bits;
    const float m = float_of(e) * alpha;
    v = (v + m) - m;
    return v * si;
}

/*
 * out (r x c, row stride so; float32, or bfloat16 if out_bf16) = each element
 *   v = x * scale[block]                (float32, one rounding)
 *   v = clamp(v, -fmax, fmax)           (NaN stays NaN)
 *   v = (v + M) - M, M = 2^max(floor(log2|v|), e_min) * alpha   (round to nearest even on the FP8
 *        grid: alpha = 1.5 * 2^(23 - mantissa bits); min_normal_bits = the float32 bits of 2^e_min)
 *   v = v * scale_inv[block]            (times 1 when scale_inv is NULL: exact)
 * exactly as fp8lab.quantize.tensor.round_fp32_to_fp8_grid_ and blocks.cast_blocks_dequantized do.
 */
int fp8lab_block_cast(const void *x, int bf16, int64_t sr, int64_t r, int64_t c, int64_t br, int64_t bc,
                      const float *scale, const float *scale_inv, int64_t ld, float fmax, uint32_t min_normal_bits,
                      float alpha, void *out, int out_bf16, int64_t so, int nthreads) {
    const int64_t nbr = (r + br - 1) / br, seg = segment(bc);
    if (nthreads < 1) nthreads = 1;
    float *bufs = malloc(sizeof(float) * seg * nthreads);
    if (!bufs) return -1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bi = 0; bi < nbr; bi++) {
#ifdef _OPENMP
        float *restrict buf = bufs + seg * omp_get_thread_num();
#else
        float *restrict buf = bufs;
#endif
        const float *s = scale + bi * ld, *si = scale_inv ? scale_inv + bi * ld : NULL;
        const int64_t i1 = (bi + 1) * br < r ? (bi + 1) * br : r;
        for (int64_t i = bi * br; i < i1; i++)
            for (int64_t j0 = 0; j0 < c; j0 += seg) {
                const int64_t n = c - j0 < seg ? c - j0 : seg;
                to_float(buf, x, bf16, i * sr + j0, n);
                if (bc == 1) {  /* blocks down the columns: one scale per column */
                    const float *restrict sj = s + j0, *restrict sij = si ? si + j0 : NULL;
                    if (sij)
                        for (int64_t j = 0; j < n; j++) buf[j] = cast_one(buf[j], sj[j], sij[j], fmax, min_normal_bits, alpha);
                    else
                        for (int64_t j = 0; j < n; j++) buf[j] = cast_one(buf[j], sj[j], 1.0f, fmax, min_normal_bits, alpha);
                } else {
                    for (int64_t b0 = 0; b0 < n; b0 += bc) {
                        const int64_t w = n - b0 < bc ? n - b0 : bc, b = (j0 + b0) / bc;
                        const float sb = s[b], sib = si ? si[b] : 1.0f;
                        for (int64_t j = 0; j < w; j++)
                            buf[b0 + j] = cast_one(buf[b0 + j], sb, sib, fmax, min_normal_bits, alpha);
                    }
                }
                from_float(out, out_bf16, i * so + j0, buf, n);
            }
    }
    free(bufs);
    return 0;
}

/* ---------------------------------------------------------------- NVFP4: E2M1 values, E4M3 block scales */

#define E2M1_MAX 6.0f

/* The E2M1 spacing at magnitude a (>= 0): 0.5 below 2, 1 in [2, 4), 2 from 4 (2 for inf and NaN), from
 * the exponent field alone, as fp8lab.quantize.fp4._step computes it. */
static inline float e2m1_step(float a) {
    float s = float_of(bits_of(a) & 0x7F800000u) * 0.5f;
    s = s < 0.5f ? 0.5f : s;  /* NaN never reaches here: the exponent field of NaN is inf's */
    return s > 2.0f ? 2.0f : s;
}

/* v (already x * encode) onto E2M1, satfinite, to nearest even, as fp8lab.quantize.fp4.round_to_e2m1
 * does it: NaN -> 6, clamped to +-6, rounded by the magic number of its binade. */
static inline float e2m1_rne(float v) {
    /* every comparison made unconditionally (an ordered one nested under the NaN test is not
     * if-converted without AVX-512's masks under -ftrapping-math, and the loop stays scalar) */
    float q = v > E2M1_MAX ? E2M1_MAX : v;
    q = q < -E2M1_MAX ? -E2M1_MAX : q;
    q = v != v ? E2M1_MAX : q;
    uint32_t e = bits_of(q) & 0x7F800000u;
    e = e > 0x3F800000u ? e : 0x3F800000u;  /* E2M1's smallest normal, 1 */
    const float m = float_of(e) * 6291456.0f;  /* 1.5 * 2^(23 - 1) */
    return (q + m) - m;
}

/* The same stochastically with the 8 random bits r (0..255), TE's definition as fp4.round_to_e2m1
 * computes it: t = |v| + step(|v|) * r / 256 (the product exact, one rounding), floored onto the
 * spacing at t, at most 6, with v's sign; NaN -> +6. The floor on the bits: from 1 up (spacing 0.5
 * in [1, 2), 1 in [2, 4), 2 from 4) E2M1 keeps one mantissa bit, so floor(t / step) * step is t with
 * the rest cleared (inf stays inf); in [0.5, 1) it is 0.5, below 0. Exactly the quotient, floor and
 * product, without a division. */
static inline float e2m1_sr(float v, float r) {
    const float a = fabsf(v);
    const float t = e2m1_step(a) * r * (1.0f / 256.0f) + a;
    float q = float_of(bits_of(t) & 0xFFC00000u);
    q = t < 1.0f ? (t < 0.5f ? 0.0f : 0.5f) : q;
    q = q > E2M1_MAX ? E2M1_MAX : q;
    const float signed_q = float_of(bits_of(q) | (bits_of(v) & 0x80000000u));  /* copysignf: q >= 0 */
    return v != v ? E2M1_MAX : signed_q;
}

/* The 8 random bits of element idx (its row-major index in the tensor as the caller sees it, mod 2^32) of
 * a stochastically rounded cast with key ``key``: the top byte of a 32-bit integer hash (Wellons'
 * lowbias32) of idx * 0x9E3779B1 + key. fp8lab.quantize.fp4.sr_bits computes the same in torch. */
static inline uint32_t sr_byte(uint32_t idx, uint32_t key) {
    uint32_t h = idx * 0x9E3779B1u + key;
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x846CA68Bu;
    h ^= h >> 16;
    return h >> 24;
}

/*
 * out (r x c, row stride so; float32, or bfloat16 if out_bf16) = each element's E2M1 value of
 * x * encode[block] (float32), times decode[block]: fp8lab.quantize.fp4's cast_blocks_e2m1 then
 * dequantize_blocks. stochastic: round with the random bits sr_byte(i * ir + j * ic, key) of element (i, j)
 * (ir, ic: the element's index strides in the caller's layout), else to nearest even. encode and decode:
 * the block grid, row stride ld.
 */
int fp8lab_block_cast_e2m1(const void *x, int bf16, int64_t sr, int64_t r, int64_t c, int64_t br, int64_t bc,
                           const float *encode, const float *decode, int64_t ld, int stochastic, uint32_t key,
                           int64_t ir, int64_t ic, void *out, int out_bf16, int64_t so, int nthreads) {
    const int64_t nbr = (r + br - 1) / br, seg = segment(bc);
    if (nthreads < 1) nthreads = 1;
    float *bufs = malloc(sizeof(float) * 2 * seg * nthreads);  /* per thread: values, random bits as floats */
    if (!bufs) return -1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bi = 0; bi < nbr; bi++) {
#ifdef _OPENMP
        float *restrict buf = bufs + 2 * seg * omp_get_thread_num();
#else
        float *restrict buf = bufs;
#endif
        float *restrict rf = buf + seg;
        const float *en = encode + bi * ld, *de = decode + bi * ld;
        const int64_t i1 = (bi + 1) * br < r ? (bi + 1) * br : r;
        for (int64_t i = bi * br; i < i1; i++)
            for (int64_t j0 = 0; j0 < c; j0 += seg) {
                const int64_t n = c - j0 < seg ? c - j0 : seg;
                const int rb = stochastic;
                to_float(buf, x, bf16, i * sr + j0, n);
                if (rb) {
                    const uint32_t at = (uint32_t)(i * ir + j0 * ic), step = (uint32_t)ic;
                    for (int64_t j = 0; j < n; j++) rf[j] = (float)sr_byte(at + (uint32_t)j * step, key);
                }
                if (bc == 1) {  /* blocks down the columns: one scale per column */
                    const float *restrict e = en + j0, *restrict d = de + j0;
                    if (rb)
                        for (int64_t j = 0; j < n; j++) buf[j] = e2m1_sr(buf[j] * e[j], rf[j]) * d[j];
                    else
                        for (int64_t j = 0; j < n; j++) buf[j] = e2m1_rne(buf[j] * e[j]) * d[j];
                } else {
                    for (int64_t b0 = 0; b0 < n; b0 += bc) {
                        const int64_t w = n - b0 < bc ? n - b0 : bc, b = (j0 + b0) / bc;
                        const float e = en[b], d = de[b];
                        float *restrict v = buf + b0;
                        if (rb)
                            for (int64_t j = 0; j < w; j++) v[j] = e2m1_sr(v[j] * e, rf[b0 + j]) * d;
                        else
                            for (int64_t j = 0; j < w; j++) v[j] = e2m1_rne(v[j] * e) * d;
                    }
                }
                from_float(out, out_bf16, i * so + j0, buf, n);
            }
    }
    free(bufs);
    return 0;
}

/*
 * NVFP4's random Hadamard transform along dim 0 (fp8lab.quantize.fp4.apply_rht_dim0): out (rp x c,
 * float32, rp = r rounded up to 16, rows past r zero) = for each group g of 16 rows, row i of the group
 * = sum over k of x[16 g + k] * signs[k] * H16[k][i] / 4, summed in double and rounded once to float32.
 * The sum is a fast Walsh-Hadamard transform (four butterfly stages), exact in double whenever the
 * 16 terms' exponents span less than ~29 binades, as the torch code's float64 GEMM is.
 */
#define RHT_N 16
#define RHT_W 256  /* columns per pass: 16 rows of doubles stay in L1 */

/* Columns j0 .. j0 + w of group g of the transform, as float32, into out[16][RHT_W]: column by column,
 * its 16 values in registers through the four butterfly stages (vectorised across the columns). */
static void rht_tile(const void *x, int bf16, int64_t sr, int64_t r, const float *signs, int64_t g, int64_t j0,
                     int64_t w, float out[RHT_N][RHT_W]) {
    double sk[RHT_N];
    for (int k = 0; k < RHT_N; k++) {
        const int64_t i = g * RHT_N + k;
        if (i < r) {
            to_float(out[k], x, bf16, i * sr + j0, w);
            sk[k] = signs[k];
        } else {  /* rows past r: +0 (times +1, so no -0 enters the sums) */
            memset(out[k], 0, sizeof(float) * w);
            sk[k] = 1.0;
        }
    }
    for (int64_t j = 0; j < w; j++) {  /* straight-line code inside, so this loop vectorises */
        double y[RHT_N];
        for (int k = 0; k < RHT_N; k++) y[k] = sk[k] * (double)out[k][j];
#define BF(a, b) { const double u = y[a], v = y[b]; y[a] = u + v; y[b] = u - v; }
        BF(0, 1) BF(2, 3) BF(4, 5) BF(6, 7) BF(8, 9) BF(10, 11) BF(12, 13) BF(14, 15)
        BF(0, 2) BF(1, 3) BF(4, 6) BF(5, 7) BF(8, 10) BF(9, 11) BF(12, 14) BF(13, 15)
        BF(0, 4) BF(1, 5) BF(2, 6) BF(3, 7) BF(8, 12) BF(9, 13) BF(10, 14) BF(11, 15)
        BF(0, 8) BF(1, 9) BF(2, 10) BF(3, 11) BF(4, 12) BF(5, 13) BF(6, 14) BF(7, 15)
#undef BF
        for (int i = 0; i < RHT_N; i++) out[i][j] = (float)(y[i] * 0.25);
    }
}

#define FOR_EACH_RHT_TILE                                                                       \
    const int64_t groups = (r + RHT_N - 1) / RHT_N, panels = (c + RHT_W - 1) / RHT_W;          \
    if (nthreads < 1) nthreads = 1;                                                             \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                          \
    for (int64_t t = 0; t < groups * panels; t++)

int fp8lab_rht_dim0(const void *x, int bf16, int64_t sr, int64_t r, int64_t c, const float *signs, float *out,
                    int nthreads) {
    FOR_EACH_RHT_TILE {
        const int64_t g = t / panels, j0 = (t % panels) * RHT_W, w = c - j0 < RHT_W ? c - j0 : RHT_W;
        float tile[RHT_N][RHT_W];
        rht_tile(x, bf16, sr, r, signs, g, j0, w, tile);
        for (int i = 0; i < RHT_N; i++) memcpy(out + (g * RHT_N + i) * c + j0, tile[i], sizeof(float) * w);
    }
    return 0;
}

/* fp8lab_block_amax of the transform in (16, 1) blocks, the transform never stored: amax ((rp / 16) x c). */
int fp8lab_rht_amax(const void *x, int bf16, int64_t sr, int64_t r, int64_t c, const float *signs, float *amax,
                    int nthreads) {
    FOR_EACH_RHT_TILE {
        const int64_t g = t / panels, j0 = (t % panels) * RHT_W, w = c - j0 < RHT_W ? c - j0 : RHT_W;
        float tile[RHT_N][RHT_W];
        rht_tile(x, bf16, sr, r, signs, g, j0, w, tile);
        float *restrict m = amax + g * c + j0;
        for (int64_t j = 0; j < w; j++) m[j] = 0.0f;
        for (int i = 0; i < RHT_N; i++)
            for (int64_t j = 0; j < w; j++) m[j] = larger(m[j], tile[i][j]);
    }
    return 0;
}

/* fp8lab_block_cast_e2m1 of the transform in (16, 1) blocks (encode, decode: (rp / 16) x c), the transform
 * never stored: out (rp x c), element (i, j) rounded with the random bits of index i * c + j. */
int fp8lab_rht_cast_e2m1(const void *x, int bf16, int64_t sr, int64_t r, int64_t c, const float *signs,
                         const float *encode, const float *decode, int stochastic, uint32_t key, void *out,
                         int out_bf16, int nthreads) {
    FOR_EACH_RHT_TILE {
        const int64_t g = t / panels, j0 = (t % panels) * RHT_W, w = c - j0 < RHT_W ? c - j0 : RHT_W;
        float tile[RHT_N][RHT_W], rf[RHT_W];
        rht_tile(x, bf16, sr, r, signs, g, j0, w, tile);
        const float *restrict e = encode + g * c + j0, *restrict d = decode + g * c + j0;
        for (int k = 0; k < RHT_N; k++) {
            const int64_t i = g * RHT_N + k;
            float *restrict v = tile[k];
            if (stochastic) {
                const uint32_t at = (uint32_t)(i * c + j0);
                for (int64_t j = 0; j < w; j++) rf[j] = (float)sr_byte(at + (uint32_t)j, key);
                for (int64_t j = 0; j < w; j++) v[j] = e2m1_sr(v[j] * e[j], rf[j]) * d[j];
            } else {
                for (int64_t j = 0; j < w; j++) v[j] = e2m1_rne(v[j] * e[j]) * d[j];
            }
            from_float(out, out_bf16, i * c + j0, v, w);
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- block scales from block amaxes */

/*
 * The scale arithmetic the block recipes run on their amax grids (n values, contiguous), one pass over
 * the small grid instead of a dozen tensor operations, each step the float32 operation of the torch
 * function named (same order, same roundings; -ffp-contract=off, NaN comparisons kept). Selects only,
 * so the loops vectorise.
 */

/* fp8lab.scaling.te_scales.te_scale_from_amax: TE's compute_scale_from_amax. */
int fp8lab_te_scales(const float *amax, int64_t n, float fp8_max, float epsilon, float value_for_inf, int pow2,
                     float *scale) {
    for (int64_t i = 0; i < n; i++) {
        const float a = amax[i] < epsilon ? epsilon : amax[i];  /* NaN < epsilon is false */
        float s = fp8_max / a;
        s = (fabsf(a) == INFINITY || a == 0.0f || a != a) ? 1.0f : s;
        s = fabsf(s) == INFINITY ? value_for_inf : s;
        scale[i] = pow2 ? float_of(bits_of(s) & 0xFF800000u) : s;
    }
    return 0;
}

/* fp8lab.scaling.te_scales: float_to_e8m0(amax * rcp), then e8m0_scale (2^(127 - e); code 0: 1, 254:
 * 2^-127, 255: NaN) and e8m0_scale_inv (2^(e - 127); code 0: 2^-127, 255: NaN). */
int fp8lab_e8m0_scales(const float *amax, int64_t n, float rcp, float *scale, float *scale_inv) {
    const float nan = float_of(0x7FC00000u);
    for (int64_t i = 0; i < n; i++) {
        const float v = amax[i] * rcp;
        const uint32_t b = bits_of(v) & 0x7FFFFFFFu, up = (b + 0x7FFFFFu) >> 23;
        uint32_t e = up > 0xFEu ? 0xFEu : up;
        e = b <= 0x400000u ? 0u : e;
        e = v != v ? 0xFFu : e;
        float s = float_of((e < 254u ? 254u - e : 0u) << 23);
        s = e == 0u ? 1.0f : (e == 254u ? float_of(0x00400000u) : s);  /* 2^-127: a float32 subnormal */
        scale[i] = e == 255u ? nan : s;
        scale_inv[i] = e == 255u ? nan : (e == 0u ? float_of(0x00400000u) : float_of(e << 23));
    }
    return 0;
}

/* fp8lab.scaling.nvfp4_scales.block_scales: from the tensor amax, global_encode_scale, global_decode_scale;
 * then of each block amax (n), block_decode_scale (E4M3 by magic-number rounding: min normal 2^-6, 3
 * mantissa bits) and block_encode_scale, into decode and encode. */
int fp8lab_nvfp4_scales(const float *block_amax, int64_t n, float amax, float *decode, float *encode) {
    float s_enc = 2688.0f / amax;  /* 448 * 6 */
    s_enc = (s_enc != s_enc || s_enc > FLT_MAX) ? FLT_MAX : s_enc;
    s_enc = (amax == 0.0f || s_enc == 0.0f) ? 1.0f : s_enc;
    const float s_dec = (float)(1.0 / (double)s_enc);
    const float multiplier = s_enc * (float)(1.0 / 6.0);  /* TE's fp4_max_inv, rounded once */
    const float m_min = float_of(0x3C800000u) * 1572864.0f;  /* 2^-6 * 1.5 * 2^(23 - 3) */
    for (int64_t i = 0; i < n; i++) {
        float d = block_amax[i] * multiplier;
        d = d > FLT_MAX ? FLT_MAX : d;
        d = d > 448.0f ? 448.0f : (d < -448.0f ? -448.0f : d);
        const uint32_t e = bits_of(d) & 0x7F800000u;
        const float m = e > 0x3C800000u ? float_of(e) * 1572864.0f : m_min;
        d = (d + m) - m;
        decode[i] = d;
        const float en = 1.0f / (d * s_dec);
        encode[i] = en > FLT_MAX ? FLT_MAX : en;
    }
    return 0;
}

/*
 * One NVFP4 cast, every step above in one call (fp8lab.scaling.nvfp4's operand): the block amaxes into
 * grid (nbr x nbc, contiguous; of the transform in (16, 1) blocks when signs is not NULL, rows rounded
 * up to 16), the tensor amax (the largest of them) into *amax, the scales into decode and encode (like
 * grid), the E2M1 cast into out (row stride so; the transform's: rp x c, row stride c) and, where nans
 * is not NULL, the number of NaN elements of x into *nans (not with signs).
 */
int fp8lab_nvfp4_cast(const void *x, int bf16, int64_t sr, int64_t r, int64_t c, int64_t br, int64_t bc,
                      const float *signs, int stochastic, uint32_t key, int64_t ir, int64_t ic, float *grid,
                      float *amax, float *decode, float *encode, int64_t *nans, void *out, int out_bf16, int64_t so,
                      int nthreads) {
    const int64_t nbr = (r + br - 1) / br, nbc = (c + bc - 1) / bc;
    int rc = signs ? fp8lab_rht_amax(x, bf16, sr, r, c, signs, grid, nthreads)
                   : fp8lab_block_amax(x, bf16, sr, r, c, br, bc, grid, nbc, nthreads, nans);
    if (rc) return rc;
    uint32_t top = 0;  /* block amaxes are >= 0 and never NaN: their bits order as they do */
    for (int64_t i = 0; i < nbr * nbc; i++) top = bits_of(grid[i]) > top ? bits_of(grid[i]) : top;
    *amax = float_of(top);
    fp8lab_nvfp4_scales(grid, nbr * nbc, *amax, decode, encode);
    if (signs) return fp8lab_rht_cast_e2m1(x, bf16, sr, r, c, signs, encode, decode, stochastic, key, out, out_bf16,
                                           nthreads);
    return fp8lab_block_cast_e2m1(x, bf16, sr, r, c, br, bc, encode, decode, nbc, stochastic, key, ir, ic, out,
                                  out_bf16, so, nthreads);
}
