/* lorafuse — the CUDA backend's own small kernels, next to cuBLASLt's GEMMs: the dropout mask, the
 * fallback GEMM for problems cuBLASLt declines, and the fold/split of lora_plan.h's mixed-dtype plan.
 *
 * nvcc only; included by lora_cublaslt.cu (one translation unit). Each launcher enqueues on `stream`
 * and returns cudaGetLastError(): the backend turns a failure into a status and a message.
 */
#ifndef LORAFUSE_SMALL_KERNELS_H
#define LORAFUSE_SMALL_KERNELS_H

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>

#include "lorafuse/cuda_kernels.h"
#include "lorafuse/dropout_hash.h"
#include "lora_plan.h"

namespace lorafuse {
namespace small_kernels {

/* ---------------------------------------------------------------- dropout kernel */

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

/* dst[i] = keep(seed, i) ? src[i]·keep_scale : 0, i = row·cols + col over a dense buffer.
 * Memory-bound; four independent elements per thread per iteration keep loads in flight. */
template <typename T>
__global__ void dropout_kernel(const T *__restrict__ src, T *dst, uint64_t total, uint64_t seed,
                               uint32_t threshold, float keep_scale) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < total; i += 4 * stride) {
        float v[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) v[q] = to_f<T>(src[i + q * stride]);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const uint64_t idx = i + q * stride;
            dst[idx] = from_f<T>(lf_dropout_keep(seed, idx, threshold) ? v[q] * keep_scale : 0.0f);
        }
    }
    for (; i < total; i += stride)
        dst[i] = from_f<T>(lf_dropout_keep(seed, i, threshold) ? to_f<T>(src[i]) * keep_scale : 0.0f);
}

/* kept elements are multiplied by 1/(1-p)·extra when scaled, else kept as they are (the mixed plan's
 * exact bf16 mask, its 1/(1-p) going into a GEMM's alpha) */
static inline cudaError_t launch_dropout(cudaStream_t stream, int dtype, int64_t rows, int64_t cols, double p,
                                         uint64_t seed, bool scaled, float extra, const void *src, void *dst) {
    const uint64_t total = (uint64_t)rows * (uint64_t)cols;
    if (total == 0) return cudaSuccess;
    const uint32_t thr = lf_dropout_threshold((float)p);
    const float keep = scaled ? lf_dropout_scale((float)p) * extra : 1.0f;
    const int threads = 256;
    uint64_t blocks = (total + threads * 4 - 1) / (threads * 4);
    if (blocks > 65535u * 16u) blocks = 65535u * 16u;
    switch (dtype) {
    case LF_CUDA_F32:
        dropout_kernel<float><<<(unsigned)blocks, threads, 0, stream>>>((const float *)src, (float *)dst, total,
                                                                        seed, thr, keep);
        break;
    case LF_CUDA_F16:
        dropout_kernel<__half><<<(unsigned)blocks, threads, 0, stream>>>((const __half *)src, (__half *)dst,
                                                                         total, seed, thr, keep);
        break;
    default:
        dropout_kernel<__nv_bfloat16><<<(unsigned)blocks, threads, 0, stream>>>(
            (const __nv_bfloat16 *)src, (__nv_bfloat16 *)dst, total, seed, thr, keep);
        break;
    }
    return cudaGetLastError();
}

/* ---------------------------------------------------------------- fallback GEMM */

/* Column-major C(m×n) = alpha·op(A)·op(B) + beta·C + bias[row], fp32 accumulation: the same semantics
 * (and indexing) as plan_reference.cpp. Used only for problems cuBLASLt's heuristic declines (it has
 * been seen to refuse a dimension of 1 with some epilogues: r = 1, n = 1), so that every shape works;
 * one thread per element of C, consecutive threads on consecutive rows (coalesced C). */
template <typename T, typename TC>
__global__ void naive_gemm_kernel(int transa, int transb, int64_t m, int64_t n, int64_t k, float alpha,
                                  const T *A, int64_t lda, const T *B, int64_t ldb, float beta, TC *C,
                                  int64_t ldc, const TC *bias) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= m) return;
    for (int64_t j = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; j < n; j += (int64_t)gridDim.y * blockDim.y) {
        float acc = 0.0f;
        for (int64_t p = 0; p < k; ++p) {
            const float a = to_f<T>(transa ? A[p + i * lda] : A[i + p * lda]);
            const float b = to_f<T>(transb ? B[j + p * ldb] : B[p + j * ldb]);
            acc = fmaf(a, b, acc);
        }
        float c = alpha * acc;
        if (beta != 0.0f) c += beta * to_f<TC>(C[i + j * ldc]);
        if (bias) c += to_f<TC>(bias[i]);
        C[i + j * ldc] = from_f<TC>(c);
    }
}

template <typename T, typename TC>
void naive_gemm(cudaStream_t stream, const plan::Gemm &g) {
    const dim3 block(32, 8);
    int64_t gy = (g.n + block.y - 1) / block.y;
    if (gy > 65535) gy = 65535;
    const dim3 grid((unsigned)((g.m + block.x - 1) / block.x), (unsigned)gy);
    naive_gemm_kernel<T, TC><<<grid, block, 0, stream>>>(g.transa, g.transb, g.m, g.n, g.k, g.alpha, (const T *)g.A,
                                                         g.lda, (const T *)g.B, g.ldb, g.beta, (TC *)g.C, g.ldc,
                                                         (const TC *)g.bias);
}

/* operand types as the plan uses them: (T, T) for T in fp32/fp16/bf16, and (half, fp32 output) */
static inline cudaError_t launch_naive_gemm(cudaStream_t stream, const plan::Gemm &g) {
    const bool c32 = g.c_type == LF_CUDA_F32;
    switch (g.ab_type) {
    case LF_CUDA_F32: naive_gemm<float, float>(stream, g); break;
    case LF_CUDA_F16: c32 ? naive_gemm<__half, float>(stream, g) : naive_gemm<__half, __half>(stream, g); break;
    default:
        c32 ? naive_gemm<__nv_bfloat16, float>(stream, g) : naive_gemm<__nv_bfloat16, __nv_bfloat16>(stream, g);
        break;
    }
    return cudaGetLastError();
}

/* ---------------------------------------------------------------- fold / split (lora_plan.h FoldSplit) */

struct FoldSplitBatch {
    plan::FoldSplit jobs[plan::LF_PLAN_MAX_JOBS];
};

/* Job blockIdx.y of the batch; one thread per element (i, j) of its rows×cols result:
 *   val = scale·(src[i·ld + j] + src[i·ld + j + half]) ; out[i·cols + j] = val ;
 *   hi = T(val), lo = T(val − hi) ; split[p·part_stride + i·split_ld + j] = bit p of lo_mask ? lo : hi.
 * val − float(hi) is exact in fp32 (hi is val's nearest T value), so hi + lo holds val to 2·T's bits. */
template <typename T>
__global__ void fold_split_kernel(FoldSplitBatch batch) {
    const plan::FoldSplit &f = batch.jobs[blockIdx.y];
    const uint64_t total = (uint64_t)f.rows * (uint64_t)f.cols, stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t e = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int64_t i = (int64_t)(e / (uint64_t)f.cols), j = (int64_t)(e % (uint64_t)f.cols);
        const float *s = f.src + i * f.src_ld + j;
        const float val = f.scale * (f.half ? s[0] + s[f.half] : s[0]);
        if (f.out) f.out[e] = val;
        if (f.split) {
            const T hi = from_f<T>(val), lo = from_f<T>(val - to_f<T>(hi));
            T *dst = (T *)f.split + i * f.split_ld + j;
            for (int p = 0; p < f.nparts; ++p) dst[p * f.part_stride] = ((f.lo_mask >> p) & 1u) ? lo : hi;
        }
    }
}

/* `count` jobs (1..LF_PLAN_MAX_JOBS, splitting into one type: the caller checks) in one launch */
static inline cudaError_t launch_fold_split(cudaStream_t stream, const plan::FoldSplit *jobs, int count) {
    FoldSplitBatch batch;
    memset(&batch, 0, sizeof batch);
    uint64_t most = 0;
    for (int q = 0; q < count; ++q) {
        batch.jobs[q] = jobs[q];
        const uint64_t total = (uint64_t)jobs[q].rows * (uint64_t)jobs[q].cols;
        if (total > most) most = total;
    }
    if (most == 0) return cudaSuccess;
    const int threads = 256;
    uint64_t blocks = (most + threads - 1) / threads;
    if (blocks > 65535u * 16u) blocks = 65535u * 16u;
    const dim3 grid((unsigned)blocks, (unsigned)count);
    if (jobs[0].split_type == LF_CUDA_F16)
        fold_split_kernel<__half><<<grid, threads, 0, stream>>>(batch);
    else
        fold_split_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(batch);
    return cudaGetLastError();
}

} /* namespace small_kernels */
} /* namespace lorafuse */

#endif /* LORAFUSE_SMALL_KERNELS_H */
