/* narrow.c — fp32 results rounded once to the dtype of a half-precision output (lf_narrow,
 * internal.h):   dst[j] = round_dt(src[j])  j < n   (half_store.h: to nearest even, NaN kept as
 * NaN, overflow to inf); or rounded in place and kept as fp32 (lf_round_rows, for rank_rows.c's pre_dt).
 * One result on every ISA: the vector loops use the same rounding as the scalar one, which
 * tests/test_ops_lora_half.py compares with torch's .to(dtype). */
#include "half_store.h"
#include "internal.h"

static void narrow_generic(const float *src, int64_t n, lf_dtype dt, uint16_t *dst) {
    for (int64_t j = 0; j < n; j++) lf_store1(dt, dst, j, src[j]);
}

#if defined(__x86_64__)
LF_AVX2 static void narrow_avx2(const float *src, int64_t n, lf_dtype dt, uint16_t *dst) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) lf_store8(dt, dst, j, _mm256_loadu_ps(src + j));
    narrow_generic(src + j, n - j, dt, dst + j);
}

LF_AVX512 static void narrow_avx512(const float *src, int64_t n, lf_dtype dt, uint16_t *dst) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) lf_store16(dt, dst, j, _mm512_loadu_ps(src + j));
    narrow_generic(src + j, n - j, dt, dst + j);
}
#endif

void lf_narrow(const float *src, int64_t n, lf_dtype dt, uint16_t *dst) {
#if defined(__x86_64__)
    const lf_isa isa = lf_get_isa();
    if (isa >= LF_ISA_AVX512) {
        narrow_avx512(src, n, dt, dst);
        return;
    }
    if (isa == LF_ISA_AVX2) {
        narrow_avx2(src, n, dt, dst);
        return;
    }
#endif
    narrow_generic(src, n, dt, dst);
}

static void round_generic(float *c, int64_t n, lf_dtype dt) {
    for (int64_t j = 0; j < n; j++) c[j] = lf_half_to_f32(dt, dt == LF_DT_BF16 ? lf_f32_to_bf16(c[j]) : lf_f32_to_f16(c[j]));
}

#if defined(__x86_64__)
LF_AVX512 static void round_avx512(float *c, int64_t n, lf_dtype dt) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) _mm512_storeu_ps(c + j, lf_round16(dt, _mm512_loadu_ps(c + j)));
    round_generic(c + j, n - j, dt);
}
#endif

void lf_round_rows(float *c, int64_t n, int64_t cols, int64_t ldc, lf_dtype dt) {
#if defined(__x86_64__)
    void (*run)(float *, int64_t, lf_dtype) = lf_get_isa() >= LF_ISA_AVX512 ? round_avx512 : round_generic;
#else
    void (*run)(float *, int64_t, lf_dtype) = round_generic;
#endif
    for (int64_t i = 0; i < n; i++) run(c + i * ldc, cols, dt);
}
