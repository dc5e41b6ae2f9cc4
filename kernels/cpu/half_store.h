/* half_store.h — fp32 values stored as fp32, bf16 or fp16 (uint16_t bits), rounded to nearest even:
 * the one rounding every kernel that writes a half-precision result uses (dequantization in
 * quant4_simd.c, the outputs of the half-precision LoRA kernels in narrow.c); and the vector loads
 * that widen bf16 / fp16 back to fp32 (widen.c, rowdots_half.c).
 *   bf16: torch's c10::round_to_nearest_even — the top 16 bits of u + 0x7FFF + lsb; NaN → 0x7FC0.
 *   fp16: IEEE binary16 — subnormals m·2⁻²⁴, ≥ 65520 → inf, NaN → quiet, its payload's top 10 bits
 *         kept (F16C's vcvtps2ph on AVX2 / AVX-512 gives the same bits for every input; torch's tensor
 *         conversion too).
 * Scalar versions everywhere; 8- and 16-lane ones for AVX2+F16C and AVX-512F (x86-64). */
#ifndef LORAFUSE_HALF_STORE_H
#define LORAFUSE_HALF_STORE_H

#include <stdint.h>
#include <string.h>

#include "lorafuse/kernels.h"

static inline uint32_t lf_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* fp32 → bf16 bits, to nearest even */
static inline uint16_t lf_f32_to_bf16(float f) {
    const uint32_t u = lf_f32_bits(f);
    if (f != f) return 0x7FC0u;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* fp32 → IEEE binary16 bits, to nearest even: NaN → sign | 0x7E00 | the top 10 bits of its payload (vcvtps2ph's
 * quiet NaN); ≥ 65520 → inf; below 2^-14 the
 * subnormal m·2^-24 with m = round(|f| / 2^-24), ties to even (≤ 2^-25 → 0) */
static inline uint16_t lf_f32_to_f16(float f) {
    uint32_t u = lf_f32_bits(f);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    u &= 0x7FFFFFFFu;
    if (u > 0x7F800000u) return sign | 0x7E00u | (uint16_t)((u >> 13) & 0x3FFu);
    if (u >= 0x477FF000u) return sign | 0x7C00u;
    if (u <= 0x33000000u) return sign;
    if (u < 0x38800000u) { /* exponent e ∈ [102, 112]: m = mant >> (126 - e), rounded */
        const uint32_t e = u >> 23, mant = (u & 0x7FFFFFu) | 0x800000u, shift = 126u - e;
        uint32_t q = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) q++;
        return sign | (uint16_t)q;
    }
    u -= 112u << 23; /* rebias 127 → 15, then round the 13 dropped bits to nearest even */
    return sign | (uint16_t)((u + 0x0FFFu + ((u >> 13) & 1u)) >> 13);
}

/* element t of out (float or uint16_t bits) */
static inline void *lf_out_at(lf_dtype dt, void *out, int64_t t) {
    return dt == LF_DT_F32 ? (void *)((float *)out + t) : (void *)((uint16_t *)out + t);
}

static inline void lf_store1(lf_dtype dt, void *out, int64_t t, float v) {
    if (dt == LF_DT_F32) ((float *)out)[t] = v;
    else ((uint16_t *)out)[t] = dt == LF_DT_BF16 ? lf_f32_to_bf16(v) : lf_f32_to_f16(v);
}

#if defined(__x86_64__)
#include <immintrin.h>

#define LF_AVX2 __attribute__((target("avx2,f16c")))
#define LF_AVX2_FMA __attribute__((target("avx2,fma,f16c")))
#define LF_AVX512 __attribute__((target("avx512f")))

/* bf16 bits of 8 fp32 lanes, to nearest even, in the low halves of 8 dwords: NaN → 0x7FC0, or, where the caller
 * knows v holds no NaN (nan_free), the integer sum alone */
LF_AVX2 static inline __m256i lf_bf16_dwords8(__m256 v, int nan_free) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    if (nan_free) return r;
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)),
                                                _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

/* the same as 8 uint16 */
LF_AVX2 static inline __m128i lf_bf16x8(__m256 v) {
    const __m256i r = lf_bf16_dwords8(v, 0);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

/* 8 bf16 / fp16 elements at h widened to fp32, exactly: bf16 zero-extended and shifted into the top
 * half; fp16 by vcvtph2ps (subnormals, infinities and NaNs exact; MXCSR's DAZ does not apply) */
LF_AVX2 static inline __m256 lf_load8(const uint16_t *h, lf_dtype dt) {
    const __m128i v = _mm_loadu_si128((const __m128i *)h);
    return dt == LF_DT_BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)) : _mm256_cvtph_ps(v);
}

/* the same, 16 at a time */
LF_AVX512 static inline __m512 lf_load16(const uint16_t *h, lf_dtype dt) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)h);
    return dt == LF_DT_BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)) : _mm512_cvtph_ps(v);
}

/* v rounded to dt (bf16 or fp16) as lf_store8 rounds it, and widened back: in registers */
LF_AVX2 static inline __m256 lf_round8(lf_dtype dt, __m256 v) {
    return dt == LF_DT_BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(lf_bf16_dwords8(v, 0), 16))
                            : _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* the sum of v's 8 lanes */
LF_AVX2 static inline float lf_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* out[t .. t+8) = v as dt */
LF_AVX2 static inline void lf_store8(lf_dtype dt, void *out, int64_t t, __m256 v) {
    if (dt == LF_DT_F32) _mm256_storeu_ps((float *)out + t, v);
    else if (dt == LF_DT_BF16) _mm_storeu_si128((__m128i *)((uint16_t *)out + t), lf_bf16x8(v));
    else _mm_storeu_si128((__m128i *)((uint16_t *)out + t), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* bf16 bits of 16 fp32 lanes (in the low half of each 32-bit lane), to nearest even, NaN → 0x7FC0 */
LF_AVX512 static inline __m512i lf_bf16x16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

/* v rounded to dt (bf16 or fp16) as lf_store16 rounds it, and widened back: in registers */
LF_AVX512 static inline __m512 lf_round16(lf_dtype dt, __m512 v) {
    return dt == LF_DT_BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(lf_bf16x16(v), 16))
                            : _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* out[t .. t+16) = v as dt */
LF_AVX512 static inline void lf_store16(lf_dtype dt, void *out, int64_t t, __m512 v) {
    if (dt == LF_DT_F32) {
        _mm512_storeu_ps((float *)out + t, v);
    } else if (dt == LF_DT_BF16) {
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + t), _mm512_cvtepi32_epi16(lf_bf16x16(v)));
    } else {
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + t),
                            _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
}
#endif

#endif
