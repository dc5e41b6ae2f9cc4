/* ukernel_avx512_bf16.c — the bf16 micro-kernel of the avx512_bf16 level: a 12×32 tile of fp32
 * accumulators (24 zmm) over bf16 K-pairs, by vdpbf16ps (AVX512_BF16).
 *
 * Packed operands (gemm_pack.c, dp->k_pairs): 32-bit slots, each a pair of bf16 (k = 2pp in the low
 * half, 2pp+1 in the high half):
 *   ap[pp·12 + i] = (a(i, 2pp), a(i, 2pp+1))      bp[pp·32 + j] = (b(2pp, j), b(2pp+1, j))
 * Per pair: 2 aligned loads of B (16 columns each), 12 broadcasts of a 32-bit pair of A, 24
 * vdpbf16ps; each does, in each of its 16 fp32 lanes j,
 *   acc[i][j] += a(i, 2pp+1)·b(2pp+1, j);  acc[i][j] += a(i, 2pp)·b(2pp, j)
 * (Intel's pseudo-code: products of bf16 exact in fp32, each addition rounded to nearest even,
 * bf16 denormal inputs read as 0 and denormal results flushed to 0 — the error bound is in
 * tests/tolerances.py). So one pair is 4 flops per lane, 64 per instruction.
 *   c[i][j] (+)= Σ_pp ap·bp  (+ bias[j] when !accumulate)      (lf_ukernel_fn, internal.h; kc counts k)
 * Edge tiles: __mmask16 column masks on the stores; a tile of ≤ 8 rows runs an 8- or 4-row instance of the
 * loop (tile_rows), the rows beyond mr zero-padded by packing.
 * The pair tile (ukernel_pair, gemm.c w_rows_block_run: Cᵀ = W·xᵀ for 16–256 tokens): 6 rows of W read in
 * place, a 32-bit pair of each per k-pair step broadcast, × two 32-wide slivers of packed xᵀ (64 tokens): 24
 * accumulators (12 and 6 in its 32- and 16-column instances for fewer tokens), the same vdpbf16ps per lane in
 * the same order as the 12×32 tile — the products commute, so C's bits are those of the x-rows orientation. It
 * stores rows of Cᵀ (a scratch; gemm.c transposes it into C), bias[i] on row i.
 * Compiled for any x86-64 with a target attribute; chosen (gemm.c dispatch_of) only on the
 * avx512_bf16 level, which cpuid must report (dispatch.c). */
#include <string.h>

#include "internal.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define LF_AVX512_BF16 __attribute__((target("avx512f,avx512bf16")))
enum { MR = 12, NR = 32 };

/* The tile's loop for its first `rows` rows (12, 8 or 4: a constant in each instance, so the accumulators stay
 * in registers); a tile of mr ≤ 8 rows (M's remainder, e.g. 256 = 21·12 + 4) runs the 8- or 4-row instance
 * instead of doing the 12-row work for its zero-padded rows. The packed A sliver is MR-tall either way. */
LF_AVX512_BF16 static inline __attribute__((always_inline)) void
tile_rows(const int rows, int64_t kc, const uint32_t *ap, const uint32_t *bp, float *c, int64_t ldc, int64_t mr,
          int64_t nr, int accumulate, const float *bias) {
    const int64_t np = (kc + 1) / 2;
    __m512 acc[MR][2];
#pragma GCC unroll 12
    for (int i = 0; i < rows; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
#pragma GCC unroll 12
    for (int i = 0; i < rows; i++) { /* the C tile, wanted at the end: fetch both lines of each row */
        _mm_prefetch((const char *)(c + (i < mr ? i : 0) * ldc), _MM_HINT_T0);
        _mm_prefetch((const char *)(c + (i < mr ? i : 0) * ldc + 16), _MM_HINT_T0);
    }
    /* acc[i][v] += Σ_e a(i, 2pp+e)·b(2pp+e, 16v + lane), pp < np */
    for (int64_t pp = 0; pp < np; pp++) {
        const __m512bh b0 = (__m512bh)_mm512_load_si512((const void *)bp);
        const __m512bh b1 = (__m512bh)_mm512_load_si512((const void *)(bp + 16));
        _mm_prefetch((const char *)(bp + 8 * NR), _MM_HINT_T0);
#pragma GCC unroll 12
        for (int i = 0; i < rows; i++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)ap[i]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, b1);
        }
        ap += MR;
        bp += NR;
    }
    const __mmask16 m0 = nr >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nr) - 1u);
    const __mmask16 m1 = nr >= 32 ? (__mmask16)0xFFFF : nr <= 16 ? 0 : (__mmask16)((1u << (nr - 16)) - 1u);
    __m512 base0 = _mm512_setzero_ps(), base1 = _mm512_setzero_ps();
    if (!accumulate && bias) {
        base0 = _mm512_maskz_loadu_ps(m0, bias);
        base1 = _mm512_maskz_loadu_ps(m1, bias + 16);
    }
#pragma GCC unroll 12
    for (int i = 0; i < rows; i++) { /* a constant trip count: the accumulators stay in registers */
        if (i >= mr) break;
        float *ci = c + i * ldc;
        if (accumulate) {
            base0 = _mm512_maskz_loadu_ps(m0, ci);
            base1 = _mm512_maskz_loadu_ps(m1, ci + 16);
        }
        _mm512_mask_storeu_ps(ci, m0, _mm512_add_ps(base0, acc[i][0]));
        _mm512_mask_storeu_ps(ci + 16, m1, _mm512_add_ps(base1, acc[i][1]));
    }
}

LF_AVX512_BF16 static void ukernel_avx512_bf16(int64_t kc, const float *app, const float *bpp, float *c, int64_t ldc,
                                               int64_t mr, int64_t nr, int accumulate, const float *bias) {
    const uint32_t *ap = (const uint32_t *)app; /* the packed slots: 32-bit pairs, not floats */
    const uint32_t *bp = (const uint32_t *)bpp;
    if (mr <= 4) tile_rows(4, kc, ap, bp, c, ldc, mr, nr, accumulate, bias);
    else if (mr <= 8) tile_rows(8, kc, ap, bp, c, ldc, mr, nr, accumulate, bias);
    else tile_rows(MR, kc, ap, bp, c, ldc, mr, nr, accumulate, bias);
}

/* The pair tile, in the transposed orientation (gemm.c: W as A, xᵀ as b): PR = 6 rows of a row-major bf16 A read
 * in place (pairs at a + i·lda + 2pp, lda in 16-bit elements) × NZ = 4, 2 or 1 zmm columns of packed b (two
 * 32-wide slivers, the second at bp + bstride; one; its first 16 columns): c[i·ldc + j] (+)= Σ_pp …, + bias[i]
 * when !accumulate. */
LF_AVX512_BF16 static inline __attribute__((always_inline)) void
pair_slivers(const int NZ, int64_t kc, const uint16_t *a, int64_t lda, const uint32_t *bp, int64_t bstride, float *c,
             int64_t ldc, int64_t mr, int64_t nr, int accumulate, const float *bias) {
    enum { PR = 6 };
    const int64_t np = (kc + 1) / 2;
    const uint16_t *ar[PR];
#pragma GCC unroll 6
    for (int i = 0; i < PR; i++) ar[i] = a + (i < mr ? i : mr - 1) * lda;
    __m512 acc[PR][4];
#pragma GCC unroll 6
    for (int i = 0; i < PR; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = _mm512_setzero_ps();
    /* acc[i][v] += Σ_e a(i, 2pp+e)·b(2pp+e, 16v + lane), pp < np (sliver v / 2 at bp + (v / 2)·bstride) */
    for (int64_t pp = 0; pp < np; pp++) {
        __m512bh b[4];
#pragma GCC unroll 4
        for (int v = 0; v < NZ; v++) /* zmm v: columns 16v…, in sliver v / 2 */
            b[v] = (__m512bh)_mm512_load_si512((const void *)(bp + v / 2 * bstride + 16 * (v % 2)));
#pragma GCC unroll 2
        for (int t = 0; t < (NZ + 1) / 2; t++) _mm_prefetch((const char *)(bp + t * bstride + 8 * NR), _MM_HINT_T0);
#pragma GCC unroll 6
        for (int i = 0; i < PR; i++) {
            uint32_t w;
            memcpy(&w, ar[i] + 2 * pp, sizeof w);
            const __m512bh av = (__m512bh)_mm512_set1_epi32((int)w);
#pragma GCC unroll 4
            for (int v = 0; v < NZ; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, b[v]);
        }
        bp += NR;
    }
    __mmask16 m[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; v++) /* columns 16v… of the tile: all, none, or the first nr − 16v */
        m[v] = nr >= 16 * (v + 1) ? (__mmask16)0xFFFF : nr <= 16 * v ? 0 : (__mmask16)((1u << (nr - 16 * v)) - 1u);
#pragma GCC unroll 6
    for (int i = 0; i < PR; i++) { /* a constant trip count: the accumulators stay in registers */
        if (i >= mr) break;
        float *ci = c + i * ldc;
        const __m512 bi = !accumulate && bias ? _mm512_set1_ps(bias[i]) : _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int v = 0; v < NZ; v++)
            _mm512_mask_storeu_ps(ci + 16 * v, m[v],
                                  _mm512_add_ps(accumulate ? _mm512_maskz_loadu_ps(m[v], ci + 16 * v) : bi, acc[i][v]));
    }
}

LF_AVX512_BF16 static void ukernel_avx512_bf16_pair(int64_t kc, const float *a, int64_t lda, const float *bp,
                                                    int64_t bstride, float *c, int64_t ldc, int64_t mr, int64_t nr,
                                                    int accumulate, const float *bias) {
    const uint16_t *w = (const uint16_t *)a;
    const uint32_t *x = (const uint32_t *)bp;
    if (nr > NR) /* two slivers; or one (its first 16 columns when nr ≤ 16: 6 accumulators, not 12) */
        pair_slivers(4, kc, w, lda, x, bstride, c, ldc, mr, nr, accumulate, bias);
    else if (nr > 16)
        pair_slivers(2, kc, w, lda, x, 0, c, ldc, mr, nr, accumulate, bias);
    else
        pair_slivers(1, kc, w, lda, x, 0, c, ldc, mr, nr, accumulate, bias);
}

const lf_dispatch lf_dispatch_avx512_bf16 = {
    .isa = LF_ISA_AVX512_BF16, .mr = MR, .nr = NR, .blk = &lf_tunables_avx512_bf16.pairs,
    .ukernel = ukernel_avx512_bf16, .widen = lf_widen_avx512, .k_pairs = 1,
    .ukernel_pair = ukernel_avx512_bf16_pair, .pair_mr = 6, /* W's rows in place: gemm.c w_rows_block_run */
    .transpose = lf_transpose16_avx512, .tb = 16, /* B's K-pairs of a column-contiguous b (Wᵀ) */
};
#else
const lf_dispatch lf_dispatch_avx512_bf16 = {0};
#endif
