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

#include <stdint.h>
#include "lorafuse/cuda_kernels.h"

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
    const void *bias;
};

struct Backend {
    virtual ~Backend() {}
    virtual int gemm(const Gemm &g) = 0;
    /* dst = src ⊙ mask(seed, i·cols+j) · (1/(1-p)) · extra — dense rows×cols; dst may equal src. */
    virtual int dropout(const char *what, int64_t rows, int64_t cols, double p, uint64_t seed,
                        float extra, const void *src, void *dst) = 0;
    virtual int zero(const char *what, void *ptr, int64_t elems) = 0;
    virtual int fail(const char *msg) = 0; /* records an argument error, returns LF_CUDA_ERR_ARG */
};

#define LF_PLAN_TRY(expr)                  \
    do {                                   \
        int lf_st_ = (expr);               \
        if (lf_st_ != LF_CUDA_OK) return lf_st_; \
    } while (0)

static inline int check_desc(Backend &be, const lf_cuda_lora_desc &d) {
    if (d.n < 0) return be.fail("n must be >= 0");
    if (d.k < 1 || d.m < 1 || d.r < 1) return be.fail("k, m and r must be >= 1");
    if (!(d.dropout_p >= 0.0 && d.dropout_p < 1.0)) return be.fail("dropout_p must be in [0, 1)");
    if (d.dtype < LF_CUDA_F32 || d.dtype > LF_CUDA_BF16) return be.fail("unknown dtype code");
    return LF_CUDA_OK;
}

/* forward: u = drop(x)·Aᵀ ; y = x·Wᵀ + bias + s·u·Bᵀ */
static inline int forward(Backend &be, const lf_cuda_lora_desc &d, const void *x, const void *W,
                          const void *bias, const void *A, const void *B, void *y, void *u,
                          void *xdrop_ws) {
    LF_PLAN_TRY(check_desc(be, d));
    const int64_t n = d.n, k = d.k, m = d.m, r = d.r;
    if (n == 0) return LF_CUDA_OK;
    if (!x || !W || !A || !B || !y || !u) return be.fail("forward: a required pointer is NULL");
    const void *xd = x;
    if (d.dropout_p > 0.0) {
        if (!xdrop_ws) return be.fail("forward: dropout_p > 0 needs the n*k workspace xdrop_ws");
        LF_PLAN_TRY(be.dropout("dropout(x) in forward", n, k, d.dropout_p, d.seed, 1.0f, x, xdrop_ws));
        xd = xdrop_ws;
    }
    /* 1. u = xd·Aᵀ   ⇔ uᵀ(r×n, ld r) = A·xdᵀ ; A = op_T(Aᵀ: k×r ld k), xdᵀ = (k×n ld k) */
    {
        Gemm g = {"u = drop(x)·A^T", OP_T, OP_N, r, n, k, 1.0f, A, k, xd, k, 0.0f, u, r, nullptr};
        LF_PLAN_TRY(be.gemm(g));
    }
    /* 2. y = s·u·Bᵀ  ⇔ yᵀ(m×n, ld m) = s·B·uᵀ ; B = op_T(Bᵀ: r×m ld r), uᵀ = (r×n ld r).
     *    K = r: a thin, memory-bound GEMM that writes y once. The low-rank term goes first so that
     *    the base GEMM below adds it in its epilogue (beta = 1) and rounds y once, after the sum. */
    {
        Gemm g = {"y = s·u·B^T", OP_T, OP_N, m, n, r, d.scale, B, r, u, r, 0.0f, y, m, nullptr};
        LF_PLAN_TRY(be.gemm(g));
    }
    /* 3. y = x·Wᵀ + y + bias ⇔ yᵀ = W·xᵀ + yᵀ + bias[row]
     *    W (m,k) row-major is Wᵀ (k×m, ld k) column-major → op T; stored (k,m) (fan_in_fan_out) it
     *    is W (m×k, ld m) column-major → op N. xᵀ = (k×n ld k). Bias epilogue on this GEMM. */
    {
        Gemm g = {"y = x·W^T + bias + y (base GEMM)", d.w_kxm ? OP_N : OP_T, OP_N, m, n, k, 1.0f, W,
                  d.w_kxm ? m : k, x, k, 1.0f, y, m, bias};
        LF_PLAN_TRY(be.gemm(g));
    }
    return LF_CUDA_OK;
}

/* backward: v = g·B ; dB = s·gᵀ·u ; dA = s·vᵀ·drop(x) ; dx = g·W + s·drop'(v·A) */
static inline int backward(Backend &be, const lf_cuda_lora_desc &d, const void *gy, const void *x,
                           const void *u, const void *W, const void *A, const void *B, void *dx,
                           void *dA, void *dB, void *xdrop_ws, void *v_ws) {
    LF_PLAN_TRY(check_desc(be, d));
    const int64_t n = d.n, k = d.k, m = d.m, r = d.r;
    if (!dA || !dB) return be.fail("backward: dA and dB are required");
    if (n == 0) {
        LF_PLAN_TRY(be.zero("zero dA (n = 0)", dA, r * k));
        LF_PLAN_TRY(be.zero("zero dB (n = 0)", dB, m * r));
        return LF_CUDA_OK;
    }
    if (!gy || !x || !u || !A || !B || !v_ws) return be.fail("backward: a required pointer is NULL");
    if (dx && !W) return be.fail("backward: dx needs W");
    /* 4. v = g·B ⇔ vᵀ(r×n, ld r) = Bᵀ·gᵀ ; Bᵀ = (r×m ld r) op N ; gᵀ = (m×n ld m) op N */
    {
        Gemm g = {"v = g·B", OP_N, OP_N, r, n, m, 1.0f, B, r, gy, m, 0.0f, v_ws, r, nullptr};
        LF_PLAN_TRY(be.gemm(g));
    }
    /* 5. dB = s·gᵀ·u ⇔ dBᵀ(r×m, ld r) = s·uᵀ·g ; uᵀ = (r×n ld r) op N ; g = op_T(gᵀ: m×n ld m) */
    {
        Gemm g = {"dB = s·g^T·u", OP_N, OP_T, r, m, n, d.scale, u, r, gy, m, 0.0f, dB, r, nullptr};
        LF_PLAN_TRY(be.gemm(g));
    }
    /* 6. dA = s·vᵀ·xd ⇔ dAᵀ(k×r, ld k) = s·xdᵀ·v ; xdᵀ = (k×n ld k) op N ; v = op_T(vᵀ: r×n ld r) */
    {
        const void *xd = x;
        if (d.dropout_p > 0.0) {
            if (!xdrop_ws) return be.fail("backward: dropout_p > 0 needs the n*k workspace xdrop_ws");
            LF_PLAN_TRY(be.dropout("dropout(x) regenerated in backward", n, k, d.dropout_p, d.seed, 1.0f,
                                   x, xdrop_ws));
            xd = xdrop_ws;
        }
        Gemm g = {"dA = s·v^T·drop(x)", OP_N, OP_T, k, r, n, d.scale, xd, k, v_ws, r, 0.0f, dA, k, nullptr};
        LF_PLAN_TRY(be.gemm(g));
    }
    if (!dx) return LF_CUDA_OK;
    /* 7. dx = s·v·A ⇔ dxᵀ(k×n, ld k) = s·Aᵀ·vᵀ ; Aᵀ = (k×r ld k) op N ; vᵀ = (r×n ld r) op N */
    {
        Gemm g = {"dx = s·v·A", OP_N, OP_N, k, n, r, d.scale, A, k, v_ws, r, 0.0f, dx, k, nullptr};
        LF_PLAN_TRY(be.gemm(g));
    }
    if (d.dropout_p > 0.0)
        LF_PLAN_TRY(be.dropout("dropout'(s·v·A) in backward", n, k, d.dropout_p, d.seed, 1.0f, dx, dx));
    /* 8. dx = g·W + dx ⇔ dxᵀ = Wᵀ·gᵀ + dxᵀ ; W (m,k) row-major = Wᵀ (k×m ld k) → op N ;
     *    stored (k,m) it is W (m×k ld m) column-major → op T ; gᵀ = (m×n ld m) op N */
    {
        Gemm g = {"dx = g·W + dx (base GEMM)", d.w_kxm ? OP_T : OP_N, OP_N, k, n, m, 1.0f, W,
                  d.w_kxm ? m : k, gy, m, 1.0f, dx, k, nullptr};
        LF_PLAN_TRY(be.gemm(g));
    }
    return LF_CUDA_OK;
}

} /* namespace plan */
} /* namespace lorafuse */

#endif /* LORAFUSE_LORA_PLAN_H */
