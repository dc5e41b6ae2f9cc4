/* rowdots_quant.h — what rowdots_quant.c (the job, x split into chunks, the fp32-FMA kernels and the dispatch)
 * shares with rowdots_quant_pairs.c (the vdpbf16ps kernels on a 4-bit or 8-bit W): the job a kernel reads, a
 * kernel's signature and the store of a row's sum. */
#ifndef LORAFUSE_ROWDOTS_QUANT_H
#define LORAFUSE_ROWDOTS_QUANT_H

#include "internal.h"

/* K per block of the pairs kernels (n · kb bf16 of x, from L2 where they outgrow L1): whole rows of W to 8192
 * elements, each read in one run and summed once (Zen 4, 8 × 4096² NF4, 2 threads: x's block in L1 — 1024 elements
 * at 8 tokens —, x's rows one pointer each: 1.15 ms; blocks of 8192: 1.01; x in chunks: 0.94; int8 1.20 → 0.94) */
#define PAIRS_K_BLOCK 8192

typedef struct {
    int64_t n, M, K, ldc;
    const lf_qweight *w;
    /* x in chunks of 32 elements, token after token within a chunk (chunk c of token i at (c·n + i)·32), so
     * that a kernel reaches every token's chunk from one pointer at fixed offsets (x's own rows, ldxh apart,
     * held one pointer per token: the 8-token kernels spilled them). xs (the fp32 kernels): the 32 elements widened,
     * in the order the kernels' lookups give W's (x_slot; rows_q4b_N: 64 elements a chunk, x_slot64); xt (the pairs
     * kernels): the 32 bf16 elements as they are */
    const float *xs, *bias;
    const uint16_t *xt;
    const uint16_t *xh; /* x's bf16 elements, rows ldxh apart: the 8-bit kernel's last K % 32 */
    int64_t ldxh;
    int pairs;                   /* lf_tunables.decode_pairs with a bf16 x */
    int shuffles;                /* the shuffle kernels take it (lf_rowdots_q4_shuffles) */
    int lanes8;                  /* the fp32 kernels in AVX2's 8 lanes (rows_q4y_N) */
    int steps64;                 /* of those, the bf16 ones 64 elements a step (rows_q4b_N; x_slot64) */
    lf_dtype dt;
    float *c;
} rowdots_q4_job;

/* Rows [j0, j1) of W over elements [p0, p0 + len) of K (whole blocks of a 4-bit W, 32-element steps of an 8-bit one
 * and its tail) for the job's n tokens: c[i, j] = the sum (+ bias[j]), or += it when accumulate. */
typedef void (*rows_q4_fn)(const rowdots_q4_job *job, int64_t j0, int64_t j1, int64_t p0, int64_t len, int accumulate);

/* c[i·ldc + j] = v (+ bias[j]), or += v when accumulate: a kernel's sum for token i and row j */
static inline void rowdots_put(const rowdots_q4_job *job, int64_t i, int64_t j, float v, int accumulate) {
    float *ci = job->c + i * job->ldc + j;
    *ci = accumulate ? *ci + v : v + (job->bias ? job->bias[j] : 0.0f);
}

#if defined(__x86_64__)
/* rowdots_quant_pairs.c: 1 if the shuffle kernels take the job (a 4-bit W, pairs set: a bf16 x on vdpbf16ps) */
int lf_rowdots_q4_shuffles(const rowdots_q4_job *job);
/* the pairs kernel for the job's n tokens (job->pairs): an 8-bit W's, else the shuffle one (job->shuffles) or
 * vpermd's */
rows_q4_fn lf_rowdots_pairs_kernel(const rowdots_q4_job *job);
#endif

#endif
