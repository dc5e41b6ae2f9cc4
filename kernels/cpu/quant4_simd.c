/* quant4_simd.c — the inner loop of 4-bit dequantization (lf_q4_run_fn, quant4_internal.h), per ISA:
 *     out[t] = round_dt(code[q[e + t]] · scale)      t < len,  q[e] = the high nibble of byte e/2 for
 *                                                    even e, the low nibble for odd e
 * One fp32 product per element (as bnb: code value times the block's fp32 scale), then the output
 * rounding: none (fp32), or to nearest even — bf16 as torch's round_to_nearest_even (NaN → 0x7FC0),
 * fp16 as IEEE binary16 (subnormals, overflow to inf; F16C's vcvtps2ph on AVX2 / AVX-512).
 * The vector loops look the 16 codes up in registers: AVX-512 one vpermps over a zmm holding the
 * table (32 elements from 16 bytes per step); AVX2 two vpermps over its halves, blended on bit 3 of
 * the code (16 elements from 8 bytes). The first element of an odd e and the tail run the generic
 * code. Generic is the reference: tests/test_quant4.py compares every ISA's bits with it. */
#include <string.h>

#include "quant4_internal.h"

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* fp32 → bf16 bits, to nearest even (torch's c10::round_to_nearest_even) */
static inline uint16_t f32_to_bf16(float f) {
    const uint32_t u = f32_bits(f);
    if (f != f) return 0x7FC0u;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* fp32 → IEEE binary16 bits, to nearest even: NaN → sign | 0x7E00; ≥ 65520 → inf; below 2^-14 the
 * subnormal m·2^-24 with m = round(|f| / 2^-24), ties to even (≤ 2^-25 → 0) */
static inline uint16_t f32_to_f16(float f) {
    uint32_t u = f32_bits(f);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    u &= 0x7FFFFFFFu;
    if (u > 0x7F800000u) return sign | 0x7E00u;
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
static inline void *out_at(lf_dtype dt, void *out, int64_t t) {
    return dt == LF_DT_F32 ? (void *)((float *)out + t) : (void *)((uint16_t *)out + t);
}

static inline void store1(lf_dtype dt, void *out, int64_t t, float v) {
    if (dt == LF_DT_F32) ((float *)out)[t] = v;
    else ((uint16_t *)out)[t] = dt == LF_DT_BF16 ? f32_to_bf16(v) : f32_to_f16(v);
}

void lf_q4_run_generic(const uint8_t *data, int64_t e, int64_t len, const float *code, float scale, lf_dtype dt,
                       void *out) {
    for (int64_t t = 0; t < len; t++) {
        const uint8_t byte = data[(e + t) >> 1];
        const float v = code[((e + t) & 1) ? byte & 0x0F : byte >> 4] * scale;
        store1(dt, out, t, v);
    }
}

#if defined(__x86_64__)
#include <immintrin.h>

#define LF_AVX2 __attribute__((target("avx2,f16c")))
#define LF_AVX512 __attribute__((target("avx512f")))

/* bf16 bits of 8 fp32 lanes, to nearest even, NaN → 0x7FC0, as 8 uint16 */
LF_AVX2 static inline __m128i bf16x8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)),
                                             _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

LF_AVX2 static inline void store8(lf_dtype dt, void *out, int64_t t, __m256 v) {
    if (dt == LF_DT_F32) _mm256_storeu_ps((float *)out + t, v);
    else if (dt == LF_DT_BF16) _mm_storeu_si128((__m128i *)((uint16_t *)out + t), bf16x8(v));
    else _mm_storeu_si128((__m128i *)((uint16_t *)out + t), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* code[i] for 8 codes i ∈ [0, 16): vpermps on each half of the table, bit 3 picks the half */
LF_AVX2 static inline __m256 lookup8(__m256 tlo, __m256 thi, __m256i i) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, i), _mm256_permutevar8x32_ps(thi, i),
                            _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)));
}

LF_AVX2 void lf_q4_run_avx2(const uint8_t *data, int64_t e, int64_t len, const float *code, float scale, lf_dtype dt,
                            void *out) {
    int64_t t = 0;
    if ((e & 1) && len > 0) { /* start on a byte boundary */
        lf_q4_run_generic(data, e, 1, code, scale, dt, out);
        t = 1;
    }
    const __m256 tlo = _mm256_loadu_ps(code), thi = _mm256_loadu_ps(code + 8), s = _mm256_set1_ps(scale);
    const __m256i low4 = _mm256_set1_epi32(0x0F);
    for (; t + 16 <= len; t += 16) {
        /* 8 bytes → hi/lo nibbles → element order h0 l0 h1 l1 … (unpack per lane, then swap lanes) */
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(data + ((e + t) >> 1))));
        const __m256i hi = _mm256_srli_epi32(b, 4), lo = _mm256_and_si256(b, low4);
        const __m256i x0 = _mm256_unpacklo_epi32(hi, lo), x1 = _mm256_unpackhi_epi32(hi, lo);
        const __m256i i0 = _mm256_permute2x128_si256(x0, x1, 0x20), i1 = _mm256_permute2x128_si256(x0, x1, 0x31);
        store8(dt, out, t, _mm256_mul_ps(lookup8(tlo, thi, i0), s));
        store8(dt, out, t + 8, _mm256_mul_ps(lookup8(tlo, thi, i1), s));
    }
    if (t < len) lf_q4_run_generic(data, e + t, len - t, code, scale, dt, out_at(dt, out, t));
}

LF_AVX512 static inline void store16(lf_dtype dt, void *out, int64_t t, __m512 v) {
    if (dt == LF_DT_F32) {
        _mm512_storeu_ps((float *)out + t, v);
    } else if (dt == LF_DT_BF16) {
        const __m512i u = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
        r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + t), _mm512_cvtepi32_epi16(r));
    } else {
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + t),
                            _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
}

LF_AVX512 void lf_q4_run_avx512(const uint8_t *data, int64_t e, int64_t len, const float *code, float scale,
                                lf_dtype dt, void *out) {
    int64_t t = 0;
    if ((e & 1) && len > 0) {
        lf_q4_run_generic(data, e, 1, code, scale, dt, out);
        t = 1;
    }
    const __m512 table = _mm512_loadu_ps(code), s = _mm512_set1_ps(scale);
    const __m512i low4 = _mm512_set1_epi32(0x0F);
    /* element order from (hi, lo): h0 l0 h1 l1 … h7 l7, then h8 l8 … h15 l15 */
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (; t + 32 <= len; t += 32) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(data + ((e + t) >> 1))));
        const __m512i hi = _mm512_srli_epi32(b, 4), lo = _mm512_and_si512(b, low4);
        store16(dt, out, t, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, first, lo), table), s));
        store16(dt, out, t + 16,
                _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, second, lo), table), s));
    }
    if (t < len) lf_q4_run_generic(data, e + t, len - t, code, scale, dt, out_at(dt, out, t));
}
#else
void lf_q4_run_avx2(const uint8_t *data, int64_t e, int64_t len, const float *code, float scale, lf_dtype dt,
                    void *out) {
    lf_q4_run_generic(data, e, len, code, scale, dt, out);
}
void lf_q4_run_avx512(const uint8_t *data, int64_t e, int64_t len, const float *code, float scale, lf_dtype dt,
                      void *out) {
    lf_q4_run_generic(data, e, len, code, scale, dt, out);
}
#endif
