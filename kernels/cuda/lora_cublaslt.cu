/* lorafuse — CUDA backend: the LoRA plan (lora_plan.h) on cuBLASLt, plus the dropout kernel.
 *
 * - One cuBLASLt handle per device, created lazily under a mutex; one workspace per
 *   (device, stream), allocated at the first call on that stream (never again on the hot path).
 * - Algorithms from cublasLtMatmulAlgoGetHeuristic are cached per problem (shape, dtype, transposes,
 *   epilogue, pointer alignments), so a steady-state call costs descriptor set-up + launches only.
 * - Everything is enqueued on the caller's stream; nothing synchronises the host.
 * - Every failure returns a status and leaves a thread-local message naming the failing call.
 */
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(LORAFUSE_USE_CUBLASLT_DECLS)
#include "cublaslt_decls.h" /* compile-check only: see that file */
#else
#include <cublasLt.h>
#endif

#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <atomic>
#include <mutex>
#include <unordered_map>

#include "lorafuse/cuda_kernels.h"
#include "lorafuse/dropout_hash.h"
#include "lora_plan.h"

#ifndef LORAFUSE_CUBLASLT_WORKSPACE_BYTES
#define LORAFUSE_CUBLASLT_WORKSPACE_BYTES (32u << 20) /* what torch uses on Hopper */
#endif

namespace {

using lorafuse::plan::Gemm;

/* ---------------------------------------------------------------- errors */

thread_local char t_err[1024];

int set_error(int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t_err, sizeof t_err, fmt, ap);
    va_end(ap);
    return status;
}

int cuda_fail(const char *call, const char *what, cudaError_t e) {
    cudaGetLastError(); /* clear the (non-sticky) error so that torch does not trip on it later */
    return set_error(LF_CUDA_ERR_CUDA, "%s failed (%s): %s (%s, %d)", call, what, cudaGetErrorString(e),
                     cudaGetErrorName(e), (int)e);
}

const char *cublas_status_name(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "CUBLAS_STATUS_<unknown>";
    }
}

int cublas_fail(const char *call, const char *what, cublasStatus_t s) {
    return set_error(LF_CUDA_ERR_CUBLAS, "%s failed (%s): %s (%d)", call, what, cublas_status_name(s), (int)s);
}

#define LF_CUDA_CALL(call, what)                                        \
    do {                                                                \
        cudaError_t lf_e_ = (call);                                     \
        if (lf_e_ != cudaSuccess) return cuda_fail(#call, (what), lf_e_); \
    } while (0)

#define LF_CUBLAS_CALL(name, call, what)                                        \
    do {                                                                        \
        cublasStatus_t lf_s_ = (call);                                          \
        if (lf_s_ != CUBLAS_STATUS_SUCCESS) return cublas_fail(name, (what), lf_s_); \
    } while (0)

/* ---------------------------------------------------------------- device guard */

struct DeviceGuard {
    int prev = -1, status = LF_CUDA_OK;
    bool switched = false;
    explicit DeviceGuard(int device) {
        cudaError_t e = cudaGetDevice(&prev);
        if (e != cudaSuccess) {
            status = cuda_fail("cudaGetDevice", "entering lorafuse CUDA call", e);
            return;
        }
        if (prev != device) {
            e = cudaSetDevice(device);
            if (e != cudaSuccess) {
                status = cuda_fail("cudaSetDevice", "selecting the tensors' device", e);
                return;
            }
            switched = true;
        }
    }
    ~DeviceGuard() {
        if (switched) cudaSetDevice(prev);
    }
};

/* ---------------------------------------------------------------- per-device state */

struct WsKey {
    int device;
    uintptr_t stream;
    bool operator==(const WsKey &o) const { return device == o.device && stream == o.stream; }
};
struct WsKeyHash {
    size_t operator()(const WsKey &k) const { return std::hash<uintptr_t>()(k.stream) * 31u + (size_t)k.device; }
};
struct Workspace {
    void *ptr = nullptr;
    size_t bytes = 0;
};

struct AlgoKey {
    int device, ab_type, c_type, tf32, transa, transb, bias;
    int64_t m, n, k, lda, ldb, ldc;
    int align_a, align_b, align_c, align_bias;
    size_t ws;
    bool operator==(const AlgoKey &o) const { return memcmp(this, &o, sizeof *this) == 0; }
};
struct AlgoKeyHash {
    size_t operator()(const AlgoKey &k) const {
        const unsigned char *p = (const unsigned char *)&k;
        uint64_t h = 1469598103934665603ULL; /* FNV-1a over the (zero-initialised) key */
        for (size_t i = 0; i < sizeof k; ++i) h = (h ^ p[i]) * 1099511628211ULL;
        return (size_t)h;
    }
};
/* What a problem needs at every call after the first: the algorithm and the descriptors (immutable once
 * made; cublasLtMatmul only reads them). `op` is NULL for GEMMs with a bias: the bias pointer is an
 * attribute of the op descriptor, so those get a fresh one per call. Entries live until
 * lf_cuda_release_caches. */
struct AlgoEntry {
    cublasLtMatmulAlgo_t algo;
    bool fallback; /* cuBLASLt declined this problem: use naive_gemm_kernel */
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, c;
};
const size_t kMaxCachedProblems = 4096; /* shapes in a model are few; beyond this, calls are not cached */

std::mutex g_mu;
std::unordered_map<int, cublasLtHandle_t> g_handles;
std::unordered_map<WsKey, Workspace, WsKeyHash> g_ws;
std::unordered_map<AlgoKey, AlgoEntry, AlgoKeyHash> g_algos;
std::atomic<long> g_fallback_gemms{0};

int get_handle(int device, cublasLtHandle_t *out) {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_handles.find(device);
    if (it != g_handles.end()) {
        *out = it->second;
        return LF_CUDA_OK;
    }
    cublasLtHandle_t h = nullptr;
    LF_CUBLAS_CALL("cublasLtCreate", cublasLtCreate(&h), "creating the per-device cuBLASLt handle");
    g_handles[device] = h;
    *out = h;
    return LF_CUDA_OK;
}

/* The workspace is per stream: two streams running GEMMs concurrently must not share one. It is
 * allocated once per (device, stream); if that allocation fails (memory full) the stream runs with
 * no workspace (cuBLASLt then picks algorithms that need none) rather than failing. */
int get_workspace(int device, cudaStream_t stream, Workspace *out) {
    std::lock_guard<std::mutex> lock(g_mu);
    WsKey key{device, (uintptr_t)stream};
    auto it = g_ws.find(key);
    if (it != g_ws.end()) {
        *out = it->second;
        return LF_CUDA_OK;
    }
    Workspace w;
    void *p = nullptr;
    /* Bounded: beyond 64 streams (torch's pools hold 32 per priority), new streams run without a
     * workspace — a workspace cannot be freed while work queued on its stream may still use it. */
    if (g_ws.size() < 64 && cudaMalloc(&p, LORAFUSE_CUBLASLT_WORKSPACE_BYTES) == cudaSuccess) {
        w.ptr = p;
        w.bytes = LORAFUSE_CUBLASLT_WORKSPACE_BYTES;
    } else {
        cudaGetLastError();
    }
    g_ws[key] = w;
    *out = w;
    return LF_CUDA_OK;
}

int alignment_of(const void *p) {
    uintptr_t a = (uintptr_t)p;
    int al = 256;
    while (al > 1 && (a % (uintptr_t)al) != 0) al >>= 1;
    return al;
}

cudaDataType_t data_type(int dtype) {
    switch (dtype) {
    case LF_CUDA_F16: return CUDA_R_16F;
    case LF_CUDA_BF16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
    }
}

/* RAII holders for cuBLASLt descriptors (a pointer set to NULL has been handed over to the cache) */
struct Descs {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulPreference_t pref = nullptr;
    ~Descs() {
        if (pref) cublasLtMatmulPreferenceDestroy(pref);
        if (c) cublasLtMatrixLayoutDestroy(c);
        if (b) cublasLtMatrixLayoutDestroy(b);
        if (a) cublasLtMatrixLayoutDestroy(a);
        if (op) cublasLtMatmulDescDestroy(op);
    }
};

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
int launch_dropout(cudaStream_t stream, int dtype, int64_t rows, int64_t cols, double p, uint64_t seed,
                   bool scaled, float extra, const void *src, void *dst, const char *what) {
    const uint64_t total = (uint64_t)rows * (uint64_t)cols;
    if (total == 0) return LF_CUDA_OK;
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
    LF_CUDA_CALL(cudaGetLastError(), what);
    return LF_CUDA_OK;
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
void naive_gemm(cudaStream_t stream, const Gemm &g) {
    const dim3 block(32, 8);
    int64_t gy = (g.n + block.y - 1) / block.y;
    if (gy > 65535) gy = 65535;
    const dim3 grid((unsigned)((g.m + block.x - 1) / block.x), (unsigned)gy);
    naive_gemm_kernel<T, TC><<<grid, block, 0, stream>>>(g.transa, g.transb, g.m, g.n, g.k, g.alpha, (const T *)g.A,
                                                         g.lda, (const T *)g.B, g.ldb, g.beta, (TC *)g.C, g.ldc,
                                                         (const TC *)g.bias);
}

/* operand types as the plan uses them: (T, T) for T in fp32/fp16/bf16, and (half, fp32 output) */
int launch_naive_gemm(cudaStream_t stream, const Gemm &g) {
    const bool c32 = g.c_type == LF_CUDA_F32;
    switch (g.ab_type) {
    case LF_CUDA_F32: naive_gemm<float, float>(stream, g); break;
    case LF_CUDA_F16: c32 ? naive_gemm<__half, float>(stream, g) : naive_gemm<__half, __half>(stream, g); break;
    default:
        c32 ? naive_gemm<__nv_bfloat16, float>(stream, g) : naive_gemm<__nv_bfloat16, __nv_bfloat16>(stream, g);
        break;
    }
    LF_CUDA_CALL(cudaGetLastError(), g.what);
    return LF_CUDA_OK;
}

/* ---------------------------------------------------------------- fold / split (lora_plan.h FoldSplit) */

struct FoldSplitBatch {
    lorafuse::plan::FoldSplit jobs[lorafuse::plan::LF_PLAN_MAX_JOBS];
};

/* Job blockIdx.y of the batch; one thread per element (i, j) of its rows×cols result:
 *   val = scale·(src[i·ld + j] + src[i·ld + j + half]) ; out[i·cols + j] = val ;
 *   hi = T(val), lo = T(val − hi) ; split[p·part_stride + i·split_ld + j] = bit p of lo_mask ? lo : hi.
 * val − float(hi) is exact in fp32 (hi is val's nearest T value), so hi + lo holds val to 2·T's bits. */
template <typename T>
__global__ void fold_split_kernel(FoldSplitBatch batch) {
    const lorafuse::plan::FoldSplit &f = batch.jobs[blockIdx.y];
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

int launch_fold_split(cudaStream_t stream, const lorafuse::plan::FoldSplit *jobs, int count) {
    if (count < 1 || count > lorafuse::plan::LF_PLAN_MAX_JOBS)
        return set_error(LF_CUDA_ERR_ARG, "fold_split: %d jobs (1..%d)", count, (int)lorafuse::plan::LF_PLAN_MAX_JOBS);
    FoldSplitBatch batch;
    memset(&batch, 0, sizeof batch);
    uint64_t most = 0;
    for (int q = 0; q < count; ++q) {
        batch.jobs[q] = jobs[q];
        if (jobs[q].split && jobs[q].split_type != jobs[0].split_type)
            return set_error(LF_CUDA_ERR_ARG, "fold_split: jobs of one launch split into one type");
        const uint64_t total = (uint64_t)jobs[q].rows * (uint64_t)jobs[q].cols;
        if (total > most) most = total;
    }
    if (most == 0) return LF_CUDA_OK;
    const int threads = 256;
    uint64_t blocks = (most + threads - 1) / threads;
    if (blocks > 65535u * 16u) blocks = 65535u * 16u;
    const dim3 grid((unsigned)blocks, (unsigned)count);
    if (jobs[0].split_type == LF_CUDA_F16)
        fold_split_kernel<__half><<<grid, threads, 0, stream>>>(batch);
    else
        fold_split_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(batch);
    LF_CUDA_CALL(cudaGetLastError(), jobs[0].what);
    return LF_CUDA_OK;
}

/* ---------------------------------------------------------------- the cuBLASLt backend */

struct LtBackend : lorafuse::plan::Backend {
    int device, dtype, tf32;
    cudaStream_t stream;
    cublasLtHandle_t handle = nullptr;
    Workspace ws;

    LtBackend(int dev, cudaStream_t s, int dt, int allow_tf32)
        : device(dev), dtype(dt), tf32(allow_tf32 != 0), stream(s) {}

    int init() {
        int st = get_handle(device, &handle);
        if (st != LF_CUDA_OK) return st;
        return get_workspace(device, stream, &ws);
    }

    /* op descriptor for g: transposes, compute type, and the bias epilogue with g's bias pointer */
    static int make_op(const Gemm &g, cublasComputeType_t ct, cublasLtMatmulDesc_t *out) {
        LF_CUBLAS_CALL("cublasLtMatmulDescCreate", cublasLtMatmulDescCreate(out, ct, CUDA_R_32F), g.what);
        const int32_t ta = g.transa ? CUBLAS_OP_T : CUBLAS_OP_N, tb = g.transb ? CUBLAS_OP_T : CUBLAS_OP_N;
        LF_CUBLAS_CALL("cublasLtMatmulDescSetAttribute(TRANSA)",
                       cublasLtMatmulDescSetAttribute(*out, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), g.what);
        LF_CUBLAS_CALL("cublasLtMatmulDescSetAttribute(TRANSB)",
                       cublasLtMatmulDescSetAttribute(*out, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), g.what);
        if (g.bias) {
            const uint32_t epi = CUBLASLT_EPILOGUE_BIAS;
            LF_CUBLAS_CALL("cublasLtMatmulDescSetAttribute(EPILOGUE)",
                           cublasLtMatmulDescSetAttribute(*out, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi),
                           g.what);
            LF_CUBLAS_CALL("cublasLtMatmulDescSetAttribute(BIAS_POINTER)",
                           cublasLtMatmulDescSetAttribute(*out, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias,
                                                          sizeof g.bias),
                           g.what);
            /* bias dtype: cuBLASLt's default for non-FP8 outputs is D's dtype, which the plan gives it */
        }
        return LF_CUDA_OK;
    }

    /* First call of a problem: descriptors and cublasLtMatmulAlgoGetHeuristic, told the real pointer
     * alignments (views with storage offsets and odd k are less aligned than its 256-byte default). */
    int plan_problem(const Gemm &g, const AlgoKey &key, cublasComputeType_t ct, Descs &d, AlgoEntry *e) {
        const cudaDataType_t dt = data_type(g.ab_type), ct_c = data_type(g.c_type);
        LF_PLAN_TRY(make_op(g, ct, &d.op));
        /* stored shapes: op(A) is m×k, op(B) is k×n, C is m×n (column-major) */
        const uint64_t a_rows = g.transa ? g.k : g.m, a_cols = g.transa ? g.m : g.k;
        const uint64_t b_rows = g.transb ? g.n : g.k, b_cols = g.transb ? g.k : g.n;
        LF_CUBLAS_CALL("cublasLtMatrixLayoutCreate(A)", cublasLtMatrixLayoutCreate(&d.a, dt, a_rows, a_cols, g.lda),
                       g.what);
        LF_CUBLAS_CALL("cublasLtMatrixLayoutCreate(B)", cublasLtMatrixLayoutCreate(&d.b, dt, b_rows, b_cols, g.ldb),
                       g.what);
        LF_CUBLAS_CALL("cublasLtMatrixLayoutCreate(C)",
                       cublasLtMatrixLayoutCreate(&d.c, ct_c, (uint64_t)g.m, (uint64_t)g.n, g.ldc), g.what);
        LF_CUBLAS_CALL("cublasLtMatmulPreferenceCreate", cublasLtMatmulPreferenceCreate(&d.pref), g.what);
        const uint64_t wsb = ws.bytes;
        LF_CUBLAS_CALL("cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)",
                       cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb,
                                                            sizeof wsb),
                       g.what);
        const uint32_t al_a = key.align_a, al_b = key.align_b, al_c = key.align_c;
        LF_CUBLAS_CALL("cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_A_BYTES)",
                       cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a,
                                                            sizeof al_a),
                       g.what);
        LF_CUBLAS_CALL("cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_B_BYTES)",
                       cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b,
                                                            sizeof al_b),
                       g.what);
        LF_CUBLAS_CALL("cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_C_BYTES)",
                       cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c,
                                                            sizeof al_c),
                       g.what);
        LF_CUBLAS_CALL("cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_D_BYTES)",
                       cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c,
                                                            sizeof al_c),
                       g.what);
        cublasLtMatmulHeuristicResult_t res[1];
        memset(res, 0, sizeof res);
        int count = 0;
        const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(handle, d.op, d.a, d.b, d.c, d.c, d.pref, 1, res, &count);
        const bool declined = hs == CUBLAS_STATUS_NOT_SUPPORTED || hs == CUBLAS_STATUS_INVALID_VALUE ||
                              (hs == CUBLAS_STATUS_SUCCESS && (count < 1 || res[0].state != CUBLAS_STATUS_SUCCESS));
        if (!declined && hs != CUBLAS_STATUS_SUCCESS) return cublas_fail("cublasLtMatmulAlgoGetHeuristic", g.what, hs);
        *e = AlgoEntry{res[0].algo, declined, g.bias ? nullptr : d.op, d.a, d.b, d.c};
        if (declined) g_fallback_gemms.fetch_add(1, std::memory_order_relaxed); /* once per problem */
        return LF_CUDA_OK;
    }

    int gemm(const Gemm &g) override {
        if (g.m == 0 || g.n == 0) return LF_CUDA_OK;
        const int use_tf32 = tf32 && g.ab_type == LF_CUDA_F32;
        AlgoKey key;
        memset(&key, 0, sizeof key); /* padding must be zero: the key is hashed and compared bytewise */
        key.device = device; key.ab_type = g.ab_type; key.c_type = g.c_type; key.tf32 = use_tf32;
        key.transa = g.transa; key.transb = g.transb; key.bias = g.bias != nullptr;
        key.m = g.m; key.n = g.n; key.k = g.k; key.lda = g.lda; key.ldb = g.ldb; key.ldc = g.ldc;
        key.align_a = alignment_of(g.A); key.align_b = alignment_of(g.B); key.align_c = alignment_of(g.C);
        key.align_bias = g.bias ? alignment_of(g.bias) : 0;
        key.ws = ws.bytes;
        const cublasComputeType_t ct = use_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;

        AlgoEntry e;
        bool found = false;
        {
            std::lock_guard<std::mutex> lock(g_mu);
            auto it = g_algos.find(key);
            if (it != g_algos.end()) {
                e = it->second;
                found = true;
            }
        }
        Descs fresh; /* this call's descriptors: kept by the cache when the problem is new, else freed */
        if (!found) {
            LF_PLAN_TRY(plan_problem(g, key, ct, fresh, &e));
            std::lock_guard<std::mutex> lock(g_mu);
            if (g_algos.size() < kMaxCachedProblems && g_algos.emplace(key, e).second) {
                if (!g.bias) fresh.op = nullptr; /* owned by the cache now */
                fresh.a = fresh.b = fresh.c = nullptr;
            }
        }
        if (e.fallback) return launch_naive_gemm(stream, g);
        Descs per_call;
        cublasLtMatmulDesc_t op = e.op;
        if (!op) { /* a bias GEMM: its op descriptor carries this call's bias pointer */
            LF_PLAN_TRY(make_op(g, ct, &per_call.op));
            op = per_call.op;
        }
        const float alpha = g.alpha, beta = g.beta;
        LF_CUBLAS_CALL("cublasLtMatmul",
                       cublasLtMatmul(handle, op, &alpha, g.A, e.a, g.B, e.b, &beta, g.C, e.c, g.C, e.c, &e.algo, ws.ptr,
                                      ws.bytes, stream),
                       g.what);
        return LF_CUDA_OK;
    }

    int dropout(const char *what, int64_t rows, int64_t cols, double p, uint64_t seed, bool scaled,
                const void *src, void *dst) override {
        return launch_dropout(stream, dtype, rows, cols, p, seed, scaled, 1.0f, src, dst, what);
    }

    int fold_split(const lorafuse::plan::FoldSplit *jobs, int count) override {
        return launch_fold_split(stream, jobs, count);
    }

    int zero(const char *what, void *ptr, int64_t bytes) override {
        LF_CUDA_CALL(cudaMemsetAsync(ptr, 0, (size_t)bytes, stream), what);
        return LF_CUDA_OK;
    }

    int fail(const char *msg) override { return set_error(LF_CUDA_ERR_ARG, "%s", msg); }
};

} // namespace

/* ---------------------------------------------------------------- C API */

extern "C" {

const char *lf_cuda_last_error(void) { return t_err; }

int lf_cuda_lora_forward(const lf_cuda_lora_desc *d, const void *x, const void *W, const void *bias,
                         const void *A, const void *B, void *y, void *u, void *xdrop_ws, void *mixed_ws) {
    t_err[0] = '\0';
    if (!d) return set_error(LF_CUDA_ERR_ARG, "lf_cuda_lora_forward: desc is NULL");
    LtBackend be(d->device, (cudaStream_t)d->stream, d->dtype, d->allow_tf32);
    int st = lorafuse::plan::check_desc(be, *d); /* argument errors before touching the device */
    if (st != LF_CUDA_OK) return st;
    if (d->n == 0) return LF_CUDA_OK;
    DeviceGuard guard(d->device);
    if (guard.status != LF_CUDA_OK) return guard.status;
    st = be.init();
    if (st != LF_CUDA_OK) return st;
    return lorafuse::plan::forward(be, *d, x, W, bias, A, B, y, u, xdrop_ws, mixed_ws);
}

int lf_cuda_lora_backward(const lf_cuda_lora_desc *d, const void *g, const void *x, const void *u,
                          const void *W, const void *A, const void *B, void *dx, void *dA, void *dB,
                          void *xdrop_ws, void *v_ws, void *mixed_ws) {
    t_err[0] = '\0';
    if (!d) return set_error(LF_CUDA_ERR_ARG, "lf_cuda_lora_backward: desc is NULL");
    LtBackend be(d->device, (cudaStream_t)d->stream, d->dtype, d->allow_tf32);
    int st = lorafuse::plan::check_desc(be, *d); /* argument errors before touching the device */
    if (st != LF_CUDA_OK) return st;
    DeviceGuard guard(d->device);
    if (guard.status != LF_CUDA_OK) return guard.status;
    st = be.init();
    if (st != LF_CUDA_OK) return st;
    return lorafuse::plan::backward(be, *d, g, x, u, W, A, B, dx, dA, dB, xdrop_ws, v_ws, mixed_ws);
}

size_t lf_cuda_lora_mixed_ws_bytes(const lf_cuda_lora_desc *d, int backward) {
    return d ? lorafuse::plan::mixed_ws_bytes(*d, backward) : 0;
}

int lf_cuda_dropout(int device, void *stream, int dtype, int64_t rows, int64_t cols, double p, uint64_t seed,
                    float extra_scale, const void *src, void *dst) {
    t_err[0] = '\0';
    if (rows < 0 || cols < 0) return set_error(LF_CUDA_ERR_ARG, "lf_cuda_dropout: negative size");
    if (!(p >= 0.0 && p < 1.0)) return set_error(LF_CUDA_ERR_ARG, "lf_cuda_dropout: p must be in [0, 1)");
    if (dtype < LF_CUDA_F32 || dtype > LF_CUDA_BF16) return set_error(LF_CUDA_ERR_ARG, "lf_cuda_dropout: bad dtype");
    if ((uint64_t)rows * (uint64_t)cols == 0) return LF_CUDA_OK;
    DeviceGuard guard(device);
    if (guard.status != LF_CUDA_OK) return guard.status;
    return launch_dropout((cudaStream_t)stream, dtype, rows, cols, p, seed, true, extra_scale, src, dst,
                          "lf_cuda_dropout");
}

int lf_cuda_get_versions(lf_cuda_versions *out) {
    t_err[0] = '\0';
    memset(out, 0, sizeof *out);
    out->cudart_compiled = CUDART_VERSION;
    if (cudaRuntimeGetVersion(&out->cudart_runtime) != cudaSuccess) out->cudart_runtime = -1;
    if (cudaDriverGetVersion(&out->driver_version) != cudaSuccess) out->driver_version = -1;
#if defined(CUBLAS_VERSION)
    out->cublaslt_compiled = CUBLAS_VERSION;
#else
    out->cublaslt_compiled = 0;
#endif
    out->cublaslt_runtime = (long)cublasLtGetVersion();
    out->fallback_gemms = g_fallback_gemms.load(std::memory_order_relaxed);
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        cudaGetLastError();
        out->device_count = -1;
        set_error(LF_CUDA_ERR_CUDA, "cudaGetDeviceCount: %s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
    } else {
        out->device_count = count;
    }
    return LF_CUDA_OK;
}

int lf_cuda_release_caches(void) {
    std::lock_guard<std::mutex> lock(g_mu);
    for (auto &kv : g_ws)
        if (kv.second.ptr) cudaFree(kv.second.ptr);
    g_ws.clear();
    for (auto &kv : g_handles) cublasLtDestroy(kv.second);
    g_handles.clear();
    for (auto &kv : g_algos) {
        if (kv.second.op) cublasLtMatmulDescDestroy(kv.second.op);
        if (kv.second.a) cublasLtMatrixLayoutDestroy(kv.second.a);
        if (kv.second.b) cublasLtMatrixLayoutDestroy(kv.second.b);
        if (kv.second.c) cublasLtMatrixLayoutDestroy(kv.second.c);
    }
    g_algos.clear();
    return LF_CUDA_OK;
}

} // extern "C"
