/* lorafuse._C_cuda — CPython binding of the CUDA kernels (kernels/include/lorafuse/cuda_kernels.h).
 *
 * Thin: it takes raw device addresses, sizes, the dtype code and the caller's stream as Python ints.
 * What only tensors show (device agreement, torch dtypes, shapes, contiguity) is checked by
 * python/lorafuse/cuda.py; everything the raw arguments show — sizes and their products, dtype
 * codes, dropout_p, NULL operands and workspaces, alignment, outputs overlapping other operands — is
 * checked by the kernels' C API before anything touches the device (lorafuse/validate.h, the plan's
 * check_forward / check_backward). This file releases the GIL, calls the kernels and turns a status
 * into an exception by the one mapping of csrc/status_py.h: LF_EINVAL -> ValueError naming the
 * argument; LF_ECUDA / LF_ECUBLAS -> lorafuse._C_cuda.CudaError (a RuntimeError) naming the failing
 * call. No CUDA header is included here: the module compiles with the plain C compiler.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#include "lorafuse/cuda_kernels.h"
#include "status_py.h"

#ifndef LORAFUSE_CUDA_ARCHS
#define LORAFUSE_CUDA_ARCHS "unknown"
#endif
#ifndef LORAFUSE_NVCC_VERSION
#define LORAFUSE_NVCC_VERSION "unknown"
#endif
#ifndef LORAFUSE_CUBLASLT_SOURCE
#define LORAFUSE_CUBLASLT_SOURCE "unknown"
#endif

static PyObject *CudaError = NULL;

/* entry: "lorafuse CUDA lora_forward" */
static PyObject *raise_status(int status, const char *entry) {
    return lf_py_status_error(status, entry, lf_cuda_last_error(), CudaError);
}

#define PTR(v) ((void *)(uintptr_t)(v))

/* The problem description both entry points pass to the kernels. */
static lf_cuda_lora_desc make_desc(int device, unsigned long long stream, int dtype, int adapter_dtype,
                                   int allow_tf32, long long n, long long k, long long m, long long r, int w_kxm,
                                   float scale, double p, unsigned long long seed) {
    lf_cuda_lora_desc d;
    d.device = device; d.stream = PTR(stream); d.dtype = dtype; d.adapter_dtype = adapter_dtype;
    d.allow_tf32 = allow_tf32;
    d.n = n; d.k = k; d.m = m; d.r = r; d.w_kxm = w_kxm; d.scale = scale; d.dropout_p = p; d.seed = seed;
    return d;
}

static PyObject *py_lora_forward(PyObject *self, PyObject *args) {
    (void)self;
    int device, dtype, adapter_dtype, allow_tf32, w_kxm;
    unsigned long long stream, seed, x, W, bias, A, B, y, u, xdrop, mixed;
    long long n, k, m, r;
    float scale;
    double p;
    if (!PyArg_ParseTuple(args, "iKiiiLLLLifdKKKKKKKKKK:lora_forward", &device, &stream, &dtype, &adapter_dtype,
                          &allow_tf32, &n, &k, &m, &r, &w_kxm, &scale, &p, &seed, &x, &W, &bias, &A, &B, &y, &u,
                          &xdrop, &mixed))
        return NULL;
    const lf_cuda_lora_desc d =
        make_desc(device, stream, dtype, adapter_dtype, allow_tf32, n, k, m, r, w_kxm, scale, p, seed);
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = lf_cuda_lora_forward(&d, PTR(x), PTR(W), PTR(bias), PTR(A), PTR(B), PTR(y), PTR(u), PTR(xdrop), PTR(mixed));
    Py_END_ALLOW_THREADS
    if (st != LF_OK) return raise_status(st, "lorafuse CUDA lora_forward");
    Py_RETURN_NONE;
}

static PyObject *py_lora_backward(PyObject *self, PyObject *args) {
    (void)self;
    int device, dtype, adapter_dtype, allow_tf32, w_kxm;
    unsigned long long stream, seed, g, x, u, W, A, B, dx, dA, dB, xdrop, vws, mixed;
    long long n, k, m, r;
    float scale;
    double p;
    if (!PyArg_ParseTuple(args, "iKiiiLLLLifdKKKKKKKKKKKKK:lora_backward", &device, &stream, &dtype, &adapter_dtype,
                          &allow_tf32, &n, &k, &m, &r, &w_kxm, &scale, &p, &seed, &g, &x, &u, &W, &A, &B, &dx, &dA,
                          &dB, &xdrop, &vws, &mixed))
        return NULL;
    const lf_cuda_lora_desc d =
        make_desc(device, stream, dtype, adapter_dtype, allow_tf32, n, k, m, r, w_kxm, scale, p, seed);
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = lf_cuda_lora_backward(&d, PTR(g), PTR(x), PTR(u), PTR(W), PTR(A), PTR(B), PTR(dx), PTR(dA), PTR(dB),
                               PTR(xdrop), PTR(vws), PTR(mixed));
    Py_END_ALLOW_THREADS
    if (st != LF_OK) return raise_status(st, "lorafuse CUDA lora_backward");
    Py_RETURN_NONE;
}

static PyObject *py_mixed_ws_bytes(PyObject *self, PyObject *args) {
    (void)self;
    int dtype, adapter_dtype, backward;
    long long n, k, m, r;
    if (!PyArg_ParseTuple(args, "iiLLLLp:mixed_ws_bytes", &dtype, &adapter_dtype, &n, &k, &m, &r, &backward))
        return NULL;
    const lf_cuda_lora_desc d = make_desc(0, 0, dtype, adapter_dtype, 0, n, k, m, r, 0, 1.0f, 0.0, 0);
    size_t bytes = 0;
    const int st = lf_cuda_lora_mixed_ws_bytes(&d, backward, &bytes);
    if (st != LF_OK) return raise_status(st, "lorafuse CUDA mixed_ws_bytes");
    return PyLong_FromSize_t(bytes);
}

static PyObject *py_dropout(PyObject *self, PyObject *args) {
    (void)self;
    int device, dtype;
    unsigned long long stream, seed, src, dst;
    long long rows, cols;
    double p;
    float extra;
    if (!PyArg_ParseTuple(args, "iKiLLdKfKK:dropout", &device, &stream, &dtype, &rows, &cols, &p, &seed, &extra,
                          &src, &dst))
        return NULL;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = lf_cuda_dropout(device, PTR(stream), dtype, rows, cols, p, seed, extra, PTR(src), PTR(dst));
    Py_END_ALLOW_THREADS
    if (st != LF_OK) return raise_status(st, "lorafuse CUDA dropout");
    Py_RETURN_NONE;
}

static PyObject *py_versions(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    lf_cuda_versions v;
    lf_cuda_get_versions(&v);
    const char *err = lf_cuda_last_error();
    return Py_BuildValue("{s:i,s:i,s:i,s:l,s:l,s:i,s:l,s:s,s:s,s:s,s:s}", "cudart_compiled", v.cudart_compiled,
                         "cudart_runtime", v.cudart_runtime, "driver", v.driver_version, "cublaslt_compiled",
                         v.cublaslt_compiled, "cublaslt_runtime", v.cublaslt_runtime, "device_count",
                         v.device_count, "fallback_gemms", v.fallback_gemms, "device_error", err ? err : "", "archs", LORAFUSE_CUDA_ARCHS, "nvcc",
                         LORAFUSE_NVCC_VERSION, "cublaslt_source", LORAFUSE_CUBLASLT_SOURCE);
}

static PyObject *py_release_caches(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    lf_cuda_release_caches();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"lora_forward", py_lora_forward, METH_VARARGS,
     "lora_forward(device, stream, dtype, adapter_dtype, allow_tf32, n, k, m, r, w_kxm, scale, dropout_p, seed,\n"
     "             x, W, bias, A, B, y, u, xdrop_ws, mixed_ws) -- raw device addresses; use lorafuse.cuda."},
    {"lora_backward", py_lora_backward, METH_VARARGS,
     "lora_backward(device, stream, dtype, adapter_dtype, allow_tf32, n, k, m, r, w_kxm, scale, dropout_p,\n"
     "              seed, g, x, u, W, A, B, dx, dA, dB, xdrop_ws, v_ws, mixed_ws) -- raw device addresses."},
    {"mixed_ws_bytes", py_mixed_ws_bytes, METH_VARARGS,
     "mixed_ws_bytes(dtype, adapter_dtype, n, k, m, r, backward) -- bytes of the mixed-dtype workspace."},
    {"dropout", py_dropout, METH_VARARGS,
     "dropout(device, stream, dtype, rows, cols, p, seed, extra_scale, src, dst) -- dst = src*mask*extra."},
    {"versions", py_versions, METH_NOARGS, "Compile- and run-time CUDA/cuBLASLt versions, device count, archs."},
    {"release_caches", py_release_caches, METH_NOARGS, "Free cached cuBLASLt handles and workspaces."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "lorafuse._C_cuda",
                                       "lorafuse CUDA kernels (cuBLASLt); see lorafuse.cuda.", -1, methods,
                                       NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__C_cuda(void) {
    PyObject *mod = PyModule_Create(&moduledef);
    if (!mod) return NULL;
    CudaError = PyErr_NewExceptionWithDoc("lorafuse._C_cuda.CudaError",
                                          "A CUDA runtime or cuBLASLt call made by lorafuse failed.",
                                          PyExc_RuntimeError, NULL);
    if (!CudaError || PyModule_AddObject(mod, "CudaError", CudaError) < 0) {
        Py_XDECREF(CudaError);
        Py_DECREF(mod);
        return NULL;
    }
    Py_INCREF(CudaError);
    PyModule_AddStringConstant(mod, "ARCHS", LORAFUSE_CUDA_ARCHS);
    PyModule_AddStringConstant(mod, "NVCC_VERSION", LORAFUSE_NVCC_VERSION);
    PyModule_AddIntConstant(mod, "DTYPE_F32", LF_CUDA_F32);
    PyModule_AddIntConstant(mod, "DTYPE_F16", LF_CUDA_F16);
    PyModule_AddIntConstant(mod, "DTYPE_BF16", LF_CUDA_BF16);
    return mod;
}
