/* transpose.c — the packing of row-major operands into k-major slivers, one square block of
 * TB×TB floats at a time (TB = the vector width: 16 for AVX-512, 8 for AVX2).
 *
 * Packing x (rows of K) into an MR-tall A sliver and Wᵀ (W's rows of K) into an NR-wide B
 * sliver are the same operation: a transpose,
 *     dst[q·ld + i] = scale · src[i·rs + q]     i < rows ≤ TB, q < TB,
 * done here in registers — TB row loads, a shuffle network, TB masked row stores — instead of
 * one scalar load and one strided store per element. gemm.c calls it for every whole block
 * and keeps its scalar loops for the edges. */
#include "internal.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define LF_AVX512 __attribute__((target("avx512f")))

LF_AVX512 static inline __m512 unpack_pd(__m512 a, __m512 b, int hi) {
    const __m512d x = _mm512_castps_pd(a), y = _mm512_castps_pd(b);
    return _mm512_castpd_ps(hi ? _mm512_unpackhi_pd(x, y) : _mm512_unpacklo_pd(x, y));
}

/* 16×16: unpack ps, unpack pd, two rounds of 128-bit lane shuffles (64 shuffles per 256 floats) */
LF_AVX512 void lf_transpose16_avx512(const float *src, int64_t rs, int rows, float scale, float *dst, int64_t ld) {
    __m512 r[16], t[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) r[i] = i < rows ? _mm512_loadu_ps(src + i * rs) : _mm512_setzero_ps();
    if (scale != 1.0f) {
        const __m512 s = _mm512_set1_ps(scale);
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) r[i] = _mm512_mul_ps(r[i], s);
    }
    /* 1: interleave row pairs (2i, 2i+1) element-wise */
#pragma GCC unroll 16
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    /* 2: interleave pairs of pairs 64 bits at a time: each 128-bit lane now holds one column
     *    of four consecutive rows */
#pragma GCC unroll 16
    for (int i = 0; i < 16; i += 4) {
        r[i] = unpack_pd(t[i], t[i + 2], 0);
        r[i + 1] = unpack_pd(t[i], t[i + 2], 1);
        r[i + 2] = unpack_pd(t[i + 1], t[i + 3], 0);
        r[i + 3] = unpack_pd(t[i + 1], t[i + 3], 1);
    }
    /* 3, 4: gather the 128-bit lanes of rows 0-3, 4-7, 8-11, 12-15 */
#pragma GCC unroll 16
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
#pragma GCC unroll 16
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
    const __mmask16 m = (__mmask16)((1u << rows) - 1u);
#pragma GCC unroll 16
    for (int q = 0; q < 16; q++) _mm512_mask_storeu_ps(dst + q * ld, m, r[q]);
}

#define LF_AVX2 __attribute__((target("avx2,fma")))

/* 8×8: unpack ps, shuffle ps, 128-bit lane permutes (24 shuffles per 64 floats) */
LF_AVX2 void lf_transpose8_avx2(const float *src, int64_t rs, int rows, float scale, float *dst, int64_t ld) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; i++) r[i] = i < rows ? _mm256_loadu_ps(src + i * rs) : _mm256_setzero_ps();
    if (scale != 1.0f) {
        const __m256 s = _mm256_set1_ps(scale);
        for (int i = 0; i < 8; i++) r[i] = _mm256_mul_ps(r[i], s);
    }
    for (int i = 0; i < 8; i += 2) { /* interleave row pairs */
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) { /* each 128-bit lane: one column of four rows */
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) { /* join rows 0-3 and 4-7 */
        t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
        t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
    }
    if (rows == 8) { /* plain stores: vmaskmovps stores are slow on AMD (ukernel_avx2.c) */
        for (int q = 0; q < 8; q++) _mm256_storeu_ps(dst + q * ld, t[q]);
        return;
    }
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(rows), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int q = 0; q < 8; q++) _mm256_maskstore_ps(dst + q * ld, m, t[q]);
}
#endif
