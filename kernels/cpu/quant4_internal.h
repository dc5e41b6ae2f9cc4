/* quant4_internal.h — what quant4.c, quant4_simd.c and quant_tables.c share, and the kernels reading a
 * quantized W through lf_qweight_span (not the binding). */
#ifndef LORAFUSE_QUANT4_INTERNAL_H
#define LORAFUSE_QUANT4_INTERNAL_H

#include <stdint.h>

#include "lorafuse/quant.h"

/* The bounds bnb's CPU quantize_4bit buckets a scaled value s ∈ [-1, 1] by: the sorted position is
 * the count of bounds strictly below s (torch.bucketize, right=False); NF4's position is its code,
 * FP4's code is lf_q4_order_fp4[position] (quant_tables.c). */
extern const float lf_q4_bounds_nf4[15];
extern const float lf_q4_bounds_fp4[15];
extern const uint8_t lf_q4_order_fp4[16];
/* vpermt2b's index spreading 16 bytes of codes into 32 words, one nibble each, in element order (quant_tables.c) */
extern const uint8_t lf_q4_spread[64];

/* One run of a block: out[t] = round_dt(code[q[e + t]] · scale) for t < len, q[e] the nibble of
 * element e in data (high for even e); out is float (LF_DT_F32) or uint16_t bits (bf16, fp16).
 * Per ISA in quant4_simd.c; all give the same bits (NaN payloads aside). e even but for lf_q4_run_generic. */
typedef void (*lf_q4_run_fn)(const uint8_t *data, int64_t e, int64_t len, const float *code, float scale,
                             lf_dtype dt, void *out);
void lf_q4_run_generic(const uint8_t *data, int64_t e, int64_t len, const float *code, float scale, lf_dtype dt,
                       void *out);
void lf_q4_run_avx2(const uint8_t *data, int64_t e, int64_t len, const float *code, float scale, lf_dtype dt,
                    void *out);
void lf_q4_run_avx512(const uint8_t *data, int64_t e, int64_t len, const float *code, float scale, lf_dtype dt,
                      void *out);

/* lf_qweight_span of a 4-bit W into a 16-bit dt (bf16, fp16) on AVX512-VBMI (quant4_simd.c): the same bits; 1 where
 * this CPU has it (VBMI and BW), else 0 and nothing written */
int lf_q4_span16_vbmi(const lf_qweight *w, int64_t e, int64_t n, lf_dtype dt, uint16_t *out);
/* the same by vpshufb on AVX2 (quant4_simd.c): the same bits; 1 on x86-64 (the caller's ISA level has AVX2), else 0 */
int lf_q4_span16_avx2(const lf_qweight *w, int64_t e, int64_t n, lf_dtype dt, uint16_t *out);

/* One run of an 8-bit row: out[t] = round_dt(float(c[t]) · scale) for t < len, c int8 codes; out as
 * lf_q4_run_fn's. Per ISA in quant4_simd.c; all give the same bits. */
typedef void (*lf_q8_run_fn)(const int8_t *c, int64_t len, float scale, lf_dtype dt, void *out);
void lf_q8_run_generic(const int8_t *c, int64_t len, float scale, lf_dtype dt, void *out);
void lf_q8_run_avx2(const int8_t *c, int64_t len, float scale, lf_dtype dt, void *out);
void lf_q8_run_avx512(const int8_t *c, int64_t len, float scale, lf_dtype dt, void *out);
void lf_q8_run_bf16(const int8_t *c, int64_t len, float scale, lf_dtype dt, void *out); /* the avx512_bf16 level's */

#if defined(__x86_64__)
#include <immintrin.h>

#include "half_store.h"

/* vpshufb's tables of a block of scale s: its 16 values round_dt(code[q] · s) (dt bf16 or fp16, rounded as
 * lf_store8 rounds) as 16-bit words, split into bytes — lane 0 their low bytes, lane 1 their high bytes, byte q
 * of each; c0, c1 the code table's values 0 .. 7 and 8 .. 15. bf16, 2⁻¹⁰⁰ ≤ |s| ≤ 2¹⁰⁰ (every product v = code · s
 * zero or normal, |code| ≤ 1 and ≥ 2⁻⁸ where not zero, and v · (2¹⁶ + 1) finite): Veltkamp's split, t = v·(2¹⁶ + 1),
 * v_hi = t − (t − v), v rounded to 8 significant bits — to nearest, ties to even, in fp32 arithmetic rounding to
 * nearest even (checked against the integer rounding on 10⁷ random normal values and 2·10⁶ exact ties: the same
 * bits) — whose top half is the bf16: four fp32 operations per 8 values, no shift (Zen 3, 1 × 4096² NF4 decode on
 * rows_q4b_1: the tables ~39 → ~32 % of the kernel's perf samples, 0.96–0.97× its time). Other scales: the integer
 * rounding (lf_bf16_dwords8, NaN → 0x7FC0 where s is not finite); fp16 vcvtps2ph. The 16-bit values' two bytes
 * picked per lane (vpshufb: values 0..3, 8..11 | 4..7, 12..15, their low bytes, then their high ones) and the dwords
 * put in order by one vpermd. */
LF_AVX2 static inline __m256i lf_q4_byte_tables(__m256 c0, __m256 c1, float s, lf_dtype dt) {
    const __m256 v0 = _mm256_mul_ps(c0, _mm256_set1_ps(s)), v1 = _mm256_mul_ps(c1, _mm256_set1_ps(s));
    const float a = __builtin_fabsf(s);
    __m256i r0, r1; /* the 16-bit values in the dwords' top halves */
    if (dt == LF_DT_BF16 && a >= 0x1p-100f && a <= 0x1p100f) {
        const __m256 split = _mm256_set1_ps(65537.0f); /* 2¹⁶ + 1 */
        __m256 t0 = _mm256_mul_ps(v0, split), t1 = _mm256_mul_ps(v1, split);
        __asm__("" : "+x"(t0), "+x"(t1)); /* t rounded on its own: no FMA contraction of t − v, whatever the flags */
        r0 = _mm256_castps_si256(_mm256_sub_ps(t0, _mm256_sub_ps(t0, v0)));
        r1 = _mm256_castps_si256(_mm256_sub_ps(t1, _mm256_sub_ps(t1, v1)));
    } else if (dt == LF_DT_BF16) {
        const int nan_free = __builtin_isfinite(s);
        r0 = _mm256_slli_epi32(lf_bf16_dwords8(v0, nan_free), 16);
        r1 = _mm256_slli_epi32(lf_bf16_dwords8(v1, nan_free), 16);
    } else {
        /* the rounding an immediate (a literal: clang refuses a const variable there) */
        r0 = _mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)), 16);
        r1 = _mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)), 16);
    }
    /* per lane: r0's four values' low bytes (byte 2 of each dword) to bytes 0..3, high bytes (byte 3) to 8..11; r1's
     * to 4..7 and 12..15 */
    const __m256i p0 = _mm256_setr_epi8(2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15, -1, -1, -1, -1,
                                        2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15, -1, -1, -1, -1);
    const __m256i p1 = _mm256_setr_epi8(-1, -1, -1, -1, 2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15,
                                        -1, -1, -1, -1, 2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15);
    const __m256i bytes = _mm256_or_si256(_mm256_shuffle_epi8(r0, p0), _mm256_shuffle_epi8(r1, p1));
    return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* t[i & 15] for 8 indices i (their bits 0..3: vpermps reads bits 0..2 of each, bit 3 picks the half), t's 16
 * values in tlo (0 .. 7) and thi (8 .. 15) */
__attribute__((target("avx2"))) static inline __m256 lf_q4_lookup8(__m256 tlo, __m256 thi, __m256i i) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, i), _mm256_permutevar8x32_ps(thi, i),
                            _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)));
}
/* 32 int8 codes c[0 .. 31] times s (one fp32 product each), rounded to bf16 by one vcvtne2ps2bf16, in element order:
 * to nearest even, denormal products flushed (rowdots_quant.c's rows_q8p_N, whose vdpbf16ps reads them as 0 anyway;
 * lf_q8_run_bf16 where no product can be denormal) */
__attribute__((target("avx512f,avx512bf16"))) static inline __m512i lf_q8_bf16x32(const int8_t *c, __m512 s) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)c)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + 16))));
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, s), _mm512_mul_ps(lo, s));
}
#endif

/* out[t] = w'[e + t] for t < n: the flat elements [e, e + n) of w dequantized and rounded to dt (as
 * lf_qweight_dequantize, whose rows it runs; the GEMM's packing reads 4-bit operands through it), the run
 * cut at block edges (8-bit: row ends), each piece one call of the ISA's lf_q4_run_fn (lf_q8_run_fn)
 * with its block's fp32 scale (lf_q4_span_blocks; into bf16 / fp16 the ISA's 16-bit span). Unchecked: w passes
 * lf_qweight_unfit, 0 ≤ e, e + n ≤ rows·cols. */
void lf_qweight_span(const lf_qweight *w, int64_t e, int64_t n, lf_dtype dt, void *out);

/* The fp32 scale of block b (b < its blocks): absmax[b], or nested (c2[qa[b]] · a2[b / B2]) + offset —
 * bnb's dequantize_blockwise (an fp32 product) and then `absmax += offset` (an fp32 sum); 8-bit (b a
 * row): SCB[b] · fl(1/127), MatMul8bitFp's `SCB.mul(1.0 / 127.0)` (torch multiplies an fp32 tensor by
 * a Python float in fp32) */
static inline float lf_qweight_scale(const lf_qweight *w, int64_t b) {
    if (w->type == LF_Q8_ROW) return w->absmax[b] * (1.0f / 127.0f);
    if (!w->nested) return w->absmax[b];
    const float a = w->nested_code[w->absmax_q[b]] * w->nested_absmax[b / w->nested_blocksize];
    return a + w->offset;
}

/* out[t] = lf_qweight_scale(w, b0 + t) for t < nb (4-bit; b0 + nb ≤ its blocks): one division, then runs of blocks
 * that share a nested scale (a loop the compiler vectorizes) */
static inline void lf_qweight_scales(const lf_qweight *w, int64_t b0, int64_t nb, float *out) {
    if (!w->nested) {
        for (int64_t t = 0; t < nb; t++) out[t] = w->absmax[b0 + t];
        return;
    }
    int64_t g = b0 / w->nested_blocksize, in_g = b0 % w->nested_blocksize;
    for (int64_t t = 0; t < nb; g++, in_g = 0) {
        const int64_t run = nb - t < w->nested_blocksize - in_g ? nb - t : w->nested_blocksize - in_g;
        const float a2 = w->nested_absmax[g], off = w->offset;
        const uint8_t *qa = w->absmax_q + b0 + t;
        for (int64_t u = 0; u < run; u++) out[t + u] = w->nested_code[qa[u]] * a2 + off;
        t += run;
    }
}

/* The flat run [e, e + n) of a 4-bit w (lf_qweight_span's contract) cut at block edges, each piece one
 * run(data, e, len, code, scale, dt, out) with its block's scale and e even — an odd first element (blocks start
 * even) by lf_q4_run_generic —, the scales of up to 64 blocks resolved at a time (lf_qweight_scales: no division a
 * block). Inlined where run is a constant (the 16-bit spans, whose runs are then inlined in turn: no call a block). */
static inline __attribute__((always_inline)) void lf_q4_span_blocks(const lf_qweight *w, int64_t e, int64_t n,
                                                                    lf_dtype dt, void *out, lf_q4_run_fn run) {
    const float *code = lf_q4_code(w->type);
    const size_t esize = dt == LF_DT_F32 ? sizeof(float) : sizeof(uint16_t);
    const int lg = __builtin_ctzll((unsigned long long)w->blocksize); /* B is a power of two */
    float scales[64];
    if ((e & 1) && n > 0) {
        lf_q4_run_generic(w->data, e, 1, code, lf_qweight_scale(w, e >> lg), dt, out);
        out = (char *)out + esize;
        e++, n--;
    }
    for (const int64_t end = e + n; e < end;) {
        const int64_t b0 = e >> lg, nb = ((end - 1) >> lg) - b0 + 1 < 64 ? ((end - 1) >> lg) - b0 + 1 : 64;
        lf_qweight_scales(w, b0, nb, scales);
        for (int64_t b = b0; b < b0 + nb; b++) {
            const int64_t stop = end < (b + 1) << lg ? end : (b + 1) << lg;
            run(w->data, e, stop - e, code, scales[b - b0], dt, out);
            out = (char *)out + (size_t)(stop - e) * esize;
            e = stop;
        }
    }
}

#endif
