/* skinny_avx2.c — the rank-r kernels of skinny_body.h for AVX2+FMA (8-wide vectors).
 * setup.py compiles this file with -mavx2 -mfma -mf16c -ffp-contract=fast on x86-64;
 * its table is used only when cpuid reports AVX2+FMA (skinny.c). */
#include "internal.h"

#if defined(__x86_64__)
#include <immintrin.h>

/* horizontal sum of one vector (HSUM) */
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

#define VW 8
#define RU_ROWS 8 /* 8 accumulators of 16 ymm */
#define RA_ROWS 4 /* × 2 vectors: 8 accumulators */
#define HSUM(v) hsum((__m256)(v))
#define F16_TO_F32(h) _cvtsh_ss(h) /* F16C */
#include "skinny_body.h"

const lf_skinny lf_skinny_avx2 = SKINNY_KERNELS;
#else
const lf_skinny lf_skinny_avx2 = {0};
#endif
