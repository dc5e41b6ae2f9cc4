/* quant.c — lorafuse._C.dequant_4bit, quant_4bit, quant_tables, q4gemm / q4gemm_path (a GEMM whose
 * second operand is a 4-bit weight, dequantized while it is packed: lf_tview.qw): bitsandbytes' weight
 * storage (kernels/include/lorafuse/quant.h) on NumPy arrays or CPU torch tensors (DLPack, read
 * in place).
 *
 * Every length a stored weight claims is checked against the arrays it comes with before C reads
 * them (lf_qweight_unfit: data bytes, scales per block, nested scales per nested block, the 256-entry
 * nested code table), so a hostile quant_state raises ValueError instead of reading out of bounds.
 * Inputs of the wrong dtype are TypeErrors naming the argument; non-contiguous ones are copied.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL lorafuse_ARRAY_API
#define NO_IMPORT_ARRAY
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <string.h>

#include "args.h"
#include "dlpack_in.h"
#include "quant_args.h"
#include "runtime.h"

#include "lorafuse/quant.h"

/* New reference to obj as an ndarray: ndarrays as they are, objects with __dlpack__ viewed in place
 * (bfloat16 as uint16 bits, *bf16 = 1); NULL with TypeError naming the argument. writable: an
 * output, which may not be a torch tensor that requires grad. */
static PyArrayObject *as_ndarray(lf_state *st, PyObject *obj, const char *F, const char *name, int *bf16,
                                 int writable) {
    int kind, requires_grad = 0;
    *bf16 = 0;
    if (PyArray_Check(obj)) {
        Py_INCREF(obj);
        return (PyArrayObject *)obj;
    }
    if ((kind = lf_dlpack_kind(&st->dlpack, obj)) == LF_DLPACK_NONE) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be a numpy array or a CPU tensor with __dlpack__, got %s", F, name,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    if (kind < 0) return NULL;
    PyObject *a = lf_array_from_dlpack(&st->dlpack, obj, kind, F, name, writable ? &requires_grad : NULL, bf16);
    if (a && requires_grad) {
        Py_DECREF(a);
        PyErr_Format(PyExc_TypeError, "%s: %s requires grad; pass a tensor that does not", F, name);
        return NULL;
    }
    return (PyArrayObject *)a;
}

/* quant_args.h */
PyArrayObject *lf_py_quant_input(lf_state *st, PyObject *obj, const char *F, const char *name, int type,
                               const char *what) {
    int bf16;
    PyArrayObject *a = as_ndarray(st, obj, F, name, &bf16, 0);
    if (!a) return NULL;
    if (bf16 || PyArray_DESCR(a)->type_num != type || PyArray_ISBYTESWAPPED(a)) {
        PyObject *ds = PyObject_Str((PyObject *)PyArray_DESCR(a));
        if (ds) PyErr_Format(PyExc_TypeError, "%s: %s must be %s, got %s%U", F, name, what, bf16 ? "bfloat16 " : "", ds);
        Py_XDECREF(ds);
        Py_DECREF(a);
        return NULL;
    }
    if (PyArray_IS_C_CONTIGUOUS(a) && PyArray_ISALIGNED(a)) return a;
    PyArrayObject *c = (PyArrayObject *)PyArray_NewCopy(a, NPY_CORDER);
    Py_DECREF(a);
    return c;
}

/* "nf4" / "fp4" */
static int parse_type(const char *F, const char *s, lf_qtype *t) {
    if (!strcmp(s, "nf4")) *t = LF_Q4_NF4;
    else if (!strcmp(s, "fp4")) *t = LF_Q4_FP4;
    else {
        PyErr_Format(PyExc_ValueError, "%s: quant_type must be 'nf4' or 'fp4', got '%s'", F, s);
        return -1;
    }
    return 0;
}

/* (lo, hi) of a range inside [0, size], or the whole of it for None */
static int parse_range(const char *F, const char *name, PyObject *obj, int64_t size, int64_t *lo, int64_t *hi) {
    *lo = 0;
    *hi = size;
    if (obj == Py_None) return 0;
    long long a, b;
    if (!PyTuple_Check(obj) || !PyArg_ParseTuple(obj, "LL", &a, &b)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: %s must be a tuple (start, stop) of ints or None", F, name);
        return -1;
    }
    if (a < 0 || a > b || b > size) {
        PyErr_Format(PyExc_ValueError, "%s: %s must satisfy 0 <= start <= stop <= %lld, got (%lld, %lld)", F, name,
                     (long long)size, a, b);
        return -1;
    }
    *lo = a;
    *hi = b;
    return 0;
}

/* shape: (rows, cols) or (n,) read as (1, n) */
static int parse_shape(const char *F, PyObject *obj, int64_t *rows, int64_t *cols) {
    long long a = 1, b;
    if (!PyTuple_Check(obj) || !(PyTuple_GET_SIZE(obj) == 2 ? PyArg_ParseTuple(obj, "LL", &a, &b)
                                                             : PyArg_ParseTuple(obj, "L", &b))) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: shape must be a tuple (rows, cols) or (n,) of ints", F);
        return -1;
    }
    if (a < 0 || b < 0) {
        PyErr_Format(PyExc_ValueError, "%s: shape must hold sizes >= 0, got (%lld, %lld)", F, a, b);
        return -1;
    }
    *rows = a;
    *cols = b;
    return 0;
}

/* quant_args.h */
int lf_py_parse_qdtype(const char *F, const char *s, lf_dtype *dt) {
    if (!strcmp(s, "float32")) *dt = LF_DT_F32;
    else if (!strcmp(s, "bfloat16")) *dt = LF_DT_BF16;
    else if (!strcmp(s, "float16")) *dt = LF_DT_F16;
    else {
        PyErr_Format(PyExc_ValueError, "%s: dtype must be 'float32', 'bfloat16' or 'float16', got '%s'", F, s);
        return -1;
    }
    return 0;
}

/* out: a given array (dtype dt — bf16 as a bfloat16 tensor or uint16 bits —, shape (m, n),
 * C-contiguous, writable) or, for None, a new one (float32, uint16 bf16 bits, float16) */
static PyArrayObject *output_of(lf_state *st, PyObject *obj, const char *F, lf_dtype dt, int64_t m, int64_t n) {
    static const int types[] = {NPY_FLOAT32, NPY_UINT16, NPY_FLOAT16};
    if (obj == Py_None) {
        npy_intp dims[2] = {(npy_intp)m, (npy_intp)n};
        return (PyArrayObject *)PyArray_SimpleNew(2, dims, types[dt]);
    }
    int bf16;
    PyArrayObject *o = as_ndarray(st, obj, F, "out", &bf16, 1);
    if (!o) return NULL;
    const char *why = NULL;
    if (PyArray_DESCR(o)->type_num != types[dt] || PyArray_ISBYTESWAPPED(o) || (bf16 && dt != LF_DT_BF16))
        why = "must have the dtype asked for (bfloat16: a bfloat16 tensor or uint16 bits)";
    else if (PyArray_NDIM(o) != 2 || PyArray_DIM(o, 0) != m || PyArray_DIM(o, 1) != n)
        why = "must have shape (rows, cols) of the range asked for";
    else if (!PyArray_IS_C_CONTIGUOUS(o) || !PyArray_ISALIGNED(o))
        why = "must be C-contiguous and aligned";
    else if (!PyArray_ISWRITEABLE(o))
        why = "is read-only";
    if (why) {
        PyErr_Format(PyExc_ValueError, "%s: out %s", F, why);
        Py_DECREF(o);
        return NULL;
    }
    return o;
}

/* quant_args.h */
int lf_py_parse_q4(lf_state *st, const char *F, lf_py_arr_list *L, const lf_py_q4_args *q, lf_qweight *w,
                    PyArrayObject *arrs[4]) {
    memset(w, 0, sizeof *w);
    arrs[0] = arrs[1] = arrs[2] = arrs[3] = NULL;
    if (parse_type(F, q->quant_type, &w->type) || parse_shape(F, q->shape, &w->rows, &w->cols)) return -1;
    w->blocksize = q->blocksize;
    w->nested = q->nested_absmax != Py_None;
    w->nested_blocksize = q->nested_blocksize;
    w->offset = (float)q->offset;
    if (w->nested != (q->nested_code != Py_None)) {
        PyErr_Format(PyExc_ValueError, "%s: nested_absmax and nested_code come together (double quantization)", F);
        return -1;
    }
    PyArrayObject *data, *am, *nam = NULL, *code = NULL;
    if (!(data = lf_py_keep(L, lf_py_quant_input(st, q->data, F, "data", NPY_UINT8, "uint8"))) ||
        !(am = lf_py_keep(L, w->nested ? lf_py_quant_input(st, q->absmax, F, "absmax", NPY_UINT8, "uint8 (double-quantized codes)")
                                       : lf_py_quant_input(st, q->absmax, F, "absmax", NPY_FLOAT32, "float32"))))
        return -1;
    if (w->nested && (!(nam = lf_py_keep(L, lf_py_quant_input(st, q->nested_absmax, F, "nested_absmax", NPY_FLOAT32, "float32"))) ||
                      !(code = lf_py_keep(L, lf_py_quant_input(st, q->nested_code, F, "nested_code", NPY_FLOAT32, "float32")))))
        return -1;
    if (code && PyArray_SIZE(code) != 256) {
        PyErr_Format(PyExc_ValueError, "%s: nested_code must hold 256 values, got %zd", F, (Py_ssize_t)PyArray_SIZE(code));
        return -1;
    }
    w->data = PyArray_DATA(data);
    w->nbytes = PyArray_SIZE(data);
    w->absmax = w->nested ? NULL : PyArray_DATA(am);
    w->absmax_q = w->nested ? PyArray_DATA(am) : NULL;
    w->n_absmax = PyArray_SIZE(am);
    if (w->nested) {
        w->nested_absmax = PyArray_DATA(nam);
        w->n_nested_absmax = PyArray_SIZE(nam);
        w->nested_code = PyArray_DATA(code);
    }
    const char *why = lf_qweight_unfit(w);
    if (why) {
        PyErr_Format(PyExc_ValueError, "%s: %s", F, why);
        return -1;
    }
    arrs[0] = data;
    arrs[1] = am;
    arrs[2] = nam;
    arrs[3] = code;
    return 0;
}

const char lf_py_dequant_4bit_doc[] =
    "dequant_4bit(data, absmax, shape, blocksize, quant_type, dtype='float32', nested_absmax=None,\n"
    "             nested_code=None, nested_blocksize=256, offset=0.0, rows=None, cols=None, out=None) -> W\n\n"
    "bitsandbytes' 4-bit weight (lorafuse/quant.h) dequantized, bit-identical to its dequantize_4bit:\n"
    "data uint8 (ceil(rows*cols/2) bytes, any shape), shape (rows, cols), quant_type 'nf4' | 'fp4',\n"
    "absmax float32 (one per block) or, double-quantized, uint8 codes with nested_absmax float32,\n"
    "nested_code float32 (256,), nested_blocksize and offset. rows / cols: (start, stop) sub-ranges.\n"
    "Returns W[rows, cols] (m, n) as float32, float16 or uint16 bfloat16 bits, or writes out.";

PyObject *lf_py_dequant_4bit(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "dequant_4bit";
    static char *kwlist[] = {"data", "absmax", "shape", "blocksize", "quant_type", "dtype", "nested_absmax",
                             "nested_code", "nested_blocksize", "offset", "rows", "cols", "out", NULL};
    lf_py_q4_args q = {.nested_absmax = Py_None, .nested_code = Py_None, .nested_blocksize = 256, .offset = 0.0};
    PyObject *orows = Py_None, *ocols = Py_None, *oout = Py_None;
    const char *sdtype = "float32";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOLs|sOOLdOOO:dequant_4bit", kwlist, &q.data, &q.absmax, &q.shape,
                                     &q.blocksize, &q.quant_type, &sdtype, &q.nested_absmax, &q.nested_code,
                                     &q.nested_blocksize, &q.offset, &orows, &ocols, &oout))
        return NULL;
    lf_state *st = PyModule_GetState(self);
    lf_qweight w;
    lf_dtype dt;
    int64_t r0, r1, c0, c1;
    lf_py_arr_list L = {{0}, 0};
    PyArrayObject *arrs[4], *out;
    if (lf_py_parse_qdtype(F, sdtype, &dt) || lf_py_parse_q4(st, F, &L, &q, &w, arrs) ||
        parse_range(F, "rows", orows, w.rows, &r0, &r1) || parse_range(F, "cols", ocols, w.cols, &c0, &c1))
        goto fail;
    if (!(out = lf_py_keep(&L, output_of(st, oout, F, dt, r1 - r0, c1 - c0)))) goto fail;
    const char *names[] = {"data", "absmax", "nested_absmax", "nested_code"};
    if (lf_py_check_no_alias(F, "out", out, arrs, names, w.nested ? 4 : 2)) goto fail;
    int status;
    void *po = PyArray_DATA(out);
    Py_BEGIN_ALLOW_THREADS status = lf_qweight_dequantize(&w, r0, r1, c0, c1, dt, po, c1 - c0);
    Py_END_ALLOW_THREADS
    if (status) {
        lf_py_raise_status(status, F);
        goto fail;
    }
    Py_INCREF(out);
    lf_py_drop_all(&L);
    return (PyObject *)out;
fail:
    lf_py_drop_all(&L);
    return NULL;
}

/* op(W) of a weight W (rows, cols) as a (P, Q) view: Wᵀ (transpose_b: element (p, q) = W[q, p], flat
 * q·cols + p) or W (element (p, q) = W[p, q], flat p·cols + q); its elements rounded to dt */
static lf_tview op_of(const lf_qweight *w, int transpose_b, lf_dtype dt, int64_t *P, int64_t *Q) {
    *P = transpose_b ? w->cols : w->rows;
    *Q = transpose_b ? w->rows : w->cols;
    return (lf_tview){.rs = transpose_b ? 1 : w->cols, .cs = transpose_b ? w->cols : 1, .dtype = dt, .qw = w};
}

const char lf_py_q4gemm_doc[] =
    "q4gemm(a, data, absmax, shape, blocksize, quant_type, transpose_b=True, alpha=1.0, bias=None, out=None,\n"
    "       beta=0.0, dtype='bfloat16', nested_absmax=None, nested_code=None, nested_blocksize=256,\n"
    "       offset=0.0, w_first=False) -> c\n\n"
    "c (M, N) float32 = beta·out + alpha·a (M, K)·op(W) (+ bias (N,) when beta == 0), W (rows, cols) a\n"
    "4-bit weight given as dequant_4bit takes it, op(W) = Wᵀ (transpose_b: K = cols, N = rows; the\n"
    "forward x·Wᵀ) or W (K = rows, N = cols; dx = g·W). W's elements are code·absmax (one fp32 product)\n"
    "rounded to dtype ('bfloat16': as bnb's dequantize_4bit to bf16; 'float32', 'float16'), dequantized\n"
    "while the GEMM packs them: W in full precision never exists. a: float32, float16 or bfloat16, any\n"
    "strides; fp32 accumulation. bf16 a, dtype 'bfloat16' and alpha 1 run the bf16 tiles (q4gemm_path).\n"
    "beta is 0 or 1; beta=1 adds into out (required) and takes no bias. w_first: c = beta·out +\n"
    "alpha·op(W)·a (K, N) instead (W the GEMM's first operand, as in yᵀ = W·xᵀ; alpha scales W).";

PyObject *lf_py_q4gemm(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "q4gemm";
    static char *kwlist[] = {"a", "data", "absmax", "shape", "blocksize", "quant_type", "transpose_b", "alpha",
                             "bias", "out", "beta", "dtype", "nested_absmax", "nested_code", "nested_blocksize",
                             "offset", "w_first", NULL};
    lf_py_q4_args q = {.nested_absmax = Py_None, .nested_code = Py_None, .nested_blocksize = 256, .offset = 0.0};
    PyObject *oa, *oalpha = NULL, *obias = Py_None, *oc = Py_None, *obeta = NULL;
    int transpose_b = 1, w_first = 0;
    const char *sdtype = "bfloat16";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOLs|pOOOOsOOLdp:q4gemm", kwlist, &oa, &q.data, &q.absmax, &q.shape,
                                     &q.blocksize, &q.quant_type, &transpose_b, &oalpha, &obias, &oc, &obeta, &sdtype,
                                     &q.nested_absmax, &q.nested_code, &q.nested_blocksize, &q.offset, &w_first))
        return NULL;
    float alpha, beta;
    if (lf_py_parse_alpha_beta(F, oalpha, obeta, oc, obias, &alpha, &beta)) return NULL;
    lf_state *st = PyModule_GetState(self);
    lf_py_arr_list L = {{0}, 0};
    lf_qweight w;
    lf_dtype da, dw;
    PyArrayObject *a, *arrs[4];
    PyObject *c = NULL;
    int64_t P, Q;
    if (lf_py_parse_qdtype(F, sdtype, &dw) || !(a = lf_py_keep(&L, lf_py_as_typed(st, oa, F, "a", &da))) ||
        lf_py_check_ndim(F, "a", a, 2, w_first ? "(K, N)" : "(M, K)") || lf_py_parse_q4(st, F, &L, &q, &w, arrs))
        goto done;
    const lf_tview vw = op_of(&w, transpose_b, dw, &P, &Q); /* op(W) (P, Q) */
    static const char *const want[2][2] = {{"(M, K) with K = shape[0] (a·W)", "(M, K) with K = shape[1] (a·Wᵀ)"},
                                           {"(K, N) with K = shape[1] (W·a)", "(K, N) with K = shape[0] (Wᵀ·a)"}};
    if (lf_py_check_dim(F, "a", want[w_first][transpose_b], a, w_first ? 0 : 1, w_first ? Q : P)) goto done;
    {
        /* c (M, N) = a (M, P)·op(W), or (w_first) op(W)·a (Q, N) */
        const npy_intp M = w_first ? P : PyArray_DIM(a, 0), N = w_first ? PyArray_DIM(a, 1) : Q, K = w_first ? Q : P;
        PyArrayObject *ins[] = {a, arrs[0], arrs[1], arrs[2], arrs[3]};
        const char *names[] = {"a", "data", "absmax", "nested_absmax", "nested_code"};
        const lf_tview va = lf_py_tview2(a, da);
        c = lf_py_gemm_run(st, F, &L, M, N, K, alpha, w_first ? vw : va, w_first ? va : vw, ins, names,
                           w.nested ? 5 : 3, obias, oc, beta);
    }
done:
    lf_py_drop_all(&L);
    return c;
}

const char lf_py_q4gemm_path_doc[] =
    "q4gemm_path(a, dtype='bfloat16', alpha=1.0) -> (path, a_dtype, w_dtype)\n\n"
    "How q4gemm(a, ..., alpha=alpha, dtype=dtype) would run on the ISA in use: 'amx_bf16' (AMX tiles),\n"
    "'bf16_pairs' (vdpbf16ps on K-pairs) or 'widened' (fp32 micro-kernels), as hgemm_path; W is\n"
    "dequantized while packed on every path.";

PyObject *lf_py_q4gemm_path(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "q4gemm_path";
    static char *kwlist[] = {"a", "dtype", "alpha", NULL};
    PyObject *oa, *oalpha = NULL;
    const char *sdtype = "bfloat16";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|sO:q4gemm_path", kwlist, &oa, &sdtype, &oalpha)) return NULL;
    float alpha = 1.0f;
    lf_dtype da, dw;
    if ((oalpha && lf_py_parse_scale(oalpha, F, "alpha", &alpha)) || lf_py_parse_qdtype(F, sdtype, &dw)) return NULL;
    PyArrayObject *a = lf_py_as_typed(PyModule_GetState(self), oa, F, "a", &da);
    if (!a) return NULL;
    const lf_qweight none = {0}; /* the path depends on dtypes and alpha only */
    PyObject *res = NULL;
    if (!lf_py_check_ndim(F, "a", a, 2, "(M, K)"))
        res = Py_BuildValue("(sss)", lf_hgemm_path(alpha, lf_py_tview2(a, da), (lf_tview){.dtype = dw, .qw = &none}),
                            lf_py_dtype_name(da), lf_py_dtype_name(dw));
    Py_DECREF(a);
    return res;
}

const char lf_py_quant_4bit_doc[] =
    "quant_4bit(W, blocksize=64, quant_type='nf4') -> (data, absmax)\n\n"
    "W (any shape; float32, float16, or a bfloat16 tensor) quantized as bitsandbytes' quantize_4bit on the\n"
    "CPU: data uint8 (ceil(n/2),), two codes a byte, the even element in the high nibble; absmax float32\n"
    "(ceil(n/blocksize),). W must be finite.";

PyObject *lf_py_quant_4bit(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "quant_4bit";
    static char *kwlist[] = {"W", "blocksize", "quant_type", NULL};
    PyObject *oW;
    long long blocksize = 64;
    const char *stype = "nf4";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|Ls:quant_4bit", kwlist, &oW, &blocksize, &stype)) return NULL;
    lf_qtype type;
    if (parse_type(F, stype, &type)) return NULL;
    if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)))
        return PyErr_Format(PyExc_ValueError, "%s: blocksize must be one of 32, 64, 128, ..., 4096, got %lld", F,
                            blocksize);
    lf_state *st = PyModule_GetState(self);
    int bf16;
    PyArrayObject *W = as_ndarray(st, oW, F, "W", &bf16, 0), *Wc = NULL, *data = NULL, *am = NULL;
    PyObject *res = NULL;
    if (!W) return NULL;
    const int tn = PyArray_DESCR(W)->type_num;
    if (!(bf16 || tn == NPY_FLOAT32 || tn == NPY_FLOAT16) || PyArray_ISBYTESWAPPED(W)) {
        PyErr_Format(PyExc_TypeError, "%s: W must be float32, float16 or bfloat16 (native byte order)", F);
        goto done;
    }
    if (!(Wc = (PyArrayObject *)PyArray_FromAny((PyObject *)W, NULL, 0, 0, NPY_ARRAY_CARRAY_RO, NULL))) goto done;
    const int64_t n = PyArray_SIZE(Wc);
    npy_intp dbytes = (npy_intp)(n / 2 + (n & 1)), dblocks = (npy_intp)(n / blocksize + (n % blocksize != 0));
    if (!(data = (PyArrayObject *)PyArray_SimpleNew(1, &dbytes, NPY_UINT8)) ||
        !(am = (PyArrayObject *)PyArray_SimpleNew(1, &dblocks, NPY_FLOAT32)))
        goto done;
    const lf_dtype sdt = bf16 ? LF_DT_BF16 : tn == NPY_FLOAT32 ? LF_DT_F32 : LF_DT_F16;
    const void *src = PyArray_DATA(Wc);
    uint8_t *pd = PyArray_DATA(data);
    float *pa = PyArray_DATA(am);
    int status;
    Py_BEGIN_ALLOW_THREADS status = lf_q4_quantize(type, blocksize, n, src, sdt, pd, pa);
    Py_END_ALLOW_THREADS
    if (status == LF_EINVAL) PyErr_Format(PyExc_ValueError, "%s: W holds inf or NaN", F);
    else if (status) lf_py_raise_status(status, F);
    else res = PyTuple_Pack(2, (PyObject *)data, (PyObject *)am);
done:
    Py_XDECREF(W);
    Py_XDECREF(Wc);
    Py_XDECREF(data);
    Py_XDECREF(am);
    return res;
}

const char lf_py_double_quant_doc[] =
    "double_quant(absmax, offset=None, nested_blocksize=256) -> (codes, nested_absmax, offset)\n\n"
    "bitsandbytes' double quantization of 4-bit scales (quantize_4bit(compress_statistics=True)): absmax\n"
    "float32 (blocks,) minus offset, in its 8-bit blockwise format (create_dynamic_map, its CPU lookup\n"
    "table): codes uint8 (blocks,), nested_absmax float32 (ceil(blocks/nested_blocksize),). offset None:\n"
    "the mean summed in double (bnb uses torch's absmax.mean(): pass it for its bits).";

PyObject *lf_py_double_quant(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "double_quant";
    static char *kwlist[] = {"absmax", "offset", "nested_blocksize", NULL};
    PyObject *oabs, *ooffset = Py_None;
    long long nested_bs = 256;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OL:double_quant", kwlist, &oabs, &ooffset, &nested_bs)) return NULL;
    if (nested_bs < 1 || nested_bs > 4096)
        return PyErr_Format(PyExc_ValueError, "%s: nested_blocksize must be in [1, 4096], got %lld", F, nested_bs);
    PyArrayObject *am = lf_py_quant_input(PyModule_GetState(self), oabs, F, "absmax", NPY_FLOAT32, "float32"), *qa = NULL,
                  *a2 = NULL;
    PyObject *res = NULL;
    if (!am) return NULL;
    const int64_t blocks = PyArray_SIZE(am);
    const float *pa = PyArray_DATA(am);
    float offset;
    if (ooffset == Py_None) offset = lf_q4_mean(pa, blocks);
    else if (lf_py_parse_scale(ooffset, F, "offset", &offset)) goto done;
    npy_intp d1 = (npy_intp)blocks, d2 = (npy_intp)(blocks / nested_bs + (blocks % nested_bs != 0));
    if (!(qa = (PyArrayObject *)PyArray_SimpleNew(1, &d1, NPY_UINT8)) ||
        !(a2 = (PyArrayObject *)PyArray_SimpleNew(1, &d2, NPY_FLOAT32)))
        goto done;
    uint8_t *pq = PyArray_DATA(qa);
    float *p2 = PyArray_DATA(a2);
    int status;
    Py_BEGIN_ALLOW_THREADS status = lf_q4_double_quant(pa, blocks, offset, nested_bs, pq, p2);
    Py_END_ALLOW_THREADS
    if (status == LF_EINVAL) PyErr_Format(PyExc_ValueError, "%s: absmax and offset must be finite", F);
    else if (status) lf_py_raise_status(status, F);
    else res = Py_BuildValue("(OOf)", qa, a2, offset);
done:
    Py_DECREF(am);
    Py_XDECREF(qa);
    Py_XDECREF(a2);
    return res;
}

static PyObject *float_list(const float *v, int n) {
    PyObject *l = PyList_New(n);
    for (int i = 0; l && i < n; i++) {
        PyObject *f = PyFloat_FromDouble(v[i]);
        if (!f) {
            Py_CLEAR(l);
            break;
        }
        PyList_SET_ITEM(l, i, f);
    }
    return l;
}

const char lf_py_quant_tables_doc[] =
    "quant_tables() -> dict: the code tables the 4-bit kernels use ('nf4', 'fp4': 16 values; 'dynamic': 256,\n"
    "bnb's create_dynamic_map) as Python floats (exact fp32 values).";

PyObject *lf_py_quant_tables(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return Py_BuildValue("{s:N,s:N,s:N}", "nf4", float_list(lf_q4_code(LF_Q4_NF4), 16), "fp4",
                         float_list(lf_q4_code(LF_Q4_FP4), 16), "dynamic", float_list(lf_q8_dynamic_code(), 256));
}
