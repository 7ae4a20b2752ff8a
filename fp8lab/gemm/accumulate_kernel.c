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
 * operand takes its format's minimum, a zero -126), C's its fp32 exponent clamped at -126.
 *
 * SIMD path (AVX-512 or AVX2, F <= 16): in units of 2^(E-F) a truncated term is (int)(a*b * 2^(F-E)) --
 * a*b is exact in fp32, the power-of-two scale is exact, |term| < 2^(F+2) -- so a chunk's sum is an exact
 * int32 and step 5 is a mask of its float's low mantissa bits. Pass 1 finds E per output with saturating
 * int8 max-plus arithmetic on exponent codes (two ops per NR products, A's codes broadcast straight from
 * memory); pass 2 costs four ops per VL products: a multiply by A's value broadcast from memory (A is
 * packed times 2^-64), an integer add of 64 + frac - E to the product's exponent field (the scale), a
 * truncating convert and an integer add. Tiles with a lane where that add is not exact (E outside
 * [frac - 62, frac + 64]: an inf/NaN term, a huge C, nothing but zero products) multiply instead. Vectorised
 * over N; a tile of MR rows x NR columns keeps C and the promoted accumulator in registers over a K
 * block, whose B panels stay in L2. Generic path (any CPU, any F <= 40): the same steps per element in
 * double, with frexp/ldexp. The prepass converts (bf16) and transposes the operands itself (A as rows of K,
 * B as panels [panel][k][NR], with their exponent codes): torch's transposing copies cost more than the
 * whole prepass. The GEMM's epilogue (scale, bias, rounding to the output dtype) is applied as the
 * last K block of each tile is stored, so no (M, N) pass follows.
 *
 * Tried and measured (2-core AVX-512 VM, 2026-12-04): pass 2 in 16-bit integers (significand products,
 * variable word shifts, pair dot products: five or six ops per 32 products) ran 1.25x faster on K = 128
 * GEMMs alone, but its integer forms doubled the prepass and its panels the cache footprint, and a
 * training step was no faster (3.43x vs 3.40x the fp32 step); removed. Also tried, each bit-exact on the
 * kernel tests' GEMMs and none faster (the same VM, 2026-12-04 session 3): (1) the scale as an integer add
 * to the product's exponent field instead of a multiply (A prescaled by 2^-64 so that zero products stay
 * below 1): same speed, since a 512-bit op of any kind issues at two per cycle on this CPU (Zen 4) and a
 * multiply at one, so four ops per 16 products cost two cycles either way; (2) steps 2-4 by rounding: two
 * FMAs per 16 products rounding toward zero (embedded rounding) into sums started at 2^(E + 23 - frac), one
 * for positive terms and one for negative, B split into max(B, 0) and max(-B, 0) and A's sign choosing the
 * half: 10% slower, the half chosen per row is a data-dependent load; (3) pass 2 in 16-bit lanes (significand
 * products, variable shifts, VNNI pair dot products with +-1 sign tables): its inner loop spilled, and its
 * prepass cost 1.3-3 ms where this one costs 0.25-0.4. Pass 2 is about 60% of a GEMM's time here.
 * Kept (session 6, the same VM): the scale as an exponent add *together with* A's broadcast as the
 * multiply's {1to16} memory operand. On Zen 4 a separate vbroadcastss from memory takes a vector pipe's
 * slot (+0.4 cycles measured) and two multiplies per 16 products fill the two multiply pipes, so the adds
 * had no room: pass 2 went from 2.5 to 2.0-2.15 cycles per 16 products, GEMMs 9-10% faster. Also kept: the
 * fused epilogue of full tiles in registers (the scalar row loop cost 8% of a fused GEMM). Tried and not kept:
 * pass 1 for up to 16 instructions ahead of their pass 2 (no change; pass 1 runs at its op bound, 3.7-4.0
 * cycles per k, and 512-bit forms measured slower), an asm accumulate removing GCC's register copies after
 * each add (eliminated at rename: no change), pass 2 unrolled over k (no change).
 * Where a GEMM's time goes (session 8, the same VM; clock 3.66 GHz from a chain of dependent adds; one thread,
 * 2048 x K x 512 fast with K = 32..128, the slope per instruction of variants with one phase removed): 1160-1200
 * cycles per tile and instruction (6 x 32 outputs, 32 products each), of which pass 2 890 (2.3 cycles per 16
 * products; the same loop alone runs at 2.04-2.14), pass 1 140 (per k and row a broadcast, an add and a max,
 * 256-bit), the E/scale setup and step 5 130; a fixed 130-300 per tile (state, epilogue, the call); the prepass
 * 2-3 cycles per value, bound by the bytes it writes. The phases add up: the vector pipes are full. Kept (1-3%
 * each, bit-identical): A's exponent codes as one byte per value instead of four (the prepass writes 5 bytes per A
 * value instead of 8; pass 1's byte broadcast costs what the 32-bit one did), the setup in exponent-field units
 * with one range check per tile (about 20 fewer ops per tile and instruction), and the prepass's codes sixteen at
 * a time with A's prescale in the same pass (codes_of). Tried and not kept: pass 1 of instruction t + 1
 * interleaved into pass 2 of t (bit-identical, no faster: no idle slots to fill), A's codes pre-broadcast per row
 * tile into a per-thread buffer so that pass 1 adds them from memory (6-12% slower), software prefetch of B (no
 * change), the off-grid count in a vector instead of popcnt (no change), MR = 4, 5 or 7 (within noise), a 2x or 4x
 * L2 budget (2-7% on K = 2048 fast GEMMs only, none on the MLP's shapes).
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
#define EXP_NONFINITE 2000  /* inf/NaN operand: an instruction whose E reaches 128 is an IEEE sum */
/* Exponent codes (int8) for pass 1, valid for operand exponents in [-19, 19] (E4M3, E5M2): a finite
 * nonzero value's exponent itself, CODE_ZERO for zero, CODE_NONFINITE for inf/NaN. Saturating sums of
 * two codes keep the order of the true sums: finite products in [-38, 38]; one zero operand in [-83, -45]
 * (true value: the sum - 62); two zeros -128 (true -252, below C's -126); inf/NaN >= 63. */
#define CODE_ZERO (-64)
#define CODE_NONFINITE 127
#define CODE_SPLIT 40       /* |sum of codes| >= CODE_SPLIT: a zero (below) or an inf/NaN (above) took part */
#define L2_BUDGET (384 * 1024)  /* bytes of a K block of B's panels (float + int8 codes) kept in a core's L2 */
#define BLOCK 64            /* the prepass's transposing copies move BLOCK x BLOCK squares */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SIMD 512
#elif defined(__AVX2__) && defined(__FMA__)
#define SIMD 256
#else
#define SIMD 0
#endif

#define MR_G 4 /* generic path tile: MR_G x NR_G */
#define NR_G 8

typedef struct {
    int64_t m, n, k, n_ins, np, lda;  /* np: N rounded up to nr (B's packed row length); lda: A's row stride */
    int chunk, frac, out_frac, promote, desc, mr, nr;
    const float *c0, *sa, *sb;
    int64_t sa_ld, sb_ld;
    float *ap;           /* A as [row][k] (rows past M, up to a whole tile, repeat the last row) */
    int8_t *ea;          /* its exponent codes, same layout */
    float *bp;           /* B as [panel][k][nr], columns past N zero */
    int8_t *eb;          /* its exponent codes, same layout */
    float *acc;          /* (M, N): between K blocks, the chained C ("fast") or the promoted accumulator */
    /* The epilogue, applied as the last K block is stored: out = round(acc * inv + bias), each step in fp32. */
    int has_inv, bias_bf16, out_bf16;
    int prescaled;       /* ap holds A * 2^-64: the SIMD path scales products by an exponent add (tile_simd) */
    float inv;
    const void *bias;    /* (N,) fp32 or bf16, or NULL */
    void *out;           /* (M, N) row-major, fp32 or bf16 (nearest even; NaN -> 0x7FC0, as torch rounds) */
} job_t;

/* Scratch memory of the calling thread, kept between calls: on a VM a page fault costs microseconds,
 * and fresh buffers per call (glibc hands large freed blocks back to the OS) tripled the time of a
 * 2048x128x512 GEMM. Holds as much as the largest call needed, until fp8lab_accum_release(). */
static __thread void *arena;
static __thread size_t arena_bytes;

static void *scratch(size_t bytes) {
    if (bytes > arena_bytes) {
        free(arena);
        arena = malloc(bytes);
        arena_bytes = arena ? bytes : 0;
    }
    return arena;
}

void fp8lab_accum_release(void) {
    free(arena);
    arena = NULL, arena_bytes = 0;
}

static inline int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }

/* The exponent code of an FP8 operand (see CODE_ZERO): its exponent, emin for a subnormal of the format,
 * CODE_ZERO for zero, CODE_NONFINITE for inf/NaN. *off: 1 if v is neither a value of the format (emin,
 * mbits, largest value with bits vmax_bits) nor inf/NaN. Masks, min and max only: the loops vectorise. */
static inline int32_t operand_code(float v, int32_t emin, int32_t mbits, uint32_t vmax_bits, int32_t *off) {
    uint32_t u;
    memcpy(&u, &v, 4);
    const uint32_t mag = u & 0x7FFFFFFFu;
    const int32_t be = (int32_t)(mag >> 23), e = be - 127;
    const int32_t nonfinite = -(int32_t)(be == 255), zero = -(int32_t)(mag == 0);  /* all-ones or 0 */
    int32_t below = emin - e;
    below = below > 0 ? below : 0;
    int32_t shift = 23 - mbits + below; /* low mantissa bits that must be zero */
    const int32_t tiny = shift > 23;
    shift = shift < 23 ? shift : 23;
    const uint32_t low = u & ((1u << shift) - 1u);
    *off = ~(nonfinite | zero) & ((be == 0) | (mag > vmax_bits) | tiny | (low != 0));
    int32_t c = e > emin ? e : emin;
    c = c < 19 ? c : 19;  /* the clamps only touch off-grid values, which are never computed with */
    c = c > -19 ? c : -19;
    return (c & ~(nonfinite | zero)) | (CODE_ZERO & zero) | (CODE_NONFINITE & nonfinite);
}

static inline int32_t exponent_of_code(int32_t c) {
    return c == CODE_ZERO ? EXP_ZERO : c == CODE_NONFINITE ? EXP_NONFINITE : c;
}

/* dst[i * ds] = src[i * ss] for i < count, src fp32 or bf16 (widened exactly). The branches sit outside
 * the loops so that the unit-stride cases vectorise. */
static void copy_strided(float *dst, int64_t ds, const void *src, int bf16, int64_t ss, int64_t count) {
    if (bf16 && ds == 1 && ss == 1) {
        const uint16_t *s = src;
        for (int64_t i = 0; i < count; i++) {
            const uint32_t u = (uint32_t)s[i] << 16;
            memcpy(dst + i, &u, 4);
        }
    } else if (bf16) {
        const uint16_t *s = src;
        for (int64_t i = 0; i < count; i++) {
            const uint32_t u = (uint32_t)s[i * ss] << 16;
            memcpy(dst + i * ds, &u, 4);
        }
    } else {
        const float *s = src;
        if (ds == 1 && ss == 1)
            memcpy(dst, s, sizeof(float) * count);
        else
            for (int64_t i = 0; i < count; i++) dst[i * ds] = s[i * ss];
    }
}

static inline const void *element(const void *base, int bf16, int64_t at) {
    return bf16 ? (const void *)((const uint16_t *)base + at) : (const void *)((const float *)base + at);
}

/* Exponent codes of n values, and how many are off the grid; with prescale, v[i] is then multiplied by 2^-64
 * (exact: FP8 values are >= 2^-16 in magnitude, or 0, inf or NaN; the product is normal). On AVX-512 sixteen
 * values at a time, each step as operand_code computes it (GCC's vectorisation of the scalar loop cost about
 * twice as much: it narrowed the codes with permutes); tests/test_accumulate.py holds the two to the same count
 * for every kind of value. */
static int32_t codes_of(float *v, int8_t *codes, int64_t n, int32_t emin, int32_t mbits, uint32_t vmax_bits,
                        int prescale) {
    int32_t bad = 0;
    int64_t at = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512i low31 = _mm512_set1_epi32(0x7FFFFFFF), one = _mm512_set1_epi32(1), vmax = _mm512_set1_epi32((int)vmax_bits);
    const __m512i e_min = _mm512_set1_epi32(emin), keep_bits = _mm512_set1_epi32(23 - mbits);
    for (; at + 16 <= n; at += 16) {
        const __m512i u = _mm512_loadu_si512((const void *)(v + at)), mag = _mm512_and_si512(u, low31);
        const __m512i be = _mm512_srli_epi32(mag, 23), e = _mm512_sub_epi32(be, _mm512_set1_epi32(127));
        const __mmask16 nonfinite = _mm512_cmpeq_epi32_mask(be, _mm512_set1_epi32(255));
        const __mmask16 zero = _mm512_cmpeq_epi32_mask(mag, _mm512_setzero_si512());
        __m512i shift = _mm512_add_epi32(keep_bits, _mm512_max_epi32(_mm512_sub_epi32(e_min, e), _mm512_setzero_si512()));
        const __mmask16 tiny = _mm512_cmpgt_epi32_mask(shift, _mm512_set1_epi32(23));
        shift = _mm512_min_epi32(shift, _mm512_set1_epi32(23));
        const __m512i low = _mm512_and_si512(u, _mm512_sub_epi32(_mm512_sllv_epi32(one, shift), one));
        const __mmask16 off = (__mmask16)(~(nonfinite | zero) &
                                          (_mm512_cmpeq_epi32_mask(be, _mm512_setzero_si512()) |
                                           _mm512_cmpgt_epu32_mask(mag, vmax) | tiny |
                                           _mm512_test_epi32_mask(low, low)));
        __m512i c = _mm512_max_epi32(_mm512_min_epi32(_mm512_max_epi32(e, e_min), _mm512_set1_epi32(19)),
                                     _mm512_set1_epi32(-19));
        c = _mm512_mask_mov_epi32(c, zero, _mm512_set1_epi32(CODE_ZERO));
        c = _mm512_mask_mov_epi32(c, nonfinite, _mm512_set1_epi32(CODE_NONFINITE));
        _mm_storeu_si128((__m128i *)(codes + at), _mm512_cvtepi32_epi8(c));
        bad += __builtin_popcount((unsigned)off);
        if (prescale) _mm512_storeu_ps(v + at, _mm512_mul_ps(_mm512_castsi512_ps(u), _mm512_set1_ps(0x1p-64f)));
    }
#endif
    for (; at < n; at++) {
        int32_t off;
        codes[at] = (int8_t)operand_code(v[at], emin, mbits, vmax_bits, &off);
        bad += off;
        if (prescale) v[at] *= 0x1p-64f;
    }
    return bad;
}

#if SIMD == 512 && defined(__AVX512F__)
/* r[i] (16 floats each) becomes column i of the 16 x 16 block the r[i] were rows of. */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++)
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]), t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    for (int g = 0; g < 4; g++) {
        const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
        r[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c)), r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d)), r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88), t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
    }
    for (int i = 0; i < 8; i++)
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88), r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
}

/* Rows [i0, i0 + 16), columns [k0, k0 + 16) of A packed from its transpose (A[i, k] at a[i + k * sk]). */
static void pack_a_square(const job_t *j, const void *a, int bf16, int64_t sk, int64_t i0, int64_t k0) {
    __m512 r[16];
    for (int q = 0; q < 16; q++) {
        const int64_t at = i0 + (k0 + q) * sk;
        r[q] = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                          _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)a + at))), 16))
                    : _mm512_loadu_ps((const float *)a + at);
    }
    transpose16(r);
    for (int q = 0; q < 16; q++) _mm512_storeu_ps(j->ap + (i0 + q) * j->lda + k0, r[q]);
}
#endif

/* A's row tiles [it0, it1) (strides sm, sk; fp32 or bf16) as rows of K ([row][k], rows past M repeating the
 * last), their exponent codes, and how many values of rows inside M are off the grid. A row of A in memory
 * (sk == 1) is a plain widening copy; a transposed A (sm == 1, every wgrad) is read a row of K at a time
 * across all the tiles' rows (whole cache lines), BLOCK values of K at a time, its rows written while in L1. */
static int64_t pack_a(const job_t *j, const void *a, int bf16, int64_t sm, int64_t sk, int64_t it0, int64_t it1,
                      const int *fmt, uint32_t vmax_bits) {
    const int mr = j->mr;
    const int64_t k = j->k, r0 = it0 * mr, r1 = min64(it1 * mr, j->m), across = sm == 1 && sk != 1;
    if (across) {
        int64_t i16 = r0, k16 = 0;  /* rows [r0, i16) x columns [0, k16) come in 16 x 16 squares */
#if SIMD == 512 && defined(__AVX512F__)
        i16 = r0 + (r1 - r0) / 16 * 16, k16 = k / 16 * 16;
        for (int64_t k0 = 0; k0 < k16; k0 += 16)
            for (int64_t i0 = r0; i0 < i16; i0 += 16) pack_a_square(j, a, bf16, sk, i0, k0);
#endif
        for (int64_t k0 = 0; k0 < k; k0 += BLOCK) {
            const int64_t nk = min64(k, k0 + BLOCK) - k0;
            for (int64_t i = r0; i < r1; i++) {
                const int64_t from = i < i16 ? (k16 > k0 ? min64(k16 - k0, nk) : 0) : 0; /* done by the squares */
                copy_strided(j->ap + i * j->lda + k0 + from, 1, element(a, bf16, i + (k0 + from) * sk), bf16, sk,
                             nk - from);
            }
        }
    }
    int64_t bad = 0;
    for (int64_t i = r0; i < it1 * mr; i++) {
        float *d = j->ap + i * j->lda;
        if (i >= r1)  /* rows past M repeat the last (their outputs are dropped) */
            memcpy(d, j->ap + (r1 - 1) * j->lda, sizeof(float) * k);
        else if (!across)
            copy_strided(d, 1, element(a, bf16, i * sm), bf16, sk, k);
        const int32_t off = codes_of(d, j->ea + i * j->lda, k, fmt[0], fmt[1], vmax_bits, j->prescaled);
        bad += i < r1 ? off : 0;
    }
    return bad;
}

/* Rows [k0, k1) of B's panel p (B: strides sk, sn; fp32 or bf16), its codes, and its off-grid count. */
static int64_t pack_b(const job_t *j, const void *b, int bf16, int64_t sk, int64_t sn, int64_t p, int64_t k0,
                      int64_t k1, const int *fmt, uint32_t vmax_bits) {
    const int nr = j->nr;
    const int64_t c0 = p * nr, nc = min64(nr, j->n - c0);
    float *dst = j->bp + p * j->k * nr;
    if (sn == 1 && bf16)  /* the common layouts, as loops that vectorise */
        for (int64_t k = k0; k < k1; k++) {
            const uint16_t *src = (const uint16_t *)b + k * sk + c0;
            for (int c = 0; c < nc; c++) {
                const uint32_t u = (uint32_t)src[c] << 16;
                memcpy(dst + k * nr + c, &u, 4);
            }
        }
    else if (sn == 1)
        for (int64_t k = k0; k < k1; k++) memcpy(dst + k * nr, (const float *)b + k * sk + c0, sizeof(float) * nc);
    else if (sn <= sk)
        for (int64_t k = k0; k < k1; k++)
            copy_strided(dst + k * nr, 1, element(b, bf16, k * sk + c0 * sn), bf16, sn, nc);
    else
        for (int c = 0; c < nc; c++)
            copy_strided(dst + k0 * nr + c, nr, element(b, bf16, k0 * sk + (c0 + c) * sn), bf16, sk, k1 - k0);
    for (int64_t k = k0; k < k1; k++)
        for (int c = (int)nc; c < nr; c++) dst[k * nr + c] = 0.0f;
    return codes_of(dst + k0 * nr, j->eb + p * j->k * nr + k0 * nr, (k1 - k0) * nr, fmt[2], fmt[3], vmax_bits, 0);
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
    for (int r = 0; r < j->mr && i0 + r < j->m; r++)
        for (int c = 0; c < j->nr && j0 + c < j->n; c++) dst[(i0 + r) * j->n + j0 + c] = src[r * j->nr + c];
}

/* fp32 -> bf16 as torch rounds: to nearest even, NaN to the quiet NaN 0x7FC0 (payloads not modelled). */
static inline uint16_t bf16_of(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return v != v ? (uint16_t)0x7FC0 : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* The epilogue of row i, columns [j0, j0 + count): out = round(src * inv + bias), each step in fp32. */
static void epilogue_row(const job_t *j, const float *src, int64_t i, int64_t j0, int64_t count) {
    float v[BLOCK];
    for (int64_t c0 = 0; c0 < count; c0 += BLOCK) {
        const int64_t nc = min64(BLOCK, count - c0), col = j0 + c0;
        for (int64_t c = 0; c < nc; c++) v[c] = src[c0 + c];
        if (j->has_inv)
            for (int64_t c = 0; c < nc; c++) v[c] = v[c] * j->inv;
        if (j->bias && j->bias_bf16) {
            const uint16_t *b = (const uint16_t *)j->bias + col;
            for (int64_t c = 0; c < nc; c++) {
                const uint32_t u = (uint32_t)b[c] << 16;
                float bv;
                memcpy(&bv, &u, 4);
                v[c] = v[c] + bv;
            }
        } else if (j->bias) {
            const float *b = (const float *)j->bias + col;
            for (int64_t c = 0; c < nc; c++) v[c] = v[c] + b[c];
        }
        if (j->out_bf16) {
            uint16_t *o = (uint16_t *)j->out + i * j->n + col;
            for (int64_t c = 0; c < nc; c++) o[c] = bf16_of(v[c]);
        } else {
            float *o = (float *)j->out + i * j->n + col;
            for (int64_t c = 0; c < nc; c++) o[c] = v[c];
        }
    }
}

/* Store a dense mr x nr tile: to the fp32 accumulator between K blocks, through the epilogue after the last. */
static void tile_store(const job_t *j, int last, int64_t i0, int64_t j0, const float *src) {
    if (!last) {
        tile_out(j, j->acc, i0, j0, src);
        return;
    }
    const int64_t cols = min64(j->nr, j->n - j0);
    for (int r = 0; r < j->mr && i0 + r < j->m; r++) epilogue_row(j, src + r * j->nr, i0 + r, j0, cols);
}

/* The promotion's scales sA[i, g] * sB[g, j] (one fp32 rounding) for the tile, zeros outside. */
static void group_scales(const job_t *j, int64_t g, int64_t i0, int64_t j0, float *dst) {
    for (int r = 0; r < j->mr; r++)
        for (int c = 0; c < j->nr; c++) {
            const int in = i0 + r < j->m && j0 + c < j->n;
            dst[r * j->nr + c] = in ? j->sa[(i0 + r) * j->sa_ld + g] * j->sb[g * j->sb_ld + j0 + c] : 0.0f;
        }
}

/* ---------------------------------------------------------------- one output, scalar, in double */

static inline int c_exponent_scalar(float c) {
    uint32_t u;
    memcpy(&u, &c, 4);
    const int be = (int)((u >> 23) & 0xFF);
    return be == 255 ? EXP_NONFINITE : (be < 1 ? 1 : be) - 127;
}

/* The IEEE value of an instruction with an inf or NaN term: C + the products in double (no finite part
 * can overflow double, so the non-finite terms alone decide it, in any order). */
static float ieee_instruction(const float *arow, double ascale, const float *bcol, int nr, int64_t k0, int64_t k1,
                              float cin) {
    double s = (double)cin;
    for (int64_t k = k0; k < k1; k++) s += (double)arow[k] * ascale * (double)bcol[k * nr];
    return (float)s;
}

/* One instruction for one output (A's row arow; B's column bcol, stride nr): steps 1-5, or the IEEE sum. */
static float instruction_scalar(const job_t *j, const float *arow, const int8_t *earow, const float *bcol,
                                const int8_t *ebcol, int64_t k0, int64_t k1, float cin) {
    int e = c_exponent_scalar(cin);
    for (int64_t k = k0; k < k1; k++) {
        const int ek = exponent_of_code(earow[k]) + exponent_of_code(ebcol[k * j->nr]);
        e = ek > e ? ek : e;
    }
    if (e >= 128) return ieee_instruction(arow, 1.0, bcol, j->nr, k0, k1, cin);
    double sum = trunc(ldexp((double)cin, j->frac - e));
    for (int64_t k = k0; k < k1; k++)
        sum += trunc(ldexp((double)arow[k] * (double)bcol[k * j->nr], j->frac - e));
    /* Step 5: toward zero to out_frac fraction bits, with fp32's exponent range (clamped at -126). */
    const double v = ldexp(sum, e - j->frac);
    if (v == 0.0) return 0.0f;  /* +0: the hardware's integer sum has no sign of zero */
    int lead;
    frexp(v, &lead);
    lead = lead - 1 < -126 ? -126 : lead - 1;  /* 2^lead <= |v| */
    return (float)ldexp(trunc(ldexp(v, j->out_frac - lead)), lead - j->out_frac);  /* exact, or inf past fp32 */
}

static void tile_generic(const job_t *j, int64_t it, int64_t jt, int64_t t0, int64_t t1) {
    enum { T = MR_G * NR_G };
    const int64_t i0 = it * MR_G, j0 = jt * NR_G;
    const float *bpanel = j->bp + jt * j->k * NR_G;
    const int8_t *ebpanel = j->eb + jt * j->k * NR_G;
    float c[T], acc[T], s[T];
    const float *state = t0 ? j->acc : j->c0;  /* the first K block starts from c0 (or zeros) */
    tile_in(j, j->promote ? NULL : state, i0, j0, c);
    tile_in(j, j->promote && t0 ? j->acc : NULL, i0, j0, acc);
    for (int64_t t = t0; t < t1; t++) {
        const int64_t ins = j->desc ? j->n_ins - 1 - t : t;
        const int64_t k0 = ins * j->chunk, k1 = min64(j->k, k0 + j->chunk);
        for (int r = 0; r < MR_G; r++) {
            const float *arow = j->ap + (i0 + r) * j->lda;
            const int8_t *earow = j->ea + (i0 + r) * j->lda;
            for (int q = 0; q < NR_G; q++)
                c[r * NR_G + q] = instruction_scalar(j, arow, earow, bpanel + q, ebpanel + q, k0, k1, c[r * NR_G + q]);
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
    tile_store(j, t1 == j->n_ins, i0, j0, j->promote ? acc : c);
}

/* ---------------------------------------------------------------- SIMD path */

#if SIMD == 512
#define VL 16
#define MR 6
typedef __m512 vf;
typedef __m512i vi; /* VL int32 */
typedef __m256i vh; /* NR = 2 * VL int8 exponent codes */
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
#define vi_min _mm512_min_epi32
#define vi_and _mm512_and_si512
#define vi_srli _mm512_srli_epi32
#define vi_slli _mm512_slli_epi32
#define vi_store(p, x) _mm512_storeu_si512((void *)(p), (x))
#define vh_load(p) _mm256_loadu_si256((const __m256i *)(p))
#define vh_set1 _mm256_set1_epi8
#define vh_bcast8(p) _mm256_set1_epi8(*(p))
#define vh_add _mm256_adds_epi8
#define vh_max _mm256_max_epi8
#define vh_min _mm256_min_epi8
#define vh_widen(x, h) _mm512_cvtepi8_epi32(_mm256_extracti128_si256((x), (h)))
/* True exponents from the max of code sums: -62 below -CODE_SPLIT (a zero took part), EXP_NONFINITE above. */
static inline vi decode(vi d) {
    d = _mm512_mask_sub_epi32(d, _mm512_cmple_epi32_mask(d, vi_set1(-CODE_SPLIT)), d, vi_set1(62));
    return _mm512_mask_mov_epi32(d, _mm512_cmpge_epi32_mask(d, vi_set1(CODE_SPLIT)), vi_set1(EXP_NONFINITE));
}
/* Whether any lane of x lies outside [lo, hi]. */
static inline int vi_any_outside(vi x, int lo, int hi) {
    return _mm512_cmpgt_epu32_mask(vi_sub(x, vi_set1(lo)), vi_set1(hi - lo)) != 0;
}
/* Whether any lane of x exceeds hi. */
static inline int vi_any_above(vi x, int hi) { return _mm512_cmpgt_epi32_mask(x, vi_set1(hi)) != 0; }
/* Whether any code of x lies outside (-CODE_SPLIT, CODE_SPLIT), where decode() is not the identity. */
static inline int vh_any_far(vh x) {
    return _mm256_cmpgt_epu8_mask(_mm256_add_epi8(x, vh_set1(CODE_SPLIT - 1)), vh_set1(2 * (CODE_SPLIT - 1))) != 0;
}
#elif SIMD == 256
#define VL 8
#define MR 2
typedef __m256 vf;
typedef __m256i vi;
typedef __m128i vh;
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
#define vi_min _mm256_min_epi32
#define vi_and _mm256_and_si256
#define vi_srli _mm256_srli_epi32
#define vi_slli _mm256_slli_epi32
#define vi_store(p, x) _mm256_storeu_si256((__m256i *)(p), (x))
#define vh_load(p) _mm_loadu_si128((const __m128i *)(p))
#define vh_set1 _mm_set1_epi8
#define vh_bcast8(p) _mm_set1_epi8(*(p))
#define vh_add _mm_adds_epi8
#define vh_max _mm_max_epi8
#define vh_min _mm_min_epi8
#define vh_widen(x, h) _mm256_cvtepi8_epi32((h) ? _mm_srli_si128((x), 8) : (x))
static inline vi decode(vi d) {
    d = vi_sub(d, vi_and(_mm256_cmpgt_epi32(vi_set1(-CODE_SPLIT + 1), d), vi_set1(62)));
    return _mm256_blendv_epi8(d, vi_set1(EXP_NONFINITE), _mm256_cmpgt_epi32(d, vi_set1(CODE_SPLIT - 1)));
}
static inline int vi_any_outside(vi x, int lo, int hi) {
    const vi u = vi_sub(x, vi_set1(lo)), range = vi_set1(hi - lo);  /* unsigned u > range <=> max(u, range) != range */
    return !_mm256_testc_si256(_mm256_cmpeq_epi32(_mm256_max_epu32(u, range), range), _mm256_set1_epi32(-1));
}
static inline int vi_any_above(vi x, int hi) { return _mm256_movemask_epi8(_mm256_cmpgt_epi32(x, vi_set1(hi))) != 0; }
static inline int vh_any_far(vh x) {
    const vh u = _mm_add_epi8(x, vh_set1(CODE_SPLIT - 1)), range = vh_set1(2 * (CODE_SPLIT - 1));
    return _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_max_epu8(u, range), range)) != 0xFFFF;
}
#endif

#if SIMD
#define NV 2
#define NR (NV * VL)

/* b * (*a broadcast): on AVX-512 the broadcast is the multiply's memory operand ({1to16}); a separate
 * broadcast from memory takes a vector pipe's slot on Zen 4 (measured: +0.4 cycles each). */
static inline vf mul_bcast(const float *a, vf b) {
#if SIMD == 512
    vf p;
    __asm__("vmulps %1%{1to16%}, %2, %0" : "=v"(p) : "m"(*a), "v"(b));
    return p;
#else
    return vf_mul(vf_set1(*a), b);
#endif
}
/* 2^e for an int32 vector of exponents in [-126, 127]. */
static inline vf pow2(vi e) { return vi_as_vf(vi_slli(vi_add(e, vi_set1(127)), 23)); }

/* C's exponent, clamped at -126; 128 for inf/NaN. */
static inline vi c_exponent(vf c) {
    return vi_sub(vi_max(vi_and(vi_srli(vf_as_vi(c), 23), vi_set1(0xFF)), vi_set1(1)), vi_set1(127));
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

/* VL bf16 values widened exactly to fp32. */
static inline vf vf_load_bf16(const uint16_t *p) {
#if SIMD == 512
    return vi_as_vf(vi_slli(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
#else
    return vi_as_vf(vi_slli(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
#endif
}

/* x rounded to bf16 as bf16_of rounds (nearest even, NaN to 0x7FC0), VL values stored at p. */
static inline void vf_store_bf16(uint16_t *p, vf x) {
    const vi u = vf_as_vi(x);
    vi r = vi_srli(vi_add(vi_add(u, vi_set1(0x7FFF)), vi_and(vi_srli(u, 16), vi_set1(1))), 16);
#if SIMD == 512
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), vi_set1(0x7FC0));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(r));
#else
    r = _mm256_blendv_epi8(r, vi_set1(0x7FC0), vf_as_vi(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
#endif
}

static void state_out(const job_t *j, int last, int64_t i0, int64_t j0, int full, float *buf, vf x[MR][NV]) {
    if (!last && full) {
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) vf_store(j->acc + (i0 + r) * j->n + j0 + v * VL, x[r][v]);
        return;
    }
    if (full) {  /* the epilogue in registers, each step as epilogue_row computes it */
        const vf inv = vf_set1(j->inv);
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) {
                const int64_t col = j0 + v * VL, at = (i0 + r) * j->n + col;
                vf y = j->has_inv ? vf_mul(x[r][v], inv) : x[r][v];
                if (j->bias)
                    y = vf_add(y, j->bias_bf16 ? vf_load_bf16((const uint16_t *)j->bias + col)
                                               : vf_load((const float *)j->bias + col));
                if (j->out_bf16)
                    vf_store_bf16((uint16_t *)j->out + at, y);
                else
                    vf_store((float *)j->out + at, y);
            }
        return;
    }
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) vf_store(buf + r * NR + v * VL, x[r][v]);
    tile_store(j, last, i0, j0, buf);
}

static void tile_simd(const job_t *j, int64_t it, int64_t jt, int64_t t0, int64_t t1) {
    const int64_t i0 = it * MR, j0 = jt * NR;
    const int full = i0 + MR <= j->m && j0 + NR <= j->n;
    const float *bpanel = j->bp + jt * j->k * NR;
    const int8_t *ebpanel = j->eb + jt * j->k * NR;
    const int64_t kk = j->lda;  /* A's row stride */
    const float *apanel = j->ap + i0 * kk;  /* rows past M repeat the last (their outputs are dropped) */
    const int8_t *eapanel = j->ea + i0 * kk;
    const int frac = j->frac;
    const vi keep = vi_set1((int)~((1u << (23 - j->out_frac)) - 1u)); /* step 5 as a mantissa mask */
    float buf[MR * NR];
    vf c[MR][NV], acc[MR][NV];
    const float *state = t0 ? j->acc : j->c0;  /* the first K block starts from c0 (or zeros) */
    state_in(j, j->promote ? NULL : state, i0, j0, full, buf, c);
    state_in(j, j->promote && t0 ? j->acc : NULL, i0, j0, full, buf, acc);
    /* ins % promote, kept up to date as t moves (promotes_after without a division per instruction) */
    int64_t g = j->promote ? (j->desc ? j->n_ins - 1 - t0 : t0) % j->promote : 0;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t ins = j->desc ? j->n_ins - 1 - t : t;
        const int64_t k0 = ins * j->chunk, k1 = min64(j->k, k0 + j->chunk);
        /* Pass 1: E = max(C's exponent, max over the chunk of ea + eb), on exponent codes. */
        vh eh[MR];
        for (int r = 0; r < MR; r++) eh[r] = vh_set1(-128);
#pragma GCC unroll 4
        for (int64_t k = k0; k < k1; k++) {
            const vh eb = vh_load(ebpanel + k * NR);
#pragma GCC unroll 8
            for (int r = 0; r < MR; r++) eh[r] = vh_max(eh[r], vh_add(vh_bcast8(eapanel + r * kk + k), eb));
        }
        vi e[MR][NV], s[MR][NV];
        vf sc[MR][NV];
        /* Usually every lane's largest code sum is a product's exponent (not every product has a zero
         * operand, and none has an inf or NaN one: no code sum of the tile lies outside (-CODE_SPLIT,
         * CODE_SPLIT), which the rows' min and max tell) and its E lies in [frac - 62, frac + 64]. Then, in
         * exponent-field units ((x + 127) << 23), E's field is the max of the codes' and C's (the codes + 127
         * are >= 88: C's clamp at -126 cannot matter); d = (64 + frac - E) << 23 is what pass 2 adds to a
         * product's exponent field, and d + (63 << 23) the field of 2^(frac - E) that scales C. */
        int unusual;
        {
            vh lo = eh[0], hi = eh[0];
            for (int r = 1; r < MR; r++) lo = vh_min(lo, eh[r]), hi = vh_max(hi, eh[r]);
            unusual = vh_any_far(lo) | vh_any_far(hi);
        }
        vi d[MR][NV];
        if (!unusual) {
            vi emax = vi_set1(0);
            for (int r = 0; r < MR; r++)
                for (int v = 0; v < NV; v++) {
                    const vi cf = vi_and(vf_as_vi(c[r][v]), vi_set1(0x7F800000));
                    const vi ef = vi_max(vi_add(vi_slli(vh_widen(eh[r], v), 23), vi_set1(127 << 23)), cf);
                    emax = vi_max(emax, ef);
                    d[r][v] = vi_sub(vi_set1((frac + 191) << 23), ef);
                    s[r][v] = vf_to_vi_trunc(vf_mul(c[r][v], vi_as_vf(vi_add(d[r][v], vi_set1(63 << 23)))));
                }
            unusual = vi_any_above(emax, (frac + 191) << 23);  /* E >= frac - 62 already: codes >= -39 */
        }
        if (!unusual) {
            /* Pass 2 scales a product by 2^(frac - E) by adding d (64 + frac - E >= 0) to its exponent field: A
             * is packed times 2^-64, so a nonzero product a*b*2^-64 is exact and normal (|a*b| >= 2^-32) and
             * stays normal; a zero product (bits 0 or the sign bit alone) becomes at most 2^(frac - E - 63)
             * < 1 in magnitude, which truncates to 0. One multiply per 16 products where a second one would
             * share the multiply pipes with the other ops (Zen 4: 2.0-2.1 instead of 2.3-2.5 cycles). */
            for (int64_t k = k0; k < k1; k++) {
                const vf b0 = vf_load(bpanel + k * NR), b1 = vf_load(bpanel + k * NR + VL);
#pragma GCC unroll 8
                for (int r = 0; r < MR; r++) {
                    const float *a = apanel + r * kk + k;
                    s[r][0] = vi_add(s[r][0], vf_to_vi_trunc(vi_as_vf(vi_add(vf_as_vi(mul_bcast(a, b0)), d[r][0]))));
                    s[r][1] = vi_add(s[r][1], vf_to_vi_trunc(vi_as_vf(vi_add(vf_as_vi(mul_bcast(a, b1)), d[r][1]))));
                }
            }
            /* Step 5, times 2^(E - frac): its field is (191 << 23) - d. */
            for (int r = 0; r < MR; r++)
                for (int v = 0; v < NV; v++) {
                    const vf kept = vi_as_vf(vi_and(vf_as_vi(vi_to_vf(s[r][v])), keep));
                    c[r][v] = vf_mul(kept, vi_as_vf(vi_sub(vi_set1(191 << 23), d[r][v])));
                }
            goto promote;
        }
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) {
                e[r][v] = vi_max(decode(vh_widen(eh[r], v)), c_exponent(c[r][v]));
                /* Products are zero whenever E < frac - 126, so clamping there keeps 2^(frac - E) finite (no
                 * inf * 0); C takes the rest of its scale, 2^(Es - E) <= 2^frac, as a second factor. Lanes
                 * with E >= 128 compute garbage here and are replaced by their IEEE sums below. */
                const vi ec = vi_min(e[r][v], vi_set1(127)), es = vi_max(ec, vi_set1(frac - 126));
                sc[r][v] = pow2(vi_sub(vi_set1(frac), es));
                s[r][v] = vf_to_vi_trunc(vf_mul(vf_mul(c[r][v], sc[r][v]), pow2(vi_sub(es, ec))));
            }
        /* Pass 2 of a tile with unusual lanes: add the truncated products in units of 2^(E - frac), exactly,
         * as int32 (a*b*2^-64 times 2^64 is a*b). */
        const vf two64 = vf_set1(0x1p64f);
        for (int64_t k = k0; k < k1; k++) {
            const vf b0 = vf_load(bpanel + k * NR), b1 = vf_load(bpanel + k * NR + VL);
            for (int r = 0; r < MR; r++) {
                const float *a = apanel + r * kk + k;
                s[r][0] = vi_add(s[r][0], vf_to_vi_trunc(vf_mul(vf_mul(mul_bcast(a, b0), two64), sc[r][0])));
                s[r][1] = vi_add(s[r][1], vf_to_vi_trunc(vf_mul(vf_mul(mul_bcast(a, b1), two64), sc[r][1])));
            }
        }
        /* Step 5: the int32 sum as a float (exact; 0 is +0), out_frac fraction bits kept, times 2^(E - frac)
         * (in two exact factors where that alone would be subnormal). */
        float cin[MR * NR];
        int32_t ebuf[MR * NR];
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) {
                vi_store(ebuf + r * NR + v * VL, e[r][v]);
                vf_store(cin + r * NR + v * VL, c[r][v]);
                const vf kept = vi_as_vf(vi_and(vf_as_vi(vi_to_vf(s[r][v])), keep));
                const vi eo = vi_sub(vi_min(e[r][v], vi_set1(127)), vi_set1(frac)), e1 = vi_max(eo, vi_set1(-126));
                vf_store(buf + r * NR + v * VL, vf_mul(vf_mul(kept, pow2(e1)), pow2(vi_sub(eo, e1))));
            }
        for (int r = 0; r < MR; r++)
            for (int q = 0; q < NR; q++)
                if (ebuf[r * NR + q] >= 128)  /* rare: an instruction with an inf or NaN term is an IEEE sum */
                    buf[r * NR + q] = ieee_instruction(apanel + r * kk, 0x1p64, bpanel + q, NR, k0, k1, cin[r * NR + q]);
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) c[r][v] = vf_load(buf + r * NR + v * VL);
    promote:
        if (j->promote && (j->desc ? g == 0 : (g == j->promote - 1 || ins == j->n_ins - 1))) {
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
        if (j->promote)
            g = j->desc ? (g == 0 ? j->promote - 1 : g - 1) : (g + 1 == j->promote ? 0 : g + 1);
    }
    state_out(j, t1 == j->n_ins, i0, j0, full, buf, j->promote ? acc : c);
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
 * out (M, N, row-major) = round(acc * inv + bias), acc the accumulator over A (M, K) times B (K, N).
 * a, b: fp32 or bf16 (a_bf16, b_bf16) with element strides (sam, sak), (sbk, sbn).
 * fmt: {a_emin, a_mbits, b_emin, b_mbits} (exponents within [-19, 19]); vmax: {a_max, b_max} (grid check).
 * promote: instructions per promotion (0: fast accumulation, the chained C is the result).
 * desc: visit instructions from the last to the first. c0: (M, N) row-major first C ("fast" only), or NULL.
 * sa (M, G; row stride sa_ld), sb (G, N; row stride sb_ld): group scales or NULL (promote > 0 only).
 * The epilogue, each step in fp32: times inv if has_inv, plus bias (N,) (fp32, or bf16 if bias_bf16) if not
 * NULL, then stored as fp32 or, if out_bf16, rounded to bf16 (nearest even). With none of them, out is acc.
 * mode: 0 the fastest exact path, 1 the generic path (tests compare them).
 * bad[0], bad[1]: how many values of A and B are off their format's grid (then nothing is computed and out
 * is left as it was). Returns 0, or -1 when memory runs out. Scratch memory stays with the calling thread
 * (fp8lab_accum_release).
 */
int fp8lab_accumulate(const void *a, int a_bf16, int64_t sam, int64_t sak, const void *b, int b_bf16, int64_t sbk,
                      int64_t sbn, int64_t m, int64_t n, int64_t k, const int *fmt, const float *vmax, int chunk,
                      int frac, int promote, int desc, const float *c0, const float *sa, int64_t sa_ld,
                      const float *sb, int64_t sb_ld, int has_inv, float inv, const void *bias, int bias_bf16,
                      void *out, int out_bf16, int nthreads, int mode, int64_t *bad) {
    job_t j = {0};
    const int simd = fp8lab_accum_uses_simd(chunk, frac) && mode != 1;
    j.m = m, j.n = n, j.k = k, j.chunk = chunk, j.frac = frac, j.out_frac = frac < 23 ? frac : 23;
    j.n_ins = (k + chunk - 1) / chunk, j.promote = promote, j.desc = desc;
    j.c0 = c0, j.sa = sa, j.sb = sb, j.sa_ld = sa_ld, j.sb_ld = sb_ld;
    j.prescaled = simd;
    j.has_inv = has_inv, j.inv = inv, j.bias = bias, j.bias_bf16 = bias_bf16, j.out = out, j.out_bf16 = out_bf16;
#if SIMD
    j.mr = simd ? MR : MR_G, j.nr = simd ? NR : NR_G;
#else
    (void)simd;
    j.mr = MR_G, j.nr = NR_G;
#endif
    bad[0] = bad[1] = 0;
    if (m == 0 || n == 0) return 0;
    j.np = (n + j.nr - 1) / j.nr * j.nr;
    const int64_t tiles_m = (m + j.mr - 1) / j.mr, tiles_n = j.np / j.nr, kk = k > 0 ? k : 1;
    /* K blocks of whole instructions (whole promotion groups when promoting, so that C is 0 between
     * blocks and the promoted accumulator alone lives in acc) whose B panels, float + int8 code per
     * element, fit L2_BUDGET. */
    int64_t block = L2_BUDGET / (j.np * 5 * chunk);
    block = block < 1 ? 1 : block;
    if (promote) block = block < promote ? promote : block / promote * promote;
    /* Descending, the first group visited is the partial one at the end of K. */
    const int64_t first = promote && desc ? (j.n_ins - 1) % promote + 1 + (block - promote) : block;
    const int64_t n_blocks = j.n_ins <= first ? 1 : 1 + (j.n_ins - first + block - 1) / block;
    /* Scratch, 64-byte aligned pieces: A's panels, their codes, B's panels, their codes, and the fp32
     * accumulator between K blocks when out cannot hold it. */
    const int own_acc = n_blocks > 1 && out_bf16;
    /* A's rows 64 bytes longer than 4 KiB multiples, so that a tile's rows do not share their L1 sets */
    j.lda = (kk + 15) / 16 * 16 + ((kk + 15) / 16 % 64 == 0 ? 16 : 0);
    const size_t pieces[5] = {sizeof(float) * tiles_m * j.mr * j.lda, (size_t)(tiles_m * j.mr * j.lda),
                              sizeof(float) * j.np * kk, (size_t)(j.np * kk), own_acc ? sizeof(float) * m * n : 0};
    size_t total = 0, at[5];
    for (int q = 0; q < 5; q++) at[q] = total, total += (pieces[q] + 63) / 64 * 64;
    char *mem = scratch(total + 64);
    if (!mem) return -1;
    mem += (64 - (uintptr_t)mem % 64) % 64;
    j.ap = (float *)(mem + at[0]), j.ea = (int8_t *)(mem + at[1]);
    j.bp = (float *)(mem + at[2]), j.eb = (int8_t *)(mem + at[3]);
    j.acc = own_acc ? (float *)(mem + at[4]) : (float *)out;
    int64_t bad_a = 0, bad_b = 0;
    const int64_t k_squares = (k + BLOCK - 1) / BLOCK;
    uint32_t vmax_bits[2];
    memcpy(vmax_bits, vmax, sizeof vmax_bits);
    if (nthreads < 1) nthreads = 1;
    int64_t group = tiles_m / (4 * nthreads);  /* A's tiles packed together: up to 8, 4 groups per thread */
    group = group < 1 ? 1 : group > 8 ? 8 : group;
#pragma omp parallel num_threads(nthreads)
    {
#ifdef HAVE_MXCSR
        /* Round to nearest, no flush-to-zero or denormals-are-zero, whatever the caller set (torch's
         * set_flush_denormal sets FTZ/DAZ): the model's fp32 adds keep subnormals. */
        const unsigned int csr = _mm_getcsr();
        _mm_setcsr(0x1F80);
#endif
#pragma omp for schedule(static) reduction(+ : bad_a) nowait /* pack_b's loop ends in the barrier */
        for (int64_t it = 0; it < tiles_m; it += group)
            bad_a += pack_a(&j, a, a_bf16, sam, sak, it, min64(tiles_m, it + group), fmt, vmax_bits[0]);
#pragma omp for schedule(static) reduction(+ : bad_b)
        for (int64_t t = 0; t < tiles_n * k_squares; t++) {
            const int64_t p = t / k_squares, k0 = (t % k_squares) * BLOCK;
            bad_b += pack_b(&j, b, b_bf16, sbk, sbn, p, k0, min64(k, k0 + BLOCK), fmt, vmax_bits[1]);
        }
        if (!(bad_a || bad_b))
            for (int64_t blk = 0; blk < n_blocks; blk++) {
                const int64_t t0 = blk ? first + (blk - 1) * block : 0, t1 = min64(j.n_ins, blk ? t0 + block : first);
                /* Row tiles across threads; each sweeps every column panel of the block (in its L2). A static
                 * schedule gives a thread the same row tiles in every block, so blocks need no barrier. */
#pragma omp for schedule(static) nowait
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
    return 0;
}
