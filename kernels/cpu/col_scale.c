/* col_scale.c — DoRA's pass over the upstream gradient (lf_scale_cols, internal.h; lf_dora_grad_f32, kernels.h):
 * with c = μ/ν (m) the columns' scale and z̃ (n, m) the forward's fp32 sum before it (lora_half.c; the fp32
 * layer's z̃ from python/lorafuse/dora.py),
 *
 *     gh[i, j] = round_dt(g[i, j] · c[j])      g' = g ⊙ c in dt: rounded to the base's half dtype (the base
 *                                             product's g), or float32 as it is (gh NULL: not formed)
 *     dc[j]    = Σ_i g[i, j] · z̃[i, j]          the magnitude's gradient times ν (dμ_j = dc_j / ν_j)
 *
 * g (float32, bf16 or fp16, any strides) read once: each row widened (copied, for float32) into the row of a
 * float32 gh or a scratch, then the ISA's cols_dot_scale (skinny_body.h), and narrowed into a half gh. Rows
 * split over the threads in contiguous blocks; each thread sums its rows into its own partial of dc
 * (part + tid·m), the partials added in thread order after (the same sums for one thread count). */
#include <stdatomic.h>
#include <stdlib.h>

#include "internal.h"

typedef struct {
    lf_pool *pool;
    int64_t n, m, ldz;
    lf_tview g;
    const float *c, *z;
    lf_dtype dt;
    void *gh; /* (n, m) C-contiguous in dt, or NULL */
    float *part; /* nt × m, or NULL without dc */
    atomic_int failed;
} scale_cols_job;

static void scale_cols_run(void *ctxp, int tid, int nt) {
    scale_cols_job *job = ctxp;
    const int64_t per = (job->n + nt - 1) / nt, i0 = tid * per, i1 = i0 + per < job->n ? i0 + per : job->n;
    const int64_t m = job->m;
    const int f32_out = job->gh && job->dt == LF_DT_F32; /* each row formed in place in gh */
    float *row = f32_out ? NULL : lf_pool_scratch(job->pool, tid, 0, (size_t)(m > 0 ? m : 1) * sizeof(float));
    float *dc = job->part ? job->part + tid * m : NULL;
    const lf_skinny *sk = lf_skinny_current();
    const size_t esize = job->g.dtype == LF_DT_F32 ? sizeof(float) : sizeof(uint16_t);
    if (!f32_out && !row) {
        atomic_store(&job->failed, LF_ENOMEM);
        return;
    }
    for (int64_t j = 0; dc && j < m; j++) dc[j] = 0.0f;
    for (int64_t i = i0; i < i1; i++) {
        if (lf_interrupt_pending()) return; /* the caller sees the flag and reports LF_EINTR */
        const lf_tview gi = {(const char *)job->g.p + (size_t)(i * job->g.rs) * esize, job->g.rs, job->g.cs,
                             job->g.dtype, NULL};
        float *ri = f32_out ? (float *)job->gh + i * m : row;
        lf_widen_into(gi, 1, m, 1.0f, ri, m);
        sk->cols_dot_scale(ri, m, dc ? job->z + i * job->ldz : NULL, job->c, dc);
        if (job->gh && !f32_out) lf_narrow(row, m, job->dt, (uint16_t *)job->gh + i * m);
    }
}

int lf_scale_cols(lf_pool *pool, int64_t n, int64_t m, lf_tview g, const float *c, const float *z, int64_t ldz,
                  lf_dtype dt, void *gh, float *dc) {
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

int lf_dora_grad_f32(lf_pool *pool, int64_t n, int64_t m, lf_view g, const float *c, const float *z, int64_t ldz,
                     float *out, float *dc) {
    if (!pool || !c || !out) return LF_EINVAL;
    const lf_tview gv = {g.p, g.rs, g.cs, LF_DT_F32, NULL};
    return lf_scale_cols(pool, n, m, gv, c, z, ldz, LF_DT_F32, out, dc);
}
