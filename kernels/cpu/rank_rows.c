/* rank_rows.c — the rank-r term of an output added row block by row block, optionally masked,
 * then the rows rounded to a half-precision output (lf_rank_rows, internal.h):
 *
 *     c[i, :] = round_pre(c[i, :])                        when pre_dt is bf16 / fp16 (kept fp32)
 *     c[i, :] += coef · keep(i, :) ⊙ (v[i, :] · w)        v (n, r), w (r, cols), c (n, cols)
 *     out[i, :] = round_dt(c[i, :])                       when out is given
 *     out[i, :] = round_dt(shift + col ⊙ c[i, :])         with an affine (DoRA: y = b + (μ/ν) ⊙ z̃), c kept
 *
 * with keep(i, j) = lf_dropout_keep(seed, i·cols + j) — dx's dropout part (x̃'s mask, lora.c) —
 * or 1 without a mask. A block of ROWS rows: without a mask the rank-r kernel adds coef · v_blk · w
 * into c's rows directly (skinny's rank_add); with one, t (ROWS, cols) = coef · v_blk · w first
 * (rank_update_block), added into c through the mask. The rows are then rounded while in cache. */
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
    lf_dtype pre_dt, out_dt;
    uint16_t *out;
    const lf_cols_affine *aff;
    atomic_int failed;
} rank_rows_job;

static void rank_rows_run(void *ctxp, int tid, int nt) {
    rank_rows_job *job = ctxp;
    const int64_t blocks = (job->n + ROWS - 1) / ROWS, per = (blocks + nt - 1) / nt;
    const int64_t i0 = tid * per * ROWS, i1 = (tid + 1) * per * ROWS < job->n ? (tid + 1) * per * ROWS : job->n;
    const lf_skinny *sk = lf_skinny_current();
    const int direct = !job->threshold && job->r <= LF_SKINNY_MAX_R; /* no t: rank_add into c */
    float *t = job->r > 0 && !direct ? lf_pool_scratch(job->pool, tid, 2, (size_t)(ROWS * job->cols) * sizeof(float))
                                     : NULL;
    float *row = job->aff && job->out ? lf_pool_scratch(job->pool, tid, 3, (size_t)job->cols * sizeof(float)) : NULL;
    if ((job->r > 0 && !direct && !t) || (job->aff && job->out && !row)) {
        atomic_store(&job->failed, LF_ENOMEM);
        return;
    }
    for (int64_t b0 = i0; b0 < i1; b0 += ROWS) {
        if (lf_interrupt_pending()) return; /* the caller sees the flag and reports LF_EINTR */
        const int64_t nb = i1 - b0 < ROWS ? i1 - b0 : ROWS;
        if (job->pre_dt != LF_DT_F32) lf_round_rows(job->c + b0 * job->ldc, nb, job->cols, job->ldc, job->pre_dt);
        if (job->r > 0 && direct) {
            /* no mask: c[b0 + p, :] += Σ_q ut[q, p] · w[q, :] straight into c by the register-blocked rank_add,
             * ut (r, nb) = coef · v's block transposed; the columns past the last whole vector one by one */
            float ut[LF_SKINNY_MAX_R * ROWS];
            for (int64_t q = 0; q < job->r; q++)
                for (int64_t p = 0; p < nb; p++) ut[q * nb + p] = job->coef * job->v.p[(b0 + p) * job->v.rs + q * job->v.cs];
            const int64_t qv = job->cols / sk->vw * sk->vw;
            float *cb = job->c + b0 * job->ldc;
            sk->rank_add(nb, qv, job->r, (lf_view){ut, 1, nb}, job->w.p, job->w.rs, cb, job->ldc);
            for (int64_t p = 0; p < nb; p++)
                for (int64_t j = qv; j < job->cols; j++)
                    for (int64_t q = 0; q < job->r; q++) cb[p * job->ldc + j] += ut[q * nb + p] * job->w.p[q * job->w.rs + j];
        } else if (job->r > 0) {
            /* t (nb, cols) = coef · Σ_q v[b0+p, q] · w[q, :]: rank_update_block's s (T = r, P = nb) is
             * v's block transposed, s(q, p) = v(b0 + p, q) */
            const lf_view s = {job->v.p + b0 * job->v.rs, job->v.cs, job->v.rs};
            sk->rank_update_block(0, nb, 0, job->cols, job->r, s, lf_tv32(job->w), job->coef, t, job->cols, NULL);
            for (int64_t i = 0; i < nb; i++) {
                const float *ti = t + i * job->cols;
                float *ci = job->c + (b0 + i) * job->ldc;
                sk->dropout_axpy_span(ti, job->cols, (uint64_t)((b0 + i) * job->cols), job->seed, job->threshold, 1.0f,
                                      ci); /* threshold 0 (r > 64 without a mask) keeps every element */
            }
        }
        for (int64_t i = 0; job->out && i < nb; i++) {
            const float *ci = job->c + (b0 + i) * job->ldc;
            if (row) { /* row[j] = shift[j] + col[j] · c[i, j], c left as it is */
                sk->cols_affine(ci, job->cols, job->aff->col, job->aff->shift, row);
                ci = row;
            }
            lf_narrow(ci, job->cols, job->out_dt, job->out + (b0 + i) * job->ldo);
        }
    }
}

int lf_rank_rows(lf_pool *pool, int64_t n, int64_t cols, int64_t r, lf_view v, lf_view w, float coef,
                 const lf_mask *mask, float *c, int64_t ldc, lf_dtype pre_dt, lf_dtype out_dt, uint16_t *out,
                 int64_t ldo, const lf_cols_affine *aff) {
    if (n < 0 || cols < 0 || r < 0 || ldc < cols || (out && ldo < cols) || (r > 0 && w.cs != 1) ||
        (aff && !aff->col))
        return LF_EINVAL;
    if (n == 0 || cols == 0 || (r == 0 && !out && pre_dt == LF_DT_F32)) return LF_OK;
    rank_rows_job job = {.pool = pool, .n = n, .cols = cols, .r = r, .ldc = ldc, .ldo = ldo, .v = v, .w = w,
                         .coef = coef, .threshold = mask ? mask->threshold : 0u, .seed = mask ? mask->seed : 0u,
                         .c = c, .pre_dt = pre_dt, .out_dt = out_dt, .out = out, .aff = aff};
    /* 2·r flops per element for the rank-r term, a few for the mask and the rounding */
    const double flops = (double)n * (double)cols * (double)(2 * r + 4);
    const int nt = lf_threads_for(pool, flops, (n + ROWS - 1) / ROWS);
    lf_pool_run(pool, nt, rank_rows_run, &job);
    if (lf_interrupt_pending()) return LF_EINTR;
    return atomic_load(&job.failed);
}
