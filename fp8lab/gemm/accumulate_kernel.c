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
 * SIMD path (AVX-512 or AVX2, F <= 16): in units of 2^(E-F) each truncated term is
 * truncf(a*b * 2^(F-E)) -- a*b is exact in fp32, the power-of-two scale is exact, |term| < 2^(F+2) --
 * so the sum of a chunk is an exact float integer (< 2^24) and the final truncation is a mask of the
 * float's low mantissa bits. Pass 1 finds E per output with int16 max-plus arithmetic (two ops per 2*VL
 * products); pass 2 costs four float ops per VL products (mul, mul, round, add). Vectorised over N; a
 * tile of MR rows x NR columns keeps its chained C and promoted accumulator for the whole K loop.
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

#define EXP_ZERO (-126)     /* the exponent of a zero operand, and the clamp of C's exponent */
#define EXP_NONFINITE 2000  /* inf/NaN operand or C: any E >= EXP_FLAG makes the instruction an IEEE sum */
#define EXP_FLAG 1000
#define EXP_NONE (-30000)   /* start of a max, below every real exponent (int16) */

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define SIMD 512
#elif defined(__AVX2__) && defined(__FMA__)
#define SIMD 256
#else
#define SIMD 0
#endif

/* Generic path tile; the SIMD tile is MR x NR below. */
#define MR_G 4
#define NR_G 8

typedef struct {
    int64_t m, n, k, n_ins;
    int chunk, frac, out_frac, promote, desc;
    const float *c0, *sa, *sb;
    int64_t sa_ld, sb_ld;
    float *out;
    int mr, nr;
    int64_t tiles_m, tiles_n;
    float *ap, *bp;        /* packed operands: [tile][k][mr] and [tile][k][nr] */
    int16_t *eap, *ebp;    /* their exponents, same layout */
} job_t;

/* The exponent the tensor core gives an FP8 operand; counts a value off the format's grid in *bad. */
static inline int16_t operand_exponent(float v, int emin, int mbits, float vmax, int64_t *bad) {
    uint32_t u;
    memcpy(&u, &v, 4);
    int be = (int)((u >> 23) & 0xFF);
    if (be == 255) return EXP_NONFINITE;
    if ((u & 0x7FFFFFFFu) == 0) return EXP_ZERO;
    int e = be - 127;
    int shift = 23 - mbits + (e < emin ? emin - e : 0);  /* mantissa bits that must be zero */
    if (be == 0 || fabsf(v) > vmax || shift > 23 || (u & ((1u << shift) - 1u))) (*bad)++;
    return (int16_t)(e < emin ? emin : e);
}

/* Pack rows [t*mr, t*mr+mr) of A (strides sm, sk) as [k][mr]; rows past M are zeros. */
static int64_t pack_a(const job_t *j, const float *a, int64_t sm, int64_t sk, int64_t t, const int *fmt,
                      float vmax) {
    int64_t bad = 0;
    float *dst = j->ap + t * j->k * j->mr;
    int16_t *edst = j->eap + t * j->k * j->mr;
    for (int64_t k = 0; k < j->k; k++)
        for (int r = 0; r < j->mr; r++) {
            int64_t i = t * j->mr + r;
            float v = i < j->m ? a[i * sm + k * sk] : 0.0f;
            dst[k * j->mr + r] = v;
            edst[k * j->mr + r] = operand_exponent(v, fmt[0], fmt[1], vmax, &bad);
        }
    return bad;
}

/* Pack columns [t*nr, t*nr+nr) of B (strides sk, sn) as [k][nr]; columns past N are zeros. */
static int64_t pack_b(const job_t *j, const float *b, int64_t sk, int64_t sn, int64_t t, const int *fmt,
                      float vmax) {
    int64_t bad = 0;
    float *dst = j->bp + t * j->k * j->nr;
    int16_t *edst = j->ebp + t * j->k * j->nr;
    for (int64_t k = 0; k < j->k; k++)
        for (int c = 0; c < j->nr; c++) {
            int64_t col = t * j->nr + c;
            float v = col < j->n ? b[k * sk + col * sn] : 0.0f;
            dst[k * j->nr + c] = v;
            edst[k * j->nr + c] = operand_exponent(v, fmt[2], fmt[3], vmax, &bad);
        }
    return bad;
}

/* Instruction `ins` ends a promotion group (in the order the K loop visits instructions). */
static inline int promotes_after(const job_t *j, int64_t ins) {
    if (!j->promote) return 0;
    return j->desc ? ins % j->promote == 0 : (ins % j->promote == j->promote - 1 || ins == j->n_ins - 1);
}

/* Load the tile's rows i0.. and columns j0.. of an (M, N) matrix (zeros outside, or all zeros if src is NULL). */
static void load_tile(const job_t *j, const float *src, int64_t i0, int64_t j0, int mr, int nr, float *dst) {
    for (int r = 0; r < mr; r++)
        for (int c = 0; c < nr; c++)
            dst[r * nr + c] = (src && i0 + r < j->m && j0 + c < j->n) ? src[(i0 + r) * j->n + j0 + c] : 0.0f;
}

static void store_tile(const job_t *j, int64_t i0, int64_t j0, int mr, int nr, const float *src) {
    for (int r = 0; r < mr && i0 + r < j->m; r++)
        for (int c = 0; c < nr && j0 + c < j->n; c++) j->out[(i0 + r) * j->n + j0 + c] = src[r * nr + c];
}

/* The promotion's scale sA[i, g] * sB[g, j] (one fp32 rounding) for the tile, zeros outside. */
static void group_scales(const job_t *j, int64_t g, int64_t i0, int64_t j0, int mr, int nr, float *dst) {
    for (int r = 0; r < mr; r++)
        for (int c = 0; c < nr; c++) {
            int in = i0 + r < j->m && j0 + c < j->n;
            dst[r * nr + c] = in ? j->sa[(i0 + r) * j->sa_ld + g] * j->sb[g * j->sb_ld + j0 + c] : 0.0f;
        }
}

/* The IEEE value of an instruction with an inf or NaN term: C + sum of the products in double (no finite
 * part can overflow double, so the non-finite terms alone decide it, in any order). */
static float ieee_instruction(const job_t *j, const float *ap, const float *bp, int64_t k0, int64_t k1, int r,
                              int c, float cin) {
    double s = (double)cin;
    for (int64_t k = k0; k < k1; k++) s += (double)ap[k * j->mr + r] * (double)bp[k * j->nr + c];
    return (float)s;
}

/* ---------------------------------------------------------------- generic path (scalar, double) */

static inline int c_exponent_scalar(float c) {
    uint32_t u;
    memcpy(&u, &c, 4);
    int be = (int)((u >> 23) & 0xFF);
    return be == 255 ? EXP_NONFINITE : (be < 1 ? 1 : be) - 127;
}

/* Step 5: truncate toward zero to out_frac fraction bits, with fp32's exponent range (clamped at -126). */
static inline float normalise_scalar(double v, int out_frac) {
    if (v == 0.0) return 0.0f;  /* +0: the hardware's integer sum has no sign of zero */
    int e;
    frexp(v, &e);
    e -= 1;  /* 2^e <= |v| < 2^(e+1) */
    if (e < -126) e = -126;
    double q = ldexp(trunc(ldexp(v, out_frac - e)), e - out_frac);
    return (float)q;  /* exact, or inf past fp32's range */
}

static void tile_generic(const job_t *j, int64_t it, int64_t jt) {
    enum { T = MR_G * NR_G };
    const int64_t i0 = it * MR_G, j0 = jt * NR_G;
    const float *ap = j->ap + it * j->k * MR_G, *bp = j->bp + jt * j->k * NR_G;
    const int16_t *eap = j->eap + it * j->k * MR_G, *ebp = j->ebp + jt * j->k * NR_G;
    float c[T], acc[T], s[T];
    load_tile(j, j->c0, i0, j0, MR_G, NR_G, c);
    memset(acc, 0, sizeof acc);
    for (int64_t t = 0; t < j->n_ins; t++) {
        const int64_t ins = j->desc ? j->n_ins - 1 - t : t;
        const int64_t k0 = ins * j->chunk, k1 = k0 + j->chunk < j->k ? k0 + j->chunk : j->k;
        for (int r = 0; r < MR_G; r++)
            for (int q = 0; q < NR_G; q++) {
                int e = c_exponent_scalar(c[r * NR_G + q]);
                for (int64_t k = k0; k < k1; k++) {
                    int ek = eap[k * MR_G + r] + ebp[k * NR_G + q];
                    if (ek > e) e = ek;
                }
                float d;
                if (e >= EXP_FLAG) {
                    d = ieee_instruction(j, ap, bp, k0, k1, r, q, c[r * NR_G + q]);
                } else {
                    double sum = trunc(ldexp((double)c[r * NR_G + q], j->frac - e));
                    for (int64_t k = k0; k < k1; k++)
                        sum += trunc(ldexp((double)ap[k * MR_G + r] * (double)bp[k * NR_G + q], j->frac - e));
                    d = normalise_scalar(ldexp(sum, e - j->frac), j->out_frac);
                }
                c[r * NR_G + q] = d;
            }
        if (promotes_after(j, ins)) {
            if (j->sa) {
                group_scales(j, ins / j->promote, i0, j0, MR_G, NR_G, s);
                for (int q = 0; q < T; q++) acc[q] = fmaf(c[q], s[q], acc[q]);
            } else {
                for (int q = 0; q < T; q++) acc[q] = acc[q] + c[q];
            }
            memset(c, 0, sizeof c);
        }
    }
    store_tile(j, i0, j0, MR_G, NR_G, j->promote ? acc : c);
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
#define vf_trunc(x) _mm512_roundscale_ps((x), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC)
#define vf_as_vi _mm512_castps_si512
#define vi_as_vf _mm512_castsi512_ps
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
#define vf_trunc(x) _mm256_round_ps((x), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC)
#define vf_as_vi _mm256_castps_si256
#define vi_as_vf _mm256_castsi256_ps
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

static void tile_simd(const job_t *j, int64_t it, int64_t jt) {
    const int64_t i0 = it * MR, j0 = jt * NR;
    const float *ap = j->ap + it * j->k * MR, *bp = j->bp + jt * j->k * NR;
    const int16_t *eap = j->eap + it * j->k * MR, *ebp = j->ebp + jt * j->k * NR;
    const int frac = j->frac;
    const vi keep = vi_set1((int)~((1u << (23 - j->out_frac)) - 1u));  /* step 5 as a mantissa mask */
    float buf[MR * NR];
    vf c[MR][NV], acc[MR][NV];
    load_tile(j, j->c0, i0, j0, MR, NR, buf);
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) c[r][v] = vf_load(buf + r * NR + v * VL), acc[r][v] = vf_zero();
    for (int64_t t = 0; t < j->n_ins; t++) {
        const int64_t ins = j->desc ? j->n_ins - 1 - t : t;
        const int64_t k0 = ins * j->chunk, k1 = k0 + j->chunk < j->k ? k0 + j->chunk : j->k;
        /* Pass 1: E = max(C's exponent, max over the chunk of ea + eb). */
        vh eh[MR];
        for (int r = 0; r < MR; r++) eh[r] = vh_set1(EXP_NONE);
        for (int64_t k = k0; k < k1; k++) {
            const vh eb = vh_load(ebp + k * NR);
#pragma GCC unroll 8
            for (int r = 0; r < MR; r++) eh[r] = vh_max(eh[r], vh_add(vh_set1(eap[k * MR + r]), eb));
        }
        vi e[MR][NV];
        vf sc[MR][NV], s[MR][NV];
        int flagged = 0;
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) {
                e[r][v] = vi_max(vh_widen(eh[r], v), c_exponent(c[r][v]));
                flagged |= vi_any_ge(e[r][v], EXP_FLAG);
                /* Products are zero whenever E < frac - 126, so clamping there keeps 2^(frac - E) finite
                 * (no inf * 0); C takes the rest of its scale, 2^(Es - E) <= 2^frac, as a second factor. */
                vi es = vi_max(e[r][v], vi_set1(frac - 126));
                sc[r][v] = pow2(vi_sub(vi_set1(frac), es));
                s[r][v] = vf_trunc(vf_mul(vf_mul(c[r][v], sc[r][v]), pow2(vi_sub(es, e[r][v]))));
            }
        /* Pass 2: add the truncated products in units of 2^(E - frac), exactly. */
        for (int64_t k = k0; k < k1; k++) {
            const vf b0 = vf_load(bp + k * NR), b1 = vf_load(bp + k * NR + VL);
#pragma GCC unroll 8
            for (int r = 0; r < MR; r++) {
                const vf a = vf_set1(ap[k * MR + r]);
                s[r][0] = vf_add(s[r][0], vf_trunc(vf_mul(vf_mul(a, b0), sc[r][0])));
                s[r][1] = vf_add(s[r][1], vf_trunc(vf_mul(vf_mul(a, b1), sc[r][1])));
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
        /* Step 5: +0 for a zero sum, keep out_frac fraction bits, scale back by 2^(E - frac) in two exact
         * factors (2^(E - frac) alone would be subnormal for E < frac - 126). */
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) {
                vf kept = vi_as_vf(vi_and(vf_as_vi(vf_add(s[r][v], vf_zero())), keep));
                vi eo = vi_sub(e[r][v], vi_set1(frac));
                vi e1 = vi_max(eo, vi_set1(-126));
                c[r][v] = vf_mul(vf_mul(kept, pow2(e1)), pow2(vi_sub(eo, e1)));
            }
        if (flagged) {
            for (int r = 0; r < MR; r++)
                for (int v = 0; v < NV; v++) vf_store(buf + r * NR + v * VL, c[r][v]);
            for (int r = 0; r < MR; r++)
                for (int q = 0; q < NR; q++)
                    if (ebuf[r * NR + q] >= EXP_FLAG)
                        buf[r * NR + q] = ieee_instruction(j, ap, bp, k0, k1, r, q, cin[r * NR + q]);
            for (int r = 0; r < MR; r++)
                for (int v = 0; v < NV; v++) c[r][v] = vf_load(buf + r * NR + v * VL);
        }
        if (promotes_after(j, ins)) {
            if (j->sa) {
                group_scales(j, ins / j->promote, i0, j0, MR, NR, buf);
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
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) vf_store(buf + r * NR + v * VL, j->promote ? acc[r][v] : c[r][v]);
    store_tile(j, i0, j0, MR, NR, buf);
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

/* Whether the SIMD path computes (chunk, frac) exactly: every chunk sum an exact float integer. */
static int simd_exact(int chunk, int frac) {
    return SIMD && frac <= 16 && ((int64_t)(4 * chunk + 2) << frac) <= ((int64_t)1 << 24);
}

int fp8lab_accum_uses_simd(int chunk, int frac) { return simd_exact(chunk, frac); }

/*
 * out (M, N, contiguous) = the accumulator over A (M, K; strides sam, sak) times B (K, N; strides sbk, sbn).
 * fmt: {a_emin, a_mbits, b_emin, b_mbits}; vmax: {a_max, b_max} (the grid check).
 * promote: instructions per promotion (0: fast accumulation, the chained C is the result).
 * desc: visit instructions from the last to the first. c0: (M, N) first C or NULL (zeros).
 * sa (M, G; row stride sa_ld), sb (G, N; row stride sb_ld): group scales or NULL (promote > 0 only).
 * bad[0], bad[1]: how many values of A and B are off their format's grid (then nothing is computed).
 * Returns 0, or -1 when memory runs out.
 */
int fp8lab_accumulate(const float *a, int64_t sam, int64_t sak, const float *b, int64_t sbk, int64_t sbn,
                          int64_t m, int64_t n, int64_t k, const int *fmt, const float *vmax, int chunk, int frac,
                          int promote, int desc, const float *c0, const float *sa, int64_t sa_ld,
                          const float *sb, int64_t sb_ld, float *out, int nthreads, int force_generic,
                          int64_t *bad) {
    job_t j = {0};
    const int simd = simd_exact(chunk, frac) && !force_generic;
    j.m = m, j.n = n, j.k = k, j.chunk = chunk, j.frac = frac, j.out_frac = frac < 23 ? frac : 23;
    j.n_ins = (k + chunk - 1) / chunk, j.promote = promote, j.desc = desc;
    j.c0 = c0, j.sa = sa, j.sb = sb, j.sa_ld = sa_ld, j.sb_ld = sb_ld, j.out = out;
#if SIMD
    j.mr = simd ? MR : MR_G, j.nr = simd ? NR : NR_G;
#else
    (void)simd;
    j.mr = MR_G, j.nr = NR_G;
#endif
    bad[0] = bad[1] = 0;
    if (m == 0 || n == 0) return 0;
    j.tiles_m = (m + j.mr - 1) / j.mr, j.tiles_n = (n + j.nr - 1) / j.nr;
    const int64_t kk = k > 0 ? k : 1;
    j.ap = malloc(sizeof(float) * j.tiles_m * j.mr * kk), j.bp = malloc(sizeof(float) * j.tiles_n * j.nr * kk);
    j.eap = malloc(sizeof(int16_t) * j.tiles_m * j.mr * kk), j.ebp = malloc(sizeof(int16_t) * j.tiles_n * j.nr * kk);
    int status = 0;
    int64_t bad_a = 0, bad_b = 0;
    if (!j.ap || !j.bp || !j.eap || !j.ebp) {
        status = -1;
        goto done;
    }
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads) reduction(+ : bad_a, bad_b)
    {
#ifdef HAVE_MXCSR
        /* Round to nearest, no flush-to-zero or denormals-are-zero, whatever the caller set
         * (torch.set_flush_denormal sets FTZ/DAZ): the model's fp32 adds keep subnormals. */
        const unsigned int csr = _mm_getcsr();
        _mm_setcsr(0x1F80);
#endif
#pragma omp for schedule(static)
        for (int64_t t = 0; t < j.tiles_m; t++) bad_a += pack_a(&j, a, sam, sak, t, fmt, vmax[0]);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < j.tiles_n; t++) bad_b += pack_b(&j, b, sbk, sbn, t, fmt, vmax[1]);
#ifdef HAVE_MXCSR
        _mm_setcsr(csr);
#endif
    }
    bad[0] = bad_a, bad[1] = bad_b;
    if (bad_a || bad_b) goto done;
#pragma omp parallel num_threads(nthreads)
    {
#ifdef HAVE_MXCSR
        const unsigned int csr = _mm_getcsr();
        _mm_setcsr(0x1F80);
#endif
        /* Column panels outer: a thread's consecutive tiles share B's panel (K x NR), which stays in L2. */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < j.tiles_m * j.tiles_n; t++) {
#if SIMD
            if (simd)
                tile_simd(&j, t % j.tiles_m, t / j.tiles_m);
            else
#endif
                tile_generic(&j, t % j.tiles_m, t / j.tiles_m);
        }
#ifdef HAVE_MXCSR
        _mm_setcsr(csr);
#endif
    }
done:
    free(j.ap), free(j.bp), free(j.eap), free(j.ebp);
    return status;
}
