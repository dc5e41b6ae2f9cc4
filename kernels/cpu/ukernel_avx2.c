/* ukernel_avx2.c — AVX2+FMA micro-kernel: a 6×16 tile in 12 ymm accumulators.
 * Per k: 2 aligned loads of the B sliver, 6 broadcasts of A, 12 FMAs (broadcast-FMA form).
 *   c[i][j] (+)= Σ_p ap[p*6 + i] · bp[p*16 + j]     (see lf_ukernel_fn in internal.h)
 * A second variant reads A in place from its rows (gemm.c uses it where a thread has few
 * columns, as for the AVX-512 tile).
 * Edge tiles use maskload/maskstore on the columns and stop early on the rows; C's rows are prefetched
 * when the tile starts.
 * Compiled for any x86-64 with a target attribute; called only when cpuid reports AVX2+FMA. */
#include "internal.h"

#if defined(__x86_64__)
#include <immintrin.h>

enum { MR = 6, NR = 16 };

#define LF_AVX2 __attribute__((target("avx2,fma")))

LF_AVX2 static inline __m256i col_mask(int64_t valid) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(valid < 0 ? 0 : valid)), idx);
}

/* One body for both variants: in_place (a constant) reads A unpacked, row i at a + i·lda (past
 * mr: the last row again; any lda, 0 included — a broadcast row); else ap is the packed sliver. */
LF_AVX2 static inline __attribute__((always_inline)) void tile(const int in_place, int64_t kc, const float *ap,
                                                               const int64_t lda, const float *bp, float *c,
                                                               int64_t ldc, int64_t mr, int64_t nr, int accumulate,
                                                               const float *bias) {
    const float *ar[MR];
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) ar[i] = ap + (i < mr ? i : mr - 1) * lda;
    /* C's rows are asked for now, so their misses (C from L3 at each later K block) overlap the k loop instead
     * of stalling the stores: Zen 3, 2 threads, the 2048³ and 1024 × 4096² GEMMs 0.89–0.94× the time */
    __m256 acc[MR][2];
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) {
        acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        _mm_prefetch((const char *)(c + (i < mr ? i : mr - 1) * ldc), _MM_HINT_T0);
        _mm_prefetch((const char *)(c + (i < mr ? i : mr - 1) * ldc + 15), _MM_HINT_T0);
    }
    for (int64_t p = 0; p < kc; p++) {
        const __m256 b0 = _mm256_load_ps(bp), b1 = _mm256_load_ps(bp + 8);
#pragma GCC unroll 6
        for (int i = 0; i < MR; i++) {
            const __m256 a = _mm256_broadcast_ss(in_place ? ar[i] + p : ap + i);
            acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
        }
        if (!in_place) ap += MR;
        bp += NR;
    }
    /* C's rows: whole tiles by plain loads and stores, edge tiles masked (vmaskmovps, slow on AMD: a store ~8× a
     * plain one; on every tile it was ~18 % of the 2048³ GEMM's kernel samples, Zen 4 with avx2 forced) */
    const int full = nr >= NR;
    const __m256i m0 = col_mask(nr), m1 = col_mask(nr - 8);
    __m256 base0 = _mm256_setzero_ps(), base1 = _mm256_setzero_ps();
    if (!accumulate && bias) {
        base0 = _mm256_maskload_ps(bias, m0);
        base1 = _mm256_maskload_ps(bias + 8, m1);
    }
    /* a constant trip count, unrolled: every acc index is a constant, so the accumulators stay
     * in registers in the k loop (a loop to a run-time mr made GCC mirror all 12 of them to the
     * stack on every k step: 36 % of peak instead of ~85 %) */
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) {
        if (i >= mr) break;
        float *ci = c + i * ldc;
        if (accumulate) {
            base0 = full ? _mm256_loadu_ps(ci) : _mm256_maskload_ps(ci, m0);
            base1 = full ? _mm256_loadu_ps(ci + 8) : _mm256_maskload_ps(ci + 8, m1);
        }
        if (full) {
            _mm256_storeu_ps(ci, _mm256_add_ps(base0, acc[i][0]));
            _mm256_storeu_ps(ci + 8, _mm256_add_ps(base1, acc[i][1]));
        } else {
            _mm256_maskstore_ps(ci, m0, _mm256_add_ps(base0, acc[i][0]));
            _mm256_maskstore_ps(ci + 8, m1, _mm256_add_ps(base1, acc[i][1]));
        }
    }
}

LF_AVX2 static void ukernel_avx2(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc, int64_t mr,
                                 int64_t nr, int accumulate, const float *bias) {
    tile(0, kc, ap, 0, bp, c, ldc, mr, nr, accumulate, bias);
}

/* the tile reading A in place: a row-major, row i at a + i·lda (no packing of A) */
LF_AVX2 static void ukernel_avx2_direct(int64_t kc, const float *a, int64_t lda, const float *bp, float *c,
                                        int64_t ldc, int64_t mr, int64_t nr, int accumulate, const float *bias) {
    tile(1, kc, a, lda, bp, c, ldc, mr, nr, accumulate, bias);
}

const lf_dispatch lf_dispatch_avx2 = {
    .isa = LF_ISA_AVX2, .mr = MR, .nr = NR, .blk = &lf_tunables_avx2.wide,
    .ukernel = ukernel_avx2, .ukernel_direct = ukernel_avx2_direct, .transpose = lf_transpose8_avx2, .tb = 8,
    .widen = lf_widen_avx2,
};
#else
const lf_dispatch lf_dispatch_avx2 = {0};
#endif
