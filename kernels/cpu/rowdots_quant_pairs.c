/* rowdots_quant_pairs.c — the decode forward's base product on a quantized W (rowdots_quant.c, whose job and
 * split x these kernels read: rowdots_quant.h) on vdpbf16ps, for a bf16 x where lf_tunables.decode_pairs says so
 * (Zen 4): W's bf16 pairs built from its codes in registers and multiplied by x's own pairs. AVX512-BF16; the
 * shuffle kernels AVX512-VBMI and BW besides. */
#include "half_store.h"
#include "internal.h"
#include "quant4_internal.h"
#include "rowdots_quant.h"

#if defined(__x86_64__)
/* AVX512_BF16, bf16 (lf_tunables.decode_pairs): the same sum on vdpbf16ps, two rows at a time. Per block of
 * a row its table holds the bf16 bits of round(code[q] · scale) in the low half of 16 dwords (tb: the values
 * block_table gives); each 16 bytes of codes (32 elements, 16 pairs) become one vector of W's bf16 pairs —
 * dword l = tb[high nibble of byte l] | tb[low nibble] << 16, elements 2l and 2l + 1 in the order vdpbf16ps
 * multiplies them — by two vpermd, a shift and an or; then one vdpbf16ps per token on x's own pairs as
 * they lie in memory: exact products summed in fp32 (its rounding and denormal flushing:
 * tests/tolerances.py, the bf16 tile's). */
#define LF_AVX512_BF16 __attribute__((target("avx512f,avx512bf16")))

/* block b's table for the pairs kernels: the bf16 bits of round(code[q] · scale) in the low half of dword q —
 * vcvtneps2bf16's rounding (to nearest even) of the fp32 products, which equals lf_bf16x16's but for inputs
 * below the normal range, flushed to 0 here: vdpbf16ps reads such a bf16 as 0 anyway (its DAZ) */
LF_AVX512_BF16 static inline __m512i block_bits(__m512 code, float scale) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(code, _mm512_set1_ps(scale)));
    return _mm512_cvtepu16_epi32((__m256i)h);
}

/* rowdots_put of the lanes' sum of acc[r·n + i] for token i and row jr[r], r < rows, i < n */
LF_AVX512 static inline __attribute__((always_inline)) void put_rows(const rowdots_q4_job *job, int64_t rows, int n,
                                                                  const int64_t *jr, const __m512 *acc, int accumulate) {
    for (int64_t r = 0; r < rows; r++)
        for (int i = 0; i < n; i++) {
            rowdots_put(job, i, jr[r], _mm512_reduce_add_ps(acc[r * n + i]), accumulate);
        }
}

#define ROWS_Q4P(N, R)                                                                                                 \
    LF_AVX512_BF16 static void rows_q4p_##N(const rowdots_q4_job *job, int64_t j0, int64_t j1, int64_t p0,             \
                                            int64_t len, int accumulate) {                                             \
        const lf_qweight *w = job->w;                                                                                  \
        const int64_t K = job->K, B = w->blocksize, KB = K / B;                                                        \
        const __m512 code = _mm512_loadu_ps(lf_q4_code(w->type));                                                      \
        const int lg = __builtin_ctzll((unsigned long long)B);                                                         \
        const int64_t block_bytes_mask = (B >> 1) - 1;                                                                 \
        const uint16_t *x0 = job->xt + (p0 >> 5) * N * 32; /* the K block's first chunk */                             \
        /* bytes from a row's codes to those R rows on: prefetched at the same step (rowdots_half.c's reason; Zen 4, \
         * 8 × 4096² NF4, 2 threads: 1.97 → 1.67 ms) */                                                              \
        const int64_t ahead = R * (K >> 1);                                                                            \
        for (int64_t j = j0; j < j1; j += R) {                                                                         \
            int64_t jr[R];                                                                                             \
            const uint8_t *q[R];                                                                                       \
            __m512 acc[R][N];                                                                                          \
            __m512i tb[R];                                                                                             \
            float sc[R][PAIRS_K_BLOCK / 32]; /* the rows' block scales over this K block (len / B ≤ kb / 32) */       \
            for (int r = 0; r < R; r++) {                                                                              \
                jr[r] = j + r < j1 ? j + r : j;                                                                        \
                lf_qweight_scales(w, jr[r] * KB + (p0 >> lg), len >> lg, sc[r]);                                       \
                q[r] = w->data + ((jr[r] * K + p0) >> 1);                                                              \
                tb[r] = _mm512_setzero_si512();                                                                        \
                for (int i = 0; i < N; i++) acc[r][i] = _mm512_setzero_ps();                                           \
            }                                                                                                          \
            for (int64_t h = 0; h < len >> 1; h += 16) { /* 16 bytes: elements 2h .. 2h + 31 of the K block */         \
                __m512i wp[R];                                                                                         \
                for (int r = 0; r < R; r++) {                                                                          \
                    if (!(h & block_bytes_mask))                                                                       \
                        tb[r] = block_bits(code, sc[r][h >> (lg - 1)]);                                                \
                    _mm_prefetch((const char *)(q[r] + ahead + h), _MM_HINT_T0); /* the next R rows, this step */     \
                    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q[r] + h)));              \
                    const __m512i even = _mm512_permutexvar_epi32(_mm512_srli_epi32(c, 4), tb[r]);                     \
                    const __m512i odd = _mm512_permutexvar_epi32(c, tb[r]); /* vpermd: the low 4 bits */               \
                    wp[r] = _mm512_or_si512(even, _mm512_slli_epi32(odd, 16));                                         \
                }                                                                                                      \
                for (int i = 0; i < N; i++) {                                                                          \
                    const __m512bh xa = (__m512bh)_mm512_loadu_si512((const void *)(x0 + ((h >> 4) * N + i) * 32));    \
                    for (int r = 0; r < R; r++) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], xa, (__m512bh)wp[r]);          \
                }                                                                                                      \
            }                                                                                                          \
            put_rows(job, j1 - j < R ? j1 - j : R, N, jr, &acc[0][0], accumulate);                                   \
        }                                                                                                              \
    }

ROWS_Q4P(1, 4)
ROWS_Q4P(2, 4)
ROWS_Q4P(3, 4)
ROWS_Q4P(4, 4)
ROWS_Q4P(5, 2)
ROWS_Q4P(6, 2)
ROWS_Q4P(7, 2)
ROWS_Q4P(8, 2)

/* The shuffle kernels (rows_q4s_N; AVX512-VBMI and BW besides BF16, K a multiple of 128, B ≥ 64): the same pairs
 * as rows_q4p_N, bit for bit and in the same lanes, by two permutes per vector of pairs instead of vpermd's
 * four operations. 64 bytes of codes c (128 elements, two halves of 64 in a block each) a step, for s < 4:
 *     idx_s   = vpermt2b(c >> 4, S + 16s, c)          word 2l: code byte 16s + l shifted right 4 (its high nibble)
 *                                                   word 2l + 1: the byte itself (its low nibble)
 *     pairs_s = vpermw(idx_s, T)                    dword l = T[high nibble] | T[low nibble] << 16
 * — elements 2l and 2l + 1 of the 32 the vector covers, as x's pairs lie in memory. vpermw reads an index's low
 * 5 bits, and bit 4 is the next nibble up (not masked off): T holds the block's 16 bf16 values twice (words q
 * and 16 + q, block_words). Per step and row: one shift, 4 vpermt2b, 4 vpermw, and the next step's two tables
 * (2 vmulps, 2 vcvtne2ps2bf16) built while this step's products run — built in the step itself, their latency
 * held up the products (Zen 4, a row's step from L1: 8 tokens 13.4 → 10.6 ns, 1 token 4.6 → 3.3). The blocks'
 * scales of a row's K block resolved once (lf_qweight_scales: no division a block). */
#define LF_VBMI_BF16 __attribute__((target("avx512f,avx512bw,avx512vbmi,avx512bf16")))

/* vpermw's table of a block of scale s: the bf16 bits of round(code[q] · s) — block_bits' rounding — in words q
 * and 16 + q */
LF_VBMI_BF16 static inline __m512i block_words(__m512 code, float s) {
    const __m512 v = _mm512_mul_ps(code, _mm512_set1_ps(s));
    return (__m512i)_mm512_cvtne2ps_pbh(v, v);
}

#define ROWS_Q4S(N, R)                                                                                                 \
    LF_VBMI_BF16 static void rows_q4s_##N(const rowdots_q4_job *job, int64_t j0, int64_t j1, int64_t p0,               \
                                          int64_t len, int accumulate) {                                               \
        const lf_qweight *w = job->w;                                                                                  \
        const int64_t K = job->K, KB = K / w->blocksize, ahead = R * (K >> 1);                                         \
        const __m512 code = _mm512_loadu_ps(lf_q4_code(w->type));                                                      \
        const int lg = __builtin_ctzll((unsigned long long)w->blocksize);                                              \
        const __m512i spread = _mm512_loadu_si512((const void *)lf_q4_spread);                                             \
        const __m512i pat[4] = {spread, _mm512_add_epi8(spread, _mm512_set1_epi8(16)),                                 \
                                _mm512_add_epi8(spread, _mm512_set1_epi8(32)),                                         \
                                _mm512_add_epi8(spread, _mm512_set1_epi8(48))};                                        \
        const uint16_t *x0 = job->xt + (p0 >> 5) * N * 32; /* the K block's first chunk */                             \
        for (int64_t j = j0; j < j1; j += R) {                                                                         \
            int64_t jr[R];                                                                                             \
            const uint8_t *q[R];                                                                                       \
            __m512 acc[R][N];                                                                                          \
            __m512i ta[R], tb[R]; /* the tables of this step's two halves */                                          \
            float sc[R][PAIRS_K_BLOCK / 64]; /* the rows' block scales over this K block (len / B ≤ kb / 64) */       \
            for (int r = 0; r < R; r++) {                                                                              \
                jr[r] = j + r < j1 ? j + r : j;                                                                        \
                q[r] = w->data + ((jr[r] * K + p0) >> 1);                                                              \
                lf_qweight_scales(w, jr[r] * KB + (p0 >> lg), len >> lg, sc[r]);                                       \
                ta[r] = block_words(code, sc[r][0]);                                                                   \
                tb[r] = block_words(code, sc[r][64 >> lg]);                                                            \
                for (int i = 0; i < N; i++) acc[r][i] = _mm512_setzero_ps();                                           \
            }                                                                                                          \
            for (int64_t e = 0; e < len; e += 128) { /* elements p0 + e .. + 127 of the row */                         \
                __m512i wp[R][4];                                                                                      \
                for (int r = 0; r < R; r++) {                                                                          \
                    _mm_prefetch((const char *)(q[r] + ahead + (e >> 1)), _MM_HINT_T0);                                \
                    const __m512i c = _mm512_loadu_si512((const void *)(q[r] + (e >> 1)));                             \
                    const __m512i hi = _mm512_srli_epi16(c, 4);                                                        \
                    for (int s = 0; s < 4; s++)                                                                        \
                        wp[r][s] = _mm512_permutexvar_epi16(_mm512_permutex2var_epi8(hi, pat[s], c), s < 2 ? ta[r] : tb[r]); \
                    if (e + 128 < len) {                                                                               \
                        ta[r] = block_words(code, sc[r][(e + 128) >> lg]);                                             \
                        tb[r] = block_words(code, sc[r][(e + 192) >> lg]);                                             \
                    }                                                                                                  \
                }                                                                                                      \
                for (int i = 0; i < N; i++)                                                                            \
                    for (int s = 0; s < 4; s++) {                                                                      \
                        const __m512bh xa =                                                                            \
                            (__m512bh)_mm512_loadu_si512((const void *)(x0 + (((e >> 5) + s) * N + i) * 32));          \
                        for (int r = 0; r < R; r++) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], xa, (__m512bh)wp[r][s]);   \
                    }                                                                                                  \
            }                                                                                                          \
            put_rows(job, j1 - j < R ? j1 - j : R, N, jr, &acc[0][0], accumulate);                                   \
        }                                                                                                              \
    }

ROWS_Q4S(1, 4)
ROWS_Q4S(2, 4)
ROWS_Q4S(3, 2)
ROWS_Q4S(4, 2)
ROWS_Q4S(5, 2)
ROWS_Q4S(6, 2)
ROWS_Q4S(7, 2)
ROWS_Q4S(8, 2)

/* 1 if the shuffle kernels take this W: a bf16 x on the pairs kernels, K a multiple of their 128-element step,
 * blocks of at least 64 (two tables a step) and the CPU's VBMI and BW */
int lf_rowdots_q4_shuffles(const rowdots_q4_job *job) {
    return job->pairs && job->w->type != LF_Q8_ROW && job->K % 128 == 0 && job->w->blocksize >= 64 &&
           __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bw");
}

/* An 8-bit W (LF_Q8_ROW) on vdpbf16ps, R rows at a time: per 32 elements of a row its codes sign-extended and
 * converted (exact), times the row's scale SCB[j]·fl(1/127) — one fp32 product each, MatMul8bitFp's —, rounded
 * to 32 bf16 by one vcvtne2ps2bf16 (lf_q8_bf16x32: to nearest even; below the normal range flushed, which
 * vdpbf16ps does to its inputs anyway) in element order, so that dword l holds W's pair (2l, 2l + 1) as x's memory does; then
 * one vdpbf16ps per token. The last len % 32 elements one at a time: W's element rounded as
 * lf_qweight_dequantize rounds it, the product summed in fp32. */
#define ROWS_Q8P(N, R)                                                                                                 \
    LF_AVX512_BF16 static void rows_q8p_##N(const rowdots_q4_job *job, int64_t j0, int64_t j1, int64_t p0,             \
                                            int64_t len, int accumulate) {                                             \
        const lf_qweight *w = job->w;                                                                                  \
        const int64_t lv = len / 32 * 32;                                                                              \
        const uint16_t *x0 = job->xt + (p0 >> 5) * N * 32; /* the K block's first chunk */                             \
        for (int64_t j = j0; j < j1; j += R) {                                                                         \
            int64_t jr[R];                                                                                             \
            const int8_t *q[R];                                                                                        \
            __m512 s[R], acc[R][N];                                                                                    \
            for (int r = 0; r < R; r++) {                                                                              \
                jr[r] = j + r < j1 ? j + r : j;                                                                        \
                q[r] = (const int8_t *)w->data + jr[r] * job->K + p0;                                                  \
                s[r] = _mm512_set1_ps(lf_qweight_scale(w, jr[r]));                                                     \
                for (int i = 0; i < N; i++) acc[r][i] = _mm512_setzero_ps();                                           \
            }                                                                                                          \
            for (int64_t p = 0; p < lv; p += 32) {                                                                     \
                __m512i wp[R];                                                                                         \
                for (int r = 0; r < R; r++) {                                                                          \
                    wp[r] = lf_q8_bf16x32(q[r] + p, s[r]);                                                             \
                }                                                                                                      \
                for (int i = 0; i < N; i++) {                                                                          \
                    const __m512bh xa = (__m512bh)_mm512_loadu_si512((const void *)(x0 + ((p >> 5) * N + i) * 32));    \
                    for (int r = 0; r < R; r++) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], xa, (__m512bh)wp[r]);          \
                }                                                                                                      \
            }                                                                                                          \
            for (int r = 0; r < R && j + r < j1; r++)                                                                  \
                for (int i = 0; i < N; i++) {                                                                          \
                    float v = _mm512_reduce_add_ps(acc[r][i]);                                                         \
                    for (int64_t p = lv; p < len; p++)                                                                 \
                        v += lf_half_to_f32(LF_DT_BF16, job->xh[i * job->ldxh + p0 + p]) *                                 \
                             lf_half_to_f32(LF_DT_BF16, lf_f32_to_bf16((float)q[r][p] * lf_qweight_scale(w, jr[r])));  \
                    rowdots_put(job, i, jr[r], v, accumulate);                                                         \
                }                                                                                                      \
        }                                                                                                              \
    }

ROWS_Q8P(1, 4)
ROWS_Q8P(2, 4)
ROWS_Q8P(3, 4)
ROWS_Q8P(4, 4)
ROWS_Q8P(5, 2)
ROWS_Q8P(6, 2)
ROWS_Q8P(7, 2)
ROWS_Q8P(8, 2)

static const rows_q4_fn ROWS_Q4P_FOR_N[LF_ROWDOTS_MAX_N + 1] = {
    NULL, rows_q4p_1, rows_q4p_2, rows_q4p_3, rows_q4p_4, rows_q4p_5, rows_q4p_6, rows_q4p_7, rows_q4p_8};
static const rows_q4_fn ROWS_Q4S_FOR_N[LF_ROWDOTS_MAX_N + 1] = {
    NULL, rows_q4s_1, rows_q4s_2, rows_q4s_3, rows_q4s_4, rows_q4s_5, rows_q4s_6, rows_q4s_7, rows_q4s_8};
static const rows_q4_fn ROWS_Q8P_FOR_N[LF_ROWDOTS_MAX_N + 1] = {
    NULL, rows_q8p_1, rows_q8p_2, rows_q8p_3, rows_q8p_4, rows_q8p_5, rows_q8p_6, rows_q8p_7, rows_q8p_8};

rows_q4_fn lf_rowdots_pairs_kernel(const rowdots_q4_job *job) {
    return (job->w->type == LF_Q8_ROW ? ROWS_Q8P_FOR_N : job->shuffles ? ROWS_Q4S_FOR_N : ROWS_Q4P_FOR_N)[job->n];
}
#endif
