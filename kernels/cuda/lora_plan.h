/* lorafuse — the LoRA forward/backward expressed as a sequence of column-major GEMMs.
 *
 * Pure C++ (no CUDA headers), so that the exact same plan runs on two backends:
 *   - kernels/cuda/lora_cublaslt.cu : cuBLASLt + one dropout kernel (the real thing);
 *   - kernels/cuda/plan_reference.cpp: a naive host backend, compiled with g++ by
 *     tests/test_cuda_build.py and checked against NumPy on machines without a GPU.
 * The risky part of a cuBLAS port — which operand is transposed, which leading dimension — is
 * therefore tested in CI even though CI has no GPU.
 *
 * Row-major ↔ column-major: a row-major (a,b) matrix M with leading dimension b is, read
 * column-major, Mᵀ (b×a, ld b). Every row-major product Z = P·Q is computed as Zᵀ = Qᵀ·Pᵀ.
 * Each step below gives the derivation next to it.
 */
#ifndef LORAFUSE_LORA_PLAN_H
#define LORAFUSE_LORA_PLAN_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include "lorafuse/cuda_kernels.h"
#include "lorafuse/dropout_hash.h"
#include "lorafuse/validate.h"

namespace lorafuse {
namespace plan {

enum { OP_N = 0, OP_T = 1 };

/* Column-major BLAS semantics, C updated in place:
 *   C(m×n, ldc) = alpha·op(A)·op(B) + beta·C + bias (bias: m values, one per row of C; may be NULL)
 * op(A) is m×k: A stored m×k (lda ≥ m) when transa = N, k×m (lda ≥ k) when T. Likewise op(B) k×n. */
struct Gemm {
    const char *what;
    int transa, transb;
    int64_t m, n, k;
    float alpha;
    const void *A;
    int64_t lda;
    const void *B;
    int64_t ldb;
    float beta;
    void *C;
    int64_t ldc;
    const void *bias; /* c_type, like C */
    int ab_type;      /* lf_cuda_dtype of A and B */
    int c_type;       /* lf_cuda_dtype of C (= D) */
};

/* One fp32 matrix (rows×cols, element (i,j) at src[i·src_ld + j]) folded and/or split:
 *   val(i,j) = scale·(src[i·src_ld + j] + (half ? src[i·src_ld + j + half] : 0))
 *   out[i·cols + j] = val                       (fp32, dense; when out != NULL)
 *   hi = round(val), lo = round(val − hi)        (in split_type: bf16/fp16)
 *   split[p·part_stride + i·split_ld + j] = ((lo_mask >> p) & 1) ? lo : hi,  p < nparts
 * hi + lo carries 16 significant bits of val (bf16: 8 + 8), so a GEMM over such parts in bf16
 * tensor cores with fp32 accumulation computes an fp32 product to ~2^-16 relative (products of
 * bf16 values are exact in fp32). `half` folds the two halves that such a GEMM writes. */
enum { LF_PLAN_MAX_JOBS = 4 };

struct FoldSplit {
    const char *what;
    int64_t rows, cols;
    const float *src;
    int64_t src_ld, half;
    float scale;
    float *out;
    void *split;
    int split_type;
    int64_t part_stride, split_ld;
    int nparts;
    unsigned lo_mask;
};

struct Backend {
    virtual ~Backend() {}
    virtual int gemm(const Gemm &g) = 0;
    /* dst = src ⊙ keep(seed, i·cols+j) · (scaled ? 1/(1-p) : 1) — dense rows×cols of the problem's
     * dtype; dst may equal src. The unscaled form is exact in any dtype (elements kept or zeroed). */
    virtual int dropout(const char *what, int64_t rows, int64_t cols, double p, uint64_t seed,
                        bool scaled, const void *src, void *dst) = 0;
    /* `count` (1..LF_PLAN_MAX_JOBS) independent FoldSplits, in one launch on a GPU */
    virtual int fold_split(const FoldSplit *jobs, int count) = 0;
    virtual int zero(const char *what, void *ptr, int64_t bytes) = 0;
    virtual int fail(const char *msg) = 0; /* records an argument error, returns LF_EINVAL */
};

#define LF_PLAN_TRY(expr)                  \
    do {                                   \
        int lf_st_ = (expr);               \
        if (lf_st_ != LF_OK) return lf_st_; \
    } while (0)

static inline size_t dtype_bytes(int dtype) { return dtype == LF_CUDA_F32 ? 4 : 2; }

/* The adapters (A, B) and their results (u, dA, dB) are in d.adapter_dtype: the problem's dtype, or
 * fp32 with a bf16 problem ("mixed": PEFT's default fp32 adapters on a bf16 base). */
static inline bool is_mixed(const lf_cuda_lora_desc &d) { return d.adapter_dtype != d.dtype; }

/* be.fail with a printf-style message */
static inline int failf(Backend &be, const char *fmt, ...) {
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return be.fail(msg);
}

static inline bool known_dtype(int t) { return t == LF_CUDA_F32 || t == LF_CUDA_F16 || t == LF_CUDA_BF16; }

/* rows·cols·parts 4-byte elements, with room for the sums of such buffers that the mixed plan's
 * workspace adds up (at most eight, each padded to 256 bytes), fit int64 (and so size_t) */
static inline bool fits(int64_t rows, int64_t cols, int64_t parts) {
    int64_t t;
    return lf_mul_i64(rows, cols, &t) == 0 && lf_mul_i64(t, parts * 4 * 16, &t) == 0;
}

/* The problem description: sizes, dtype codes, dropout_p, device. */
static inline int check_desc(Backend &be, const lf_cuda_lora_desc &d) {
    if (d.device < 0) return failf(be, "device must be >= 0, got %d", d.device);
    if (d.n < 0) return failf(be, "n must be >= 0, got %lld", (long long)d.n);
    if (d.k < 1) return failf(be, "k must be >= 1, got %lld", (long long)d.k);
    if (d.m < 1) return failf(be, "m must be >= 1, got %lld", (long long)d.m);
    if (d.r < 1) return failf(be, "r must be >= 1, got %lld", (long long)d.r);
    /* the threshold and 1/(1-p) are computed from the float32 value (dropout_hash.h) */
    if (!(d.dropout_p >= 0.0 && d.dropout_p < 1.0 && (float)d.dropout_p < 1.0f))
        return failf(be, "dropout_p must be in [0, 1), got %g", d.dropout_p);
    if (!known_dtype(d.dtype))
        return failf(be, "dtype: unknown dtype code %d (0 float32, 1 float16, 2 bfloat16)", d.dtype);
    if (!known_dtype(d.adapter_dtype))
        return failf(be, "adapter_dtype: unknown dtype code %d (0 float32, 1 float16, 2 bfloat16)", d.adapter_dtype);
    if (is_mixed(d) && !(d.adapter_dtype == LF_CUDA_F32 && d.dtype == LF_CUDA_BF16))
        return failf(be, "adapter_dtype %d with dtype %d: the adapters have the base's dtype, or are float32 "
                         "adapters on a bfloat16 base", d.adapter_dtype, d.dtype);
    /* the mixed plan stacks up to three parts along r */
    const struct { const char *what; int64_t a, b, parts; } products[] = {
        {"n*k", d.n, d.k, 1}, {"m*k", d.m, d.k, 1}, {"n*m", d.n, d.m, 1},
        {"n*r", d.n, d.r, 3}, {"m*r", d.m, d.r, 3}, {"r*k", d.r, d.k, 3}};
    for (const auto &p : products)
        if (!fits(p.a, p.b, p.parts))
            return failf(be, "%s = %lld*%lld elements overflow int64 bytes", p.what,
                         (long long)p.a, (long long)p.b);
    return LF_OK;
}

/* ---------------------------------------------------------------- same dtype everywhere */

/* forward without the base GEMM: u = drop(x)·Aᵀ ; y = s·u·Bᵀ */
static inline int forward_same(Backend &be, const lf_cuda_lora_desc &d, const void *x, const void *A,
                               const void *B, void *y, void *u, void *xdrop_ws) {
    const int64_t n = d.n, k = d.k, m = d.m, r = d.r;
    const int t = d.dtype;
    const void *xd = x;
    if (d.dropout_p > 0.0) {
        LF_PLAN_TRY(be.dropout("dropout(x) in forward", n, k, d.dropout_p, d.seed, true, x, xdrop_ws));
        xd = xdrop_ws;
    }
    /* 1. u = xd·Aᵀ   ⇔ uᵀ(r×n, ld r) = A·xdᵀ ; A = op_T(Aᵀ: k×r ld k), xdᵀ = (k×n ld k) */
    {
        Gemm g = {"u = drop(x)·A^T", OP_T, OP_N, r, n, k, 1.0f, A, k, xd, k, 0.0f, u, r, nullptr, t, t};
        LF_PLAN_TRY(be.gemm(g));
    }
    /* 2. y = s·u·Bᵀ  ⇔ yᵀ(m×n, ld m) = s·B·uᵀ ; B = op_T(Bᵀ: r×m ld r), uᵀ = (r×n ld r).
     *    K = r: a thin, memory-bound GEMM that writes y once. The low-rank term goes first so that
     *    the base GEMM below adds it in its epilogue (beta = 1) and rounds y once, after the sum. */
    {
        Gemm g = {"y = s·u·B^T", OP_T, OP_N, m, n, r, d.scale, B, r, u, r, 0.0f, y, m, nullptr, t, t};
        LF_PLAN_TRY(be.gemm(g));
    }
    return LF_OK;
}

/* backward without the base GEMM: v = g·B ; dB = s·gᵀ·u ; dA = s·vᵀ·drop(x) ; dx = s·drop'(v·A) */
static inline int backward_same(Backend &be, const lf_cuda_lora_desc &d, const void *gy, const void *x,
                                const void *u, const void *A, const void *B, void *dx, void *dA, void *dB,
                                void *xdrop_ws, void *v_ws) {
    const int64_t n = d.n, k = d.k, m = d.m, r = d.r;
    const int t = d.dtype;
    /* 4. v = g·B ⇔ vᵀ(r×n, ld r) = Bᵀ·gᵀ ; Bᵀ = (r×m ld r) op N ; gᵀ = (m×n ld m) op N */
    {
        Gemm g = {"v = g·B", OP_N, OP_N, r, n, m, 1.0f, B, r, gy, m, 0.0f, v_ws, r, nullptr, t, t};
        LF_PLAN_TRY(be.gemm(g));
    }
    /* 5. dB = s·gᵀ·u ⇔ dBᵀ(r×m, ld r) = s·uᵀ·g ; uᵀ = (r×n ld r) op N ; g = op_T(gᵀ: m×n ld m) */
    {
        Gemm g = {"dB = s·g^T·u", OP_N, OP_T, r, m, n, d.scale, u, r, gy, m, 0.0f, dB, r, nullptr, t, t};
        LF_PLAN_TRY(be.gemm(g));
    }
    /* 6. dA = s·vᵀ·xd ⇔ dAᵀ(k×r, ld k) = s·xdᵀ·v ; xdᵀ = (k×n ld k) op N ; v = op_T(vᵀ: r×n ld r) */
    {
        const void *xd = x;
        if (d.dropout_p > 0.0) {
            LF_PLAN_TRY(be.dropout("dropout(x) regenerated in backward", n, k, d.dropout_p, d.seed, true, x,
                                   xdrop_ws));
            xd = xdrop_ws;
        }
        Gemm g = {"dA = s·v^T·drop(x)", OP_N, OP_T, k, r, n, d.scale, xd, k, v_ws, r, 0.0f, dA, k, nullptr, t, t};
        LF_PLAN_TRY(be.gemm(g));
    }
    if (!dx) return LF_OK;
    /* 7. dx = s·v·A ⇔ dxᵀ(k×n, ld k) = s·Aᵀ·vᵀ ; Aᵀ = (k×r ld k) op N ; vᵀ = (r×n ld r) op N */
    {
        Gemm g = {"dx = s·v·A", OP_N, OP_N, k, n, r, d.scale, A, k, v_ws, r, 0.0f, dx, k, nullptr, t, t};
        LF_PLAN_TRY(be.gemm(g));
    }
    if (d.dropout_p > 0.0)
        LF_PLAN_TRY(be.dropout("dropout'(s·v·A) in backward", n, k, d.dropout_p, d.seed, true, dx, dx));
    return LF_OK;
}

/* ---------------------------------------------------------------- fp32 adapters on a bf16 base
 *
 * cuBLASLt multiplies two operands of one type. The big operands (x, W, g: n·k, m·k, n·m) are bf16
 * and are never copied; every fp32 operand has r as one dimension (A, B, u, v) and is split into
 * bf16 parts hi + lo (FoldSplit), stacked so that one bf16 GEMM with fp32 accumulation sums the
 * parts' products:
 *   x·Aᵀ  = x·[A_hi; A_lo]ᵀ folded      (2r output columns, fp32: exact products of bf16 values)
 *   u·Bᵀ  ≈ [u_hi u_hi u_lo]·[B_hi B_lo B_hi]ᵀ   (K = 3r; drops lo·lo, ~2^-16 relative)
 * The rank-r results (u, dA, dB, fp32) therefore match an fp32 computation to ~2^-16 relative —
 * far below the bf16 rounding of y and dx — and cost bf16 tensor-core GEMMs that read x, g once.
 * Dropout keeps x̃ exact in bf16: x̃ = x ⊙ keep (unscaled), and 1/(1-p) goes into the GEMMs' alpha.
 */

/* A bump allocator over the caller's workspace; with base == NULL it only measures. Every buffer
 * is 256-byte aligned (what cuBLASLt's fastest kernels want). */
struct Carver {
    char *base;
    size_t used;
    void *take(size_t bytes) {
        void *p = base ? base + used : nullptr;
        used += (bytes + 255) & ~(size_t)255;
        return p;
    }
};

struct MixedForwardBufs {
    void *A2;  /* [A_hi; A_lo]         (2r, k)  bf16 */
    void *B3;  /* [B_hi B_lo B_hi]     (m, 3r)  bf16 */
    float *u2; /* x̃·[A_hi; A_lo]ᵀ      (n, 2r)  fp32 */
    void *u3;  /* [u_hi u_hi u_lo]     (n, 3r)  bf16 */
};
struct MixedBackwardBufs {
    void *B2;   /* [B_hi B_lo]          (m, 2r)  bf16 */
    void *A3;   /* [A_hi; A_lo; A_hi]   (3r, k)  bf16 */
    void *us2;  /* [u_hi u_lo]          (n, 2r)  bf16 */
    float *v2;  /* g·[B_hi B_lo]        (n, 2r)  fp32 */
    void *v3;   /* [v_hi v_hi v_lo]     (n, 3r)  bf16 */
    float *dB2; /* gᵀ·[u_hi u_lo]       (m, 2r)  fp32 */
    float *dA2; /* [v_hi v_lo]ᵀ·x̃       (2r, k)  fp32 */
};

static inline MixedForwardBufs carve_forward(const lf_cuda_lora_desc &d, Carver &c) {
    const size_t e = dtype_bytes(d.dtype), n = (size_t)d.n, k = (size_t)d.k, m = (size_t)d.m, r = (size_t)d.r;
    MixedForwardBufs b;
    b.A2 = c.take(2 * r * k * e);
    b.B3 = c.take(m * 3 * r * e);
    b.u2 = (float *)c.take(n * 2 * r * 4);
    b.u3 = c.take(n * 3 * r * e);
    return b;
}

static inline MixedBackwardBufs carve_backward(const lf_cuda_lora_desc &d, Carver &c) {
    const size_t e = dtype_bytes(d.dtype), n = (size_t)d.n, k = (size_t)d.k, m = (size_t)d.m, r = (size_t)d.r;
    MixedBackwardBufs b;
    b.B2 = c.take(m * 2 * r * e);
    b.A3 = c.take(3 * r * k * e);
    b.us2 = c.take(n * 2 * r * e);
    b.v2 = (float *)c.take(n * 2 * r * 4);
    b.v3 = c.take(n * 3 * r * e);
    b.dB2 = (float *)c.take(m * 2 * r * 4);
    b.dA2 = (float *)c.take(2 * r * k * 4);
    return b;
}

/* Bytes of the workspace `mixed_ws` that forward (backward = 0) or backward (1) needs: 0 unless mixed. */
static inline size_t mixed_ws_bytes(const lf_cuda_lora_desc &d, int backward) {
    if (!is_mixed(d) || d.n < 0 || d.k < 1 || d.m < 1 || d.r < 1) return 0;
    Carver c = {nullptr, 0};
    if (backward)
        carve_backward(d, c);
    else
        carve_forward(d, c);
    return c.used;
}

/* split an fp32 (rows, cols) matrix into `nparts` bf16 parts, stacked along rows (part_stride =
 * rows·cols, ld = cols) or along columns (part_stride = cols, ld = nparts·cols) */
static inline FoldSplit split_rows(const char *what, const void *src, int64_t rows, int64_t cols, int type,
                                   void *dst, int nparts, unsigned lo_mask) {
    FoldSplit f = {what, rows, cols, (const float *)src, cols, 0, 1.0f, nullptr, dst, type, rows * cols, cols,
                   nparts, lo_mask};
    return f;
}
static inline FoldSplit split_cols(const char *what, const void *src, int64_t rows, int64_t cols, int type,
                                   void *dst, int nparts, unsigned lo_mask) {
    FoldSplit f = {what, rows, cols, (const float *)src, cols, 0, 1.0f, nullptr, dst, type, cols, nparts * cols,
                   nparts, lo_mask};
    return f;
}

/* forward, mixed: u = keep_scale·(x̃·[A_hi;A_lo]ᵀ folded) (fp32) ; y = s·[u_hi u_hi u_lo]·[B_hi B_lo B_hi]ᵀ
 * (bf16), to which the base GEMM then adds x·Wᵀ + bias */
static inline int forward_mixed(Backend &be, const lf_cuda_lora_desc &d, const void *x, const void *A,
                                const void *B, void *y, void *u, void *xdrop_ws, void *mixed_ws) {
    const int64_t n = d.n, k = d.k, m = d.m, r = d.r;
    const int t = d.dtype, f32 = LF_CUDA_F32;
    Carver c = {(char *)mixed_ws, 0};
    const MixedForwardBufs b = carve_forward(d, c);
    const void *xd = x;
    float keep_scale = 1.0f;
    if (d.dropout_p > 0.0) {
        LF_PLAN_TRY(be.dropout("dropout(x) in forward (unscaled)", n, k, d.dropout_p, d.seed, false, x, xdrop_ws));
        xd = xdrop_ws;
        keep_scale = lf_dropout_scale((float)d.dropout_p);
    }
    {
        const FoldSplit prep[2] = {split_rows("split A -> [A_hi; A_lo]", A, r, k, t, b.A2, 2, 0x2u),
                                   split_cols("split B -> [B_hi B_lo B_hi]", B, m, r, t, b.B3, 3, 0x2u)};
        LF_PLAN_TRY(be.fold_split(prep, 2));
    }
    /* u2 = keep·xd·A2ᵀ ⇔ u2ᵀ(2r×n, ld 2r) = keep·A2·xdᵀ ; A2 = op_T(A2ᵀ: k×2r ld k) ; xdᵀ = (k×n ld k) */
    {
        Gemm g = {"u2 = drop(x)·[A_hi;A_lo]^T", OP_T, OP_N, 2 * r, n, k, keep_scale, b.A2, k, xd, k, 0.0f, b.u2,
                  2 * r, nullptr, t, f32};
        LF_PLAN_TRY(be.gemm(g));
    }
    /* u = u2[:, :r] + u2[:, r:] (fp32, saved for backward) and u3 = [u_hi u_hi u_lo] */
    {
        const FoldSplit f = {"fold u2 -> u, split -> [u_hi u_hi u_lo]", n, r, b.u2, 2 * r, r, 1.0f, (float *)u, b.u3,
                             t, r, 3 * r, 3, 0x4u};
        LF_PLAN_TRY(be.fold_split(&f, 1));
    }
    /* y = s·u3·B3ᵀ ⇔ yᵀ(m×n, ld m) = s·B3·u3ᵀ ; B3 = op_T(B3ᵀ: 3r×m ld 3r) ; u3ᵀ = (3r×n ld 3r) */
    {
        Gemm g = {"y = s·[u_hi u_hi u_lo]·[B_hi B_lo B_hi]^T", OP_T, OP_N, m, n, 3 * r, d.scale, b.B3, 3 * r, b.u3,
                  3 * r, 0.0f, y, m, nullptr, t, t};
        LF_PLAN_TRY(be.gemm(g));
    }
    return LF_OK;
}

/* backward, mixed (dx without the base GEMM): v = g·[B_hi B_lo] folded ; dB = s·gᵀ·[u_hi u_lo] folded ;
 * dA = s·keep·[v_hi v_lo]ᵀ·x̃ folded ; dx = s·keep·keep01 ⊙ ([v_hi v_hi v_lo]·[A_hi; A_lo; A_hi]) */
static inline int backward_mixed(Backend &be, const lf_cuda_lora_desc &d, const void *gy, const void *x,
                                 const void *u, const void *A, const void *B, void *dx, void *dA, void *dB,
                                 void *xdrop_ws, void *mixed_ws) {
    const int64_t n = d.n, k = d.k, m = d.m, r = d.r;
    const int t = d.dtype, f32 = LF_CUDA_F32;
    Carver c = {(char *)mixed_ws, 0};
    const MixedBackwardBufs b = carve_backward(d, c);
    const float keep_scale = d.dropout_p > 0.0 ? lf_dropout_scale((float)d.dropout_p) : 1.0f;
    {
        const FoldSplit prep[3] = {split_cols("split B -> [B_hi B_lo]", B, m, r, t, b.B2, 2, 0x2u),
                                   split_cols("split u -> [u_hi u_lo]", u, n, r, t, b.us2, 2, 0x2u),
                                   split_rows("split A -> [A_hi; A_lo; A_hi]", A, r, k, t, b.A3, 3, 0x2u)};
        LF_PLAN_TRY(be.fold_split(prep, dx ? 3 : 2)); /* A's parts only for dx */
    }
    /* v2 = g·B2 ⇔ v2ᵀ(2r×n, ld 2r) = B2ᵀ·gᵀ ; B2ᵀ = (2r×m ld 2r) op N ; gᵀ = (m×n ld m) op N */
    {
        Gemm g = {"v2 = g·[B_hi B_lo]", OP_N, OP_N, 2 * r, n, m, 1.0f, b.B2, 2 * r, gy, m, 0.0f, b.v2, 2 * r,
                  nullptr, t, f32};
        LF_PLAN_TRY(be.gemm(g));
    }
    {
        const FoldSplit f = {"fold v2 -> v, split -> [v_hi v_hi v_lo]", n, r, b.v2, 2 * r, r, 1.0f, nullptr, b.v3, t,
                             r, 3 * r, 3, 0x4u};
        LF_PLAN_TRY(be.fold_split(&f, 1));
    }
    /* dB2 = gᵀ·us2 ⇔ dB2ᵀ(2r×m, ld 2r) = us2ᵀ·g ; us2ᵀ = (2r×n ld 2r) op N ; g = op_T(gᵀ: m×n ld m) */
    {
        Gemm g = {"dB2 = g^T·[u_hi u_lo]", OP_N, OP_T, 2 * r, m, n, 1.0f, b.us2, 2 * r, gy, m, 0.0f, b.dB2, 2 * r,
                  nullptr, t, f32};
        LF_PLAN_TRY(be.gemm(g));
    }
    /* dA2 = keep·[v_hi v_lo]ᵀ·xd ⇔ dA2ᵀ(k×2r, ld k) = keep·xdᵀ·[v_hi v_lo] ; xdᵀ = (k×n ld k) op N ;
     * [v_hi v_lo] = columns r..3r of v3 = op_T(k... : 2r×n ld 3r); dA2 is (2r, k) row-major */
    {
        const void *xd = x;
        if (d.dropout_p > 0.0) {
            LF_PLAN_TRY(be.dropout("dropout(x) regenerated in backward (unscaled)", n, k, d.dropout_p, d.seed, false,
                                   x, xdrop_ws));
            xd = xdrop_ws;
        }
        const void *v_hl = (const char *)b.v3 + (size_t)r * dtype_bytes(t);
        Gemm g = {"dA2 = [v_hi v_lo]^T·drop(x)", OP_N, OP_T, k, 2 * r, n, keep_scale, xd, k, v_hl, 3 * r, 0.0f,
                  b.dA2, k, nullptr, t, f32};
        LF_PLAN_TRY(be.gemm(g));
    }
    {
        const FoldSplit f[2] = {{"fold dB2 -> dB", m, r, b.dB2, 2 * r, r, d.scale, (float *)dB, nullptr, t, 0, 0, 0, 0},
                                {"fold dA2 -> dA", r, k, b.dA2, k, r * k, d.scale, (float *)dA, nullptr, t, 0, 0, 0, 0}};
        LF_PLAN_TRY(be.fold_split(f, 2));
    }
    if (!dx) return LF_OK;
    /* dx = s·keep·v3·A3 ⇔ dxᵀ(k×n, ld k) = s·keep·A3ᵀ·v3ᵀ ; A3ᵀ = (k×3r ld k) op N ; v3ᵀ = (3r×n ld 3r) op N */
    {
        Gemm g = {"dx = s·[v_hi v_hi v_lo]·[A_hi;A_lo;A_hi]", OP_N, OP_N, k, n, 3 * r, d.scale * keep_scale, b.A3, k,
                  b.v3, 3 * r, 0.0f, dx, k, nullptr, t, t};
        LF_PLAN_TRY(be.gemm(g));
    }
    if (d.dropout_p > 0.0)
        LF_PLAN_TRY(be.dropout("dropout'(dx) in backward (unscaled)", n, k, d.dropout_p, d.seed, false, dx, dx));
    return LF_OK;
}

/* ---------------------------------------------------------------- the operands, checked */

static inline int check_operands(Backend &be, const lf_operand *ops, int count) {
    char msg[256];
    return lf_check_operands(ops, count, msg, sizeof msg) == LF_OK ? LF_OK : be.fail(msg);
}

/* What the operand lists of forward and backward share: sizes, element sizes (problem / adapters),
 * which optional operands the problem uses, and the two workspaces. */
struct OperandSizes {
    int64_t n, k, m, r, e, ea;
    int rows, drop, mixed; /* n > 0; dropout used; the mixed plan used */
    OperandSizes(const lf_cuda_lora_desc &d)
        : n(d.n), k(d.k), m(d.m), r(d.r), e((int64_t)dtype_bytes(d.dtype)),
          ea((int64_t)dtype_bytes(d.adapter_dtype)), rows(d.n > 0), drop(d.n > 0 && d.dropout_p > 0.0),
          mixed(d.n > 0 && is_mixed(d)) {}
    lf_operand xdrop(const void *ws) const {
        return {"xdrop_ws", drop ? ws : nullptr, n * k * e, e, LF_OPERAND_OUT, drop,
                "dropout_p > 0 needs the n*k workspace"};
    }
    lf_operand mixed_ws(const lf_cuda_lora_desc &d, int backward, const void *ws) const {
        return {"mixed_ws", mixed ? ws : nullptr, (int64_t)mixed_ws_bytes(d, backward), 4, LF_OPERAND_OUT, mixed,
                "fp32 adapters on a bf16 base need it"};
    }
};

/* Everything forward can see before it runs (lorafuse/validate.h): the description, then each operand
 * the problem needs present, aligned to its element size, and no output or workspace overlapping
 * another operand. The n-row operands are needed only when n > 0; each workspace only when used. */
static inline int check_forward(Backend &be, const lf_cuda_lora_desc &d, const void *x, const void *W,
                                const void *bias, const void *A, const void *B, const void *y, const void *u,
                                const void *xdrop_ws, const void *mixed_ws) {
    LF_PLAN_TRY(check_desc(be, d));
    const OperandSizes o(d);
    const int64_t n = o.n, k = o.k, m = o.m, r = o.r, e = o.e, ea = o.ea;
    const lf_operand ops[] = {
        {"x", x, n * k * e, e, LF_OPERAND_IN, o.rows, nullptr},
        {"W", W, m * k * e, e, LF_OPERAND_IN, 1, nullptr},
        {"bias", bias, m * e, e, LF_OPERAND_IN, 0, nullptr},
        {"A", A, r * k * ea, ea, LF_OPERAND_IN, 1, nullptr},
        {"B", B, m * r * ea, ea, LF_OPERAND_IN, 1, nullptr},
        {"y", y, n * m * e, e, LF_OPERAND_OUT, o.rows, nullptr},
        {"u", u, n * r * ea, ea, LF_OPERAND_OUT, o.rows, nullptr},
        o.xdrop(xdrop_ws),
        o.mixed_ws(d, 0, mixed_ws),
    };
    return check_operands(be, ops, (int)(sizeof ops / sizeof ops[0]));
}

/* The same for backward: dA and dB always; W when dx is wanted (n > 0); v_ws for same-dtype adapters. */
static inline int check_backward(Backend &be, const lf_cuda_lora_desc &d, const void *gy, const void *x,
                                 const void *u, const void *W, const void *A, const void *B, const void *dx,
                                 const void *dA, const void *dB, const void *xdrop_ws, const void *v_ws,
                                 const void *mixed_ws) {
    LF_PLAN_TRY(check_desc(be, d));
    const OperandSizes o(d);
    const int64_t n = o.n, k = o.k, m = o.m, r = o.r, e = o.e, ea = o.ea;
    const int same = o.rows && !is_mixed(d);
    const lf_operand ops[] = {
        {"g", gy, n * m * e, e, LF_OPERAND_IN, o.rows, nullptr},
        {"x", x, n * k * e, e, LF_OPERAND_IN, o.rows, nullptr},
        {"u", u, n * r * ea, ea, LF_OPERAND_IN, o.rows, nullptr},
        {"W", W, m * k * e, e, LF_OPERAND_IN, o.rows && dx, "dx needs W"},
        {"A", A, r * k * ea, ea, LF_OPERAND_IN, o.rows, nullptr},
        {"B", B, m * r * ea, ea, LF_OPERAND_IN, o.rows, nullptr},
        {"dx", dx, n * k * e, e, LF_OPERAND_OUT, 0, nullptr},
        {"dA", dA, r * k * ea, ea, LF_OPERAND_OUT, 1, nullptr},
        {"dB", dB, m * r * ea, ea, LF_OPERAND_OUT, 1, nullptr},
        o.xdrop(xdrop_ws),
        {"v_ws", same ? v_ws : nullptr, n * r * e, e, LF_OPERAND_OUT, same,
         "the n*r workspace of same-dtype adapters"},
        o.mixed_ws(d, 1, mixed_ws),
    };
    return check_operands(be, ops, (int)(sizeof ops / sizeof ops[0]));
}

/* ---------------------------------------------------------------- entry points */

/* forward: u = drop(x)·Aᵀ ; y = x·Wᵀ + bias + s·u·Bᵀ */
static inline int forward(Backend &be, const lf_cuda_lora_desc &d, const void *x, const void *W,
                          const void *bias, const void *A, const void *B, void *y, void *u,
                          void *xdrop_ws, void *mixed_ws) {
    LF_PLAN_TRY(check_forward(be, d, x, W, bias, A, B, y, u, xdrop_ws, mixed_ws));
    const int64_t n = d.n, k = d.k, m = d.m;
    if (n == 0) return LF_OK;
    LF_PLAN_TRY(is_mixed(d) ? forward_mixed(be, d, x, A, B, y, u, xdrop_ws, mixed_ws)
                            : forward_same(be, d, x, A, B, y, u, xdrop_ws));
    /* y = x·Wᵀ + y + bias ⇔ yᵀ = W·xᵀ + yᵀ + bias[row]
     *    W (m,k) row-major is Wᵀ (k×m, ld k) column-major → op T; stored (k,m) (fan_in_fan_out) it
     *    is W (m×k, ld m) column-major → op N. xᵀ = (k×n ld k). Bias epilogue on this GEMM. */
    Gemm g = {"y = x·W^T + bias + y (base GEMM)", d.w_kxm ? OP_N : OP_T, OP_N, m, n, k, 1.0f, W,
              d.w_kxm ? m : k, x, k, 1.0f, y, m, bias, d.dtype, d.dtype};
    return be.gemm(g);
}

/* backward: v = g·B ; dB = s·gᵀ·u ; dA = s·vᵀ·drop(x) ; dx = g·W + s·drop'(v·A) */
static inline int backward(Backend &be, const lf_cuda_lora_desc &d, const void *gy, const void *x,
                           const void *u, const void *W, const void *A, const void *B, void *dx,
                           void *dA, void *dB, void *xdrop_ws, void *v_ws, void *mixed_ws) {
    LF_PLAN_TRY(check_backward(be, d, gy, x, u, W, A, B, dx, dA, dB, xdrop_ws, v_ws, mixed_ws));
    const int64_t n = d.n, k = d.k, m = d.m, r = d.r;
    if (n == 0) {
        const size_t e = dtype_bytes(d.adapter_dtype);
        LF_PLAN_TRY(be.zero("zero dA (n = 0)", dA, (int64_t)(r * k * e)));
        LF_PLAN_TRY(be.zero("zero dB (n = 0)", dB, (int64_t)(m * r * e)));
        return LF_OK;
    }
    LF_PLAN_TRY(is_mixed(d) ? backward_mixed(be, d, gy, x, u, A, B, dx, dA, dB, xdrop_ws, mixed_ws)
                            : backward_same(be, d, gy, x, u, A, B, dx, dA, dB, xdrop_ws, v_ws));
    if (!dx) return LF_OK;
    /* dx = g·W + dx ⇔ dxᵀ = Wᵀ·gᵀ + dxᵀ ; W (m,k) row-major = Wᵀ (k×m ld k) → op N ;
     *    stored (k,m) it is W (m×k ld m) column-major → op T ; gᵀ = (m×n ld m) op N */
    Gemm g = {"dx = g·W + dx (base GEMM)", d.w_kxm ? OP_T : OP_N, OP_N, k, n, m, 1.0f, W, d.w_kxm ? m : k, gy, m,
              1.0f, dx, k, nullptr, d.dtype, d.dtype};
    return be.gemm(g);
}

} /* namespace plan */
} /* namespace lorafuse */

#endif /* LORAFUSE_LORA_PLAN_H */
