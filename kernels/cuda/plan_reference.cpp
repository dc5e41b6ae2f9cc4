/* lorafuse — host reference backend for kernels/cuda/lora_plan.h (float32, naive loops).
 *
 * Not part of the extension. tests/test_cuda_build.py compiles it with g++ into a throwaway shared
 * library and compares its results with NumPy: it proves, without a GPU, that the GEMM sequence
 * the cuBLASLt backend runs (same plan, same operands, same transposes and leading dimensions)
 * computes the LoRA forward/backward of docs/CONTRACTS.md, dropout mask included.
 */
#include <cstdio>
#include <cstring>
#include <vector>

#include "lorafuse/dropout_hash.h"
#include "lora_plan.h"

namespace {

using lorafuse::plan::Gemm;

static char g_err[512];

/* element (i, j) of op(X) where X is column-major with leading dimension ld */
static inline float at(const float *X, int64_t ld, int trans, int64_t i, int64_t j) {
    return trans ? X[j + i * ld] : X[i + j * ld];
}

struct RefBackend : lorafuse::plan::Backend {
    int gemm(const Gemm &g) override {
        const float *A = (const float *)g.A, *B = (const float *)g.B, *bias = (const float *)g.bias;
        float *C = (float *)g.C;
        /* leading dimensions must cover the stored rows, as cuBLASLt requires */
        int64_t a_rows = g.transa ? g.k : g.m, b_rows = g.transb ? g.n : g.k;
        if (g.lda < a_rows || g.ldb < b_rows || g.ldc < g.m) {
            snprintf(g_err, sizeof g_err, "%s: bad leading dimension", g.what);
            return LF_CUDA_ERR_ARG;
        }
        for (int64_t j = 0; j < g.n; ++j)
            for (int64_t i = 0; i < g.m; ++i) {
                double acc = 0.0;
                for (int64_t p = 0; p < g.k; ++p)
                    acc += (double)at(A, g.lda, g.transa, i, p) * at(B, g.ldb, g.transb, p, j);
                double c = g.alpha * acc;
                if (g.beta != 0.0f) c += (double)g.beta * C[i + j * g.ldc];
                if (bias) c += bias[i];
                C[i + j * g.ldc] = (float)c;
            }
        return LF_CUDA_OK;
    }
    int dropout(const char *, int64_t rows, int64_t cols, double p, uint64_t seed, float extra,
                const void *src, void *dst) override {
        const uint32_t thr = lf_dropout_threshold((float)p);
        const float keep = lf_dropout_scale((float)p) * extra;
        const float *s = (const float *)src;
        float *d = (float *)dst;
        const uint64_t total = (uint64_t)rows * (uint64_t)cols;
        for (uint64_t i = 0; i < total; ++i) d[i] = lf_dropout_keep(seed, i, thr) ? s[i] * keep : 0.0f;
        return LF_CUDA_OK;
    }
    int zero(const char *, void *ptr, int64_t elems) override {
        memset(ptr, 0, (size_t)elems * sizeof(float));
        return LF_CUDA_OK;
    }
    int fail(const char *msg) override {
        snprintf(g_err, sizeof g_err, "%s", msg);
        return LF_CUDA_ERR_ARG;
    }
};

static lf_cuda_lora_desc make_desc(int64_t n, int64_t k, int64_t m, int64_t r, int w_kxm, float scale,
                                   double p, uint64_t seed) {
    lf_cuda_lora_desc d;
    memset(&d, 0, sizeof d);
    d.dtype = LF_CUDA_F32;
    d.n = n; d.k = k; d.m = m; d.r = r;
    d.w_kxm = w_kxm; d.scale = scale; d.dropout_p = p; d.seed = seed;
    return d;
}

} // namespace

extern "C" {

int lf_ref_forward(int64_t n, int64_t k, int64_t m, int64_t r, int w_kxm, float scale, double p,
                   uint64_t seed, const float *x, const float *W, const float *bias, const float *A,
                   const float *B, float *y, float *u, float *xdrop_ws) {
    RefBackend be;
    lf_cuda_lora_desc d = make_desc(n, k, m, r, w_kxm, scale, p, seed);
    return lorafuse::plan::forward(be, d, x, W, bias, A, B, y, u, xdrop_ws);
}

int lf_ref_backward(int64_t n, int64_t k, int64_t m, int64_t r, int w_kxm, float scale, double p,
                    uint64_t seed, const float *g, const float *x, const float *u, const float *W,
                    const float *A, const float *B, float *dx, float *dA, float *dB, float *xdrop_ws,
                    float *v_ws) {
    RefBackend be;
    lf_cuda_lora_desc d = make_desc(n, k, m, r, w_kxm, scale, p, seed);
    return lorafuse::plan::backward(be, d, g, x, u, W, A, B, dx, dA, dB, xdrop_ws, v_ws);
}

/* the mask itself, for comparison with the pure-Python copy of the hash */
void lf_ref_dropout_mask(int64_t rows, int64_t cols, double p, uint64_t seed, float *out) {
    const uint32_t thr = lf_dropout_threshold((float)p);
    const float keep = lf_dropout_scale((float)p);
    for (uint64_t i = 0; i < (uint64_t)rows * (uint64_t)cols; ++i)
        out[i] = lf_dropout_keep(seed, i, thr) ? keep : 0.0f;
}

const char *lf_ref_last_error(void) { return g_err; }

} // extern "C"
