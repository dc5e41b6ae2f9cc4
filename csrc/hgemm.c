/* hgemm.c — lorafuse._C.sgemm, hgemm and hgemm_path: the GEMM core on its own (kernels.h lf_hgemm),
 * on fp32 operands (sgemm) or fp32 / bf16 / fp16 ones (hgemm), one body checking both: shapes, dtypes
 * named in errors, any strides, an out that overlaps no input, zero sizes.
 *
 * hgemm's inputs: float32 or float16 ndarrays, or anything with __dlpack__ (CPU torch tensors) holding
 * float32, float16 or bfloat16 — bfloat16, which NumPy lacks, is viewed as a uint16 array of its
 * bits (dlpack_in.c) and only ever read as bf16. Read in place; misaligned ones are copied.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL lorafuse_ARRAY_API
#define NO_IMPORT_ARRAY
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include "args.h"
#include "dlpack_in.h"
#include "runtime.h"

/* an input of sgemm (half = 0: float32 only, lf_py_as_f32) or hgemm (lf_py_as_typed) */
static PyArrayObject *as_input(lf_state *st, PyObject *obj, const char *F, const char *name, int half, lf_dtype *dt) {
    *dt = LF_DT_F32;
    return half ? lf_py_as_typed(st, obj, F, name, dt) : lf_py_as_f32(st, obj, F, name);
}

/* a (M, K) and b (K, N) of one call, converted and checked; -1 with the exception set */
static int parse_ab(lf_state *st, const char *F, int half, lf_py_arr_list *L, PyObject *oa, PyObject *ob,
                    PyArrayObject **a, PyArrayObject **b, lf_dtype *da, lf_dtype *db) {
    if (!(*a = lf_py_keep(L, as_input(st, oa, F, "a", half, da))) || lf_py_check_ndim(F, "a", *a, 2, "(M, K)"))
        return -1;
    if (!(*b = lf_py_keep(L, as_input(st, ob, F, "b", half, db))) || lf_py_check_ndim(F, "b", *b, 2, "(K, N)"))
        return -1;
    return lf_py_check_dim(F, "b", "(K, N) with K = a.shape[1]", *b, 0, PyArray_DIM(*a, 1));
}

PyObject *lf_py_gemm_run(lf_state *st, const char *F, lf_py_arr_list *L, npy_intp M, npy_intp N, npy_intp K,
                         float alpha, lf_tview va, lf_tview vb, PyArrayObject **ins, const char **names, int nin,
                         PyObject *obias, PyObject *oc, float beta) {
    PyArrayObject *bias = NULL, *c;
    if (obias != Py_None) {
        if (!(bias = lf_py_keep(L, lf_py_as_f32(st, obias, F, "bias"))) || lf_py_check_ndim(F, "bias", bias, 1, "(N,)") ||
            lf_py_check_dim(F, "bias", "(N,) with N the columns of c", bias, 0, N))
            return NULL;
        if (!PyArray_IS_C_CONTIGUOUS(bias) && !(bias = lf_py_keep(L, (PyArrayObject *)PyArray_NewCopy(bias, NPY_CORDER))))
            return NULL;
    }
    c = lf_py_keep(L, oc == Py_None ? lf_py_new_2d(st, M, N) : lf_py_check_output(st, oc, F, "out", NULL, M, N));
    if (!c || lf_py_check_no_alias(F, "out", c, ins, names, nin) ||
        (bias && lf_py_check_no_alias(F, "out", c, &bias, (const char *[]){"bias"}, 1)))
        return NULL;
    const float *pb = bias ? (const float *)PyArray_DATA(bias) : NULL;
    float *pc = (float *)PyArray_DATA(c);
    lf_py_sigint_guard guard;
    lf_pool *pool = lf_py_kernel_begin(st, 2.0 * (double)M * (double)N * (double)K, &guard);
    int status;
    Py_BEGIN_ALLOW_THREADS status = lf_hgemm(pool, M, N, K, alpha, va, vb, beta, pb, pc, N);
    Py_END_ALLOW_THREADS
    if (lf_py_kernel_end(st, &guard, status, F)) return NULL;
    Py_INCREF(c);
    return (PyObject *)c;
}

int lf_py_parse_alpha_beta(const char *F, PyObject *oalpha, PyObject *obeta, PyObject *oc, PyObject *obias,
                           float *alpha, float *beta) {
    *alpha = 1.0f;
    *beta = 0.0f;
    if ((oalpha && lf_py_parse_scale(oalpha, F, "alpha", alpha)) || (obeta && lf_py_parse_scale(obeta, F, "beta", beta)))
        return -1;
    if (*beta != 0.0f && *beta != 1.0f) {
        PyErr_Format(PyExc_ValueError, "%s: beta must be 0 or 1, got %R", F, obeta);
        return -1;
    }
    if (*beta == 1.0f && (oc == Py_None || obias != Py_None)) {
        PyErr_Format(PyExc_ValueError, "%s: beta=1 adds into out: out is required and bias must be None", F);
        return -1;
    }
    return 0;
}

/* c = beta·out + alpha·a·b (+ bias): the body of sgemm (half = 0) and hgemm; a new reference to c */
static PyObject *gemm_call(lf_state *st, const char *F, int half, PyObject *oa, PyObject *ob, float alpha,
                           PyObject *obias, PyObject *oc, float beta) {
    lf_py_arr_list L = {{0}, 0};
    PyArrayObject *a, *b;
    lf_dtype da, db;
    PyObject *c = NULL;
    if (!parse_ab(st, F, half, &L, oa, ob, &a, &b, &da, &db)) {
        PyArrayObject *ins[] = {a, b};
        const char *names[] = {"a", "b"};
        c = lf_py_gemm_run(st, F, &L, PyArray_DIM(a, 0), PyArray_DIM(b, 1), PyArray_DIM(a, 1), alpha,
                           lf_py_tview2(a, da), lf_py_tview2(b, db), ins, names, 2, obias, oc, beta);
    }
    lf_py_drop_all(&L);
    return c;
}

const char lf_py_sgemm_doc[] = "sgemm(a, b, alpha=1.0, bias=None, out=None) -> c\n\n"
                               "c (M, N) = alpha·a (M, K)·b (K, N) + bias (N,): lorafuse's packed GEMM on its own.";

PyObject *lf_py_sgemm(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"a", "b", "alpha", "bias", "out", NULL};
    PyObject *oa, *ob, *oalpha = NULL, *obias = Py_None, *oc = Py_None;
    float alpha = 1.0f;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OOO:sgemm", kwlist, &oa, &ob, &oalpha, &obias, &oc) ||
        (oalpha && lf_py_parse_scale(oalpha, "sgemm", "alpha", &alpha)))
        return NULL;
    return gemm_call(PyModule_GetState(self), "sgemm", 0, oa, ob, alpha, obias, oc, 0.0f);
}

const char lf_py_hgemm_doc[] =
    "hgemm(a, b, alpha=1.0, bias=None, out=None, beta=0.0) -> c\n\n"
    "c (M, N) float32 = beta·out + alpha·a (M, K)·b (K, N) (+ bias (N,) when beta == 0), a and b each\n"
    "float32, float16 or bfloat16 (torch tensors; numpy float32 / float16), any strides; fp32\n"
    "accumulation. beta is 0 or 1; beta=1 adds into out (required) and takes no bias.";

PyObject *lf_py_hgemm(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "hgemm";
    static char *kwlist[] = {"a", "b", "alpha", "bias", "out", "beta", NULL};
    PyObject *oa, *ob, *oalpha = NULL, *obias = Py_None, *oc = Py_None, *obeta = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OOOO:hgemm", kwlist, &oa, &ob, &oalpha, &obias, &oc, &obeta))
        return NULL;
    float alpha, beta;
    if (lf_py_parse_alpha_beta(F, oalpha, obeta, oc, obias, &alpha, &beta)) return NULL;
    return gemm_call(PyModule_GetState(self), F, 1, oa, ob, alpha, obias, oc, beta);
}

const char lf_py_hgemm_path_doc[] =
    "hgemm_path(a, b, alpha=1.0) -> (path, a_dtype, b_dtype, orientation)\n\n"
    "How hgemm(a, b, alpha) would run on the ISA in use: path 'amx_bf16' (AMX tdpbf16ps tiles),\n"
    "'bf16_pairs' (vdpbf16ps on bf16 K-pairs) or 'widened' (bf16 / fp16 widened to fp32 while packing,\n"
    "the fp32 micro-kernels); orientation 'a_rows' (a's rows packed into the tile, b's columns into\n"
    "slivers) or 'w_rows' (bf16_pairs with 16-256 rows of a and a large column-contiguous b = Wᵀ: run as\n"
    "cᵀ = bᵀ·aᵀ, W's rows read in place; the same bits).";

PyObject *lf_py_hgemm_path(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "hgemm_path";
    static char *kwlist[] = {"a", "b", "alpha", NULL};
    PyObject *oa, *ob, *oalpha = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O:hgemm_path", kwlist, &oa, &ob, &oalpha)) return NULL;
    lf_state *st = PyModule_GetState(self);
    float alpha = 1.0f;
    if (oalpha && lf_py_parse_scale(oalpha, F, "alpha", &alpha)) return NULL;
    lf_py_arr_list L = {{0}, 0};
    PyArrayObject *a, *b;
    lf_dtype da, db;
    PyObject *res = NULL;
    if (!parse_ab(st, F, 1, &L, oa, ob, &a, &b, &da, &db)) {
        const lf_tview ta = lf_py_tview2(a, da), tb = lf_py_tview2(b, db);
        const int w_rows = lf_hgemm_w_rows(PyArray_DIM(a, 0), PyArray_DIM(b, 1), PyArray_DIM(a, 1), alpha, ta, tb);
        res = Py_BuildValue("(ssss)", lf_hgemm_path(alpha, ta, tb), lf_py_dtype_name(da), lf_py_dtype_name(db),
                            w_rows ? "w_rows" : "a_rows");
    }
    lf_py_drop_all(&L);
    return res;
}
