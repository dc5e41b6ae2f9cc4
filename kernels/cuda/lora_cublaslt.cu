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
#include "small_kernels.h"

#ifndef LORAFUSE_CUBLASLT_WORKSPACE_BYTES
#define LORAFUSE_CUBLASLT_WORKSPACE_BYTES (32u << 20) /* what torch uses on Hopper */
#endif

namespace {

using lorafuse::plan::Gemm;
namespace small = lorafuse::small_kernels;

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
    return set_error(LF_ECUDA, "%s failed (%s): %s (%s, %d)", call, what, cudaGetErrorString(e),
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
    return set_error(LF_ECUBLAS, "%s failed (%s): %s (%d)", call, what, cublas_status_name(s), (int)s);
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
    int prev = -1, status = LF_OK;
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
        return LF_OK;
    }
    cublasLtHandle_t h = nullptr;
    LF_CUBLAS_CALL("cublasLtCreate", cublasLtCreate(&h), "creating the per-device cuBLASLt handle");
    g_handles[device] = h;
    *out = h;
    return LF_OK;
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
        return LF_OK;
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
    return LF_OK;
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
        if (st != LF_OK) return st;
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
        return LF_OK;
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
        const struct {
            cublasLtMatmulPreferenceAttributes_t attr;
            uint32_t bytes;
        } aligns[4] = {{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, (uint32_t)key.align_a},
                       {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, (uint32_t)key.align_b},
                       {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, (uint32_t)key.align_c},
                       {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, (uint32_t)key.align_c}}; /* D is C */
        for (const auto &al : aligns)
            LF_CUBLAS_CALL("cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_*_BYTES)",
                           cublasLtMatmulPreferenceSetAttribute(d.pref, al.attr, &al.bytes, sizeof al.bytes), g.what);
        cublasLtMatmulHeuristicResult_t res[1];
        memset(res, 0, sizeof res);
        int count = 0;
        const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(handle, d.op, d.a, d.b, d.c, d.c, d.pref, 1, res, &count);
        const bool declined = hs == CUBLAS_STATUS_NOT_SUPPORTED || hs == CUBLAS_STATUS_INVALID_VALUE ||
                              (hs == CUBLAS_STATUS_SUCCESS && (count < 1 || res[0].state != CUBLAS_STATUS_SUCCESS));
        if (!declined && hs != CUBLAS_STATUS_SUCCESS) return cublas_fail("cublasLtMatmulAlgoGetHeuristic", g.what, hs);
        *e = AlgoEntry{res[0].algo, declined, g.bias ? nullptr : d.op, d.a, d.b, d.c};
        if (declined) g_fallback_gemms.fetch_add(1, std::memory_order_relaxed); /* once per problem */
        return LF_OK;
    }

    int gemm(const Gemm &g) override {
        if (g.m == 0 || g.n == 0) return LF_OK;
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
        if (e.fallback) {
            LF_CUDA_CALL(small::launch_naive_gemm(stream, g), g.what);
            return LF_OK;
        }
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
        return LF_OK;
    }

    int dropout(const char *what, int64_t rows, int64_t cols, double p, uint64_t seed, bool scaled,
                const void *src, void *dst) override {
        LF_CUDA_CALL(small::launch_dropout(stream, dtype, rows, cols, p, seed, scaled, 1.0f, src, dst), what);
        return LF_OK;
    }

    int fold_split(const lorafuse::plan::FoldSplit *jobs, int count) override {
        if (count < 1 || count > lorafuse::plan::LF_PLAN_MAX_JOBS)
            return set_error(LF_EINTERNAL, "fold_split: %d jobs (1..%d)", count, (int)lorafuse::plan::LF_PLAN_MAX_JOBS);
        for (int q = 1; q < count; ++q)
            if (jobs[q].split && jobs[q].split_type != jobs[0].split_type)
                return set_error(LF_EINTERNAL, "fold_split: jobs of one launch split into one type");
        LF_CUDA_CALL(small::launch_fold_split(stream, jobs, count), jobs[0].what);
        return LF_OK;
    }

    int zero(const char *what, void *ptr, int64_t bytes) override {
        LF_CUDA_CALL(cudaMemsetAsync(ptr, 0, (size_t)bytes, stream), what);
        return LF_OK;
    }

    int fail(const char *msg) override { return set_error(LF_EINVAL, "%s", msg); }
};

} // namespace

/* ---------------------------------------------------------------- C API */

extern "C" {

const char *lf_cuda_last_error(void) { return t_err; }

int lf_cuda_lora_forward(const lf_cuda_lora_desc *d, const void *x, const void *W, const void *bias,
                         const void *A, const void *B, void *y, void *u, void *xdrop_ws, void *mixed_ws) {
    t_err[0] = '\0';
    if (!d) return set_error(LF_EINVAL, "desc is NULL");
    LtBackend be(d->device, (cudaStream_t)d->stream, d->dtype, d->allow_tf32);
    /* every argument error before touching the device (plan::forward checks again: cheap) */
    int st = lorafuse::plan::check_forward(be, *d, x, W, bias, A, B, y, u, xdrop_ws, mixed_ws);
    if (st != LF_OK) return st;
    if (d->n == 0) return LF_OK;
    DeviceGuard guard(d->device);
    if (guard.status != LF_OK) return guard.status;
    st = be.init();
    if (st != LF_OK) return st;
    return lorafuse::plan::forward(be, *d, x, W, bias, A, B, y, u, xdrop_ws, mixed_ws);
}

int lf_cuda_lora_backward(const lf_cuda_lora_desc *d, const void *g, const void *x, const void *u,
                          const void *W, const void *A, const void *B, void *dx, void *dA, void *dB,
                          void *xdrop_ws, void *v_ws, void *mixed_ws) {
    t_err[0] = '\0';
    if (!d) return set_error(LF_EINVAL, "desc is NULL");
    LtBackend be(d->device, (cudaStream_t)d->stream, d->dtype, d->allow_tf32);
    int st = lorafuse::plan::check_backward(be, *d, g, x, u, W, A, B, dx, dA, dB, xdrop_ws, v_ws, mixed_ws);
    if (st != LF_OK) return st;
    DeviceGuard guard(d->device);
    if (guard.status != LF_OK) return guard.status;
    st = be.init();
    if (st != LF_OK) return st;
    return lorafuse::plan::backward(be, *d, g, x, u, W, A, B, dx, dA, dB, xdrop_ws, v_ws, mixed_ws);
}

int lf_cuda_lora_mixed_ws_bytes(const lf_cuda_lora_desc *d, int backward, size_t *bytes) {
    t_err[0] = '\0';
    if (!d || !bytes) return set_error(LF_EINVAL, d ? "bytes is NULL" : "desc is NULL");
    *bytes = 0;
    LtBackend be(d->device, (cudaStream_t)d->stream, d->dtype, d->allow_tf32);
    const int st = lorafuse::plan::check_desc(be, *d);
    if (st == LF_OK) *bytes = lorafuse::plan::mixed_ws_bytes(*d, backward);
    return st;
}

int lf_cuda_dropout(int device, void *stream, int dtype, int64_t rows, int64_t cols, double p, uint64_t seed,
                    float extra_scale, const void *src, void *dst) {
    t_err[0] = '\0';
    if (device < 0) return set_error(LF_EINVAL, "device must be >= 0, got %d", device);
    if (rows < 0 || cols < 0) return set_error(LF_EINVAL, "rows and cols must be >= 0, got %lld, %lld",
                                               (long long)rows, (long long)cols);
    if (!(p >= 0.0 && p < 1.0 && (float)p < 1.0f)) return set_error(LF_EINVAL, "p must be in [0, 1), got %g", p);
    if (dtype != LF_CUDA_F32 && dtype != LF_CUDA_F16 && dtype != LF_CUDA_BF16)
        return set_error(LF_EINVAL, "dtype: unknown dtype code %d (0 float32, 1 float16, 2 bfloat16)", dtype);
    const int64_t e = (int64_t)lorafuse::plan::dtype_bytes(dtype);
    int64_t bytes = 0;
    if (lf_mul_i64(rows, cols, &bytes) || lf_mul_i64(bytes, e, &bytes))
        return set_error(LF_EINVAL, "rows*cols = %lld*%lld elements overflow int64 bytes",
                         (long long)rows, (long long)cols);
    /* in place (dst == src) is allowed: then dst alone is checked */
    const lf_operand ops[2] = {{"dst", dst, bytes, e, LF_OPERAND_OUT, bytes > 0, nullptr},
                               {"src", src, bytes, e, LF_OPERAND_IN, bytes > 0, nullptr}};
    char msg[256];
    if (lf_check_operands(ops, src == dst ? 1 : 2, msg, sizeof msg) != LF_OK) return set_error(LF_EINVAL, "%s", msg);
    if (bytes == 0) return LF_OK;
    DeviceGuard guard(device);
    if (guard.status != LF_OK) return guard.status;
    LF_CUDA_CALL(small::launch_dropout((cudaStream_t)stream, dtype, rows, cols, p, seed, true, extra_scale, src, dst),
                 "lf_cuda_dropout");
    return LF_OK;
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
        set_error(LF_ECUDA, "cudaGetDeviceCount: %s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
    } else {
        out->device_count = count;
    }
    return LF_OK;
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
    return LF_OK;
}

} // extern "C"
