/* widen.c — bf16 / fp16 runs widened to fp32 while packing a GEMM operand (lf_widen_fn, internal.h):
 *     dst[j] = scale · (float)src[j]      j < n
 * The conversion is exact (every bf16 and fp16 value is an fp32 value): bf16 is the top half of an
 * fp32, shifted left 16; fp16 goes through F16C's vcvtph2ps (AVX2: ymm, with target "avx2,f16c";
 * AVX-512F: zmm), which converts subnormals, infinities and NaNs exactly (MXCSR's DAZ does not apply
 * to it); the portable version is lf_f16_to_f32 (internal.h). Only the scale rounds (never, at 1). */
#include <stdlib.h>

#include "half_store.h"
#include "internal.h"

/* rows of half elements, contiguous: the ISA's widen; fp32 rows: a loop the compiler vectorizes; an fp32
 * transposed view (t.rs = 1): the register transposes; else one element at a time */
void lf_widen_into(lf_tview t, int64_t rows, int64_t cols, float scale, float *dst, int64_t ld) {
    if (rows == 0 || cols == 0) return;
    if (t.dtype != LF_DT_F32 && t.cs == 1) {
        const lf_widen_fn widen = lf_current()->widen;
        for (int64_t i = 0; i < rows; i++) widen((const uint16_t *)t.p + i * t.rs, cols, t.dtype, scale, dst + i * ld);
    } else if (t.dtype == LF_DT_F32 && t.cs == 1) {
        for (int64_t i = 0; i < rows; i++) {
            const float *src = (const float *)t.p + i * t.rs;
            for (int64_t j = 0; j < cols; j++) dst[i * ld + j] = src[j] * scale;
        }
    } else if (t.dtype == LF_DT_F32 && t.rs == 1) {
        lf_transpose_f32((const float *)t.p, t.cs, cols, rows, scale, dst, ld);
    } else {
        for (int64_t i = 0; i < rows; i++)
            for (int64_t j = 0; j < cols; j++) dst[i * ld + j] = lf_elem_f32(t.p, t.dtype, i * t.rs + j * t.cs) * scale;
    }
}

float *lf_widened_copy(lf_tview t, int64_t rows, int64_t cols, float scale) {
    float *dst = malloc((size_t)(rows * cols > 0 ? rows * cols : 1) * sizeof(float));
    if (dst) lf_widen_into(t, rows, cols, scale, dst, cols);
    return dst;
}

void lf_widen_generic(const uint16_t *src, int64_t n, lf_dtype dt, float scale, float *dst) {
    if (dt == LF_DT_BF16)
        for (int64_t j = 0; j < n; j++) dst[j] = lf_bf16_to_f32(src[j]) * scale;
    else
        for (int64_t j = 0; j < n; j++) dst[j] = lf_f16_to_f32(src[j]) * scale;
}

#if defined(__x86_64__)
/* 8 at a time (half_store.h lf_load8) */
LF_AVX2 void lf_widen_avx2(const uint16_t *src, int64_t n, lf_dtype dt, float scale, float *dst) {
    const __m256 s = _mm256_set1_ps(scale);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(dst + j, _mm256_mul_ps(lf_load8(src + j, dt), s));
    lf_widen_generic(src + j, n - j, dt, scale, dst + j);
}

/* 16 at a time (a masked 16-bit load would need AVX512BW, which the avx512 level does not require) */
LF_AVX512 void lf_widen_avx512(const uint16_t *src, int64_t n, lf_dtype dt, float scale, float *dst) {
    const __m512 s = _mm512_set1_ps(scale);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) _mm512_storeu_ps(dst + j, _mm512_mul_ps(lf_load16(src + j, dt), s));
    lf_widen_generic(src + j, n - j, dt, scale, dst + j);
}
#else
void lf_widen_avx2(const uint16_t *src, int64_t n, lf_dtype dt, float scale, float *dst) {
    lf_widen_generic(src, n, dt, scale, dst);
}
void lf_widen_avx512(const uint16_t *src, int64_t n, lf_dtype dt, float scale, float *dst) {
    lf_widen_generic(src, n, dt, scale, dst);
}
#endif
