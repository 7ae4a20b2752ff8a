/*
 * fp8lab: Hopper's FP8 tensor-core accumulator (sm_90 wgmma, FP8 inputs, fp32 accumulator), bit for bit.
 *
 * Invariant: every output is what fp8lab/gemm/accumulate.py documents (the five steps of one instruction,
 * chained over K, promoted every `promote` instructions, scaled per group), for every input, inf and NaN
 * included; the SIMD path and the generic path give the same bits. Compiled at first use by
 * fp8lab/gemm/accumulate_native.py; no Python or torch headers (they compile slowly).
 *
 * One instruction, per output element: D = C + sum of `chunk` exact products. Every term (C included)
 * is aligned to the largest exponent E among them, truncated toward zero to a multiple of 2^(E-F)
 * (F = fraction bits, 13 on Hopper), the truncated terms are added exactly, and the sum is truncated
 * toward zero to min(F, 23) fraction bits. Exponents: a product's is the sum of its operands' (a subnormal
 * operand takes its format's minimum, a zero EXP_ZERO), C's its fp32 exponent clamped at -126.
 *
 * SIMD path (AVX-512 or AVX2, F <= 16): in units of 2^(E-F) a truncated term is (int)(a*b * 2^(F-E)) --
 * a*b is exact in fp32, the power-of-two scale is exact, |term| < 2^(F+2) -- so a chunk's sum is an exact
 * int32 and step 5 is a mask of its float's low mantissa bits. Pass 1 finds E per output with int16
 * max-plus arithmetic (two ops per 2*VL products, the operand exponents broadcast straight from memory);
 * pass 2 costs four ops per VL products (mul, mul, truncating convert, integer add). Vectorised over N;
 * a tile of MR rows x NR columns keeps C and the promoted accumulator in registers over a K block, whose
 * B panel stays in L2 (the tile's state goes through memory between K blocks).
 * Generic path (any CPU, any F <= 40): the same steps per element in double, with frexp/ldexp.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_MXCSR 1
#endif

#define EXP_ZERO (-126)     /* the exponent of a zero operand, and the clamp of C's */
#define EXP_NONFINITE 2000  /* inf/NaN operand or C: any E >= EXP_FLAG makes the instruction an IEEE sum */
#define EXP_FLAG 1000
#define EXP_NONE (-30000)   /* start of a max, below every real exponent (int16) */
#define L2_BUDGET (384 * 1024)  /* bytes of a K block of B's panels (float + int16) kept in a core's L2 */

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define SIMD 512
#elif defined(__AVX2__) && defined(__FMA__)
#define SIMD 256
#else
#define SIMD 0
#endif

#define MR_G 4 /* generic path tile: MR_G x NR_G */
#define NR_G 8

typedef struct {
    int64_t m, n, k, n_ins, np;  /* np: N rounded up to nr (B's packed row length) */
    int chunk, frac, out_frac, promote, desc, mr, nr;
    const float *a, *c0, *sa, *sb;  /* a: row-major (M, K) */
    int64_t sa_ld, sb_ld;
    const int32_t *ea;   /* (M, K): each operand exponent twice, as two int16 (one 32-bit broadcast) */
    float *bp;           /* (K, np): B, zero-padded columns; as [panel][k][nr] */
    int16_t *eb;         /* its exponents, same layout */
    float *cst, *acc;    /* (M, N): chained C and promoted accumulator between K blocks */
} job_t;

/* The exponent the tensor core gives an FP8 operand: its own, emin for a subnormal, EXP_ZERO for zero,
 * EXP_NONFINITE for inf/NaN. *off: 1 if v is neither a value of the format (emin, mbits, largest value
 * with bits vmax_bits) nor inf/NaN. Written without branches so that the prepass loops vectorise. */
static inline int32_t operand_exponent(float v, int32_t emin, int32_t mbits, uint32_t vmax_bits, int32_t *off) {
    uint32_t u;
    memcpy(&u, &v, 4);
    const uint32_t mag = u & 0x7FFFFFFFu;
    const int32_t be = (int32_t)(mag >> 23), e = be - 127;
    const int32_t nonfinite = be == 255, zero = mag == 0;
    int32_t below = emin - e;
    below = below > 0 ? below : 0;
    int32_t shift = 23 - mbits + below; /* low mantissa bits that must be zero */
    const int32_t tiny = shift > 23;
    shift = shift < 23 ? shift : 23;
    const uint32_t low = u & ((1u << shift) - 1u);
    *off = (1 - nonfinite) & (1 - zero) & ((be == 0) | (mag > vmax_bits) | tiny | (low != 0));
    int32_t out = e > emin ? e : emin;
    out = zero ? EXP_ZERO : out;
    return nonfinite ? EXP_NONFINITE : out;
}

/* Row i of A: its exponents (each twice, as two int16 of an int32) and how many values are off the grid. */
static int64_t prep_a_row(const job_t *j, int64_t i, const int *fmt, uint32_t vmax_bits, int32_t *ea) {
    int32_t bad = 0;
    const float *a = j->a + i * j->k;
    int32_t *dst = ea + i * j->k;
    const int32_t emin = fmt[0], mbits = fmt[1];
    for (int64_t k = 0; k < j->k; k++) {
        int32_t off;
        const uint32_t e = (uint32_t)operand_exponent(a[k], emin, mbits, vmax_bits, &off) & 0xFFFFu;
        dst[k] = (int32_t)(e | (e << 16));
        bad += off;
    }
    return bad;
}

/* Row k of B (row-major, N columns) into its panels, columns past N zero. */
static int64_t prep_b_row(const job_t *j, const float *b, int64_t k, const int *fmt, uint32_t vmax_bits) {
    int32_t bad = 0;
    const int32_t emin = fmt[2], mbits = fmt[3];
    for (int64_t p = 0; p < j->np / j->nr; p++) {
        const int64_t c1 = j->n - p * j->nr < j->nr ? j->n - p * j->nr : j->nr;
        float *dst = j->bp + p * j->k * j->nr + k * j->nr;
        int16_t *edst = j->eb + p * j->k * j->nr + k * j->nr;
        memcpy(dst, b + k * j->n + p * j->nr, sizeof(float) * c1);
        memset(dst + c1, 0, sizeof(float) * (j->nr - c1));
        for (int c = 0; c < j->nr; c++) {
            int32_t off;
            edst[c] = (int16_t)operand_exponent(dst[c], emin, mbits, vmax_bits, &off);
            bad += off;
        }
    }
    return bad;
}

/* Instruction `ins` ends a promotion group (in the order the K loop visits instructions). */
static inline int promotes_after(const job_t *j, int64_t ins) {
    if (!j->promote) return 0;
    return j->desc ? ins % j->promote == 0 : (ins % j->promote == j->promote - 1 || ins == j->n_ins - 1);
}

/* Copy a tile (rows i0.., columns j0..) between an (M, N) matrix and a dense mr x nr buffer, inside (M, N);
 * a NULL matrix reads as zeros and takes no writes. */
static void tile_in(const job_t *j, const float *src, int64_t i0, int64_t j0, float *dst) {
    for (int r = 0; r < j->mr; r++)
        for (int c = 0; c < j->nr; c++)
            dst[r * j->nr + c] = (src && i0 + r < j->m && j0 + c < j->n) ? src[(i0 + r) * j->n + j0 + c] : 0.0f;
}

static void tile_out(const job_t *j, float *dst, int64_t i0, int64_t j0, const float *src) {
    if (!dst) return;
    for (int r = 0; r < j->mr && i0 + r < j->m; r++)
        for (int c = 0; c < j->nr && j0 + c < j->n; c++) dst[(i0 + r) * j->n + j0 + c] = src[r * j->nr + c];
}

/* The promotion's scales sA[i, g] * sB[g, j] (one fp32 rounding) for the tile, zeros outside. */
static void group_scales(const job_t *j, int64_t g, int64_t i0, int64_t j0, float *dst) {
    for (int r = 0; r < j->mr; r++)
        for (int c = 0; c < j->nr; c++) {
            const int in = i0 + r < j->m && j0 + c < j->n;
            dst[r * j->nr + c] = in ? j->sa[(i0 + r) * j->sa_ld + g] * j->sb[g * j->sb_ld + j0 + c] : 0.0f;
        }
}

static inline int64_t row_of(const job_t *j, int64_t i) { return i < j->m ? i : j->m - 1; }

/* The IEEE value of an instruction with an inf or NaN term: C + the products in double (no finite part
 * can overflow double, so the non-finite terms alone decide it, in any order). */
static float ieee_instruction(const job_t *j, const float *arow, const float *bpanel, int64_t k0, int64_t k1,
                              int c, float cin) {
    double s = (double)cin;
    for (int64_t k = k0; k < k1; k++) s += (double)arow[k] * (double)bpanel[k * j->nr + c];
    return (float)s;
}

/* ---------------------------------------------------------------- generic path (scalar, double) */

static inline int c_exponent_scalar(float c) {
    uint32_t u;
    memcpy(&u, &c, 4);
    const int be = (int)((u >> 23) & 0xFF);
    return be == 255 ? EXP_NONFINITE : (be < 1 ? 1 : be) - 127;
}

/* Step 5: truncate toward zero to out_frac fraction bits, with fp32's exponent range (clamped at -126). */
static inline float normalise_scalar(double v, int out_frac) {
    if (v == 0.0) return 0.0f;  /* +0: the hardware's integer sum has no sign of zero */
    int e;
    frexp(v, &e);
    e = e - 1 < -126 ? -126 : e - 1;  /* 2^e <= |v| */
    return (float)ldexp(trunc(ldexp(v, out_frac - e)), e - out_frac);  /* exact, or inf past fp32 */
}

static void tile_generic(const job_t *j, int64_t it, int64_t jt, int64_t t0, int64_t t1) {
    enum { T = MR_G * NR_G };
    const int64_t i0 = it * MR_G, j0 = jt * NR_G;
    const float *bpanel = j->bp + jt * j->k * NR_G;
    const int16_t *ebpanel = j->eb + jt * j->k * NR_G;
    float c[T], acc[T], s[T];
    tile_in(j, j->cst, i0, j0, c);
    tile_in(j, j->acc, i0, j0, acc);
    for (int64_t t = t0; t < t1; t++) {
        const int64_t ins = j->desc ? j->n_ins - 1 - t : t;
        const int64_t k0 = ins * j->chunk, k1 = k0 + j->chunk < j->k ? k0 + j->chunk : j->k;
        for (int r = 0; r < MR_G; r++) {
            const float *arow = j->a + row_of(j, i0 + r) * j->k;
            const int32_t *earow = j->ea + row_of(j, i0 + r) * j->k;
            for (int q = 0; q < NR_G; q++) {
                const float cin = c[r * NR_G + q];
                int e = c_exponent_scalar(cin);
                for (int64_t k = k0; k < k1; k++) {
                    const int ek = (int16_t)(earow[k] & 0xFFFF) + ebpanel[k * NR_G + q];
                    e = ek > e ? ek : e;
                }
                if (e >= EXP_FLAG) {
                    c[r * NR_G + q] = ieee_instruction(j, arow, bpanel, k0, k1, q, cin);
                    continue;
                }
                double sum = trunc(ldexp((double)cin, j->frac - e));
                for (int64_t k = k0; k < k1; k++)
                    sum += trunc(ldexp((double)arow[k] * (double)bpanel[k * NR_G + q], j->frac - e));
                c[r * NR_G + q] = normalise_scalar(ldexp(sum, e - j->frac), j->out_frac);
            }
        }
        if (promotes_after(j, ins)) {
            if (j->sa) {
                group_scales(j, ins / j->promote, i0, j0, s);
                for (int q = 0; q < T; q++) acc[q] = fmaf(c[q], s[q], acc[q]);
            } else {
                for (int q = 0; q < T; q++) acc[q] = acc[q] + c[q];
            }
            memset(c, 0, sizeof c);
        }
    }
    tile_out(j, j->cst, i0, j0, c);
    tile_out(j, j->acc, i0, j0, acc);
}

/* ---------------------------------------------------------------- SIMD path */

#if SIMD == 512
#define VL 16
#define MR 4
typedef __m512 vf;
typedef __m512i vi; /* VL int32 */
typedef __m512i vh; /* NR = 2 * VL int16 */
#define vf_load _mm512_loadu_ps
#define vf_store _mm512_storeu_ps
#define vf_set1 _mm512_set1_ps
#define vf_zero _mm512_setzero_ps
#define vf_add _mm512_add_ps
#define vf_mul _mm512_mul_ps
#define vf_fmadd _mm512_fmadd_ps
#define vf_as_vi _mm512_castps_si512
#define vi_as_vf _mm512_castsi512_ps
#define vf_to_vi_trunc _mm512_cvttps_epi32
#define vi_to_vf _mm512_cvtepi32_ps
#define vi_set1 _mm512_set1_epi32
#define vi_add _mm512_add_epi32
#define vi_sub _mm512_sub_epi32
#define vi_max _mm512_max_epi32
#define vi_and _mm512_and_si512
#define vi_srli _mm512_srli_epi32
#define vi_slli _mm512_slli_epi32
#define vi_store(p, x) _mm512_storeu_si512((void *)(p), (x))
#define vh_load(p) _mm512_loadu_si512((const void *)(p))
#define vh_set1 _mm512_set1_epi16
#define vh_bcast32(p) _mm512_set1_epi32(*(p)) /* two int16 copies: a plain 32-bit broadcast load */
#define vh_add _mm512_add_epi16
#define vh_max _mm512_max_epi16
#define vh_widen(x, h) _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64((x), (h)))
static inline vi vi_where_eq(vi x, int v, vi yes, vi no) {
    return _mm512_mask_blend_epi32(_mm512_cmpeq_epi32_mask(x, vi_set1(v)), no, yes);
}
static inline int vi_any_ge(vi x, int v) { return _mm512_cmpge_epi32_mask(x, vi_set1(v)) != 0; }
#elif SIMD == 256
#define VL 8
#define MR 2
typedef __m256 vf;
typedef __m256i vi;
typedef __m256i vh;
#define vf_load _mm256_loadu_ps
#define vf_store _mm256_storeu_ps
#define vf_set1 _mm256_set1_ps
#define vf_zero _mm256_setzero_ps
#define vf_add _mm256_add_ps
#define vf_mul _mm256_mul_ps
#define vf_fmadd _mm256_fmadd_ps
#define vf_as_vi _mm256_castps_si256
#define vi_as_vf _mm256_castsi256_ps
#define vf_to_vi_trunc _mm256_cvttps_epi32
#define vi_to_vf _mm256_cvtepi32_ps
#define vi_set1 _mm256_set1_epi32
#define vi_add _mm256_add_epi32
#define vi_sub _mm256_sub_epi32
#define vi_max _mm256_max_epi32
#define vi_and _mm256_and_si256
#define vi_srli _mm256_srli_epi32
#define vi_slli _mm256_slli_epi32
#define vi_store(p, x) _mm256_storeu_si256((__m256i *)(p), (x))
#define vh_load(p) _mm256_loadu_si256((const __m256i *)(p))
#define vh_set1 _mm256_set1_epi16
#define vh_bcast32(p) _mm256_set1_epi32(*(p))
#define vh_add _mm256_add_epi16
#define vh_max _mm256_max_epi16
#define vh_widen(x, h) _mm256_cvtepi16_epi32(_mm256_extracti128_si256((x), (h)))
static inline vi vi_where_eq(vi x, int v, vi yes, vi no) {
    return _mm256_blendv_epi8(no, yes, _mm256_cmpeq_epi32(x, vi_set1(v)));
}
static inline int vi_any_ge(vi x, int v) {
    return !_mm256_testz_si256(_mm256_cmpgt_epi32(x, vi_set1(v - 1)), _mm256_set1_epi32(-1));
}
#endif

#if SIMD
#define NV 2
#define NR (NV * VL)

/* 2^e for an int32 vector of exponents in [-126, 127]. */
static inline vf pow2(vi e) { return vi_as_vf(vi_slli(vi_add(e, vi_set1(127)), 23)); }

static inline vi c_exponent(vf c) {
    vi be = vi_and(vi_srli(vf_as_vi(c), 23), vi_set1(0xFF));
    return vi_where_eq(be, 255, vi_set1(EXP_NONFINITE), vi_sub(vi_max(be, vi_set1(1)), vi_set1(127)));
}

/* Load (store) a tile's state: straight vector loads for a full tile, through buf at the edges. */
static void state_in(const job_t *j, const float *src, int64_t i0, int64_t j0, int full, float *buf, vf x[MR][NV]) {
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++)
            x[r][v] = src && full ? vf_load(src + (i0 + r) * j->n + j0 + v * VL) : vf_zero();
    if (src && !full) {
        tile_in(j, src, i0, j0, buf);
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) x[r][v] = vf_load(buf + r * NR + v * VL);
    }
}

static void state_out(const job_t *j, float *dst, int64_t i0, int64_t j0, int full, float *buf, vf x[MR][NV]) {
    if (!dst) return;
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) vf_store(full ? dst + (i0 + r) * j->n + j0 + v * VL : buf + r * NR + v * VL, x[r][v]);
    if (!full) tile_out(j, dst, i0, j0, buf);
}

static void tile_simd(const job_t *j, int64_t it, int64_t jt, int64_t t0, int64_t t1) {
    const int64_t i0 = it * MR, j0 = jt * NR;
    const int full = i0 + MR <= j->m && j0 + NR <= j->n;
    const float *bpanel = j->bp + jt * j->k * NR;
    const int16_t *ebpanel = j->eb + jt * j->k * NR;
    const float *arow[MR];
    const int32_t *earow[MR];
    for (int r = 0; r < MR; r++) {
        arow[r] = j->a + row_of(j, i0 + r) * j->k;  /* rows past M repeat the last (their outputs are dropped) */
        earow[r] = j->ea + row_of(j, i0 + r) * j->k;
    }
    const int frac = j->frac;
    const vi keep = vi_set1((int)~((1u << (23 - j->out_frac)) - 1u)); /* step 5 as a mantissa mask */
    float buf[MR * NR];
    vf c[MR][NV], acc[MR][NV];
    state_in(j, j->cst, i0, j0, full, buf, c);
    state_in(j, j->acc, i0, j0, full, buf, acc);
    for (int64_t t = t0; t < t1; t++) {
        const int64_t ins = j->desc ? j->n_ins - 1 - t : t;
        const int64_t k0 = ins * j->chunk, k1 = k0 + j->chunk < j->k ? k0 + j->chunk : j->k;
        /* Pass 1: E = max(C's exponent, max over the chunk of ea + eb). */
        vh eh[MR];
        for (int r = 0; r < MR; r++) eh[r] = vh_set1(EXP_NONE);
        for (int64_t k = k0; k < k1; k++) {
            const vh eb = vh_load(ebpanel + k * NR);
#pragma GCC unroll 8
            for (int r = 0; r < MR; r++) eh[r] = vh_max(eh[r], vh_add(vh_bcast32(earow[r] + k), eb));
        }
        vi e[MR][NV], s[MR][NV];
        vf sc[MR][NV];
        int flagged = 0;
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) {
                e[r][v] = vi_max(vh_widen(eh[r], v), c_exponent(c[r][v]));
                flagged |= vi_any_ge(e[r][v], EXP_FLAG);
                /* Products are zero whenever E < frac - 126, so clamping there keeps 2^(frac - E) finite
                 * (no inf * 0); C takes the rest of its scale, 2^(Es - E) <= 2^frac, as a second factor. */
                const vi es = vi_max(e[r][v], vi_set1(frac - 126));
                sc[r][v] = pow2(vi_sub(vi_set1(frac), es));
                s[r][v] = vf_to_vi_trunc(vf_mul(vf_mul(c[r][v], sc[r][v]), pow2(vi_sub(es, e[r][v]))));
            }
        /* Pass 2: add the truncated products in units of 2^(E - frac), exactly, as int32. */
        for (int64_t k = k0; k < k1; k++) {
            const vf b0 = vf_load(bpanel + k * NR), b1 = vf_load(bpanel + k * NR + VL);
#pragma GCC unroll 8
            for (int r = 0; r < MR; r++) {
                const vf a = vf_set1(arow[r][k]);
                s[r][0] = vi_add(s[r][0], vf_to_vi_trunc(vf_mul(vf_mul(a, b0), sc[r][0])));
                s[r][1] = vi_add(s[r][1], vf_to_vi_trunc(vf_mul(vf_mul(a, b1), sc[r][1])));
            }
        }
        float cin[MR * NR];
        int32_t ebuf[MR * NR];
        if (flagged) /* rare: an instruction with an inf or NaN term is an IEEE sum (below) */
            for (int r = 0; r < MR; r++)
                for (int v = 0; v < NV; v++) {
                    vi_store(ebuf + r * NR + v * VL, e[r][v]);
                    vf_store(cin + r * NR + v * VL, c[r][v]);
                }
        /* Step 5: the int32 sum as a float (exact; 0 is +0), out_frac fraction bits kept, scaled back by
         * 2^(E - frac) in two exact factors (2^(E - frac) alone would be subnormal for E < frac - 126). */
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) {
                const vf kept = vi_as_vf(vi_and(vf_as_vi(vi_to_vf(s[r][v])), keep));
                const vi eo = vi_sub(e[r][v], vi_set1(frac)), e1 = vi_max(eo, vi_set1(-126));
                c[r][v] = vf_mul(vf_mul(kept, pow2(e1)), pow2(vi_sub(eo, e1)));
            }
        if (flagged) {
            for (int r = 0; r < MR; r++)
                for (int v = 0; v < NV; v++) vf_store(buf + r * NR + v * VL, c[r][v]);
            for (int r = 0; r < MR; r++)
                for (int q = 0; q < NR; q++)
                    if (ebuf[r * NR + q] >= EXP_FLAG)
                        buf[r * NR + q] = ieee_instruction(j, arow[r], bpanel, k0, k1, q, cin[r * NR + q]);
            for (int r = 0; r < MR; r++)
                for (int v = 0; v < NV; v++) c[r][v] = vf_load(buf + r * NR + v * VL);
        }
        if (promotes_after(j, ins)) {
            if (j->sa) {
                group_scales(j, ins / j->promote, i0, j0, buf);
                for (int r = 0; r < MR; r++)
                    for (int v = 0; v < NV; v++)
                        acc[r][v] = vf_fmadd(c[r][v], vf_load(buf + r * NR + v * VL), acc[r][v]);
            } else {
                for (int r = 0; r < MR; r++)
                    for (int v = 0; v < NV; v++) acc[r][v] = vf_add(acc[r][v], c[r][v]);
            }
            for (int r = 0; r < MR; r++)
                for (int v = 0; v < NV; v++) c[r][v] = vf_zero();
        }
    }
    state_out(j, j->cst, i0, j0, full, buf, c);
    state_out(j, j->acc, i0, j0, full, buf, acc);
}
#endif

/* ---------------------------------------------------------------- entry points */

/* 512 or 256 (the SIMD path's vector width in bits), 0 when this build has only the generic path. */
int fp8lab_accum_simd_bits(void) { return SIMD; }

int fp8lab_accum_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Whether the SIMD path computes (chunk, frac) exactly: every chunk sum an exact int32 and float. */
int fp8lab_accum_uses_simd(int chunk, int frac) {
    return SIMD && frac <= 16 && ((int64_t)(4 * chunk + 2) << frac) <= ((int64_t)1 << 24);
}

/*
 * out (M, N) = the accumulator over A (M, K) times B (K, N), all row-major and contiguous.
 * fmt: {a_emin, a_mbits, b_emin, b_mbits}; vmax: {a_max, b_max} (the grid check).
 * promote: instructions per promotion (0: fast accumulation, the chained C is the result).
 * desc: visit instructions from the last to the first. c0: (M, N) first C or NULL (zeros).
 * sa (M, G; row stride sa_ld), sb (G, N; row stride sb_ld): group scales or NULL (promote > 0 only).
 * bad[0], bad[1]: how many values of A and B are off their format's grid (then nothing is computed).
 * Returns 0, or -1 when memory runs out.
 */
int fp8lab_accumulate(const float *a, const float *b, int64_t m, int64_t n, int64_t k,
                      const int *fmt, const float *vmax, int chunk, int frac, int promote, int desc, const float *c0,
                      const float *sa, int64_t sa_ld, const float *sb, int64_t sb_ld, float *out, int nthreads,
                      int force_generic, int64_t *bad) {
    job_t j = {0};
    const int simd = fp8lab_accum_uses_simd(chunk, frac) && !force_generic;
    j.m = m, j.n = n, j.k = k, j.chunk = chunk, j.frac = frac, j.out_frac = frac < 23 ? frac : 23;
    j.n_ins = (k + chunk - 1) / chunk, j.promote = promote, j.desc = desc;
    j.a = a, j.c0 = c0, j.sa = sa, j.sb = sb, j.sa_ld = sa_ld, j.sb_ld = sb_ld;
#if SIMD
    j.mr = simd ? MR : MR_G, j.nr = simd ? NR : NR_G;
#else
    (void)simd;
    j.mr = MR_G, j.nr = NR_G;
#endif
    bad[0] = bad[1] = 0;
    if (m == 0 || n == 0) return 0;
    j.np = (n + j.nr - 1) / j.nr * j.nr;
    const int64_t tiles_m = (m + j.mr - 1) / j.mr, tiles_n = j.np / j.nr;
    const int64_t kk = k > 0 ? k : 1;
    int32_t *ea = malloc(sizeof(int32_t) * m * kk);
    j.ea = ea, j.bp = malloc(sizeof(float) * j.np * kk), j.eb = malloc(sizeof(int16_t) * j.np * kk);
    j.acc = promote ? calloc((size_t)(m * n), sizeof(float)) : NULL;
    j.cst = out;
    int status = 0;
    int64_t bad_a = 0, bad_b = 0;
    if (!ea || !j.bp || !j.eb || (promote && !j.acc)) {
        status = -1;
        goto done;
    }
    /* K blocks of whole instructions whose B panels (float + int16 per element) fit L2_BUDGET. */
    int64_t block = L2_BUDGET / (j.np * 6 * chunk);
    block = block < 1 ? 1 : block;
    const int64_t n_blocks = (j.n_ins + block - 1) / block;
    if (nthreads < 1) nthreads = 1;
    uint32_t vmax_bits[2];
    memcpy(vmax_bits, vmax, sizeof vmax_bits);
#pragma omp parallel num_threads(nthreads)
    {
#ifdef HAVE_MXCSR
        /* Round to nearest, no flush-to-zero or denormals-are-zero, whatever the caller set (torch's
         * set_flush_denormal sets FTZ/DAZ): the model's fp32 adds keep subnormals. */
        const unsigned int csr = _mm_getcsr();
        _mm_setcsr(0x1F80);
#endif
#pragma omp for schedule(static) reduction(+ : bad_a)
        for (int64_t i = 0; i < m; i++) bad_a += prep_a_row(&j, i, fmt, vmax_bits[0], ea);
#pragma omp for schedule(static) reduction(+ : bad_b)
        for (int64_t kr = 0; kr < k; kr++) bad_b += prep_b_row(&j, b, kr, fmt, vmax_bits[1]);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) {
            if (c0)
                memcpy(out + i * n, c0 + i * n, sizeof(float) * n);
            else
                memset(out + i * n, 0, sizeof(float) * n);
        }
        if (!(bad_a || bad_b))
            for (int64_t blk = 0; blk < n_blocks; blk++) {
                const int64_t t0 = blk * block, t1 = t0 + block < j.n_ins ? t0 + block : j.n_ins;
                /* Row tiles across threads; each sweeps every column panel of the block (in its L2). */
#pragma omp for schedule(static)
                for (int64_t it = 0; it < tiles_m; it++)
                    for (int64_t jt = 0; jt < tiles_n; jt++) {
#if SIMD
                        if (simd)
                            tile_simd(&j, it, jt, t0, t1);
                        else
#endif
                            tile_generic(&j, it, jt, t0, t1);
                    }
            }
#ifdef HAVE_MXCSR
        _mm_setcsr(csr);
#endif
    }
    bad[0] = bad_a, bad[1] = bad_b;
    if (promote && !(bad_a || bad_b)) memcpy(out, j.acc, sizeof(float) * m * n);
done:
    free(ea), free(j.bp), free(j.eb), free(j.acc);
    return status;
}
