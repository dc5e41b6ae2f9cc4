/* ukernel_avx512.c — AVX-512F micro-kernel: a 12×32 tile in 24 zmm accumulators.
 * Per k: 2 aligned 64-byte loads of the B sliver, 12 broadcasts of A, 24 FMAs; with 32 zmm
 * registers this leaves room for the two B vectors and the broadcast.
 *   c[i][j] (+)= Σ_p ap[p*12 + i] · bp[p*32 + j]     (see lf_ukernel_fn in internal.h)
 * Edge tiles: __mmask16 column masks on loads/stores, rows stop at mr.
 * Compiled for any x86-64 with a target attribute; called only when cpuid reports AVX-512F
 * and the OS saves ZMM state. */
#include "internal.h"

#if defined(__x86_64__)
#include <immintrin.h>

enum { MR = 12, NR = 32 };

#define LF_AVX512 __attribute__((target("avx512f")))

static inline __mmask16 col_mask(int64_t valid) {
    if (valid >= 16) return (__mmask16)0xFFFF;
    if (valid <= 0) return 0;
    return (__mmask16)((1u << valid) - 1u);
}

LF_AVX512 static void ukernel_avx512(int64_t kc, const float *ap, const float *bp, float *c,
                                     int64_t ldc, int64_t mr, int64_t nr, int accumulate,
                                     const float *bias) {
    __m512 acc[MR][2];
#pragma GCC unroll 12
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < kc; p++) {
        const __m512 b0 = _mm512_load_ps(bp), b1 = _mm512_load_ps(bp + 16);
        _mm_prefetch((const char *)(bp + 8 * NR), _MM_HINT_T0);
#pragma GCC unroll 12
        for (int i = 0; i < MR; i++) {
            const __m512 a = _mm512_set1_ps(ap[i]);
            acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
        }
        ap += MR;
        bp += NR;
    }
    const __mmask16 m0 = col_mask(nr), m1 = col_mask(nr - 16);
    __m512 base0 = _mm512_setzero_ps(), base1 = _mm512_setzero_ps();
    if (!accumulate && bias) {
        base0 = _mm512_maskz_loadu_ps(m0, bias);
        base1 = _mm512_maskz_loadu_ps(m1, bias + 16);
    }
    for (int64_t i = 0; i < mr; i++) {
        float *ci = c + i * ldc;
        if (accumulate) {
            base0 = _mm512_maskz_loadu_ps(m0, ci);
            base1 = _mm512_maskz_loadu_ps(m1, ci + 16);
        }
        _mm512_mask_storeu_ps(ci, m0, _mm512_add_ps(base0, acc[i][0]));
        _mm512_mask_storeu_ps(ci + 16, m1, _mm512_add_ps(base1, acc[i][1]));
    }
}

const lf_dispatch lf_dispatch_avx512 = {
    .isa = LF_ISA_AVX512, .mr = MR, .nr = NR, .kc = 384, .mc = 120, .nc = 3072,
    .ukernel = ukernel_avx512,
};
#else
const lf_dispatch lf_dispatch_avx512 = {0};
#endif
