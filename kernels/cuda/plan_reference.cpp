/* lorafuse — host reference backend for kernels/cuda/lora_plan.h (float32 and bfloat16, naive loops).
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

using lorafuse::plan::FoldSplit;
using lorafuse::plan::Gemm;

static char g_err[512];

/* bfloat16 <-> float on the host: the top 16 bits, rounded to nearest even (NaN kept quiet) */
static inline float bf16_to_f(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}
static inline uint16_t f_to_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40u);
    b += 0x7fffu + ((b >> 16) & 1u);
    return (uint16_t)(b >> 16);
}

/* element e of a buffer of lf_cuda_dtype `type` (fp32 or bf16: the types this backend is given) */
static inline float load(const void *p, int type, int64_t e) {
    return type == LF_CUDA_BF16 ? bf16_to_f(((const uint16_t *)p)[e]) : ((const float *)p)[e];
}
static inline void store(void *p, int type, int64_t e, float v) {
    if (type == LF_CUDA_BF16)
        ((uint16_t *)p)[e] = f_to_bf16(v);
    else
        ((float *)p)[e] = v;
}
static inline size_t bytes_of(int type) { return type == LF_CUDA_BF16 ? 2 : 4; }

struct RefBackend : lorafuse::plan::Backend {
    int dtype; /* of the problem: what dropout reads and writes */
    explicit RefBackend(int t) : dtype(t) {}

    int gemm(const Gemm &g) override {
        if ((g.ab_type != LF_CUDA_F32 && g.ab_type != LF_CUDA_BF16) ||
            (g.c_type != LF_CUDA_F32 && g.c_type != LF_CUDA_BF16)) {
            snprintf(g_err, sizeof g_err, "%s: the host backend takes float32 and bfloat16 only", g.what);
            return LF_EINVAL;
        }
        /* leading dimensions must cover the stored rows, as cuBLASLt requires */
        int64_t a_rows = g.transa ? g.k : g.m, b_rows = g.transb ? g.n : g.k;
        if (g.lda < a_rows || g.ldb < b_rows || g.ldc < g.m) {
            snprintf(g_err, sizeof g_err, "%s: bad leading dimension", g.what);
            return LF_EINVAL;
        }
        /* C(i,j) = alpha·Σ_p op(A)(i,p)·op(B)(p,j) + beta·C(i,j) + bias(i), column-major, double sum,
         * rounded once to C's type (as cuBLASLt rounds its fp32 accumulator) */
        for (int64_t j = 0; j < g.n; ++j)
            for (int64_t i = 0; i < g.m; ++i) {
                double acc = 0.0;
                for (int64_t p = 0; p < g.k; ++p) {
                    const double a = load(g.A, g.ab_type, g.transa ? p + i * g.lda : i + p * g.lda);
                    const double b = load(g.B, g.ab_type, g.transb ? j + p * g.ldb : p + j * g.ldb);
                    acc += a * b;
                }
                double c = g.alpha * acc;
                if (g.beta != 0.0f) c += (double)g.beta * load(g.C, g.c_type, i + j * g.ldc);
                if (g.bias) c += load(g.bias, g.c_type, i);
                store(g.C, g.c_type, i + j * g.ldc, (float)c);
            }
        return LF_OK;
    }
    int dropout(const char *, int64_t rows, int64_t cols, double p, uint64_t seed, bool scaled, const void *src,
                void *dst) override {
        const uint32_t thr = lf_dropout_threshold((float)p);
        const float keep = scaled ? lf_dropout_scale((float)p) : 1.0f;
        const uint64_t total = (uint64_t)rows * (uint64_t)cols;
        for (uint64_t i = 0; i < total; ++i)
            store(dst, dtype, (int64_t)i, lf_dropout_keep(seed, i, thr) ? load(src, dtype, (int64_t)i) * keep : 0.0f);
        return LF_OK;
    }
    int fold_split(const FoldSplit *jobs, int count) override {
        if (count < 1 || count > lorafuse::plan::LF_PLAN_MAX_JOBS) return fail("fold_split: bad job count");
        for (int q = 0; q < count; ++q) LF_PLAN_TRY(fold_split_one(jobs[q]));
        return LF_OK;
    }
    int fold_split_one(const FoldSplit &f) {
        if (f.split && f.split_type != LF_CUDA_BF16) return fail("fold_split: the host backend splits into bf16 only");
        for (int64_t i = 0; i < f.rows; ++i)
            for (int64_t j = 0; j < f.cols; ++j) {
                const float *s = f.src + i * f.src_ld + j;
                const float val = f.scale * (f.half ? s[0] + s[f.half] : s[0]);
                if (f.out) f.out[i * f.cols + j] = val;
                if (!f.split) continue;
                const uint16_t hi = f_to_bf16(val), lo = f_to_bf16(val - bf16_to_f(hi));
                for (int p = 0; p < f.nparts; ++p)
                    ((uint16_t *)f.split)[p * f.part_stride + i * f.split_ld + j] = ((f.lo_mask >> p) & 1u) ? lo : hi;
            }
        return LF_OK;
    }
    int zero(const char *, void *ptr, int64_t bytes) override {
        memset(ptr, 0, (size_t)bytes);
        return LF_OK;
    }
    int fail(const char *msg) override {
        snprintf(g_err, sizeof g_err, "%s", msg);
        return LF_EINVAL;
    }
};

/* dtype, adapter_dtype: LF_CUDA_F32 or LF_CUDA_BF16 */
static lf_cuda_lora_desc make_desc(int dtype, int adapter_dtype, int64_t n, int64_t k, int64_t m, int64_t r,
                                   int w_kxm, float scale, double p, uint64_t seed) {
    lf_cuda_lora_desc d;
    memset(&d, 0, sizeof d);
    d.dtype = dtype;
    d.adapter_dtype = adapter_dtype;
    d.n = n; d.k = k; d.m = m; d.r = r;
    d.w_kxm = w_kxm; d.scale = scale; d.dropout_p = p; d.seed = seed;
    return d;
}

} // namespace

extern "C" {

/* Buffers: x, W, bias, y, g, dx in `dtype`; A, B, u, dA, dB in `adapter_dtype` (both float32, both
 * bfloat16, or bfloat16 with float32 adapters: the mixed plan). */
int lf_ref_forward(int dtype, int adapter_dtype, int64_t n, int64_t k, int64_t m, int64_t r, int w_kxm, float scale,
                   double p, uint64_t seed, const void *x, const void *W, const void *bias, const void *A,
                   const void *B, void *y, void *u, void *xdrop_ws, void *mixed_ws) {
    RefBackend be(dtype);
    lf_cuda_lora_desc d = make_desc(dtype, adapter_dtype, n, k, m, r, w_kxm, scale, p, seed);
    return lorafuse::plan::forward(be, d, x, W, bias, A, B, y, u, xdrop_ws, mixed_ws);
}

int lf_ref_backward(int dtype, int adapter_dtype, int64_t n, int64_t k, int64_t m, int64_t r, int w_kxm,
                    float scale, double p, uint64_t seed, const void *g, const void *x, const void *u, const void *W,
                    const void *A, const void *B, void *dx, void *dA, void *dB, void *xdrop_ws, void *v_ws,
                    void *mixed_ws) {
    RefBackend be(dtype);
    lf_cuda_lora_desc d = make_desc(dtype, adapter_dtype, n, k, m, r, w_kxm, scale, p, seed);
    return lorafuse::plan::backward(be, d, g, x, u, W, A, B, dx, dA, dB, xdrop_ws, v_ws, mixed_ws);
}

size_t lf_ref_mixed_ws_bytes(int dtype, int adapter_dtype, int64_t n, int64_t k, int64_t m, int64_t r,
                             int backward) {
    lf_cuda_lora_desc d = make_desc(dtype, adapter_dtype, n, k, m, r, 0, 1.0f, 0.0, 0);
    return lorafuse::plan::mixed_ws_bytes(d, backward);
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
