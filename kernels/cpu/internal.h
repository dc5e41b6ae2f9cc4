/* internal.h — what the CPU kernels share with each other but not with the binding. */
#ifndef LORAFUSE_CPU_INTERNAL_H
#define LORAFUSE_CPU_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "lorafuse/kernels.h"

/* Micro-kernel: the MR×NR tile at c (row stride ldc) of  ap (MR×kc) · bp (kc×NR)  where
 *   ap[p*MR + i] = a(i, p)   (packed A micro-panel, k-major)
 *   bp[p*NR + j] = b(p, j)   (packed B micro-panel, k-major)
 * Only the top-left mr×nr of the tile is stored (edge tiles: packing zero-pads the rest).
 *   accumulate = 1:  c += ap·bp
 *   accumulate = 0:  c  = ap·bp (+ bias[j] if bias != NULL; bias points at this tile's columns) */
typedef void (*lf_ukernel_fn)(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc,
                              int64_t mr, int64_t nr, int accumulate, const float *bias);

/* The same tile reading A in place from a row-major source: row i of the tile at a + i·lda. */
typedef void (*lf_ukernel_direct_fn)(int64_t kc, const float *a, int64_t lda, const float *bp, float *c,
                                     int64_t ldc, int64_t mr, int64_t nr, int accumulate, const float *bias);

/* dst[j] = scale · (float)src[j] for j < n: a contiguous run of bf16 or fp16 bits (dt) widened to
 * fp32, exactly (before the scale); per ISA in widen.c */
typedef void (*lf_widen_fn)(const uint16_t *src, int64_t n, lf_dtype dt, float scale, float *dst);
void lf_widen_generic(const uint16_t *src, int64_t n, lf_dtype dt, float scale, float *dst);
void lf_widen_avx2(const uint16_t *src, int64_t n, lf_dtype dt, float scale, float *dst);
void lf_widen_avx512(const uint16_t *src, int64_t n, lf_dtype dt, float scale, float *dst);
/* dst[i·ld + j] = scale · t[i, j] for i < rows, j < cols (half elements widened exactly); other columns of dst
 * untouched */
void lf_widen_into(lf_tview t, int64_t rows, int64_t cols, float scale, float *dst, int64_t ld);
/* A new C-contiguous fp32 (rows, cols) copy of t, times scale (lf_widen_into; free() it), or NULL when out of
 * memory; at least one float is allocated, so NULL only means that. */
float *lf_widened_copy(lf_tview t, int64_t rows, int64_t cols, float scale);

/* bfloat16 bits → fp32: the top half of an fp32 (exact, NaN payloads kept) */
static inline float lf_bf16_to_f32(uint16_t h) {
    union {
        uint32_t u;
        float f;
    } v = {(uint32_t)h << 16};
    return v.f;
}

/* IEEE binary16 bits → fp32, exactly: subnormals (m·2⁻²⁴), ±0, ±inf, NaN (payload kept) */
static inline float lf_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    union {
        uint32_t u;
        float f;
    } v;
    if (e == 0) { /* zero or subnormal: m·2⁻²⁴, exact in fp32 */
        v.f = (float)m * 0x1p-24f;
        v.u |= sign;
    } else if (e == 31) {
        v.u = sign | 0x7F800000u | (m << 13);
    } else {
        v.u = sign | ((e + 112u) << 23) | (m << 13); /* rebias 15 → 127 */
    }
    return v.f;
}

static inline float lf_half_to_f32(lf_dtype dt, uint16_t h) {
    return dt == LF_DT_BF16 ? lf_bf16_to_f32(h) : lf_f16_to_f32(h);
}

/* element off of an fp32, bf16 or fp16 array p (dtype dt) as fp32, exactly */
static inline float lf_elem_f32(const void *p, lf_dtype dt, int64_t off) {
    return dt == LF_DT_F32 ? ((const float *)p)[off] : lf_half_to_f32(dt, ((const uint16_t *)p)[off]);
}

/* Two adjacent NR-wide slivers of B at once (the second at bp + bstride), A read in place:
 * the pair_mr × 2·NR tile at c; nr ≤ 2·NR columns stored (nr ≤ NR: the first sliver alone).
 * The bf16 one (avx512_bf16, bstride in 32-bit slots; gemm.c w_rows_block_run) reads a as 16-bit rows, lda in
 * 16-bit elements, and adds bias[i] to row i (a row of Cᵀ: bias belongs to W's rows there). */
typedef void (*lf_ukernel_pair_fn)(int64_t kc, const float *a, int64_t lda, const float *bp, int64_t bstride,
                                   float *c, int64_t ldc, int64_t mr, int64_t nr, int accumulate, const float *bias);

/* Dropout applied while reading an operand: keep iff lf_dropout_keep(seed, offset, threshold),
 * kept values times scale (= 1/(1-p), possibly times another factor). */
typedef struct {
    uint64_t seed;
    uint32_t threshold;
    float scale;
} lf_mask;

/* Most token rows for the decode path (rowdots): up to here W is read in place. */
#define LF_ROWDOTS_MAX_N 8

/* One K segment of a rowdots product: a (n, K) rows against b (M, K) rows, both cs == 1. */
typedef struct {
    lf_view a, b;
    int64_t K;
} lf_dots_seg;

/* Most K segments of one rowdots product ([x | s·u] · [W | B]ᵀ has two). */
#define LF_ROWDOTS_MAX_SEG 2

/* One ISA's rank-r kernels: the loops of skinny_body.h compiled per ISA (skinny_avx512.c,
 * skinny_avx2.c, skinny_generic.c), driven by skinny.c. */
typedef struct {
    int vw; /* floats per vector */
    void (*rowdots_block)(int64_t j0, int64_t j1, int64_t n, const lf_dots_seg *seg, int nseg, float scale,
                          const float *bias, float *c, int64_t ldc);
    void (*rowdot_rows)(int64_t m0, int64_t m1, int64_t K, int64_t R, int64_t Rp, lf_tview a,
                        const float *bt, float scale, float *c, const lf_mask *mask);
    void (*rank_update_block)(int64_t p0, int64_t p1, int64_t q0, int64_t q1, int64_t T, lf_view s,
                              lf_tview w, float scale, float *c, int64_t ldc, const lf_mask *wmask);
    /* c[p·ldc + j] += Σ_q a(p, q) · bt[q·ldb + j] for p < P, j < Q (Q a multiple of vw), q < R */
    void (*rank_add)(int64_t P, int64_t Q, int64_t R, lf_view a, const float *bt, int64_t ldb, float *c,
                     int64_t ldc);
    /* dst[j] = mask(off0 + j) ? src[j]·scale : 0 */
    void (*dropout_span)(const float *src, int64_t n, uint64_t off0, uint64_t seed, uint32_t thr, float scale,
                         float *dst);
    /* dst[j] += mask(off0 + j) ? coef·t[j] : 0 */
    void (*dropout_axpy_span)(const float *t, int64_t n, uint64_t off0, uint64_t seed, uint32_t thr,
                              float coef, float *dst);
    /* dst[j] = (shift ? shift[j] : 0) + col[j] · src[j] */
    void (*cols_affine)(const float *src, int64_t n, const float *col, const float *shift, float *dst);
    /* dc[j] += g[j] · z[j] (z NULL: not), then g[j] ·= col[j] */
    void (*cols_dot_scale)(float *g, int64_t n, const float *z, const float *col, float *dc);
} lf_skinny;

const lf_skinny *lf_skinny_current(void);
/* one table per ISA: skinny_generic.c, skinny_avx2.c, skinny_avx512.c (the AVX ones zero off x86-64) */
extern const lf_skinny lf_skinny_generic;
extern const lf_skinny lf_skinny_avx2;
extern const lf_skinny lf_skinny_avx512;

/* dst[j] = round_dt(src[j]) for j < n: fp32 results rounded once to a bf16 / fp16 output (narrow.c,
 * half_store.h's rounding: to nearest even, as torch's .to(dtype)), on the ISA in use */
void lf_narrow(const float *src, int64_t n, lf_dtype dt, uint16_t *dst);
/* narrow.c: c[i·ldc + j] = round_dt(c[i·ldc + j]) for i < n, j < cols, kept as fp32 (dt bf16 or fp16) */
void lf_round_rows(float *c, int64_t n, int64_t cols, int64_t ldc, lf_dtype dt);

/* rowdots_half.c: c (n, M; row stride ldc) = x (n, K) · W (M, K)ᵀ (+ bias (M) fp32, or NULL) for a few
 * tokens, W streamed in place: x and W one half dtype, rows contiguous, or W a quantized weight (M ≤ rows,
 * K = cols; rowdots_quant.c where lf_rowdots_qw_ok) (lf_rowdots_half_ok): n ≤ LF_ROWDOTS_MAX_N, or ≤
 * LF_ROWDOTS_GROUPED_MAX_N for a dense bf16 W on the vdpbf16ps rows (each block of W's rows against every
 * group of 8 tokens while it is in cache: Zen 4, 4096², 12 / 24 / 32 tokens 2.0 / 3.7 / 4.4 ms against the
 * GEMM's 3.2 / 4.3 / 5.2; at 48 the GEMM is as fast) */
#define LF_ROWDOTS_GROUPED_MAX_N 32
int lf_rowdots_half_ok(int64_t n, lf_tview x, lf_tview W);
/* rowdots_quant.c: the same product for x bf16 / fp16 and a quantized W (M ≤ rows, K = cols) read as it is
 * (no dequantized copy): 4-bit element by element through per-block value tables, 8-bit (bf16 x on
 * vdpbf16ps only) through its converted codes; lf_rowdots_qw_ok: whether it runs here (n ≤
 * LF_ROWDOTS_MAX_N — a 4-bit W where the GEMM would widen it: LF_ROWDOTS_QW_GROUPED_MAX_N, in groups —, AVX2 and up;
 * 4-bit: K a multiple of the block size; 8-bit: lf_tunables.decode_pairs with a bf16 x), else lf_rowdots_half's
 * block buffer. */
/* rowdots_half.c: c (n, K; row stride ldc) = g (n, M) · W (M, K) for 1 ≤ n ≤ LF_ROWDOTS_GROUPED_MAX_N tokens (in
 * groups of LF_ROWDOTS_MAX_N), W fp32 or half with rows contiguous (or a quantized W stored (M, K)) streamed once
 * (dx of the decode-size backward), g any dtype and strides */
int lf_rows_axpy(lf_pool *pool, int64_t n, int64_t M, int64_t K, lf_tview g, lf_tview W, float *c, int64_t ldc);
/* 1 if dx = g·W of n tokens on a W of dtype wdt whose column stride is w_cs streams W once by lf_rows_axpy rather
 * than packing it for a GEMM: 1 ≤ n ≤ LF_ROWDOTS_MAX_N (LF_ROWDOTS_GROUPED_MAX_N for a bf16 W where the decode takes
 * vdpbf16ps; 24 for a half or quantized W the GEMM would widen), rows contiguous, AVX-512, or AVX2 for a half or
 * quantized W (generic: lf_rows_axpy's loop is scalar and the GEMM is the faster). Zen 4, 1 × 4096² fp32 fwd+bwd: 7.6 ms with the GEMM (PEFT 6.4), 4.4 streamed. */
int lf_rows_axpy_streams(int64_t n, int64_t w_cs, lf_dtype wdt);
/* tokens a 4-bit W's decode takes in groups of LF_ROWDOTS_MAX_N where the GEMM would widen W (below avx512_bf16, or
 * an fp16 x): Zen 4, 4096² NF4, 16 / 24 / 32 tokens, the GEMM 9.4 / 10.6 / 12.6 ms (avx2 forced) and 6.7 / 6.7 / 8.5
 * (avx512) against 2.7 and 2.0 ms a group of 8 */
#define LF_ROWDOTS_QW_GROUPED_MAX_N 24
int lf_rowdots_qw_ok(int64_t n, int64_t K, lf_dtype xdt, const lf_qweight *w);
int lf_rowdots_qw(lf_pool *pool, int64_t n, int64_t M, int64_t K, lf_tview x, const lf_qweight *w,
                  const float *bias, float *c, int64_t ldc);
int lf_rowdots_half(lf_pool *pool, int64_t n, int64_t M, int64_t K, lf_tview x, lf_tview W, const float *bias,
                    float *c, int64_t ldc);

/* rank_rows.c: for every row i < n of c (n, cols; row stride ldc), first — pre_dt bf16 or fp16 — the row
 * rounded to pre_dt in place (lf_round_rows: a product rounded alone, then an fp32 term added; LF_DT_F32: not),
 *     c[i, :] += coef · keep(i, :) ⊙ (v[i, :] · w)     v (n, r) any strides, w (r, cols) with w.cs == 1
 * keep(i, j) = lf_dropout_keep(mask->seed, i·cols + j, mask->threshold), 1 when mask is NULL (its
 * scale is not used: coef is the factor); r = 0 adds nothing. Then, when out is not NULL,
 * out[i·ldo + j] = round_dt(c[i, j]) (lf_narrow, out_dt bf16 or fp16) — with an affine (not NULL)
 * round_dt(shift[j] + col[j]·c[i, j]), c left as it is (DoRA's y from its z̃). Row blocks on the pool. */
typedef struct {
    const float *col;   /* (cols) */
    const float *shift; /* (cols), or NULL for none */
} lf_cols_affine;
int lf_rank_rows(lf_pool *pool, int64_t n, int64_t cols, int64_t r, lf_view v, lf_view w, float coef,
                 const lf_mask *mask, float *c, int64_t ldc, lf_dtype pre_dt, lf_dtype out_dt, uint16_t *out,
                 int64_t ldo, const lf_cols_affine *aff);

/* col_scale.c: DoRA's g' — gh[i·m + j] = round_dt(g[i, j]·c[j]) for g (n, m) float32 / bf16 / fp16 of any
 * strides, gh C-contiguous in dt (float for LF_DT_F32, else uint16_t bits; NULL: not formed) — and, when dc is
 * not NULL, dc[j] = Σ_i g[i, j]·z[i·ldz + j] (fp32 sums, per thread then added in thread order). Rows on the
 * pool. */
int lf_scale_cols(lf_pool *pool, int64_t n, int64_t m, lf_tview g, const float *c, const float *z, int64_t ldz,
                  lf_dtype dt, void *gh, float *dc);

/* Largest rank the skinny kernels take (beyond it a GEMM's packing pays for itself). */
#define LF_SKINNY_MAX_R 64

/* 1 if `big` (the n-row operand) can be streamed in place: rows contiguous, 0 < r ≤ max */
int lf_skinny_ok(lf_view big, int64_t r);
/* c (M, R) = scale · ã (M, K) · b (K, R);  a.cs == 1 (fp32, bf16 or fp16), b any dtype and strides, c
 * contiguous fp32; ã = a, or a dropped by mask (index: the flat offset i·a.rs + j) */
int lf_rowdot(lf_pool *pool, int64_t M, int64_t K, int64_t R, lf_tview a, lf_tview b, float scale, float *c,
              const lf_mask *mask);
/* c (n, M; row stride ldc) = scale · Σ_seg a_seg (n, K_seg) · b_seg (M, K_seg)ᵀ + bias (NULL: none);
 * n ≤ LF_ROWDOTS_MAX_N, 1 ≤ nseg ≤ LF_ROWDOTS_MAX_SEG, every a.cs == b.cs == 1 */
int lf_rowdots(lf_pool *pool, int64_t n, int64_t M, const lf_dots_seg *seg, int nseg, float scale,
               const float *bias, float *c, int64_t ldc);
/* 1 if these views suit lf_rowdots (n ≤ LF_ROWDOTS_MAX_N, contiguous rows) */
int lf_rowdots_ok(int64_t n, lf_view a, lf_view b);
/* c (P, Q; row stride ldc) = scale · s (T, P)ᵀ · w̃ (T, Q);  w.cs == 1 (fp32, bf16 or fp16: widened as
 * read); w̃ = w or w dropped by wmask */
int lf_rank_update(lf_pool *pool, int64_t P, int64_t Q, int64_t T, lf_view s, lf_tview w, float scale,
                   float *c, int64_t ldc, const lf_mask *wmask);

/* Length of the stack buffer that packing uses to mask a run of x̃ (any kc works: runs are
 * chunked; every dispatch's kc is ≤ this, so a run is one chunk). */
#define LF_MAX_KC 512
/* Widest register tile (AVX-512: 32); bounds the stack buffers of packing. */
#define LF_MAX_NR 32

/* dst[q·ld + i] = scale · src[i·rs + q] for i < rows ≤ TB, q < TB: one TB×TB block of a
 * row-major operand packed k-major (transpose.c); rows ≥ `rows` of dst are not written. */
typedef void (*lf_transpose_fn)(const float *src, int64_t rs, int rows, float scale, float *dst, int64_t ld);
void lf_transpose16_avx512(const float *src, int64_t rs, int rows, float scale, float *dst, int64_t ld);
void lf_transpose8_avx2(const float *src, int64_t rs, int rows, float scale, float *dst, int64_t ld);

/* Goto/BLIS cache blocks of one register tile: MC×KC A-block in L2, KC×NC B-panel in L3, and within them
 * NB columns of the panel (a KC×NB sub-block, in L2 beside the A block) that each MR rows of the A block run
 * over before the next MR rows: their KC×MR A micro-panel (or the MR rows read in place) stays in L1 across
 * NB/NR tiles. nb 0: one tile's columns at a time (each B sliver over all of the A block's rows). */
typedef struct {
    int64_t kc, mc, nc, nb;
} lf_blocking;

/* Every number that chooses a path, a blocking or a thread count, for one ISA: the table is
 * tunables.c (one entry per ISA, each field's reason beside it; the measurements behind them:
 * benchmarks/bench_plans.py and benchmarks/RESULTS.md). Limits that size arrays or kernel cases
 * (LF_ROWDOTS_MAX_N, LF_SKINNY_MAX_R, LF_MAX_KC, LF_MAX_NR) are not tunables. */
typedef struct {
    lf_isa isa;
    lf_blocking wide, narrow; /* the blocks of the ISA's tile and of its narrow tile (if any) */
    lf_blocking pairs; /* the blocks of its bf16 tile (avx512_bf16: vdpbf16ps, amx_bf16: AMX; kc counts k) */
    /* gemm.c block_rows: a thread with at most this many rows of C on the bf16 pair tile takes them as one A block
     * (W's slivers then packed each just before its tiles run); 0: never beyond pairs.mc */
    int64_t pairs_one_block_rows;
    /* gemm.c w_rows_in_place: C = x·Wᵀ on the bf16 pair tile runs as Cᵀ = W·xᵀ (W's rows read in place by the
     * bf16 pair tile, never packed; x packed) for w_in_place_min_n ≤ M ≤ w_in_place_max_n rows of x and a W
     * of at least w_in_place_min_w elements (0: never) */
    int64_t w_in_place_min_n, w_in_place_max_n;
    double w_in_place_min_w;
    /* gemm.c how_a_is_read: a thread's columns of C up to which a plain row-major A is read in
     * place by the MR×NR tile instead of packed (0: never) */
    int64_t direct_a_max_cols;
    /* gemm.c how_a_is_read: A's rows whose stride is a multiple of this many floats share one
     * L1 set; read by the pair tile (fewer rows) when there is one (0: no such rule) */
    int64_t a_same_set_stride;
    /* lf_gemm_reads_a_in_place: the few-token forward reads W in place for N ≤ this many
     * half-slivers of the tile (AVX-512: 3, one and a half slivers; AVX2: 8, four) */
    int direct_max_half_slivers;
    /* lora.c few_tokens: the yᵀ forward for LF_ROWDOTS_MAX_N < n ≤ this and W of at least
     * few_tokens_min_w elements */
    int64_t few_tokens_max_n;
    double few_tokens_min_w;
    /* gemm.c and skinny.c: a job of fewer flops runs on the calling thread */
    double parallel_min_flops;
    /* lora_half.c: a dense half W whose x·Wᵀ takes the ISA's bf16 tile uses the decode kernel (W streamed in
     * place) for at most this many tokens, the tile GEMM beyond (0: LF_ROWDOTS_MAX_N, the decode kernel's
     * limit; a quantized W and the widened path always decode up to that limit) */
    int half_decode_max_n;
    /* rowdots_half.c, rowdots_quant.c: 1 if the decode kernels multiply a bf16 x by a bf16 (or 4-bit) W on
     * vdpbf16ps — 32 elements of a row per instruction, on x's and W's bf16 pairs as they lie in memory —
     * instead of widening to fp32 FMAs (16 per instruction): where vdpbf16ps issues at the FMA's rate */
    int decode_pairs;
} lf_tunables;

extern const lf_tunables lf_tunables_generic, lf_tunables_avx2, lf_tunables_avx512, lf_tunables_avx512_bf16,
    lf_tunables_amx_bf16;

/* The tunables of the ISA in use (lf_current()). */
const lf_tunables *lf_tune(void);

/* Threads for a job of `flops` split into at most `units` parts (≥ 1): one below
 * parallel_min_flops, else the pool's, never more than units. */
int lf_threads_for(lf_pool *pool, double flops, int64_t units);

/* One ISA's micro-kernel and its cache blocking (from its tunables). */
typedef struct lf_dispatch lf_dispatch;
typedef struct lf_gemm_block lf_gemm_block; /* one thread's block of an lf_gemm (below) */
struct lf_dispatch {
    lf_isa isa;
    int mr, nr;             /* register tile */
    const lf_blocking *blk; /* its cache blocks (lf_tunables) */
    lf_ukernel_fn ukernel;
    lf_ukernel_direct_fn ukernel_direct; /* the tile on an unpacked row-major A, or NULL */
    lf_ukernel_pair_fn ukernel_pair;     /* the two-sliver tile on an unpacked A, or NULL */
    int pair_mr;                         /* its rows */
    const lf_dispatch *narrow; /* tile for N ≤ its nr (the rank-r GEMMs), or NULL */
    lf_transpose_fn transpose; /* vectorised packing of row-major operands, or NULL (scalar) */
    int tb;                    /* its block size TB */
    lf_widen_fn widen;         /* bf16 / fp16 runs to fp32 while packing */
    /* 1: the packed slivers hold bf16 K-pairs, two k per 32-bit slot (the bf16 tile; gemm_pack.c
     * lf_pack_*_pairs): a kc block is ceil(kc/2) slots, an odd kc's last pair zero-padded.
     * 2: AMX tiles (ukernel_amx_bf16.c): B as for 1, A as 16-row × 32-k row-major blocks, a kc block
     * zero-padded to a multiple of 32 k (16 slots). lf_k_slots gives the slots of each. */
    int k_pairs;
    /* called by each thread before its first and after its last micro-kernel call of a GEMM (AMX:
     * load the tile configuration, release the tiles), or NULL */
    void (*thread_begin)(void);
    void (*thread_end)(void);
    /* a loop nest of its own for one thread's block of C (AMX: ukernel_amx_bf16.c), run in place
     * of gemm.c's; returns LF_OK, LF_ENOMEM or LF_EINTR. NULL: gemm.c's loop */
    int (*block_loop)(const lf_gemm_block *blk);
};

/* 32-bit slots one packed row (A) or column (B) of a kc block takes: kc (fp32), ceil(kc/2)
 * (bf16 pairs), ceil(kc/32)·16 (AMX); never more than max(kc, 16) */
static inline int64_t lf_k_slots(const lf_dispatch *dp, int64_t kc) {
    return dp->k_pairs == 2 ? (kc + 31) / 32 * 16 : dp->k_pairs ? (kc + 1) / 2 : kc;
}

/* Rows (or columns) a packing buffer needs for blocks of `block` out of an `extent`: whole `tile`-sized
 * slivers, since packing pads the last one to the tile — whatever block is, a multiple of tile or not */
static inline int64_t lf_block_slivers(int64_t block, int64_t extent, int64_t tile) {
    return ((block < extent ? block : extent) + tile - 1) / tile * tile;
}

const lf_dispatch *lf_current(void);

extern const lf_dispatch lf_dispatch_generic;
extern const lf_dispatch lf_dispatch_avx2;
extern const lf_dispatch lf_dispatch_avx512;
extern const lf_dispatch lf_dispatch_avx512_bf16; /* the bf16 pair tile; zero off x86-64 */
extern const lf_dispatch lf_dispatch_amx_bf16;    /* the AMX bf16 tile; zero off x86-64 */

/* A B-operand (K, N) packed once for the tile of dispatch_for(N) — the panels lf_gemm would pack
 * on every call, kept: K blocks of dp->blk->kc (the last one shorter), each ceil(N/NR) slivers of
 * NR×kc, so the panel at (pc, jc) starts at data + pc·nsl·NR + (jc/NR)·NR·kc. */
struct lf_packed_b {
    const lf_dispatch *dp;
    int64_t K, N, nsl;
    lf_view src; /* the view it was packed from (callers check that they pass the same one) */
    float *data;
    size_t bytes;
};

/* Packs b (K, N) as above; LF_ENOMEM / LF_EOVERFLOW / LF_EINVAL (negative sizes). Freed by
 * lf_packed_weight_free (kernels.h). */
int lf_pack_b(lf_view b, int64_t K, int64_t N, lf_packed_b **out);

/* ---- GEMM operands: up to two segments concatenated along K ("augmented K") ----
 * Segment t covers k ∈ [k_begin[t], k_begin[t+1]) and reads element (i, k) as
 *     scale · v.p[i*rs + (k - k_begin)*cs] · mask(off) / (1-p)
 * where mask(off) is the dropout hash of the memory offset off = i*rs + (k-k_begin)*cs
 * (when drop_threshold > 0). For an A-operand i is the row (M) index; for a B-operand the
 * roles swap: the view is indexed (k, j). */
typedef struct {
    lf_view v;
    float scale;
    uint32_t drop_threshold; /* ceil(p·2^24) (dropout_hash.h); 0 = no dropout */
    uint64_t seed;
    /* LF_DT_F32: the elements are v.p's. LF_DT_BF16 / LF_DT_F16: they are h's (uint16_t bits; v.p
     * unused, v.rs and v.cs still the strides), widened to fp32 exactly as they are read (or paired
     * for the bf16 tile, when it has no dropout); such a segment takes no low-rank addend and no kept
     * panels (lf_gemm: LF_EINVAL). */
    lf_dtype dtype;
    const uint16_t *h;
    /* non-NULL: a quantized (4-bit or 8-bit) weight's elements (lf_tview.qw; v.p and h unused): offset off
     * is W's flat element off, dequantized and rounded to dtype as it is packed (lf_qweight_span: SIMD runs of the
     * memory-contiguous direction), then read as a bf16 / fp16 / fp32 segment would be. No dropout,
     * low-rank addend or kept panels (lf_gemm: LF_EINVAL). */
    const lf_qweight *qw;
} lf_segment;

/* 1 if s's elements are fp32 values in memory (v.p): neither 16-bit bits (h) nor quantized codes (qw) */
static inline int lf_seg_f32(const lf_segment *s) { return s->dtype == LF_DT_F32 && !s->qw; }

/* A rank-r term added to segment 0 of a B-operand as it is packed:
 *     b(k, j) += scale · Σ_q L(k, q) · R(q, j),   L (K0, r), R (r, N)
 * — the LoRA forward with W merged on the fly, W + s·B·A, read as Wᵀ + s·Aᵀ·Bᵀ. */
typedef struct {
    lf_view L, R;
    int64_t r; /* ≤ LF_SKINNY_MAX_R */
    float scale;
} lf_lowrank;

typedef struct {
    lf_segment seg[2];
    int nseg;
    int64_t k_split; /* K extent of seg[0]; seg[1] (if any) covers [k_split, K) */
    const lf_lowrank *add; /* B-operands only: added to seg[0] while packing, or NULL */
    /* B-operands only: seg[0]'s panels packed in advance (lf_pack_b), or NULL. Used for every K
     * block lying wholly in it when it was packed for this GEMM's tile and N; else ignored. */
    const lf_packed_b *packed;
} lf_operand;

lf_operand lf_operand_plain(lf_view v, float scale);
/* the one-segment operand reading t (fp32 through v.p, bf16 / fp16 through h, a quantized weight through qw),
 * times scale */
lf_operand lf_operand_typed(lf_tview t, float scale);
/* the operand reading x̃ = x ⊙ mask / (1-p) times scale (x when p == 0): the mask index is the flat
 * offset i·rs + j·cs (i·k + j for the C-contiguous x the LoRA kernels require with dropout) */
lf_operand lf_operand_dropped(lf_tview x, float scale, float p, uint64_t seed);
/* [a | b] along K: a·sa covers [0, k_split), b·sb the rest (each of its own dtype) */
lf_operand lf_operand_concat(lf_tview a, float sa, lf_tview b, float sb, int64_t k_split);
/* an fp32 view as a typed one */
static inline lf_tview lf_tv32(lf_view v) { return (lf_tview){v.p, v.rs, v.cs, LF_DT_F32, NULL}; }
/* lora.c: LF_EINVAL for negative sizes or p outside [0, 1), LF_EOVERFLOW if a product of sizes does not fit */
int lf_lora_check_dims(int64_t n, int64_t k, int64_t m, int64_t r, float p);

/* gemm_pack.c: dst[p*MR + i] = a(i0+i, p0+p) for i < mr (zero for mr <= i < MR = dp->mr), p < kc;
 * next_mr: rows of the sliver packed after this one (at i0 + MR), prefetched meanwhile.
 * With dp->k_pairs, both pack bf16 K-pairs instead (32-bit slots; gemm_pack.c says how). */
void lf_pack_a_sliver(const lf_dispatch *dp, const lf_operand *a, int64_t i0, int64_t mr, int64_t next_mr,
                      int64_t p0, int64_t kc, int MR, float *dst);
/* gemm_pack.c: the kc×nc panel of b at (p0, j0) as NR-wide k-major slivers, sliver q at
 * dst + q·NR·kc: dst[q·NR·kc + p·NR + j] = b(p0+p, j0+q·NR+j), zero past nc */
void lf_pack_b_panel(const lf_dispatch *dp, const lf_operand *b, int64_t j0, int64_t nc, int64_t p0, int64_t kc,
                     int NR, float *dst);

/* 1 if lf_gemm reads a plain row-major A in place (unpacked) with the MR×NR tile when C has N
 * columns, N at most one and a half slivers (a second sliver re-reads A's rows: see lora.c
 * few_tokens): the tile for N has an in-place variant on this ISA. */
int lf_gemm_reads_a_in_place(int64_t N);

/* dst[q·ld + i] = scale · src[i·rs + q] for i < rows, q < cols (the ISA's register transposes) */
void lf_transpose_f32(const float *src, int64_t rs, int64_t rows, int64_t cols, float scale, float *dst, int64_t ld);

/* 1 if lf_gemm multiplies plain operands of the 16-bit dtype dt on a bf16 tile here (vdpbf16ps, or AMX: bf16 on the
 * avx512_bf16 level and up), 0 where it widens them to fp32 while packing (gemm.c dispatch_of) */
int lf_gemm_half_tile(lf_dtype dt);

/* How many row blocks lf_gemm cuts C into for these sizes: each of them packs all of b. */
int lf_gemm_row_splits(lf_pool *pool, int64_t M, int64_t N, int64_t K);

/* C (M,N) = beta·C + a·b (+ bias when beta == 0); a (M,K) and b (K,N) are operands. */
int lf_gemm(lf_pool *pool, int64_t M, int64_t N, int64_t K, const lf_operand *a,
            const lf_operand *b, float beta, const float *bias, float *c, int64_t ldc);

/* One thread's block of an lf_gemm: C[m0:m1, n0:n1] = beta·C + a[m0:m1, :]·b[:, n0:n1] (+ bias when
 * beta == 0), over the whole K; scratch from pool slots of thread tid. */
struct lf_gemm_block {
    lf_pool *pool;
    int tid;
    const lf_dispatch *dp;
    int64_t m0, m1, n0, n1, K;
    const lf_operand *a, *b;
    float beta;
    const float *bias;
    float *c;
    int64_t ldc;
};

/* The token bound to the calling thread (lf_cancel_bind), or NULL: what the pool binds on its
 * workers while they run this thread's job. */
lf_cancel *lf_cancel_bound(void);

/* Thread pool: run fn(ctx, tid, nt) for tid in [0, nt) with nt <= lf_pool_threads(pool);
 * the caller's thread runs tid 0. Returns when all are done. */
typedef void (*lf_task_fn)(void *ctx, int tid, int nt);
void lf_pool_run(lf_pool *pool, int nt, lf_task_fn fn, void *ctx);

/* Per-thread scratch, 64-byte aligned, grow-only, owned by the pool; NULL on failure. */
float *lf_pool_scratch(lf_pool *pool, int tid, int slot, size_t bytes);

/* overflow-checked a*b for non-negative int64 sizes; 0 on overflow */
int lf_mul_ok(int64_t a, int64_t b, int64_t *out);

#endif
