/* skinny_body.h — the rank-r kernels, written once with GCC vector extensions and compiled
 * once per ISA by skinny_avx512.c, skinny_avx2.c and skinny_generic.c: each defines VW, RU_ROWS,
 * RA_ROWS and HSUM, includes this file and exports its table lf_skinny_<isa> = SKINNY_KERNELS;
 * setup.py compiles each with -ffp-contract=fast and its ISA's flags.
 * They stream the big operand (x or g) once, in place, with no packing: for N = r the packing
 * a GEMM would do costs as much as the arithmetic.
 *
 *   rowdot:      c (M, R) = scale · a (M, K) · bt (K, R)      a rows contiguous (cs = 1)
 *                T rows of a at once: acc[t] += a[t, p] · bt[p, :]  (bt rows stay in L1/L2)
 *   rank_update: c (P, Q) = scale · s (T, P)ᵀ · w (T, Q)      w rows contiguous (cs = 1)
 *                (the worker computes a block [p0, P) × [q0, q1) of it)
 *                for each VW-chunk of Q and RU_ROWS rows p of c, over all T tokens:
 *                acc[p] += s[t, p] · w[t, chunk]  (rows prefetched RU_PREFETCH tokens ahead)
 *   rowdots:     c (n, M) = scale · Σ_seg a (n, K) · b (M, K)ᵀ + bias for a few rows n (decode):
 *                dot products of contiguous rows, b streamed once
 *   dropout_span, dropout_axpy_span: the dropout mask on a contiguous run of elements
 *   cols_affine, cols_dot_scale: DoRA's column scale on a row (rank_rows.c, col_scale.c)
 * Vectors are VW floats; Q / R tails use a masked copy through a small buffer. */
#if !defined(VW) || !defined(RU_ROWS) || !defined(RA_ROWS) || !defined(HSUM) || !defined(F16_TO_F32)
#error "skinny_body.h: define VW, RU_ROWS, RA_ROWS, HSUM and F16_TO_F32 before including it"
#endif

#include "internal.h"
#include "lorafuse/dropout_hash.h"

typedef float VF __attribute__((vector_size(VW * 4), aligned(4), may_alias));
typedef uint16_t VH __attribute__((vector_size(VW * 2), aligned(2), may_alias)); /* VW half elements */
typedef uint32_t VU __attribute__((vector_size(VW * 4)));

/* VW bf16 elements at h, widened: the bits shifted into the top half of each lane */
static inline __attribute__((always_inline)) VF widen_bf16(const uint16_t *h) {
    return (VF)(__builtin_convertvector(*(const VH *)h, VU) << 16);
}

/* VW floats from p, or the first n of them (rest zero) when n < VW. Full vectors are plain
 * unaligned vector loads through the may_alias vector type. */
static inline __attribute__((always_inline)) VF vload(const float *p, int64_t n) {
    if (n >= VW) return *(const VF *)p;
    VF v = {0};
    for (int64_t l = 0; l < n; l++) v[l] = p[l];
    return v;
}

static inline __attribute__((always_inline)) void vstore(float *p, VF v, int64_t n) {
    if (n >= VW) {
        *(VF *)p = v;
        return;
    }
    for (int64_t l = 0; l < n; l++) p[l] = v[l];
}

#define ROWS 8 /* tokens per step: 8 independent accumulators hide the FMA latency */

static void dropout_span(const float *src, int64_t n, uint64_t off0, uint64_t seed, uint32_t thr, float scale,
                         float *dst);

/* element p of a row of a, of dtype DT (a constant where inlined), as fp32: fp32 read, bf16 shifted, fp16
 * converted (F16_TO_F32: the ISA file's scalar conversion) */
#define A_AT(DT, row, p)                                                                                   \
    ((DT) == LF_DT_F32 ? ((const float *)(row))[p]                                                         \
     : (DT) == LF_DT_BF16 ? lf_bf16_to_f32(((const uint16_t *)(row))[p]) : F16_TO_F32(((const uint16_t *)(row))[p]))

/* rows [m0, m1) of c = scale · ã · bt, VW columns of c at a time (bt is K × Rp, Rp = R padded to VW);
 * a's elements of dtype DT, each broadcast against a vector of bt; ã = a, or a dropped by mask (index:
 * the flat offset i·a.rs + p, x̃ of a C-contiguous x) — then, and for bf16, VW elements of each row are
 * made fp32 (widened, masked) into a small block first */
static inline __attribute__((always_inline)) void rowdot_core(const lf_dtype DT, int64_t m0, int64_t m1, int64_t K,
                                                              int64_t R, int64_t Rp, lf_tview a, const float *bt,
                                                              float scale, float *c, const lf_mask *mask) {
    const int64_t esize = DT == LF_DT_F32 ? 4 : 2;
    for (int64_t j0 = 0; j0 < R; j0 += VW) {
        for (int64_t i0 = m0; i0 < m1; i0 += ROWS) {
            const int64_t rows = m1 - i0 < ROWS ? m1 - i0 : ROWS;
            const char *ar[ROWS];
            for (int t = 0; t < ROWS; t++) ar[t] = (const char *)a.p + (i0 + (t < rows ? t : 0)) * a.rs * esize;
            VF acc[ROWS];
            for (int t = 0; t < ROWS; t++) acc[t] = (VF){0};
            const float *b = bt + j0;
            int64_t p = 0;
            if (DT == LF_DT_BF16 || mask) /* VW k at a time: each row's next VW elements made fp32 first */
                for (; p + VW <= K; p += VW) {
                    float wide[ROWS][VW] __attribute__((aligned(64)));
#pragma GCC unroll 8
                    for (int t = 0; t < ROWS; t++) {
                        if (DT == LF_DT_BF16) *(VF *)wide[t] = widen_bf16((const uint16_t *)ar[t] + p);
                        else for (int q = 0; q < VW; q++) wide[t][q] = A_AT(DT, ar[t], p + q);
                        if (mask) { /* x̃: the row's flat offsets (i0 + t)·rs + p… (row 0's again past `rows`) */
                            const int64_t off = (i0 + (t < rows ? t : 0)) * a.rs + p;
                            dropout_span(wide[t], VW, (uint64_t)off, mask->seed, mask->threshold, mask->scale, wide[t]);
                        }
                    }
                    for (int q = 0; q < VW; q++, b += Rp) {
                        const VF bv = *(const VF *)b;
#pragma GCC unroll 8
                        for (int t = 0; t < ROWS; t++) acc[t] += wide[t][q] * bv;
                    }
                }
            for (; p < K; p++, b += Rp) {
                const VF bv = *(const VF *)b; /* bt is zero-padded to Rp: a full vector is there */
#pragma GCC unroll 8
                for (int t = 0; t < ROWS; t++) {
                    float e = A_AT(DT, ar[t], p);
                    if (mask) {
                        const int64_t off = (i0 + (t < rows ? t : 0)) * a.rs + p;
                        e = lf_dropout_keep(mask->seed, (uint64_t)off, mask->threshold) ? e * mask->scale : 0.0f;
                    }
                    acc[t] += e * bv;
                }
            }
            for (int64_t t = 0; t < rows; t++)
                vstore(c + (i0 + t) * R + j0, acc[t] * scale, R - j0);
        }
    }
}

/* rowdot_core for a's dtype (rows contiguous: a.cs == 1) and mask (NULL: none) */
static void rowdot_rows(int64_t m0, int64_t m1, int64_t K, int64_t R, int64_t Rp, lf_tview a, const float *bt,
                        float scale, float *c, const lf_mask *mask) {
    if (a.dtype == LF_DT_BF16) rowdot_core(LF_DT_BF16, m0, m1, K, R, Rp, a, bt, scale, c, mask);
    else if (a.dtype == LF_DT_F16) rowdot_core(LF_DT_F16, m0, m1, K, R, Rp, a, bt, scale, c, mask);
    else if (mask) rowdot_core(LF_DT_F32, m0, m1, K, R, Rp, a, bt, scale, c, mask);
    else rowdot_core(LF_DT_F32, m0, m1, K, R, Rp, a, bt, scale, c, NULL); /* the plain fp32 loop, unmasked */
}


/* w̃[t, j : j+width] as a vector: w (of dtype DT, widened), or w dropped by wmask (mask index = flat
 * offset t·w.rs + j) */
static inline __attribute__((always_inline)) VF w_row(const lf_dtype DT, lf_tview w, int64_t t, int64_t j,
                                                      int64_t width, const lf_mask *wmask);

/* Tokens ahead that ru_tokens prefetches. Its w (x in dA = s·vᵀ·x) is read one vector per row,
 * rows k floats apart, which the hardware prefetchers do not follow across pages (benchmarks/RESULTS.md,
 * "Where the thresholds come from"). */
#define RU_PREFETCH 16

/* acc[i] += s[t, p+i] · w̃[t, j:j+VW] over all T tokens for NB rows of c at once; s's columns at
 * sp + off(i): i·cs when cs is given (≥ 1), else scol[i]. Inlined with constants (NB; cs = 1,
 * a whole vector and no mask on the fast path) so that the accumulators stay in registers and
 * the per-token branches fold away. */
static inline __attribute__((always_inline)) void ru_tokens(
    const lf_dtype DT, const int NB, const int64_t cs, const int64_t *scol, const float *sp, int64_t srs, int64_t T,
    lf_tview w, int64_t j, const int64_t width, const lf_mask *wmask, VF *acc) {
    const int64_t esize = DT == LF_DT_F32 ? 4 : 2;
    for (int64_t t = 0; t < T; t++) {
        if (t + RU_PREFETCH < T) { /* rows of w and s a row stride apart: a new page each token */
            __builtin_prefetch((const char *)w.p + ((t + RU_PREFETCH) * w.rs + j) * esize, 0, 3);
            __builtin_prefetch(sp + (t + RU_PREFETCH) * srs, 0, 3);
        }
        const VF wv = w_row(DT, w, t, j, width, wmask);
        const float *st = sp + t * srs;
#pragma GCC unroll 16
        for (int i = 0; i < NB; i++) acc[i] += st[cs ? i * cs : scol[i]] * wv;
    }
}

/* block [p0, P) × [q0, q1) of c = scale · sᵀ · w̃, c row stride ldc; w̃ = w, or the dropped
 * w ⊙ mask · wmask->scale when wmask (x̃ regenerated as it is read).
 * Register-blocked outer products: RU_ROWS rows of c × one vector of columns accumulate over
 * all T tokens in registers,
 *     acc[i] += s[t, p+i] · w̃[t, j:j+VW]     (one load of w̃ and RU_ROWS broadcasts per token),
 * so c is written once and the RU_ROWS chains are independent. Blocks of RU_ROWS or RU_ROWS/2
 * rows of row-contiguous s (s.cs = 1: v, g) over a whole vector of undropped w take a fast path
 * with constant offsets; any other block reads through per-row offsets and duplicates its
 * first row past P (computed, never stored). */
static inline __attribute__((always_inline)) void rank_update_core(const lf_dtype DT, int64_t p0, int64_t P,
                                                                   int64_t q0, int64_t q1, int64_t T, lf_view s,
                                                                   lf_tview w, float scale, float *c, int64_t ldc,
                                                                   const lf_mask *wmask) {
    for (int64_t j = q0; j < q1; j += VW) {
        const int64_t width = q1 - j < VW ? q1 - j : VW;
        for (int64_t p = p0; p < P; p += RU_ROWS) {
            const int64_t rows = P - p < RU_ROWS ? P - p : RU_ROWS;
            const float *sp = s.p + p * s.cs;
            VF acc[RU_ROWS];
#pragma GCC unroll 16
            for (int i = 0; i < RU_ROWS; i++) acc[i] = (VF){0};
            const int fast = s.cs == 1 && width == VW && !wmask;
            if (fast && rows == RU_ROWS) {
                ru_tokens(DT, RU_ROWS, 1, NULL, sp, s.rs, T, w, j, VW, NULL, acc);
            } else if (fast && rows == RU_ROWS / 2) {
                ru_tokens(DT, RU_ROWS / 2, 1, NULL, sp, s.rs, T, w, j, VW, NULL, acc);
            } else {
                int64_t scol[RU_ROWS]; /* column offsets; past `rows`: the block's first row again */
                for (int i = 0; i < RU_ROWS; i++) scol[i] = (i < rows ? i : 0) * s.cs;
                ru_tokens(DT, RU_ROWS, 0, scol, sp, s.rs, T, w, j, width, wmask, acc);
            }
#pragma GCC unroll 16
            for (int i = 0; i < RU_ROWS; i++)
                if (i < rows) vstore(c + (p + i) * ldc + j, acc[i] * scale, width);
        }
    }
}

/* rank_update_core for w's dtype: fp32, or a half w (x̃ or g of a bf16 / fp16 base) widened as it is read */
static void rank_update_block(int64_t p0, int64_t P, int64_t q0, int64_t q1, int64_t T, lf_view s, lf_tview w,
                              float scale, float *c, int64_t ldc, const lf_mask *wmask) {
    if (w.dtype == LF_DT_BF16) rank_update_core(LF_DT_BF16, p0, P, q0, q1, T, s, w, scale, c, ldc, wmask);
    else if (w.dtype == LF_DT_F16) rank_update_core(LF_DT_F16, p0, P, q0, q1, T, s, w, scale, c, ldc, wmask);
    else rank_update_core(LF_DT_F32, p0, P, q0, q1, T, s, w, scale, c, ldc, wmask);
}

static inline __attribute__((always_inline)) VF w_row(const lf_dtype DT, lf_tview w, int64_t t, int64_t j,
                                                      int64_t width, const lf_mask *wmask) {
    const int64_t off = t * w.rs + j;
    if (DT == LF_DT_F32 && !wmask) return vload((const float *)w.p + off, width);
    float run[VW];
    const float *src = (const float *)w.p + off;
    if (DT == LF_DT_BF16 && width == VW) {
        const VF v = widen_bf16((const uint16_t *)w.p + off);
        if (!wmask) return v;
        vstore(run, v, VW);
        src = run;
    } else if (DT != LF_DT_F32) {
        for (int64_t l = 0; l < width; l++) run[l] = A_AT(DT, (const uint16_t *)w.p + off, l);
        if (!wmask) return vload(run, width);
        src = run;
    }
    dropout_span(src, width, (uint64_t)off, wmask->seed, wmask->threshold, wmask->scale, run);
    return vload(run, width);
}

/* dst[j] = keep(off0 + j) ? src[j] · scale : 0 — dropout on a contiguous run (x̃ rows);
 * the hash vectorises (64-bit lane multiplies) under the ISA's target. */
static void dropout_span(const float *src, int64_t n, uint64_t off0, uint64_t seed, uint32_t thr, float scale,
                         float *dst) {
    for (int64_t j = 0; j < n; j++) {
        const uint32_t h = (uint32_t)(lf_splitmix64(seed ^ (off0 + (uint64_t)j)) >> 40);
        dst[j] = h >= thr ? src[j] * scale : 0.0f;
    }
}

/* dst[j] += keep(off0 + j) ? coef · t[j] : 0 — the dropout part of dx, one row at a time */
static void dropout_axpy_span(const float *t, int64_t n, uint64_t off0, uint64_t seed, uint32_t thr, float coef,
                              float *dst) {
    for (int64_t j = 0; j < n; j++) {
        const uint32_t h = (uint32_t)(lf_splitmix64(seed ^ (off0 + (uint64_t)j)) >> 40);
        dst[j] += h >= thr ? coef * t[j] : 0.0f;
    }
}

/* dst[j] = (shift ? shift[j] : 0) + col[j] · src[j] — DoRA's y = b + (μ/ν) ⊙ z̃, one row at a time */
static void cols_affine(const float *src, int64_t n, const float *col, const float *shift, float *dst) {
    if (shift)
        for (int64_t j = 0; j < n; j++) dst[j] = shift[j] + col[j] * src[j];
    else
        for (int64_t j = 0; j < n; j++) dst[j] = col[j] * src[j];
}

/* dc[j] += g[j] · z[j] (z NULL: not), then g[j] = g[j] · col[j] — DoRA's Σ_i g ⊙ z̃ and g' = g ⊙ c on one row */
static void cols_dot_scale(float *g, int64_t n, const float *z, const float *col, float *dc) {
    if (z)
        for (int64_t j = 0; j < n; j++) dc[j] += g[j] * z[j];
    for (int64_t j = 0; j < n; j++) g[j] *= col[j];
}

/* acc0[i] += a_i · b0 and acc1[i] += a_i · b1 (elementwise, summed later) over one K segment:
 * rows i < n of a against two contiguous rows b0, b1 of b; the K tail as zero-filled vectors */
static inline __attribute__((always_inline)) void dots_segment(
    const int n, int64_t K, lf_view a, const float *b0, const float *b1, VF *acc0, VF *acc1) {
    const int64_t kfull = K / VW * VW;
    for (int64_t p = 0; p < kfull; p += VW) {
        const VF w0 = *(const VF *)(b0 + p), w1 = *(const VF *)(b1 + p);
#pragma GCC unroll 8
        for (int i = 0; i < n; i++) {
            const VF xv = *(const VF *)(a.p + i * a.rs + p);
            acc0[i] += xv * w0;
            acc1[i] += xv * w1;
        }
    }
    if (kfull < K) {
        const VF w0 = vload(b0 + kfull, K - kfull), w1 = vload(b1 + kfull, K - kfull);
#pragma GCC unroll 8
        for (int i = 0; i < n; i++) {
            const VF xv = vload(a.p + i * a.rs + kfull, K - kfull);
            acc0[i] += xv * w0;
            acc1[i] += xv * w1;
        }
    }
}

/* columns j ∈ [j0, j1) of c (n, ·) = scale · Σ_seg a_seg (n, K_seg) · b_seg (·, K_seg)ᵀ + bias
 * for n ≤ LF_ROWDOTS_MAX_N: each output is a dot product of contiguous rows over the
 * concatenated K of the segments (the LoRA decode forward: [x | s·u] · [W | B]ᵀ), and b (W)
 * is streamed once, in place — packing it would cost more than the few rows of arithmetic.
 * The body is inlined with a constant n (1…8) so that the 2·n accumulators stay in registers. */
static inline __attribute__((always_inline)) void rowdots_n(
    const int n, int64_t j0, int64_t j1, const lf_dots_seg *seg, int nseg, float scale, const float *bias,
    float *c, int64_t ldc) {
    for (int64_t j = j0; j < j1; j += 2) {
        const int two = j + 1 < j1;
        VF acc0[LF_ROWDOTS_MAX_N], acc1[LF_ROWDOTS_MAX_N];
#pragma GCC unroll 8
        for (int i = 0; i < n; i++) acc0[i] = acc1[i] = (VF){0};
        for (int s = 0; s < nseg; s++) {
            const lf_view b = seg[s].b;
            dots_segment(n, seg[s].K, seg[s].a, b.p + j * b.rs, b.p + (j + two) * b.rs, acc0, acc1);
        }
        const float b0 = bias ? bias[j] : 0.0f, b1 = bias && two ? bias[j + 1] : 0.0f;
#pragma GCC unroll 8
        for (int i = 0; i < n; i++) {
            float *ci = c + i * ldc + j;
            ci[0] = scale * HSUM(acc0[i]) + b0;
            if (two) ci[1] = scale * HSUM(acc1[i]) + b1;
        }
    }
}

static void rowdots_block(int64_t j0, int64_t j1, int64_t n, const lf_dots_seg *seg, int nseg, float scale,
                          const float *bias, float *c, int64_t ldc) {
    switch (n) {
#define ROWDOTS_CASE(N) \
    case N: rowdots_n(N, j0, j1, seg, nseg, scale, bias, c, ldc); break;
        ROWDOTS_CASE(1) ROWDOTS_CASE(2) ROWDOTS_CASE(3) ROWDOTS_CASE(4)
        ROWDOTS_CASE(5) ROWDOTS_CASE(6) ROWDOTS_CASE(7) ROWDOTS_CASE(8)
#undef ROWDOTS_CASE
    default: break; /* n > LF_ROWDOTS_MAX_N is refused by lf_rowdots */
    }
}

/* c[p·ldc + j] += Σ_q a(p, q) · bt[q·ldb + j] for p < P, j < Q, q < R: a rank-R update of a
 * row-major block whose width Q is a whole number of vectors (a packed B sliver; bt zero-padded
 * to it) — the W + s·B·A addend of the inference forward, added to each packed panel.
 * Register-blocked: RA_ROWS rows × two vectors accumulate over q in registers,
 *     acc[i][v] += a(p+i, q) · bt[q, j + v·VW]      (2 loads of bt, RA_ROWS broadcasts per q),
 * and a(p..p+RA_ROWS, q) is contiguous when a.rs = 1 (a = Aᵀ: the rows of A); then c += acc.
 * Other blocks (a last short one, one vector left, a.rs ≠ 1) take the plain loop. */
static void rank_add(int64_t P, int64_t Q, int64_t R, lf_view a, const float *bt, int64_t ldb, float *c,
                     int64_t ldc) {
    for (int64_t j = 0; j < Q; j += 2 * VW) {
        for (int64_t p = 0; p < P; p += RA_ROWS) {
            if (a.rs == 1 && P - p >= RA_ROWS && Q - j >= 2 * VW) {
                VF acc[RA_ROWS][2];
#pragma GCC unroll 8
                for (int i = 0; i < RA_ROWS; i++) acc[i][0] = acc[i][1] = (VF){0};
                for (int64_t q = 0; q < R; q++) {
                    const VF b0 = *(const VF *)(bt + q * ldb + j), b1 = *(const VF *)(bt + q * ldb + j + VW);
                    const float *aq = a.p + p + q * a.cs;
#pragma GCC unroll 8
                    for (int i = 0; i < RA_ROWS; i++) {
                        acc[i][0] += aq[i] * b0;
                        acc[i][1] += aq[i] * b1;
                    }
                }
#pragma GCC unroll 8
                for (int i = 0; i < RA_ROWS; i++) {
                    *(VF *)(c + (p + i) * ldc + j) += acc[i][0];
                    *(VF *)(c + (p + i) * ldc + j + VW) += acc[i][1];
                }
                continue;
            }
            const int64_t p1 = P - p < RA_ROWS ? P : p + RA_ROWS;
            for (int64_t jj = j; jj < j + 2 * VW && jj < Q; jj += VW)
                for (int64_t pp = p; pp < p1; pp++) {
                    VF acc = *(const VF *)(c + pp * ldc + jj);
                    for (int64_t q = 0; q < R; q++) acc += a.p[pp * a.rs + q * a.cs] * *(const VF *)(bt + q * ldb + jj);
                    *(VF *)(c + pp * ldc + jj) = acc;
                }
        }
    }
}

/* the kernels above as a table initializer: const lf_skinny lf_skinny_<isa> = SKINNY_KERNELS; */
#define SKINNY_KERNELS                             \
    {                                              \
        .rank_add = rank_add,                      \
        .rowdots_block = rowdots_block,            \
        .vw = VW,                                  \
        .dropout_span = dropout_span,              \
        .dropout_axpy_span = dropout_axpy_span,    \
        .cols_affine = cols_affine,                \
        .cols_dot_scale = cols_dot_scale,          \
        .rowdot_rows = rowdot_rows,                \
        .rank_update_block = rank_update_block,    \
    }
