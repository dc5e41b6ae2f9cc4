/* rowdots_half.c — the decode forward's base product on a half-precision W (lf_rowdots_half,
 * internal.h), W streamed once, in place, never packed:
 *
 *     c[i·ldc + j] = Σ_p x[i, p] · W[j, p]  (+ bias[j])       i < n ≤ LF_ROWDOTS_MAX_N, j < M, p < K
 *
 * x and W bf16 or fp16 (one dtype), rows contiguous. A few tokens read every element of W once: the
 * product is bound by W's bytes, half of fp32's. Rows of W are split across the pool's threads; each
 * thread takes R rows at a time (R·n accumulators: two; on the vdpbf16ps pairs 4 for ≤ 4 tokens, 3 for more)
 * so that each x vector loaded serves them all.
 * x is widened to fp32 once (n·K floats), W in registers (bf16: a shift; fp16: F16C's vcvtph2ps),
 * fp32 FMAs — AVX-512 16 lanes, AVX2 8, generic one at a time; every product exact. A bf16 W on
 * vdpbf16ps (32 elements of a row per instruction, x's and W's bf16 pairs as they lie in memory) where
 * lf_tunables.decode_pairs says it issues at the FMA's rate (Zen 4); not where it issues at a quarter of
 * it (the Intel CPU of benchmarks/RESULTS.md, "Half-precision GEMM core"): there, at 8 tokens, where
 * the product stops being bound by W's bytes, it is the slower.
 * The K tail past the last whole vector is summed by the generic loop (widened, exact products).
 * A quantized W (W.qw, stored (M, K) as it is) is read as it is — 4-bit: a quarter of bf16's bytes, by
 * rowdots_quant.c where it applies (lf_rowdots_qw_ok) —, else each block of ROWS_PER_BLOCK rows × K_BLOCK
 * columns is dequantized (lf_qweight_dequantize) into a thread's 24 KiB buffer while it is in cache, and the same row
 * kernels read it there. */
#include <stdlib.h>

#include "half_store.h"
#include "internal.h"
#include "lorafuse/quant.h"

/* Rows [j0, j1) of W against the n rows of x over K elements (one K block): xw (n, K; row stride
 * ldx) x widened to fp32, xh x's own half elements (row stride ldxh), W's rows ldw apart; c[i·ldc + j] =
 * the sum (+ bias[j] if bias), or += it when accumulate (the K blocks after the first). */
typedef void (*rows_fn)(int64_t j0, int64_t j1, int64_t n, int64_t K, const float *xw, int64_t ldx,
                        const uint16_t *xh, int64_t ldxh, const uint16_t *W, int64_t ldw, lf_dtype dt,
                        const float *bias, int accumulate, float *c, int64_t ldc);

/* c's element, written (+ bias) or accumulated */
static inline void put(float *c, float v, const float *bias, int64_t j, int accumulate) {
    if (accumulate) *c += v;
    else *c = v + (bias ? bias[j] : 0.0f);
}

/* Σ_{p ∈ [p0, K)} xw[i, p] · W[j, p] in fp32, one product at a time (tails, and the generic ISA) */
static float dot_tail(int64_t p0, int64_t K, const float *xwi, const uint16_t *wj, lf_dtype dt) {
    float acc = 0.0f;
    for (int64_t p = p0; p < K; p++) acc += xwi[p] * lf_half_to_f32(dt, wj[p]);
    return acc;
}

static void rows_generic(int64_t j0, int64_t j1, int64_t n, int64_t K, const float *xw, int64_t ldx,
                         const uint16_t *xh, int64_t ldxh, const uint16_t *W, int64_t ldw, lf_dtype dt,
                         const float *bias, int accumulate, float *c, int64_t ldc) {
    (void)xh, (void)ldxh;
    for (int64_t j = j0; j < j1; j++)
        for (int64_t i = 0; i < n; i++)
            put(c + i * ldc + j, dot_tail(0, K, xw + i * ldx, W + j * ldw, dt), bias, j, accumulate);
}

#if defined(__x86_64__)
/* One x86 variant of a thread's rows: rows j, j+1 of W at a time (the last alone when j1 - j0 is odd)
 * against the n rows of x, STEP elements of K per step into 2n accumulators and operands of type V:
 * b = LOAD_B(w) (STEP elements of a W row at w), a = LOAD_A(i, p) (x row i from p), acc = MADD(acc,
 * a, b); then c[i, j] gets HSUM(acc) + the K tail (dot_tail) (put). NAME dispatches on n to a copy of
 * the body for each n ≤ LF_ROWDOTS_MAX_N (NAME##_body inlined with n a constant: the accumulators live
 * in registers, which a run-time n would leave in memory). */
/* Prefetch, two streams: while rows j .. j+R-1 are read, the same step of the next R rows is prefetched into
 * L2 (a row's first lines would otherwise come cold: the hardware prefetcher starts late on each new run), and
 * each row's own line AHEAD bytes on into L1 (L1 cannot hold the next rows' lines for a whole row's time beside
 * x's; into L1 as before, the next rows' lines were mostly evicted before use). Zen 4, one thread, 4096² bf16 on
 * vdpbf16ps, whole rows, ms (W from DRAM / in cache): 8 tokens 3.19 / 2.53 → 2.38 / 1.97, 4 tokens 2.23 / 1.41
 * → 1.52 / 1.01, 1 token 1.57 / 0.91 → 1.29 / 0.70 (the next rows alone into L1, before: 2.76 ms at 8 tokens,
 * 2 threads, with 512 bytes ahead alone). A prefetch past the last row is harmless (prefetches never fault). */
#define AHEAD 512
#define ROWS_KERNEL(NAME, ATTR, V, STEP, ZERO, LOAD_B, LOAD_A, MADD, HSUM, ROWS)                            \
    ATTR static inline __attribute__((always_inline)) void NAME##_body(                                     \
        int64_t j0, int64_t j1, const int64_t n, int64_t K, const float *xw, int64_t ldx, const uint16_t *xh,   \
        int64_t ldxh, const uint16_t *W, int64_t ldw, lf_dtype dt, const float *bias, int accumulate, float *c, \
        int64_t ldc) {                                                                                          \
        (void)xh, (void)ldxh;                                                                                   \
        const int R = ROWS(n); /* rows of W at a time (≤ 4): each x vector loaded serves R of them */           \
        const int64_t Kv = K / STEP * STEP, next = R * ldw; /* the next R rows: into L2, in step */              \
        for (int64_t j = j0; j < j1; j += R) {                                                                  \
            const uint16_t *w[4]; /* the last rows repeated past j1 */                                          \
            V acc[4][LF_ROWDOTS_MAX_N];                                                                         \
            for (int r = 0; r < R; r++) {                                                                       \
                w[r] = W + (j + r < j1 ? j + r : j) * ldw;                                                      \
                for (int64_t i = 0; i < n; i++) acc[r][i] = ZERO;                                               \
            }                                                                                                   \
            for (int64_t p = 0; p < Kv; p += STEP) {                                                            \
                V b[4];                                                                                         \
                for (int r = 0; r < R; r++) {                                                                   \
                    b[r] = LOAD_B(w[r] + p);                                                                    \
                    _mm_prefetch((const char *)(w[r] + next + p), _MM_HINT_T1);                                 \
                    _mm_prefetch((const char *)(w[r] + p + AHEAD), _MM_HINT_T0);                                \
                }                                                                                               \
                for (int64_t i = 0; i < n; i++) {                                                               \
                    const V a = LOAD_A(i, p);                                                                   \
                    for (int r = 0; r < R; r++) acc[r][i] = MADD(acc[r][i], a, b[r]);                           \
                }                                                                                               \
            }                                                                                                   \
            for (int r = 0; r < R && j + r < j1; r++)                                                           \
                for (int64_t i = 0; i < n; i++)                                                                 \
                    put(c + i * ldc + j + r,                                                                    \
                        HSUM(acc[r][i]) + (Kv < K ? dot_tail(Kv, K, xw + i * ldx, w[r], dt) : 0.0f), bias,      \
                        j + r, accumulate);                                                                     \
        }                                                                                                       \
    }                                                                                                           \
    ATTR static void NAME(int64_t j0, int64_t j1, int64_t n, int64_t K, const float *xw, int64_t ldx,          \
                          const uint16_t *xh, int64_t ldxh, const uint16_t *W, int64_t ldw, lf_dtype dt,        \
                          const float *bias, int accumulate, float *c, int64_t ldc) {                           \
        switch (n) {                                                                                            \
        case 1: NAME##_body(j0, j1, 1, K, xw, ldx, xh, ldxh, W, ldw, dt, bias, accumulate, c, ldc); break;      \
        case 2: NAME##_body(j0, j1, 2, K, xw, ldx, xh, ldxh, W, ldw, dt, bias, accumulate, c, ldc); break;      \
        case 3: NAME##_body(j0, j1, 3, K, xw, ldx, xh, ldxh, W, ldw, dt, bias, accumulate, c, ldc); break;      \
        case 4: NAME##_body(j0, j1, 4, K, xw, ldx, xh, ldxh, W, ldw, dt, bias, accumulate, c, ldc); break;      \
        case 5: NAME##_body(j0, j1, 5, K, xw, ldx, xh, ldxh, W, ldw, dt, bias, accumulate, c, ldc); break;      \
        case 6: NAME##_body(j0, j1, 6, K, xw, ldx, xh, ldxh, W, ldw, dt, bias, accumulate, c, ldc); break;      \
        case 7: NAME##_body(j0, j1, 7, K, xw, ldx, xh, ldxh, W, ldw, dt, bias, accumulate, c, ldc); break;      \
        default: NAME##_body(j0, j1, 8, K, xw, ldx, xh, ldxh, W, ldw, dt, bias, accumulate, c, ldc); break;     \
        }                                                                                                       \
    }

#define TWO_ROWS(n) 2

/* AVX2: 8 widened W elements (bf16 shifted, fp16 by vcvtph2ps) against 8 of x widened, fp32 FMAs */
#define AVX2_B(w) lf_load8((w), dt)
#define AVX2_A(i, p) _mm256_loadu_ps(xw + (i) * ldx + (p))
#define AVX2_MADD(acc, a, b) _mm256_fmadd_ps((a), (b), (acc))
ROWS_KERNEL(rows_avx2, LF_AVX2_FMA, __m256, 8, _mm256_setzero_ps(), AVX2_B, AVX2_A, AVX2_MADD, lf_hsum8, TWO_ROWS)

/* AVX-512: the same, 16 at a time */
#define AVX512_B(w) lf_load16((w), dt)
#define AVX512_A(i, p) _mm512_loadu_ps(xw + (i) * ldx + (p))
#define AVX512_MADD(acc, a, b) _mm512_fmadd_ps((a), (b), (acc))
ROWS_KERNEL(rows_avx512, LF_AVX512, __m512, 16, _mm512_setzero_ps(), AVX512_B, AVX512_A, AVX512_MADD,
            _mm512_reduce_add_ps, TWO_ROWS)

/* AVX512_BF16 (lf_tunables.decode_pairs, bf16 only): 32 elements of a W row and of an x row as they lie in
 * memory — 16 pairs (2l, 2l + 1) — into one vdpbf16ps: acc[l] += x[2l]·W[2l] + x[2l+1]·W[2l+1], exact
 * products summed in fp32 (its rounding and denormal flushing: tests/tolerances.py, the bf16 tile's).
 * The operands travel as __m512 bits. */
#define LF_AVX512_BF16 __attribute__((target("avx512f,avx512bf16")))
#define PAIRS_B(w) _mm512_castsi512_ps(_mm512_loadu_si512((const void *)(w)))
#define PAIRS_A(i, p) _mm512_castsi512_ps(_mm512_loadu_si512((const void *)(xh + (i) * ldxh + (p))))
/* 4 rows for ≤ 4 tokens, 3 for more (24 accumulators, 3 W vectors and x's in the 32 registers): Zen 4, 8 tokens
 * × 4096², 1 thread, W from DRAM: 2 rows 3.68 ms, 3 rows 3.04 */
#define PAIRS_ROWS(n) ((n) <= 4 ? 4 : 3)
#define PAIRS_MADD(acc, a, b) \
    _mm512_dpbf16_ps((acc), (__m512bh)_mm512_castps_si512(a), (__m512bh)_mm512_castps_si512(b))
ROWS_KERNEL(rows_pairs, LF_AVX512_BF16, __m512, 32, _mm512_setzero_ps(), PAIRS_B, PAIRS_A, PAIRS_MADD,
            _mm512_reduce_add_ps, PAIRS_ROWS)
#endif

/* 1 if operands of dtype dt take the vdpbf16ps kernels here (rows_pairs, axpy_pairs_N): bf16 where
 * lf_tunables.decode_pairs says so on the avx512_bf16 level */
static int bf16_pairs(lf_dtype dt) {
#if defined(__x86_64__)
    return dt == LF_DT_BF16 && lf_get_isa() >= LF_ISA_AVX512_BF16 && lf_tune()->decode_pairs;
#else
    (void)dt;
    return 0;
#endif
}

static rows_fn rows_for(lf_dtype dt) {
#if defined(__x86_64__)
    const lf_isa isa = lf_get_isa();
    if (bf16_pairs(dt)) return rows_pairs;
    if (isa >= LF_ISA_AVX512) return rows_avx512;
    if (isa == LF_ISA_AVX2) return rows_avx2;
#endif
    (void)dt;
    return rows_generic;
}

/* Rows of W per job block: a multiple of every R (2, 3, 4) */
#define ROWS_PER_BLOCK 12
/* K per block: at least K_BLOCK (a quantized W: the columns of its dequantized block, 24 KiB with
 * ROWS_PER_BLOCK rows), and as much more as keeps one group's x rows (≤ LF_ROWDOTS_MAX_N tokens, bf16 pairs or
 * widened floats) within X_BLOCK_BYTES, in L2: whole rows of W where they fit. A row read in one run rather than
 * K/K_BLOCK runs a page apart is what the prefetchers follow from DRAM — Zen 4, 2 threads, six distinct bf16
 * 4096² layers in turn: 1 / 8 tokens 1.47 / 1.95 → 1.14 / 1.68 ms a layer; one layer over and over (its W in
 * L3) 8 tokens 1.20 → 1.28 ms, 1 token 0.74 → 0.58. */
#define K_BLOCK 1024
#define X_BLOCK_BYTES (64 * 1024)

typedef struct {
    rows_fn rows;
    int64_t n, M, K, ldw, ldc;
    const uint16_t *W;      /* NULL for a quantized W */
    const lf_qweight *qw; /* the quantized W (M, K), or NULL */
    const float *xw, *bias; /* xw: x widened, or NULL where only rows_pairs on whole vectors reads x */
    const uint16_t *xh; /* x's half elements, rows ldxh apart */
    int64_t ldxh;
    int xh_read;        /* the rows kernel reads xh (rows_pairs), not xw */
    lf_dtype dt;
    float *c;
    int failed; /* a thread could not allocate its dequantization buffer */
} rowdots_half_job;

static void rowdots_half_run(void *ctxp, int tid, int nt) {
    rowdots_half_job *job = ctxp;
    const int64_t blocks = (job->M + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK, per = (blocks + nt - 1) / nt;
    const int64_t j0 = tid * per * ROWS_PER_BLOCK;
    const int64_t j1 = (tid + 1) * per * ROWS_PER_BLOCK < job->M ? (tid + 1) * per * ROWS_PER_BLOCK : job->M;
    /* a quantized W: rows [j, j + ROWS_PER_BLOCK) × columns [p0, p0 + len) dequantized into buf (row stride len) */
    uint16_t *buf = job->qw && j0 < j1 ? malloc(ROWS_PER_BLOCK * K_BLOCK * sizeof(uint16_t)) : NULL;
    if (job->qw && j0 < j1 && !buf) {
        __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    const int64_t group = job->n < LF_ROWDOTS_MAX_N ? job->n : LF_ROWDOTS_MAX_N;
    const int64_t fit = X_BLOCK_BYTES / (group * (job->xh_read ? 2 : 4)) / 64 * 64;
    const int64_t kb = job->qw || fit < K_BLOCK ? K_BLOCK : fit;
    for (int64_t p0 = 0; p0 == 0 || p0 < job->K; p0 += kb) { /* K = 0: one pass writes the bias */
        const int64_t len = job->K - p0 < kb ? job->K - p0 : kb;
        for (int64_t j = j0; j < j1; j += ROWS_PER_BLOCK) {
            if (lf_interrupt_pending()) break; /* the caller sees the flag and reports LF_EINTR */
            const int64_t je = j + ROWS_PER_BLOCK < j1 ? j + ROWS_PER_BLOCK : j1;
            const float *bias = p0 || !job->bias ? NULL : job->bias + j;
            if (buf) {
                lf_qweight_dequantize(job->qw, j, je, p0, p0 + len, job->dt, buf, len); /* checked by the caller */
                job->rows(0, je - j, job->n, len, job->xw ? job->xw + p0 : NULL, job->K, job->xh + p0, job->ldxh, buf,
                          len, job->dt, bias, p0 > 0, job->c + j, job->ldc);
            } else { /* the block's rows against each group of ≤ LF_ROWDOTS_MAX_N tokens: from memory once */
                for (int64_t i0 = 0; i0 < job->n; i0 += LF_ROWDOTS_MAX_N)
                    job->rows(0, je - j, job->n - i0 < LF_ROWDOTS_MAX_N ? job->n - i0 : LF_ROWDOTS_MAX_N, len,
                              job->xw ? job->xw + i0 * job->K + p0 : NULL, job->K, job->xh + i0 * job->ldxh + p0,
                              job->ldxh, job->W + j * job->ldw + p0, job->ldw, job->dt, bias, p0 > 0,
                              job->c + i0 * job->ldc + j, job->ldc);
            }
        }
    }
    free(buf);
}

int lf_rowdots_half_ok(int64_t n, lf_tview x, lf_tview W) {
    /* more than LF_ROWDOTS_MAX_N tokens in groups of it: a dense bf16 W on the pairs rows, a quantized W where
     * rowdots_quant.c takes them */
    const int n_ok = W.qw ? n <= LF_ROWDOTS_MAX_N || lf_rowdots_qw_ok(n, W.qw->cols, x.dtype, W.qw)
                          : n <= (bf16_pairs(x.dtype) ? LF_ROWDOTS_GROUPED_MAX_N : LF_ROWDOTS_MAX_N);
    return n_ok && (x.dtype == LF_DT_BF16 || x.dtype == LF_DT_F16) && W.dtype == x.dtype && x.cs == 1 && W.cs == 1 &&
           (!W.qw || W.rs == W.qw->cols);
}

int lf_rowdots_half(lf_pool *pool, int64_t n, int64_t M, int64_t K, lf_tview x, lf_tview W, const float *bias,
                    float *c, int64_t ldc) {
    if (n < 0 || M < 0 || K < 0 || ldc < M || !lf_rowdots_half_ok(n, x, W)) return LF_EINVAL;
    if (W.qw && (lf_qweight_unfit(W.qw) || W.qw->cols != K || W.qw->rows < M)) return LF_EINVAL;
    if (n == 0 || M == 0) return LF_OK;
    if (W.qw && lf_rowdots_qw_ok(n, K, x.dtype, W.qw)) return lf_rowdots_qw(pool, n, M, K, x, W.qw, bias, c, ldc);
    /* x widened, rows contiguous: for the widened kernels and the K tail past rows_pairs' 32-wide vectors (on whole
     * vectors rows_pairs reads x's own bf16 pairs only) */
    const int widen = !bf16_pairs(x.dtype) || K % 32 != 0;
    float *xw = widen ? lf_widened_copy(x, n, K, 1.0f) : NULL;
    if (widen && !xw) return LF_ENOMEM;
    rowdots_half_job job = {.rows = rows_for(x.dtype), .n = n, .M = M, .K = K, .ldw = W.rs, .ldc = ldc, .W = W.p,
                            .qw = W.qw, .xw = xw, .bias = bias, .xh = x.p, .ldxh = x.rs, .dt = x.dtype, .c = c,
                            .xh_read = bf16_pairs(x.dtype)};
    const int nt = lf_threads_for(pool, 2.0 * (double)n * (double)M * (double)K, (M + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK);
    lf_pool_run(pool, nt, rowdots_half_run, &job);
    free(xw);
    return lf_interrupt_pending() ? LF_EINTR : job.failed ? LF_ENOMEM : LF_OK;
}

/* ---- dx = g·W for a few tokens (lf_rows_axpy): c (n, K) = Σ_j g[:, j] ⊗ W[j, :], W (M, K) fp32 or half with
 * rows contiguous (or a quantized W, dequantized a block at a time into a thread's buffer), each element read
 * once: each thread owns a range of columns; rows of W are taken in blocks of AXPY_ROWS (their pages stay
 * in the TLB), and within a block each group of columns is summed over the block's rows in registers
 * (n × V vectors), then added into c's rows (fp32, in L1 / L2). A walk down one column strip through all M
 * rows instead touches a new page at every row of a large W. Each product exact; fp32 sums, by row blocks.
 * A strip's walk down the block's rows reads one line of each row, a page apart, which no hardware prefetcher
 * follows: each row's lines of the next strip are prefetched as the row is read (Zen 4, 2 threads, the bf16
 * layer's 8 × 4096² fwd+bwd 7.6 → 4.1 ms, 1 token 3.3 → 2.3). A bf16 g and W take vdpbf16ps where the decode
 * does (axpy_pairs_N: two rows of W a step; the layer's 8-token backward 1.96 → 1.23–1.37 ms, 1 token 1.2 → 1.0),
 * and there up to LF_ROWDOTS_GROUPED_MAX_N tokens in groups of 8 (16 / 24 / 32 tokens × 4096²: 6.2 / 6.3 / 7.4 ms
 * with the GEMM, whose W's pairs are packed per call → 2.3 / 3.1 / 4.1). */

#define AXPY_ROWS 128 /* rows of W per block: 128 pages of a 4096-wide bf16 W, within the L2 TLB */

typedef struct {
    int64_t n, M, K, ldc;
    const float *g; /* g widened (n, M), rows contiguous */
    const uint16_t *gh; /* g's own bf16 elements, rows ldgh apart (the pairs kernels), or NULL */
    int64_t ldgh;
    const void *W;  /* fp32, or bf16 / fp16 bits (dt) */
    int64_t ldw;
    const lf_qweight *qw; /* a quantized W (M, K) read as it is (W NULL), or NULL */
    lf_dtype dt;
    float *c;
    int failed; /* a thread could not allocate its dequantization buffer */
} rows_axpy_job;

/* columns of a quantized W dequantized per step: AXPY_ROWS × AXPY_Q4_COLS halves = 512 KiB of a thread's buffer, in
 * L2 — runs of 1 KiB of each row's codes: Zen 4, 2 threads, the NF4 layer's backward at 1 / 8 tokens × 4096²
 * 1.26 / 1.70 → 1.08 / 1.64 ms (512 columns: 256-byte runs a row, 2 KiB apart, which the prefetchers follow poorly) */
#define AXPY_Q4_COLS 2048

/* c[i, p] += Σ_{j ∈ [j0, j1)} g[i, j] · W[j, p] for i < n, p ∈ [p0, p1), one product at a time */
static void axpy_tail(const rows_axpy_job *job, int64_t j0, int64_t j1, int64_t p0, int64_t p1) {
    for (int64_t i = 0; i < job->n; i++)
        for (int64_t p = p0; p < p1; p++) {
            float acc = 0.0f;
            for (int64_t j = j0; j < j1; j++)
                acc += job->g[i * job->M + j] * lf_elem_f32(job->W, job->dt, j * job->ldw + p);
            job->c[i * job->ldc + p] += acc;
        }
}

typedef void (*axpy_fn)(const rows_axpy_job *, int64_t, int64_t, int64_t, int64_t);

#if defined(__x86_64__)
/* element off of W: its address, and L of them from there widened to fp32 (exactly): AX512_LOAD 16, AX256_LOAD 8 */
static inline const char *axpy_addr(const rows_axpy_job *job, int64_t off) {
    return (const char *)job->W + off * (job->dt == LF_DT_F32 ? 4 : 2);
}
LF_AVX512 static inline __m512 axpy_load16(const rows_axpy_job *job, int64_t off) {
    const void *p = axpy_addr(job, off);
    return job->dt == LF_DT_F32 ? _mm512_loadu_ps(p) : lf_load16(p, job->dt);
}
LF_AVX2_FMA static inline __m256 axpy_load8(const rows_axpy_job *job, int64_t off) {
    const void *p = axpy_addr(job, off);
    return job->dt == LF_DT_F32 ? _mm256_loadu_ps(p) : lf_load8(p, job->dt);
}
/* each ISA's operations (ISA##_…, pasted by AXPY_KERNEL): L lanes of type V */
#define AX512_ATTR LF_AVX512
#define AX512_L 16
#define AX512_V __m512
#define AX512_LOAD(job, off) axpy_load16((job), (off))
#define AX512_SET1(f) _mm512_set1_ps(f)
#define AX512_ZERO _mm512_setzero_ps()
#define AX512_FMA(a, b, acc) _mm512_fmadd_ps((a), (b), (acc))
#define AX512_ADD_TO(p, v) _mm512_storeu_ps((p), _mm512_add_ps(_mm512_loadu_ps(p), (v)))
#define AX256_ATTR LF_AVX2_FMA
#define AX256_L 8
#define AX256_V __m256
#define AX256_LOAD(job, off) axpy_load8((job), (off))
#define AX256_SET1(f) _mm256_set1_ps(f)
#define AX256_ZERO _mm256_setzero_ps()
#define AX256_FMA(a, b, acc) _mm256_fmadd_ps((a), (b), (acc))
#define AX256_ADD_TO(p, v) _mm256_storeu_ps((p), _mm256_add_ps(_mm256_loadu_ps(p), (v)))

/* The same for N tokens, strips of V vectors of L columns (N·V accumulators in registers) from p on while they fit
 * before p1; p is left after the last */
#define AXPY_STRIPS(ISA, N, V)                                                                                         \
    for (; p + L * (V) <= p1; p += L * (V)) {                                                                          \
        ISA##_V acc[N][V];                                                                                             \
        for (int i = 0; i < (N); i++)                                                                                  \
            for (int v = 0; v < (V); v++) acc[i][v] = ISA##_ZERO;                                                      \
        for (int64_t j = j0; j < j1; j++) {                                                                            \
            ISA##_V w[V];                                                                                              \
            for (int v = 0; v < (V); v++) w[v] = ISA##_LOAD(job, j * job->ldw + p + L * v);                            \
            for (int v = 0; v < (V); v += per_line) /* this row's lines of the next strip */                          \
                _mm_prefetch(axpy_addr(job, j * job->ldw + p + L * ((V) + v)), _MM_HINT_T0);                           \
            for (int i = 0; i < (N); i++) {                                                                            \
                const ISA##_V gi = ISA##_SET1(job->g[i * job->M + j]);                                                 \
                for (int v = 0; v < (V); v++) acc[i][v] = ISA##_FMA(gi, w[v], acc[i][v]);                              \
            }                                                                                                          \
        }                                                                                                              \
        for (int i = 0; i < (N); i++)                                                                                  \
            for (int v = 0; v < (V); v++) ISA##_ADD_TO(job->c + i * job->ldc + p + L * v, acc[i][v]);                 \
    }

/* [p0, p1) in strips of V vectors, what is left in strips of one, the last < L columns one product at a time (strips
 * of V alone left up to 5 vectors a thread to the scalar loop: Zen 4, 4096², 2 threads, the backward at 3 / 6 / 7
 * tokens then 1.3 / 1.6 / 1.7× the time, fp32 avx512; 1.6 / 1.8× at 3 / 6, fp16) */
#define AXPY_KERNEL(ISA, NAME, N, V)                                                                                   \
    ISA##_ATTR static void NAME(const rows_axpy_job *job, int64_t j0, int64_t j1, int64_t p0, int64_t p1) {            \
        const int L = ISA##_L;                                                                                         \
        const int per_line = 64 / (L * (job->dt == LF_DT_F32 ? 4 : 2)); /* vectors in a 64-byte line */              \
        int64_t p = p0;                                                                                                \
        AXPY_STRIPS(ISA, N, V)                                                                                         \
        AXPY_STRIPS(ISA, N, 1)                                                                                         \
        axpy_tail(job, j0, j1, p, p1);                                                                                 \
    }
AXPY_KERNEL(AX512, axpy_1, 1, 8)
AXPY_KERNEL(AX512, axpy_2, 2, 8)
AXPY_KERNEL(AX512, axpy_3, 3, 6)
AXPY_KERNEL(AX512, axpy_4, 4, 4)
AXPY_KERNEL(AX512, axpy_5, 5, 4)
AXPY_KERNEL(AX512, axpy_6, 6, 3)
AXPY_KERNEL(AX512, axpy_7, 7, 3)
AXPY_KERNEL(AX512, axpy_8, 8, 2)
static const axpy_fn AXPY_FOR_N[LF_ROWDOTS_MAX_N + 1] = {NULL,    axpy_1, axpy_2, axpy_3, axpy_4,
                                                         axpy_5, axpy_6, axpy_7, axpy_8};
/* AVX2's 16 registers: N·V accumulators, V rows' vectors and g's */
AXPY_KERNEL(AX256, axpy_y1, 1, 6)
AXPY_KERNEL(AX256, axpy_y2, 2, 4)
AXPY_KERNEL(AX256, axpy_y3, 3, 3)
AXPY_KERNEL(AX256, axpy_y4, 4, 2)
AXPY_KERNEL(AX256, axpy_y5, 5, 2)
AXPY_KERNEL(AX256, axpy_y6, 6, 2)
AXPY_KERNEL(AX256, axpy_y7, 7, 1)
AXPY_KERNEL(AX256, axpy_y8, 8, 1)
/* an fp32 W at 4–6 tokens: one vector a strip (two took 1.1–1.7× the time; a bf16 W the other way round, one vector
 * 1.5–1.9×: Zen 4, 4096², avx2 forced) */
AXPY_KERNEL(AX256, axpy_yf4, 4, 1)
AXPY_KERNEL(AX256, axpy_yf5, 5, 1)
AXPY_KERNEL(AX256, axpy_yf6, 6, 1)
static const axpy_fn AXPY_Y_FOR_N[LF_ROWDOTS_MAX_N + 1] = {NULL,     axpy_y1, axpy_y2, axpy_y3, axpy_y4,
                                                           axpy_y5, axpy_y6, axpy_y7, axpy_y8};
static const axpy_fn AXPY_YF_FOR_N[LF_ROWDOTS_MAX_N + 1] = {NULL,      axpy_y1,  axpy_y2, axpy_y3, axpy_yf4,
                                                            axpy_yf5, axpy_yf6, axpy_y7, axpy_y8};

/* bf16 g and W on vdpbf16ps (lf_tunables.decode_pairs): two rows of W a step, 32 columns a vector pair — the rows'
 * elements interleaved into pairs (W[j, p], W[j+1, p]) by vpunpcklwd / vpunpckhwd (lane L of the low half: columns
 * 8L .. 8L+3, of the high half 8L+4 .. 8L+7) — times g's pair (g[i, j], g[i, j+1]) broadcast: exact products
 * summed in fp32 (vdpbf16ps's rounding and denormal flushing: tests/tolerances.py, the bf16 tile's); an odd last
 * row pairs with zeros. The lanes are put back in column order once per strip, when added into c. */
LF_AVX512_BF16 static inline __m512i axpy_g_pair(const rows_axpy_job *job, int64_t i, int64_t j, int two) {
    const uint16_t *gi = job->gh + i * job->ldgh + j;
    return _mm512_set1_epi32((int)((uint32_t)gi[0] | (two ? (uint32_t)gi[1] << 16 : 0u)));
}
#define AXPY_PAIR_STRIPS(N, V)                                                                                         \
    for (; p + 32 * (V) <= p1; p += 32 * (V)) {                                                                        \
        __m512 lo[N][V], hi[N][V];                                                                                     \
        for (int i = 0; i < (N); i++)                                                                                  \
            for (int v = 0; v < (V); v++) lo[i][v] = hi[i][v] = _mm512_setzero_ps();                                   \
        for (int64_t j = j0; j < j1; j += 2) {                                                                         \
            const int two = j + 1 < j1;                                                                                \
            __m512i wl[V], wh[V];                                                                                      \
            for (int v = 0; v < (V); v++) {                                                                            \
                const uint16_t *w0 = W + j * job->ldw + p + 32 * v;                                                    \
                const __m512i r0 = _mm512_loadu_si512((const void *)w0);                                               \
                const __m512i r1 = two ? _mm512_loadu_si512((const void *)(w0 + job->ldw)) : _mm512_setzero_si512();   \
                wl[v] = _mm512_unpacklo_epi16(r0, r1);                                                                 \
                wh[v] = _mm512_unpackhi_epi16(r0, r1);                                                                 \
                _mm_prefetch((const char *)(w0 + 32 * (V)), _MM_HINT_T0); /* the rows' lines of the next strip */       \
                _mm_prefetch((const char *)(w0 + job->ldw + 32 * (V)), _MM_HINT_T0);                                   \
            }                                                                                                          \
            for (int i = 0; i < (N); i++) {                                                                            \
                const __m512bh gp = (__m512bh)axpy_g_pair(job, i, j, two);                                             \
                for (int v = 0; v < (V); v++) {                                                                        \
                    lo[i][v] = _mm512_dpbf16_ps(lo[i][v], gp, (__m512bh)wl[v]);                                        \
                    hi[i][v] = _mm512_dpbf16_ps(hi[i][v], gp, (__m512bh)wh[v]);                                        \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
        for (int i = 0; i < (N); i++)                                                                                  \
            for (int v = 0; v < (V); v++) { /* [lo L0, hi L0, lo L1, hi L1], [lo L2, hi L2, lo L3, hi L3] */          \
                const __m512 a = _mm512_shuffle_f32x4(lo[i][v], hi[i][v], 0x44);  /* lo L0 L1, hi L0 L1 */              \
                const __m512 b = _mm512_shuffle_f32x4(lo[i][v], hi[i][v], 0xEE);  /* lo L2 L3, hi L2 L3 */              \
                float *ci = job->c + i * job->ldc + p + 32 * v;                                                        \
                _mm512_storeu_ps(ci, _mm512_add_ps(_mm512_loadu_ps(ci), _mm512_shuffle_f32x4(a, a, 0xD8)));              \
                _mm512_storeu_ps(ci + 16, _mm512_add_ps(_mm512_loadu_ps(ci + 16), _mm512_shuffle_f32x4(b, b, 0xD8)));     \
            }                                                                                                          \
    }
/* as AXPY_KERNEL: strips of V vector pairs, then of one, the last < 32 columns one product at a time */
#define AXPY_PAIRS_KERNEL(N, V)                                                                                        \
    LF_AVX512_BF16 static void axpy_pairs_##N(const rows_axpy_job *job, int64_t j0, int64_t j1, int64_t p0,            \
                                              int64_t p1) {                                                            \
        const uint16_t *W = job->W;                                                                                    \
        int64_t p = p0;                                                                                                \
        AXPY_PAIR_STRIPS(N, V)                                                                                         \
        AXPY_PAIR_STRIPS(N, 1)                                                                                         \
        axpy_tail(job, j0, j1, p, p1);                                                                                 \
    }
AXPY_PAIRS_KERNEL(1, 8)
AXPY_PAIRS_KERNEL(2, 4)
AXPY_PAIRS_KERNEL(3, 3)
AXPY_PAIRS_KERNEL(4, 2)
AXPY_PAIRS_KERNEL(5, 2)
AXPY_PAIRS_KERNEL(6, 2)
AXPY_PAIRS_KERNEL(7, 1)
AXPY_PAIRS_KERNEL(8, 1)
static const axpy_fn AXPY_PAIRS_FOR_N[LF_ROWDOTS_MAX_N + 1] = {
    NULL, axpy_pairs_1, axpy_pairs_2, axpy_pairs_3, axpy_pairs_4, axpy_pairs_5, axpy_pairs_6, axpy_pairs_7, axpy_pairs_8};
#endif

/* the job's tokens [i0, i0 + LF_ROWDOTS_MAX_N) (or fewer: the last group) on W (row stride ldw), their g from
 * column g0 on, their c from column c0 on */
static rows_axpy_job axpy_group(const rows_axpy_job *job, int64_t i0, const void *W, int64_t ldw, int64_t g0,
                                int64_t c0) {
    return (rows_axpy_job){.n = job->n - i0 < LF_ROWDOTS_MAX_N ? job->n - i0 : LF_ROWDOTS_MAX_N, .M = job->M,
                           .K = job->K, .ldc = job->ldc, .g = job->g + i0 * job->M + g0,
                           .gh = job->gh ? job->gh + i0 * job->ldgh + g0 : NULL, .ldgh = job->ldgh, .W = W, .ldw = ldw,
                           .dt = job->dt, .c = job->c + i0 * job->ldc + c0};
}

/* the kernel for a group of n ≤ LF_ROWDOTS_MAX_N tokens */
static axpy_fn axpy_for(const rows_axpy_job *job, int64_t n) {
#if defined(__x86_64__)
    if (job->gh) return AXPY_PAIRS_FOR_N[n];
    if (lf_get_isa() >= LF_ISA_AVX512) return AXPY_FOR_N[n];
    if (lf_get_isa() == LF_ISA_AVX2) return (job->dt == LF_DT_F32 ? AXPY_YF_FOR_N : AXPY_Y_FOR_N)[n];
#endif
    (void)job, (void)n;
    return axpy_tail;
}

/* More than LF_ROWDOTS_MAX_N tokens run in groups of it over each block of W's rows while the block is in cache
 * (the thread's columns of 128 rows: 512 KiB of a 4096-wide bf16 W), as the grouped decode does. */
static void rows_axpy_run(void *ctxp, int tid, int nt) {
    const rows_axpy_job *job = ctxp;
    const int64_t per = (job->K + nt * 16 - 1) / (nt * 16) * 16; /* whole vectors per thread */
    const int64_t q0 = tid * per, q1 = q0 + per < job->K ? q0 + per : job->K;
    if (q0 >= q1) return;
    for (int64_t i = 0; i < job->n; i++)
        for (int64_t q = q0; q < q1; q++) job->c[i * job->ldc + q] = 0.0f;
    /* a quantized W: each block of rows × AXPY_Q4_COLS columns dequantized into buf (row stride AXPY_Q4_COLS,
     * rounded as lf_qweight_dequantize rounds) and summed from there, through a job that sees buf as W */
    uint16_t *buf = job->qw ? malloc(AXPY_ROWS * AXPY_Q4_COLS * sizeof(uint16_t)) : NULL;
    if (job->qw && !buf) {
        __atomic_store_n(&((rows_axpy_job *)job)->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (int64_t j = 0; j < job->M; j += AXPY_ROWS) {
        if (lf_interrupt_pending()) break; /* the caller sees the flag and reports LF_EINTR */
        const int64_t je = j + AXPY_ROWS < job->M ? j + AXPY_ROWS : job->M;
        if (!buf) {
            for (int64_t i0 = 0; i0 < job->n; i0 += LF_ROWDOTS_MAX_N) {
                const rows_axpy_job grp = axpy_group(job, i0, job->W, job->ldw, 0, 0);
                axpy_for(job, grp.n)(&grp, j, je, q0, q1);
            }
            continue;
        }
        for (int64_t p = q0; p < q1; p += AXPY_Q4_COLS) {
            const int64_t w = q1 - p < AXPY_Q4_COLS ? q1 - p : AXPY_Q4_COLS;
            lf_qweight_dequantize(job->qw, j, je, p, p + w, job->dt, buf, w); /* checked by lf_rows_axpy */
            for (int64_t i0 = 0; i0 < job->n; i0 += LF_ROWDOTS_MAX_N) {
                const rows_axpy_job grp = axpy_group(job, i0, buf, w, j, p);
                axpy_for(job, grp.n)(&grp, 0, je - j, 0, w);
            }
        }
    }
    free(buf);
}

/* tokens whose dx streams a half or quantized W that the GEMM would widen (below avx512_bf16, or fp16), in groups of
 * LF_ROWDOTS_MAX_N over each block of W's rows: Zen 4, 4096² NF4 backward, 12 / 16 / 24 / 32 tokens, avx2 forced
 * 0.76 / 0.82 / 1.01 / 1.03× the GEMM's time, avx512 0.51 / 0.51 / 0.65 / 0.73×; bf16 avx2, 16 / 32: 0.58 / 0.88× */
#define AXPY_WIDENED_MAX_N 24

int lf_rows_axpy_streams(int64_t n, int64_t w_cs, lf_dtype wdt) {
    const int widens = wdt != LF_DT_F32 && !lf_gemm_half_tile(wdt);
    const int64_t max_n = bf16_pairs(wdt) ? LF_ROWDOTS_GROUPED_MAX_N : widens ? AXPY_WIDENED_MAX_N : LF_ROWDOTS_MAX_N;
    /* AVX2 (axpy_yN): a half or quantized W, whose GEMM packs W widened (Zen 4, avx2 forced, 4096², 1 / 8 tokens:
     * bf16 6.5 / 7.1 → 2.8 / 3.0 ms, NF4 4.8 / 5.9 → 1.9 / 3.5); an fp32 W too (the backward at 1–8 tokens
     * 0.62–0.82× the GEMM's time) */
    return n >= 1 && n <= max_n && w_cs == 1 && lf_get_isa() >= LF_ISA_AVX2;
}

int lf_rows_axpy(lf_pool *pool, int64_t n, int64_t M, int64_t K, lf_tview g, lf_tview W, float *c, int64_t ldc) {
    if (n < 1 || n > LF_ROWDOTS_GROUPED_MAX_N || M < 0 || K < 0 || ldc < K || W.cs != 1 ||
        (W.dtype != LF_DT_BF16 && W.dtype != LF_DT_F16 && (W.dtype != LF_DT_F32 || W.qw)))
        return LF_EINVAL;
    if (W.qw && (lf_qweight_unfit(W.qw) || W.rs != K || W.qw->cols != K || W.qw->rows < M)) return LF_EINVAL;
    if (K == 0) return LF_OK;
    float *gw = lf_widened_copy(g, n, M, 1.0f); /* g widened, rows contiguous */
    if (!gw) return LF_ENOMEM;
    /* bf16 g and W (as stored, or a quantized W's bf16 blocks) on the vdpbf16ps pairs where the decode takes them */
    const int pairs = g.dtype == LF_DT_BF16 && g.cs == 1 && bf16_pairs(W.dtype);
    rows_axpy_job job = {.n = n, .M = M, .K = K, .ldc = ldc, .g = gw, .gh = pairs ? g.p : NULL, .ldgh = g.rs,
                         .W = W.p, .ldw = W.rs, .qw = W.qw, .dt = W.dtype, .c = c};
    const int nt = lf_threads_for(pool, 2.0 * (double)n * (double)M * (double)K, (K + 15) / 16);
    lf_pool_run(pool, nt, rows_axpy_run, &job);
    free(gw);
    return lf_interrupt_pending() ? LF_EINTR : job.failed ? LF_ENOMEM : LF_OK;
}
