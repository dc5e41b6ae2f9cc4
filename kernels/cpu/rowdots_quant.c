/* rowdots_quant.c — the decode forward's base product on a quantized W read as it is (lf_rowdots_qw,
 * internal.h); for a 4-bit W:
 *
 *     c[i·ldc + j] = Σ_p x[i, p] · W[j, p]  (+ bias[j])       i < n ≤ LF_ROWDOTS_MAX_N, j < M, p < K
 *     W[j, p] = round_dt(code[q(j·K + p)] · scale(block (j·K + p) / B))       (lorafuse/quant.h)
 *
 * A few tokens read every code of W once: a quarter of bf16's bytes. Per block of B elements of a row the
 * 16 values its codes can stand for are formed once — the code table times the block's scale, rounded to
 * dt exactly as lf_qweight_dequantize rounds (through lf_store16 / lf_load16) — and held in registers; each
 * element is then one table lookup (vpermps on its nibble; AVX2: vpshufb byte tables for a bf16 x — 1–7 tokens
 * 64 elements a step, rows_q4b_N, where blocks hold 64 or more —, two vpermps and a blend for fp16) and one fp32
 * FMA per token: W is never widened, stored or re-read. A byte holds elements 2t
 * (high nibble) and 2t+1 (low): x is re-laid once, per chunk of 32 elements, in the order the lookups give W's
 * elements (job's xs, x_slot; every token's chunk at a fixed offset from one pointer) and the products are summed
 * in that order (every product exact, fp32 sums). Rows of W are split across the pool's threads, taken two at a
 * time for few tokens, K in blocks whose split x stays in L1 (X_L1_FLOATS). With a bf16 x where
 * lf_tunables.decode_pairs says so (Zen 4) the pairs kernels instead build W's bf16 pairs from the codes and
 * multiply them with x's own pairs (in the same chunks, xt) on vdpbf16ps, 32 elements per instruction
 * (rowdots_quant_pairs.c: rows_q4p_N; rows_q4s_N where the CPU has VBMI and K and B suit them, the same pairs by
 * byte and word permutes), K in blocks of PAIRS_K_BLOCK. AVX2 and up (the fp32 kernels in 8 lanes there: Zen 4
 * with avx2 forced, 4096² NF4, 1 / 8 tokens 1.65 / 5.0 ms through the buffer below, 0.87 / 2.38 here), and only when
 * blocks do not cross rows (K a multiple of B); elsewhere rowdots_half.c dequantizes blocks of W into a
 * buffer (lf_rowdots_qw_ok says which). An 8-bit W (LF_Q8_ROW) takes the pairs kernels only (rows_q8p_N: a
 * bf16 x on vdpbf16ps), else the same buffer. */
#include <stdlib.h>
#include <string.h>

#include "half_store.h"
#include "internal.h"
#include "quant4_internal.h"
#include "rowdots_quant.h"

#define ROWS_PER_BLOCK 16
/* K per block of the fp32 kernels: the split x of a block (n · kb floats) stays in L1 — 32 KiB — while the thread's
 * rows of W pass it; a multiple of the block size B (at least B). Few tokens: long runs of each row of W
 * (prefetched). Larger blocks from L2 (whole rows) were slower at 8 tokens, two loads of x per two FMAs. */
#define X_L1_FLOATS 4096

#if defined(__x86_64__)
/* 1 if a bf16 x takes the pairs kernels here (lf_tunables.decode_pairs) */
static int pairs_for(lf_dtype xdt) {
    return xdt == LF_DT_BF16 && lf_get_isa() >= LF_ISA_AVX512_BF16 && lf_tune()->decode_pairs;
}
#endif

int lf_rowdots_qw_ok(int64_t n, int64_t K, lf_dtype xdt, const lf_qweight *w) {
#if defined(__x86_64__)
    const int q8 = w->type == LF_Q8_ROW;
    /* a 4-bit W in groups where the GEMM would widen it */
    if (n > (!q8 && !lf_gemm_half_tile(xdt) ? LF_ROWDOTS_QW_GROUPED_MAX_N : LF_ROWDOTS_MAX_N) ||
        lf_get_isa() < LF_ISA_AVX2)
        return 0;
    return q8 ? pairs_for(xdt) : K % w->blocksize == 0;
#else
    (void)n, (void)K, (void)xdt, (void)w;
    return 0;
#endif
}


#if defined(__x86_64__)
/* The fp32 kernels' operations per ISA (ISA##_…, pasted by ROWS_Q4): L lanes; V an fp32 vector; C the code table;
 * T a block's table in registers, TABLE_AT(code, sc, tabs, b, dt) block b's (sc: the row's block scales over the K
 * block, tabs: what TABLES(code, sc, nb, dt, tabs) formed from them before the row's products, 64 bytes a block),
 * TZERO none yet; DECODE(p, t, dt, w): the 32 elements of 16 bytes of codes at p as NW vectors w, vector f's lanes
 * against x's split chunk at f·L (x_slot).
 * AVX-512: a table is the 16 values round_dt(code[q] · scale) widened to fp32, one zmm, formed at the block's first
 * step; one vpermps a lookup of 16 codes (it reads an index's low 4 bits: the low nibble as it is); vector 0 the
 * high nibbles (elements 2t), vector 1 the low ones (2t + 1).
 * AVX2, bf16: a table is the 16 values' bf16 words split into vpshufb byte tables, low bytes and high bytes
 * (lf_q4_byte_tables), all of a row's formed first — at each block's step their latency held the products up (Zen
 * 4, 1 token × 1024 × 4096 NF4, one thread, blocks of 64: 0.56 → 0.49 ms; 0.28 with one block a row). The 16 bytes
 * of codes in both 128-bit lanes, lane 0 shifted 4 (vpsrlvd), masked to nibbles — lane 0 the elements 2l, lane 1
 * the elements 2l + 1 of byte l —, looked up in both tables, the two bytes interleaved into words (vpunpck{l,h}bw:
 * elements 2u + L at the lane's word u) and the words into the top halves of dwords (vpunpck{l,h}wd with zero):
 * vector f, lane L·4 + v holds element 8f + 2v + L — 4 vectors from 11 instructions, where the two-vpermps lookups
 * below take 20. AVX2, fp16 (whose widening the byte tables cannot do as cheaply: measured 4–9 % slower): the table
 * is the 16 values in fp32 (two ymm), 8 bytes of codes widened to dwords a lookup (lf_q4_lookup8: two vpermps and a
 * blend), vectors 0, 1 the high nibbles of bytes 0..7, 8..15, vectors 2, 3 their low nibbles.
 * PREFETCH(p, next): at each 64 bytes of a row's codes, what the ISA asks for ahead (AVX2: the next rows'). */
LF_AVX512 static inline __m512 block_table(__m512 code, float scale, lf_dtype dt) {
    return lf_round16(dt, _mm512_mul_ps(code, _mm512_set1_ps(scale)));
}
LF_AVX512 static inline void q4z_decode(const uint8_t *p, __m512 t, __m512 *w) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    w[0] = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), t);
    w[1] = _mm512_permutexvar_ps(c, t);
}
#define Q4Z_ATTR LF_AVX512
#define Q4Z_L 16
#define Q4Z_NW 2
#define Q4Z_V __m512
#define Q4Z_C __m512
#define Q4Z_T __m512
#define Q4Z_CODE(code) _mm512_loadu_ps(code)
#define Q4Z_TABLES(code, sc, nb, dt, tabs) ((void)(tabs))
#define Q4Z_TABLE_AT(code, sc, tabs, b, dt) block_table((code), (sc)[b], (dt))
#define Q4Z_TZERO _mm512_setzero_ps()
#define Q4Z_PREFETCH(p, next) ((void)(p), (void)(next)) /* see Q4Y_PREFETCH */
#define Q4Z_DECODE(p, t, dt, w) q4z_decode((p), (t), (w))
#define Q4Z_LOAD(p) _mm512_loadu_ps(p)
#define Q4Z_FMA(a, b, acc) _mm512_fmadd_ps((a), (b), (acc))
#define Q4Z_ADD(a, b) _mm512_add_ps((a), (b))
#define Q4Z_ZERO _mm512_setzero_ps()
#define Q4Z_SUM(v) _mm512_reduce_add_ps(v)

typedef struct {
    __m256 lo, hi; /* the code table's values 0 .. 7, 8 .. 15 */
} q4y_code;
typedef struct {
    __m256i lo, hi; /* bf16: the byte tables, in both lanes; fp16: values 0 .. 7, 8 .. 15 in fp32 */
} q4y_table;
/* tabs, per block of scale sc[b]: bf16 lf_q4_byte_tables (32 bytes); fp16 the 16 values in fp32 */
LF_AVX2_FMA static inline void q4y_tables(q4y_code code, const float *sc, int64_t nb, lf_dtype dt, float *tabs) {
    for (int64_t b = 0; b < nb; b++) {
        if (dt == LF_DT_BF16) {
            _mm256_storeu_si256((__m256i *)(tabs + 16 * b), lf_q4_byte_tables(code.lo, code.hi, sc[b], dt));
            continue;
        }
        const __m256 s = _mm256_set1_ps(sc[b]);
        _mm256_storeu_ps(tabs + 16 * b, lf_round8(dt, _mm256_mul_ps(code.lo, s)));
        _mm256_storeu_ps(tabs + 16 * b + 8, lf_round8(dt, _mm256_mul_ps(code.hi, s)));
    }
}
LF_AVX2_FMA static inline q4y_table q4y_table_at(const float *tabs, int64_t b, lf_dtype dt) {
    const float *e = tabs + 16 * b;
    if (dt == LF_DT_BF16)
        return (q4y_table){_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)e)),
                           _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(e + 4)))};
    return (q4y_table){_mm256_castps_si256(_mm256_loadu_ps(e)), _mm256_castps_si256(_mm256_loadu_ps(e + 8))};
}
LF_AVX2_FMA static inline void q4y_decode(const uint8_t *p, q4y_table t, lf_dtype dt, __m256 *w) {
    if (dt != LF_DT_BF16) {
        const __m256 lo = _mm256_castsi256_ps(t.lo), hi = _mm256_castsi256_ps(t.hi);
        for (int h = 0; h < 2; h++) {
            const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * h)));
            w[h] = lf_q4_lookup8(lo, hi, _mm256_srli_epi32(c, 4));
            w[2 + h] = lf_q4_lookup8(lo, hi, c);
        }
        return;
    }
    const __m256i c = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    const __m256i nib = _mm256_and_si256(_mm256_srlv_epi32(c, _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0)),
                                         _mm256_set1_epi8(0x0F));
    const __m256i bl = _mm256_shuffle_epi8(t.lo, nib), bh = _mm256_shuffle_epi8(t.hi, nib);
    const __m256i words[2] = {_mm256_unpacklo_epi8(bl, bh), _mm256_unpackhi_epi8(bl, bh)};
    for (int a = 0; a < 2; a++) {
        w[2 * a] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), words[a]));
        w[2 * a + 1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), words[a]));
    }
}
#define Q4Y_ATTR LF_AVX2_FMA
#define Q4Y_L 8
#define Q4Y_NW 4
#define Q4Y_V __m256
#define Q4Y_C q4y_code
#define Q4Y_T q4y_table
#define Q4Y_CODE(code) ((q4y_code){_mm256_loadu_ps(code), _mm256_loadu_ps((code) + 8)})
#define Q4Y_TABLES(code, sc, nb, dt, tabs) q4y_tables((code), (sc), (nb), (dt), (tabs))
#define Q4Y_TABLE_AT(code, sc, tabs, b, dt) q4y_table_at((tabs), (b), (dt))
#define Q4Y_TZERO ((q4y_table){_mm256_setzero_si256(), _mm256_setzero_si256()})
/* each 64 bytes of a row's codes, the same bytes of the row R on into L2 (the next step of rows): Zen 3, 4096² NF4,
 * the decode at 8 tokens 0.69–0.75× the time with 2 threads, 0.57× with 1 (now below the bf16 decode), 1 token
 * 0.92–0.99×; fp16 x 0.74–0.81× at 8 tokens. The AVX-512 kernels (Q4Z) are untried with it: no-op there. */
#define Q4Y_PREFETCH(p, next) _mm_prefetch((const char *)(p) + (next), _MM_HINT_T1)
#define Q4Y_DECODE(p, t, dt, w) q4y_decode((p), (t), (dt), (w))
#define Q4Y_LOAD(p) _mm256_loadu_ps(p)
#define Q4Y_FMA(a, b, acc) _mm256_fmadd_ps((a), (b), (acc))
#define Q4Y_ADD(a, b) _mm256_add_ps((a), (b))
#define Q4Y_ZERO _mm256_setzero_ps()
#define Q4Y_SUM(v) lf_hsum8(v)

/* the slot of element u (< 32) of a chunk in x's split chunk: the vectors' lanes hold the even elements, then the odd
 * ones (AVX-512; AVX2 with an fp16 x: by halves of 16), or, for AVX2's byte tables (bytes8), per 8 elements the 4
 * even ones and then the 4 odd ones */
static inline int x_slot(int bytes8, int u) {
    return bytes8 ? (u >> 3) * 8 + (u & 1) * 4 + ((u >> 1) & 3) : (u & 1) * 16 + (u >> 1);
}

/* the slot of element u (< 64) of a step in x's split step for rows_q4b_N: byte t = u / 2 of the codes, lane
 * L = t / 16, i = t % 16; half h = u & 1 (its low nibble), vector 4h + 2·(i ≥ 8) + (i & 1), lane 4L + (i & 7) / 2 */
static inline int x_slot64(int u) {
    const int t = u >> 1, i = t & 15;
    return (4 * (u & 1) + 2 * (i >> 3) + (i & 1)) * 8 + 4 * (t >> 4) + ((i & 7) >> 1);
}

/* Rows [j0, j1) over elements [p0, p0 + len) of K (whole blocks) for N tokens: c[i, j] = the sum (+ bias)
 * or += it (accumulate). R rows at a time (2: each x vector serves both; 1 for many tokens, whose
 * accumulators fill the registers) and E accumulators per (row, token): 2 (vectors f even and odd apart: more
 * independent FMA chains for few tokens) or 1. A step takes 16 bytes of codes of each row — 32 elements, one
 * chunk of x — as NW vectors, each against its L elements of x's split chunk; a step starting a block takes the
 * row's table (TABLE_AT; the row's scales over the K block resolved first: len / B ≤ X_L1_FLOATS / 32 of them). */
#define ROWS_Q4(ISA, NAME, N, R, E)                                                                                    \
    ISA##_ATTR static void NAME(const rowdots_q4_job *job, int64_t j0, int64_t j1, int64_t p0, int64_t len,            \
                                int accumulate) {                                                                      \
        const lf_qweight *w = job->w;                                                                                \
        const int64_t K = job->K, B = w->blocksize, KB = K / B; /* blocks per row */                                 \
        const ISA##_C code = ISA##_CODE(lf_q4_code(w->type));                                                          \
        const int lg = __builtin_ctzll((unsigned long long)B); /* B is a power of two */                               \
        const int64_t block_bytes_mask = (B >> 1) - 1;                                                                 \
        for (int64_t j = j0; j < j1; j += R) {                                                                         \
            int64_t jr[R]; /* rows (the last repeated past j1) */                                                     \
            const uint8_t *q[R];                                                                                       \
            ISA##_V acc[R][E][N];                                                                                      \
            ISA##_T t[R];                                                                                              \
            float sc[R][X_L1_FLOATS / 32];                     /* the rows' block scales over this K block */         \
            _Alignas(64) float tabs[R][X_L1_FLOATS / 32 * 16]; /* the rows' tables over it (TABLES) */               \
            for (int r = 0; r < R; r++) {                                                                              \
                jr[r] = j + r < j1 ? j + r : j;                                                                        \
                lf_qweight_scales(w, jr[r] * KB + (p0 >> lg), len >> lg, sc[r]);                                       \
                ISA##_TABLES(code, sc[r], len >> lg, job->dt, tabs[r]);                                                \
                q[r] = w->data + ((jr[r] * K + p0) >> 1);                                                              \
                t[r] = ISA##_TZERO;                                                                                    \
                for (int e = 0; e < E; e++)                                                                            \
                    for (int i = 0; i < N; i++) acc[r][e][i] = ISA##_ZERO;                                             \
            }                                                                                                          \
            const float *x0 = job->xs + (p0 >> 5) * N * 32; /* the K block's first chunk */                          \
            const int64_t next = R * (K >> 1); /* bytes from a row's codes to the next step of rows' */               \
            for (int64_t h = 0; h < len >> 1; h += 16) { /* 16 bytes: elements 2h .. 2h + 31 of the K block */         \
                ISA##_V wv[R][ISA##_NW];                                                                               \
                for (int r = 0; r < R; r++) {                                                                          \
                    if (!(h & 63)) ISA##_PREFETCH(q[r] + h, next);                                                     \
                    if (!(h & block_bytes_mask)) t[r] = ISA##_TABLE_AT(code, sc[r], tabs[r], h >> (lg - 1), job->dt); \
                    ISA##_DECODE(q[r] + h, t[r], job->dt, wv[r]);                                                      \
                }                                                                                                      \
                for (int i = 0; i < N; i++) {                                                                          \
                    const float *xi = x0 + ((h >> 4) * N + i) * 32;                                                    \
                    for (int f = 0; f < ISA##_NW; f++) {                                                               \
                        const ISA##_V xv = ISA##_LOAD(xi + f * ISA##_L);                                               \
                        for (int r = 0; r < R; r++)                                                                    \
                            acc[r][f % E][i] = ISA##_FMA(xv, wv[r][f], acc[r][f % E][i]);                              \
                    }                                                                                                  \
                }                                                                                                      \
            }                                                                                                          \
            for (int r = 0; r < R && j + r < j1; r++)                                                                  \
                for (int i = 0; i < N; i++) {                                                                          \
                    const ISA##_V s = E == 2 ? ISA##_ADD(acc[r][0][i], acc[r][E - 1][i]) : acc[r][0][i];               \
                    rowdots_put(job, i, jr[r], ISA##_SUM(s), accumulate);                                              \
                }                                                                                                      \
        }                                                                                                              \
    }

ROWS_Q4(Q4Z, rows_q4_1, 1, 2, 2)
ROWS_Q4(Q4Z, rows_q4_2, 2, 2, 2)
ROWS_Q4(Q4Z, rows_q4_3, 3, 2, 2)
ROWS_Q4(Q4Z, rows_q4_4, 4, 2, 2)
ROWS_Q4(Q4Z, rows_q4_5, 5, 1, 2)
ROWS_Q4(Q4Z, rows_q4_6, 6, 1, 2)
ROWS_Q4(Q4Z, rows_q4_7, 7, 1, 2)
ROWS_Q4(Q4Z, rows_q4_8, 8, 1, 2)
/* AVX2's 16 registers: tables 2R, a step's vectors 4R, accumulators R·E·N and x (two rows at 2–4 tokens were
 * 1.07–1.30× the time of one: Zen 4, 4096² NF4, bf16) */
ROWS_Q4(Q4Y, rows_q4y_1, 1, 2, 2)
ROWS_Q4(Q4Y, rows_q4y_2, 2, 1, 2)
ROWS_Q4(Q4Y, rows_q4y_3, 3, 1, 2)
ROWS_Q4(Q4Y, rows_q4y_4, 4, 1, 2)
ROWS_Q4(Q4Y, rows_q4y_5, 5, 1, 2)
ROWS_Q4(Q4Y, rows_q4y_6, 6, 1, 1)
ROWS_Q4(Q4Y, rows_q4y_7, 7, 1, 1)
ROWS_Q4(Q4Y, rows_q4y_8, 8, 1, 1)

/* AVX2, bf16 x, blocks of 64 and more, 1–7 tokens (rows_q4b_N; job's steps64): the same sum 64 elements a step, one row
 * at a time. The row's tables over the K block are formed first (q4y_tables: lf_q4_byte_tables). A step takes 32
 * bytes of codes — both lanes, no cross-lane step —, their high nibbles (elements 2t) and low ones (2t + 1) looked
 * up in the block's byte tables (vpshufb each in both), the low and high bytes interleaved into words
 * (vpunpck{l,h}bw) and each dword's two words widened in place: the low word shifted into the top half, the high
 * one by masking the low half off (exact: a bf16 is an fp32's top half). 8 vectors from 13 shuffles and shifts and
 * 6 masks, where rows_q4y_N's 32-element decode takes 11 for 4 (Zen 3, 4096² NF4, min and median of 41–61
 * interleaved calls at 1 and 2 threads: 1 token 0.77–0.90× the time of rows_q4y_1, 2–7 tokens 0.81–0.99×; 8 tokens
 * 1.03–1.07×, so they stay on rows_q4y_8, bound by a block's 64 FMAs and 64 loads of x). Vector f of half h
 * (high nibbles 0, low 1): lane 4L + d holds the element of byte 16L + i, i = 8·(f ≥ 2) + 2d + (f & 1)
 * (x_slot64). E accumulators a token: FMA chains enough to hide their latency at few tokens (2 tokens: E 2 0.91–0.99×
 * the time of E 4). */
LF_AVX2_FMA static inline __attribute__((always_inline)) void q4b_half(__m256i tl, __m256i th, __m256i idx, __m256 *w) {
    const __m256i bl = _mm256_shuffle_epi8(tl, idx), bh = _mm256_shuffle_epi8(th, idx);
    const __m256i w0 = _mm256_unpacklo_epi8(bl, bh), w1 = _mm256_unpackhi_epi8(bl, bh);
    const __m256i top = _mm256_set1_epi32((int)0xFFFF0000u);
    w[0] = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
    w[1] = _mm256_castsi256_ps(_mm256_and_si256(w0, top));
    w[2] = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
    w[3] = _mm256_castsi256_ps(_mm256_and_si256(w1, top));
}
#define ROWS_Q4B(N, E)                                                                                                 \
    LF_AVX2_FMA static void rows_q4b_##N(const rowdots_q4_job *job, int64_t j0, int64_t j1, int64_t p0, int64_t len,   \
                                         int accumulate) {                                                             \
        const lf_qweight *w = job->w;                                                                                \
        const int64_t K = job->K, B = w->blocksize, KB = K / B; /* blocks per row; B ≥ 64 */                         \
        const q4y_code code = Q4Y_CODE(lf_q4_code(w->type));                                                           \
        const int lg = __builtin_ctzll((unsigned long long)B);                                                        \
        const float *x0 = job->xs + (p0 >> 6) * N * 64; /* the K block's first step of x */                           \
        const __m256i low4 = _mm256_set1_epi8(0x0F);                                                                   \
        for (int64_t j = j0; j < j1; j++) {                                                                            \
            float sc[X_L1_FLOATS / 64];                     /* the row's block scales over this K block */            \
            _Alignas(64) float tabs[X_L1_FLOATS / 64 * 16]; /* its byte tables (q4y_tables) */                        \
            lf_qweight_scales(w, j * KB + (p0 >> lg), len >> lg, sc);                                                  \
            q4y_tables(code, sc, len >> lg, LF_DT_BF16, tabs);                                                         \
            const uint8_t *q = w->data + ((j * K + p0) >> 1);                                                          \
            __m256 acc[N][E];                                                                                          \
            for (int i = 0; i < N; i++)                                                                                \
                for (int a = 0; a < E; a++) acc[i][a] = _mm256_setzero_ps();                                           \
            __m256i tl = _mm256_setzero_si256(), th = _mm256_setzero_si256();                                          \
            for (int64_t e = 0; e < len; e += 64) { /* elements p0 + e .. + 63: codes q[e/2 .. e/2 + 31] */            \
                if (!(e & 127)) _mm_prefetch((const char *)(q + (e >> 1) + (K >> 1)), _MM_HINT_T1); /* next row */    \
                if (!(e & (B - 1))) {                                                                                  \
                    const float *t = tabs + 16 * (e >> lg);                                                            \
                    tl = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)t));                              \
                    th = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(t + 4)));                        \
                }                                                                                                      \
                const __m256i c = _mm256_loadu_si256((const __m256i *)(q + (e >> 1)));                                 \
                const __m256i idx[2] = {_mm256_and_si256(_mm256_srli_epi16(c, 4), low4), _mm256_and_si256(c, low4)};   \
                for (int h = 0; h < 2; h++) {                                                                          \
                    __m256 wv[4];                                                                                      \
                    q4b_half(tl, th, idx[h], wv);                                                                      \
                    for (int i = 0; i < N; i++) {                                                                      \
                        const float *xi = x0 + ((e >> 6) * N + i) * 64 + 32 * h;                                       \
                        for (int f = 0; f < 4; f++) {                                                                  \
                            __m256 *a = &acc[i][(4 * h + f) % E];                                                      \
                            *a = _mm256_fmadd_ps(wv[f], _mm256_load_ps(xi + 8 * f), *a);                               \
                        }                                                                                              \
                    }                                                                                                  \
                }                                                                                                      \
            }                                                                                                          \
            for (int i = 0; i < N; i++) {                                                                              \
                __m256 s = acc[i][0];                                                                                  \
                for (int a = 1; a < E; a++) s = _mm256_add_ps(s, acc[i][a]);                                           \
                rowdots_put(job, i, j, lf_hsum8(s), accumulate);                                                       \
            }                                                                                                          \
        }                                                                                                              \
    }

ROWS_Q4B(1, 4)
ROWS_Q4B(2, 2)
ROWS_Q4B(3, 2)
ROWS_Q4B(4, 2)
ROWS_Q4B(5, 1)
ROWS_Q4B(6, 1)
ROWS_Q4B(7, 1)

static const rows_q4_fn ROWS_Q4_FOR_N[LF_ROWDOTS_MAX_N + 1] = {NULL,      rows_q4_1, rows_q4_2, rows_q4_3, rows_q4_4,
                                                              rows_q4_5, rows_q4_6, rows_q4_7, rows_q4_8};
static const rows_q4_fn ROWS_Q4Y_FOR_N[LF_ROWDOTS_MAX_N + 1] = {
    NULL, rows_q4y_1, rows_q4y_2, rows_q4y_3, rows_q4y_4, rows_q4y_5, rows_q4y_6, rows_q4y_7, rows_q4y_8};
static const rows_q4_fn ROWS_Q4B_FOR_N[LF_ROWDOTS_MAX_N + 1] = {
    NULL, rows_q4b_1, rows_q4b_2, rows_q4b_3, rows_q4b_4, rows_q4b_5, rows_q4b_6, rows_q4b_7, NULL /* steps64 */};

static void rowdots_q4_run(void *ctxp, int tid, int nt) {
    const rowdots_q4_job *job = ctxp;
    const int64_t blocks = (job->M + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK, per = (blocks + nt - 1) / nt;
    const int64_t j0 = tid * per * ROWS_PER_BLOCK;
    const int64_t j1 = (tid + 1) * per * ROWS_PER_BLOCK < job->M ? (tid + 1) * per * ROWS_PER_BLOCK : job->M;
    /* K blocks: the fp32 kernels' x in L1 (n · kb floats), the pairs kernels' PAIRS_K_BLOCK; kb a multiple of the
     * 4-bit block, or of the 8-bit kernel's 32-element step */
    const int q8 = job->w->type == LF_Q8_ROW;
    const int64_t b = job->w->blocksize, unit = q8 ? 32 : job->shuffles && b < 128 ? 128 : b;
    const int64_t fit = (job->pairs ? PAIRS_K_BLOCK : X_L1_FLOATS / job->n) / unit * unit, kb = fit > unit ? fit : unit;
    const rows_q4_fn rows = job->pairs ? lf_rowdots_pairs_kernel(job) /* an 8-bit W: always */
                                       : (job->steps64  ? ROWS_Q4B_FOR_N
                                          : job->lanes8 ? ROWS_Q4Y_FOR_N
                                                        : ROWS_Q4_FOR_N)[job->n];
    for (int64_t p0 = 0; p0 == 0 || p0 < job->K; p0 += kb) { /* K = 0: one pass writes the bias */
        const int64_t len = job->K - p0 < kb ? job->K - p0 : kb;
        for (int64_t j = j0; j < j1; j += ROWS_PER_BLOCK) {
            if (lf_interrupt_pending()) return; /* the caller sees the flag and reports LF_EINTR */
            rows(job, j, j + ROWS_PER_BLOCK < j1 ? j + ROWS_PER_BLOCK : j1, p0, len, p0 > 0);
        }
    }
}
#endif

/* one group of n ≤ LF_ROWDOTS_MAX_N tokens (checked by lf_rowdots_qw) */
static int rowdots_qw_group(lf_pool *pool, int64_t n, int64_t M, int64_t K, lf_tview x, const lf_qweight *w,
                            const float *bias, float *c, int64_t ldc) {
#if defined(__x86_64__)
    const int pairs = pairs_for(x.dtype); /* always, for an 8-bit W (lf_rowdots_qw_ok) */
    /* x's whole chunks (job's xs / xt; a 4-bit K is a multiple of B ≥ 32, an 8-bit one's last K % 32 is read
     * from x itself): element 32c + u of token i at (c·n + i)·32 + u, or for the fp32 kernels, widened, at
     * (c·n + i)·32 + x_slot(u) — one token's bf16 row as it is; for rows_q4b_N (steps64: B ≥ 64, so K a multiple
     * of 64) in steps of 64, element 64c + u at (c·n + i)·64 + x_slot64(u) */
    const int lanes8 = !pairs && lf_get_isa() < LF_ISA_AVX512;
    const int bytes8 = lanes8 && x.dtype == LF_DT_BF16; /* x_slot */
    const int steps64 = bytes8 && w->type != LF_Q8_ROW && w->blocksize >= 64 && n < 8; /* rows_q4b_N */
    const int64_t unit = steps64 ? 64 : 32, chunks = K / unit;
    const size_t bytes = (size_t)(n * chunks > 0 ? n * chunks : 1) * unit * (pairs ? sizeof(uint16_t) : sizeof(float));
    const int own = !pairs || n > 1;
    void *xc = own ? aligned_alloc(64, bytes) : NULL; /* each chunk a cache line (bf16) or more (fp32) */
    if (own && !xc) return LF_ENOMEM;
    for (int64_t ch = 0; ch < chunks && own; ch++)
        for (int64_t i = 0; i < n; i++) {
            const uint16_t *src = (const uint16_t *)x.p + i * x.rs + unit * ch;
            if (pairs) {
                memcpy((uint16_t *)xc + (ch * n + i) * 32, src, 32 * sizeof(uint16_t));
                continue;
            }
            float *dst = (float *)xc + (ch * n + i) * unit;
            for (int u = 0; u < unit; u++)
                dst[steps64 ? x_slot64(u) : x_slot(bytes8, u)] = lf_half_to_f32(x.dtype, src[u]);
        }
    rowdots_q4_job job = {.n = n, .M = M, .K = K, .ldc = ldc, .w = w, .xs = pairs ? NULL : xc,
                          .xt = pairs ? (own ? xc : x.p) : NULL, .bias = bias, .xh = x.p, .ldxh = x.rs, .pairs = pairs,
                          .lanes8 = lanes8, .steps64 = steps64, .dt = x.dtype, .c = c};
    job.shuffles = lf_rowdots_q4_shuffles(&job);
    const int nt = lf_threads_for(pool, 2.0 * (double)n * (double)M * (double)K, (M + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK);
    lf_pool_run(pool, nt, rowdots_q4_run, &job);
    free(xc);
    return lf_interrupt_pending() ? LF_EINTR : LF_OK;
#else
    (void)pool, (void)n, (void)M, (void)K, (void)x, (void)w, (void)bias, (void)c, (void)ldc;
    return LF_EINVAL;
#endif
}

int lf_rowdots_qw(lf_pool *pool, int64_t n, int64_t M, int64_t K, lf_tview x, const lf_qweight *w,
                  const float *bias, float *c, int64_t ldc) {
    if (n < 1 || M < 0 || K < 0 || ldc < M || !w || lf_qweight_unfit(w) || w->cols != K || w->rows < M ||
        (x.dtype != LF_DT_BF16 && x.dtype != LF_DT_F16) || x.cs != 1 || !lf_rowdots_qw_ok(n, K, x.dtype, w))
        return LF_EINVAL;
    if (M == 0) return LF_OK;
    /* tokens [i0, i0 + LF_ROWDOTS_MAX_N): each group streams W's codes once (a 4096² NF4 W: 8 MiB, in L3) */
    for (int64_t i0 = 0; i0 < n; i0 += LF_ROWDOTS_MAX_N) {
        const lf_tview xg = {(const uint16_t *)x.p + i0 * x.rs, x.rs, 1, x.dtype, NULL};
        const int rc = rowdots_qw_group(pool, n - i0 < LF_ROWDOTS_MAX_N ? n - i0 : LF_ROWDOTS_MAX_N, M, K, xg, w, bias,
                                        c + i0 * ldc, ldc);
        if (rc != LF_OK) return rc;
    }
    return LF_OK;
}
