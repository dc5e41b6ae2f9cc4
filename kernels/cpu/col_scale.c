/* col_scale.c — DoRA's pass over the upstream gradient on a half base (lf_scale_cols, internal.h): with
 * c = μ/ν (m) the columns' scale and z̃ (n, m) the forward's fp32 sum before it (lora_half.c),
 *
 *     gh[i, j] = round_dt(g[i, j] · c[j])      g' = g ⊙ c rounded to the base's dtype: the base product's g
 *                                             (gh NULL: not formed)
 *     dc[j]    = Σ_i g[i, j] · z̃[i, j]          the magnitude's gradient times ν (dμ_j = dc_j / ν_j)
 *
 * g (bf16 / fp16, any strides) read once, each row widened, then the ISA's cols_dot_scale (skinny_body.h) and
 * narrowed. Rows split over the threads in contiguous blocks; each thread sums its rows into its own partial of
 * dc (part + tid·m), the partials added in thread order after (the same sums for one thread count). */
#include <stdatomic.h>
#include <stdlib.h>

#include "internal.h"

typedef struct {
    lf_pool *pool;
    int64_t n, m, ldz;
    lf_tview g;
    const float *c, *z;
    lf_dtype dt;
    uint16_t *gh;
    float *part; /* nt × m, or NULL without dc */
    atomic_int failed;
} scale_cols_job;

static void scale_cols_run(void *ctxp, int tid, int nt) {
    scale_cols_job *job = ctxp;
    const int64_t per = (job->n + nt - 1) / nt, i0 = tid * per, i1 = i0 + per < job->n ? i0 + per : job->n;
    const int64_t m = job->m;
    float *row = lf_pool_scratch(job->pool, tid, 0, (size_t)(m > 0 ? m : 1) * sizeof(float));
    float *dc = job->part ? job->part + tid * m : NULL;
    const lf_skinny *sk = lf_skinny_current();
    if (!row) {
        atomic_store(&job->failed, LF_ENOMEM);
        return;
    }
    for (int64_t j = 0; dc && j < m; j++) dc[j] = 0.0f;
    for (int64_t i = i0; i < i1; i++) {
        if (lf_interrupt_pending()) return; /* the caller sees the flag and reports LF_EINTR */
        const lf_tview gi = {(const uint16_t *)job->g.p + i * job->g.rs, job->g.rs, job->g.cs, job->g.dtype, NULL};
        lf_widen_into(gi, 1, m, 1.0f, row, m);
        sk->cols_dot_scale(row, m, dc ? job->z + i * job->ldz : NULL, job->c, dc);
        if (job->gh) lf_narrow(row, m, job->dt, job->gh + i * m);
    }
}

int lf_scale_cols(lf_pool *pool, int64_t n, int64_t m, lf_tview g, const float *c, const float *z, int64_t ldz,
                  lf_dtype dt, uint16_t *gh, float *dc) {
    if (n < 0 || m < 0 || (dc && (ldz < m || !z))) return LF_EINVAL;
    for (int64_t j = 0; dc && j < m; j++) dc[j] = 0.0f;
    if (n == 0 || m == 0) return LF_OK;
    /* a few flops per element: rows in blocks of at least 16 */
    const int nt = lf_threads_for(pool, 4.0 * (double)n * (double)m, (n + 15) / 16);
    float *part = dc ? malloc((size_t)nt * (size_t)m * sizeof(float)) : NULL;
    if (dc && !part) return LF_ENOMEM;
    scale_cols_job job = {.pool = pool, .n = n, .m = m, .ldz = ldz, .g = g, .c = c, .z = z, .dt = dt, .gh = gh,
                          .part = part};
    lf_pool_run(pool, nt, scale_cols_run, &job);
    int st = lf_interrupt_pending() ? LF_EINTR : atomic_load(&job.failed);
    for (int t = 0; !st && dc && t < nt; t++)
        for (int64_t j = 0; j < m; j++) dc[j] += part[t * m + j];
    free(part);
    return st;
}
