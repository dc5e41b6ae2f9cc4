/* rank_rows.c — the rank-r term of an output added row block by row block, optionally masked,
 * then the rows rounded to a half-precision output (lf_rank_rows, internal.h):
 *
 *     c[i, :] += coef · keep(i, :) ⊙ (v[i, :] · w)        v (n, r), w (r, cols), c (n, cols)
 *     out[i, :] = round_dt(c[i, :])                       when out is given
 *
 * with keep(i, j) = lf_dropout_keep(seed, i·cols + j) — dx's dropout part (x̃'s mask, lora.c) —
 * or 1 without a mask. A block of ROWS rows: t (ROWS, cols) = coef · v_blk · w on the rank-r
 * kernel (skinny.c's rank_update_block), added into c's rows through the mask, which are then
 * rounded while they are in cache. */
#include <stdatomic.h>

#include "internal.h"
#include "lorafuse/dropout_hash.h"

/* Rows per block: t is ROWS × cols floats of a thread's scratch. */
#define ROWS 16

typedef struct {
    lf_pool *pool;
    int64_t n, cols, r, ldc, ldo;
    lf_view v, w;
    float coef;
    uint32_t threshold; /* 0: keep every element */
    uint64_t seed;
    float *c;
    lf_dtype out_dt;
    uint16_t *out;
    atomic_int failed;
} rank_rows_job;

static void rank_rows_run(void *ctxp, int tid, int nt) {
    rank_rows_job *job = ctxp;
    const int64_t blocks = (job->n + ROWS - 1) / ROWS, per = (blocks + nt - 1) / nt;
    const int64_t i0 = tid * per * ROWS, i1 = (tid + 1) * per * ROWS < job->n ? (tid + 1) * per * ROWS : job->n;
    const lf_skinny *sk = lf_skinny_current();
    float *t = job->r > 0 ? lf_pool_scratch(job->pool, tid, 2, (size_t)(ROWS * job->cols) * sizeof(float)) : NULL;
    if (job->r > 0 && !t) {
        atomic_store(&job->failed, LF_ENOMEM);
        return;
    }
    for (int64_t b0 = i0; b0 < i1; b0 += ROWS) {
        if (lf_interrupt_pending()) return; /* the caller sees the flag and reports LF_EINTR */
        const int64_t nb = i1 - b0 < ROWS ? i1 - b0 : ROWS;
        if (job->r > 0) {
            /* t (nb, cols) = coef · Σ_q v[b0+p, q] · w[q, :]: rank_update_block's s (T = r, P = nb) is
             * v's block transposed, s(q, p) = v(b0 + p, q) */
            const lf_view s = {job->v.p + b0 * job->v.rs, job->v.cs, job->v.rs};
            sk->rank_update_block(0, nb, 0, job->cols, job->r, s, lf_tv32(job->w), job->coef, t, job->cols, NULL);
            for (int64_t i = 0; i < nb; i++) {
                const float *ti = t + i * job->cols;
                float *ci = job->c + (b0 + i) * job->ldc;
                if (job->threshold) /* the mask's hash per element: only where there is one */
                    sk->dropout_axpy_span(ti, job->cols, (uint64_t)((b0 + i) * job->cols), job->seed, job->threshold,
                                          1.0f, ci);
                else
                    for (int64_t j = 0; j < job->cols; j++) ci[j] += ti[j];
            }
        }
        for (int64_t i = 0; job->out && i < nb; i++)
            lf_narrow(job->c + (b0 + i) * job->ldc, job->cols, job->out_dt, job->out + (b0 + i) * job->ldo);
    }
}

int lf_rank_rows(lf_pool *pool, int64_t n, int64_t cols, int64_t r, lf_view v, lf_view w, float coef,
                 const lf_mask *mask, float *c, int64_t ldc, lf_dtype out_dt, uint16_t *out, int64_t ldo) {
    if (n < 0 || cols < 0 || r < 0 || ldc < cols || (out && ldo < cols) || (r > 0 && w.cs != 1)) return LF_EINVAL;
    if (n == 0 || cols == 0 || (r == 0 && !out)) return LF_OK;
    rank_rows_job job = {.pool = pool, .n = n, .cols = cols, .r = r, .ldc = ldc, .ldo = ldo, .v = v, .w = w,
                         .coef = coef, .threshold = mask ? mask->threshold : 0u, .seed = mask ? mask->seed : 0u,
                         .c = c, .out_dt = out_dt, .out = out};
    /* 2·r flops per element for the rank-r term, a few for the mask and the rounding */
    const double flops = (double)n * (double)cols * (double)(2 * r + 4);
    const int nt = lf_threads_for(pool, flops, (n + ROWS - 1) / ROWS);
    lf_pool_run(pool, nt, rank_rows_run, &job);
    if (lf_interrupt_pending()) return LF_EINTR;
    return atomic_load(&job.failed);
}
