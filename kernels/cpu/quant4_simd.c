/* quant4_simd.c — the inner loop of 4-bit dequantization (lf_q4_run_fn, quant4_internal.h), per ISA:
 *     out[t] = round_dt(code[q[e + t]] · scale)      t < len,  q[e] = the high nibble of byte e/2 for
 *                                                    even e, the low nibble for odd e
 * One fp32 product per element (as bnb: code value times the block's fp32 scale), then the output
 * rounding: none (fp32), or to nearest even (half_store.h).
 * The vector loops look the 16 codes up in registers: AVX-512 one vpermps over a zmm holding the
 * table (32 elements from 16 bytes per step); AVX2 two vpermps over its halves, blended on bit 3 of
 * the code (16 elements from 8 bytes); the tail runs the generic code. They take fp32 outputs (bf16 / fp16 ones
 * take the 16-bit spans below) and an even e (lf_q4_span_blocks). Generic is the reference: tests/test_quant4.py
 * compares every ISA's bits with it. */
#include <float.h>
#include <math.h>
#include <string.h>

#include "half_store.h"
#include "quant4_internal.h"

/* The 8-bit row runs (lf_q8_run_fn): out[t] = round_dt(float(c[t]) · scale), one fp32 product each,
 * as MatMul8bitFp's `CB.to(dtype).mul_(scale)` (int8 → dtype exact, the product in fp32, rounded once).
 * The vector loops sign-extend 16 (AVX-512) / 8 (AVX2) codes to int32 and convert them exactly. */
void lf_q8_run_generic(const int8_t *c, int64_t len, float scale, lf_dtype dt, void *out) {
    for (int64_t t = 0; t < len; t++) lf_store1(dt, out, t, (float)c[t] * scale);
}

void lf_q4_run_generic(const uint8_t *data, int64_t e, int64_t len, const float *code, float scale, lf_dtype dt,
                       void *out) {
    for (int64_t t = 0; t < len; t++) {
        const uint8_t byte = data[(e + t) >> 1];
        const float v = code[((e + t) & 1) ? byte & 0x0F : byte >> 4] * scale;
        lf_store1(dt, out, t, v);
    }
}

#if defined(__x86_64__)
#include <immintrin.h>

LF_AVX2 void lf_q4_run_avx2(const uint8_t *data, int64_t e, int64_t len, const float *code, float scale, lf_dtype dt,
                            void *out) {
    int64_t t = 0; /* e even */
    const __m256 tlo = _mm256_loadu_ps(code), thi = _mm256_loadu_ps(code + 8), s = _mm256_set1_ps(scale);
    const __m256i low4 = _mm256_set1_epi32(0x0F);
    for (; t + 16 <= len; t += 16) {
        /* 8 bytes → hi/lo nibbles → element order h0 l0 h1 l1 … (unpack per lane, then swap lanes) */
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(data + ((e + t) >> 1))));
        const __m256i hi = _mm256_srli_epi32(b, 4), lo = _mm256_and_si256(b, low4);
        const __m256i x0 = _mm256_unpacklo_epi32(hi, lo), x1 = _mm256_unpackhi_epi32(hi, lo);
        const __m256i i0 = _mm256_permute2x128_si256(x0, x1, 0x20), i1 = _mm256_permute2x128_si256(x0, x1, 0x31);
        lf_store8(dt, out, t, _mm256_mul_ps(lf_q4_lookup8(tlo, thi, i0), s));
        lf_store8(dt, out, t + 8, _mm256_mul_ps(lf_q4_lookup8(tlo, thi, i1), s));
    }
    if (t < len) lf_q4_run_generic(data, e + t, len - t, code, scale, dt, lf_out_at(dt, out, t));
}

LF_AVX512 void lf_q4_run_avx512(const uint8_t *data, int64_t e, int64_t len, const float *code, float scale,
                                lf_dtype dt, void *out) {
    int64_t t = 0; /* e even */
    const __m512 table = _mm512_loadu_ps(code), s = _mm512_set1_ps(scale);
    const __m512i low4 = _mm512_set1_epi32(0x0F);
    /* element order from (hi, lo): h0 l0 h1 l1 … h7 l7, then h8 l8 … h15 l15 */
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (; t + 32 <= len; t += 32) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(data + ((e + t) >> 1))));
        const __m512i hi = _mm512_srli_epi32(b, 4), lo = _mm512_and_si512(b, low4);
        lf_store16(dt, out, t, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, first, lo), table), s));
        lf_store16(dt, out, t + 16,
                _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, second, lo), table), s));
    }
    if (t < len) lf_q4_run_generic(data, e + t, len - t, code, scale, dt, lf_out_at(dt, out, t));
}

LF_AVX2 void lf_q8_run_avx2(const int8_t *c, int64_t len, float scale, lf_dtype dt, void *out) {
    const __m256 s = _mm256_set1_ps(scale);
    int64_t t = 0;
    for (; t + 8 <= len; t += 8) {
        const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(c + t)));
        lf_store8(dt, out, t, _mm256_mul_ps(_mm256_cvtepi32_ps(v), s));
    }
    if (t < len) lf_q8_run_generic(c + t, len - t, scale, dt, lf_out_at(dt, out, t));
}

LF_AVX512 void lf_q8_run_avx512(const int8_t *c, int64_t len, float scale, lf_dtype dt, void *out) {
    const __m512 s = _mm512_set1_ps(scale);
    int64_t t = 0;
    for (; t + 16 <= len; t += 16) {
        const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + t)));
        lf_store16(dt, out, t, _mm512_mul_ps(_mm512_cvtepi32_ps(v), s));
    }
    if (t < len) lf_q8_run_generic(c + t, len - t, scale, dt, lf_out_at(dt, out, t));
}

/* lf_q8_run_fn into bf16 on the avx512_bf16 level: 32 codes a step, the fp32 products of lf_q8_run_avx512 rounded by
 * one vcvtne2ps2bf16 — to nearest even as lf_bf16x16 rounds, but for denormal inputs (flushed) and NaN payloads; with
 * the scale finite and |scale| ≥ FLT_MIN every product is ±0, ±∞ or normal, so the bits are the same. Other scales,
 * other dtypes and the last len % 32 codes: lf_q8_run_avx512. Zen 4: the 8-bit layer's backward at 1 / 8 tokens ×
 * 4096² (its W's rows converted into dx's buffer) 2.64 / 3.28 → 2.08 / 2.68 ms */
#define LF_AVX512_BF16 __attribute__((target("avx512f,avx512bf16")))
LF_AVX512_BF16 void lf_q8_run_bf16(const int8_t *c, int64_t len, float scale, lf_dtype dt, void *out) {
    int64_t t = 0;
    if (dt == LF_DT_BF16 && isfinite(scale) && fabsf(scale) >= FLT_MIN) {
        const __m512 s = _mm512_set1_ps(scale);
        for (; t + 32 <= len; t += 32) _mm512_storeu_si512((void *)((uint16_t *)out + t), lf_q8_bf16x32(c + t, s));
    }
    if (t < len) lf_q8_run_avx512(c + t, len - t, scale, dt, lf_out_at(dt, out, t));
}

/* lf_q4_span16_vbmi: per block its 16 values round_dt(code[q] · scale) — the products and the rounding of
 * lf_q4_run_fn's, formed once — held twice in the 32 words of a register; then per 64 elements (32 bytes of
 * codes c): two vpermt2b spread c >> 4 and c into words in element order (lf_q4_spread, as rowdots_quant_pairs.c's
 * rows_q4s_N spread them into pairs) and two vpermw look the words' low 5 bits up (bit 4, the neighbouring
 * nibble's, lands on the table's second copy). A block's last < 64 elements by masked loads and stores (no
 * code byte past the run is loaded). About five instructions per 32 elements, where lf_q4_run_avx512 takes about
 * ten. */
#define LF_VBMI __attribute__((target("avx512f,avx512bw,avx512vbmi")))

LF_VBMI static inline __attribute__((always_inline)) void q4_run16_vbmi(const uint8_t *data, int64_t e, int64_t len,
                                                                        const float *code, float scale, lf_dtype dt,
                                                                        void *out_) {
    uint16_t *out = out_;
    const int64_t stop = e + len; /* e even (lf_q4_span_blocks) */
    const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale));
    const __m256i t = dt == LF_DT_BF16 ? _mm512_cvtepi32_epi16(lf_bf16x16(v))
                                       : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i table = _mm512_inserti64x4(_mm512_castsi256_si512(t), t, 1);
    const __m512i spread = _mm512_loadu_si512((const void *)lf_q4_spread);
    const __m512i spread2 = _mm512_add_epi8(spread, _mm512_set1_epi8(16)); /* bytes 16 .. 31 */
    for (int64_t len; e < stop; e += len, out += len) {
        len = stop - e < 64 ? stop - e : 64;
        _mm_prefetch((const char *)(data + (e >> 1) + 1024), _MM_HINT_T0); /* 32 steps on: the codes stream */
        const __m512i c = _mm512_maskz_loadu_epi8(((__mmask64)1 << ((len + 1) >> 1)) - 1, data + (e >> 1));
        const __m512i hi = _mm512_srli_epi16(c, 4);
        const __m512i lo32 = _mm512_permutexvar_epi16(_mm512_permutex2var_epi8(hi, spread, c), table);
        const __m512i hi32 = _mm512_permutexvar_epi16(_mm512_permutex2var_epi8(hi, spread2, c), table);
        if (len == 64) {
            _mm512_storeu_si512((void *)out, lo32);
            _mm512_storeu_si512((void *)(out + 32), hi32);
        } else {
            const __mmask64 m = ((__mmask64)1 << len) - 1; /* len < 64 */
            _mm512_mask_storeu_epi16(out, (__mmask32)m, lo32);
            _mm512_mask_storeu_epi16(out + 32, (__mmask32)(m >> 32), hi32);
        }
    }
}

LF_VBMI static void q4_span16_vbmi(const lf_qweight *w, int64_t e, int64_t n, lf_dtype dt, uint16_t *out) {
    lf_q4_span_blocks(w, e, n, dt, out, q4_run16_vbmi);
}

int lf_q4_span16_vbmi(const lf_qweight *w, int64_t e, int64_t n, lf_dtype dt, uint16_t *out) {
    if (!__builtin_cpu_supports("avx512vbmi") || !__builtin_cpu_supports("avx512bw")) return 0;
    q4_span16_vbmi(w, e, n, dt, out);
    return 1;
}

/* lf_q4_span16_avx2: per block its 16 values round_dt(code[q] · scale) (as lf_q4_run_avx2 rounds them, formed
 * once) split into two byte tables, their low bytes and their high bytes, in both 128-bit lanes; then per 64
 * elements (32 bytes of codes c, element 2t the high nibble of byte t): the nibbles interleaved into bytes in
 * element order (vpunpck{l,h}bw of c >> 4 and c; per lane), each looked up by vpshufb in both tables and the two
 * bytes interleaved back into words (vpunpck{l,h}bw), the lanes put in order by vperm2i128: about 22 instructions
 * per 64 elements, where lf_q4_run_avx2 takes about 20 per 16, and no call or division a block. A block's last
 * < 64 elements from a zero-padded copy of their code bytes into a stack run (no byte past the run is read). */
LF_AVX2 static inline __attribute__((always_inline)) void q4_words64_avx2(const uint8_t *codes, __m256i tlo,
                                                                          __m256i thi, uint16_t *out) {
    const __m256i c = _mm256_loadu_si256((const __m256i *)codes), low4 = _mm256_set1_epi8(0x0F);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), low4), lo = _mm256_and_si256(c, low4);
    /* i0: elements 0..15 | 32..47 (lane 0 | lane 1), i1: 16..31 | 48..63 */
    const __m256i idx[2] = {_mm256_unpacklo_epi8(hi, lo), _mm256_unpackhi_epi8(hi, lo)};
    for (int h = 0; h < 2; h++) {
        const __m256i bl = _mm256_shuffle_epi8(tlo, idx[h]), bh = _mm256_shuffle_epi8(thi, idx[h]);
        const __m256i w0 = _mm256_unpacklo_epi8(bl, bh), w1 = _mm256_unpackhi_epi8(bl, bh); /* 8 words per lane */
        _mm256_storeu_si256((__m256i *)(out + 16 * h), _mm256_permute2x128_si256(w0, w1, 0x20));
        _mm256_storeu_si256((__m256i *)(out + 32 + 16 * h), _mm256_permute2x128_si256(w0, w1, 0x31));
    }
}

LF_AVX2 static inline __attribute__((always_inline)) void q4_run16_avx2(const uint8_t *data, int64_t e, int64_t len,
                                                                        const float *code, float scale, lf_dtype dt,
                                                                        void *out_) {
    uint16_t *out = out_;
    const int64_t stop = e + len; /* e even (lf_q4_span_blocks) */
    const __m256i bytes = lf_q4_byte_tables(_mm256_loadu_ps(code), _mm256_loadu_ps(code + 8), scale, dt);
    const __m256i tlo = _mm256_permute2x128_si256(bytes, bytes, 0x00), thi = _mm256_permute2x128_si256(bytes, bytes, 0x11);
    for (; e + 64 <= stop; e += 64, out += 64) {
        _mm_prefetch((const char *)(data + (e >> 1) + 1024), _MM_HINT_T0); /* 32 steps on: the codes stream */
        q4_words64_avx2(data + (e >> 1), tlo, thi, out);
    }
    if (e < stop) {
        uint8_t codes[32] = {0};
        uint16_t words[64];
        memcpy(codes, data + (e >> 1), (size_t)((stop - e + 1) >> 1));
        q4_words64_avx2(codes, tlo, thi, words);
        memcpy(out, words, (size_t)(stop - e) * sizeof(uint16_t));
    }
}

LF_AVX2 int lf_q4_span16_avx2(const lf_qweight *w, int64_t e, int64_t n, lf_dtype dt, uint16_t *out) {
    lf_q4_span_blocks(w, e, n, dt, out, q4_run16_avx2);
    return 1;
}
#else
int lf_q4_span16_vbmi(const lf_qweight *w, int64_t e, int64_t n, lf_dtype dt, uint16_t *out) {
    (void)w, (void)e, (void)n, (void)dt, (void)out;
    return 0;
}
int lf_q4_span16_avx2(const lf_qweight *w, int64_t e, int64_t n, lf_dtype dt, uint16_t *out) {
    (void)w, (void)e, (void)n, (void)dt, (void)out;
    return 0;
}
void lf_q8_run_avx2(const int8_t *c, int64_t len, float scale, lf_dtype dt, void *out) {
    lf_q8_run_generic(c, len, scale, dt, out);
}
void lf_q8_run_avx512(const int8_t *c, int64_t len, float scale, lf_dtype dt, void *out) {
    lf_q8_run_generic(c, len, scale, dt, out);
}
void lf_q8_run_bf16(const int8_t *c, int64_t len, float scale, lf_dtype dt, void *out) {
    lf_q8_run_generic(c, len, scale, dt, out);
}
void lf_q4_run_avx2(const uint8_t *data, int64_t e, int64_t len, const float *code, float scale, lf_dtype dt,
                    void *out) {
    lf_q4_run_generic(data, e, len, code, scale, dt, out);
}
void lf_q4_run_avx512(const uint8_t *data, int64_t e, int64_t len, const float *code, float scale, lf_dtype dt,
                      void *out) {
    lf_q4_run_generic(data, e, len, code, scale, dt, out);
}
#endif
