/* lorafuse — the dropout mask, shared by the CPU (gcc, C11) and CUDA (nvcc) kernels.
 *
 * mask(i, j) for an n×k input (leading dims flattened, row-major, element index idx = i·k + j):
 *     keep  iff  (splitmix64(seed ^ idx) >> 40) >= ceil(p · 2^24)
 *     value =   keep ? 1/(1-p) : 0
 * p is a float (the kernels' C type): callers holding a double round it to float first, so that every
 * implementation derives the same integer threshold.
 * splitmix64 is Vigna's finaliser applied to (x + golden gamma). The top 24 bits of the hash are
 * compared with an integer threshold, so the decision is exact integer arithmetic: the CPU and the
 * GPU (and the pure-Python copy in lorafuse/cuda.py, used by the tests) agree bit for bit.
 * p·2^24 is exact in double for every float p, so ceil() of it is the same everywhere.
 * The 1/(1-p) scale is computed in float (lf_dropout_scale), as 1.0f / (1.0f - p).
 *
 * Portable: static inline, no dependencies beyond <stdint.h>; usable from host and device code.
 */
#ifndef LORAFUSE_DROPOUT_HASH_H
#define LORAFUSE_DROPOUT_HASH_H

#include <stdint.h>

#if defined(__CUDACC__)
#define LF_HD __host__ __device__
#else
#define LF_HD
#endif

#ifdef __cplusplus
extern "C" {
#endif

static inline LF_HD uint64_t lf_splitmix64(uint64_t x) {
    uint64_t z = x + 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Integer threshold on the top 24 hash bits: ceil(p·2^24), p in [0, 1). */
static inline uint32_t lf_dropout_threshold(float p) {
    double t = (double)p * 16777216.0; /* exact */
    uint32_t ti = (uint32_t)t;  /* floor for t >= 0 */
    if ((double)ti < t) ti += 1u;
    return ti;
}

/* Scale applied to kept elements: 1/(1-p) in float. */
static inline float lf_dropout_scale(float p) { return 1.0f / (1.0f - p); }

/* 1 when element idx (= i·k + j) is kept, 0 when dropped. */
static inline LF_HD int lf_dropout_keep(uint64_t seed, uint64_t idx, uint32_t threshold) {
    return (uint32_t)(lf_splitmix64(seed ^ idx) >> 40) >= threshold;
}

#ifdef __cplusplus
}
#endif

#endif /* LORAFUSE_DROPOUT_HASH_H */
