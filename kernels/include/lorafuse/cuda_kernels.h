/* lorafuse — C API of the CUDA kernels (kernels/cuda/). No Python, no exceptions: every entry
 * point returns an lf_status (lorafuse/status.h: LF_OK, or LF_EINVAL for a bad argument, LF_ECUDA /
 * LF_ECUBLAS for a failed CUDA runtime / cuBLASLt call, LF_EINTERNAL for a lorafuse bug); on failure
 * lf_cuda_last_error() (thread-local) names the argument, or the call that failed and the
 * CUDA/cuBLASLt status it returned.
 *
 * Every argument the C side can see is checked before anything touches the device (LF_EINVAL, the
 * message naming the argument): sizes (n >= 0; k, m, r >= 1; every buffer's bytes within int64),
 * the dtype codes, dropout_p in [0, 1) (also as a float), device >= 0, each operand a problem of this
 * size needs non-NULL (the n-row ones only when n > 0; W when dx is wanted; each workspace when the
 * plan uses it), each pointer aligned to its element size, and no output or workspace overlapping
 * another operand (the rule of lorafuse/validate.h, on dense byte extents).
 *
 * Conventions (PyTorch's, see docs/CONTRACTS.md), all buffers dense row-major device memory of the
 * problem's dtype, except A, B, u, dA, dB, which are in adapter_dtype (the same dtype, or float32
 * adapters on a bfloat16 base: PEFT's default for half-precision models, see lora_plan.h):
 *   x (n,k), W (m,k) — or (k,m) when w_kxm != 0 (fan_in_fan_out / a transposed view) —,
 *   bias (m) or NULL, A (r,k), B (m,r), u (n,r), y (n,m), g (n,m), dx (n,k), dA (r,k), dB (m,r).
 *   forward : u = drop(x)·Aᵀ ;  y = x·Wᵀ + bias + scale·u·Bᵀ
 *   backward: v = g·B ; dB = scale·gᵀ·u ; dA = scale·vᵀ·drop(x) ; dx = g·W + scale·drop'(v·A)
 *   drop(x)[i,j] = x[i,j]·mask(i·k+j) — mask from lorafuse/dropout_hash.h (same as the CPU path).
 * Accumulation is fp32 for every dtype; fp32 inputs use TF32 tensor cores only when allow_tf32.
 * Everything is enqueued on `stream` (a cudaStream_t; 0 = legacy default stream) of `device`; no
 * host synchronisation; the only allocation is a cached cuBLASLt workspace per (device, stream),
 * made at the first call on that stream.
 * Workspaces from the caller (NULL where not needed):
 *   xdrop_ws: n·k elements, holds drop(x) when dropout_p > 0;
 *   v_ws: n·r elements (backward, same-dtype adapters);
 *   mixed_ws: lf_cuda_lora_mixed_ws_bytes() bytes (float32 adapters on bf16 only), 4-byte aligned at
 *             least; 256-byte aligned for cuBLASLt's fastest kernels (what torch's allocator gives).
 */
#ifndef LORAFUSE_CUDA_KERNELS_H
#define LORAFUSE_CUDA_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "lorafuse/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { LF_CUDA_F32 = 0, LF_CUDA_F16 = 1, LF_CUDA_BF16 = 2 } lf_cuda_dtype;

typedef struct {
    int device;          /* CUDA device ordinal all pointers live on */
    void *stream;        /* cudaStream_t */
    int dtype;           /* lf_cuda_dtype of x, W, bias, y, g, dx */
    int adapter_dtype;   /* lf_cuda_dtype of A, B, u, dA, dB: dtype, or LF_CUDA_F32 with dtype BF16 */
    int allow_tf32;      /* fp32 only: allow CUBLAS_COMPUTE_32F_FAST_TF32 */
    int64_t n, k, m, r;
    int w_kxm;           /* W stored (k, m) row-major (fan_in_fan_out) instead of (m, k) */
    float scale;
    double dropout_p;    /* in [0, 1) */
    uint64_t seed;
} lf_cuda_lora_desc;

/* y (n,m) and u (n,r) are written. bias may be NULL. */
int lf_cuda_lora_forward(const lf_cuda_lora_desc *d, const void *x, const void *W, const void *bias,
                         const void *A, const void *B, void *y, void *u, void *xdrop_ws, void *mixed_ws);

/* dx may be NULL (not needed). dA (r,k) and dB (m,r) are written (not accumulated). */
int lf_cuda_lora_backward(const lf_cuda_lora_desc *d, const void *g, const void *x, const void *u,
                          const void *W, const void *A, const void *B, void *dx, void *dA, void *dB,
                          void *xdrop_ws, void *v_ws, void *mixed_ws);

/* *bytes = bytes of mixed_ws that forward (backward = 0) or backward (1) needs for this problem (0 when A
 * and B have the problem's dtype). LF_EINVAL when the description is invalid (its sizes, dtypes, p). */
int lf_cuda_lora_mixed_ws_bytes(const lf_cuda_lora_desc *d, int backward, size_t *bytes);

/* dst[i,j] = src[i,j] · mask(seed, i·cols+j) · extra_scale (mask includes 1/(1-p)); rows×cols dense.
 * In place (dst == src) is allowed; any other overlap of src and dst is refused. */
int lf_cuda_dropout(int device, void *stream, int dtype, int64_t rows, int64_t cols, double p,
                    uint64_t seed, float extra_scale, const void *src, void *dst);

/* Versions: compile-time CUDA runtime (CUDART_VERSION), run-time cudaRuntimeGetVersion (-1 on
 * failure), cuBLASLt header version and cublasLtGetVersion(); device count (-1 when the driver
 * refused: no GPU / no driver). */
typedef struct {
    int cudart_compiled, cudart_runtime, driver_version;
    long cublaslt_compiled, cublaslt_runtime;
    int device_count;
    long fallback_gemms; /* distinct GEMM problems cuBLASLt declined (run by the naive fallback kernel) */
} lf_cuda_versions;
int lf_cuda_get_versions(lf_cuda_versions *out);

/* Frees the cached cuBLASLt handles and workspaces (tests; never needed in normal use). */
int lf_cuda_release_caches(void);

/* The calling thread's message about the last failure of an lf_cuda_* call (cleared when a call
 * starts; lf_cuda_get_versions leaves one when it cannot count devices): the detail of the status
 * convention in lorafuse/status.h. */
const char *lf_cuda_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* LORAFUSE_CUDA_KERNELS_H */
