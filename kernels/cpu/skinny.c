/* skinny.c — the rank-r products of LoRA without packing, and the vectorised dropout mask
 * (see skinny_body.h for the loops):
 *   forward   u  = x̃ · Aᵀ        (n, r)   rowdot       reads x once
 *   backward  v  = g · B          (n, r)   rowdot       reads g once
 *             dB = s · gᵀ · u     (m, r)   rank_update  reads g once more
 *             dA = s · vᵀ · x̃     (r, k)   rank_update  reads x once
 * A GEMM would pack x or g first — for N = r that copy costs as much as the arithmetic.
 * Only for dropout-free, row-contiguous big operands and r ≤ LF_SKINNY_MAX_R; otherwise the
 * caller uses lf_gemm. One body, compiled per ISA: AVX-512 (16-wide), AVX2+FMA (8), generic (4)
 * in skinny_avx512.c, skinny_avx2.c, skinny_generic.c; here the ISA-independent drivers. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static const lf_skinny *skinny_for(lf_isa isa);

const lf_skinny *lf_skinny_current(void) { return skinny_for(lf_get_isa()); }

static const lf_skinny *skinny_for(lf_isa isa) {
#if defined(__x86_64__)
    if (isa >= LF_ISA_AVX512) return &lf_skinny_avx512; /* the bf16 levels: AVX-512's rank-r kernels */
    if (isa == LF_ISA_AVX2) return &lf_skinny_avx2;
#else
    (void)isa; /* elsewhere only the generic ISA exists */
#endif
    return &lf_skinny_generic;
}

typedef struct {
    const lf_skinny *k;
    int64_t M, K, R, Rp, P, Q, T, ldc, chunk;
    lf_tview a, w; /* rowdot: the M rows streamed; rank_update: the T rows streamed */
    lf_view s;
    const float *bt;
    float scale;
    float *c;
    int split_p;    /* rank_update: threads split P (else Q) */
    const lf_dots_seg *seg; /* rowdots: the K segments */
    int nseg;
    const float *bias; /* rowdots: added to c, or NULL */
    const lf_mask *wmask; /* rank_update: dropout on w; rowdot: on a; or NULL */
} skinny_job;

/* Each thread's share is run in steps, and a cancelled call (lf_interrupt_pending) stops at the
 * next step, as the GEMM does at each cache block. A step is whole register blocks of the kernel
 * and the kernels loop over them outermost, so the steps do the same work as one call:
 *   rowdot: STEP_ROWS tokens (each streams its row of a once);
 *   rank_update: STEP_ROWS rows of c, or STEP_VECS vectors of its columns (each streams all T);
 *   rowdots: STEP_ROWS outputs (each streams its row of b once). */
#define STEP_ROWS 64
#define STEP_VECS 4

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

static void rowdot_task(void *ctxp, int tid, int nt) {
    (void)nt;
    skinny_job *j = ctxp;
    const int64_t m0 = tid * j->chunk, m1 = min64(m0 + j->chunk, j->M);
    for (int64_t i = m0; i < m1 && !lf_interrupt_pending(); i += STEP_ROWS)
        j->k->rowdot_rows(i, min64(i + STEP_ROWS, m1), j->K, j->R, j->Rp, j->a, j->bt, j->scale, j->c, j->wmask);
}

static void rank_update_task(void *ctxp, int tid, int nt) {
    (void)nt;
    skinny_job *j = ctxp;
    const int64_t len = j->split_p ? j->P : j->Q, step = j->split_p ? STEP_ROWS : STEP_VECS * j->k->vw;
    const int64_t b0 = tid * j->chunk, b1 = min64(b0 + j->chunk, len);
    for (int64_t b = b0; b < b1 && !lf_interrupt_pending(); b += step) {
        const int64_t e = min64(b + step, b1);
        if (j->split_p) j->k->rank_update_block(b, e, 0, j->Q, j->T, j->s, j->w, j->scale, j->c, j->ldc, j->wmask);
        else j->k->rank_update_block(0, j->P, b, e, j->T, j->s, j->w, j->scale, j->c, j->ldc, j->wmask);
    }
}

static void rowdots_task(void *ctxp, int tid, int nt) {
    (void)nt;
    skinny_job *j = ctxp;
    const int64_t j0 = tid * j->chunk, j1 = min64(j0 + j->chunk, j->M);
    for (int64_t o = j0; o < j1 && !lf_interrupt_pending(); o += STEP_ROWS)
        j->k->rowdots_block(o, min64(o + STEP_ROWS, j1), j->T, j->seg, j->nseg, j->scale, j->bias, j->c, j->ldc);
}

int lf_rowdots_ok(int64_t n, lf_view a, lf_view b) { return n <= LF_ROWDOTS_MAX_N && a.cs == 1 && b.cs == 1; }

int lf_rowdots(lf_pool *pool, int64_t n, int64_t M, const lf_dots_seg *seg, int nseg, float scale,
               const float *bias, float *c, int64_t ldc) {
    if (nseg < 1 || nseg > LF_ROWDOTS_MAX_SEG) return LF_EINVAL;
    double K = 0.0;
    for (int s = 0; s < nseg; s++) {
        if (!lf_rowdots_ok(n, seg[s].a, seg[s].b)) return LF_EINVAL;
        K += (double)seg[s].K;
    }
    if (n == 0 || M == 0) return LF_OK;
    /* T = the n rows of a; M = the rows of b, i.e. outputs per row */
    skinny_job job = {.k = skinny_for(lf_get_isa()), .M = M, .T = n, .seg = seg, .nseg = nseg, .scale = scale,
                      .bias = bias, .c = c, .ldc = ldc};
    const int nt = lf_threads_for(pool, 2.0 * (double)n * (double)M * K, (M + 1) / 2);
    job.chunk = ((M + nt - 1) / nt + 1) / 2 * 2;
    lf_pool_run(pool, nt, rowdots_task, &job);
    return lf_interrupt_pending() ? LF_EINTR : LF_OK;
}

int lf_skinny_ok(lf_view big, int64_t r) { return big.cs == 1 && r > 0 && r <= LF_SKINNY_MAX_R; }

int lf_rowdot(lf_pool *pool, int64_t M, int64_t K, int64_t R, lf_tview a, lf_tview b, float scale, float *c,
              const lf_mask *mask) {
    if (M == 0 || R == 0) return LF_OK;
    const lf_skinny *k = skinny_for(lf_get_isa());
    const int64_t Rp = (R + k->vw - 1) / k->vw * k->vw;
    float *bt = calloc((size_t)(K > 0 ? K : 1) * (size_t)Rp, sizeof(float));
    if (!bt) return LF_ENOMEM;
    /* bt (K, Rp): b widened, zero-padded to whole vectors — per call, so for a few tokens this copy (an fp32 Aᵀ: by
     * the register transposes) is most of the rank-r product's work */
    lf_widen_into(b, K, R, 1.0f, bt, Rp);
    skinny_job job = {.k = k, .M = M, .K = K, .R = R, .Rp = Rp, .a = a, .bt = bt, .scale = scale, .c = c,
                      .wmask = mask};
    const int nt = lf_threads_for(pool, 2.0 * (double)M * (double)K * (double)R, (M + 7) / 8);
    job.chunk = ((M + nt - 1) / nt + 7) / 8 * 8;
    lf_pool_run(pool, nt, rowdot_task, &job);
    free(bt);
    return lf_interrupt_pending() ? LF_EINTR : LF_OK;
}

/* c (P, Q < VW) = scale · sᵀ · w through a whole vector: w's rows copied zero-padded to VW
 * floats, c computed VW wide into a scratch block and its first Q columns copied out. Each token
 * is then one vector load on the fast path; read in place, a row shorter than a vector would be
 * built element by element (benchmarks/RESULTS.md, "Where the thresholds come from"). */
static int rank_update_narrow(lf_pool *pool, int64_t P, int64_t Q, int64_t T, lf_view s, lf_tview w, float scale,
                              float *c, int64_t ldc, int64_t vw) {
    float *wp = calloc((size_t)(T > 0 ? T : 1) * (size_t)vw, sizeof(float));
    float *cp = malloc((size_t)P * (size_t)vw * sizeof(float));
    int st = wp && cp ? LF_OK : LF_ENOMEM;
    if (!st) {
        lf_widen_into(w, T, Q, 1.0f, wp, vw);
        st = lf_rank_update(pool, P, vw, T, s, (lf_tview){wp, vw, 1, LF_DT_F32, NULL}, scale, cp, vw, NULL);
    }
    for (int64_t p = 0; !st && p < P; p++) memcpy(c + p * ldc, cp + p * vw, (size_t)Q * sizeof(float));
    free(wp);
    free(cp);
    return st;
}

int lf_rank_update(lf_pool *pool, int64_t P, int64_t Q, int64_t T, lf_view s, lf_tview w, float scale,
                   float *c, int64_t ldc, const lf_mask *wmask) {
    if (P == 0 || Q == 0) return LF_OK;
    const lf_skinny *k = skinny_for(lf_get_isa());
    if (Q < k->vw && !wmask) return rank_update_narrow(pool, P, Q, T, s, w, scale, c, ldc, k->vw);
    skinny_job job = {.k = k, .P = P, .Q = Q, .T = T, .s = s, .w = w, .scale = scale, .c = c, .ldc = ldc,
                      .wmask = wmask};
    const int64_t qchunks = (Q + k->vw - 1) / k->vw;
    job.split_p = qchunks < lf_pool_threads(pool); /* too few column vectors to share: split rows */
    const int nt = lf_threads_for(pool, 2.0 * (double)P * (double)Q * (double)T, job.split_p ? P : qchunks);
    if (job.split_p) {
        job.chunk = (P + nt - 1) / nt;
    } else {
        job.chunk = (qchunks + nt - 1) / nt * k->vw;
    }
    lf_pool_run(pool, nt, rank_update_task, &job);
    return lf_interrupt_pending() ? LF_EINTR : LF_OK;
}
