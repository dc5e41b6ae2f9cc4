/* ukernel_avx512.c — AVX-512F micro-kernels in broadcast-FMA form, three register tiles:
 *   wide   12×32: 24 zmm accumulators; per k 2 aligned loads of B, 12 broadcasts, 24 FMAs;
 *          the C tile (both lines of each row) is prefetched before the k loop: y is often cold,
 *          other work having run since the last call
 *   pair   6×64 reading A in place: two adjacent 32-wide slivers of the packed B at once, 24
 *          accumulators; per k 4 loads of B and 6 broadcasts from 6 rows of A. Six rows, not
 *          twelve: rows of a row-major A whose stride is a multiple of 4 KiB (k = 1024, 2048,
 *          4096…) all fall in one set of the 8-way L1, and twelve of them evict each other on
 *          every k step — the 12×32 tile reading A in place lost 10–25 % at 512×1024×1024.
 *   narrow 24×16: 24 zmm accumulators for N ≤ 16 (the rank-r GEMMs: u = x·Aᵀ, v = g·B,
 *                 dB = gᵀ·u), so that r = 16 does not waste half of a 32-wide tile
 * With 32 zmm registers each leaves room for the B vectors and the broadcast.
 *   c[i][j] (+)= Σ_p ap[p*MR + i] · bp[p*NR + j]     (see lf_ukernel_fn in internal.h)
 * Edge tiles: __mmask16 column masks on loads/stores, rows stop at mr. The store loop runs a
 * constant MR times (leaving at mr): with a run-time trip count GCC kept the 24 accumulators in
 * a stack array, a spill and reload per tile.
 * Compiled for any x86-64 with a target attribute; called only when cpuid reports AVX-512F
 * and the OS saves ZMM state. */
#include "internal.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define LF_AVX512 __attribute__((target("avx512f")))
#define MAX_MR 24
#define MAX_NV 2 /* zmm columns per sliver */
#define MAX_NS 2 /* slivers per tile */

static inline __mmask16 col_mask(int64_t valid) {
    if (valid >= 16) return (__mmask16)0xFFFF;
    if (valid <= 0) return 0;
    return (__mmask16)((1u << valid) - 1u);
}

/* One body for every tile: MR rows × NS slivers × NV zmm columns (NR = 16·NV per sliver; sliver t
 * at bp + t·bstride). Inlined with constant MR, NV and NS, the loops unroll fully and the
 * accumulators live in registers. */
LF_AVX512 static inline __attribute__((always_inline)) void tile(
    const int MR, const int NV, const int NS, const int in_place, int64_t kc, const float *ap, const int64_t lda,
    const float *bp, const int64_t bstride, float *c, int64_t ldc, int64_t mr, int64_t nr, int accumulate,
    const float *bias) {
    /* in_place (a constant): A unpacked, row i at ap + i·lda (past mr: the last row again; any
     * lda, 0 included — a broadcast row); else ap is the packed sliver */
    const float *ar[MAX_MR];
#pragma GCC unroll 24
    for (int i = 0; i < MR; i++) ar[i] = ap + (i < mr ? i : mr - 1) * lda;
    __m512 acc[MAX_MR][MAX_NS * MAX_NV];
#pragma GCC unroll 24
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int v = 0; v < NS * NV; v++) acc[i][v] = _mm512_setzero_ps();
    for (int i = 0; i < MR; i++) /* the C tile, wanted at the end: fetch it while the k loop runs */
#pragma GCC unroll 4
        for (int v = 0; v < NS * NV; v++) /* every 64-byte line of the row: when y is cold (other work ran
                                             since our last call), the second line missed at the store */
            _mm_prefetch((const char *)(c + (i < mr ? i : 0) * ldc + 16 * v), _MM_HINT_T0);
    for (int64_t p = 0; p < kc; p++) {
        __m512 b[MAX_NS * MAX_NV];
#pragma GCC unroll 2
        for (int t = 0; t < NS; t++) {
#pragma GCC unroll 2
            for (int v = 0; v < NV; v++) b[t * NV + v] = _mm512_load_ps(bp + t * bstride + 16 * v);
            _mm_prefetch((const char *)(bp + t * bstride + 8 * 16 * NV), _MM_HINT_T0);
        }
#pragma GCC unroll 24
        for (int i = 0; i < MR; i++) {
            const __m512 a = _mm512_set1_ps(in_place ? ar[i][p] : ap[i]);
#pragma GCC unroll 4
            for (int v = 0; v < NS * NV; v++) acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
        }
        if (!in_place) ap += MR;
        bp += 16 * NV;
    }
    __mmask16 mask[MAX_NS * MAX_NV];
    __m512 base[MAX_NS * MAX_NV];
#pragma GCC unroll 4
    for (int v = 0; v < NS * NV; v++) {
        mask[v] = col_mask(nr - 16 * v);
        base[v] = (!accumulate && bias) ? _mm512_maskz_loadu_ps(mask[v], bias + 16 * v) : _mm512_setzero_ps();
    }
#pragma GCC unroll 24
    for (int i = 0; i < MR; i++) { /* a constant trip count: the accumulators stay in registers */
        if (i >= mr) break;
        float *ci = c + i * ldc;
#pragma GCC unroll 4
        for (int v = 0; v < NS * NV; v++) {
            if (accumulate) base[v] = _mm512_maskz_loadu_ps(mask[v], ci + 16 * v);
            _mm512_mask_storeu_ps(ci + 16 * v, mask[v], _mm512_add_ps(base[v], acc[i][v]));
        }
    }
}

LF_AVX512 static void ukernel_avx512_wide(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc,
                                          int64_t mr, int64_t nr, int accumulate, const float *bias) {
    tile(12, 2, 1, 0, kc, ap, 0, bp, 0, c, ldc, mr, nr, accumulate, bias);
}

/* the wide tile reading A in place: a row-major, rows i at a + i·lda (no packing of A) */
LF_AVX512 static void ukernel_avx512_direct(int64_t kc, const float *a, int64_t lda, const float *bp, float *c,
                                            int64_t ldc, int64_t mr, int64_t nr, int accumulate, const float *bias) {
    tile(12, 2, 1, 1, kc, a, lda, bp, 0, c, ldc, mr, nr, accumulate, bias);
}

/* the pair tile (6 rows × two 32-wide slivers, the second at bp + bstride) reading A in place;
 * nr ≤ 32: the first sliver alone (no second sliver exists to be read) */
LF_AVX512 static void ukernel_avx512_pair(int64_t kc, const float *a, int64_t lda, const float *bp, int64_t bstride,
                                          float *c, int64_t ldc, int64_t mr, int64_t nr, int accumulate,
                                          const float *bias) {
    if (nr > 32)
        tile(6, 2, 2, 1, kc, a, lda, bp, bstride, c, ldc, mr, nr, accumulate, bias);
    else
        tile(6, 2, 1, 1, kc, a, lda, bp, 0, c, ldc, mr, nr, accumulate, bias);
}

LF_AVX512 static void ukernel_avx512_narrow(int64_t kc, const float *ap, const float *bp, float *c,
                                            int64_t ldc, int64_t mr, int64_t nr, int accumulate,
                                            const float *bias) {
    tile(24, 1, 1, 0, kc, ap, 0, bp, 0, c, ldc, mr, nr, accumulate, bias);
}

static const lf_dispatch narrow = {
    .isa = LF_ISA_AVX512, .mr = 24, .nr = 16, .blk = &lf_tunables_avx512.narrow,
    .ukernel = ukernel_avx512_narrow, .narrow = NULL, .transpose = lf_transpose16_avx512, .tb = 16,
    .widen = lf_widen_avx512,
};

const lf_dispatch lf_dispatch_avx512 = {
    .isa = LF_ISA_AVX512, .mr = 12, .nr = 32, .blk = &lf_tunables_avx512.wide,
    .ukernel = ukernel_avx512_wide, .narrow = &narrow, .transpose = lf_transpose16_avx512, .tb = 16,
    .widen = lf_widen_avx512,
    .ukernel_direct = ukernel_avx512_direct, .ukernel_pair = ukernel_avx512_pair, .pair_mr = 6,
};
#else
const lf_dispatch lf_dispatch_avx512 = {0};
#endif
